//! Carrying out the canary stage the group controller decides (`CanaryBaking`,
//! `CanaryAnalyse`): open each instance's analysis window when the bake begins, gather the
//! windows when it ends, and act on `drover_control::analysis::verdict`: go on, fail the
//! rollout, or pause it for a person (`analysis.mode = "advise"`). Every verdict is an event
//! with its numbers.

use std::collections::BTreeMap;

use drover_control::analysis;
use drover_model::fleet::AnalysisMode;
use drover_model::{EventKind, NewEvent};
use drover_store::{Lifecycle, Write};

use crate::engine::Engine;
use crate::state::Window;
use crate::ServerError;

impl Engine {
    /// Every canary is ready: the bake begins; each instance of the group opens its window.
    pub(crate) async fn canary_baking(
        &self,
        group: &str,
        generation: u64,
        now: u64,
    ) -> Result<(), ServerError> {
        let (record, canaries, old, bake) = {
            let st = self.state();
            let Some(g) = st.groups.get(group) else {
                return Ok(());
            };
            if g.record.generation != generation || !g.record.rollout.open {
                return Ok(());
            }
            let mut record = g.record.clone();
            record.rollout.canary_baking_ms = now;
            let (canaries, old) = st
                .instances
                .values()
                .filter(|i| i.record.group == group && i.record.lifecycle == Lifecycle::Active)
                .fold((0, 0), |(c, o), i| {
                    if i.record.generation == generation {
                        (c + 1, o)
                    } else {
                        (c, o + 1)
                    }
                });
            let bake = st
                .service(g)
                .and_then(|s| s.rollout.canary.as_ref())
                .map(|c| c.bake)
                .unwrap_or_default();
            (record, canaries, old, bake)
        };
        self.commit(vec![
            Write::Group(record.clone()),
            Write::Event(
                NewEvent::new(
                    EventKind::Rollout,
                    format!(
                        "canary: {canaries} instance(s) of generation {generation} serve beside {old} old one(s); baking for {bake}, then the analysis"
                    ),
                )
                .group(group),
            ),
        ])
        .await?;
        self.open_windows(group);
        if let Some(g) = self.state().groups.get_mut(group) {
            g.record = record;
        }
        Ok(())
    }

    /// Start every instance's window of `group` from now.
    fn open_windows(&self, group: &str) {
        let ids: Vec<String> = self
            .state()
            .instances
            .values()
            .filter(|i| i.record.group == group)
            .map(|i| i.record.id.clone())
            .collect();
        let counters: BTreeMap<String, (u64, u64)> = ids
            .iter()
            .map(|id| (id.clone(), self.balancers.target_counters(group, id)))
            .collect();
        let mut st = self.state();
        for (id, lb) in counters {
            if let Some(mut i) = st.instances.get_mut(&id) {
                i.soft.window = Some(Window {
                    restarts_at_start: Window::restarts(&i.soft.components),
                    lb_at_start: lb,
                    ..Window::default()
                });
            }
        }
    }

    /// The bake is over: judge the canaries against the old instances, and act on it.
    pub(crate) async fn canary_analyse(
        &self,
        group: &str,
        generation: u64,
        now: u64,
    ) -> Result<(), ServerError> {
        let (mut record, config, windows, missing) = {
            let st = self.state();
            let Some(g) = st.groups.get(group) else {
                return Ok(());
            };
            if g.record.generation != generation || !g.record.rollout.open {
                return Ok(());
            }
            let config = st
                .service(g)
                .map(|s| s.rollout.analysis.clone())
                .unwrap_or_default();
            let mut windows = Vec::new();
            let mut missing = false;
            for i in st.instances.values() {
                if i.record.group != group || !i.alive || i.record.lifecycle != Lifecycle::Active {
                    continue;
                }
                let canary = i.record.generation == generation;
                match &i.soft.window {
                    Some(w) => windows.push((
                        canary,
                        i.record.id.clone(),
                        w.clone(),
                        i.soft.components.clone(),
                    )),
                    None if canary => missing = true,
                    None => {}
                }
            }
            (g.record.clone(), config, windows, missing)
        };
        if missing {
            // The server restarted during the bake (windows are soft state): bake again.
            record.rollout.canary_baking_ms = now;
            self.commit(vec![
                Write::Group(record.clone()),
                Write::Event(
                    NewEvent::new(
                        EventKind::Rollout,
                        "canary: the bake starts again (the server restarted during it and has no window of the canaries)",
                    )
                    .group(group),
                ),
            ])
            .await?;
            self.open_windows(group);
            if let Some(g) = self.state().groups.get_mut(group) {
                g.record = record;
            }
            return Ok(());
        }
        let mut canary = Vec::new();
        let mut baseline = Vec::new();
        for (is_canary, id, w, components) in windows {
            let lb = self.balancers.target_counters(group, &id);
            let window = analysis::Window {
                restarts: Window::restarts(&components).saturating_sub(w.restarts_at_start),
                unhealthy: w.unhealthy,
                connections: lb.0.saturating_sub(w.lb_at_start.0),
                connect_failures: lb.1.saturating_sub(w.lb_at_start.1),
                metrics: w
                    .metrics
                    .iter()
                    .filter(|(_, (_, n))| *n > 0)
                    .map(|(k, (sum, n))| (k.clone(), sum / *n as f64))
                    .collect(),
                instance: id,
            };
            if is_canary {
                canary.push(window);
            } else {
                baseline.push(window);
            }
        }
        let verdict = analysis::verdict(&canary, &baseline, &config);
        let numbers = format!(
            "{} canary against {} baseline instance(s): {}",
            canary.len(),
            baseline.len(),
            verdict.describe()
        );
        record.rollout.analysis = Some(format!(
            "{}: {numbers}",
            if verdict.pass { "passed" } else { "failed" }
        ));
        {
            let mut st = self.state();
            st.instances.for_each_mut(|i| {
                if i.record.group == group {
                    i.soft.window = None;
                }
            });
        }
        if !verdict.pass && config.mode == AnalysisMode::Auto {
            // Store the numbers, then fail the rollout (auto_revert goes back).
            self.commit(vec![Write::Group(record.clone())]).await?;
            if let Some(g) = self.state().groups.get_mut(group) {
                g.record = record;
            }
            return self
                .rollout_failed(
                    group,
                    generation,
                    &format!("canary analysis failed: {numbers}"),
                    None,
                )
                .await;
        }
        record.rollout.canary_passed = true;
        let message = if verdict.pass {
            format!("canary analysis passed: {numbers}; the rollout goes on")
        } else {
            record.rollout.paused = true;
            let service = drover_model::GroupId::service_of(group);
            format!(
                "canary analysis failed (analysis.mode = advise): the rollout is paused; `drover rollout promote {service}` goes on, `drover rollout abort {service}` goes back: {numbers}"
            )
        };
        self.commit(vec![
            Write::Group(record.clone()),
            Write::Event(NewEvent::new(EventKind::Rollout, message).group(group)),
        ])
        .await?;
        if let Some(g) = self.state().groups.get_mut(group) {
            g.record = record;
        }
        Ok(())
    }
}
