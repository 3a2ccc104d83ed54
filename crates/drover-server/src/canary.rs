//! Carrying out the canary stage the group controller decides (`CanaryBaking`,
//! `CanaryAnalyse`), planned by [`drover_control::world::canary`]: the shell reads the
//! balancers' counters, commits, opens the windows, and fails the rollout when told to.

use drover_control::world::{CanaryOutcome, LbCounters};

use crate::engine::Engine;
use crate::ServerError;

impl Engine {
    /// Every canary is ready: the bake begins; each instance of the group opens its window.
    pub(crate) async fn canary_baking(
        &self,
        group: &str,
        generation: u64,
        now: u64,
    ) -> Result<(), ServerError> {
        let Some(change) = self.state().canary_baking(group, generation, now) else {
            return Ok(());
        };
        self.carry_out_change(change).await?;
        self.open_windows(group);
        Ok(())
    }

    /// The balancers' counters to each instance of `group` now.
    fn lb_counters(&self, group: &str) -> LbCounters {
        let ids = self.state().window_ids(group);
        ids.into_iter()
            .map(|id| {
                let c = self.balancers.target_counters(group, &id);
                (id, c)
            })
            .collect()
    }

    /// Start every instance's window of `group` from now.
    fn open_windows(&self, group: &str) {
        let lb = self.lb_counters(group);
        self.state().open_windows(group, &lb);
    }

    /// The bake is over: judge the canaries against the old instances, and act on it.
    pub(crate) async fn canary_analyse(
        &self,
        group: &str,
        generation: u64,
        now: u64,
    ) -> Result<(), ServerError> {
        let lb = self.lb_counters(group);
        let outcome = self.state().canary_analyse(group, generation, now, &lb);
        match outcome {
            None => Ok(()),
            Some(CanaryOutcome::BakeAgain(change)) => {
                self.carry_out_change(change).await?;
                self.open_windows(group);
                Ok(())
            }
            Some(CanaryOutcome::Fail { change, reason }) => {
                // Store the numbers, then fail the rollout (auto_revert goes back).
                self.carry_out_change(change).await?;
                self.rollout_failed(group, generation, &reason, None).await
            }
            Some(CanaryOutcome::Verdict(change)) => self.carry_out_change(change).await,
        }
    }
}
