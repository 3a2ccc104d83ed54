//! The canary stage's bookkeeping the group controller decides (`CanaryBaking`,
//! `CanaryAnalyse`): each instance's analysis window opened when the bake begins, the windows
//! gathered when it ends and judged ([`crate::analysis::verdict`]), and what the verdict
//! does: go on, fail the rollout, or pause it for a person (`analysis.mode = "advise"`).
//! Every verdict is an event with its numbers.

use std::collections::BTreeMap;

use drover_model::fleet::AnalysisMode;
use drover_model::record::Lifecycle;
use drover_model::{EventKind, NewEvent};

use super::{Change, Record, Staged, Window, World};
use crate::analysis;

/// The balancers' (connections, connect failures) to each instance, by id.
pub type LbCounters = BTreeMap<String, (u64, u64)>;

/// What the end of a bake does ([`World::canary_analyse`]).
#[derive(Clone, Debug)]
pub enum CanaryOutcome {
    /// The server restarted during the bake (windows are soft state): it starts again; open
    /// the windows ([`World::open_windows`]) once the change is stored.
    BakeAgain(Change),
    /// The analysis failed with `analysis.mode = "auto"`: store the numbers, then fail the
    /// rollout with `reason` ([`World::rollout_failed`]).
    Fail { change: Change, reason: String },
    /// The analysis passed (the rollout goes on), or failed in advise mode (it is paused).
    Verdict(Change),
}

impl World {
    /// Every canary of `group` is ready: the bake begins (none: the group moved on).
    /// Once stored, open the windows ([`World::open_windows`]).
    pub fn canary_baking(&self, group: &str, generation: u64, now: u64) -> Option<Change> {
        let g = self.groups.get(group)?;
        if g.record.generation != generation || !g.record.rollout.open {
            return None;
        }
        let mut record = g.record.clone();
        record.rollout.canary_baking_ms = now;
        let (canaries, old) = self
            .instances
            .group_views(group)
            .filter(|v| v.phase == crate::Phase::Active)
            .fold((0, 0), |(c, o), v| {
                if v.generation == generation {
                    (c + 1, o)
                } else {
                    (c, o + 1)
                }
            });
        let bake = self
            .service(g)
            .and_then(|s| s.rollout.canary.as_ref())
            .map(|c| c.bake)
            .unwrap_or_default();
        Some(Change {
            commits: vec![
                Record::Group(record.clone()),
                Record::Event(
                    NewEvent::new(
                        EventKind::Rollout,
                        format!(
                            "canary: {canaries} instance(s) of generation {generation} serve beside {old} old one(s); baking for {bake}, then the analysis"
                        ),
                    )
                    .group(group),
                ),
            ],
            staged: Staged::record(record),
        })
    }

    /// The instances of `group`, whose balancer counters open their windows.
    pub fn window_ids(&self, group: &str) -> Vec<String> {
        self.instances
            .group_views(group)
            .map(|v| v.id.clone())
            .collect()
    }

    /// Start the window of every instance of `group` from now, from its restarts and the
    /// balancers' counters to it now.
    pub fn open_windows(&mut self, group: &str, lb: &LbCounters) {
        for id in self.window_ids(group) {
            if let Some(mut i) = self.instances.get_mut(&id) {
                i.soft.window = Some(Window {
                    restarts_at_start: Window::restarts(&i.soft.components),
                    lb_at_start: lb.get(&id).copied().unwrap_or_default(),
                    ..Window::default()
                });
            }
        }
    }

    /// The bake of `group`'s canaries is over: judge them against the old instances (with
    /// the balancers' counters now, `lb`), close every window, and say what follows (none:
    /// the group moved on).
    pub fn canary_analyse(
        &mut self,
        group: &str,
        generation: u64,
        now: u64,
        lb: &LbCounters,
    ) -> Option<CanaryOutcome> {
        let g = self.groups.get(group)?;
        if g.record.generation != generation || !g.record.rollout.open {
            return None;
        }
        let config = self
            .service(g)
            .map(|s| s.rollout.analysis.clone())
            .unwrap_or_default();
        let mut record = g.record.clone();
        let mut canary = Vec::new();
        let mut baseline = Vec::new();
        let mut missing = false;
        for id in self.window_ids(group) {
            let i = &self.instances[id.as_str()];
            if !i.alive || i.record.lifecycle != Lifecycle::Active {
                continue;
            }
            let is_canary = i.record.generation == generation;
            let Some(w) = &i.soft.window else {
                missing |= is_canary;
                continue;
            };
            let now_lb = lb.get(&id).copied().unwrap_or_default();
            let window = analysis::Window {
                restarts: Window::restarts(&i.soft.components).saturating_sub(w.restarts_at_start),
                unhealthy: w.unhealthy,
                connections: now_lb.0.saturating_sub(w.lb_at_start.0),
                connect_failures: now_lb.1.saturating_sub(w.lb_at_start.1),
                metrics: w
                    .metrics
                    .iter()
                    .filter(|(_, (_, n))| *n > 0)
                    .map(|(k, (sum, n))| (k.clone(), sum / *n as f64))
                    .collect(),
                instance: id.clone(),
            };
            if is_canary {
                canary.push(window);
            } else {
                baseline.push(window);
            }
        }
        if missing {
            record.rollout.canary_baking_ms = now;
            return Some(CanaryOutcome::BakeAgain(Change {
                commits: vec![
                    Record::Group(record.clone()),
                    Record::Event(
                        NewEvent::new(
                            EventKind::Rollout,
                            "canary: the bake starts again (the server restarted during it and has no window of the canaries)",
                        )
                        .group(group),
                    ),
                ],
                staged: Staged::record(record),
            }));
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
        for id in self.window_ids(group) {
            if let Some(mut i) = self.instances.get_mut(&id) {
                i.soft.window = None;
            }
        }
        if !verdict.pass && config.mode == AnalysisMode::Auto {
            return Some(CanaryOutcome::Fail {
                change: Change {
                    commits: vec![Record::Group(record.clone())],
                    staged: Staged::record(record),
                },
                reason: format!("canary analysis failed: {numbers}"),
            });
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
        Some(CanaryOutcome::Verdict(Change {
            commits: vec![
                Record::Group(record.clone()),
                Record::Event(NewEvent::new(EventKind::Rollout, message).group(group)),
            ],
            staged: Staged::record(record),
        }))
    }
}
