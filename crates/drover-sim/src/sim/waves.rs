//! Services across regions in the simulation, carried out as the server does: a deploy goes
//! wave by wave ([`drover_control::waves::release`]), each group's canary stage is judged by
//! [`drover_control::analysis::verdict`] on the noisy metrics its simulated agents report, and
//! a failed rollout reverts every region the deploy reached (the server's automatic revert sets
//! the service's versions back, so every group on the new version moves) while the regions it
//! had not reached never launch it.
//!
//! Invariants checked here (numbers continue those of [`Sim`]): 6. a wave's groups get the
//! change only once every group of the earlier waves finished its rollout (none open, none
//! failed) and `wave_bake` passed since the last of them; 7. once a deploy failed, none of
//! its held groups gets it.

use std::collections::BTreeMap;

use drover_control::analysis::{self, Window};
use drover_control::change::{Origin, Reach};
use drover_control::waves::{release, WaveGroup};
use drover_control::{CanaryGate, Phase};
use drover_model::fleet::{Analysis, Canary};

use super::Sim;

/// A custom metric the simulated agents report (e.g. `error_rate`): each instance's mean
/// (`good`, or `bad` on a degraded version), plus a constant bias per instance and a noise
/// per heartbeat, both normal with these standard deviations; never below 0.
#[derive(Clone, Debug, PartialEq)]
pub struct NoisyMetric {
    pub name: String,
    pub good: f64,
    pub bad: f64,
    pub instance_sd: f64,
    pub sample_sd: f64,
}

/// A service: its groups (one per region, added with [`Sim::add_group`] first), its waves
/// (group names; groups in no wave go last, as `"*"`), and its canary and analysis.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub groups: Vec<String>,
    pub waves: Vec<Vec<String>>,
    pub wave_bake_ms: u64,
    pub canary: Option<Canary>,
    pub analysis: Analysis,
    pub metric: Option<NoisyMetric>,
}

/// One canary analysis: where, on what, and what it said.
#[derive(Clone, Debug, PartialEq)]
pub struct VerdictRecord {
    pub group: String,
    pub generation: u64,
    pub at_ms: u64,
    /// The truth: the canaries ran a degraded version.
    pub bad: bool,
    pub pass: bool,
    pub numbers: String,
}

/// A service as the simulated server keeps it.
#[derive(Clone, Debug)]
pub(super) struct SimService {
    spec: ServiceSpec,
    /// Group index -> its wave.
    groups: Vec<(usize, usize)>,
    /// The deploy under way reached these groups: (group, its generation before it).
    touched: Vec<(usize, u64)>,
    /// The deploy under way is degraded in these groups ...
    bad_in: Vec<usize>,
    /// ... and failed (every later wave stops).
    failed: bool,
}

/// Per group, what the waves and the canary need (whether its plan waits for its wave is
/// in its rollout record, `wave_pending`, as the server stores it).
#[derive(Clone, Debug, Default)]
pub(super) struct WaveState {
    pub(super) service: Option<usize>,
}

impl Sim {
    /// Declare a service over groups already added. Its groups' canary stage follows
    /// `spec.canary` on every rollout, as the server's does.
    pub fn add_service(&mut self, spec: ServiceSpec) {
        let wave_of = |g: &str| {
            spec.waves
                .iter()
                .position(|w| w.iter().any(|x| x == g))
                .unwrap_or(spec.waves.len())
        };
        let s = self.services.len();
        let groups = spec
            .groups
            .iter()
            .map(|name| {
                let g = self.group_idx(name);
                self.groups[g].wave.service = Some(s);
                (g, wave_of(name))
            })
            .collect();
        self.services.push(SimService {
            spec,
            groups,
            touched: Vec::new(),
            bad_in: Vec::new(),
            failed: false,
        });
    }

    /// `drover deploy` of a new version of `service`: degraded (its metric at `bad`) in the
    /// groups named in `bad_in`, good elsewhere. As the server's group rule says
    /// ([`drover_control::change::group`]): the first wave gets it now, the others are held
    /// until [`release`] lets them go.
    pub fn deploy_service(&mut self, service: &str, bad_in: &[&str]) {
        let s = self.service_idx(service);
        let bad: Vec<usize> = bad_in.iter().map(|g| self.group_idx(g)).collect();
        let sv = &mut self.services[s];
        sv.touched.clear();
        sv.failed = false;
        sv.bad_in = bad;
        let origin = Origin::Deploy {
            why: format!("deploy {service}"),
            only: Vec::new(),
        };
        for (g, _) in self.services[s].groups.clone() {
            self.release_group(s, g, &origin);
        }
    }

    /// Every canary analysis so far.
    pub fn verdicts(&self) -> &[VerdictRecord] {
        &self.verdicts
    }

    /// The group waits for its wave (the service's deploy has not reached it yet).
    pub fn held(&self, group: &str) -> bool {
        self.groups[self.group_idx(group)].rollout.wave_pending
    }

    fn service_idx(&self, name: &str) -> usize {
        self.services
            .iter()
            .position(|s| s.spec.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    /// The wave of group `g` of service `s`, counted from the service's first (as the
    /// fleet's `Rollout::wave_of`: 0 for the first), and whether the service has waves.
    fn wave_of(&self, s: usize, g: usize) -> (usize, bool) {
        let sv = &self.services[s];
        let first = sv.groups.iter().map(|(_, w)| *w).min().unwrap_or(0);
        let wave = sv
            .groups
            .iter()
            .find(|(h, _)| *h == g)
            .map_or(0, |(_, w)| *w);
        (wave - first, !sv.spec.waves.is_empty())
    }

    /// The service's change (`origin`: a deploy, or a wave) comes to group `g`. When the
    /// group rule gives it a new generation, its rollout is open (and its canary stage, if
    /// the service has one); otherwise it is held for its wave.
    fn release_group(&mut self, s: usize, g: usize, origin: &Origin) {
        let before = self.specs[g].generation;
        let (wave, waves) = self.wave_of(s, g);
        let step = self.change_group(g, origin, wave, waves, true);
        if step.reach != Reach::NewGeneration {
            return;
        }
        if self.services[s].bad_in.contains(&g) {
            self.groups[g].degraded.insert(step.generation);
        }
        self.services[s].touched.push((g, before));
        self.open_canary(g);
    }

    /// A new rollout of `g`: its canary stage ahead, as the server sets it.
    pub(super) fn open_canary(&mut self, g: usize) {
        let Some(s) = self.groups[g].wave.service else {
            return;
        };
        self.specs[g].canary = self.services[s].spec.canary.as_ref().map(|c| CanaryGate {
            size: c.size(self.specs[g].desired),
            bake_ms: c.bake.as_millis(),
            baking_since_ms: 0,
        });
    }

    /// The server's `release_waves`, at every step: each service's next wave, once the
    /// earlier ones are done and baked.
    pub(super) fn release_waves(&mut self) {
        let now = self.now;
        for s in 0..self.services.len() {
            let sv = &self.services[s];
            if !sv
                .groups
                .iter()
                .any(|(g, _)| self.groups[*g].rollout.wave_pending)
            {
                continue;
            }
            let view: Vec<WaveGroup> = sv
                .groups
                .iter()
                .map(|&(g, wave)| WaveGroup {
                    group: self.specs[g].group.clone(),
                    wave,
                    pending: self.groups[g].rollout.wave_pending,
                    open: self.specs[g].rollout_open,
                    failed: self.groups[g].rollout.failed_generation >= self.specs[g].generation,
                    done_ms: self.groups[g].rollout.done_ms,
                })
                .collect();
            let Some((wave, names)) = release(&view, sv.spec.wave_bake_ms, now) else {
                continue;
            };
            if self.cfg.check_invariants {
                self.check_wave_release(s, wave, &view);
            }
            let origin = Origin::Wave {
                wave,
                groups: names.clone(),
            };
            for name in names {
                let g = self.group_idx(&name);
                self.release_group(s, g, &origin);
            }
        }
    }

    /// Invariants 6 and 7, on a release the rule decided.
    fn check_wave_release(&self, s: usize, wave: usize, view: &[WaveGroup]) {
        let sv = &self.services[s];
        if sv.failed {
            self.violation(
                7,
                &sv.spec.name,
                format!("wave {} released after the deploy failed", wave + 1),
            );
        }
        let bake = sv.spec.wave_bake_ms;
        for w in view.iter().filter(|w| w.wave < wave) {
            if w.open || w.failed || w.pending || self.now < w.done_ms + bake {
                self.violation(
                    6,
                    &w.group,
                    format!(
                        "wave {} released while {} of wave {} is open={} failed={} pending={} \
                         done at {} ms (wave_bake {bake} ms, now {} ms)",
                        wave + 1,
                        w.group,
                        w.wave + 1,
                        w.open,
                        w.failed,
                        w.pending,
                        w.done_ms,
                        self.now
                    ),
                );
            }
        }
    }

    /// A heartbeat of instance `i` at `h`: its metric sample, into its window if one is open.
    pub(super) fn sample_metric(&mut self, i: usize) {
        let g = self.agents[i].group;
        let Some(s) = self.groups[g].wave.service else {
            return;
        };
        let Some(m) = &self.services[s].spec.metric else {
            return;
        };
        if self.agents[i].window.is_none() {
            return;
        }
        let degraded = self.groups[g].degraded.contains(&self.views[i].generation);
        let mean = if degraded { m.bad } else { m.good };
        let sd = m.sample_sd;
        let value = (mean + self.agents[i].bias + sd * self.rng.normal()).max(0.0);
        if let Some((sum, n)) = &mut self.agents[i].window {
            *sum += value;
            *n += 1;
        }
    }

    /// A new instance's constant bias on the metric.
    pub(super) fn metric_bias(&mut self, g: usize) -> f64 {
        let sd = self.groups[g]
            .wave
            .service
            .and_then(|s| self.services[s].spec.metric.as_ref())
            .map(|m| m.instance_sd)
            .unwrap_or(0.0);
        if sd > 0.0 {
            sd * self.rng.normal()
        } else {
            0.0
        }
    }

    /// `CanaryBaking`: the bake begins; every instance of the group opens its window.
    pub(super) fn canary_baking(&mut self, g: usize) {
        let now = self.now;
        self.groups[g].rollout.canary_baking_ms = now;
        self.sync_rollout(g);
        for (a, v) in self.agents.iter_mut().zip(&self.views) {
            if a.group == g && v.phase == Phase::Active {
                a.window = Some((0.0, 0));
            }
        }
    }

    /// `CanaryAnalyse`: judge the canaries against the old instances. Returns the rollout
    /// failed (the caller carries out the failure).
    pub(super) fn canary_analyse(&mut self, g: usize, generation: u64) -> bool {
        let Some(s) = self.groups[g].wave.service else {
            self.groups[g].rollout.canary_passed = true;
            self.sync_rollout(g);
            return false;
        };
        let mut canary = Vec::new();
        let mut baseline = Vec::new();
        let mut missing = false;
        let metric = self.services[s]
            .spec
            .metric
            .as_ref()
            .map(|m| m.name.clone());
        for (a, v) in self.agents.iter().zip(&self.views) {
            if a.group != g || !v.alive || v.phase != Phase::Active {
                continue;
            }
            let is_canary = v.generation == generation;
            let Some((sum, n)) = a.window else {
                missing |= is_canary;
                continue;
            };
            let mut w = Window {
                instance: v.id.clone(),
                ..Window::default()
            };
            if let (Some(name), true) = (&metric, n > 0) {
                w.metrics.insert(name.clone(), sum / f64::from(n));
            }
            if is_canary {
                canary.push(w);
            } else {
                baseline.push(w);
            }
        }
        if missing {
            // The server restarted during the bake (windows are soft): bake again.
            self.canary_baking(g);
            return false;
        }
        let verdict = analysis::verdict(&canary, &baseline, &self.services[s].spec.analysis);
        for a in self.agents.iter_mut().filter(|a| a.group == g) {
            a.window = None;
        }
        self.verdicts.push(VerdictRecord {
            group: self.specs[g].group.clone(),
            generation,
            at_ms: self.now,
            bad: self.groups[g].degraded.contains(&generation),
            pass: verdict.pass,
            numbers: verdict.describe(),
        });
        if verdict.pass {
            self.groups[g].rollout.canary_passed = true;
            self.sync_rollout(g);
        }
        !verdict.pass
    }

    /// A rollout of `g` failed: it stops every later wave of its service, and the automatic
    /// revert moves every group the deploy reached back to what it ran before.
    pub(super) fn waves_after_failure(&mut self, g: usize) {
        let Some(s) = self.groups[g].wave.service else {
            return;
        };
        if !self.services[s].touched.iter().any(|(t, _)| *t == g) {
            return;
        }
        self.services[s].failed = true;
        // The revert sets the service's versions back: the groups still held run them
        // already, and the rule lets go of them.
        let mut failed = BTreeMap::new();
        failed.insert(self.specs[g].group.clone(), 0);
        let revert = Origin::AutoRevert { failed };
        let groups: Vec<usize> = self.services[s].groups.iter().map(|(g, _)| *g).collect();
        for h in groups {
            if self.groups[h].rollout.wave_pending {
                let (wave, waves) = self.wave_of(s, h);
                let step = self.change_group(h, &revert, wave, waves, false);
                debug_assert_eq!(step.reach, Reach::Same);
            }
        }
        let touched: BTreeMap<usize, u64> = self.services[s]
            .touched
            .drain(..)
            .filter(|(t, _)| *t != g)
            .collect();
        for (h, before) in touched {
            // Back to its content before the deploy.
            let new = self.begin_rollout(h, true, 0);
            self.stats.reverts += 1;
            if let Some(m) = self.groups[h].broken.get(&before).copied() {
                self.groups[h].broken.insert(new, m);
            }
            if self.groups[h].degraded.contains(&before) {
                self.groups[h].degraded.insert(new);
            }
        }
    }
}
