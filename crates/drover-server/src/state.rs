//! The server's memory: desired state loaded from the store, and soft state (heartbeats)
//! rebuilt from agents after a restart.

use std::collections::BTreeMap;

use drover_control::{GroupSpec, Health, InstanceView, Phase};
use drover_model::api::{
    AutoscaleStatus, ComponentReport, FleetStatus, GroupStatus, Heartbeat, InstanceState,
    InstanceStatus, Revision, RolloutStatus, Utilization,
};
use drover_model::{Fleet, Plan};
use drover_store::{GroupRecord, InstanceRecord, Lifecycle};

/// One group: its stored record, its current plan and rollout bookkeeping.
#[derive(Clone, Debug)]
pub struct Group {
    pub record: GroupRecord,
    pub plan: Plan,
    pub provider: String,
    pub ingress: Option<(std::net::SocketAddr, u16)>,
}

/// What agents told us; lost on restart and rebuilt from heartbeats.
#[derive(Clone, Debug)]
pub struct Soft {
    /// Since when health has been watched: launch, or this server's start.
    pub watched_since_ms: u64,
    pub last_seen_ms: u64,
    pub health: Health,
    pub ever_healthy: bool,
    pub last_seq: u64,
    pub components: Vec<ComponentReport>,
    pub utilization: Utilization,
    pub reporting: bool,
    /// Loaded from the store at start: its first heartbeat rebuilds health without an event
    /// (a server restart is not a health change, and costs no store write per instance).
    pub restored: bool,
    /// Its agent's drain report is recorded (one `drained` event per instance).
    pub drained: bool,
    /// What it did since its group's canary bake began (none outside a bake).
    pub window: Option<Window>,
    /// How many events its heartbeats may still cause this minute.
    pub budget: EventBudget,
    /// Heard from with its own instance token: its group's token no longer speaks for it.
    pub bound: bool,
}

/// Most events one instance's heartbeats may cause per minute. A real instance changes state
/// a few times a minute at worst (a crash loop: respawned, unhealthy, healthy); more is a
/// broken or hostile agent, whose events would grow the store without bound.
pub const EVENTS_PER_INSTANCE_PER_MINUTE: u32 = 30;

/// A per-instance event budget: [`EVENTS_PER_INSTANCE_PER_MINUTE`] per minute; what is over is
/// dropped and counted, and said in one event when the next minute begins.
#[derive(Clone, Debug, Default)]
pub struct EventBudget {
    minute_start_ms: u64,
    used: u32,
    dropped: u32,
}

impl EventBudget {
    /// The events of one heartbeat that fit in the budget (in order), and, first, one that
    /// says how many were dropped in the last minute, if any.
    pub fn admit(
        &mut self,
        events: Vec<drover_model::NewEvent>,
        now_ms: u64,
        group: &str,
        instance: &str,
    ) -> Vec<drover_model::NewEvent> {
        if events.is_empty() {
            return events;
        }
        let mut out = Vec::new();
        if now_ms >= self.minute_start_ms + 60_000 {
            if self.dropped > 0 {
                out.push(
                    drover_model::NewEvent::new(
                        drover_model::EventKind::Server,
                        format!(
                            "{} events of this instance were not recorded: over {} a minute",
                            self.dropped, EVENTS_PER_INSTANCE_PER_MINUTE
                        ),
                    )
                    .group(group)
                    .instance(instance),
                );
            }
            *self = EventBudget {
                minute_start_ms: now_ms,
                used: out.len() as u32,
                dropped: 0,
            };
        }
        for e in events {
            if self.used < EVENTS_PER_INSTANCE_PER_MINUTE {
                self.used += 1;
                out.push(e);
            } else {
                self.dropped += 1;
            }
        }
        out
    }
}

/// One instance's canary-analysis window, accumulated from its heartbeats.
#[derive(Clone, Debug, Default)]
pub struct Window {
    /// Its components' restarts when the window began.
    pub restarts_at_start: u32,
    pub unhealthy: u32,
    /// Per custom metric: sum and count of the values reported.
    pub metrics: BTreeMap<String, (f64, u32)>,
    /// The balancers' connections and connect failures to it when the window began.
    pub lb_at_start: (u64, u64),
}

impl Window {
    pub fn restarts(components: &[ComponentReport]) -> u32 {
        components.iter().map(|c| c.restarts).sum()
    }
}

#[derive(Clone, Debug)]
pub struct Instance {
    pub record: InstanceRecord,
    pub soft: Soft,
    pub alive: bool,
    /// Wakes this instance's permit long-poll (and no other) when its lifecycle changes.
    pub permit_wake: std::sync::Arc<tokio::sync::Notify>,
}

/// Which instances a status lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Listing {
    /// Every instance.
    #[default]
    All,
    /// None: per-group counts only.
    None,
    /// None, but each group's instance ids (see [`State::status_of`]).
    Ids,
    /// One page (from 1) of one group's instances, by id.
    Page {
        group: String,
        page: usize,
        per_page: usize,
    },
}

/// A group's instance ids, each with whether it is in rotation ([`Listing::Ids`]).
pub type GroupIds = Vec<(String, bool)>;

/// Every state an instance can be in, in the order of [`StateCounts`].
pub const STATES: [InstanceState; 7] = [
    InstanceState::Launching,
    InstanceState::Booting,
    InstanceState::Healthy,
    InstanceState::Unhealthy,
    InstanceState::Silent,
    InstanceState::Draining,
    InstanceState::Terminating,
];

/// A group's instances by state, indexed by `InstanceState as usize`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts(pub [u32; 7]);

impl StateCounts {
    /// (state, count) of the states that have instances, in [`STATES`] order.
    pub fn nonzero(&self) -> impl Iterator<Item = (InstanceState, u32)> + '_ {
        STATES
            .iter()
            .map(|s| (*s, self.0[*s as usize]))
            .filter(|(_, n)| *n > 0)
    }

    pub fn total(&self) -> u32 {
        self.0.iter().sum()
    }
}

/// Every instance the server knows, by id, with the group controller's view of each kept up
/// to date as it changes: an insert (a launch, a restart's load), a removal (forgotten), and
/// every change through [`Instances::get_mut`] or [`Instances::for_each_mut`] (a heartbeat,
/// an exit, a new lifecycle) refresh that instance's view in place. A change that can change
/// its group's decision ([`drover_control::group::view_change_matters`]: not a heartbeat
/// that only says "still here") marks the group for the next pass ([`State::reconcile_due`]).
/// A pass reads the views of the groups it reconciles; none is built per pass.
#[derive(Default)]
pub struct Instances {
    map: BTreeMap<String, Instance>,
    /// Per group, its instances' views by id (the order `reconcile` reads them in).
    views: BTreeMap<String, BTreeMap<String, InstanceView>>,
    /// Groups with a change since their last pass.
    changed: std::collections::BTreeSet<String>,
    /// `silent_after` (a heartbeat from an instance gone silent matters).
    silent_after_ms: u64,
}

/// An instance borrowed to change it: its view is refreshed when the borrow ends.
pub struct InstanceMut<'a> {
    inst: &'a mut Instance,
    views: &'a mut BTreeMap<String, BTreeMap<String, InstanceView>>,
    changed: &'a mut std::collections::BTreeSet<String>,
    silent_after_ms: u64,
}

impl std::ops::Deref for InstanceMut<'_> {
    type Target = Instance;
    fn deref(&self) -> &Instance {
        self.inst
    }
}

impl std::ops::DerefMut for InstanceMut<'_> {
    fn deref_mut(&mut self) -> &mut Instance {
        self.inst
    }
}

impl Drop for InstanceMut<'_> {
    fn drop(&mut self) {
        refresh(self.inst, self.views, self.changed, self.silent_after_ms);
    }
}

/// Bring `i`'s view up to date; mark its group when the change matters.
fn refresh(
    i: &Instance,
    views: &mut BTreeMap<String, BTreeMap<String, InstanceView>>,
    changed: &mut std::collections::BTreeSet<String>,
    silent_after_ms: u64,
) {
    let new = view(i);
    let timing = drover_control::Timing {
        silent_after_ms,
        leave_within_ms: 0,
    };
    let matters = match views
        .get_mut(&i.record.group)
        .and_then(|g| g.get_mut(&i.record.id))
    {
        Some(old) => {
            let m = drover_control::group::view_change_matters(old, &new, &timing);
            *old = new;
            m
        }
        None => {
            views
                .entry(i.record.group.clone())
                .or_default()
                .insert(i.record.id.clone(), new);
            true
        }
    };
    if matters && !changed.contains(&i.record.group) {
        changed.insert(i.record.group.clone());
    }
}

impl Instances {
    /// `silent_after` of the server (which heartbeats matter to a pass).
    pub fn set_silent_after(&mut self, ms: u64) {
        self.silent_after_ms = ms;
    }

    pub fn get(&self, id: &str) -> Option<&Instance> {
        self.map.get(id)
    }

    /// One instance to change; its view follows when the borrow ends.
    pub fn get_mut(&mut self, id: &str) -> Option<InstanceMut<'_>> {
        let Instances {
            map,
            views,
            changed,
            silent_after_ms,
        } = self;
        map.get_mut(id).map(|inst| InstanceMut {
            inst,
            views,
            changed,
            silent_after_ms: *silent_after_ms,
        })
    }

    /// Change every instance; their views follow.
    pub fn for_each_mut(&mut self, mut f: impl FnMut(&mut Instance)) {
        for i in self.map.values_mut() {
            f(i);
            refresh(i, &mut self.views, &mut self.changed, self.silent_after_ms);
        }
    }

    pub fn insert(&mut self, id: String, inst: Instance) -> Option<Instance> {
        let old = self.remove(&id);
        refresh(
            &inst,
            &mut self.views,
            &mut self.changed,
            self.silent_after_ms,
        );
        self.map.insert(id, inst);
        old
    }

    pub fn remove(&mut self, id: &str) -> Option<Instance> {
        let old = self.map.remove(id)?;
        let group = &old.record.group;
        if let Some(g) = self.views.get_mut(group) {
            g.remove(id);
            if g.is_empty() {
                self.views.remove(group);
            }
        }
        self.changed.insert(group.clone());
        Some(old)
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.map.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn values(&self) -> impl Iterator<Item = &Instance> {
        self.map.values()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Instance)> {
        self.map.iter()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    /// The views of one group's instances, by id.
    pub fn group_views(&self, group: &str) -> impl Iterator<Item = &InstanceView> {
        self.views.get(group).into_iter().flat_map(|g| g.values())
    }

    /// The groups that have instances (in the fleet or not).
    pub fn groups(&self) -> impl Iterator<Item = &String> {
        self.views.keys()
    }

    /// The number of instances of `group`.
    pub fn count_of(&self, group: &str) -> usize {
        self.views.get(group).map_or(0, |g| g.len())
    }
}

impl std::ops::Index<&str> for Instances {
    type Output = Instance;
    fn index(&self, id: &str) -> &Instance {
        &self.map[id]
    }
}

/// What a group's last pass saw and decided ([`State::reconcile_due`]).
#[derive(Clone, Debug)]
pub struct LastPass {
    /// The spec it reconciled (a change of spec calls for a pass).
    pub spec: drover_control::GroupSpec,
    /// When its decision could next change with no input ([`drover_control::group::next_change`]).
    pub next_change: Option<u64>,
    /// It decided something: the next pass looks again (what was done changed it, or it
    /// failed and is tried again).
    pub acted: bool,
}

/// What one pass did ([`State::reconcile_due`]).
#[derive(Debug, Default)]
pub struct Pass {
    pub decision: drover_control::Decision,
    /// Groups reconciled, and the instances they hold.
    pub groups: usize,
    pub instances: usize,
}

#[derive(Default)]
pub struct State {
    pub revision: Option<Revision>,
    pub groups: BTreeMap<String, Group>,
    pub instances: Instances,
    /// Per group, its last pass (which groups the next one reconciles).
    pub last_pass: BTreeMap<String, LastPass>,
    /// Groups the self-suspicion guard holds, as their last passes said.
    pub suspect: std::collections::BTreeSet<String>,
    pub instance_seq: u64,
    /// Instances currently given to the balancer, per group.
    pub targets: BTreeMap<String, Vec<String>>,
    /// Per group, what the balancers and discovery were last given besides `targets`: the
    /// instances leaving, and the plan generation (whose ports peers see). A pass that
    /// changes none of the three gives them nothing (a pass costs what changed).
    pub published: BTreeMap<String, (Vec<String>, u64)>,
    /// Per group: instances that ended before ever turning healthy, in a row, and the time
    /// before which no new launch happens.
    pub launch_backoff: BTreeMap<String, drover_control::LaunchBackoff>,
    /// Per group: the autoscaler's memory (soft).
    pub autoscale: BTreeMap<String, drover_control::AutoscaleState>,
    /// One-off scheduled changes (stored), by id.
    pub once: Vec<drover_model::api::ScheduledScale>,
    /// Per group: what the schedule rules remember (stored as counters, [`memory_writes`]).
    pub schedule_memory: BTreeMap<String, drover_control::ScheduleMemory>,
}

const BEGAN: &str = "schedule.began.";
const ENDED: &str = "schedule.ended.";
const RESTORE: &str = "schedule.restore.";

/// The schedule rules' memory of every group, from the store's counters
/// (`schedule.began.GROUP.ID` = start of the window seen beginning, `schedule.ended.GROUP.ID`,
/// `schedule.restore.GROUP` = the count to go back to + 1, 0 for none).
pub fn memory_from_counters(
    counters: &BTreeMap<String, u64>,
) -> BTreeMap<String, drover_control::ScheduleMemory> {
    let mut out: BTreeMap<String, drover_control::ScheduleMemory> = BTreeMap::new();
    for (name, value) in counters {
        if let Some(rest) = name.strip_prefix(BEGAN) {
            if let Some((g, id)) = rest.split_once('.') {
                out.entry(g.into())
                    .or_default()
                    .began
                    .insert(id.into(), *value);
            }
        } else if let Some(rest) = name.strip_prefix(ENDED) {
            if let Some((g, id)) = rest.split_once('.') {
                out.entry(g.into())
                    .or_default()
                    .ended
                    .insert(id.into(), *value);
            }
        } else if let Some(g) = name.strip_prefix(RESTORE) {
            out.entry(g.into()).or_default().restore = value.checked_sub(1).map(|v| v as u32);
        }
    }
    out
}

/// The counters that store `group`'s memory (all of them: a memory holds a few).
pub fn memory_writes(group: &str, m: &drover_control::ScheduleMemory) -> Vec<drover_store::Write> {
    let counter = |name: String, value: u64| drover_store::Write::Counter { name, value };
    let mut w: Vec<drover_store::Write> = m
        .began
        .iter()
        .map(|(id, v)| counter(format!("{BEGAN}{group}.{id}"), *v))
        .chain(
            m.ended
                .iter()
                .map(|(id, v)| counter(format!("{ENDED}{group}.{id}"), *v)),
        )
        .collect();
    w.push(counter(
        format!("{RESTORE}{group}"),
        m.restore.map_or(0, |r| u64::from(r) + 1),
    ));
    w
}

/// Whether a group's provider replaces its stale leavers itself ("replace mode"): an `aws`
/// group (an Auto Scaling group launches a replacement for an instance that terminates without
/// lowering its capacity) whose rollout has no surge. With surge, the controller launches every
/// replacement itself, before the permits.
pub fn provider_replaces_leavers(provider: &str, rollout: &drover_model::fleet::Rollout) -> bool {
    provider == drover_model::fleet::ProviderKind::Aws.as_str() && rollout.max_surge == 0
}

/// The drain timeout of a group whose service is no longer in the fleet.
pub const DEFAULT_DRAIN_MS: u64 = 10_000;
/// The stop grace of an instance whose group's plan is unknown (the fleet file's default).
pub const DEFAULT_STOP_GRACE_MS: u64 = 10_000;

/// How long an instance of `plan` may take to stop once asked: its components' longest
/// `stop_grace`.
pub fn longest_stop_grace(plan: &drover_model::Plan) -> std::time::Duration {
    plan.components
        .iter()
        .map(|c| c.stop_grace.0)
        .max()
        .unwrap_or_default()
}

/// What the group controller knows of an instance.
/// The stored lifecycle of a controller's phase.
pub(crate) fn lifecycle_of(p: Phase) -> Lifecycle {
    match p {
        Phase::Active => Lifecycle::Active,
        Phase::Draining => Lifecycle::Draining,
        Phase::Terminating => Lifecycle::Terminating,
    }
}

/// The controller's name for a stored lifecycle.
pub(crate) fn phase_of(l: Lifecycle) -> Phase {
    match l {
        Lifecycle::Active => Phase::Active,
        Lifecycle::Draining => Phase::Draining,
        Lifecycle::Terminating => Phase::Terminating,
    }
}

pub(crate) fn view(i: &Instance) -> InstanceView {
    InstanceView {
        id: i.record.id.clone(),
        group: i.record.group.clone(),
        generation: i.record.generation,
        launched_at_ms: i.record.launched_at_ms,
        phase: phase_of(i.record.lifecycle),
        alive: i.alive,
        health: i.soft.health,
        last_seen_ms: i.soft.last_seen_ms,
        ever_healthy: i.soft.ever_healthy,
        watched_since_ms: i.soft.watched_since_ms,
        exits_before_healthy: if i.soft.ever_healthy {
            0
        } else {
            i.soft
                .components
                .iter()
                .map(|c| c.restarts)
                .max()
                .unwrap_or(0)
        },
        last_failure: (!i.soft.ever_healthy)
            .then(|| last_failure(&i.soft.components))
            .flatten(),
        permit_at_ms: i.record.permit_at_ms,
        restored: i.soft.restored,
    }
}

/// What the component that exited most said of its last exit: `component app: exit status 1;
/// last output: ...`.
pub fn last_failure(components: &[ComponentReport]) -> Option<String> {
    let c = components
        .iter()
        .filter(|c| c.restarts > 0)
        .max_by_key(|c| c.restarts)?;
    let mut out = format!(
        "component {}: {}",
        c.name,
        c.last_exit.as_deref().unwrap_or("exited")
    );
    if let Some(o) = c
        .last_output
        .as_deref()
        .map(str::trim_end)
        .filter(|o| !o.is_empty())
    {
        out.push_str(&format!("; last output:\n{o}"));
    }
    Some(out)
}

/// Whether `g`'s rollout is in its canary stage (a canary configured, not passed yet, and
/// instances of older generations left).
fn st_canary(st: &State, g: &Group) -> bool {
    !g.record.rollout.canary_passed
        && st.service(g).is_some_and(|s| s.rollout.canary.is_some())
        && st
            .instances
            .values()
            .any(|i| i.record.group == g.record.group && i.record.generation < g.record.generation)
}

/// The service `service` of the fleet (checked to run in `region` when given), or why not:
/// nothing applied (409), no such service or region (404, naming the ones there are).
pub fn service_in(
    st: &State,
    service: &str,
    region: Option<&str>,
) -> Result<drover_model::fleet::Service, crate::ServerError> {
    use crate::ServerError;
    let fleet = st.fleet().ok_or(ServerError::NothingApplied { to: None })?;
    let svc = fleet
        .services
        .get(service)
        .ok_or_else(|| crate::apply::no_service(service, fleet))?;
    if let Some(r) = region {
        if !svc.regions.iter().any(|x| x == r) {
            return Err(ServerError::NoRegion {
                service: service.to_string(),
                region: r.to_string(),
                known: svc.regions.clone(),
            });
        }
    }
    Ok(svc.clone())
}

impl State {
    /// An instance of `group` ended before turning healthy: back off the next launch.
    pub fn launch_failed(&mut self, group: &str, now: u64) -> u32 {
        self.launch_backoff
            .entry(group.to_string())
            .or_default()
            .failed(now)
    }

    /// The heartbeat answer's `leave_soon` (`drover_control::group::leave_soon`).
    pub fn leave_soon(&self, inst: &Instance) -> bool {
        drover_control::group::leave_soon(
            phase_of(inst.record.lifecycle),
            inst.record.generation,
            self.groups
                .get(&inst.record.group)
                .map(|g| g.record.generation),
        )
    }

    pub fn fleet(&self) -> Option<&Fleet> {
        self.revision.as_ref().map(|r| &r.fleet)
    }

    pub fn specs(&self) -> Vec<GroupSpec> {
        self.groups.values().map(|g| self.spec(g)).collect()
    }

    /// What the group controller knows of one group.
    pub fn spec(&self, g: &Group) -> GroupSpec {
        let svc = self.service(g);
        let rollout = svc.map(|s| s.rollout.clone()).unwrap_or_default();
        let mut spec = GroupSpec {
            group: g.record.group.clone(),
            desired: g.record.desired,
            generation: g.record.generation,
            // From the rollout record, below.
            generation_since_ms: 0,
            rollout_open: false,
            paused: false,
            resumed_ms: 0,
            canary: rollout.canary.as_ref().map(|c| drover_control::CanaryGate {
                size: c.size(g.record.desired),
                bake_ms: c.bake.as_millis(),
                baking_since_ms: 0,
            }),
            provider_replaces_leavers: provider_replaces_leavers(&g.provider, &rollout),
            // An Auto Scaling group launches its template's current version only.
            launches_any_generation: g.provider != "aws",
            good_generation: 0,
            rollout,
            replace_unhealthy_after_ms: svc
                .map(|s| s.replace_unhealthy_after.as_millis())
                .unwrap_or(30_000),
            leave_within_ms: drover_control::group::leave_within_ms(
                svc.map(|s| s.rollout.drain_timeout.as_millis())
                    .unwrap_or(DEFAULT_DRAIN_MS),
                longest_stop_grace(&g.plan).as_millis() as u64,
            ),
            launch_not_before_ms: self
                .launch_backoff
                .get(&g.record.group)
                .map(|b| b.not_before_ms)
                .unwrap_or(0),
        };
        drover_control::rollout::apply_to_spec(&g.record.rollout, &mut spec);
        spec
    }

    /// Whether `instance`, leaving on its permit, lowers its group's capacity as it goes (the
    /// permit's `decrement`). Not when the provider replaces it: a stale instance of an `aws`
    /// group whose rollout has no surge, the group at or under its desired count
    /// ([`drover_control::group::provider_replaces`]); the Auto Scaling group then launches
    /// its replacement from the current launch template version.
    pub fn leaver_decrements(&self, instance: &Instance) -> bool {
        if instance.record.lifecycle != Lifecycle::Draining {
            // Being terminated by the server (broken): the controller replaces it.
            return true;
        }
        let Some(g) = self.groups.get(&instance.record.group) else {
            return true;
        };
        let spec = self.spec(g);
        if !spec.provider_replaces_leavers || instance.record.generation >= spec.generation {
            return true;
        }
        let group: Vec<&InstanceView> =
            self.instances.group_views(&instance.record.group).collect();
        let Some(leaver) = group.iter().find(|v| v.id == instance.record.id) else {
            return true;
        };
        !drover_control::group::provider_replaces(&spec, leaver, &group)
    }

    /// Every instance's view, built afresh (the kept ones are [`Instances::group_views`]).
    pub fn views(&self) -> Vec<InstanceView> {
        self.instances.values().map(view).collect()
    }

    /// One controller pass over the groups that need one ([`State::due`]), each by
    /// [`State::reconcile_one`]. The decision covers the groups reconciled (their targets
    /// only); `suspect` is every group the guard holds.
    pub fn reconcile_due(&mut self, now: u64, timing: &drover_control::Timing) -> Pass {
        let mut pass = Pass::default();
        for group in self.due(now) {
            self.reconcile_one(&group, now, timing, &mut pass);
        }
        self.end_pass(&mut pass);
        pass
    }

    /// The groups a pass reconciles now: those with a change that matters since their last
    /// pass (an instance launched, forgotten, or whose health, phase or liveness changed; a
    /// heartbeat after silence), whose spec changed (an apply, a deploy, a scale, a
    /// rollout's record, a launch backoff), whose `next_change` came, that decided something
    /// in their last pass, or whose targets are to be published again; and the groups gone
    /// from the fleet that still have instances. Costs a spec per group, no instance.
    pub fn due(&self, now: u64) -> Vec<String> {
        let mut due: Vec<String> = self
            .groups
            .values()
            .filter(|g| {
                let group = &g.record.group;
                self.instances.changed.contains(group)
                    || !self.published.contains_key(group)
                    || self.last_pass.get(group).is_none_or(|p| {
                        p.acted
                            || p.next_change.is_some_and(|at| at <= now)
                            || p.spec != self.spec(g)
                    })
            })
            .map(|g| g.record.group.clone())
            .collect();
        due.extend(
            self.instances
                .groups()
                .filter(|g| !self.groups.contains_key(*g))
                .cloned(),
        );
        due
    }

    /// Reconcile one group from its kept views (`drover_control::group::reconcile_group`,
    /// or `reconcile_orphans` for a group gone from the fleet), remember its spec, its
    /// `next_change` and whether it acted, and add its decision to `pass`.
    pub fn reconcile_one(
        &mut self,
        group: &str,
        now: u64,
        timing: &drover_control::Timing,
        pass: &mut Pass,
    ) {
        self.instances.changed.remove(group);
        let list: Vec<&InstanceView> = self.instances.group_views(group).collect();
        pass.groups += 1;
        pass.instances += list.len();
        let Some(g) = self.groups.get(group) else {
            let part = drover_control::group::reconcile_orphans(now, group, &list, timing);
            pass.decision.actions.extend(part.actions);
            return;
        };
        let spec = self.spec(g);
        let part = drover_control::group::reconcile_group(now, &spec, &list, timing);
        let next_change = drover_control::group::next_change(now, &spec, &list, timing);
        if part.suspect.iter().any(|s| s == group) {
            self.suspect.insert(group.to_string());
        } else {
            self.suspect.remove(group);
        }
        self.last_pass.insert(
            group.to_string(),
            LastPass {
                spec,
                next_change,
                acted: !part.actions.is_empty(),
            },
        );
        pass.decision.actions.extend(part.actions);
        pass.decision.targets.extend(part.targets);
    }

    /// Finish a pass: forget the groups gone, order its actions, name every suspect group.
    pub fn end_pass(&mut self, pass: &mut Pass) {
        let groups = &self.groups;
        self.last_pass.retain(|g, _| groups.contains_key(g));
        self.suspect.retain(|g| groups.contains_key(g));
        pass.decision.actions.sort();
        pass.decision.suspect = self.suspect.iter().cloned().collect();
    }

    pub fn status(&self, now: u64, silent_after_ms: u64) -> FleetStatus {
        self.status_of(now, silent_after_ms, &Listing::All).0
    }

    /// The fleet's status with the instances `listing` asks for; the counts (healthy, current,
    /// stale) are over every instance either way. With [`Listing::Ids`] the instances are
    /// left out and returned instead as each group's ids with whether each is in rotation,
    /// for [`crate::status`] to read a chunk at a time. One pass over the instances.
    pub fn status_of(
        &self,
        now: u64,
        silent_after_ms: u64,
        listing: &Listing,
    ) -> (FleetStatus, Vec<GroupIds>) {
        let (status, ids, _) = self.status_counted(now, silent_after_ms, listing);
        (status, ids)
    }

    /// [`State::status_of`], and each group's instances by state (in the order of
    /// `status.groups`, indexed by `InstanceState as usize`), from the same pass.
    pub fn status_counted(
        &self,
        now: u64,
        silent_after_ms: u64,
        listing: &Listing,
    ) -> (FleetStatus, Vec<GroupIds>, Vec<StateCounts>) {
        let mut members: std::collections::HashMap<&str, Vec<&Instance>> =
            std::collections::HashMap::with_capacity(self.groups.len());
        for i in self.instances.values() {
            members.entry(i.record.group.as_str()).or_default().push(i);
        }
        let mut ids = Vec::new();
        let mut counts = Vec::with_capacity(self.groups.len());
        let groups = self
            .groups
            .values()
            .map(|g| {
                // A set, so marking rotation is O(1) per instance, not O(group size).
                let targets: std::collections::HashSet<&str> = self
                    .targets
                    .get(&g.record.group)
                    .map(|t| t.iter().map(String::as_str).collect())
                    .unwrap_or_default();
                let mut mine = members.remove(g.record.group.as_str()).unwrap_or_default();
                let (mut healthy, mut current, mut stale, mut current_healthy) = (0, 0, 0, 0);
                let mut by_state = StateCounts::default();
                for i in &mine {
                    let state = instance_state(i, now, silent_after_ms);
                    by_state.0[state as usize] += 1;
                    let ok = state == InstanceState::Healthy;
                    healthy += ok as u32;
                    if i.record.generation == g.record.generation {
                        current += 1;
                        current_healthy += ok as u32;
                    } else if i.record.generation < g.record.generation {
                        stale += 1;
                    }
                }
                counts.push(by_state);
                let instances: Vec<InstanceStatus> = match listing {
                    Listing::All => mine
                        .iter()
                        .map(|i| {
                            let r = targets.contains(i.record.id.as_str());
                            instance_status(i, r, now, silent_after_ms)
                        })
                        .collect(),
                    Listing::Ids => {
                        ids.push(
                            mine.iter()
                                .map(|i| {
                                    let id = i.record.id.as_str();
                                    (id.to_string(), targets.contains(id))
                                })
                                .collect(),
                        );
                        Vec::new()
                    }
                    Listing::None => Vec::new(),
                    Listing::Page {
                        group,
                        page,
                        per_page,
                    } if *group == g.record.group => {
                        mine.sort_unstable_by(|a, b| a.record.id.cmp(&b.record.id));
                        mine.iter()
                            .skip(page.saturating_sub(1).saturating_mul(*per_page))
                            .take(*per_page)
                            .map(|i| {
                                let r = targets.contains(i.record.id.as_str());
                                instance_status(i, r, now, silent_after_ms)
                            })
                            .collect()
                    }
                    Listing::Page { .. } => Vec::new(),
                };
                let bounds = self.bounds(g, now);
                let schedule = self.has_schedules(g).then(|| {
                    let (base_min, base_max) = self.capacity(g);
                    drover_model::api::GroupSchedule {
                        active: bounds.cause.clone(),
                        next: bounds.next.clone(),
                        base_min,
                        base_max,
                    }
                });
                GroupStatus {
                    schedule,
                    group: g.record.group.clone(),
                    service: g.plan.service.clone(),
                    region: g.plan.region.clone(),
                    provider: g.provider.clone(),
                    generation: g.record.generation,
                    versions: g.plan.versions(),
                    min: bounds.min,
                    desired: g.record.desired,
                    max: bounds.max,
                    healthy,
                    ingress: g.ingress.map(|(a, _)| a.to_string()),
                    desired_reason: g.record.desired_reason.clone(),
                    autoscale: self.service(g).and_then(|s| s.autoscale.as_ref()).map(|p| {
                        let a = self.autoscale.get(&g.record.group);
                        AutoscaleStatus {
                            metric: p.metric.clone(),
                            target: p.target,
                            observed: a.and_then(|a| a.last_observed),
                            measured: self.samples(g, p, now).0.len() as u32,
                            recommended: a.and_then(|a| a.last_recommended),
                        }
                    }),
                    rollout: RolloutStatus {
                        in_progress: g.record.rollout.open,
                        since_ms: g.record.rollout.since_ms,
                        good_generation: g.record.rollout.good_generation,
                        failed_generation: g.record.rollout.failed_generation,
                        failure: g.record.rollout.failure.clone(),
                        paused: g.record.rollout.paused && g.record.rollout.open,
                        analysis: g.record.rollout.analysis.clone(),
                        wave: self
                            .service(g)
                            .filter(|s| !s.rollout.waves.is_empty())
                            .map(|s| s.rollout.wave_of(&g.plan.region) as u32 + 1)
                            .unwrap_or(0),
                        wave_pending: g.record.rollout.wave_pending,
                        held: g.record.rollout.held,
                        phase: {
                            let r = &g.record.rollout;
                            let canary = st_canary(self, g);
                            if r.held && !r.open {
                                "held"
                            } else if r.wave_pending && !r.open {
                                "waiting"
                            } else if r.open && r.paused {
                                "paused"
                            } else if r.open && canary && r.canary_baking_ms > 0 {
                                "baking"
                            } else if r.open && canary {
                                "canary"
                            } else if r.open {
                                "rolling"
                            } else if r.failed_generation >= g.record.generation {
                                "failed"
                            } else {
                                "done"
                            }
                            .to_string()
                        },
                        reverted_from: g.record.rollout.reverted_from,
                        current,
                        stale,
                        current_healthy,
                    },
                    instances,
                }
            })
            .collect();
        let status = FleetStatus {
            fleet: self.fleet().map(|f| f.fleet.name.clone()),
            revision: self.revision.as_ref().map(|r| r.number),
            groups,
            balancers: Vec::new(),
            control_plane: None,
        };
        (status, ids, counts)
    }

    /// Median time from launch to healthy of the instances that are healthy now.
    pub fn observed_boot_ms(&self) -> Option<u64> {
        let mut v: Vec<u64> = self
            .instances
            .values()
            .filter_map(|i| match i.soft.health {
                Health::Healthy { since_ms } if i.soft.ever_healthy => {
                    Some(since_ms.saturating_sub(i.record.launched_at_ms))
                }
                _ => None,
            })
            .collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    }

    pub fn service(&self, g: &Group) -> Option<&drover_model::fleet::Service> {
        self.fleet().and_then(|f| f.services.get(&g.plan.service))
    }

    /// The schedules of a group (the file's and the one-offs), with the range they raise.
    pub fn schedules<'a>(&'a self, g: &'a Group) -> drover_control::Schedules<'a> {
        let svc = self.service(g);
        let (base_min, base_max) = self.capacity(g);
        drover_control::Schedules {
            service: &g.plan.service,
            region: &g.plan.region,
            base_min,
            base_max,
            file: svc.map_or(&[], |s| s.schedule.as_slice()),
            once: &self.once,
        }
    }

    /// Whether any schedule could apply to `g` (so idle groups cost no cron search).
    pub fn has_schedules(&self, g: &Group) -> bool {
        self.service(g).is_some_and(|s| !s.schedule.is_empty())
            || self.once.iter().any(|o| o.service == g.plan.service)
            || self
                .schedule_memory
                .get(&g.record.group)
                .is_some_and(|m| m.began.iter().any(|(id, v)| m.ended.get(id) != Some(v)))
    }

    /// A group's bounds now: the file's capacity, raised by its active schedules.
    pub fn bounds(&self, g: &Group, now: u64) -> drover_control::Bounds {
        if !self.has_schedules(g) {
            let (min, max) = self.capacity(g);
            return drover_control::Bounds {
                min,
                max,
                cause: None,
                active: Vec::new(),
                next: None,
            };
        }
        self.schedules(g).bounds(now)
    }

    /// The autoscaling metric of each instance of `g` that counts (active, healthy for at
    /// least the warm-up, reporting the metric), and when the oldest was reported.
    pub fn samples(
        &self,
        g: &Group,
        policy: &drover_model::fleet::Autoscale,
        now: u64,
    ) -> (Vec<f64>, u64) {
        let custom = policy.custom_name();
        let offers = self
            .instances
            .values()
            .filter(|i| i.record.group == g.record.group)
            .map(|i| drover_control::autoscale::Offer {
                alive: i.alive,
                phase: phase_of(i.record.lifecycle),
                health: i.soft.health,
                last_seen_ms: i.soft.last_seen_ms,
                value: match custom {
                    Some(name) => i.soft.utilization.custom.get(name).copied(),
                    None => Some(i.soft.utilization.cpu),
                },
            });
        drover_control::autoscale::samples(now, policy, offers)
    }

    fn capacity(&self, g: &Group) -> (u32, u32) {
        self.fleet()
            .and_then(|f| f.services.get(&g.plan.service))
            .map(|s| (s.capacity.min, s.capacity.max))
            .unwrap_or((0, 0))
    }
}

/// What `drover status` calls the instance now.
pub(crate) fn instance_state(i: &Instance, now: u64, silent_after_ms: u64) -> InstanceState {
    match i.record.lifecycle {
        Lifecycle::Draining => InstanceState::Draining,
        Lifecycle::Terminating => InstanceState::Terminating,
        Lifecycle::Active if !i.soft.reporting => InstanceState::Launching,
        Lifecycle::Active if now.saturating_sub(i.soft.last_seen_ms) > silent_after_ms => {
            InstanceState::Silent
        }
        Lifecycle::Active => match i.soft.health {
            Health::Healthy { .. } => InstanceState::Healthy,
            Health::Unhealthy { .. } => InstanceState::Unhealthy,
            Health::Starting | Health::Unknown => InstanceState::Booting,
        },
    }
}

pub(crate) fn instance_status(
    i: &Instance,
    in_rotation: bool,
    now: u64,
    silent_after_ms: u64,
) -> InstanceStatus {
    let state = instance_state(i, now, silent_after_ms);
    InstanceStatus {
        id: i.record.id.clone(),
        group: i.record.group.clone(),
        addr: i.record.addr.clone(),
        generation: i.record.generation,
        state,
        launched_at_ms: i.record.launched_at_ms,
        last_heartbeat_ms: i.soft.reporting.then_some(i.soft.last_seen_ms),
        components: i.soft.components.clone(),
        utilization: i.soft.utilization.clone(),
        in_rotation,
    }
}

/// Events a heartbeat implies, and whether the instance's health changed.
pub fn absorb_heartbeat(
    inst: &mut Instance,
    hb: &Heartbeat,
    now: u64,
) -> (Vec<drover_model::NewEvent>, bool) {
    use drover_model::{EventKind, NewEvent};
    let mut events = Vec::new();
    let id = inst.record.id.clone();
    let group = inst.record.group.clone();
    let ev = |kind, msg: String| NewEvent::new(kind, msg).group(&group).instance(&id);
    for c in &hb.components {
        let before = inst
            .soft
            .components
            .iter()
            .find(|p| p.name == c.name)
            .map(|p| p.restarts)
            .unwrap_or(0);
        if c.restarts > before && inst.soft.reporting {
            events.push(ev(
                EventKind::Respawned,
                format!(
                    "component {} restarted by its agent ({} restart{} so far; last exit: {})",
                    c.name,
                    c.restarts,
                    if c.restarts == 1 { "" } else { "s" },
                    c.last_exit.as_deref().unwrap_or("unknown")
                ),
            ));
        }
    }
    let leaving = matches!(
        hb.phase,
        drover_model::api::AgentPhase::Draining | drover_model::api::AgentPhase::Stopping
    );
    if let Some(report) = hb.drained.as_ref().filter(|_| !inst.soft.drained) {
        inst.soft.drained = true;
        events.push(ev(EventKind::Drained, report.describe()));
    }
    if leaving && inst.record.lifecycle != drover_store::Lifecycle::Active {
        // An agent leaving with a permit (or being terminated) stops its components on
        // purpose: not a health change. (An active instance that stops on its own is
        // unhealthy, and leaves rotation, below.)
        inst.soft.last_seen_ms = now;
        inst.soft.last_seq = hb.seq;
        inst.soft.components = hb.components.clone();
        inst.soft.reporting = true;
        return (events, false);
    }
    let healthy = hb.healthy();
    if std::mem::take(&mut inst.soft.restored) {
        // Unknown, never healthy (see `Engine::new`): healthy from now, or starting.
        inst.soft.health = inst
            .soft
            .health
            .after_report(healthy, inst.soft.ever_healthy, now);
        inst.soft.ever_healthy |= healthy;
        inst.soft.last_seen_ms = now;
        inst.soft.last_seq = hb.seq;
        inst.soft.components = hb.components.clone();
        inst.soft.utilization = hb.utilization.clone();
        inst.soft.reporting = true;
        return (events, true);
    }
    let before = inst.soft.health;
    let after = before.after_report(healthy, inst.soft.ever_healthy, now);
    let changed = std::mem::discriminant(&before) != std::mem::discriminant(&after);
    if changed {
        match after {
            Health::Healthy { .. } => events.push(ev(
                EventKind::Healthy,
                format!("healthy on generation {} at {}", hb.generation, hb.addr),
            )),
            Health::Unhealthy { .. } => {
                let why: Vec<String> = hb
                    .components
                    .iter()
                    .filter(|c| c.state != drover_model::api::ComponentState::Healthy)
                    .map(|c| {
                        format!(
                            "{} is {}{}",
                            c.name,
                            serde_json::to_value(c.state)
                                .ok()
                                .and_then(|v| v.as_str().map(String::from))
                                .unwrap_or_default(),
                            c.message
                                .as_deref()
                                .map(|m| format!(" ({m})"))
                                .unwrap_or_default()
                        )
                    })
                    .collect();
                events.push(ev(
                    EventKind::Unhealthy,
                    format!(
                        "unhealthy: {}",
                        if why.is_empty() {
                            "agent is not running".into()
                        } else {
                            why.join(", ")
                        }
                    ),
                ))
            }
            _ => {}
        }
    }
    if healthy {
        inst.soft.ever_healthy = true;
    }
    if let Some(w) = inst.soft.window.as_mut() {
        // The canary analysis window: custom metrics and health transitions.
        for (k, v) in &hb.utilization.custom {
            if v.is_finite() {
                let e = w.metrics.entry(k.clone()).or_insert((0.0, 0));
                e.0 += v;
                e.1 += 1;
            }
        }
        if changed && matches!(after, Health::Unhealthy { .. }) {
            w.unhealthy += 1;
        }
    }
    inst.soft.health = after;
    inst.soft.last_seen_ms = now;
    inst.soft.last_seq = hb.seq;
    inst.soft.components = hb.components.clone();
    inst.soft.utilization = hb.utilization.clone();
    inst.soft.reporting = true;
    (events, changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_store::RolloutRecord;

    const FLEET: &str = r#"
[fleet]
name = "t"

[regions.a]
provider = "sim"

[regions.b]
provider = "sim"

[services.web]
regions = ["a", "b"]
capacity = { min = 1, desired = 5000, max = 6000 }

[services.web.components.app]
runtime = "process"
version = "v1"
command = "/bin/true"
"#;

    /// Two groups of 5,000 instances in every state there is.
    fn fleet_of_10000(now: u64) -> State {
        let fleet = drover_model::parse_fleet(FLEET, "drover.toml").unwrap();
        let mut st = State::default();
        for region in ["a", "b"] {
            let group = format!("web/{region}");
            let mut plan =
                drover_model::plan::plan_for(&fleet, "web", &fleet.services["web"], region);
            plan.generation = 2;
            st.groups.insert(
                group.clone(),
                Group {
                    record: GroupRecord {
                        group: group.clone(),
                        desired: 5000,
                        desired_reason: "apply".into(),
                        generation: 2,
                        rollout: RolloutRecord::default(),
                    },
                    plan,
                    provider: "sim".into(),
                    ingress: None,
                },
            );
            for n in 0..5000u64 {
                let id = format!("i-{region}{n:06}");
                let (lifecycle, reporting, last_seen_ms, health) = match n % 7 {
                    0 => (Lifecycle::Active, false, now, Health::Unknown),
                    1 => (Lifecycle::Active, true, now, Health::Starting),
                    2 | 3 => (
                        Lifecycle::Active,
                        true,
                        now,
                        Health::Healthy { since_ms: 1 },
                    ),
                    4 => (
                        Lifecycle::Active,
                        true,
                        now,
                        Health::Unhealthy { since_ms: 1 },
                    ),
                    5 => (
                        Lifecycle::Active,
                        true,
                        now - 60_000,
                        Health::Healthy { since_ms: 1 },
                    ),
                    _ if n % 2 == 0 => (
                        Lifecycle::Draining,
                        true,
                        now,
                        Health::Healthy { since_ms: 1 },
                    ),
                    _ => (
                        Lifecycle::Terminating,
                        true,
                        now,
                        Health::Healthy { since_ms: 1 },
                    ),
                };
                st.instances.insert(
                    id.clone(),
                    Instance {
                        record: InstanceRecord {
                            id,
                            group: group.clone(),
                            generation: 1 + n % 2,
                            addr: format!("127.9.{}.{}", n / 250, n % 250),
                            provider_id: "sim".into(),
                            launched_at_ms: 1,
                            lifecycle,
                            permit_at_ms: None,
                            own_token: false,
                        },
                        soft: Soft {
                            watched_since_ms: 1,
                            last_seen_ms,
                            health,
                            ever_healthy: true,
                            last_seq: 0,
                            components: Vec::new(),
                            utilization: Utilization::default(),
                            reporting,
                            restored: false,
                            drained: false,
                            window: None,
                            budget: EventBudget::default(),
                            bound: false,
                        },
                        alive: true,
                        permit_wake: Default::default(),
                    },
                );
            }
        }
        st
    }

    /// The dashboard's summary lists no instance, yet counts every one by state exactly as
    /// the full listing shows them; a page of one group lists that page only, with the
    /// counts of the whole group.
    #[test]
    fn summaries_count_every_instance_without_listing_any() {
        let now = 1_000_000;
        let st = fleet_of_10000(now);
        let (full, _, full_counts) = st.status_counted(now, 5000, &Listing::All);
        let (sum, ids, counts) = st.status_counted(now, 5000, &Listing::None);
        assert!(ids.is_empty());
        assert_eq!(sum.groups.len(), 2);
        assert!(sum.groups.iter().all(|g| g.instances.is_empty()));
        assert_eq!(counts, full_counts);
        for ((g, c), f) in sum.groups.iter().zip(&counts).zip(&full.groups) {
            assert_eq!(c.total(), 5000);
            for s in STATES {
                let listed = f.instances.iter().filter(|i| i.state == s).count() as u32;
                assert_eq!(c.0[s as usize], listed, "{} {s:?}", g.group);
                assert!(listed > 0, "the fleet has every state: {s:?}");
            }
            assert_eq!(g.healthy, c.0[InstanceState::Healthy as usize]);
            assert_eq!(g.healthy, f.healthy);
            assert_eq!(
                (g.rollout.current, g.rollout.stale),
                (f.rollout.current, f.rollout.stale)
            );
        }
        let page = Listing::Page {
            group: "web/b".into(),
            page: 3,
            per_page: 50,
        };
        let (p, _, pc) = st.status_counted(now, 5000, &page);
        assert!(p.groups[0].instances.is_empty(), "web/a is not listed");
        let listed: Vec<&str> = p.groups[1]
            .instances
            .iter()
            .map(|i| i.id.as_str())
            .collect();
        assert_eq!(listed.len(), 50);
        assert_eq!(listed[0], "i-b000100");
        assert_eq!(listed[49], "i-b000149");
        assert_eq!(pc[1].total(), 5000);
    }

    /// Every kept view equals the view built afresh from its instance.
    fn assert_views_kept(st: &State) {
        let mut kept: Vec<InstanceView> = st
            .instances
            .groups()
            .flat_map(|g| st.instances.group_views(g).cloned())
            .collect();
        kept.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(kept, st.views());
    }

    /// A pass reads only what changed: an idle fleet costs no instance, a heartbeat that says
    /// "still here" none, a health change its own group, and silence coming due every group
    /// it may concern; the views follow every change, and what a pass decides is what a
    /// pass over every instance decides.
    #[test]
    fn a_pass_reads_only_the_groups_that_changed_or_came_due() {
        let now = 1_000_000;
        let silent = 15_000;
        let timing = drover_control::Timing {
            silent_after_ms: silent,
            leave_within_ms: 30_000,
        };
        let mut st = fleet_of_10000(now);
        st.instances.set_silent_after(silent);
        // Every instance current, active and healthy, heard from just now.
        st.instances.for_each_mut(|i| {
            i.record.generation = 2;
            i.record.lifecycle = Lifecycle::Active;
            i.soft.health = Health::Healthy { since_ms: 1 };
            i.soft.reporting = true;
            i.soft.last_seen_ms = now;
        });
        assert_views_kept(&st);
        let full = drover_control::reconcile(now, &st.specs(), &st.views(), &timing);
        let first = st.reconcile_due(now, &timing);
        assert_eq!((first.groups, first.instances), (2, 10_000));
        assert_eq!(first.decision, full);
        assert!(
            first.decision.actions.is_empty(),
            "{:?}",
            first.decision.actions
        );
        for (g, t) in &first.decision.targets {
            st.targets.insert(g.clone(), t.clone());
            st.published.insert(g.clone(), (Vec::new(), 2));
        }

        // Nothing changed: nothing read.
        let idle = st.reconcile_due(now + 1_000, &timing);
        assert_eq!((idle.groups, idle.instances), (0, 0));
        // Heartbeats that only say "still here".
        for id in ["i-a000001", "i-b000002"] {
            st.instances.get_mut(id).unwrap().soft.last_seen_ms = now + 2_000;
        }
        let beats = st.reconcile_due(now + 2_000, &timing);
        assert_eq!((beats.groups, beats.instances), (0, 0));
        assert_views_kept(&st);

        // A health change: its group only.
        st.instances.get_mut("i-a000003").unwrap().soft.health = Health::Unhealthy {
            since_ms: now + 3_000,
        };
        let sick = st.reconcile_due(now + 3_000, &timing);
        assert_eq!((sick.groups, sick.instances), (1, 5_000));
        assert!(!sick.decision.targets["web/a"].contains(&"i-a000003".to_string()));
        assert!(!sick.decision.targets.contains_key("web/b"));

        // A launch and a forget: their groups.
        let mut born = st.instances.get("i-b000004").unwrap().clone();
        born.record.id = "i-b999999".into();
        st.instances.insert("i-b999999".into(), born);
        st.instances.remove("i-b000005");
        assert_views_kept(&st);
        let moved = st.reconcile_due(now + 4_000, &timing);
        assert_eq!(moved.groups, 1);

        // Silence comes due (15 s after the heartbeats of `now`): every group, at that time
        // and not before, deciding as a pass over every instance does.
        let quiet = st.reconcile_due(now + silent, &timing);
        assert_eq!(quiet.groups, 0, "not silent yet at exactly silent_after");
        let at = now + silent + 1;
        let full = drover_control::reconcile(at, &st.specs(), &st.views(), &timing);
        let due = st.reconcile_due(at, &timing);
        assert_eq!(due.groups, 2);
        assert_eq!(due.decision.actions, full.actions);
        assert_eq!(due.decision.targets, full.targets);
    }
}
