//! The fleet's status as `drover status` shows it, built from the world in one pass over the
//! instances: per-group counts always, the instances a [`Listing`] asks for.

use drover_model::api::{
    AutoscaleStatus, FleetStatus, GroupStatus, InstanceState, InstanceStatus, RolloutStatus,
};
use drover_model::record::Lifecycle;

use super::{Group, Instance, World};
use crate::Health;

/// Which instances a status lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Listing {
    /// Every instance.
    #[default]
    All,
    /// None: per-group counts only.
    None,
    /// None, but each group's instance ids (see [`World::status_of`]).
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

/// Whether `g`'s rollout is in its canary stage (a canary configured, not passed yet, and
/// instances of older generations left).
fn st_canary(st: &World, g: &Group) -> bool {
    !g.record.rollout.canary_passed
        && st.service(g).is_some_and(|s| s.rollout.canary.is_some())
        && st
            .instances
            .group_views(&g.record.group)
            .any(|v| v.generation < g.record.generation)
}

impl World {
    pub fn status(&self, now: u64, silent_after_ms: u64) -> FleetStatus {
        self.status_of(now, silent_after_ms, &Listing::All).0
    }

    /// The fleet's status with the instances `listing` asks for; the counts (healthy, current,
    /// stale) are over every instance either way. With [`Listing::Ids`] the instances are
    /// left out and returned instead as each group's ids with whether each is in rotation,
    /// for the server's status to read a chunk at a time. One pass over the instances.
    pub fn status_of(
        &self,
        now: u64,
        silent_after_ms: u64,
        listing: &Listing,
    ) -> (FleetStatus, Vec<GroupIds>) {
        let (status, ids, _) = self.status_counted(now, silent_after_ms, listing);
        (status, ids)
    }

    /// [`World::status_of`], and each group's instances by state (in the order of
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
}

/// What `drover status` calls the instance now.
pub fn instance_state(i: &Instance, now: u64, silent_after_ms: u64) -> InstanceState {
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

pub fn instance_status(
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
