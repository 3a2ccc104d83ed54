//! A person acting on rollouts under way: pause, resume, promote, abort
//! (`POST /v1/rollout`, `drover rollout ACTION SERVICE`). The state lives in each group's
//! rollout record, so a pause holds across server restarts; the controller reads it
//! (`GroupSpec::paused`).

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
            let r = &mut record.rollout;
            let (result, message) = match req.action {
                RolloutAction::Pause if r.paused => ("already paused".to_string(), None),
                RolloutAction::Pause => {
                    r.paused = true;
                    (
                        "paused".to_string(),
                        Some(format!(
                            "rollout to generation {generation} paused (drover rollout pause): no permit and nothing new launched until `drover rollout resume`"
                        )),
                    )
                }
                RolloutAction::Promote if !r.paused && !r.canary_passed && has_canary => {
                    r.canary_passed = true;
                    (
                        "promoted".to_string(),
                        Some(format!(
                            "rollout to generation {generation} promoted (drover rollout promote): the canary stage ends, the rollout goes on"
                        )),
                    )
                }
                RolloutAction::Resume | RolloutAction::Promote if !r.paused => {
                    ("not paused: it goes on already".to_string(), None)
                }
                RolloutAction::Resume | RolloutAction::Promote => {
                    r.paused = false;
                    r.resumed_ms = now;
                    if req.action == RolloutAction::Promote {
                        r.canary_passed = true;
                    }
                    (
                        "resumed".to_string(),
                        Some(format!(
                            "rollout to generation {generation} resumed (drover rollout {verb})"
                        )),
                    )
                }
                RolloutAction::Abort => {
                    r.open = false;
                    r.paused = false;
                    r.failed_generation = generation;
                    let why = "aborted by a person (drover rollout abort)".to_string();
                    r.failure = Some(why.clone());
                    let good = r.good_generation;
                    let next = if good > 0 && good != generation {
                        aborted.push((gid.clone(), generation));
                        format!("; going back to generation {good}")
                    } else {
                        "; no earlier good generation to go back to".to_string()
                    };
                    (
                        format!("aborted{next}"),
                        Some(format!(
                            "rollout to generation {generation} failed: {why}{next}"
                        )),
                    )
                }
            };
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
        for (gid, generation) in aborted {
            self.auto_revert(&gid, generation).await?;
        }
        self.wake.notify_one();
        Ok(RolloutActionResponse { groups: acted })
    }
}
