//! Services across regions in the simulation, carried out as the server does: the service's
//! waves, canary and analysis are its fleet settings; a deploy and each wave are changes
//! planned by [`drover_control::change::plan`] (the first wave gets it, the others are held
//! until [`World::wave_releases`] lets the next go); each group's canary stage is the world's
//! ([`World::canary_baking`], [`World::canary_analyse`]), judged on the windows the world
//! fills from the noisy metric its simulated agents report; and a failed rollout's automatic
//! revert sets the service's versions back, so every group the deploy reached moves back while
//! the ones it had not reached never launch it.
//!
//! Invariants checked here (numbers continue those of [`Sim`]): 6. a wave's groups get the
//! change only once every group of the earlier waves finished its rollout (none open, none
//! failed) and `wave_bake` passed since the last of them; 7. once a deploy failed, none of
//! its held groups gets it.

use drover_control::change::Origin;
use drover_control::waves::WaveGroup;
#[cfg(doc)]
use drover_control::world::World;
use drover_control::world::{CanaryOutcome, Change, LbCounters};
use drover_model::fleet::{Analysis, Canary};
use drover_model::GroupId;

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

/// A service: its groups (every region of the fleet's service `name`, added with
/// [`Sim::add_group`] first), its waves (group names; groups in no wave go last, as `"*"`),
/// and its canary and analysis: the service's `rollout` settings in the fleet. `metric` is
/// what its simulated agents report.
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
    /// What the server stored of it (the rollout record's `analysis`).
    pub numbers: String,
}

/// A service of [`Sim::add_service`], and what the invariants need of its deploy.
#[derive(Clone, Debug)]
pub(super) struct SimService {
    pub(super) spec: ServiceSpec,
    /// The deploy under way failed somewhere (nothing held may get it).
    failed: bool,
}

impl Sim {
    /// Declare a service over groups already added: its waves, `wave_bake`, canary and
    /// analysis become the fleet service's rollout settings.
    pub fn add_service(&mut self, spec: ServiceSpec) {
        let mut regions = Vec::new();
        for name in &spec.groups {
            self.group_idx(name);
            assert_eq!(
                GroupId::service_of(name),
                spec.name,
                "{name} is not a group of service {}",
                spec.name
            );
            regions.push(GroupId::region_of(name).to_string());
        }
        let mut in_fleet = self.fleet().services[&spec.name].regions.clone();
        in_fleet.sort();
        let mut listed = regions.clone();
        listed.sort();
        assert_eq!(
            in_fleet, listed,
            "service {} lists some of its groups only",
            spec.name
        );
        let mut waves: Vec<Vec<String>> = spec
            .waves
            .iter()
            .map(|w| {
                w.iter()
                    .map(|g| GroupId::region_of(g).to_string())
                    .collect()
            })
            .collect();
        let in_a_wave = |r: &String| waves.iter().any(|w| w.contains(r));
        if !waves.is_empty() && !regions.iter().all(in_a_wave) {
            waves.push(vec!["*".into()]);
        }
        let name = spec.name.clone();
        let (bake, canary, analysis) = (
            drover_model::Dur::from_millis(spec.wave_bake_ms),
            spec.canary.clone(),
            spec.analysis.clone(),
        );
        self.edit_fleet(|f| {
            let r = &mut f.services.get_mut(&name).expect("the service").rollout;
            r.waves = waves;
            r.wave_bake = bake;
            r.canary = canary;
            r.analysis = analysis;
        });
        let s = self.services.len();
        for g in &spec.groups {
            let g = self.group_idx(g);
            self.groups[g].service = Some(s);
        }
        self.services.push(SimService {
            spec,
            failed: false,
        });
    }

    /// `drover deploy` of a new version of `service` (every region): degraded (its metric at
    /// `bad`) in the groups named in `bad_in`, good elsewhere. As the server plans it, the
    /// first wave gets it now, the others are held until their wave is released.
    pub fn deploy_service(&mut self, service: &str, bad_in: &[&str]) {
        let s = self.service_idx(service);
        let version = self.next_version();
        for g in bad_in {
            let g = self.group_idx(g);
            self.groups[g].degraded.insert(version.clone());
        }
        self.services[s].failed = false;
        let fleet = self.fleet_with_version(service, &version);
        self.apply(
            Origin::Deploy {
                why: format!("deploy {service} app {version}"),
                only: Vec::new(),
            },
            fleet,
        );
    }

    /// Every canary analysis so far.
    pub fn verdicts(&self) -> &[VerdictRecord] {
        &self.verdicts
    }

    /// The group waits for its wave (the service's deploy has not reached it yet).
    pub fn held(&self, group: &str) -> bool {
        self.group(group).record.rollout.wave_pending
    }

    fn service_idx(&self, name: &str) -> usize {
        self.services
            .iter()
            .position(|s| s.spec.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    /// The server's wave releases at the end of its tick ([`World::wave_releases`]), each a
    /// change planned as the server's apply plans it.
    pub(super) fn release_waves(&mut self) {
        let releases = self.world.wave_releases(self.now);
        for (wave, groups) in releases {
            if self.cfg.check_invariants {
                self.check_wave_release(wave, &groups);
            }
            let fleet = self.fleet().clone();
            self.apply(Origin::Wave { wave, groups }, fleet);
        }
    }

    /// Invariants 6 and 7, on a release the rule decided.
    fn check_wave_release(&self, wave: usize, groups: &[String]) {
        let Some(first) = groups.first() else {
            return;
        };
        let service = GroupId::service_of(first);
        if let Some(sv) = self.services.iter().find(|s| s.spec.name == service) {
            if sv.failed {
                self.violation(
                    7,
                    service,
                    format!("wave {} released after the deploy failed", wave + 1),
                );
            }
        }
        let svc = &self.fleet().services[service];
        let bake = svc.rollout.wave_bake.as_millis();
        for r in &svc.regions {
            let gid = GroupId::new(service, r).0;
            let rec = &self.group(&gid).record;
            let w = WaveGroup {
                wave: svc.rollout.wave_of(r),
                pending: rec.rollout.wave_pending,
                open: rec.rollout.open,
                failed: rec.rollout.failed_generation >= rec.generation,
                done_ms: rec.rollout.done_ms,
                group: gid,
            };
            if w.wave >= wave {
                continue;
            }
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

    /// A rollout of `group` failed: its service's deploy under way failed.
    pub(super) fn wave_failed(&mut self, group: &str) {
        let g = self.group_idx(group);
        if let Some(s) = self.groups[g].service {
            self.services[s].failed = true;
        }
    }

    /// A new instance's constant bias on the metric.
    pub(super) fn metric_bias(&mut self, g: usize) -> f64 {
        let sd = self.groups[g]
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

    /// `CanaryBaking`, as the server carries it out ([`World::canary_baking`]): the bake
    /// begins; once stored, every instance of the group opens its window
    /// ([`World::open_windows`]; the balancers' counters are not simulated: zero).
    pub(super) fn canary_baking(&mut self, group: &str, generation: u64) {
        let Some(change) = self.world.canary_baking(group, generation, self.now) else {
            return;
        };
        self.commit(change);
        self.world.open_windows(group, &LbCounters::new());
    }

    /// `CanaryAnalyse`, as the server carries it out ([`World::canary_analyse`]): bake
    /// again, fail the rollout, or go on (or pause, in advise mode); every verdict is
    /// recorded with the truth about the canaries.
    pub(super) fn canary_analyse(&mut self, group: &str, generation: u64) {
        let outcome = self
            .world
            .canary_analyse(group, generation, self.now, &LbCounters::new());
        match outcome {
            None => {}
            Some(CanaryOutcome::BakeAgain(change)) => {
                self.commit(change);
                self.world.open_windows(group, &LbCounters::new());
            }
            Some(CanaryOutcome::Fail { change, reason }) => {
                self.record_verdict(group, generation, &change);
                // Store the numbers, then fail the rollout (auto_revert goes back).
                self.commit(change);
                self.rollout_failed(group, generation, &reason, None);
            }
            Some(CanaryOutcome::Verdict(change)) => {
                self.record_verdict(group, generation, &change);
                self.commit(change);
            }
        }
    }

    /// What the server stores of a canary analysis (its group's record), with the truth
    /// about the canaries.
    fn record_verdict(&mut self, group: &str, generation: u64, change: &Change) {
        let Some(numbers) = change
            .staged
            .records
            .iter()
            .find_map(|r| r.rollout.analysis.clone())
        else {
            return;
        };
        let g = self.group_idx(group);
        let bad = self
            .store
            .plan_of(group, generation)
            .and_then(|p| p.components.first())
            .is_some_and(|c| self.groups[g].degraded.contains(&c.version));
        self.verdicts.push(VerdictRecord {
            group: group.to_string(),
            generation,
            at_ms: self.now,
            bad,
            pass: numbers.starts_with("passed"),
            numbers,
        });
    }
}
