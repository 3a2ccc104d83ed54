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
    pub rollout: Rollout,
    /// An instance that has not turned healthy this long after launch, or that has been
    /// unhealthy this long, is replaced.
    pub replace_unhealthy_after_ms: u64,
    /// No launch before this time: instances that die before turning healthy back off
    /// further launches, so a broken version does not turn into a launch storm.
    pub launch_not_before_ms: u64,
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
}

/// Timings that are not per service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// An instance not heard from for this long is out of rotation and is replaced.
    pub silent_after_ms: u64,
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
    /// The rollout to `generation` did not turn healthy within its deadline.
    RolloutFailed {
        group: String,
        generation: u64,
        reason: String,
    },
}

/// The controller's output for one tick.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    pub actions: Vec<Action>,
    /// Per group, the instances the balancer should send new connections to, sorted.
    pub targets: BTreeMap<String, Vec<String>>,
}

fn fresh_heartbeat(i: &InstanceView, now: u64, t: &Timing) -> bool {
    now.saturating_sub(i.last_seen_ms) <= t.silent_after_ms
}

/// Whether new connections may go to this instance.
pub fn in_rotation(i: &InstanceView, now: u64, t: &Timing) -> bool {
    i.phase == Phase::Active
        && i.alive
        && matches!(i.health, Health::Healthy { .. })
        && fresh_heartbeat(i, now, t)
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
            // The group was removed from the fleet: its instances leave.
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
                    _ => {}
                }
            }
        }
    }

    for spec in groups {
        let list = by_group
            .get(spec.group.as_str())
            .cloned()
            .unwrap_or_default();
        reconcile_group(now, spec, &list, timing, &mut d);
    }
    d.actions.sort();
    d
}

fn reconcile_group(
    now: u64,
    spec: &GroupSpec,
    list: &[&InstanceView],
    t: &Timing,
    d: &mut Decision,
) {
    let r = &spec.rollout;
    let mut targets: Vec<String> = list
        .iter()
        .filter(|i| in_rotation(i, now, t))
        .map(|i| i.id.clone())
        .collect();
    targets.sort();
    d.targets.insert(spec.group.clone(), targets);

    // 1. Gone and broken instances.
    let mut active: Vec<&InstanceView> = Vec::new();
    for i in list {
        if !i.alive {
            d.actions.push(Action::Forget {
                instance: i.id.clone(),
                reason: "its agent is no longer running".into(),
            });
            continue;
        }
        if i.phase != Phase::Active {
            continue;
        }
        if let Some(reason) = broken(now, spec, i, t) {
            d.actions.push(Action::Terminate {
                instance: i.id.clone(),
                reason,
            });
            continue;
        }
        active.push(i);
    }

    let ready = |i: &InstanceView| match i.health {
        Health::Healthy { since_ms } => {
            fresh_heartbeat(i, now, t)
                && now.saturating_sub(since_ms) >= r.min_healthy_time.as_millis()
        }
        _ => false,
    };
    let healthy = |i: &InstanceView| in_rotation(i, now, t);

    let (mut stale, fresh): (Vec<&InstanceView>, Vec<&InstanceView>) =
        active.iter().partition(|i| i.generation < spec.generation);
    let desired = spec.desired as usize;
    let floor = spec.desired.saturating_sub(r.max_unavailable) as usize;

    // 2. Rollout bookkeeping.
    let ready_fresh = fresh.iter().filter(|i| ready(i)).count();
    if spec.rollout_open {
        // Progress is the last time a new instance became ready; the rollout fails when
        // healthy_deadline passes without any.
        let last_progress = fresh
            .iter()
            .filter(|i| ready(i))
            .filter_map(|i| match i.health {
                Health::Healthy { since_ms } => Some(since_ms + r.min_healthy_time.as_millis()),
                _ => None,
            })
            .max()
            .unwrap_or(0)
            .max(spec.generation_since_ms);
        if stale.is_empty() && ready_fresh >= desired {
            d.actions.push(Action::RolloutDone {
                group: spec.group.clone(),
                generation: spec.generation,
            });
        } else if now.saturating_sub(last_progress) > r.healthy_deadline.as_millis() {
            d.actions.push(Action::RolloutFailed {
                group: spec.group.clone(),
                generation: spec.generation,
                reason: format!(
                    "no new instance turned healthy within healthy_deadline ({}); {ready_fresh} of {desired} on generation {} are healthy",
                    r.healthy_deadline, spec.generation
                ),
            });
        }
    }

    // 3. Launches: up to desired instances on the current generation, within the surge cap.
    let occupancy = stale.len() + fresh.len();
    let cap = if stale.is_empty() {
        desired
    } else {
        desired + r.max_surge as usize
    };
    let launches = if now < spec.launch_not_before_ms {
        0
    } else {
        desired
            .saturating_sub(fresh.len())
            .min(cap.saturating_sub(occupancy))
    };
    for _ in 0..launches {
        d.actions.push(Action::Launch {
            group: spec.group.clone(),
            generation: spec.generation,
        });
    }

    // 4. Permits for stale instances, never taking healthy capacity below the floor.
    //    Fresh instances count as healthy only once ready (healthy for min_healthy_time).
    let mut healthy_count = ready_fresh + stale.iter().filter(|i| healthy(i)).count();
    // Unhealthy ones first (they cost nothing), then the oldest generation, then the oldest launch.
    stale.sort_by_key(|i| (healthy(i), i.generation, i.launched_at_ms, i.id.clone()));
    let mut remaining_stale = stale.len();
    for i in &stale {
        // Health not known yet (e.g. just after a server restart): wait for its report.
        if i.health == Health::Unknown {
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
