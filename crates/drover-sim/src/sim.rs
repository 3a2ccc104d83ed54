//! The simulator: groups, simulated instances and agents on a virtual clock, the server's way
//! of carrying out the controller's actions, injected faults, and the invariants checked at
//! every step.
//!
//! Each step (`SimConfig::step_ms`, 250 ms like the server's tick) does, in order:
//! 1. apply the faults scheduled at or before now;
//! 2. advance the agents: heartbeats (every `heartbeat_ms`, each agent on its own phase) are
//!    absorbed the way the server absorbs them, agents whose time is up exit;
//! 3. for every group with schedules ([`Sim::set_schedules`], [`Sim::schedule_once`]), do
//!    what the server's schedule pass does: [`drover_control::schedule::step`], recording
//!    its notes ([`Sim::schedule_notes`]) and applying its count; the bounds it returns are
//!    the autoscaler's (its memory is stored by the server, so it survives a restart);
//! 4. for every group with an autoscale policy ([`Sim::set_autoscale`]), do what the server's
//!    `autoscale` pass does: take the metric of each Active instance healthy for at least
//!    `warmup` (the value its agent last reported, from the group's [`LoadModel`]), call
//!    [`AutoscaleState::decide`], apply the new desired count, and record the step
//!    ([`Sim::autoscale_trace`]) and any change ([`Sim::scale_events`], [`Sim::desired_series`]);
//! 5. call [`drover_control::reconcile`] and carry out its actions like the server does
//!    (launch backoff, rollout bookkeeping, auto-revert);
//! 6. check the invariants, and panic with the step, the time and the counts if one breaks.
//!
//! Invariants checked (numbers as in the panic message): 1. no Terminate of a healthy,
//! heartbeating instance; 2. permits never take a group below `desired - max_unavailable`
//! (server's view and truth); 3. launches never take Active above `desired + max_surge`;
//! 4. the autoscaler keeps desired within min..max; 5. the autoscaler never scales in while a
//! rollout is open.
//!
//! A group whose spec has `provider_replaces_leavers` runs on a simulated Auto Scaling group
//! (the `aws` provider without surge): the provider keeps a desired capacity; a launch claims
//! an instance the provider started on its own (of the launch's generation) or raises the
//! capacity by one; a leaver whose permit keeps the capacity
//! ([`drover_control::group::provider_replaces`], as the server answers the permit) makes the
//! provider start its replacement as it goes, every other leaver or terminated instance
//! lowers the capacity, an instance that dies is replaced by the provider, and what no launch
//! claims within [`ORPHAN_GRACE_MS`] is terminated with the capacity lowered.
//! [`Stats::max_capacity_over_desired`] records the most the capacity went above `desired`.

use std::collections::{BTreeMap, HashMap};

use drover_control::change::{self, GroupChange, GroupStep, Origin, Reach};
use drover_control::effects::Effect;
use drover_control::group::in_rotation;
use drover_control::rollout::{self, AfterFailure};
use drover_control::schedule::{self, ScheduleMemory, Schedules};
use drover_control::{
    reconcile, Action, AutoscaleInput, AutoscaleState, Decision, GroupSpec, Health, InstanceView,
    LaunchBackoff, Phase, Timing,
};
use drover_model::api::ScheduledScale;
use drover_model::fleet::{Autoscale, Rollout, Schedule};
use drover_model::record::RolloutRecord;

mod waves;
pub use waves::{NoisyMetric, ServiceSpec, VerdictRecord};

use crate::load::{AutoscalePoint, LoadModel, ScaleEvent, ScaledBy};
use crate::rng::SplitMix64;

/// Timings of the simulated world (not of the controller, which reads its own from the specs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Virtual time between two controller ticks.
    pub step_ms: u64,
    /// Agents heartbeat this often.
    pub heartbeat_ms: u64,
    /// The controller's `Timing::silent_after_ms`.
    pub silent_after_ms: u64,
    /// A good instance reports healthy this long after launch ...
    pub boot_ms: u64,
    /// ... plus a uniform jitter in `0..=boot_jitter_ms`.
    pub boot_jitter_ms: u64,
    /// An instance that crashes at start ([`FailMode::Crash`]) exits this long after launch.
    pub crash_ms: u64,
    /// A permitted instance drains this long, then terminates itself.
    pub drain_ms: u64,
    /// A terminated instance is gone this long after the provider was asked.
    pub stop_ms: u64,
    /// Check the invariants at every step (on by default).
    pub check_invariants: bool,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            step_ms: 250,
            heartbeat_ms: 1_000,
            silent_after_ms: 5_000,
            boot_ms: 8_000,
            boot_jitter_ms: 2_000,
            crash_ms: 3_000,
            drain_ms: 3_000,
            stop_ms: 1_000,
            check_invariants: true,
        }
    }
}

/// How an instance that does not boot behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// Keeps running and heartbeating, never healthy (the controller must terminate it).
    Hang,
    /// Its agent exits `crash_ms` after launch.
    Crash,
}

/// Something that goes wrong (or is done to the fleet) at a given virtual time.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// From now on, this fraction of launches (in `group`, or in every group) fail to boot.
    BootFailures {
        group: Option<String>,
        fraction: f64,
        mode: FailMode,
    },
    /// `count` running instances of `group` (picked by the PRNG) stop heartbeating but keep
    /// running (and serving).
    Silence { group: String, count: usize },
    /// `count` running instances of `group` (picked by the PRNG) die: their agents exit.
    Kill { group: String, count: usize },
    /// One instance dies.
    KillInstance { instance: String },
    /// `count` running instances of `group` (picked by the PRNG) get an agent that ignores
    /// its permit (hung, or too old to know permits): it keeps running and heartbeating
    /// until the provider terminates it.
    IgnorePermits { group: String, count: usize },
    /// The server restarts: soft state is dropped and rebuilt the way the server does it.
    ServerRestart,
    /// A deploy; with `broken`, no instance of the new generation ever turns healthy.
    Deploy {
        group: String,
        broken: Option<FailMode>,
    },
    /// The desired count is written, without telling the autoscaler (a raw write; for a
    /// person's `drover scale`, use [`Fault::Scale`]).
    SetDesired { group: String, desired: u32 },
    /// A person runs `drover scale GROUP N` (or applies a fleet file with a new count): the
    /// count is set and the autoscaler goes on from it ([`AutoscaleState::manual`]).
    Scale { group: String, desired: u32 },
}

/// A rollout that ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutEvent {
    pub group: String,
    pub generation: u64,
    pub at_ms: u64,
    /// From `generation_since_ms` to the event.
    pub took_ms: u64,
}

/// Counters over the whole run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub now_ms: u64,
    pub steps: u64,
    pub launches: u64,
    pub permits: u64,
    /// Terminations of instances that never booted (failed boot, broken version).
    pub terminated_never_healthy: u64,
    /// Terminations of instances whose agent went silent.
    pub terminated_silent: u64,
    /// Terminations of leavers still there past their permit's deadline (their agent
    /// ignored the permit, [`Fault::IgnorePermits`]).
    pub terminated_overstayed: u64,
    /// Instances forgotten while Active: their agent exited (crash, kill).
    pub died: u64,
    /// Instances gone after a permit (drained and terminated themselves).
    pub left_by_permit: u64,
    /// Instances gone after a Terminate.
    pub left_by_terminate: u64,
    pub rollouts_done: Vec<RolloutEvent>,
    pub rollouts_failed: Vec<RolloutEvent>,
    /// New generations made by auto-revert.
    pub reverts: u64,
    /// Server restarts injected.
    pub restarts: u64,
    /// The most Active instances any group had above its desired count.
    pub max_active_over_desired: i64,
    /// The most Draining instances at once (all groups).
    pub max_draining: usize,
    /// FNV-1a over every decision (actions and targets) of every step.
    pub decision_hash: u64,
    /// Groups on a simulated Auto Scaling group (`provider_replaces_leavers`): the most its
    /// desired capacity went above the group's desired count ...
    pub max_capacity_over_desired: i64,
    /// ... leavers that kept the capacity (the provider launched their replacements) ...
    pub kept_capacity: u64,
    /// ... launches that claimed an instance the provider had started on its own ...
    pub claimed_from_provider: u64,
    /// ... and instances the provider started that no launch claimed in time (terminated).
    pub orphans: u64,
}

/// An instance the provider started that no launch claimed within this is terminated (the
/// `aws` provider's default orphan grace: 24 polls of 5 s).
pub const ORPHAN_GRACE_MS: u64 = 120_000;

/// A simulated Auto Scaling group: its desired capacity and the instances it started on its
/// own that no launch claimed yet (when, and from which generation's launch template).
#[derive(Clone, Debug, Default)]
struct Asg {
    capacity: i64,
    unclaimed: Vec<(u64, u64)>,
}

/// A snapshot of one group, as the server sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupStatus {
    pub desired: u32,
    pub generation: u64,
    pub rollout_open: bool,
    pub active: usize,
    pub draining: usize,
    pub terminating: usize,
    pub in_rotation: usize,
    /// Active instances on the current generation.
    pub current: usize,
    /// Active instances on an older generation.
    pub stale: usize,
    /// Active instances that really serve (booted, alive), whatever the server knows.
    pub serving: usize,
    /// `desired - max_unavailable`.
    pub floor: usize,
}

/// The components' stop grace the simulated groups have (the fleet file's default).
pub const LEAVER_STOP_GRACE_MS: u64 = 10_000;

/// Build a spec for a group at generation 1 with no rollout open.
pub fn group_spec(group: &str, desired: u32, rollout: Rollout) -> GroupSpec {
    GroupSpec {
        group: group.to_string(),
        desired,
        generation: 1,
        generation_since_ms: 0,
        rollout_open: false,
        replace_unhealthy_after_ms: 30_000,
        launch_not_before_ms: 0,
        paused: false,
        resumed_ms: 0,
        canary: None,
        provider_replaces_leavers: false,
        launches_any_generation: true,
        good_generation: 0,
        leave_within_ms: drover_control::group::leave_within_ms(
            rollout.drain_timeout.as_millis(),
            LEAVER_STOP_GRACE_MS,
        ),
        rollout,
    }
}

/// The simulated truth about one instance (what the server does not see).
#[derive(Clone, Debug)]
struct Agent {
    group: usize,
    boot_at: u64,
    fails: Option<FailMode>,
    silenced: bool,
    exit_at: Option<u64>,
    next_heartbeat: u64,
    /// In the balancer's targets at the last step (it gets a share of the load).
    in_rotation: bool,
    /// The autoscaling metric its agent last reported (the server's soft state).
    reported: Option<f64>,
    /// Its permit kept the group's capacity: the provider replaces it as it goes.
    keeps_capacity: bool,
    /// It does not leave on its permit ([`Fault::IgnorePermits`]).
    ignores_permit: bool,
    /// Its constant bias on the service's noisy metric ...
    bias: f64,
    /// ... and its canary analysis window (sum, samples): the server's soft state.
    window: Option<(f64, u32)>,
}

impl Agent {
    fn healthy_at(&self, t: u64) -> bool {
        self.fails.is_none() && t >= self.boot_at
    }
}

/// Server-side state of a group that is not in its spec.
#[derive(Clone, Debug, Default)]
struct GroupState {
    /// Generations whose instances never boot.
    broken: BTreeMap<u64, FailMode>,
    /// Its rollout record, as the server stores it and changes it (through
    /// `drover_control::rollout`).
    rollout: RolloutRecord,
    boot_failures: Option<(f64, FailMode)>,
    /// Its launch backoff, as the server keeps it ([`drover_control::backoff`]).
    backoff: LaunchBackoff,
    autoscale: Option<GroupAutoscale>,
    load: Option<LoadModel>,
    /// This step's common load noise factor.
    load_factor: f64,
    /// Instances in rotation at the last step.
    in_rotation: usize,
    /// (time, desired) at the start and at every change.
    desired_series: Vec<(u64, u32)>,
    scale_events: Vec<ScaleEvent>,
    trace: Vec<AutoscalePoint>,
    /// The simulated Auto Scaling group (groups with `provider_replaces_leavers` only).
    asg: Option<Asg>,
    schedules: Option<GroupSchedules>,
    /// Generations whose instances report the service's metric at its `bad` mean.
    degraded: std::collections::BTreeSet<u64>,
    /// Its service's waves (see [`Sim::add_service`]).
    wave: waves::WaveState,
}

/// A group's schedules, as the server keeps them (memory in the store).
#[derive(Clone, Debug, Default)]
struct GroupSchedules {
    service: String,
    region: String,
    base_min: u32,
    base_max: u32,
    file: Vec<Schedule>,
    once: Vec<ScheduledScale>,
    memory: ScheduleMemory,
    /// The bounds of this step, and what raised them.
    bounds: Option<(u32, u32, Option<String>)>,
    /// (time, message) of each `schedule` event.
    notes: Vec<(u64, String)>,
}

/// A group's autoscale policy, its range, and the autoscaler's memory (soft: a server restart
/// empties it).
#[derive(Clone, Debug)]
struct GroupAutoscale {
    policy: Autoscale,
    min: u32,
    max: u32,
    state: AutoscaleState,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

fn fnv_str(h: u64, s: &str) -> u64 {
    fnv(fnv(h, &(s.len() as u64).to_le_bytes()), s.as_bytes())
}

fn hash_decision(mut h: u64, now: u64, d: &Decision) -> u64 {
    h = fnv(h, &now.to_le_bytes());
    for a in &d.actions {
        h = match a {
            Action::Forget { instance, reason } => fnv_str(fnv_str(fnv(h, b"F"), instance), reason),
            Action::Terminate { instance, reason } => {
                fnv_str(fnv_str(fnv(h, b"T"), instance), reason)
            }
            Action::Permit { instance, reason } => fnv_str(fnv_str(fnv(h, b"P"), instance), reason),
            Action::Launch { group, generation } => {
                fnv(fnv_str(fnv(h, b"L"), group), &generation.to_le_bytes())
            }
            Action::RolloutDone { group, generation } => {
                fnv(fnv_str(fnv(h, b"D"), group), &generation.to_le_bytes())
            }
            Action::CanaryBaking { group, generation } => {
                fnv(fnv_str(fnv(h, b"B"), group), &generation.to_le_bytes())
            }
            Action::CanaryAnalyse { group, generation } => {
                fnv(fnv_str(fnv(h, b"A"), group), &generation.to_le_bytes())
            }
            Action::RolloutFailed {
                group,
                generation,
                reason,
                ..
            } => fnv_str(
                fnv(fnv_str(fnv(h, b"X"), group), &generation.to_le_bytes()),
                reason,
            ),
        };
    }
    for (group, ids) in &d.targets {
        h = fnv_str(fnv(h, b"G"), group);
        for id in ids {
            h = fnv_str(h, id);
        }
    }
    h
}

/// The simulated fleet and server.
pub struct Sim {
    cfg: SimConfig,
    rng: SplitMix64,
    now: u64,
    specs: Vec<GroupSpec>,
    groups: Vec<GroupState>,
    group_index: HashMap<String, usize>,
    /// The server's view of every instance (what `reconcile` reads) ...
    views: Vec<InstanceView>,
    /// ... and, index for index, the truth about it.
    agents: Vec<Agent>,
    index: HashMap<String, usize>,
    next_id: u64,
    faults: Vec<(u64, u64, Fault)>,
    fault_seq: u64,
    stats: Stats,
    services: Vec<waves::SimService>,
    verdicts: Vec<VerdictRecord>,
}

impl Sim {
    /// A simulator with the default [`SimConfig`].
    pub fn new(seed: u64) -> Sim {
        Sim::with_config(seed, SimConfig::default())
    }

    pub fn with_config(seed: u64, cfg: SimConfig) -> Sim {
        assert!(
            cfg.step_ms > 0 && cfg.heartbeat_ms > 0,
            "step_ms and heartbeat_ms must be > 0"
        );
        Sim {
            cfg,
            rng: SplitMix64::new(seed),
            now: 0,
            specs: Vec::new(),
            groups: Vec::new(),
            group_index: HashMap::new(),
            views: Vec::new(),
            agents: Vec::new(),
            index: HashMap::new(),
            next_id: 0,
            faults: Vec::new(),
            fault_seq: 0,
            services: Vec::new(),
            verdicts: Vec::new(),
            stats: Stats {
                decision_hash: FNV_OFFSET,
                ..Stats::default()
            },
        }
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Start the virtual clock at `ms` (e.g. a date, in ms since the epoch, for schedules).
    /// Only before any group is added.
    pub fn set_clock(&mut self, ms: u64) {
        assert!(self.specs.is_empty(), "set the clock before adding groups");
        self.now = ms;
        self.stats.now_ms = ms;
    }

    /// Virtual time, in ms.
    pub fn now(&self) -> u64 {
        self.now
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn spec(&self, group: &str) -> &GroupSpec {
        &self.specs[self.group_idx(group)]
    }

    /// The server's view of every instance.
    pub fn views(&self) -> &[InstanceView] {
        &self.views
    }

    /// Add a group already running `spec.desired` healthy instances on `spec.generation`
    /// (launched, booted and healthy long enough to count as ready).
    pub fn add_group(&mut self, spec: GroupSpec) {
        let n = spec.desired;
        let g = self.add_empty_group(spec);
        if let Some(asg) = &mut self.groups[g].asg {
            asg.capacity = i64::from(n);
        }
        for _ in 0..n {
            let generation = self.specs[g].generation;
            let id = self.new_instance(g, generation, true, self.now);
            let i = self.index[&id];
            let since = self.now.saturating_sub(600_000);
            let v = &mut self.views[i];
            v.launched_at_ms = since;
            v.health = Health::Healthy { since_ms: since };
            v.ever_healthy = true;
            self.agents[i].boot_at = since;
        }
    }

    /// Add a group with no instance: the controller launches them.
    pub fn add_empty_group(&mut self, spec: GroupSpec) -> usize {
        assert!(
            !self.group_index.contains_key(&spec.group),
            "group {} added twice",
            spec.group
        );
        let g = self.specs.len();
        self.group_index.insert(spec.group.clone(), g);
        self.groups.push(GroupState {
            rollout: RolloutRecord {
                since_ms: spec.generation_since_ms,
                open: spec.rollout_open,
                good_generation: spec.generation,
                ..RolloutRecord::default()
            },
            load_factor: 1.0,
            desired_series: vec![(self.now, spec.desired)],
            asg: spec.provider_replaces_leavers.then(Asg::default),
            ..GroupState::default()
        });
        self.specs.push(spec);
        g
    }

    /// Deploy a good new version to `group` now. Returns the new generation.
    pub fn deploy(&mut self, group: &str) -> u64 {
        let g = self.group_idx(group);
        self.begin_rollout(g, false, 0)
    }

    /// A deploy of group `g` (in no wave) now, the way the server records one: a new
    /// generation, its rollout begun. `revert`: an automatic revert going back from
    /// `reverted_from`. Returns the new generation.
    pub(crate) fn begin_rollout(&mut self, g: usize, revert: bool, reverted_from: u64) -> u64 {
        let origin = if revert {
            let mut failed = BTreeMap::new();
            failed.insert(self.specs[g].group.clone(), reverted_from);
            Origin::AutoRevert { failed }
        } else {
            Origin::Deploy {
                why: "deploy".into(),
                only: Vec::new(),
            }
        };
        let step = self.change_group(g, &origin, 0, false, true);
        assert_eq!(step.reach, Reach::NewGeneration, "{origin:?}");
        step.generation
    }

    /// The change `origin` reaches group `g` (of wave `wave`; `waves`: its service goes wave
    /// by wave) now, with a plan of other content (`changed`) or not: the server's group rule
    /// (`drover_control::change::group`) says whether it gets a new generation with its
    /// rollout begun, is held, or stays, and the group's record becomes what it says.
    pub(crate) fn change_group(
        &mut self,
        g: usize,
        origin: &Origin,
        wave: usize,
        waves: bool,
        changed: bool,
    ) -> GroupStep {
        let (spec, rec) = (&mut self.specs[g], &mut self.groups[g].rollout);
        let step = change::group(
            origin,
            &GroupChange {
                group: &spec.group,
                wave,
                waves,
                file_changes_service: false,
                before: Some((spec.generation, rec)),
                content_changed: changed,
                unused_generation: 1,
            },
            self.now,
        );
        spec.generation = step.generation;
        *rec = step.rollout.clone();
        rollout::apply_to_spec(rec, spec);
        step
    }

    /// The group's rollout record changed: what the controller reads of it.
    pub(crate) fn sync_rollout(&mut self, g: usize) {
        rollout::apply_to_spec(&self.groups[g].rollout, &mut self.specs[g]);
    }

    /// Deploy a version whose instances never turn healthy. Returns the new generation.
    pub fn deploy_broken(&mut self, group: &str, mode: FailMode) -> u64 {
        let g = self.group_idx(group);
        let generation = self.begin_rollout(g, false, 0);
        self.groups[g].broken.insert(generation, mode);
        generation
    }

    /// Write the desired count now, without telling the autoscaler (see [`Sim::scale`]).
    pub fn set_desired(&mut self, group: &str, desired: u32) {
        let g = self.group_idx(group);
        self.change_desired(g, desired, ScaledBy::SetDesired, "set_desired".into());
    }

    fn change_desired(&mut self, g: usize, to: u32, by: ScaledBy, reason: String) {
        let now = self.now;
        let from = self.specs[g].desired;
        self.specs[g].desired = to;
        let st = &mut self.groups[g];
        st.scale_events.push(ScaleEvent {
            at_ms: now,
            from,
            to,
            by,
            reason,
        });
        if to != from {
            st.desired_series.push((now, to));
        }
    }

    /// Give `group` an autoscale policy between `min` and `max` (the service's capacity range).
    /// The metric comes from the group's load model ([`Sim::set_load`]); without one, agents
    /// report nothing and the autoscaler has no data.
    pub fn set_autoscale(&mut self, group: &str, policy: Autoscale, min: u32, max: u32) {
        assert!(min <= max, "min {min} > max {max}");
        let g = self.group_idx(group);
        self.groups[g].autoscale = Some(GroupAutoscale {
            policy,
            min,
            max,
            state: AutoscaleState::default(),
        });
    }

    /// Give `group` (of service `service` in `region`) the fleet file's schedules, raising
    /// its capacity range `base_min..base_max` (the service's `capacity`).
    pub fn set_schedules(
        &mut self,
        group: &str,
        service: &str,
        base_min: u32,
        base_max: u32,
        file: Vec<Schedule>,
    ) {
        let g = self.group_idx(group);
        let region = drover_model::GroupId::region_of(group).to_string();
        let st = self.groups[g]
            .schedules
            .get_or_insert_with(Default::default);
        st.service = service.to_string();
        st.region = region;
        st.base_min = base_min;
        st.base_max = base_max;
        st.file = file;
    }

    /// A one-off scheduled change (`drover scale SERVICE N --at ... --for ...`) for `group`
    /// (after [`Sim::set_schedules`]).
    pub fn schedule_once(&mut self, group: &str, once: ScheduledScale) {
        let g = self.group_idx(group);
        let st = self.groups[g]
            .schedules
            .as_mut()
            .expect("set_schedules first");
        st.once.push(once);
    }

    /// Every `schedule` event of `group`: (time, message).
    pub fn schedule_notes(&self, group: &str) -> &[(u64, String)] {
        self.groups[self.group_idx(group)]
            .schedules
            .as_ref()
            .map_or(&[], |s| &s.notes)
    }

    /// The schedule pass: what the server's does, with the same function.
    fn schedules(&mut self) {
        let now = self.now;
        for g in 0..self.specs.len() {
            let autoscaled = self.groups[g].autoscale.is_some();
            let desired = self.specs[g].desired;
            let Some(st) = self.groups[g].schedules.as_mut() else {
                continue;
            };
            let sch = Schedules {
                service: &st.service,
                region: &st.region,
                base_min: st.base_min,
                base_max: st.base_max,
                file: &st.file,
                once: &st.once,
            };
            let r = schedule::step(now, &sch, desired, autoscaled, &mut st.memory);
            st.bounds = Some((r.bounds.min, r.bounds.max, r.bounds.by()));
            st.notes.extend(r.notes.into_iter().map(|n| (now, n)));
            if let Some(d) = r.decision {
                if r.sets_count {
                    if let Some(a) = &mut self.groups[g].autoscale {
                        a.state.manual(now, d.to);
                    }
                }
                self.change_desired(g, d.to, ScaledBy::Schedule, d.reason);
            }
        }
    }

    /// The total load `group` receives from now on (see [`LoadModel`]).
    pub fn set_load(&mut self, group: &str, load: LoadModel) {
        let g = self.group_idx(group);
        self.groups[g].load = Some(load);
    }

    /// `drover scale GROUP N` at `at_ms` (now if `at_ms` is not in the future): sets the
    /// desired count and tells the autoscaler, which goes on from the new count
    /// ([`AutoscaleState::manual`], as the server's `scale` does). Refuses a count outside the
    /// autoscale range, like the server.
    pub fn scale(&mut self, group: &str, desired: u32, at_ms: u64) -> Result<(), String> {
        let g = self.group_idx(group);
        if let Some(st) = &mut self.groups[g].schedules {
            if at_ms <= self.now {
                let sch = Schedules {
                    service: &st.service,
                    region: &st.region,
                    base_min: st.base_min,
                    base_max: st.base_max,
                    file: &st.file,
                    once: &st.once,
                };
                let bounds = sch.bounds(self.now);
                let (n, _) = schedule::manual(desired, &st.service, &bounds, &mut st.memory)?;
                self.manual_scale(g, n);
                return Ok(());
            }
        } else if let Some(a) = &self.groups[g].autoscale {
            if desired < a.min || desired > a.max {
                return Err(format!(
                    "{desired} is outside {group}'s capacity range min..max = {}..{}",
                    a.min, a.max
                ));
            }
        }
        if at_ms <= self.now {
            self.manual_scale(g, desired);
        } else {
            self.inject(
                at_ms,
                Fault::Scale {
                    group: group.to_string(),
                    desired,
                },
            );
        }
        Ok(())
    }

    fn manual_scale(&mut self, g: usize, desired: u32) {
        let now = self.now;
        if let Some(a) = &mut self.groups[g].autoscale {
            a.state.manual(now, desired);
        }
        self.change_desired(
            g,
            desired,
            ScaledBy::Manual,
            "manual: drover scale; autoscaling goes on from here".into(),
        );
    }

    /// A group on a simulated Auto Scaling group (`provider_replaces_leavers`): its desired
    /// capacity and how many instances it started that no launch claimed yet.
    pub fn provider_capacity(&self, group: &str) -> Option<(i64, usize)> {
        self.groups[self.group_idx(group)]
            .asg
            .as_ref()
            .map(|a| (a.capacity, a.unclaimed.len()))
    }

    /// `group`'s desired count over time: (time, desired) at the start and at every change.
    pub fn desired_series(&self, group: &str) -> &[(u64, u32)] {
        &self.groups[self.group_idx(group)].desired_series
    }

    /// Every change of `group`'s desired count, by whom and why (the autoscaler's reasons
    /// carry the metric values, as in the server's `scaled` events).
    pub fn scale_events(&self, group: &str) -> &[ScaleEvent] {
        &self.groups[self.group_idx(group)].scale_events
    }

    /// One point per step since `group` got an autoscale policy: load, metric, recommendation,
    /// desired count.
    pub fn autoscale_trace(&self, group: &str) -> &[AutoscalePoint] {
        &self.groups[self.group_idx(group)].trace
    }

    /// The autoscaler's memory of `group` (what `drover status` shows comes from here).
    pub fn autoscale_state(&self, group: &str) -> Option<&AutoscaleState> {
        self.groups[self.group_idx(group)]
            .autoscale
            .as_ref()
            .map(|a| &a.state)
    }

    /// Schedule a fault at virtual time `at_ms` (applied at the first step at or after it;
    /// faults at the same time apply in the order they were injected).
    pub fn inject(&mut self, at_ms: u64, fault: Fault) {
        self.fault_seq += 1;
        self.faults.push((at_ms, self.fault_seq, fault));
        self.faults.sort_by_key(|(at, seq, _)| (*at, *seq));
    }

    /// Step until `pred` holds (checked before each step) or `max_ms` of virtual time went by.
    /// Returns the virtual time it took, or `None` on timeout.
    pub fn run_until(&mut self, mut pred: impl FnMut(&Sim) -> bool, max_ms: u64) -> Option<u64> {
        let start = self.now;
        loop {
            if pred(self) {
                return Some(self.now - start);
            }
            if self.now - start >= max_ms {
                return None;
            }
            self.step();
        }
    }

    /// Step for `ms` of virtual time.
    pub fn run_for(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.step();
        }
    }

    /// Whether `group` is settled on its current generation: its rollout is closed, exactly
    /// `desired` instances, all Active on the current generation and in rotation, nothing else.
    pub fn converged(&self, group: &str) -> bool {
        let g = self.group_idx(group);
        let spec = &self.specs[g];
        if spec.rollout_open {
            return false;
        }
        let t = self.timing();
        let mut n = 0u32;
        for v in self.views.iter().filter(|v| v.group == spec.group) {
            if v.phase != Phase::Active
                || v.generation != spec.generation
                || !in_rotation(v, self.now, &t)
            {
                return false;
            }
            n += 1;
        }
        n == spec.desired
    }

    /// Whether every group has converged.
    pub fn all_converged(&self) -> bool {
        self.specs.iter().all(|s| self.converged(&s.group))
    }

    pub fn group_status(&self, group: &str) -> GroupStatus {
        let g = self.group_idx(group);
        let spec = &self.specs[g];
        let t = self.timing();
        let mut s = GroupStatus {
            desired: spec.desired,
            generation: spec.generation,
            rollout_open: spec.rollout_open,
            floor: spec.desired.saturating_sub(spec.rollout.max_unavailable) as usize,
            ..GroupStatus::default()
        };
        for (v, a) in self.views.iter().zip(&self.agents) {
            if a.group != g {
                continue;
            }
            match v.phase {
                Phase::Active => {
                    s.active += 1;
                    if v.generation < spec.generation {
                        s.stale += 1;
                    } else {
                        s.current += 1;
                    }
                }
                Phase::Draining => s.draining += 1,
                Phase::Terminating => s.terminating += 1,
            }
            if in_rotation(v, self.now, &t) {
                s.in_rotation += 1;
            }
            if self.serving(v, a) {
                s.serving += 1;
            }
        }
        s
    }

    fn timing(&self) -> Timing {
        Timing {
            silent_after_ms: self.cfg.silent_after_ms,
            leave_within_ms: drover_control::group::leave_within_ms(10_000, LEAVER_STOP_GRACE_MS),
        }
    }

    fn group_idx(&self, group: &str) -> usize {
        *self
            .group_index
            .get(group)
            .unwrap_or_else(|| panic!("no group {group} in the simulation"))
    }

    /// Really serves: Active, alive, booted (even if its agent went silent).
    fn serving(&self, v: &InstanceView, a: &Agent) -> bool {
        v.phase == Phase::Active && v.alive && a.exit_at.is_none() && a.healthy_at(self.now)
    }

    /// A new instance of group `g`, its machine started at `started` (now, or earlier when
    /// the launch claims an instance the provider started); unless `good`, its fate follows
    /// the group's faults.
    fn new_instance(&mut self, g: usize, generation: u64, good: bool, started: u64) -> String {
        self.next_id += 1;
        let id = format!("i-{:07}", self.next_id);
        let now = self.now;
        let fails = if good {
            None
        } else if let Some(m) = self.groups[g].broken.get(&generation) {
            Some(*m)
        } else if let Some((fraction, m)) = self.groups[g].boot_failures {
            (self.rng.unit() < fraction).then_some(m)
        } else {
            None
        };
        let bias = self.metric_bias(g);
        let boot_at = started + self.cfg.boot_ms + self.rng.below(self.cfg.boot_jitter_ms + 1);
        let next_heartbeat = now + 1 + self.rng.below(self.cfg.heartbeat_ms);
        let exit_at = (fails == Some(FailMode::Crash)).then_some(now + self.cfg.crash_ms);
        self.index.insert(id.clone(), self.views.len());
        self.views.push(InstanceView {
            id: id.clone(),
            group: self.specs[g].group.clone(),
            generation,
            launched_at_ms: now,
            phase: Phase::Active,
            alive: true,
            health: Health::Unknown,
            last_seen_ms: now,
            ever_healthy: false,
            watched_since_ms: now,
            exits_before_healthy: 0,
            last_failure: None,
            permit_at_ms: None,
            restored: false,
        });
        self.agents.push(Agent {
            group: g,
            boot_at,
            fails,
            silenced: false,
            exit_at,
            next_heartbeat,
            in_rotation: false,
            reported: None,
            keeps_capacity: false,
            ignores_permit: false,
            bias,
            window: None,
        });
        id
    }

    /// Running instances of group `g` that really serve, in a PRNG-picked order.
    fn pick_serving(&mut self, g: usize, count: usize) -> Vec<usize> {
        let mut pool: Vec<usize> = (0..self.views.len())
            .filter(|&i| {
                self.agents[i].group == g
                    && !self.agents[i].silenced
                    && self.serving(&self.views[i], &self.agents[i])
            })
            .collect();
        let mut out = Vec::new();
        while out.len() < count && !pool.is_empty() {
            let k = self.rng.below(pool.len() as u64) as usize;
            out.push(pool.swap_remove(k));
        }
        out
    }

    fn apply_fault(&mut self, fault: Fault) {
        match fault {
            Fault::BootFailures {
                group,
                fraction,
                mode,
            } => {
                let setting = (fraction > 0.0).then_some((fraction, mode));
                match group {
                    Some(name) => {
                        let g = self.group_idx(&name);
                        self.groups[g].boot_failures = setting;
                    }
                    None => self
                        .groups
                        .iter_mut()
                        .for_each(|s| s.boot_failures = setting),
                }
            }
            Fault::Silence { group, count } => {
                let g = self.group_idx(&group);
                for i in self.pick_serving(g, count) {
                    self.agents[i].silenced = true;
                }
            }
            Fault::Kill { group, count } => {
                let g = self.group_idx(&group);
                for i in self.pick_serving(g, count) {
                    self.agents[i].exit_at = Some(self.now);
                }
            }
            Fault::IgnorePermits { group, count } => {
                let g = self.group_idx(&group);
                for i in self.pick_serving(g, count) {
                    self.agents[i].ignores_permit = true;
                }
            }
            Fault::KillInstance { instance } => {
                if let Some(&i) = self.index.get(&instance) {
                    self.agents[i].exit_at = Some(self.now);
                }
            }
            Fault::ServerRestart => self.restart_server(),
            Fault::Deploy { group, broken } => {
                match broken {
                    Some(m) => self.deploy_broken(&group, m),
                    None => self.deploy(&group),
                };
            }
            Fault::SetDesired { group, desired } => self.set_desired(&group, desired),
            Fault::Scale { group, desired } => {
                let g = self.group_idx(&group);
                if self.groups[g].schedules.is_some() {
                    // Clamped to the bounds of now (a schedule may hold them).
                    let _ = self.scale(&group, desired, self.now);
                } else {
                    self.manual_scale(g, desired);
                }
            }
        }
    }

    /// What the server does when it starts again: instance and group records come back from
    /// the store (lifecycle, generation, rollout state); soft state is rebuilt from the next
    /// heartbeats, with the restart time as a grace period; launch backoff is forgotten.
    pub fn restart_server(&mut self) {
        self.stats.restarts += 1;
        let now = self.now;
        for v in &mut self.views {
            v.health = Health::Unknown;
            v.last_seen_ms = now;
            v.ever_healthy = false;
            v.watched_since_ms = now;
            v.restored = true;
        }
        for a in &mut self.agents {
            a.reported = None;
            a.window = None;
        }
        for (spec, st) in self.specs.iter_mut().zip(&mut self.groups) {
            spec.launch_not_before_ms = 0;
            st.backoff = LaunchBackoff::default();
            if let Some(a) = &mut st.autoscale {
                a.state = AutoscaleState::default();
            }
        }
    }

    /// Heartbeats and exits up to now.
    fn advance_agents(&mut self) {
        let now = self.now;
        let hb = self.cfg.heartbeat_ms;
        // Instances that ended at this step: their group, whether the capacity stays.
        let mut ended: Vec<(usize, bool)> = Vec::new();
        // Heartbeats that carry a metric sample (instance index, one per heartbeat).
        let mut sampled: Vec<usize> = Vec::new();
        for (k, (v, a)) in self.views.iter_mut().zip(&mut self.agents).enumerate() {
            if !v.alive {
                continue;
            }
            while a.next_heartbeat <= now {
                let h = a.next_heartbeat;
                a.next_heartbeat += hb;
                if a.exit_at.is_some_and(|e| h >= e) {
                    break;
                }
                if a.silenced {
                    continue;
                }
                if a.window.is_some() {
                    sampled.push(k);
                }
                let st = &self.groups[a.group];
                if let Some(load) = &st.load {
                    let mut m = if a.in_rotation && st.in_rotation > 0 {
                        load.load_at(h) * st.load_factor / st.in_rotation as f64 / load.capacity
                    } else {
                        0.0
                    };
                    if load.instance_noise > 0.0 {
                        m *= 1.0 + load.instance_noise * (2.0 * self.rng.unit() - 1.0);
                    }
                    a.reported = Some(m);
                }
                // The server's absorb_heartbeat.
                let healthy = a.healthy_at(h);
                let before = v.health;
                v.health = before.after_report(healthy, v.ever_healthy, h);
                if healthy {
                    v.ever_healthy = true;
                    if !matches!(before, Health::Healthy { .. }) {
                        // A healthy instance resets the group's launch backoff.
                        self.groups[a.group].backoff = LaunchBackoff::default();
                        self.specs[a.group].launch_not_before_ms = 0;
                    }
                }
                v.last_seen_ms = h;
                // Heard from: no longer known only from the store.
                v.restored = false;
            }
            if a.exit_at.is_some_and(|e| e <= now) {
                // The provider saw it end.
                v.alive = false;
                v.health = Health::Unknown;
                // An Auto Scaling group replaces what dies or leaves keeping its capacity;
                // what the server terminated or what left lowering it goes with its capacity.
                let keeps = match v.phase {
                    Phase::Active => true,
                    Phase::Draining => a.keeps_capacity,
                    Phase::Terminating => false,
                };
                ended.push((a.group, keeps));
            }
        }
        for i in sampled {
            self.sample_metric(i);
        }
        for (g, keeps) in ended {
            let generation = self.specs[g].generation;
            if let Some(asg) = &mut self.groups[g].asg {
                if keeps {
                    // Started from the launch template of the group's current generation.
                    asg.unclaimed.push((now, generation));
                } else {
                    asg.capacity -= 1;
                }
            }
        }
        // Instances the provider started that no launch claimed within the grace.
        let mut orphans = 0;
        for st in &mut self.groups {
            if let Some(asg) = &mut st.asg {
                let before = asg.unclaimed.len();
                asg.unclaimed
                    .retain(|(at, _)| now.saturating_sub(*at) < ORPHAN_GRACE_MS);
                let n = before - asg.unclaimed.len();
                asg.capacity -= n as i64;
                orphans += n as u64;
            }
        }
        self.stats.orphans += orphans;
    }

    fn launch_failed(&mut self, g: usize) {
        let st = &mut self.groups[g];
        st.backoff.failed(self.now);
        self.specs[g].launch_not_before_ms = st.backoff.not_before_ms;
    }

    fn violation(&self, n: u32, group: &str, what: String) -> ! {
        let s = if self.group_index.contains_key(group) {
            format!("{:?}", self.group_status(group))
        } else {
            String::new()
        };
        panic!(
            "invariant {n} violated at step {} (t = {} ms) in group {group}: {what}\n  counts: {s}",
            self.stats.steps, self.now
        );
    }

    /// Who is in rotation now (the load's split until the next step), and the common load
    /// noise of the coming step.
    fn refresh_load(&mut self) {
        if self.groups.iter().all(|st| st.load.is_none()) {
            return;
        }
        let (now, t) = (self.now, self.timing());
        for st in &mut self.groups {
            st.in_rotation = 0;
        }
        for (v, a) in self.views.iter().zip(&mut self.agents) {
            a.in_rotation = in_rotation(v, now, &t);
            if a.in_rotation {
                self.groups[a.group].in_rotation += 1;
            }
        }
        for st in &mut self.groups {
            st.load_factor = match &st.load {
                Some(l) if l.load_noise > 0.0 => 1.0 + l.load_noise * (2.0 * self.rng.unit() - 1.0),
                _ => 1.0,
            };
        }
    }

    /// The server's autoscale pass over every group with a policy.
    fn autoscale(&mut self) {
        let (now, t) = (self.now, self.timing());
        for g in 0..self.specs.len() {
            let Some(a) = &self.groups[g].autoscale else {
                continue;
            };
            let mut rot = 0usize;
            let mut offers = Vec::new();
            for (v, ag) in self.views.iter().zip(&self.agents) {
                if ag.group != g {
                    continue;
                }
                if in_rotation(v, now, &t) {
                    rot += 1;
                }
                offers.push(drover_control::autoscale::Offer {
                    alive: v.alive,
                    phase: v.phase,
                    health: v.health,
                    last_seen_ms: v.last_seen_ms,
                    value: ag.reported,
                });
            }
            let (samples, oldest) = drover_control::autoscale::samples(now, &a.policy, offers);
            let spec = &self.specs[g];
            let st = &mut self.groups[g];
            let raised = st.schedules.as_ref().and_then(|s| s.bounds.clone());
            let GroupAutoscale {
                policy,
                min,
                max,
                state,
            } = st.autoscale.as_mut().expect("autoscaled group");
            let (min, max, by) = match raised {
                Some((lo, hi, by)) => (lo, hi, by),
                None => (*min, *max, None),
            };
            let decision = state.decide(
                now,
                &AutoscaleInput {
                    group: &spec.group,
                    policy,
                    desired: spec.desired,
                    min,
                    max,
                    bounds_by: by.as_deref(),
                    rollout_in_progress: spec.rollout_open,
                    samples: &samples,
                    oldest_sample_ms: oldest,
                },
            );
            let recommended = state.last_recommended;
            let observed = state.last_observed;
            let rollout_open = spec.rollout_open;
            let (load, per_instance) = match &st.load {
                Some(l) => {
                    let load = l.load_at(now);
                    (load, (rot > 0).then(|| load / rot as f64 / l.capacity))
                }
                None => (0.0, None),
            };
            if let Some(d) = decision {
                if self.cfg.check_invariants {
                    let group = self.specs[g].group.clone();
                    if d.to < min || d.to > max {
                        self.violation(
                            4,
                            &group,
                            format!("autoscaler set desired {} outside {min}..{max}", d.to),
                        );
                    }
                    if d.to < d.from && rollout_open {
                        self.violation(
                            5,
                            &group,
                            format!(
                                "autoscaler scaled in {} -> {} during a rollout ({})",
                                d.from, d.to, d.reason
                            ),
                        );
                    }
                }
                self.change_desired(g, d.to, ScaledBy::Autoscaler, d.reason);
            }
            let desired = self.specs[g].desired;
            self.groups[g].trace.push(AutoscalePoint {
                at_ms: now,
                load,
                per_instance,
                observed,
                measured: samples.len(),
                in_rotation: rot,
                recommended,
                desired,
                rollout_open,
            });
        }
    }

    /// One controller tick.
    pub fn step(&mut self) {
        self.refresh_load();
        self.now += self.cfg.step_ms;
        self.stats.steps += 1;
        self.stats.now_ms = self.now;
        let now = self.now;

        while self.faults.first().is_some_and(|(at, _, _)| *at <= now) {
            let (_, _, f) = self.faults.remove(0);
            self.apply_fault(f);
        }
        self.advance_agents();
        self.schedules();
        self.autoscale();
        self.release_waves();

        let t = self.timing();
        let decision = reconcile(now, &self.specs, &self.views, &t);
        self.stats.decision_hash = hash_decision(self.stats.decision_hash, now, &decision);

        // Before the actions: per group, in rotation (server's view) and serving (truth).
        let ng = self.specs.len();
        let mut rot_before = vec![0usize; ng];
        let mut serving_before = vec![0usize; ng];
        for (v, a) in self.views.iter().zip(&self.agents) {
            if in_rotation(v, now, &t) {
                rot_before[a.group] += 1;
            }
            if self.serving(v, a) {
                serving_before[a.group] += 1;
            }
        }
        let mut rot_permitted = vec![0usize; ng];
        let mut serving_removed = vec![0usize; ng];
        let mut serving_permitted = vec![0usize; ng];
        let mut permitted = vec![0usize; ng];
        let mut launched = vec![0usize; ng];
        let mut removed = false;

        for action in decision.actions {
            match action {
                // The canary stage, as the server carries it out: the bake begins and every
                // instance opens its window; at its end the canaries are judged against the
                // old instances on the service's metric (`waves.rs`).
                Action::CanaryBaking { group, .. } => {
                    let g = self.group_idx(&group);
                    self.canary_baking(g);
                }
                Action::CanaryAnalyse { group, generation } => {
                    let g = self.group_idx(&group);
                    if self.canary_analyse(g, generation) {
                        self.rollout_failed(g, generation);
                    }
                }
                Action::Forget { ref instance, .. } => {
                    let Some(&i) = self.index.get(instance) else {
                        continue;
                    };
                    match self.views[i].phase {
                        Phase::Active => self.stats.died += 1,
                        Phase::Draining => self.stats.left_by_permit += 1,
                        Phase::Terminating => self.stats.left_by_terminate += 1,
                    }
                    removed |= self.carry_out(&action);
                }
                Action::Terminate {
                    ref instance,
                    ref reason,
                } => {
                    let Some(&i) = self.index.get(instance) else {
                        continue;
                    };
                    let (g, v, a) = (self.agents[i].group, &self.views[i], &self.agents[i]);
                    // Invariant 1: Terminate only what is broken, silent or never healthy.
                    let overstayed = v.phase == Phase::Draining
                        && v.permit_at_ms.is_some_and(|at| {
                            now.saturating_sub(at) >= self.specs[g].leave_within_ms
                        });
                    if overstayed {
                        self.stats.terminated_overstayed += 1;
                    } else if a.silenced {
                        self.stats.terminated_silent += 1;
                    } else if !a.healthy_at(now) {
                        self.stats.terminated_never_healthy += 1;
                    } else if self.cfg.check_invariants {
                        let stale = v.generation < self.specs[g].generation;
                        self.violation(
                            1,
                            &self.specs[g].group.clone(),
                            format!(
                                "Terminate of {instance} ({}generation {}), which is healthy and \
                                 heartbeating (controller's reason: {reason}); only a permit may \
                                 take a healthy instance away",
                                if stale { "stale, " } else { "" },
                                v.generation
                            ),
                        );
                    }
                    if self.serving(&self.views[i], &self.agents[i]) {
                        serving_removed[g] += 1;
                    }
                    self.carry_out(&action);
                }
                Action::Permit { ref instance, .. } => {
                    let Some(&i) = self.index.get(instance) else {
                        continue;
                    };
                    let g = self.agents[i].group;
                    self.stats.permits += 1;
                    permitted[g] += 1;
                    if in_rotation(&self.views[i], now, &t) {
                        rot_permitted[g] += 1;
                    }
                    if self.serving(&self.views[i], &self.agents[i]) {
                        serving_permitted[g] += 1;
                        serving_removed[g] += 1;
                    }
                    self.carry_out(&action);
                }
                Action::Launch { ref group, .. } => {
                    let g = self.group_idx(group);
                    self.stats.launches += 1;
                    launched[g] += 1;
                    self.carry_out(&action);
                }
                Action::RolloutDone {
                    ref group,
                    generation,
                } => {
                    let g = self.group_idx(group);
                    let since = self.groups[g].rollout.since_ms;
                    rollout::done(&mut self.groups[g].rollout, generation, "", now);
                    self.sync_rollout(g);
                    self.stats.rollouts_done.push(RolloutEvent {
                        group: group.clone(),
                        generation,
                        at_ms: now,
                        took_ms: now - since,
                    });
                }
                Action::RolloutFailed {
                    group, generation, ..
                } => {
                    let g = self.group_idx(&group);
                    self.rollout_failed(g, generation);
                }
            }
        }

        if removed {
            let mut k = 0;
            while k < self.views.len() {
                if self.views[k].id.is_empty() {
                    self.views.swap_remove(k);
                    self.agents.swap_remove(k);
                } else {
                    k += 1;
                }
            }
            self.index.clear();
            for (k, v) in self.views.iter().enumerate() {
                self.index.insert(v.id.clone(), k);
            }
        }

        self.check_after(
            &rot_before,
            &rot_permitted,
            &serving_before,
            &serving_removed,
            &serving_permitted,
            &permitted,
            &launched,
        );
    }

    /// Carry out an instance action as the server does (`drover_control::effects`), on the
    /// simulated world: the server's records, and what the agent and the provider do then.
    /// Returns whether the instance was removed (its view marked, see `step`).
    fn carry_out(&mut self, action: &Action) -> bool {
        let now = self.now;
        let i = match action {
            Action::Forget { instance, .. }
            | Action::Terminate { instance, .. }
            | Action::Permit { instance, .. } => self.index.get(instance).copied(),
            _ => None,
        };
        let effects = drover_control::effects::of(action, i.map(|i| &self.views[i]), now);
        let mut removed = false;
        for e in effects {
            match (e, i) {
                (
                    Effect::SetPhase {
                        phase,
                        permit_at_ms,
                        ..
                    },
                    Some(i),
                ) => {
                    self.views[i].phase = phase;
                    self.views[i].permit_at_ms = permit_at_ms;
                }
                (Effect::Remove { instance }, Some(i)) => {
                    self.index.remove(&instance);
                    self.views[i].id.clear(); // marks it for removal in `step`
                    removed = true;
                }
                (Effect::LaunchFailed { .. }, Some(i)) => self.launch_failed(self.agents[i].group),
                (Effect::WakePermitPoll { .. }, Some(i))
                    if self.views[i].phase == Phase::Draining =>
                {
                    // The agent's permit poll answers now: it drains, then leaves (unless it
                    // ignores permits).
                    let g = self.agents[i].group;
                    let drained = now + self.cfg.drain_ms;
                    let a = &mut self.agents[i];
                    if !a.ignores_permit {
                        a.exit_at = Some(a.exit_at.map_or(drained, |e| e.min(drained)));
                    }
                    if self.groups[g].asg.is_some() {
                        let group: Vec<&InstanceView> = self
                            .views
                            .iter()
                            .zip(&self.agents)
                            .filter(|(_, a)| a.group == g)
                            .map(|(v, _)| v)
                            .collect();
                        let keeps = drover_control::group::provider_replaces(
                            &self.specs[g],
                            &self.views[i],
                            &group,
                        );
                        self.agents[i].keeps_capacity = keeps;
                        if keeps {
                            self.stats.kept_capacity += 1;
                        }
                    }
                }
                (Effect::ProviderTerminate { .. }, Some(i)) => {
                    let stop = now + self.cfg.stop_ms;
                    let a = &mut self.agents[i];
                    a.exit_at = Some(a.exit_at.map_or(stop, |e| e.min(stop)));
                }
                (Effect::Launch { group, generation }, _) => {
                    let g = self.group_idx(&group);
                    // On an Auto Scaling group: claim an instance it started on its own, or
                    // raise its capacity by one.
                    let mut started = now;
                    if let Some(asg) = &mut self.groups[g].asg {
                        match asg.unclaimed.iter().position(|(_, gen)| *gen == generation) {
                            Some(k) => {
                                started = asg.unclaimed.remove(k).0;
                                self.stats.claimed_from_provider += 1;
                            }
                            None => asg.capacity += 1,
                        }
                    }
                    self.new_instance(g, generation, false, started);
                }
                // The balancer's targets follow the phases; events are not simulated.
                _ => {}
            }
        }
        removed
    }

    /// A rollout failed (never healthy in time, or its canary analysis failed): with
    /// `auto_revert`, a new generation with the content of the last good one; the service's
    /// later waves stop and the regions the deploy reached go back too.
    fn rollout_failed(&mut self, g: usize, generation: u64) {
        let now = self.now;
        let since = self.groups[g].rollout.since_ms;
        let auto_revert = self.specs[g].rollout.auto_revert;
        let (after, _) = rollout::failed(
            &mut self.groups[g].rollout,
            generation,
            "failed in the simulation",
            auto_revert,
        );
        self.sync_rollout(g);
        self.stats.rollouts_failed.push(RolloutEvent {
            group: self.specs[g].group.clone(),
            generation,
            at_ms: now,
            took_ms: now - since,
        });
        if let AfterFailure::Revert { to } = after {
            // As the server: a new generation with the content of the good one, and no
            // canary stage.
            let new = self.begin_rollout(g, true, generation);
            self.stats.reverts += 1;
            if let Some(m) = self.groups[g].broken.get(&to).copied() {
                self.groups[g].broken.insert(new, m);
            }
            if self.groups[g].degraded.contains(&to) {
                self.groups[g].degraded.insert(new);
            }
            self.waves_after_failure(g);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_after(
        &mut self,
        rot_before: &[usize],
        rot_permitted: &[usize],
        serving_before: &[usize],
        serving_removed: &[usize],
        serving_permitted: &[usize],
        permitted: &[usize],
        launched: &[usize],
    ) {
        let ng = self.specs.len();
        let mut active = vec![0usize; ng];
        let mut draining = 0usize;
        for (v, a) in self.views.iter().zip(&self.agents) {
            match v.phase {
                Phase::Active => active[a.group] += 1,
                Phase::Draining => draining += 1,
                Phase::Terminating => {}
            }
        }
        self.stats.max_draining = self.stats.max_draining.max(draining);
        for g in 0..ng {
            let spec = &self.specs[g];
            if let Some(asg) = &self.groups[g].asg {
                let over = asg.capacity - i64::from(spec.desired);
                self.stats.max_capacity_over_desired =
                    self.stats.max_capacity_over_desired.max(over);
            }
            let over = active[g] as i64 - i64::from(spec.desired);
            self.stats.max_active_over_desired = self.stats.max_active_over_desired.max(over);
            if !self.cfg.check_invariants {
                continue;
            }
            let floor = spec.desired.saturating_sub(spec.rollout.max_unavailable) as usize;
            // Invariant 2 (server's view): permits never take in-rotation below the floor,
            // unless it already was below and no in-rotation instance got a permit.
            if permitted[g] > 0 {
                let before = rot_before[g];
                let after = before - rot_permitted[g];
                if !(after >= floor || (before < floor && rot_permitted[g] == 0)) {
                    self.violation(
                        2,
                        &spec.group.clone(),
                        format!(
                            "{} permit(s) ({} in rotation) took in-rotation from {before} to \
                             {after}, below the floor {floor} (desired {} - max_unavailable {})",
                            permitted[g],
                            rot_permitted[g],
                            spec.desired,
                            spec.rollout.max_unavailable
                        ),
                    );
                }
            }
            // Invariant 2, on the truth: a permit that takes a serving instance leaves at
            // least `floor` serving (whatever the server believes after a restart).
            if serving_permitted[g] > 0 {
                let after = serving_before[g] - serving_removed[g];
                if after < floor {
                    self.violation(
                        2,
                        &spec.group.clone(),
                        format!(
                            "{} permit(s) of serving instances left {after} serving (was {}), \
                             below the floor {floor}",
                            serving_permitted[g], serving_before[g]
                        ),
                    );
                }
            }
            // Invariant 3: launches never take Active above desired + max_surge.
            let cap = spec.desired as usize + spec.rollout.max_surge as usize;
            if launched[g] > 0 && active[g] > cap {
                self.violation(
                    3,
                    &spec.group.clone(),
                    format!(
                        "{} launch(es) took Active to {}, above desired {} + max_surge {}",
                        launched[g], active[g], spec.desired, spec.rollout.max_surge
                    ),
                );
            }
        }
    }
}
