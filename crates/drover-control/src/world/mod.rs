//! The fleet's world as the control plane knows it, with no I/O: desired state (loaded from
//! the store by the server, set by the simulation) and soft state (heartbeats, rebuilt from
//! agents after a restart). The server and the simulation hold the same [`World`].

use std::collections::BTreeMap;

mod calls;
mod canary;
mod heartbeat;
mod instances;
mod passes;
mod status;
mod step;

pub use calls::*;
pub use canary::*;
pub use heartbeat::*;
pub use instances::*;
pub use passes::*;
pub use status::*;
pub use step::*;

use crate::schedule::ScheduleMemory;
use crate::{GroupSpec, Health, InstanceView, Phase};
use drover_model::api::{ComponentReport, Revision, Utilization};
use drover_model::record::{GroupRecord, InstanceRecord, Lifecycle};
use drover_model::{Fleet, Plan};

/// One group: its stored record, its current plan and rollout bookkeeping.
#[derive(Clone, Debug)]
pub struct Group {
    pub record: GroupRecord,
    pub plan: Plan,
    pub provider: String,
    pub ingress: Option<(std::net::SocketAddr, u16)>,
}

impl Group {
    /// A group as a change planned it ([`crate::change::plan`]), with its region's provider
    /// and its ingress in `fleet` (the fleet the change makes).
    pub fn planned(group: &str, planned: &crate::change::PlannedGroup, fleet: &Fleet) -> Group {
        let (provider, ingress) =
            provider_and_ingress(fleet, &planned.plan.service, &planned.plan.region);
        Group {
            record: GroupRecord {
                group: group.to_string(),
                desired: planned.desired,
                desired_reason: planned.desired_reason.clone(),
                generation: planned.generation,
                rollout: planned.rollout.clone(),
            },
            plan: planned.plan.clone(),
            provider,
            ingress,
        }
    }

    /// What a change finds of this group ([`crate::change::Situation::groups`]).
    pub fn before(&self) -> crate::change::Before<'_> {
        crate::change::Before {
            desired: self.record.desired,
            desired_reason: &self.record.desired_reason,
            generation: self.record.generation,
            rollout: &self.record.rollout,
            plan: &self.plan,
        }
    }
}

/// A group's provider (its region's) and ingress (the address its balancer listens on, and
/// the port of its instances it forwards to). On AWS the ingress is a Network Load Balancer:
/// no listener of ours.
pub fn provider_and_ingress(
    fleet: &Fleet,
    service: &str,
    region: &str,
) -> (String, Option<(std::net::SocketAddr, u16)>) {
    let provider = fleet
        .regions
        .get(region)
        .map(|r| r.provider.as_str().to_string())
        .unwrap_or_default();
    if provider == drover_model::fleet::ProviderKind::Aws.as_str() {
        return (provider, None);
    }
    let ingress = fleet.services.get(service).and_then(|svc| {
        let ing = svc.ingress.as_ref()?;
        let listen = ing
            .listen_in
            .get(region)
            .unwrap_or(&ing.listen)
            .parse()
            .ok()?;
        let (_, _, port) = Fleet::ingress_target(svc)?;
        Some((listen, port))
    });
    (provider, ingress)
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

#[derive(Clone, Debug)]
pub struct Instance {
    pub record: InstanceRecord,
    pub soft: Soft,
    pub alive: bool,
}

/// What a group's last pass saw and decided ([`World::reconcile_due`]).
#[derive(Clone, Debug)]
pub struct LastPass {
    /// The spec it reconciled (a change of spec calls for a pass).
    pub spec: crate::GroupSpec,
    /// When its decision could next change with no input ([`crate::group::next_change`]).
    pub next_change: Option<u64>,
    /// It decided something: the next pass looks again (what was done changed it, or it
    /// failed and is tried again).
    pub acted: bool,
}

/// What one pass did ([`World::reconcile_due`]).
#[derive(Debug, Default)]
pub struct Pass {
    pub decision: crate::Decision,
    /// Groups reconciled, and the instances they hold.
    pub groups: usize,
    pub instances: usize,
}

#[derive(Default)]
pub struct World {
    pub revision: Option<Revision>,
    pub groups: BTreeMap<String, Group>,
    pub instances: Instances,
    /// Per group, its last pass (which groups the next one reconciles).
    pub last_pass: BTreeMap<String, LastPass>,
    /// Groups the self-suspicion guard holds, as their last passes said.
    pub suspect: std::collections::BTreeSet<String>,
    /// The groups the guard's events last said it holds ([`World::note_suspicion`]).
    pub suspicion_said: std::collections::BTreeSet<String>,
    pub instance_seq: u64,
    /// Instances currently given to the balancer, per group.
    pub targets: BTreeMap<String, Vec<String>>,
    /// Per group, what the balancers and discovery were last given besides `targets`: the
    /// instances leaving, and the plan generation (whose ports peers see). A pass that
    /// changes none of the three gives them nothing (a pass costs what changed).
    pub published: BTreeMap<String, (Vec<String>, u64)>,
    /// Per group: instances that ended before ever turning healthy, in a row, and the time
    /// before which no new launch happens.
    pub launch_backoff: BTreeMap<String, crate::LaunchBackoff>,
    /// Per group: the autoscaler's memory (soft).
    pub autoscale: BTreeMap<String, crate::AutoscaleState>,
    /// One-off scheduled changes (stored), by id.
    pub once: Vec<drover_model::api::ScheduledScale>,
    /// Per group: what the schedule rules remember (stored as counters, [`memory_counters`]).
    pub schedule_memory: BTreeMap<String, ScheduleMemory>,
}

const BEGAN: &str = "schedule.began.";
const ENDED: &str = "schedule.ended.";
const RESTORE: &str = "schedule.restore.";

/// The schedule rules' memory of every group, from the store's counters
/// (`schedule.began.GROUP.ID` = start of the window seen beginning, `schedule.ended.GROUP.ID`,
/// `schedule.restore.GROUP` = the count to go back to + 1, 0 for none).
pub fn memory_from_counters(counters: &BTreeMap<String, u64>) -> BTreeMap<String, ScheduleMemory> {
    let mut out: BTreeMap<String, ScheduleMemory> = BTreeMap::new();
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

/// The counters that store `group`'s memory (all of them: a memory holds a few), as
/// (name, value).
pub fn memory_counters(group: &str, m: &ScheduleMemory) -> Vec<(String, u64)> {
    let mut w: Vec<(String, u64)> = m
        .began
        .iter()
        .map(|(id, v)| (format!("{BEGAN}{group}.{id}"), *v))
        .chain(
            m.ended
                .iter()
                .map(|(id, v)| (format!("{ENDED}{group}.{id}"), *v)),
        )
        .collect();
    w.push((
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
pub fn lifecycle_of(p: Phase) -> Lifecycle {
    match p {
        Phase::Active => Lifecycle::Active,
        Phase::Draining => Lifecycle::Draining,
        Phase::Terminating => Lifecycle::Terminating,
    }
}

/// The controller's name for a stored lifecycle.
pub fn phase_of(l: Lifecycle) -> Phase {
    match l {
        Lifecycle::Active => Phase::Active,
        Lifecycle::Draining => Phase::Draining,
        Lifecycle::Terminating => Phase::Terminating,
    }
}

pub fn view(i: &Instance) -> InstanceView {
    view_named(i, i.record.id.clone(), i.record.group.clone())
}

/// [`view`], with the instance's id and group given (a refresh moves them from the view it
/// replaces: they never change).
pub(crate) fn view_named(i: &Instance, id: String, group: String) -> InstanceView {
    InstanceView {
        id,
        group,
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

impl World {
    /// An instance of `group` ended before turning healthy: back off the next launch.
    pub fn launch_failed(&mut self, group: &str, now: u64) -> u32 {
        self.launch_backoff
            .entry(group.to_string())
            .or_default()
            .failed(now)
    }

    /// The heartbeat answer's `leave_soon` (`crate::group::leave_soon`).
    pub fn leave_soon(&self, inst: &Instance) -> bool {
        crate::group::leave_soon(
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
            canary: rollout.canary.as_ref().map(|c| crate::CanaryGate {
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
            leave_within_ms: crate::group::leave_within_ms(
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
        crate::rollout::apply_to_spec(&g.record.rollout, &mut spec);
        spec
    }

    /// Whether `instance`, leaving on its permit, lowers its group's capacity as it goes (the
    /// permit's `decrement`). Not when the provider replaces it: a stale instance of an `aws`
    /// group whose rollout has no surge, the group at or under its desired count
    /// ([`crate::group::provider_replaces`]); the Auto Scaling group then launches
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
        !crate::group::provider_replaces(&spec, leaver, &group)
    }

    /// Every instance's view, built afresh (the kept ones are [`Instances::group_views`]).
    pub fn views(&self) -> Vec<InstanceView> {
        self.instances.values().map(view).collect()
    }

    /// One controller pass over the groups that need one ([`World::due`]), each by
    /// [`World::reconcile_one`]. The decision covers the groups reconciled (their targets
    /// only); `suspect` is every group the guard holds.
    pub fn reconcile_due(&mut self, now: u64, timing: &crate::Timing) -> Pass {
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

    /// Reconcile one group from its kept views (`crate::group::reconcile_group`,
    /// or `reconcile_orphans` for a group gone from the fleet), remember its spec, its
    /// `next_change` and whether it acted, and add its decision to `pass`.
    pub fn reconcile_one(
        &mut self,
        group: &str,
        now: u64,
        timing: &crate::Timing,
        pass: &mut Pass,
    ) {
        self.instances.changed.remove(group);
        let list: Vec<&InstanceView> = self.instances.group_views(group).collect();
        pass.groups += 1;
        pass.instances += list.len();
        let Some(g) = self.groups.get(group) else {
            let part = crate::group::reconcile_orphans(now, group, &list, timing);
            pass.decision.actions.extend(part.actions);
            return;
        };
        let spec = self.spec(g);
        let part = crate::group::reconcile_group(now, &spec, &list, timing);
        let next_change = crate::group::next_change(now, &spec, &list, timing);
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
    pub fn schedules<'a>(&'a self, g: &'a Group) -> crate::Schedules<'a> {
        let svc = self.service(g);
        let (base_min, base_max) = self.capacity(g);
        crate::Schedules {
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
    pub fn bounds(&self, g: &Group, now: u64) -> crate::Bounds {
        if !self.has_schedules(g) {
            let (min, max) = self.capacity(g);
            return crate::Bounds {
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
            .of_group(&g.record.group)
            .map(|i| crate::autoscale::Offer {
                alive: i.alive,
                phase: phase_of(i.record.lifecycle),
                health: i.soft.health,
                last_seen_ms: i.soft.last_seen_ms,
                value: match custom {
                    Some(name) => i.soft.utilization.custom.get(name).copied(),
                    None => Some(i.soft.utilization.cpu),
                },
            });
        crate::autoscale::samples(now, policy, offers)
    }

    fn capacity(&self, g: &Group) -> (u32, u32) {
        self.fleet()
            .and_then(|f| f.services.get(&g.plan.service))
            .map(|s| (s.capacity.min, s.capacity.max))
            .unwrap_or((0, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::api::InstanceState;
    use drover_model::record::RolloutRecord;

    /// Two groups of 5,000 instances in every state there is.
    fn fleet_of_10000(now: u64) -> World {
        let text = drover_test_support::fleets::web("sim", &["a", "b"])
            .capacity(1, 5000, 6000)
            .toml();
        let fleet = drover_model::parse_fleet(&text, "drover.toml").unwrap();
        let mut st = World::default();
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
    fn assert_views_kept(st: &World) {
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
        let timing = crate::Timing {
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
        let full = crate::reconcile(now, &st.specs(), &st.views(), &timing);
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
        let full = crate::reconcile(at, &st.specs(), &st.views(), &timing);
        let due = st.reconcile_due(at, &timing);
        assert_eq!(due.groups, 2);
        assert_eq!(due.decision.actions, full.actions);
        assert_eq!(due.decision.targets, full.targets);
    }
}
