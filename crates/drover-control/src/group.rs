//! The group controller: keeps each group at its desired count, replaces broken instances,
//! and replaces stale instances within the rollout budget (surge, floor, permits).

use std::collections::BTreeMap;

use drover_model::fleet::Rollout;
use serde::{Deserialize, Serialize};

/// What the controller must know about a group.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupSpec {
    pub group: String,
    pub desired: u32,
    /// The current (preferred) plan generation.
    pub generation: u64,
    /// When the current generation became preferred (ms); the rollout deadline counts from here.
    pub generation_since_ms: u64,
    /// Whether a rollout to `generation` is still being watched (not yet done or failed).
    pub rollout_open: bool,
    /// The rollout is paused: no permit, and no launch beyond keeping `desired` instances.
    pub paused: bool,
    /// When the rollout was last resumed (ms; 0: never paused): the deadline counts from it.
    pub resumed_ms: u64,
    /// The canary stage of the rollout, until its analysis passed (or it was promoted).
    pub canary: Option<CanaryGate>,
    pub rollout: Rollout,
    /// An instance that has not turned healthy this long after launch, or that has been
    /// unhealthy this long, is replaced.
    pub replace_unhealthy_after_ms: u64,
    /// No launch before this time: instances that die before turning healthy back off
    /// further launches, so a broken version does not turn into a launch storm.
    pub launch_not_before_ms: u64,
    /// The provider replaces a stale instance that leaves on its permit by itself (an Auto
    /// Scaling group whose leaver terminates without lowering its capacity: the server sets
    /// this for `aws` groups whose rollout has `max_surge = 0`). A stale instance draining on
    /// its permit then still counts toward the group, so the controller does not launch a
    /// second replacement; its launch comes once the leaver is gone, and claims the
    /// provider's replacement. See [`provider_replaces`].
    pub provider_replaces_leavers: bool,
    /// How long an instance has after its permit to be gone: its drain timeout, its
    /// components' longest stop grace and some slack. Past it, the instance (a hung agent,
    /// an old one) is terminated through the provider. Counted from the permit's stored
    /// time, so it holds across server restarts.
    pub leave_within_ms: u64,
    /// The provider launches the generation it is asked for (every provider but an Auto
    /// Scaling group, which launches its launch template's current version): while a
    /// rollout has not proven itself, instances it loses are replaced on the last good
    /// generation.
    pub launches_any_generation: bool,
    /// The last generation every instance ran healthy (the rollout record's; 0: none).
    pub good_generation: u64,
}

/// A rollout's canary stage: `size` new instances serve beside the old ones; once all are
/// ready they bake for `bake_ms`, then the server judges them (`CanaryAnalyse`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CanaryGate {
    pub size: u32,
    pub bake_ms: u64,
    /// When every canary was ready and the bake began (0: not yet).
    pub baking_since_ms: u64,
}

/// Where an instance is in its life, as the server recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Running (or booting) and counted toward the group.
    Active,
    /// Holds a permit: out of rotation, draining, then terminating itself.
    Draining,
    /// The provider was asked to terminate it.
    Terminating,
}

/// Health as last reported by the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Nothing reported yet.
    Unknown,
    /// Reporting, not healthy yet (booting).
    Starting,
    Healthy {
        since_ms: u64,
    },
    Unhealthy {
        since_ms: u64,
    },
}

impl Health {
    /// Health after a report at `now` that says `healthy` (every component healthy): a
    /// change of state starts its clock, the same state keeps it; an instance that never
    /// was healthy is still starting, not unhealthy.
    pub fn after_report(self, healthy: bool, ever_healthy: bool, now: u64) -> Health {
        match (healthy, self) {
            (true, Health::Healthy { since_ms }) => Health::Healthy { since_ms },
            (true, _) => Health::Healthy { since_ms: now },
            (false, Health::Unhealthy { since_ms }) => Health::Unhealthy { since_ms },
            (false, Health::Healthy { .. }) => Health::Unhealthy { since_ms: now },
            (false, _) if ever_healthy => Health::Unhealthy { since_ms: now },
            (false, _) => Health::Starting,
        }
    }
}

/// What the controller must know about an instance.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceView {
    pub id: String,
    pub group: String,
    pub generation: u64,
    pub launched_at_ms: u64,
    pub phase: Phase,
    /// The provider still sees the instance (its agent process, its VM).
    pub alive: bool,
    pub health: Health,
    /// Last heartbeat (or, after a server restart, the restart time: a grace period).
    pub last_seen_ms: u64,
    /// Whether it has ever reported healthy.
    pub ever_healthy: bool,
    /// Since when its health has been watched: its launch, or the server's start when the
    /// server restarted after the launch. "Never turned healthy" counts from here.
    pub watched_since_ms: u64,
    /// Exits of its components before it was ever healthy (the most of any component), and
    /// what the last one said (exit status, last lines printed).
    pub exits_before_healthy: u32,
    pub last_failure: Option<String>,
    /// When it was given its permit (`Draining`), as stored.
    pub permit_at_ms: Option<u64>,
    /// Known only from the store since a server restart: not heard from by this server yet.
    pub restored: bool,
}

/// Timings that are not per service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// An instance not heard from for this long is out of rotation and is replaced.
    pub silent_after_ms: u64,
    /// [`GroupSpec::leave_within_ms`] for an instance whose group left the fleet.
    pub leave_within_ms: u64,
}

/// Whether an instance may get a permit soon, so its agent should hold the permit long-poll
/// open (the heartbeat answer's `leave_soon`): it holds one already (or is being
/// terminated), its group is gone (`group_generation` none), or it runs a stale generation (a
/// rollout replaces it within its budget). Surplus instances (scale-in) get their permits in
/// the pass that sees them and so are covered by the first case.
pub fn leave_soon(phase: Phase, generation: u64, group_generation: Option<u64>) -> bool {
    phase != Phase::Active || group_generation.is_none_or(|current| generation < current)
}

/// Slack beyond a leaver's drain timeout and stop grace before it is terminated.
pub const LEAVE_SLACK_MS: u64 = 10_000;

/// [`GroupSpec::leave_within_ms`] of a group: the drain timeout, the longest stop grace of
/// its components, and [`LEAVE_SLACK_MS`].
pub fn leave_within_ms(drain_timeout_ms: u64, longest_stop_grace_ms: u64) -> u64 {
    drain_timeout_ms
        .saturating_add(longest_stop_grace_ms)
        .saturating_add(LEAVE_SLACK_MS)
}

/// When a leaver that is still there has overstayed its permit (`within` after it).
fn overstays_from(i: &InstanceView, within: u64) -> Option<u64> {
    let at = i
        .permit_at_ms
        .filter(|_| i.alive && i.phase == Phase::Draining)?;
    Some(at.saturating_add(within))
}

/// A leaver still there `within` after its permit: why it must be terminated.
fn overstayed(i: &InstanceView, now: u64, within: u64) -> Option<String> {
    (now >= overstays_from(i, within)?).then(|| {
        format!(
            "its agent did not leave within {} of its permit",
            drover_model::Dur::from_millis(within)
        )
    })
}

/// One thing to do. The server carries these out and records each as an event. Decisions
/// are sorted in this declaration order: what leaves is recorded before what replaces it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// The instance is gone (its agent exited or the provider lost it): forget it.
    Forget { instance: String, reason: String },
    /// Terminate at once through the provider (it is broken and serves nothing).
    Terminate { instance: String, reason: String },
    /// Give the instance leave to drain and terminate itself.
    Permit { instance: String, reason: String },
    /// Launch one instance of `group` on `generation`.
    Launch { group: String, generation: u64 },
    /// The rollout to `generation` finished: every instance runs it.
    RolloutDone { group: String, generation: u64 },
    /// Every canary of the rollout to `generation` is ready: the bake begins now.
    CanaryBaking { group: String, generation: u64 },
    /// The bake is over: judge the canaries against the baseline.
    CanaryAnalyse { group: String, generation: u64 },
    /// The rollout to `generation` did not turn healthy within its deadline.
    RolloutFailed {
        group: String,
        generation: u64,
        reason: String,
        /// The new instance whose output tells why (the one that kept exiting, or one that
        /// is not healthy), if there is one.
        instance: Option<String>,
    },
}

/// The controller's output for one tick.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    pub actions: Vec<Action>,
    /// Per group, the instances the balancer should send new connections to, sorted.
    pub targets: BTreeMap<String, Vec<String>>,
    /// Groups where the server suspects itself ([`suspects_itself`]): a large share went
    /// silent at once, so none of them is replaced until they are heard from again.
    pub suspect: Vec<String>,
}

/// The self-suspicion guard. When at least [`SUSPECT_MIN_SILENT`] of a group's active
/// instances, and at least [`SUSPECT_SHARE_PERCENT`] % of those that had turned healthy, are
/// silent at the same time, the likelier cause is on the server's side (its network, its
/// file descriptors, a stall) rather than that many machines failing at once: the server
/// replaces none of them and keeps them in rotation, as last known, until it hears from them
/// again (or they are reported gone by their provider). One silent instance, or a few in a
/// large group, are replaced as usual.
pub const SUSPECT_SHARE_PERCENT: usize = 50;
/// See [`SUSPECT_SHARE_PERCENT`].
pub const SUSPECT_MIN_SILENT: usize = 2;

/// Whether the guard speaks for `i`: active and alive, and either it turned healthy, or it
/// is known only from the store since a server restart (it ran before the restart; its
/// silence now says more about the server catching up, or cut off, than about it).
fn guarded(i: &InstanceView) -> bool {
    i.alive && i.phase == Phase::Active && (i.ever_healthy || i.restored)
}

/// Whether the server should suspect itself for this group's silence, and who is silent (of
/// the active, alive instances that had turned healthy or that a restart restored).
pub fn suspects_itself(list: &[&InstanceView], now: u64, t: &Timing) -> bool {
    let heard: Vec<&&InstanceView> = list.iter().filter(|i| guarded(i)).collect();
    let silent = heard.iter().filter(|i| !fresh_heartbeat(i, now, t)).count();
    silent >= SUSPECT_MIN_SILENT && silent * 100 >= heard.len() * SUSPECT_SHARE_PERCENT
}

fn fresh_heartbeat(i: &InstanceView, now: u64, t: &Timing) -> bool {
    now < silent_from(i, t)
}

/// From when an instance not heard from again counts as silent: `silent_after` after its
/// last heartbeat (strictly after).
fn silent_from(i: &InstanceView, t: &Timing) -> u64 {
    i.last_seen_ms
        .saturating_add(t.silent_after_ms)
        .saturating_add(1)
}

/// Whether a change of an instance's view (`before` as the controller last saw it, `after`
/// now) can change its group's decision: anything but a later heartbeat time does, and so
/// does a heartbeat from an instance that was silent when it came (at its new
/// `last_seen_ms`). A heartbeat that only says
/// "still here" changes nothing until its group's next deadline ([`next_change`]), so the
/// server keeps it without reconciling the group.
pub fn view_change_matters(before: &InstanceView, after: &InstanceView, t: &Timing) -> bool {
    // Every field named, so a new one is considered here.
    let InstanceView {
        id,
        group,
        generation,
        launched_at_ms,
        phase,
        alive,
        health,
        last_seen_ms,
        ever_healthy,
        watched_since_ms,
        exits_before_healthy,
        last_failure,
        permit_at_ms,
        restored,
    } = after;
    *id != before.id
        || *group != before.group
        || *generation != before.generation
        || *launched_at_ms != before.launched_at_ms
        || *phase != before.phase
        || *alive != before.alive
        || *health != before.health
        || *ever_healthy != before.ever_healthy
        || *watched_since_ms != before.watched_since_ms
        || *exits_before_healthy != before.exits_before_healthy
        || *last_failure != before.last_failure
        || *permit_at_ms != before.permit_at_ms
        || *restored != before.restored
        || *last_seen_ms < before.last_seen_ms
        || (*last_seen_ms != before.last_seen_ms && !fresh_heartbeat(before, *last_seen_ms, t))
}

/// Whether new connections may go to this instance.
pub fn in_rotation(i: &InstanceView, now: u64, t: &Timing) -> bool {
    i.phase == Phase::Active
        && i.alive
        && matches!(i.health, Health::Healthy { .. })
        && fresh_heartbeat(i, now, t)
}

/// Whether `i` counts toward its group's occupancy (what launches fill up to `desired` and
/// `desired + max_surge`): an Active instance, or, when the provider replaces leavers, a
/// stale one draining on its permit (its replacement comes from the provider).
fn occupies(spec: &GroupSpec, i: &InstanceView) -> bool {
    match i.phase {
        Phase::Active => true,
        Phase::Draining => spec.provider_replaces_leavers && i.generation < spec.generation,
        Phase::Terminating => false,
    }
}

/// Whether `leaver`, leaving on its permit, is replaced by the provider (it terminates without
/// lowering its group's capacity, and the provider launches its replacement from the current
/// launch configuration) rather than by the controller (its capacity goes with it). Only a
/// stale instance of a group whose provider replaces leavers, and only while the group holds
/// no more than `desired` instances that count toward it ([`occupies`], the leaver included):
/// a surplus (scale-in, a group gone from the fleet) is never replaced. `group` is every
/// instance of the leaver's group (the leaver among them). The server answers the permit with
/// it; the controller's occupancy agrees with it.
pub fn provider_replaces(spec: &GroupSpec, leaver: &InstanceView, group: &[&InstanceView]) -> bool {
    if !spec.provider_replaces_leavers || leaver.generation >= spec.generation {
        return false;
    }
    let counted = group
        .iter()
        .filter(|i| i.alive && i.group == spec.group && occupies(spec, i))
        .count();
    counted <= spec.desired as usize
}

/// Decide what to do now. Deterministic: the same inputs give the same decision.
pub fn reconcile(
    now: u64,
    groups: &[GroupSpec],
    instances: &[InstanceView],
    timing: &Timing,
) -> Decision {
    let mut d = Decision::default();
    let mut by_group: BTreeMap<&str, Vec<&InstanceView>> = BTreeMap::new();
    for i in instances {
        by_group.entry(i.group.as_str()).or_default().push(i);
    }
    let specs: BTreeMap<&str, &GroupSpec> = groups.iter().map(|g| (g.group.as_str(), g)).collect();

    for (group, list) in &by_group {
        if !specs.contains_key(group) {
            orphans(now, group, list, timing, &mut d);
        }
    }

    for spec in groups {
        let list = by_group
            .get(spec.group.as_str())
            .cloned()
            .unwrap_or_default();
        decide_group(now, spec, &list, timing, &mut d);
    }
    d.actions.sort();
    d
}

/// [`reconcile`] of one group: `list` is every instance of `spec`'s group, in id order. The
/// server reconciles only the groups that changed or whose [`next_change`] came, with the
/// views it keeps up to date; the decision is the part of [`reconcile`]'s for this group.
pub fn reconcile_group(
    now: u64,
    spec: &GroupSpec,
    list: &[&InstanceView],
    timing: &Timing,
) -> Decision {
    let mut d = Decision::default();
    decide_group(now, spec, list, timing, &mut d);
    d.actions.sort();
    d
}

/// [`reconcile`] of the instances of a group no longer in the fleet (`list`, in id order).
pub fn reconcile_orphans(
    now: u64,
    group: &str,
    list: &[&InstanceView],
    timing: &Timing,
) -> Decision {
    let mut d = Decision::default();
    orphans(now, group, list, timing, &mut d);
    d.actions.sort();
    d
}

impl Decision {
    /// Add another group's decision (a pass over several groups, merged in the order of the
    /// groups, as [`reconcile`] takes them).
    pub fn merge(&mut self, other: Decision) {
        self.actions.extend(other.actions);
        self.actions.sort();
        self.targets.extend(other.targets);
        self.suspect.extend(other.suspect);
    }

    /// Whether carrying it out lets instances go (a permit, a termination, a loss), which
    /// frees surge room: the shell then makes another pass at once, so their replacements
    /// launch now rather than a tick later.
    pub fn frees_room(&self) -> bool {
        self.actions.iter().any(|a| {
            matches!(
                a,
                Action::Permit { .. } | Action::Terminate { .. } | Action::Forget { .. }
            )
        })
    }
}

/// The instances of a group gone from the fleet leave.
fn orphans(now: u64, group: &str, list: &[&InstanceView], timing: &Timing, d: &mut Decision) {
    for i in list {
        match (i.alive, i.phase) {
            (false, _) => d.actions.push(Action::Forget {
                instance: i.id.clone(),
                reason: "agent exited".into(),
            }),
            (true, Phase::Active) => d.actions.push(Action::Permit {
                instance: i.id.clone(),
                reason: format!("group {group} is no longer in the fleet"),
            }),
            (true, Phase::Draining) => {
                if let Some(reason) = overstayed(i, now, timing.leave_within_ms) {
                    d.actions.push(Action::Terminate {
                        instance: i.id.clone(),
                        reason,
                    });
                }
            }
            _ => {}
        }
    }
}

/// When the decision of a group's orphans ([`reconcile_orphans`]) could next change with no
/// input: the first leaver's deadline.
pub fn orphans_next_change(now: u64, list: &[&InstanceView], timing: &Timing) -> Option<u64> {
    list.iter()
        .filter_map(|i| overstays_from(i, timing.leave_within_ms))
        .filter(|at| *at > now)
        .min()
}

/// When the decision of one group ([`reconcile_group`]) could next change if nothing but
/// time passes (no heartbeat that matters, no launch, exit or change of its spec): the first
/// after `now` of the times its rules read, each from the same function the rule uses —
/// silence ([`silent_from`]), a leaver's deadline, unhealthy or never healthy for
/// `replace_unhealthy_after`, `min_healthy_time`, the rollout's `healthy_deadline`, the
/// canary bake and the launch backoff. Never later than the first change (a sweep over
/// virtual time proves it, `next_change_is_never_after_the_decision_changes`); it may be
/// earlier, which costs one pass that decides the same. `None`: nothing changes until an
/// input comes.
pub fn next_change(now: u64, spec: &GroupSpec, list: &[&InstanceView], t: &Timing) -> Option<u64> {
    let r = &spec.rollout;
    // The first time after `now` of those given.
    let mut first: Option<u64> = None;
    let mut at = |t: Option<u64>| {
        if let Some(t) = t.filter(|t| *t > now) {
            first = Some(first.map_or(t, |f| f.min(t)));
        }
    };
    for i in list {
        if !i.alive {
            continue;
        }
        at(Some(silent_from(i, t)));
        at(overstays_from(i, spec.leave_within_ms));
        at(ready_from(i, r));
        at(replace_unhealthy_from(spec, i));
    }
    if spec.rollout_open {
        at(Some(rollout_fails_from(now, spec, list, t)));
    }
    if let Some(c) = spec.canary.filter(|c| c.baking_since_ms > 0) {
        at(Some(c.baking_since_ms.saturating_add(c.bake_ms)));
    }
    at(Some(spec.launch_not_before_ms));
    first
}

/// From when a healthy instance counts as ready (healthy for `min_healthy_time`).
fn ready_from(i: &InstanceView, r: &Rollout) -> Option<u64> {
    match i.health {
        Health::Healthy { since_ms } => {
            Some(since_ms.saturating_add(r.min_healthy_time.as_millis()))
        }
        _ => None,
    }
}

/// Whether an instance is ready: healthy for `min_healthy_time`, and heard from.
fn is_ready(i: &InstanceView, now: u64, r: &Rollout, t: &Timing) -> bool {
    match i.health {
        Health::Healthy { since_ms } => {
            fresh_heartbeat(i, now, t)
                && now.saturating_sub(since_ms) >= r.min_healthy_time.as_millis()
        }
        _ => false,
    }
}

/// From when an open rollout fails for want of progress: `healthy_deadline` after the last
/// time a new instance became ready (or the rollout began or was resumed), strictly after.
fn rollout_fails_from(now: u64, spec: &GroupSpec, list: &[&InstanceView], t: &Timing) -> u64 {
    let r = &spec.rollout;
    let last_progress = list
        .iter()
        .filter(|i| i.alive && i.phase == Phase::Active && i.generation >= spec.generation)
        .filter(|i| is_ready(i, now, r, t))
        .filter_map(|i| ready_from(i, r))
        .max()
        .unwrap_or(0)
        .max(spec.generation_since_ms)
        .max(spec.resumed_ms);
    last_progress
        .saturating_add(r.healthy_deadline.as_millis())
        .saturating_add(1)
}

fn decide_group(now: u64, spec: &GroupSpec, list: &[&InstanceView], t: &Timing, d: &mut Decision) {
    let r = &spec.rollout;
    let suspect = suspects_itself(list, now, t);
    // Silent, healthy when last heard, and spared by the self-suspicion guard.
    let spared = |i: &InstanceView| {
        suspect
            && i.alive
            && i.phase == Phase::Active
            && i.ever_healthy
            && !fresh_heartbeat(i, now, t)
            && matches!(i.health, Health::Healthy { .. })
    };
    if suspect {
        d.suspect.push(spec.group.clone());
    }
    let mut targets: Vec<String> = list
        .iter()
        .filter(|i| in_rotation(i, now, t) || spared(i))
        .map(|i| i.id.clone())
        .collect();
    targets.sort();
    d.targets.insert(spec.group.clone(), targets);

    // 1. Gone and broken instances.
    let mut active: Vec<&InstanceView> = Vec::new();
    // Stale instances draining on a permit that the provider replaces (see `occupies`).
    let mut replaced_leavers = 0usize;
    for i in list {
        if !i.alive {
            d.actions.push(Action::Forget {
                instance: i.id.clone(),
                reason: "its agent is no longer running".into(),
            });
            continue;
        }
        if i.phase != Phase::Active {
            if let Some(reason) = overstayed(i, now, spec.leave_within_ms) {
                d.actions.push(Action::Terminate {
                    instance: i.id.clone(),
                    reason,
                });
            }
            if occupies(spec, i) {
                replaced_leavers += 1;
            }
            continue;
        }
        let silent = !fresh_heartbeat(i, now, t);
        if let Some(reason) = broken(now, spec, i, t).filter(|_| !(suspect && silent && guarded(i)))
        {
            d.actions.push(Action::Terminate {
                instance: i.id.clone(),
                reason,
            });
            continue;
        }
        active.push(i);
    }

    let ready = |i: &InstanceView| is_ready(i, now, r, t);
    let healthy = |i: &InstanceView| in_rotation(i, now, t);

    let (mut stale, fresh): (Vec<&InstanceView>, Vec<&InstanceView>) =
        active.iter().partition(|i| i.generation < spec.generation);
    let desired = spec.desired as usize;
    let floor = spec.desired.saturating_sub(r.max_unavailable) as usize;
    // A rollout proves itself when one of its instances turns healthy. Until then, with room
    // to surge, no old instance leaves for it and old instances that die are replaced on
    // the last good generation (as Kubernetes' old ReplicaSet keeps its count): a version
    // that never works cannot drain the group while faults take old instances.
    // A new instance known only from the store (a server restart, a failover) may well be
    // healthy: until it reports, the rollout counts as proven, as before the restart.
    let unproven = spec.rollout_open
        && r.max_surge > 0
        && spec.good_generation > 0
        && spec.good_generation < spec.generation
        && !fresh.iter().any(|i| i.ever_healthy || i.restored);
    let last_good = Some(spec.good_generation).filter(|_| unproven && spec.launches_any_generation);

    // 2. Rollout bookkeeping.
    let ready_fresh = fresh.iter().filter(|i| ready(i)).count();
    // The canary stage holds the rollout until the analysis passed. Its canaries serve
    // beside the old instances within the surge (a `percent` larger than max_surge gets
    // max_surge). While a superseded rollout left more stale instances than desired, the
    // surplus leaves first, the usual way, so that the canaries have room.
    let canary = spec
        .canary
        .filter(|_| spec.rollout_open && !stale.is_empty() && stale.len() <= desired)
        .map(|c| CanaryGate {
            size: c.size.min(r.max_surge.max(1)),
            ..c
        });
    let baking = canary.is_some_and(|c| c.baking_since_ms > 0);
    if spec.rollout_open {
        // Progress is the last time a new instance became ready; the rollout fails when
        // healthy_deadline passes without any.
        let fails_from = rollout_fails_from(now, spec, list, t);
        if stale.is_empty() && ready_fresh >= desired {
            d.actions.push(Action::RolloutDone {
                group: spec.group.clone(),
                generation: spec.generation,
            });
        } else if let Some(i) = fresh.iter().find(|i| {
            r.fail_after_exits > 0
                && !i.ever_healthy
                && i.exits_before_healthy >= r.fail_after_exits
        }) {
            // Fail fast: a version that keeps crashing before it ever turns healthy does
            // not get the whole healthy_deadline.
            d.actions.push(Action::RolloutFailed {
                group: spec.group.clone(),
                generation: spec.generation,
                reason: format!(
                    "{} exited {} times before it was ever healthy (fail_after_exits = {}){}",
                    i.id,
                    i.exits_before_healthy,
                    r.fail_after_exits,
                    i.last_failure
                        .as_deref()
                        .map(|f| format!(": {f}"))
                        .unwrap_or_default()
                ),
                instance: Some(i.id.clone()),
            });
        } else if !spec.paused && !baking && now >= fails_from && !fresh.iter().any(|i| i.restored)
        {
            // A new instance known only from the store may be healthy: a server that was down
            // past the deadline (or a failover) hears from it before it judges the rollout.
            d.actions.push(Action::RolloutFailed {
                group: spec.group.clone(),
                generation: spec.generation,
                reason: format!(
                    "no new instance turned healthy within healthy_deadline ({}); {ready_fresh} of {desired} on generation {} are healthy",
                    r.healthy_deadline, spec.generation
                ),
                instance: fresh
                    .iter()
                    .filter(|i| !ready(i))
                    .max_by_key(|i| i.exits_before_healthy)
                    .map(|i| i.id.clone()),
            });
        }
    }

    if let Some(c) = canary {
        if spec.rollout_open && !spec.paused {
            if c.baking_since_ms == 0 && ready_fresh >= c.size as usize {
                d.actions.push(Action::CanaryBaking {
                    group: spec.group.clone(),
                    generation: spec.generation,
                });
            } else if c.baking_since_ms > 0 && now >= c.baking_since_ms + c.bake_ms {
                d.actions.push(Action::CanaryAnalyse {
                    group: spec.group.clone(),
                    generation: spec.generation,
                });
            }
        }
        // Canaries beside the old instances, within desired + max_surge (and replacements
        // that keep the count): no permit until the analysis passed.
        let occupancy = stale.len() + fresh.len() + replaced_leavers;
        let keep = desired.saturating_sub(occupancy);
        let room = (desired + r.max_surge as usize).saturating_sub(occupancy);
        let want = if spec.paused {
            keep
        } else {
            (c.size as usize)
                .saturating_sub(fresh.len())
                .min(room)
                .max(keep)
        };
        if now >= spec.launch_not_before_ms {
            for _ in 0..want {
                d.actions.push(Action::Launch {
                    group: spec.group.clone(),
                    generation: spec.generation,
                });
            }
        }
        return;
    }

    // 3. Launches: up to desired instances on the current generation, within the surge cap.
    //    A leaver the provider replaces holds its place until it is gone.
    let occupancy = stale.len() + fresh.len() + replaced_leavers;
    let cap = if stale.is_empty() {
        desired
    } else {
        desired + r.max_surge as usize
    };
    // A paused rollout launches nothing for itself: at most what keeps `desired` instances.
    let cap = if spec.paused && !stale.is_empty() {
        desired
    } else {
        cap
    };
    let launches = if now < spec.launch_not_before_ms {
        0
    } else {
        desired
            .saturating_sub(fresh.len())
            .min(cap.saturating_sub(occupancy))
    };
    // While the rollout is unproven, what keeps `desired` (old instances lost) goes on the
    // last good generation, first; the surge tries the new one with what room is left.
    let keep_old = match last_good {
        Some(good) if now >= spec.launch_not_before_ms => {
            let old = stale.iter().filter(|i| i.generation <= good).count();
            desired
                .saturating_sub(old + ready_fresh)
                .min(cap.saturating_sub(occupancy))
        }
        _ => 0,
    };
    let launches = launches.min(cap.saturating_sub(occupancy + keep_old));
    for k in 0..keep_old + launches {
        d.actions.push(Action::Launch {
            group: spec.group.clone(),
            generation: match last_good {
                Some(good) if k < keep_old => good,
                _ => spec.generation,
            },
        });
    }

    // 4. Permits for stale instances, never taking healthy capacity below the floor.
    //    Fresh instances count as healthy only once ready (healthy for min_healthy_time).
    let mut healthy_count = ready_fresh + stale.iter().filter(|i| healthy(i)).count();
    // Unhealthy ones first (they cost nothing), then those of a generation newer than the last
    // good one (a failed rollout's, as a revert leaves them), then the oldest generation,
    // then the oldest launch.
    let known_good =
        |i: &InstanceView| spec.good_generation == 0 || i.generation <= spec.good_generation;
    stale.sort_by_key(|i| {
        (
            healthy(i),
            known_good(i),
            i.generation,
            i.launched_at_ms,
            i.id.clone(),
        )
    });
    let mut remaining_stale = stale.len();
    for i in &stale {
        // A paused rollout hands out no permit, nor one that has not proven itself (but for
        // a surplus over `desired`, which leaves first to make room).
        if spec.paused || (unproven && remaining_stale <= desired) {
            break;
        }
        // Health not known yet (e.g. just after a server restart): wait for its report.
        if i.health == Health::Unknown {
            continue;
        }
        // A replacement on the last good generation that has not turned healthy yet: it was
        // launched to keep the count, and leaves in its turn once it serves.
        if !i.ever_healthy && spec.good_generation > 0 && i.generation <= spec.good_generation {
            continue;
        }
        // Keep enough stale instances to hold the floor until fresh ones are ready.
        if ready_fresh + remaining_stale <= floor && healthy(i) {
            break;
        }
        if healthy(i) {
            if healthy_count <= floor {
                break;
            }
            healthy_count -= 1;
        }
        remaining_stale -= 1;
        d.actions.push(Action::Permit {
            instance: i.id.clone(),
            reason: format!(
                "generation {} is stale (preferred: {})",
                i.generation, spec.generation
            ),
        });
    }

    // 5. Scale-in: more current instances than desired (and nothing stale left).
    if stale.is_empty() && fresh.len() > desired {
        let mut extra: Vec<&&InstanceView> = fresh.iter().collect();
        // Unhealthy first, then the newest.
        extra.sort_by_key(|i| {
            (
                healthy(i),
                std::cmp::Reverse(i.launched_at_ms),
                i.id.clone(),
            )
        });
        for i in extra.into_iter().take(fresh.len() - desired) {
            d.actions.push(Action::Permit {
                instance: i.id.clone(),
                reason: format!("scale-in to {desired}"),
            });
        }
    }
}

/// From when an active instance is replaced for its health: unhealthy for
/// `replace_unhealthy_after`, or never healthy that long after it was first watched.
fn replace_unhealthy_from(spec: &GroupSpec, i: &InstanceView) -> Option<u64> {
    let limit = spec.replace_unhealthy_after_ms;
    match i.health {
        Health::Unhealthy { since_ms } if i.ever_healthy => Some(since_ms.saturating_add(limit)),
        Health::Unhealthy { since_ms } => {
            Some(since_ms.min(i.watched_since_ms).saturating_add(limit))
        }
        Health::Unknown | Health::Starting if !i.ever_healthy => {
            Some(i.watched_since_ms.saturating_add(limit))
        }
        _ => None,
    }
}

/// Why an active instance must be replaced, if it must.
fn broken(now: u64, spec: &GroupSpec, i: &InstanceView, t: &Timing) -> Option<String> {
    let limit = spec.replace_unhealthy_after_ms;
    let secs = |ms: u64| drover_model::Dur::from_millis(ms).to_string();
    if !fresh_heartbeat(i, now, t) {
        return Some(format!(
            "silent: no heartbeat for {}",
            secs(now.saturating_sub(i.last_seen_ms))
        ));
    }
    match i.health {
        Health::Unhealthy { since_ms } if now.saturating_sub(since_ms) >= limit => Some(format!(
            "unhealthy for {} (replace_unhealthy_after = {})",
            secs(now - since_ms),
            secs(limit)
        )),
        Health::Unknown | Health::Starting | Health::Unhealthy { .. }
            if !i.ever_healthy && now.saturating_sub(i.watched_since_ms) >= limit =>
        {
            Some(format!(
                "not healthy {} after launch (replace_unhealthy_after = {})",
                secs(now - i.watched_since_ms),
                secs(limit)
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::Dur;

    const TICK: u64 = 250;
    const TIMING: Timing = Timing {
        silent_after_ms: 5_000,
        leave_within_ms: 30_000,
    };

    fn spec(desired: u32, max_surge: u32, replaces: bool) -> GroupSpec {
        GroupSpec {
            group: "jobs/use1".into(),
            desired,
            generation: 1,
            generation_since_ms: 0,
            rollout_open: false,
            rollout: Rollout {
                max_surge,
                max_unavailable: 1,
                min_healthy_time: Dur::from_secs(1),
                healthy_deadline: Dur::from_secs(60),
                auto_revert: false,
                drain_timeout: Dur::from_secs(2),
                fail_after_exits: 3,
                canary: None,
                analysis: Default::default(),
                waves: Vec::new(),
                wave_bake: Dur::from_secs(600),
            },
            replace_unhealthy_after_ms: 30_000,
            launch_not_before_ms: 0,
            paused: false,
            resumed_ms: 0,
            canary: None,
            provider_replaces_leavers: replaces,
            launches_any_generation: true,
            good_generation: 0,
            leave_within_ms: 22_000,
        }
    }

    fn instance(id: &str, generation: u64, now: u64, healthy_since: Option<u64>) -> InstanceView {
        InstanceView {
            id: id.into(),
            group: "jobs/use1".into(),
            generation,
            launched_at_ms: now,
            phase: Phase::Active,
            alive: true,
            health: match healthy_since {
                Some(since_ms) => Health::Healthy { since_ms },
                None => Health::Starting,
            },
            last_seen_ms: now,
            ever_healthy: healthy_since.is_some(),
            watched_since_ms: now,
            exits_before_healthy: 0,
            last_failure: None,
            permit_at_ms: None,
            restored: false,
        }
    }

    /// A rollout of 3 (max_surge 1, max_unavailable 0) to `generation`, open since
    /// `since_ms`, with generation 1 the last good one.
    fn open_rollout(generation: u64, since_ms: u64) -> GroupSpec {
        let mut s = spec(3, 1, false);
        s.rollout.max_unavailable = 0;
        s.generation = generation;
        s.generation_since_ms = since_ms;
        s.rollout_open = true;
        s.good_generation = 1;
        s
    }

    /// After a revert (generation 3, the content of 1), the broken generation-2 instance
    /// still crash-looping is a surplus over desired: it leaves, so the revert has room.
    #[test]
    fn after_a_revert_the_broken_surplus_leaves_first() {
        let now = 100_000;
        let s = open_rollout(3, now - 1_000);
        let mut broken = instance("i-4", 2, now, None);
        broken.exits_before_healthy = 5;
        let list = vec![
            instance("i-1", 1, now, Some(1_000)),
            instance("i-2", 1, now, Some(1_000)),
            instance("i-3", 1, now, Some(1_000)),
            broken,
        ];
        let d = reconcile(now, &[s], &list, &TIMING);
        assert!(d
            .actions
            .iter()
            .any(|a| matches!(a, Action::Permit { instance, .. } if instance == "i-4")));
    }

    /// A server down past a rollout's healthy_deadline fails it only once it has heard from
    /// the new instances it restored: they may be healthy (the bench's restart at 50,000 failed
    /// the open rollouts of nine groups whose every instance was healthy, before any reported).
    #[test]
    fn a_restart_past_the_deadline_waits_for_the_restored_new_instances() {
        let now = 1_000_000;
        let s = open_rollout(2, now - 600_000);
        let restored = |id| {
            let mut i = instance(id, 2, now, None);
            i.health = Health::Unknown;
            i.restored = true;
            i
        };
        let mut list = vec![restored("i-1"), restored("i-2"), restored("i-3")];
        let failed = |list: &[InstanceView]| {
            reconcile(now, std::slice::from_ref(&s), list, &TIMING)
                .actions
                .iter()
                .any(|a| matches!(a, Action::RolloutFailed { .. }))
        };
        assert!(!failed(&list), "none heard from yet");
        list[0].restored = false;
        list[0].health = Health::Healthy {
            since_ms: now - 100,
        };
        assert!(!failed(&list), "two may still be healthy");
        for i in &mut list[1..] {
            i.restored = false;
            i.health = Health::Starting;
        }
        list[0].health = Health::Starting;
        assert!(
            failed(&list),
            "heard from, none healthy, the deadline long past"
        );
    }

    /// After a server restart, a new instance not heard from yet may be healthy: no old
    /// instance is launched for a rollout that may have proven itself already.
    #[test]
    fn a_restart_mid_rollout_launches_no_old_generation() {
        let now = 100_000;
        let s = open_rollout(2, now - 60_000);
        let mut new = instance("i-4", 2, now, None);
        new.health = Health::Unknown;
        new.restored = true;
        let list = vec![
            instance("i-2", 1, now, Some(1_000)),
            instance("i-3", 1, now, Some(1_000)),
            new,
        ];
        let d = reconcile(now, std::slice::from_ref(&s), &list, &TIMING);
        assert!(
            !d.actions
                .iter()
                .any(|a| matches!(a, Action::Launch { generation: 1, .. })),
            "{:?}",
            d.actions
        );
        // Heard from, and never healthy: now the rollout is unproven, and the count is kept
        // on the good generation.
        let mut list = list;
        list[2].restored = false;
        list[2].health = Health::Starting;
        let d = reconcile(now, &[s], &list, &TIMING);
        assert!(d
            .actions
            .iter()
            .any(|a| matches!(a, Action::Launch { generation: 1, .. })));
    }

    /// A revert leaves a healthy instance of the failed generation (a canary bad only under
    /// load): it is the surplus that leaves, not an instance of the good generation, which
    /// would only be launched again.
    #[test]
    fn after_a_revert_the_failed_generation_leaves_before_the_good_one() {
        let now = 100_000;
        let s = open_rollout(3, now - 1_000);
        let list = vec![
            instance("i-1", 1, now, Some(1_000)),
            instance("i-2", 1, now, Some(1_000)),
            instance("i-3", 1, now, Some(1_000)),
            instance("i-4", 2, now, Some(50_000)),
        ];
        let d = reconcile(now, std::slice::from_ref(&s), &list, &TIMING);
        let permits: Vec<&str> = d
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Permit { instance, .. } => Some(instance.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(permits, ["i-4"], "{:?}", d.actions);
        // Once it drains: room for one of the revert's instances, not another of generation 1.
        let mut list = list;
        list[3].phase = Phase::Draining;
        list[3].permit_at_ms = Some(now);
        let d = reconcile(now + 250, &[s], &list, &TIMING);
        assert!(d
            .actions
            .iter()
            .any(|a| matches!(a, Action::Launch { generation: 3, .. })));
        assert!(!d
            .actions
            .iter()
            .any(|a| matches!(a, Action::Launch { generation: 1, .. })));
    }

    #[test]
    fn leavers_stale_instances_and_orphans_are_told_to_leave_soon() {
        assert!(!leave_soon(Phase::Active, 2, Some(2)));
        assert!(leave_soon(Phase::Active, 1, Some(2)));
        assert!(leave_soon(Phase::Active, 2, None));
        assert!(leave_soon(Phase::Draining, 2, Some(2)));
        assert!(leave_soon(Phase::Terminating, 2, Some(2)));
    }

    #[test]
    fn health_after_a_report_keeps_its_clock_until_it_changes() {
        let h = Health::Unknown.after_report(false, false, 10);
        assert_eq!(h, Health::Starting);
        let h = h.after_report(true, false, 20);
        assert_eq!(h, Health::Healthy { since_ms: 20 });
        assert_eq!(
            h.after_report(true, true, 30),
            Health::Healthy { since_ms: 20 }
        );
        let h = h.after_report(false, true, 40);
        assert_eq!(h, Health::Unhealthy { since_ms: 40 });
        assert_eq!(
            h.after_report(false, true, 50),
            Health::Unhealthy { since_ms: 40 }
        );
        // Known only from the store (Unknown) but healthy before: unhealthy, not starting.
        assert_eq!(
            Health::Unknown.after_report(false, true, 60),
            Health::Unhealthy { since_ms: 60 }
        );
    }

    /// Issue 15: a leaver's deadline is a rule of the controller, counted from the permit's
    /// stored time (a server that restarted since still enforces it): until then nothing
    /// happens to it; from then on it is terminated, whatever its health; one already
    /// terminating is left alone; so is one of a group that left the fleet until its own
    /// (default) deadline.
    #[test]
    fn a_leaver_that_overstays_its_permit_is_terminated() {
        let spec = spec(1, 1, false);
        let permit_at = 50_000;
        let leaver = |now: u64, phase: Phase| InstanceView {
            phase,
            permit_at_ms: Some(permit_at),
            last_seen_ms: now,
            ..instance("old", 1, 0, Some(1_000))
        };
        let fresh = |now: u64| InstanceView {
            last_seen_ms: now,
            ..instance("new", 1, 40_000, Some(41_000))
        };
        let terminated = |d: &Decision| -> Vec<(String, String)> {
            d.actions
                .iter()
                .filter_map(|a| match a {
                    Action::Terminate { instance, reason } => {
                        Some((instance.clone(), reason.clone()))
                    }
                    _ => None,
                })
                .collect()
        };
        let within = spec.leave_within_ms;
        assert_eq!(within, leave_within_ms(2_000, 10_000));
        let early = permit_at + within - 1;
        let list = [leaver(early, Phase::Draining), fresh(early)];
        let d = reconcile(early, std::slice::from_ref(&spec), &list, &TIMING);
        assert_eq!(terminated(&d), vec![], "{d:?}");
        let due = permit_at + within;
        let list = [leaver(due, Phase::Draining), fresh(due)];
        let d = reconcile(due, std::slice::from_ref(&spec), &list, &TIMING);
        assert_eq!(
            terminated(&d),
            [(
                "old".to_string(),
                "its agent did not leave within 22s of its permit".to_string()
            )]
        );
        // Already being terminated, or gone: nothing more.
        let list = [leaver(due, Phase::Terminating), fresh(due)];
        let d = reconcile(due, std::slice::from_ref(&spec), &list, &TIMING);
        assert_eq!(terminated(&d), vec![]);
        // Its group left the fleet: the default deadline of `Timing`.
        let d = reconcile(due, &[], &[leaver(due, Phase::Draining)], &TIMING);
        assert_eq!(terminated(&d), vec![], "{d:?}");
        let late = permit_at + TIMING.leave_within_ms;
        let d = reconcile(late, &[], &[leaver(late, Phase::Draining)], &TIMING);
        assert_eq!(terminated(&d).len(), 1, "{d:?}");
    }

    /// What happened over one rollout of a small world: instances boot in 2 s, leavers drain
    /// for 3 s and are then gone (their exit seen a tick later).
    #[derive(Default)]
    struct Trace {
        /// The most instances counted at once: Active ones plus stale ones draining.
        max_counted: usize,
        /// Launches decided while a stale leaver was still there (draining, its exit not seen:
        /// a launch in the pass that forgets it comes after its `Forget`).
        launches_with_leaver: usize,
        launches: usize,
        permits: usize,
        done_at: Option<u64>,
    }

    fn roll(spec_: GroupSpec) -> Trace {
        let mut spec = spec_;
        let mut now = 600_000;
        let mut list: Vec<InstanceView> = (0..spec.desired)
            .map(|k| instance(&format!("i-old{k}"), 1, 0, Some(0)))
            .collect();
        spec.generation = 2;
        spec.generation_since_ms = now;
        spec.rollout_open = true;
        // Per instance: when a draining one exits, when a new one turns healthy.
        let mut exits: BTreeMap<String, u64> = BTreeMap::new();
        let mut boots: BTreeMap<String, u64> = BTreeMap::new();
        let mut seq = 0;
        let mut t = Trace::default();
        while now < 600_000 + 120_000 {
            now += TICK;
            for i in list.iter_mut() {
                i.last_seen_ms = now;
                if boots.get(&i.id).is_some_and(|b| *b <= now) && !i.ever_healthy {
                    i.health = Health::Healthy { since_ms: now };
                    i.ever_healthy = true;
                }
                if exits.get(&i.id).is_some_and(|e| *e <= now) {
                    i.alive = false;
                }
            }
            let d = reconcile(now, std::slice::from_ref(&spec), &list, &TIMING);
            let leaver = list
                .iter()
                .any(|i| i.alive && i.phase == Phase::Draining && i.generation < spec.generation);
            for a in d.actions {
                match a {
                    Action::Forget { instance, .. } => list.retain(|i| i.id != instance),
                    Action::Permit { instance, .. } => {
                        t.permits += 1;
                        let i = list.iter_mut().find(|i| i.id == instance).unwrap();
                        i.phase = Phase::Draining;
                        exits.insert(instance, now + 3_000);
                    }
                    Action::Launch { generation, .. } => {
                        t.launches += 1;
                        if leaver {
                            t.launches_with_leaver += 1;
                        }
                        seq += 1;
                        let id = format!("i-new{seq}");
                        boots.insert(id.clone(), now + 2_000);
                        list.push(instance(&id, generation, now, None));
                    }
                    Action::RolloutDone { .. } => {
                        spec.rollout_open = false;
                        t.done_at = Some(now);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            let counted = list
                .iter()
                .filter(|i| {
                    i.phase == Phase::Active
                        || (i.phase == Phase::Draining && i.generation < spec.generation)
                })
                .count();
            t.max_counted = t.max_counted.max(counted);
            if t.done_at.is_some() && list.len() == spec.desired as usize {
                assert!(list.iter().all(|i| i.generation == 2 && i.alive));
                break;
            }
        }
        t
    }

    /// Issue 20, item 6: two of three healthy instances silent at once: the server suspects
    /// itself, replaces neither and keeps them in rotation; once they report again nothing
    /// happened. One of three silent is replaced as before, and so is a pair of instances
    /// that never turned healthy (a broken boot is not the server's fault).
    #[test]
    fn when_much_of_a_group_goes_silent_at_once_nothing_is_replaced() {
        let spec = spec(3, 1, false);
        let now = 100_000;
        let healthy = |id: &str, last_seen: u64| InstanceView {
            last_seen_ms: last_seen,
            ..instance(id, 1, 0, Some(1_000))
        };
        let silent_at = now - TIMING.silent_after_ms - 1_000;
        let terminated = |d: &Decision| -> Vec<String> {
            d.actions
                .iter()
                .filter_map(|a| match a {
                    Action::Terminate { instance, .. } => Some(instance.clone()),
                    _ => None,
                })
                .collect()
        };
        let launches = |d: &Decision| {
            d.actions
                .iter()
                .filter(|a| matches!(a, Action::Launch { .. }))
                .count()
        };
        // Two of three silent.
        let list = vec![
            healthy("a", now),
            healthy("b", silent_at),
            healthy("c", silent_at),
        ];
        let d = reconcile(now, std::slice::from_ref(&spec), &list, &TIMING);
        assert_eq!(terminated(&d), Vec::<String>::new(), "{d:?}");
        assert_eq!(launches(&d), 0, "{d:?}");
        assert_eq!(d.suspect, vec![spec.group.clone()]);
        assert_eq!(d.targets[&spec.group], ["a", "b", "c"]);
        // Heard from again: all is as before.
        let list = vec![healthy("a", now), healthy("b", now), healthy("c", now)];
        let d = reconcile(now, std::slice::from_ref(&spec), &list, &TIMING);
        assert!(d.actions.is_empty() && d.suspect.is_empty(), "{d:?}");
        // One of three silent: replaced.
        let list = vec![
            healthy("a", now),
            healthy("b", now),
            healthy("c", silent_at),
        ];
        let d = reconcile(now, std::slice::from_ref(&spec), &list, &TIMING);
        assert_eq!(terminated(&d), ["c"]);
        assert!(d.suspect.is_empty());
        assert_eq!(d.targets[&spec.group], ["a", "b"]);
        // Never healthy and silent: replaced whatever their share.
        let booting = |id: &str| InstanceView {
            last_seen_ms: silent_at,
            ..instance(id, 1, 0, None)
        };
        let list = vec![healthy("a", now), booting("b"), booting("c")];
        let d = reconcile(now, std::slice::from_ref(&spec), &list, &TIMING);
        assert_eq!(terminated(&d), ["b", "c"]);
        assert!(d.suspect.is_empty());
    }

    #[test]
    fn a_provider_that_replaces_leavers_gets_no_second_replacement() {
        let t = roll(spec(3, 0, true));
        assert!(t.done_at.is_some(), "the rollout finishes");
        assert_eq!(t.permits, 3);
        assert_eq!(t.launches, 3, "one launch per leaver, no more");
        assert_eq!(
            t.max_counted, 3,
            "never more than desired active + draining stale"
        );
        assert_eq!(
            t.launches_with_leaver, 0,
            "each launch comes once its leaver is forgotten"
        );
    }

    #[test]
    fn without_it_the_controller_replaces_a_leaver_as_it_drains() {
        let t = roll(spec(3, 0, false));
        assert!(t.done_at.is_some());
        assert_eq!((t.permits, t.launches), (3, 3));
        // Unchanged behaviour: a leaver no longer counts, its replacement launches at once.
        assert_eq!(t.launches_with_leaver, 3);
        assert_eq!(t.max_counted, 4);
    }

    #[test]
    fn with_surge_the_flag_changes_nothing_for_surge_launches() {
        // The server never sets the flag with max_surge > 0; the controller still stays in
        // its budget if it were set.
        let with = roll(spec(3, 1, true));
        let without = roll(spec(3, 1, false));
        assert!(with.done_at.is_some() && without.done_at.is_some());
        assert!(with.max_counted <= 4, "{}", with.max_counted);
        assert_eq!(with.launches, 3);
    }

    #[test]
    fn only_stale_leavers_within_desired_are_replaced_by_the_provider() {
        let s = {
            let mut s = spec(3, 0, true);
            s.generation = 2;
            s
        };
        let mut a = instance("a", 1, 0, Some(0));
        a.phase = Phase::Draining;
        let b = instance("b", 1, 0, Some(0));
        let c = instance("c", 2, 0, Some(0));
        let group = [&a, &b, &c];
        assert!(provider_replaces(&s, &a, &group));
        // Without the flag, or a current leaver (scale-in): the capacity goes with it.
        assert!(!provider_replaces(&spec(3, 0, false), &a, &group));
        let mut current = c.clone();
        current.phase = Phase::Draining;
        assert!(!provider_replaces(&s, &current, &[&a, &b, &current]));
        // A surplus: desired lowered to 2 while 3 are counted.
        let mut smaller = s.clone();
        smaller.desired = 2;
        assert!(!provider_replaces(&smaller, &a, &group));
    }

    /// A new instance whose component keeps exiting before it was ever healthy fails the
    /// rollout at once, with what it said; below the threshold, or once healthy, it does not.
    #[test]
    fn a_version_that_keeps_crashing_fails_its_rollout_at_once() {
        let now = 600_000;
        let mut spec = spec(2, 1, false);
        spec.generation = 2;
        spec.generation_since_ms = now - 1_000;
        spec.rollout_open = true;
        let old: Vec<InstanceView> = (0..2)
            .map(|k| instance(&format!("i-old{k}"), 1, 0, Some(0)))
            .collect();
        let mut new = instance("i-new", 2, now - 900, None);
        new.exits_before_healthy = 2;
        new.last_failure = Some("component app: exit status 1; last output:\npanic".into());
        let failed = |list: &[InstanceView], spec: &GroupSpec| {
            reconcile(now, std::slice::from_ref(spec), list, &TIMING)
                .actions
                .into_iter()
                .find_map(|a| match a {
                    Action::RolloutFailed {
                        reason, instance, ..
                    } => Some((reason, instance)),
                    _ => None,
                })
                .map(|(reason, instance)| {
                    // The instance whose output tells why is named.
                    assert_eq!(instance.as_deref(), Some("i-new"), "{reason}");
                    reason
                })
        };
        let mut list = old.clone();
        list.push(new.clone());
        assert_eq!(failed(&list, &spec), None, "2 exits: not yet");
        list.last_mut().unwrap().exits_before_healthy = 3;
        let reason = failed(&list, &spec).expect("3 exits fail the rollout");
        assert!(
            reason.contains("i-new exited 3 times before it was ever healthy"),
            "{reason}"
        );
        assert!(
            reason.contains("exit status 1; last output:\npanic"),
            "{reason}"
        );
        // Off with 0; and not for an instance that was healthy once.
        let mut off = spec.clone();
        off.rollout.fail_after_exits = 0;
        assert_eq!(failed(&list, &off), None);
        list.last_mut().unwrap().ever_healthy = true;
        assert_eq!(failed(&list, &spec), None);
    }

    /// A paused rollout hands out no permit and launches no surge; it keeps the group at
    /// its desired count, its deadline does not run, and it goes on once resumed.
    #[test]
    fn a_paused_rollout_hands_out_no_permit_and_launches_no_surge() {
        let now = 600_000;
        let mut spec = spec(3, 1, false);
        spec.generation = 2;
        spec.generation_since_ms = now - 120_000;
        spec.rollout_open = true;
        spec.paused = true;
        let mut list: Vec<InstanceView> = (0..2)
            .map(|k| instance(&format!("i-old{k}"), 1, 0, Some(0)))
            .collect();
        list.push(instance("i-new0", 2, now - 60_000, Some(now - 50_000)));
        for i in list.iter_mut() {
            i.last_seen_ms = now;
        }
        let d = reconcile(now, std::slice::from_ref(&spec), &list, &TIMING);
        assert!(
            d.actions.is_empty(),
            "no permit, no launch, no failure past the deadline: {:?}",
            d.actions
        );
        // An old instance is lost: its replacement keeps the count (3), and no more (no
        // surge to 4).
        list[0].alive = false;
        let d = reconcile(now, std::slice::from_ref(&spec), &list, &TIMING);
        let launches = d
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Launch { .. }))
            .count();
        assert_eq!(launches, 1, "back to desired, no surge: {:?}", d.actions);
        assert!(!d.actions.iter().any(|a| matches!(a, Action::Permit { .. })));
        list.remove(0);
        let mut replacement = instance("i-new1", 2, now - 30_000, Some(now - 20_000));
        replacement.last_seen_ms = now;
        list.push(replacement);
        let d = reconcile(now, std::slice::from_ref(&spec), &list, &TIMING);
        assert!(d.actions.is_empty(), "still paused: {:?}", d.actions);
        // Resumed: permits again, and the deadline counts from the resume.
        spec.paused = false;
        spec.resumed_ms = now;
        let d = reconcile(now, std::slice::from_ref(&spec), &list, &TIMING);
        assert!(
            d.actions.iter().any(|a| matches!(a, Action::Permit { .. })),
            "{:?}",
            d.actions
        );
        assert!(!d
            .actions
            .iter()
            .any(|a| matches!(a, Action::RolloutFailed { .. })));
    }

    /// Canaries serve beside the old instances within the surge: a canary of 5 with
    /// max_surge 2 launches 2 (`percent` may ask for more than the surge); a superseded
    /// rollout's surplus leaves first, by permits, so that the canaries have room.
    #[test]
    fn canaries_stay_within_the_surge_and_a_superseded_rollout_makes_room() {
        let now = 600_000;
        let mut spec = spec(4, 2, false);
        spec.rollout.max_unavailable = 0;
        spec.generation = 2;
        spec.generation_since_ms = now - 1_000;
        spec.rollout_open = true;
        spec.canary = Some(CanaryGate {
            size: 5,
            bake_ms: 60_000,
            baking_since_ms: 0,
        });
        let mut list: Vec<InstanceView> = (0..4)
            .map(|k| instance(&format!("i-old{k}"), 1, 0, Some(0)))
            .collect();
        for i in list.iter_mut() {
            i.last_seen_ms = now;
        }
        let d = reconcile(now, std::slice::from_ref(&spec), &list, &TIMING);
        let launches = |d: &Decision| {
            d.actions
                .iter()
                .filter(|a| matches!(a, Action::Launch { .. }))
                .count()
        };
        assert_eq!(launches(&d), 2, "4 + max_surge 2: {:?}", d.actions);
        assert!(!d.actions.iter().any(|a| matches!(a, Action::Permit { .. })));
        // Two ready canaries: the bake begins (the canary is as large as the surge allows).
        for k in 0..2 {
            let mut c = instance(&format!("i-can{k}"), 2, now - 20_000, Some(now - 15_000));
            c.last_seen_ms = now;
            list.push(c);
        }
        let d = reconcile(now, std::slice::from_ref(&spec), &list, &TIMING);
        assert!(
            d.actions
                .iter()
                .any(|a| matches!(a, Action::CanaryBaking { .. })),
            "{:?}",
            d.actions
        );
        assert_eq!(launches(&d), 0);
        // Generation 3 supersedes it: 6 stale (4 + 2) for 4 desired. No canary of 3 can
        // launch within the surge until the surplus left: permits come first.
        spec.generation = 3;
        spec.generation_since_ms = now;
        let d = reconcile(now, std::slice::from_ref(&spec), &list, &TIMING);
        let permits = d
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Permit { .. }))
            .count();
        assert!(permits >= 1, "the surplus leaves: {:?}", d.actions);
        assert_eq!(launches(&d), 0, "no launch above 4 + 2: {:?}", d.actions);
    }

    /// A server that restarts and cannot hear its agents (its network cut, or too busy
    /// catching up) past the grace replaces none of the instances it restored: they count
    /// for the self-suspicion guard as healthy ones do. A few restored ones still silent
    /// among many heard from are replaced as usual.
    #[test]
    fn restored_instances_not_heard_from_after_a_restart_are_not_replaced_at_once() {
        let now = 100_000;
        let mut list: Vec<InstanceView> = (0..10)
            .map(|k| {
                let mut i = instance(&format!("i-{k}"), 1, 0, None);
                i.health = Health::Unknown;
                i.restored = true;
                // The restart's grace ended a while ago.
                i.last_seen_ms = now - 2 * TIMING.silent_after_ms;
                i.watched_since_ms = now - 2 * TIMING.silent_after_ms;
                i
            })
            .collect();
        let s = spec(10, 1, false);
        let d = reconcile(now, std::slice::from_ref(&s), &list, &TIMING);
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        assert_eq!(d.suspect, vec![s.group.clone()]);
        // Eight heard from: the two still silent are replaced.
        for i in &mut list[..8] {
            i.restored = false;
            i.ever_healthy = true;
            i.health = Health::Healthy { since_ms: now };
            i.last_seen_ms = now;
        }
        let d = reconcile(now, std::slice::from_ref(&s), &list, &TIMING);
        let replaced = d
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Terminate { .. }))
            .count();
        assert_eq!(replaced, 2, "{:?}", d.actions);
    }

    /// A small deterministic generator for the sweep below.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
        /// A time in 100 ms steps, up to `most` ms.
        fn time(&mut self, most: u64) -> u64 {
            self.below(most / 100 + 1) * 100
        }
    }

    /// A decision without its wording (which names how long something lasted, so it changes
    /// with the clock while the decision does not).
    fn shape(d: &Decision) -> (Vec<String>, BTreeMap<String, Vec<String>>, Vec<String>) {
        let actions = d
            .actions
            .iter()
            .map(|a| match a {
                Action::Forget { instance, .. } => format!("forget {instance}"),
                Action::Terminate { instance, .. } => format!("terminate {instance}"),
                Action::Permit { instance, .. } => format!("permit {instance}"),
                Action::Launch { group, generation } => format!("launch {group} {generation}"),
                Action::RolloutDone { generation, .. } => format!("done {generation}"),
                Action::CanaryBaking { generation, .. } => format!("baking {generation}"),
                Action::CanaryAnalyse { generation, .. } => format!("analyse {generation}"),
                Action::RolloutFailed {
                    generation,
                    instance,
                    ..
                } => format!("failed {generation} {instance:?}"),
            })
            .collect();
        (actions, d.targets.clone(), d.suspect.clone())
    }

    /// A random group at `now`: a rollout or not, a canary or not, instances in every phase
    /// and health, some silent, some leavers, a launch backoff. Every time and duration is a
    /// multiple of 100 ms, so a decision can change only at a multiple of 100 ms or one ms
    /// after one (the strict comparisons): the sweep looks at every such time.
    fn random_group(g: &mut Lcg, now: u64) -> (GroupSpec, Vec<InstanceView>, Timing) {
        // In a quiet group every instance was heard from just now and silence is far off, so
        // the other deadlines come first.
        let quiet = g.chance(50);
        let timing = Timing {
            silent_after_ms: if quiet { 60_000 } else { 1_000 } + g.time(15_000),
            leave_within_ms: 1_000 + g.time(30_000),
        };
        let mut s = spec(1 + g.below(5) as u32, g.below(3) as u32, g.chance(20));
        s.rollout.max_unavailable = g.below(3) as u32;
        s.rollout.min_healthy_time = Dur::from_millis(g.time(10_000));
        s.rollout.healthy_deadline = Dur::from_millis(1_000 + g.time(40_000));
        s.rollout.fail_after_exits = g.below(4) as u32;
        s.replace_unhealthy_after_ms = 1_000 + g.time(30_000);
        s.leave_within_ms = 1_000 + g.time(30_000);
        s.generation = 1 + g.below(3);
        if g.chance(60) {
            s.rollout_open = true;
            s.generation_since_ms = now - g.time(30_000);
            s.good_generation = g.below(s.generation);
            s.paused = g.chance(15);
            s.resumed_ms = if g.chance(20) {
                now - g.time(20_000)
            } else {
                0
            };
        }
        if g.chance(25) {
            s.canary = Some(CanaryGate {
                size: 1 + g.below(2) as u32,
                bake_ms: 1_000 + g.time(20_000),
                baking_since_ms: if g.chance(50) {
                    now - g.time(20_000)
                } else {
                    0
                },
            });
        }
        if g.chance(30) {
            s.launch_not_before_ms = now - 5_000 + g.time(20_000);
        }
        let n = g.below(8);
        let list = (0..n)
            .map(|k| {
                let launched = now - g.time(60_000);
                let ever_healthy = g.chance(60);
                let health = match g.below(4) {
                    0 => Health::Unknown,
                    1 => Health::Starting,
                    2 => Health::Healthy {
                        since_ms: now - g.time(20_000),
                    },
                    _ => Health::Unhealthy {
                        since_ms: now - g.time(40_000),
                    },
                };
                let phase = match g.below(6) {
                    0 => Phase::Draining,
                    1 => Phase::Terminating,
                    _ => Phase::Active,
                };
                InstanceView {
                    id: format!("i-{k}"),
                    group: s.group.clone(),
                    generation: 1 + g.below(s.generation),
                    launched_at_ms: launched,
                    phase,
                    alive: g.chance(90),
                    health,
                    // Some heard from a while ago, some after a restart's grace (ahead).
                    last_seen_ms: now - g.time(if quiet { 500 } else { 20_000 })
                        + if g.chance(10) { 10_000 } else { 0 },
                    ever_healthy,
                    watched_since_ms: launched + g.time(5_000),
                    exits_before_healthy: g.below(4) as u32,
                    last_failure: None,
                    permit_at_ms: (phase == Phase::Draining).then(|| now - g.time(40_000)),
                    restored: g.chance(10),
                }
            })
            .collect();
        (s, list, timing)
    }

    /// The server reconciles a group again only when an input changes it or at its
    /// `next_change`: nothing that time alone changes may come before it. For random groups,
    /// the decision at every time that could differ (each 100 ms step and 1 ms after it, up
    /// to 90 s on) is the decision of `now` until `next_change`, and one that changes in that
    /// window has a `next_change` at or before it.
    #[test]
    fn next_change_is_never_after_the_decision_changes() {
        let mut g = Lcg(15);
        let mut changed_within = 0;
        for case in 0..400 {
            let now = 1_000_000;
            let (s, list, timing) = random_group(&mut g, now);
            let refs: Vec<&InstanceView> = list.iter().collect();
            let first = shape(&reconcile_group(now, &s, &refs, &timing));
            let next = next_change(now, &s, &refs, &timing);
            assert!(next.is_none_or(|at| at > now), "case {case}: {next:?}");
            let mut changed = None;
            'sweep: for step in 0..=900u64 {
                for at in [now + step * 100, now + step * 100 + 1] {
                    if at <= now {
                        continue;
                    }
                    if shape(&reconcile_group(at, &s, &refs, &timing)) != first {
                        changed = Some(at);
                        break 'sweep;
                    }
                }
            }
            if let Some(at) = changed {
                changed_within += 1;
                assert!(
                    next.is_some_and(|n| n <= at),
                    "case {case}: the decision changes at +{} ms but next_change is {:?}\n{s:?}\n{list:#?}",
                    at - now,
                    next.map(|n| n - now)
                );
            }
        }
        // The sweep saw decisions that change with time, not only ones that never do.
        assert!(changed_within > 100, "{changed_within}");
    }

    /// A heartbeat that only says "still here" does not call for a pass; one that changes
    /// health, or that comes from an instance gone silent, does.
    #[test]
    fn only_heartbeats_that_change_something_call_for_a_pass() {
        let before = instance("i-1", 1, 10_000, Some(1_000));
        let mut after = before.clone();
        after.last_seen_ms = 14_000;
        assert!(!view_change_matters(&before, &after, &TIMING));
        // Silent since 5 s after 10,000: heard again.
        after.last_seen_ms = 16_000;
        assert!(view_change_matters(&before, &after, &TIMING));
        let mut sick = before.clone();
        sick.health = Health::Unhealthy { since_ms: 12_000 };
        assert!(view_change_matters(&before, &sick, &TIMING));
        // A restored instance's grace ends when it reports (its time goes back).
        let mut restored = before.clone();
        restored.last_seen_ms = 30_000;
        assert!(view_change_matters(&restored, &before, &TIMING));
    }

    /// Reconciling groups one at a time decides what one pass over all of them decides.
    #[test]
    fn groups_reconciled_one_at_a_time_decide_as_one_pass() {
        let mut g = Lcg(7);
        let now = 1_000_000;
        let mut specs = Vec::new();
        let mut all = Vec::new();
        for k in 0..20 {
            let (mut s, list, _) = random_group(&mut g, now);
            s.group = format!("svc{k}/r");
            all.extend(list.into_iter().map(|mut i| {
                i.id = format!("{}-{k}", i.id);
                i.group = s.group.clone();
                i
            }));
            specs.push(s);
        }
        // One group gone from the fleet.
        let orphan = specs.pop().unwrap();
        let timing = TIMING;
        let whole = reconcile(now, &specs, &all, &timing);
        let mut parts = Decision::default();
        for s in &specs {
            let list: Vec<&InstanceView> = all.iter().filter(|i| i.group == s.group).collect();
            parts.merge(reconcile_group(now, s, &list, &timing));
        }
        let list: Vec<&InstanceView> = all.iter().filter(|i| i.group == orphan.group).collect();
        parts.merge(reconcile_orphans(now, &orphan.group, &list, &timing));
        assert_eq!(whole, parts);
    }
}
