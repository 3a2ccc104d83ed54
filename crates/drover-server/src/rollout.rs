//! A person acting on rollouts under way: pause, resume, promote, abort
//! (`POST /v1/rollout`, `drover rollout ACTION SERVICE`), as `drover_control::rollout::control`
//! decides; this shell stores the records and events, then reverts what was aborted. The state
//! lives in each group's rollout record, so a pause holds across server restarts; the
//! controller reads it (`GroupSpec::paused`).

use drover_model::api::{RolloutActed, RolloutAction, RolloutActionRequest, RolloutActionResponse};
use drover_model::{EventKind, NewEvent};
use drover_store::Write;

use crate::engine::{now_ms, Engine};
use crate::ServerError;

impl Engine {
    /// The groups of `service` (only `region`'s when given), or why there are none.
    pub(crate) fn groups_of(
        &self,
        service: &str,
        region: Option<&str>,
    ) -> Result<Vec<String>, ServerError> {
        let st = self.state();
        let svc = crate::state::service_in(&st, service, region)?;
        Ok(svc
            .regions
            .iter()
            .filter(|r| region.is_none_or(|x| x == r.as_str()))
            .map(|r| drover_model::GroupId::new(service, r).0)
            .filter(|g| st.groups.contains_key(g))
            .collect())
    }

    /// Pause, resume, promote or abort the rollouts of a service.
    pub async fn rollout_action(
        &self,
        req: RolloutActionRequest,
    ) -> Result<RolloutActionResponse, ServerError> {
        let _w = self.write_lock.lock().await;
        let groups = self.groups_of(&req.service, req.region.as_deref())?;
        let now = now_ms();
        let verb = match req.action {
            RolloutAction::Pause => "pause",
            RolloutAction::Resume => "resume",
            RolloutAction::Promote => "promote",
            RolloutAction::Abort => "abort",
        };
        let mut acted = Vec::new();
        let mut writes = Vec::new();
        let mut records = Vec::new();
        let mut aborted = Vec::new();
        for gid in &groups {
            let Some(mut record) = self.state().groups.get(gid).map(|g| g.record.clone()) else {
                continue;
            };
            if !record.rollout.open {
                continue;
            }
            let has_canary = {
                let st = self.state();
                st.groups
                    .get(gid)
                    .and_then(|g| st.service(g))
                    .is_some_and(|s| s.rollout.canary.is_some())
            };
            let generation = record.generation;
            let done = drover_control::rollout::control(
                &mut record.rollout,
                generation,
                req.action,
                has_canary,
                now,
            );
            if let Some(good) = done.revert_to {
                aborted.push((gid.clone(), generation, good));
            }
            let (result, message) = (done.result, done.event);
            if let Some(m) = message {
                writes.push(Write::Group(record.clone()));
                writes.push(Write::Event(
                    NewEvent::new(EventKind::Rollout, m).group(gid),
                ));
                records.push(record);
            }
            acted.push(RolloutActed {
                group: gid.clone(),
                generation,
                result,
            });
        }
        if acted.is_empty() {
            return Err(ServerError::RolloutNotOpen {
                service: req.service,
                region: req.region,
                action: verb,
            });
        }
        // Durable first, then in memory: a failed commit changes nothing.
        self.commit(writes).await?;
        {
            let mut st = self.state();
            for rec in records {
                if let Some(g) = st.groups.get_mut(&rec.group) {
                    g.record = rec;
                }
            }
        }
        for (gid, generation, good) in aborted {
            self.auto_revert(&gid, generation, good).await?;
        }
        self.wake.notify_one();
        Ok(RolloutActionResponse { groups: acted })
    }
}
