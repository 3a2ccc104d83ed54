//! The simulator: the control plane's [`World`] (`drover_control::world`: the state and the
//! steps `drover server` holds and calls), driven on a virtual clock by simulated agents and
//! providers, with injected faults and the invariants checked at every step. The rules are
//! `drover_control`'s; what the simulation adds is the fake world: agents (their boot,
//! health, faults and timing), the providers (the simulated Auto Scaling group), the store
//! the world's changes are committed to, faults and the clock.
//!
//! The fleet is a real fleet revision: each group is a region of a service of a
//! [`drover_model::Fleet`] (`sim` regions, or `aws` for `provider_replaces_leavers`), so
//! [`World::spec`] derives the [`GroupSpec`] the server would.
//!
//! Each step (`SimConfig::step_ms`, 250 ms like the server's tick) does, in order:
//! 1. apply the faults scheduled at or before now;
//! 2. advance the agents: each sends its [`Heartbeat`] (every `heartbeat_ms`, each on its own
//!    phase), which the world absorbs ([`World::heartbeat`]); an agent whose time is up exits
//!    and its provider says so ([`World::exited`]);
//! 3. run the server's tick: the schedule pass ([`World::schedule_step`]) and the autoscale
//!    pass ([`World::autoscale_step`]), each stored then taken ([`World::accept`]); up to
//!    three controller passes ([`World::reconcile_due`]), whose instance actions are carried
//!    out through their effects ([`World::effects_of`], [`World::stage_effects`]; launches
//!    by [`World::begin_launch`], [`World::launched`], [`World::adopt`]; permits answered by
//!    [`World::permit_of`]) and whose group actions through [`World::rollout_done`],
//!    [`World::rollout_failed`], [`World::canary_baking`], [`World::canary_analyse`]; the
//!    targets published ([`World::publish`]); the waves released
//!    ([`World::wave_releases`]);
//! 4. check the invariants, and panic with the step, the time and the counts if one breaks.
//!
//! Deploys, waves and automatic reverts are changes of the fleet revision planned by
//! [`drover_control::change::plan`], as the server's apply plans them; `drover scale` is
//! [`World::plan_scale`], a one-off schedule [`World::plan_schedule_once`]. A server restart
//! rebuilds the world from what was stored ([`World::restore`], [`World::api_ready`]).
//!
//! Invariants checked (numbers as in the panic message): 1. no Terminate of a healthy,
//! heartbeating instance; 2. permits never take a group below `desired - max_unavailable`
//! (server's view and truth); 3. launches never take Active above `desired + max_surge`;
//! 4. the autoscaler keeps desired within min..max; 5. the autoscaler never scales in while a
//! rollout is open.
//!
//! A group whose spec has `provider_replaces_leavers` runs on a simulated Auto Scaling group
//! (an `aws` region; its rollout has no surge): the provider keeps a desired capacity; a
//! launch claims an instance the provider started on its own (of the launch's generation) or
//! raises the capacity by one; a leaver whose permit keeps the capacity (the permit's answer,
//! [`World::permit_of`]) makes the provider start its replacement as it goes, every other
//! leaver or terminated instance lowers the capacity, an instance that dies is replaced by
//! the provider, and what no launch claims within [`ORPHAN_GRACE_MS`] is terminated with the
//! capacity lowered. [`Stats::max_capacity_over_desired`] records the most the capacity went
//! above `desired`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use drover_control::change::{self, ChangePlan, Commit, Origin};
use drover_control::effects::Effect;
use drover_control::group::in_rotation;
use drover_control::rollout::AfterFailure;
use drover_control::world::{self as cw, Change, Group, Launched, Record, Staged, World};
use drover_control::{
    Action, AutoscaleState, Decision, GroupSpec, Health, InstanceView, Phase, Timing,
};
use drover_model::api::{
    AgentPhase, ComponentReport, ComponentState, Heartbeat, Revision, ScaleRequest,
    ScheduleRequest, ScheduledScale, Utilization,
};
use drover_model::fleet::{Autoscale, Capacity, ProviderKind, Rollout, Schedule, Service};
use drover_model::record::{GroupRecord, Lifecycle, RolloutRecord};
use drover_model::{Dur, EventKind, Fleet, GroupId, Plan};

mod store;
mod waves;
pub use waves::{NoisyMetric, ServiceSpec, VerdictRecord};

use crate::load::{AutoscalePoint, LoadModel, ScaleEvent, ScaledBy};
use crate::rng::SplitMix64;
use store::Store;

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
    /// Terminations of instances whose agent went silent ...
    pub terminated_silent: u64,
    /// ... and permits given to them before the server noticed (in their turn).
    pub permitted_silent: u64,
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

/// The fleet file's name in the simulated revisions.
const FILE: &str = "drover.toml";

/// The simulated fleet's first revision: its one component is the template of every
/// service's.
const TEMPLATE: &str = r#"
[fleet]
name = "sim"

[regions.r]
provider = "sim"

[services.s]
regions = ["r"]
capacity = { min = 0, desired = 1, max = 1 }

[services.s.components.app]
runtime = "process"
version = "v1"
command = "/bin/true"
"#;

/// The simulated truth about one instance (what the server does not see), and its agent.
#[derive(Clone, Debug)]
struct Agent {
    id: String,
    group: usize,
    boot_at: u64,
    fails: Option<FailMode>,
    silenced: bool,
    exit_at: Option<u64>,
    /// Its provider saw it end.
    ended: bool,
    next_heartbeat: u64,
    /// In the balancer's targets at the last step (it gets a share of the load).
    in_rotation: bool,
    /// Its permit kept the group's capacity: the provider replaces it as it goes.
    keeps_capacity: bool,
    /// It does not leave on its permit ([`Fault::IgnorePermits`]).
    ignores_permit: bool,
    /// Its permit poll answered: it drains (and says so in its heartbeats), then leaves.
    leaving: bool,
    /// Its constant bias on the service's noisy metric ...
    bias: f64,
    /// ... whose mean is the service's `bad` one (it runs a degraded version).
    degraded: bool,
    /// What it sends (seq, state and utilization change).
    hb: Heartbeat,
}

impl Agent {
    fn healthy_at(&self, t: u64) -> bool {
        self.fails.is_none() && t >= self.boot_at
    }
}

/// Each agent's place in [`Sim::agents`], by its instance's number (its id is
/// `drover_model::ids::instance_id(seq)`, as the server names a launch): no string hashing on
/// the agents' every heartbeat.
#[derive(Clone, Debug, Default)]
struct AgentIndex {
    slot: Vec<usize>,
}

impl AgentIndex {
    const NONE: usize = usize::MAX;

    fn seq(id: &str) -> Option<usize> {
        id.strip_prefix("i-")?.parse().ok()
    }

    fn get(&self, id: &str) -> Option<usize> {
        let k = *self.slot.get(AgentIndex::seq(id)?)?;
        (k != AgentIndex::NONE).then_some(k)
    }

    fn insert(&mut self, id: &str, k: usize) {
        let seq = AgentIndex::seq(id).expect("an instance id names its number");
        if self.slot.len() <= seq {
            self.slot.resize(seq + 1, AgentIndex::NONE);
        }
        self.slot[seq] = k;
    }

    fn remove(&mut self, id: &str) -> Option<usize> {
        let k = self.get(id)?;
        self.slot[AgentIndex::seq(id)?] = AgentIndex::NONE;
        Some(k)
    }
}

/// What the simulation keeps of a group besides the server's world: the fake world's truth
/// about it, and the records of what happened to it.
#[derive(Clone, Debug, Default)]
struct GroupState {
    name: String,
    /// Versions whose instances never boot ...
    broken: BTreeMap<String, FailMode>,
    /// ... and versions whose instances report the service's metric at its `bad` mean.
    degraded: BTreeSet<String>,
    boot_failures: Option<(f64, FailMode)>,
    load: Option<LoadModel>,
    /// The autoscale policy's metric is custom (the load goes there, not in `cpu`).
    custom_metric: Option<String>,
    /// This step's common load noise factor.
    load_factor: f64,
    /// Instances in rotation at the last step.
    in_rotation: usize,
    /// (time, desired) at the start and at every change.
    desired_series: Vec<(u64, u32)>,
    scale_events: Vec<ScaleEvent>,
    trace: Vec<AutoscalePoint>,
    /// (time, message) of each `schedule` event.
    notes: Vec<(u64, String)>,
    /// The simulated Auto Scaling group (groups with `provider_replaces_leavers` only).
    asg: Option<Asg>,
    /// Its service's index in [`Sim::add_service`]'s list.
    service: Option<usize>,
    /// Its canaries bake (the server keeps windows of its instances) at this step.
    baking: bool,
    /// Its instances or its count changed at this step: [`Sim::count_after`] counts again ...
    touched: bool,
    /// ... its Active and Draining instances.
    active: usize,
    draining: usize,
}

/// The simulated fleet and server.
pub struct Sim {
    cfg: SimConfig,
    rng: SplitMix64,
    now: u64,
    /// The server's world: what the controller reads and the steps change.
    world: World,
    /// What the server stored: a restart rebuilds `world` from it.
    store: Store,
    /// The component every service runs (its version changes with deploys).
    template: Service,
    /// Versions deployed so far (every service starts on `v1`).
    versions: u64,
    groups: Vec<GroupState>,
    group_index: HashMap<String, usize>,
    agents: Vec<Agent>,
    agent_index: AgentIndex,
    faults: Vec<(u64, u64, Fault)>,
    fault_seq: u64,
    stats: Stats,
    services: Vec<waves::SimService>,
    verdicts: Vec<VerdictRecord>,
}

/// Per group, what one controller pass's actions did (for the invariants).
#[derive(Clone, Copy, Debug, Default)]
struct PassCounts {
    rot_before: usize,
    serving_before: usize,
    rot_permitted: usize,
    serving_removed: usize,
    serving_permitted: usize,
    permitted: usize,
    launched: usize,
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
        let mut fleet = drover_model::parse_fleet(TEMPLATE, FILE).expect("the template parses");
        let template = fleet.services.swap_remove("s").expect("service s");
        fleet.services.clear();
        fleet.regions.clear();
        let revision = Revision {
            number: 1,
            applied_at_ms: 0,
            file: FILE.into(),
            summary: "the simulated fleet".into(),
            toml: String::new(),
            fleet,
            last_applied: None,
        };
        let mut world = World {
            revision: Some(revision.clone()),
            ..World::default()
        };
        world.instances.set_silent_after(cfg.silent_after_ms);
        Sim {
            cfg,
            rng: SplitMix64::new(seed),
            now: 0,
            world,
            store: Store {
                revision: Some(revision),
                ..Store::default()
            },
            template,
            versions: 1,
            groups: Vec::new(),
            group_index: HashMap::new(),
            agents: Vec::new(),
            agent_index: AgentIndex::default(),
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
        assert!(self.groups.is_empty(), "set the clock before adding groups");
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

    /// The server's world.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// What the group controller knows of `group` now: [`World::spec`].
    pub fn spec(&self, group: &str) -> GroupSpec {
        self.world.spec(self.group(group))
    }

    /// The server's view of every instance (by id).
    pub fn views(&self) -> Vec<InstanceView> {
        self.world.views()
    }

    fn group(&self, group: &str) -> &Group {
        self.world
            .groups
            .get(group)
            .unwrap_or_else(|| panic!("no group {group} in the simulation"))
    }

    fn fleet(&self) -> &Fleet {
        self.world.fleet().expect("the simulated fleet")
    }

    /// Change the fleet revision in place (the simulation's setup, not a change planned
    /// for the groups: no plan changes).
    fn edit_fleet(&mut self, f: impl FnOnce(&mut Fleet)) {
        let rev = self.world.revision.as_mut().expect("the simulated fleet");
        f(&mut rev.fleet);
        self.store.revision = Some(rev.clone());
    }

    /// Add a group already running `spec.desired` healthy instances on `spec.generation`
    /// (launched, booted and healthy long enough to count as ready).
    pub fn add_group(&mut self, spec: GroupSpec) {
        let n = spec.desired;
        let g = self.add_empty_group(spec);
        if let Some(asg) = &mut self.groups[g].asg {
            asg.capacity = i64::from(n);
        }
        let gid = self.groups[g].name.clone();
        let generation = self.world.groups[&gid].record.generation;
        let since = self.now.saturating_sub(600_000);
        for _ in 0..n {
            let id = self
                .launch_at(g, generation, true, since, since)
                .expect("a launch of a new group");
            let mut i = self.world.instances.get_mut(&id).expect("launched");
            i.soft.health = Health::Healthy { since_ms: since };
            i.soft.ever_healthy = true;
            i.soft.reporting = true;
            i.soft.last_seen_ms = self.now;
            drop(i);
            let k = self.agent_index.get(&id).expect("its agent");
            self.agents[k].boot_at = since;
        }
    }

    /// Add a group with no instance: the controller launches them. The group is region
    /// `REGION` of service `SERVICE` (`spec.group` = `SERVICE/REGION`) in the fleet
    /// revision: the spec's rollout, `replace_unhealthy_after` and provider (`aws` with
    /// `provider_replaces_leavers`, else `sim`) become the service's and the region's, and
    /// the world's own spec of the group must say what `spec` says (a knob a fleet cannot
    /// express is refused).
    pub fn add_empty_group(&mut self, spec: GroupSpec) -> usize {
        assert!(
            !self.group_index.contains_key(&spec.group),
            "group {} added twice",
            spec.group
        );
        let gid = spec.group.clone();
        let (service, region) = (GroupId::service_of(&gid), GroupId::region_of(&gid));
        assert!(!region.is_empty(), "a group is named SERVICE/REGION: {gid}");
        let provider = if spec.provider_replaces_leavers {
            assert_eq!(
                spec.rollout.max_surge, 0,
                "{gid}: a provider replaces leavers only without surge (an `aws` group whose \
                 rollout has max_surge = 0)"
            );
            ProviderKind::Aws
        } else {
            ProviderKind::Sim
        };
        let template = self.template.clone();
        let desired = spec.desired;
        self.edit_fleet(|fleet| {
            match fleet.regions.get(region) {
                Some(r) => assert_eq!(
                    r.provider, provider,
                    "{gid}: region {region} has one provider"
                ),
                None => {
                    let mut r = drover_model::parse_fleet(TEMPLATE, FILE)
                        .expect("the template parses")
                        .regions
                        .swap_remove("r")
                        .expect("region r");
                    r.provider = provider;
                    fleet.regions.insert(region.to_string(), r);
                }
            }
            let svc = fleet
                .services
                .entry(service.to_string())
                .or_insert_with(|| Service {
                    regions: Vec::new(),
                    capacity: Capacity {
                        min: 0,
                        desired,
                        max: drover_model::validate::MAX_GROUP_SIZE,
                    },
                    rollout: spec.rollout.clone(),
                    replace_unhealthy_after: Dur::from_millis(spec.replace_unhealthy_after_ms),
                    ..template
                });
            svc.regions.push(region.to_string());
        });
        let fleet = self.fleet();
        let svc = &fleet.services[service];
        let mut plan = drover_model::plan::plan_for(fleet, service, svc, region);
        plan.generation = spec.generation;
        plan.revision = self.world.revision.as_ref().map_or(0, |r| r.number);
        let record = GroupRecord {
            group: gid.clone(),
            desired: spec.desired,
            desired_reason: format!("fleet file ({FILE})"),
            generation: spec.generation,
            rollout: RolloutRecord {
                since_ms: spec.generation_since_ms,
                open: spec.rollout_open,
                good_generation: spec.generation,
                paused: spec.paused,
                resumed_ms: spec.resumed_ms,
                ..RolloutRecord::default()
            },
        };
        self.store.plan(plan.clone());
        self.store.commit(vec![Record::Group(record.clone())]);
        self.world.groups.insert(
            gid.clone(),
            Group {
                record,
                plan,
                provider: provider.as_str().to_string(),
                ingress: None,
            },
        );
        same_spec(&spec, &self.spec(&gid));
        let g = self.groups.len();
        self.group_index.insert(gid.clone(), g);
        self.groups.push(GroupState {
            name: gid,
            load_factor: 1.0,
            desired_series: vec![(self.now, spec.desired)],
            asg: spec.provider_replaces_leavers.then(Asg::default),
            touched: true,
            ..GroupState::default()
        });
        g
    }

    /// A new component version, for a deploy.
    fn next_version(&mut self) -> String {
        self.versions += 1;
        format!("v{}", self.versions)
    }

    /// The fleet with `service`'s component at `version`.
    fn fleet_with_version(&self, service: &str, version: &str) -> Fleet {
        let mut fleet = self.fleet().clone();
        let svc = fleet
            .services
            .get_mut(service)
            .unwrap_or_else(|| panic!("no service {service}"));
        for c in svc.components.values_mut() {
            c.version = version.to_string();
        }
        fleet
    }

    /// Deploy a good new version to `group` now (`drover deploy SERVICE app VERSION`, with
    /// `--region` when its service has other regions). Returns the new generation.
    pub fn deploy(&mut self, group: &str) -> u64 {
        let g = self.group_idx(group);
        self.deploy_version(g, None)
    }

    /// Deploy a version whose instances never turn healthy. Returns the new generation.
    pub fn deploy_broken(&mut self, group: &str, mode: FailMode) -> u64 {
        let g = self.group_idx(group);
        self.deploy_version(g, Some(mode))
    }

    fn deploy_version(&mut self, g: usize, broken: Option<FailMode>) -> u64 {
        let gid = self.groups[g].name.clone();
        let service = GroupId::service_of(&gid).to_string();
        let version = self.next_version();
        if let Some(m) = broken {
            self.groups[g].broken.insert(version.clone(), m);
        }
        let fleet = self.fleet_with_version(&service, &version);
        let only = if fleet.services[&service].regions.len() > 1 {
            vec![gid.clone()]
        } else {
            Vec::new()
        };
        let plan = self.apply(
            Origin::Deploy {
                why: format!("deploy {service} app {version}"),
                only,
            },
            fleet,
        );
        assert!(
            plan.new_plans.iter().any(|p| p.group().0 == gid),
            "the deploy gave {gid} no new generation: {:?}",
            plan.plan_changes
        );
        self.world.groups[&gid].record.generation
    }

    /// A change of desired state, as the server's apply carries it out: planned by
    /// [`change::plan`] from the world as it finds it, stored (new plans, group records,
    /// revision), then taken into the world.
    pub(crate) fn apply(&mut self, origin: Origin, fleet: Fleet) -> ChangePlan {
        let now = self.now;
        let current = self.world.revision.as_ref().map_or(0, |r| r.number);
        let plan = {
            let w = &self.world;
            let before = change::Situation {
                fleet: w.fleet(),
                revision: current,
                last_applied: None,
                groups: w
                    .groups
                    .iter()
                    .map(|(k, g)| (k.clone(), g.before()))
                    .collect(),
                unused_generation: BTreeMap::new(),
                boot_ms: w.observed_boot_ms(),
                once: &w.once,
            };
            change::plan(
                &before,
                &change::Request {
                    origin: &origin,
                    file: FILE,
                    force_file: false,
                    fleet: &fleet,
                    drift: Vec::new(),
                },
                now,
            )
        };
        if plan.commit == Commit::Nothing {
            return plan;
        }
        let groups: BTreeMap<String, Group> = plan
            .groups
            .iter()
            .map(|(gid, pg)| (gid.clone(), Group::planned(gid, pg, &fleet)))
            .collect();
        let mut commits: Vec<Record> = plan
            .applied_event()
            .into_iter()
            .map(Record::Event)
            .collect();
        for p in &plan.new_plans {
            self.store.plan(p.clone());
        }
        commits.extend(groups.values().map(|g| Record::Group(g.record.clone())));
        commits.extend(plan.events.iter().cloned().map(Record::Event));
        self.store.commit(commits);
        let revision = match plan.commit {
            Commit::Revision { number } => Some(Revision {
                number,
                applied_at_ms: now,
                file: FILE.into(),
                summary: plan.summary.clone(),
                toml: String::new(),
                fleet,
                last_applied: None,
            }),
            _ => None,
        };
        if let Some(rev) = &revision {
            self.store.revision = Some(rev.clone());
        }
        self.world
            .take_applied(revision, groups, &plan.file_scaled, now);
        self.groups.iter_mut().for_each(|st| st.touched = true);
        plan
    }

    /// Store a step's records, then take its memory ([`World::accept`]).
    fn commit(&mut self, change: Change) {
        self.store.commit(change.commits);
        self.world.accept(change.staged);
    }

    /// Record the desired counts a step changes (before it is taken).
    fn record_scaling(&mut self, staged: &Staged, by: ScaledBy) {
        let now = self.now;
        for rec in &staged.records {
            let Some(&g) = self.group_index.get(&rec.group) else {
                continue;
            };
            let from = self.world.groups[&rec.group].record.desired;
            let st = &mut self.groups[g];
            st.touched = true;
            st.scale_events.push(ScaleEvent {
                at_ms: now,
                from,
                to: rec.desired,
                by,
                reason: rec.desired_reason.clone(),
            });
            if rec.desired != from {
                st.desired_series.push((now, rec.desired));
            }
        }
    }

    /// Write the desired count now, without telling the autoscaler (see [`Sim::scale`]): a
    /// raw write of the group's record, which no server command does.
    pub fn set_desired(&mut self, group: &str, desired: u32) {
        let mut change = Change::default();
        let record = &self.group(group).record;
        change.set_desired(record, record.desired, desired, "set_desired");
        self.record_scaling(&change.staged, ScaledBy::SetDesired);
        self.commit(change);
    }

    /// Give `group`'s service an autoscale policy between `min` and `max` (its capacity
    /// range). The metric comes from the group's load model ([`Sim::set_load`]); without one,
    /// agents report no reading and the autoscaler has no data.
    pub fn set_autoscale(&mut self, group: &str, policy: Autoscale, min: u32, max: u32) {
        assert!(min <= max, "min {min} > max {max}");
        let g = self.group_idx(group);
        self.groups[g].custom_metric = policy.custom_name().map(String::from);
        let service = GroupId::service_of(group).to_string();
        self.edit_fleet(|f| {
            let svc = f.services.get_mut(&service).expect("the group's service");
            svc.autoscale = Some(policy);
            svc.capacity.min = min;
            svc.capacity.max = max;
        });
    }

    /// Give `group`'s service `service` (in its region) the fleet file's schedules,
    /// raising its capacity range `base_min..base_max` (the service's `capacity`).
    pub fn set_schedules(
        &mut self,
        group: &str,
        service: &str,
        base_min: u32,
        base_max: u32,
        file: Vec<Schedule>,
    ) {
        assert_eq!(
            GroupId::service_of(group),
            service,
            "{group} is a group of another service"
        );
        self.group_idx(group);
        let service = service.to_string();
        self.edit_fleet(|f| {
            let svc = f.services.get_mut(&service).expect("the group's service");
            svc.capacity.min = base_min;
            svc.capacity.max = base_max;
            svc.schedule = file;
        });
    }

    /// A one-off scheduled change (`drover scale SERVICE N --at ... --for ...`) for `group`'s
    /// service (its id and creation time are the server's: [`World::plan_schedule_once`]),
    /// stored and kept as the server does.
    pub fn schedule_once(&mut self, group: &str, once: ScheduledScale) {
        self.group_idx(group);
        let req = ScheduleRequest {
            service: once.service,
            region: once.region,
            desired: once.desired,
            start_ms: once.start_ms,
            end_ms: once.end_ms,
            timezone: Some(once.timezone),
        };
        let (once, records) = self
            .world
            .plan_schedule_once(&req, self.now)
            .unwrap_or_else(|e| panic!("schedule refused: {e}"));
        self.store.commit(records);
        self.world.keep_schedule(once);
    }

    /// Every `schedule` event of `group`: (time, message).
    pub fn schedule_notes(&self, group: &str) -> &[(u64, String)] {
        &self.groups[self.group_idx(group)].notes
    }

    /// The server's schedule pass: [`World::schedule_step`], stored, then taken.
    fn schedule_pass(&mut self) {
        let now = self.now;
        let change = self.world.schedule_step(now);
        for r in &change.commits {
            if let Record::Event(e) = r {
                let g = e.group.as_deref().and_then(|g| self.group_index.get(g));
                if let (EventKind::Schedule, Some(&g)) = (e.kind, g) {
                    self.groups[g].notes.push((now, e.message.clone()));
                }
            }
        }
        self.record_scaling(&change.staged, ScaledBy::Schedule);
        self.commit(change);
    }

    /// The total load `group` receives from now on (see [`LoadModel`]).
    pub fn set_load(&mut self, group: &str, load: LoadModel) {
        let g = self.group_idx(group);
        self.groups[g].load = Some(load);
    }

    /// `drover scale SERVICE N --region REGION` of `group` at `at_ms` (now if `at_ms` is not
    /// in the future): sets the desired count and tells the autoscaler, which goes on from
    /// the new count ([`AutoscaleState::manual`], as the server's `scale` does). Refuses a
    /// count outside the group's range now, like the server; a count a schedule's bounds
    /// clamp is kept clamped.
    pub fn scale(&mut self, group: &str, desired: u32, at_ms: u64) -> Result<(), String> {
        let g = self.group_idx(group);
        if at_ms <= self.now {
            return self.manual_scale(g, desired);
        }
        let grp = self.group(group);
        if !self.world.has_schedules(grp) {
            let b = self.world.bounds(grp, self.now);
            drover_control::schedule::manual(
                desired,
                GroupId::service_of(group),
                &b,
                &mut Default::default(),
            )?;
        }
        self.inject(
            at_ms,
            Fault::Scale {
                group: group.to_string(),
                desired,
            },
        );
        Ok(())
    }

    /// The server's `scale` of one group now ([`World::plan_scale`], for its region).
    fn manual_scale(&mut self, g: usize, desired: u32) -> Result<(), String> {
        let gid = self.groups[g].name.clone();
        let (service, region) = (GroupId::service_of(&gid), GroupId::region_of(&gid));
        let svc = &self.fleet().services[service];
        let req = ScaleRequest {
            service: service.to_string(),
            region: Some(region.to_string()),
            desired,
        };
        let (change, _) = self.world.plan_scale(svc, &req, self.now)?;
        self.record_scaling(&change.staged, ScaledBy::Manual);
        self.commit(change);
        Ok(())
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
        self.world.autoscale.get(group)
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
        let g = self.group(group);
        if g.record.rollout.open {
            return false;
        }
        let t = self.timing();
        let mut n = 0u32;
        for v in self.world.instances.group_views(group) {
            if v.phase != Phase::Active
                || v.generation != g.record.generation
                || !in_rotation(v, self.now, &t)
            {
                return false;
            }
            n += 1;
        }
        n == g.record.desired
    }

    /// Whether every group has converged.
    pub fn all_converged(&self) -> bool {
        self.groups.iter().all(|s| self.converged(&s.name))
    }

    pub fn group_status(&self, group: &str) -> GroupStatus {
        let spec = self.spec(group);
        let t = self.timing();
        let mut s = GroupStatus {
            desired: spec.desired,
            generation: spec.generation,
            rollout_open: spec.rollout_open,
            floor: spec.desired.saturating_sub(spec.rollout.max_unavailable) as usize,
            ..GroupStatus::default()
        };
        for v in self.world.instances.group_views(group) {
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
            if self.serving(v) {
                s.serving += 1;
            }
        }
        s
    }

    fn timing(&self) -> Timing {
        Timing {
            silent_after_ms: self.cfg.silent_after_ms,
            leave_within_ms: drover_control::group::leave_within_ms(
                cw::DEFAULT_DRAIN_MS,
                LEAVER_STOP_GRACE_MS,
            ),
        }
    }

    fn group_idx(&self, group: &str) -> usize {
        *self
            .group_index
            .get(group)
            .unwrap_or_else(|| panic!("no group {group} in the simulation"))
    }

    fn agent(&self, id: &str) -> Option<&Agent> {
        self.agent_index.get(id).map(|k| &self.agents[k])
    }

    /// Really serves: Active, alive, booted (even if its agent went silent).
    fn serving(&self, v: &InstanceView) -> bool {
        v.phase == Phase::Active
            && v.alive
            && self
                .agent(&v.id)
                .is_some_and(|a| a.exit_at.is_none() && a.healthy_at(self.now))
    }

    /// A launch of group `g` on `generation` as the server makes it (numbered by
    /// [`World::begin_launch`], its records by [`World::launched`], taken by
    /// [`World::adopt`]) on the group's simulated provider: its machine started at
    /// `started` (now, or earlier when the launch claims an instance the provider started),
    /// launched at `at`; unless `good`, its fate follows the group's faults. Returns its id.
    fn launch_at(
        &mut self,
        g: usize,
        generation: u64,
        good: bool,
        started: u64,
        at: u64,
    ) -> Option<String> {
        let gid = self.groups[g].name.clone();
        let ticket = self.world.begin_launch(&gid, generation)?;
        let plan: Plan = match &ticket.plan {
            Some(p) => p.clone(),
            None => self
                .store
                .plan_of(&gid, generation)
                .unwrap_or_else(|| panic!("no plan generation {generation} of {gid} stored"))
                .clone(),
        };
        self.store.commit(vec![Record::Counter {
            name: "instance_seq".into(),
            value: ticket.seq,
        }]);
        let seq = ticket.seq;
        let launched = Launched {
            id: ticket.instance.clone(),
            addr: std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                10,
                (seq >> 16) as u8,
                (seq >> 8) as u8,
                seq as u8,
            )),
            provider_id: format!("{}-{seq}", self.world.groups[&gid].provider),
            own_token: false,
        };
        let (rec, records) = World::launched(&ticket, &plan, &launched, at);
        self.store.commit(records);
        self.world.adopt(rec, true, at);
        self.new_agent(g, &launched, generation, &plan, good, started);
        Some(launched.id)
    }

    /// The simulated instance and agent of a launch.
    fn new_agent(
        &mut self,
        g: usize,
        launched: &Launched,
        generation: u64,
        plan: &Plan,
        good: bool,
        started: u64,
    ) {
        let now = self.now;
        let version = plan
            .components
            .first()
            .map(|c| c.version.clone())
            .unwrap_or_default();
        let st = &self.groups[g];
        let fails = if good {
            None
        } else if let Some(m) = st.broken.get(&version) {
            Some(*m)
        } else if let Some((fraction, m)) = st.boot_failures {
            (self.rng.unit() < fraction).then_some(m)
        } else {
            None
        };
        let degraded = self.groups[g].degraded.contains(&version);
        let bias = self.metric_bias(g);
        let boot_at = started + self.cfg.boot_ms + self.rng.below(self.cfg.boot_jitter_ms + 1);
        let next_heartbeat = now + 1 + self.rng.below(self.cfg.heartbeat_ms);
        let exit_at = (fails == Some(FailMode::Crash)).then_some(now + self.cfg.crash_ms);
        let hb = Heartbeat {
            instance: launched.id.clone(),
            group: self.groups[g].name.clone(),
            generation,
            addr: launched.addr.to_string(),
            phase: AgentPhase::Running,
            seq: 0,
            components: plan
                .components
                .iter()
                .map(|c| ComponentReport {
                    name: c.name.clone(),
                    version: c.version.clone(),
                    state: ComponentState::Starting,
                    pid: None,
                    restarts: 0,
                    last_exit: None,
                    message: None,
                    last_output: None,
                })
                .collect(),
            utilization: Utilization::default(),
            drained: None,
        };
        self.agent_index.insert(&launched.id, self.agents.len());
        self.agents.push(Agent {
            id: launched.id.clone(),
            group: g,
            boot_at,
            fails,
            silenced: false,
            exit_at,
            ended: false,
            next_heartbeat,
            in_rotation: false,
            keeps_capacity: false,
            ignores_permit: false,
            leaving: false,
            bias,
            degraded,
            hb,
        });
    }

    /// The agent of an instance the server forgot is gone too.
    fn remove_agent(&mut self, id: &str) {
        let Some(k) = self.agent_index.remove(id) else {
            return;
        };
        self.agents.swap_remove(k);
        if let Some(moved) = self.agents.get(k) {
            self.agent_index.insert(&moved.id, k);
        }
    }

    /// Running instances of group `g` that really serve, in a PRNG-picked order.
    fn pick_serving(&mut self, g: usize, count: usize) -> Vec<usize> {
        let gid = &self.groups[g].name;
        let mut pool: Vec<usize> = self
            .world
            .instances
            .group_views(gid)
            .filter(|v| self.serving(v))
            .filter_map(|v| self.agent_index.get(&v.id))
            .filter(|&k| !self.agents[k].silenced)
            .collect();
        pool.sort_unstable();
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
                for k in self.pick_serving(g, count) {
                    self.agents[k].silenced = true;
                }
            }
            Fault::Kill { group, count } => {
                let g = self.group_idx(&group);
                for k in self.pick_serving(g, count) {
                    self.agents[k].exit_at = Some(self.now);
                }
            }
            Fault::IgnorePermits { group, count } => {
                let g = self.group_idx(&group);
                for k in self.pick_serving(g, count) {
                    self.agents[k].ignores_permit = true;
                }
            }
            Fault::KillInstance { instance } => {
                if let Some(k) = self.agent_index.get(&instance) {
                    self.agents[k].exit_at = Some(self.now);
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
                // Clamped to the bounds of now (a schedule may hold them); refused outside
                // the range, as when it was asked.
                let _ = self.manual_scale(g, desired);
            }
        }
    }

    /// What the server does when it starts again: the world is rebuilt from the store
    /// ([`World::restore`]: records, plans, the revision, counters; the provider adopts the
    /// instances still running), and the API answers at once ([`World::api_ready`]); soft
    /// state (health, launch backoff, the autoscaler's memory, canary windows) comes back
    /// from heartbeats.
    pub fn restart_server(&mut self) {
        self.stats.restarts += 1;
        let now = self.now;
        let (agents, index) = (&self.agents, &self.agent_index);
        let running = |id: &str| index.get(id).is_some_and(|k| !agents[k].ended);
        self.world = self.store.restore(running, self.cfg.silent_after_ms, now);
        self.world.api_ready(now);
    }

    /// Heartbeats and exits up to now.
    fn advance_agents(&mut self) {
        let now = self.now;
        let period = self.cfg.heartbeat_ms;
        // Instances that ended at this step: their group, whether the capacity stays.
        let mut ended: Vec<(usize, bool)> = Vec::new();
        for st in &mut self.groups {
            let r = &self.world.groups[&st.name].record.rollout;
            st.baking = r.open && r.canary_baking_ms > 0 && !r.canary_passed;
        }
        for k in 0..self.agents.len() {
            if self.agents[k].ended {
                continue;
            }
            while self.agents[k].next_heartbeat <= now {
                let a = &mut self.agents[k];
                let h = a.next_heartbeat;
                a.next_heartbeat += period;
                if a.exit_at.is_some_and(|e| h >= e) {
                    break;
                }
                if a.silenced {
                    continue;
                }
                self.heartbeat(k, h);
            }
            let a = &self.agents[k];
            if a.exit_at.is_some_and(|e| e <= now) {
                // The provider saw it end. An Auto Scaling group replaces what dies or
                // leaves keeping its capacity; what the server terminated or what left
                // lowering it goes with its capacity.
                let keeps = match self.world.instances.get(&a.id).map(|i| i.record.lifecycle) {
                    Some(Lifecycle::Active) => true,
                    Some(Lifecycle::Draining) => a.keeps_capacity,
                    _ => false,
                };
                ended.push((a.group, keeps));
                let id = a.id.clone();
                self.agents[k].ended = true;
                self.world.exited(&id);
            }
        }
        for (g, keeps) in ended {
            let generation = self.world.groups[&self.groups[g].name].record.generation;
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

    /// Agent `k`'s heartbeat at `h`, absorbed by the world ([`World::heartbeat`]): its
    /// health, the autoscaling metric its load gives (no reading without a load model), and
    /// its service's noisy metric (drawn only while the server keeps a canary window for it:
    /// nothing else reads it).
    fn heartbeat(&mut self, k: usize, h: u64) {
        let g = self.agents[k].group;
        let st = &self.groups[g];
        let a = &self.agents[k];
        let (base, noise) = match &st.load {
            Some(load) => (
                if a.in_rotation && st.in_rotation > 0 {
                    load.load_at(h) * st.load_factor / st.in_rotation as f64 / load.capacity
                } else {
                    0.0
                },
                load.instance_noise,
            ),
            // Nothing to read: a value the autoscaler does not take.
            None => (f64::NAN, 0.0),
        };
        let metric = if noise > 0.0 {
            base * (1.0 + noise * (2.0 * self.rng.unit() - 1.0))
        } else {
            base
        };
        let noisy = st
            .service
            .and_then(|s| self.services[s].spec.metric.as_ref());
        let windowed = noisy.is_some()
            && st.baking
            && self
                .world
                .instances
                .get(&a.id)
                .is_some_and(|i| i.soft.window.is_some());
        let reading = match noisy {
            Some(m) if windowed => {
                let mean = if a.degraded { m.bad } else { m.good };
                Some((mean + a.bias + m.sample_sd * self.rng.normal()).max(0.0))
            }
            _ => None,
        };
        let a = &mut self.agents[k];
        let healthy = a.healthy_at(h);
        let hb = &mut a.hb;
        hb.seq += 1;
        hb.phase = if a.leaving {
            AgentPhase::Draining
        } else {
            AgentPhase::Running
        };
        for c in &mut hb.components {
            c.state = if healthy {
                ComponentState::Healthy
            } else {
                ComponentState::Starting
            };
        }
        let u = &mut hb.utilization;
        match &st.custom_metric {
            Some(name) => set_custom(&mut u.custom, name, Some(metric)),
            None => u.cpu = metric,
        }
        if let Some(m) = noisy {
            set_custom(&mut u.custom, &m.name, reading);
        }
        let id = hb.instance.clone();
        match self.world.heartbeat(hb.clone(), h) {
            Ok(step) => self.store.events += step.events.len() as u64,
            Err(_) => panic!("{id} heartbeats for another group"),
        }
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
        let Sim {
            world,
            groups,
            agents,
            agent_index,
            rng,
            ..
        } = self;
        for st in groups.iter_mut() {
            st.in_rotation = 0;
            if st.load.is_none() {
                continue;
            }
            for v in world.instances.group_views(&st.name) {
                let Some(k) = agent_index.get(&v.id) else {
                    continue;
                };
                let r = in_rotation(v, now, &t);
                agents[k].in_rotation = r;
                st.in_rotation += usize::from(r);
            }
        }
        for st in groups.iter_mut() {
            st.load_factor = match &st.load {
                Some(l) if l.load_noise > 0.0 => 1.0 + l.load_noise * (2.0 * rng.unit() - 1.0),
                _ => 1.0,
            };
        }
    }

    /// The server's autoscale pass ([`World::autoscale_step`]), with the invariants on what
    /// it decides and one trace point per autoscaled group.
    fn autoscale_pass(&mut self) {
        let (now, t) = (self.now, self.timing());
        // What it sees: the samples that count, in rotation.
        let mut seen = Vec::new();
        for (g, st) in self.groups.iter().enumerate() {
            let grp = &self.world.groups[&st.name];
            let Some(policy) = self.world.service(grp).and_then(|s| s.autoscale.as_ref()) else {
                continue;
            };
            let measured = self.world.samples(grp, policy, now).0.len();
            let rot = self
                .world
                .instances
                .group_views(&st.name)
                .filter(|v| in_rotation(v, now, &t))
                .count();
            seen.push((g, measured, rot));
        }
        let change = self.world.autoscale_step(now);
        if self.cfg.check_invariants {
            for rec in &change.staged.records {
                let grp = &self.world.groups[&rec.group];
                let bounds = self.world.bounds(grp, now);
                let (min, max) = (bounds.min, bounds.max);
                let (from, to) = (grp.record.desired, rec.desired);
                if to < min || to > max {
                    self.violation(
                        4,
                        &rec.group,
                        format!("autoscaler set desired {to} outside {min}..{max}"),
                    );
                }
                if to < from && grp.record.rollout.open {
                    self.violation(
                        5,
                        &rec.group,
                        format!(
                            "autoscaler scaled in {from} -> {to} during a rollout ({})",
                            rec.desired_reason
                        ),
                    );
                }
            }
        }
        self.record_scaling(&change.staged, ScaledBy::Autoscaler);
        self.commit(change);
        for (g, measured, rot) in seen {
            let st = &self.groups[g];
            let rec = &self.world.groups[&st.name].record;
            let state = self.world.autoscale.get(&st.name);
            let (load, per_instance) = match &st.load {
                Some(l) => {
                    let load = l.load_at(now);
                    (load, (rot > 0).then(|| load / rot as f64 / l.capacity))
                }
                None => (0.0, None),
            };
            let point = AutoscalePoint {
                at_ms: now,
                load,
                per_instance,
                observed: state.and_then(|s| s.last_observed),
                measured,
                in_rotation: rot,
                recommended: state.and_then(|s| s.last_recommended),
                desired: rec.desired,
                rollout_open: rec.rollout.open,
            };
            self.groups[g].trace.push(point);
        }
    }

    /// One step: the faults due, the agents, then the server's tick.
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
        self.tick();
        self.count_after();
    }

    /// The server's tick (`Engine::tick`): schedules, autoscaling, up to three controller
    /// passes (a pass that lets instances go frees room: the next launches their
    /// replacements at once), the targets published, then the waves.
    fn tick(&mut self) {
        let (now, t) = (self.now, self.timing());
        self.schedule_pass();
        self.autoscale_pass();
        let mut passes = drover_control::world::TickPasses::default();
        while passes.wants_pass() {
            let decision = self.reconcile(now, &t);
            let step = passes.take(decision);
            if let Some(suspect) = step.suspect {
                let events = self.world.note_suspicion(&suspect);
                self.store.events += events.len() as u64;
            }
            self.act_on(step.actions);
        }
        let targets = passes.targets();
        let (_, events) = self.world.publish(targets);
        self.store.events += events.len() as u64;
        self.release_waves();
    }

    /// One controller pass ([`World::reconcile_due`]), its decision hashed.
    fn reconcile(&mut self, now: u64, t: &Timing) -> Decision {
        let pass = self.world.reconcile_due(now, t);
        self.stats.decision_hash = hash_decision(self.stats.decision_hash, now, &pass.decision);
        pass.decision
    }

    /// Carry out one pass's actions as the server does, checking invariants 1 to 3.
    fn act_on(&mut self, actions: Vec<Action>) {
        if actions.is_empty() {
            return;
        }
        let (now, t) = (self.now, self.timing());
        // Before the actions: per group concerned, in rotation (server's view) and serving
        // (truth).
        let mut counts: BTreeMap<String, PassCounts> = BTreeMap::new();
        for a in &actions {
            let group = match a {
                Action::Launch { group, .. } => Some(group.clone()),
                Action::Forget { instance, .. }
                | Action::Terminate { instance, .. }
                | Action::Permit { instance, .. } => self
                    .world
                    .instances
                    .get(instance)
                    .map(|i| i.record.group.clone()),
                _ => None,
            };
            let Some(group) = group.filter(|g| !counts.contains_key(g)) else {
                continue;
            };
            let mut c = PassCounts::default();
            for v in self.world.instances.group_views(&group) {
                c.rot_before += usize::from(in_rotation(v, now, &t));
                c.serving_before += usize::from(self.serving(v));
            }
            counts.insert(group, c);
        }
        for action in actions {
            match action {
                Action::CanaryBaking { group, generation } => {
                    self.canary_baking(&group, generation)
                }
                Action::CanaryAnalyse { group, generation } => {
                    self.canary_analyse(&group, generation)
                }
                Action::RolloutDone { group, generation } => self.rollout_done(&group, generation),
                Action::RolloutFailed {
                    group,
                    generation,
                    reason,
                    instance,
                } => self.rollout_failed(&group, generation, &reason, instance.as_deref()),
                Action::Forget { ref instance, .. } => {
                    let Some(i) = self.world.instances.get(instance) else {
                        continue;
                    };
                    match i.record.lifecycle {
                        Lifecycle::Active => self.stats.died += 1,
                        Lifecycle::Draining => self.stats.left_by_permit += 1,
                        Lifecycle::Terminating => self.stats.left_by_terminate += 1,
                    }
                    self.carry_out(&action);
                }
                Action::Terminate {
                    ref instance,
                    ref reason,
                } => {
                    let Some(v) = self.world.instances.get(instance).map(cw::view) else {
                        continue;
                    };
                    let spec = self.spec(&v.group);
                    let a = self.agent(instance).expect("an agent per instance");
                    // Invariant 1: Terminate only what is broken, silent or never healthy.
                    let overstayed = v.phase == Phase::Draining
                        && v.permit_at_ms
                            .is_some_and(|at| now.saturating_sub(at) >= spec.leave_within_ms);
                    if overstayed {
                        self.stats.terminated_overstayed += 1;
                    } else if a.silenced {
                        self.stats.terminated_silent += 1;
                    } else if !a.healthy_at(now) {
                        self.stats.terminated_never_healthy += 1;
                    } else if self.cfg.check_invariants {
                        let stale = v.generation < spec.generation;
                        self.violation(
                            1,
                            &v.group,
                            format!(
                                "Terminate of {instance} ({}generation {}), which is healthy and \
                                 heartbeating (controller's reason: {reason}); only a permit may \
                                 take a healthy instance away",
                                if stale { "stale, " } else { "" },
                                v.generation
                            ),
                        );
                    }
                    if self.serving(&v) {
                        if let Some(c) = counts.get_mut(&v.group) {
                            c.serving_removed += 1;
                        }
                    }
                    self.carry_out(&action);
                }
                Action::Permit { ref instance, .. } => {
                    let Some(v) = self.world.instances.get(instance).map(cw::view) else {
                        continue;
                    };
                    self.stats.permits += 1;
                    if self.agent(instance).is_some_and(|a| a.silenced) {
                        self.stats.permitted_silent += 1;
                    }
                    let serving = self.serving(&v);
                    if let Some(c) = counts.get_mut(&v.group) {
                        c.permitted += 1;
                        c.rot_permitted += usize::from(in_rotation(&v, now, &t));
                        if serving {
                            c.serving_permitted += 1;
                            c.serving_removed += 1;
                        }
                    }
                    self.carry_out(&action);
                }
                Action::Launch { ref group, .. } => {
                    self.stats.launches += 1;
                    if let Some(c) = counts.get_mut(group) {
                        c.launched += 1;
                    }
                    self.carry_out(&action);
                }
            }
        }
        for (group, c) in counts {
            self.touch(&group);
            if self.cfg.check_invariants {
                self.check_after(&group, &c);
            }
        }
    }

    /// Carry out an instance action as the server does: its effects
    /// ([`drover_control::effects::of`]) in their order, what goes to the store first (one
    /// commit), then memory, then the agents and the provider.
    fn carry_out(&mut self, action: &Action) {
        let now = self.now;
        let effects = self.world.effects_of(action, now);
        let (commits, records) = self.world.stage_effects(&effects, now);
        self.store.commit(commits);
        self.world.set_instances(records);
        for e in effects {
            match e {
                Effect::Remove { instance } => {
                    self.world.instances.remove(&instance);
                    self.remove_agent(&instance);
                }
                Effect::WakePermitPoll { instance } => self.permit_answered(&instance),
                Effect::ProviderTerminate { instance } => {
                    let stop = now + self.cfg.stop_ms;
                    if let Some(k) = self.agent_index.get(&instance) {
                        let a = &mut self.agents[k];
                        a.exit_at = Some(a.exit_at.map_or(stop, |e| e.min(stop)));
                    }
                }
                Effect::Launch { group, generation } => {
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
                    self.launch_at(g, generation, false, started, now);
                }
                // The balancer's targets follow the phases (`World::publish`).
                Effect::OutOfRotation { .. }
                | Effect::SetPhase { .. }
                | Effect::Event { .. }
                | Effect::LaunchFailed { .. } => {}
            }
        }
    }

    /// The agent's permit long-poll answers now ([`World::permit_of`]): with a permit, it
    /// drains and leaves (unless it ignores permits); on an Auto Scaling group, the permit
    /// says whether its leaving keeps the capacity.
    fn permit_answered(&mut self, instance: &str) {
        let Some(Some((decrements, _drain_ms))) = self.world.permit_of(instance) else {
            return;
        };
        let Some(k) = self.agent_index.get(instance) else {
            return;
        };
        let drained = self.now + self.cfg.drain_ms;
        let a = &mut self.agents[k];
        if a.ignores_permit || a.leaving {
            return;
        }
        a.leaving = true;
        a.exit_at = Some(a.exit_at.map_or(drained, |e| e.min(drained)));
        if self.groups[a.group].asg.is_some() {
            a.keeps_capacity = !decrements;
            if !decrements {
                self.stats.kept_capacity += 1;
            }
        }
    }

    /// `RolloutDone`, as the server carries it out ([`World::rollout_done`]).
    fn rollout_done(&mut self, group: &str, generation: u64) {
        let now = self.now;
        let Some(g) = self.world.groups.get(group) else {
            return;
        };
        let since = g.record.rollout.since_ms;
        let Some(change) = self.world.rollout_done(group, generation, now) else {
            return;
        };
        self.commit(change);
        self.stats.rollouts_done.push(RolloutEvent {
            group: group.to_string(),
            generation,
            at_ms: now,
            took_ms: now - since,
        });
    }

    /// A rollout failed, as the server carries it out ([`World::rollout_failed`]): with its
    /// service's `auto_revert`, the automatic revert ([`Sim::auto_revert`]).
    pub(crate) fn rollout_failed(
        &mut self,
        group: &str,
        generation: u64,
        reason: &str,
        instance: Option<&str>,
    ) {
        let now = self.now;
        let Some(g) = self.world.groups.get(group) else {
            return;
        };
        let since = g.record.rollout.since_ms;
        let planned = self
            .world
            .rollout_failed(group, generation, reason, instance);
        let Some((change, after)) = planned else {
            return;
        };
        self.commit(change);
        self.stats.rollouts_failed.push(RolloutEvent {
            group: group.to_string(),
            generation,
            at_ms: now,
            took_ms: now - since,
        });
        self.wave_failed(group);
        if let AfterFailure::Revert { to } = after {
            self.auto_revert(group, generation, to);
        }
    }

    /// The server's automatic revert: the group's last good versions are the service's
    /// again (a change planned by [`change::plan`]: every group of the service whose plan
    /// differs gets a new generation, the groups still held for their wave run them already).
    fn auto_revert(&mut self, group: &str, failed: u64, good: u64) {
        let Some(plan) = self.store.plan_of(group, good) else {
            return;
        };
        // The sim keeps no fleet text: the components go back by their versions.
        let back = drover_control::rollout::revert_to(plan);
        let mut fleet = self.fleet().clone();
        if let Some(svc) = fleet.services.get_mut(&back.service) {
            for (name, version) in &back.versions {
                if let Some(c) = svc.components.get_mut(name) {
                    c.version = version.clone();
                }
            }
        }
        let mut failed_map = BTreeMap::new();
        failed_map.insert(group.to_string(), failed);
        let plan = self.apply(Origin::AutoRevert { failed: failed_map }, fleet);
        self.stats.reverts += plan.new_plans.len() as u64;
    }

    /// Invariants 2 and 3 for one group after a pass's actions.
    fn check_after(&self, group: &str, c: &PassCounts) {
        let spec = self.spec(group);
        let active = self
            .world
            .instances
            .group_views(group)
            .filter(|v| v.phase == Phase::Active)
            .count();
        let floor = spec.desired.saturating_sub(spec.rollout.max_unavailable) as usize;
        // Invariant 2 (server's view): permits never take in-rotation below the floor,
        // unless it already was below and no in-rotation instance got a permit.
        if c.permitted > 0 {
            let before = c.rot_before;
            let after = before - c.rot_permitted;
            if !(after >= floor || (before < floor && c.rot_permitted == 0)) {
                self.violation(
                    2,
                    group,
                    format!(
                        "{} permit(s) ({} in rotation) took in-rotation from {before} to \
                         {after}, below the floor {floor} (desired {} - max_unavailable {})",
                        c.permitted, c.rot_permitted, spec.desired, spec.rollout.max_unavailable
                    ),
                );
            }
        }
        // Invariant 2, on the truth: a permit that takes a serving instance leaves at
        // least `floor` serving (whatever the server believes after a restart).
        if c.serving_permitted > 0 {
            let after = c.serving_before - c.serving_removed;
            if after < floor {
                self.violation(
                    2,
                    group,
                    format!(
                        "{} permit(s) of serving instances left {after} serving (was {}), \
                         below the floor {floor}",
                        c.serving_permitted, c.serving_before
                    ),
                );
            }
        }
        // Invariant 3: launches never take Active above desired + max_surge.
        let cap = spec.desired as usize + spec.rollout.max_surge as usize;
        if c.launched > 0 && active > cap {
            self.violation(
                3,
                group,
                format!(
                    "{} launch(es) took Active to {active}, above desired {} + max_surge {}",
                    c.launched, spec.desired, spec.rollout.max_surge
                ),
            );
        }
    }

    /// The stats of the step's end: Active above desired, Draining, capacity above desired
    /// (counted again in the groups whose instances or count changed at this step).
    fn count_after(&mut self) {
        for st in &mut self.groups {
            if !std::mem::take(&mut st.touched) {
                continue;
            }
            let rec = &self.world.groups[&st.name].record;
            (st.active, st.draining) = (0, 0);
            for v in self.world.instances.group_views(&st.name) {
                match v.phase {
                    Phase::Active => st.active += 1,
                    Phase::Draining => st.draining += 1,
                    Phase::Terminating => {}
                }
            }
            if let Some(asg) = &st.asg {
                let over = asg.capacity - i64::from(rec.desired);
                self.stats.max_capacity_over_desired =
                    self.stats.max_capacity_over_desired.max(over);
            }
            let over = st.active as i64 - i64::from(rec.desired);
            self.stats.max_active_over_desired = self.stats.max_active_over_desired.max(over);
        }
        let draining = self.groups.iter().map(|st| st.draining).sum();
        self.stats.max_draining = self.stats.max_draining.max(draining);
    }

    /// Count `group`'s instances again at the end of the step.
    fn touch(&mut self, group: &str) {
        if let Some(&g) = self.group_index.get(group) {
            self.groups[g].touched = true;
        }
    }
}

/// Set (or, with `None`, take out) one custom metric of a heartbeat.
fn set_custom(custom: &mut BTreeMap<String, f64>, name: &str, value: Option<f64>) {
    match (custom.get_mut(name), value) {
        (Some(v), Some(x)) => *v = x,
        (None, Some(x)) => {
            custom.insert(name.to_string(), x);
        }
        (Some(_), None) => {
            custom.remove(name);
        }
        (None, None) => {}
    }
}

/// The world's spec of a group must say what the simulation was asked for: a knob a fleet
/// cannot express (or two groups of one service asking for different rollouts) is refused.
fn same_spec(asked: &GroupSpec, derived: &GroupSpec) {
    let mut differ = Vec::new();
    macro_rules! field {
        ($($f:ident),*) => {$(
            if asked.$f != derived.$f {
                differ.push(format!(
                    "{}: asked {:?}, the fleet gives {:?}",
                    stringify!($f), asked.$f, derived.$f
                ));
            }
        )*};
    }
    field!(
        desired,
        generation,
        generation_since_ms,
        rollout_open,
        paused,
        resumed_ms,
        canary,
        rollout,
        replace_unhealthy_after_ms,
        launch_not_before_ms,
        provider_replaces_leavers,
        leave_within_ms
    );
    assert!(
        differ.is_empty(),
        "group {}: a fleet cannot express this spec (one service has one rollout and \
         replace_unhealthy_after, one region one provider): {}",
        asked.group,
        differ.join("; ")
    );
}
