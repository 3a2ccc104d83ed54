//! A change of desired state, planned: from the world as the change finds it, the fleet the
//! change makes, what was asked and the time, the group records to write (a new generation
//! with its rollout begun, or the plan held for a wave or by hand), the groups removed, the
//! events and their wording, and what the answer says. No I/O, no clock: the server carries a
//! plan out (artifact checks, image pins, agent tokens, one store commit, then memory, then
//! providers and balancers), and the simulation moves its groups by the same group rule
//! ([`group`]).

use std::collections::BTreeMap;

use drover_model::api::{Drift, RolloutPlan, ScheduleFirings, ScheduledScale};
use drover_model::diff::Change;
use drover_model::record::RolloutRecord;
use drover_model::{EventKind, Fleet, GroupId, NewEvent, Plan};

use crate::rollout;

/// Why desired state changes.
#[derive(Clone, Debug)]
pub enum Origin {
    /// A fleet file applied by a person.
    File,
    /// `drover deploy`: the description says what was asked. With no groups named it goes
    /// wave by wave; with some (`--region`), only they get the change and the service's
    /// other groups are held by hand.
    Deploy { why: String, only: Vec<String> },
    /// `drover rollback`, `drover destroy`: the description says what was asked.
    Command(String),
    /// The next wave of the current revision's change reaches these groups (no new revision).
    Wave { wave: usize, groups: Vec<String> },
    /// A rollout failed; these groups (to the generation that failed) go back to their last
    /// good versions.
    AutoRevert { failed: BTreeMap<String, u64> },
}

/// Boot time assumed for estimates when a group has no history yet.
pub const DEFAULT_BOOT_MS: u64 = 3_000;

/// One group as the change finds it.
#[derive(Clone, Copy, Debug)]
pub struct Before<'a> {
    pub desired: u32,
    /// Who or what set `desired`.
    pub desired_reason: &'a str,
    pub generation: u64,
    pub rollout: &'a RolloutRecord,
    /// The plan of `generation`.
    pub plan: &'a Plan,
}

/// The world as the change finds it.
#[derive(Clone, Debug, Default)]
pub struct Situation<'a> {
    /// The current revision's fleet (none before the first apply) ...
    pub fleet: Option<&'a Fleet>,
    /// ... and its number (0: none).
    pub revision: u64,
    /// The fleet file as a person last applied it (the base of the three-way merge): a file
    /// sets a count only where it changed it since.
    pub last_applied: Option<&'a Fleet>,
    /// Every group now, by id.
    pub groups: BTreeMap<String, Before<'a>>,
    /// For a group of the new fleet with none now: its first generation with no stored plan
    /// (a group back in the fleet continues its numbering: plans are immutable and kept).
    /// Absent: 1. [`new_groups`] names the groups it needs.
    pub unused_generation: BTreeMap<String, u64>,
    /// How long instances took to turn healthy lately (for the estimates).
    pub boot_ms: Option<u64>,
    /// One-off scheduled changes (`scale --at`): with the file's schedules, they raise a
    /// group's range.
    pub once: &'a [ScheduledScale],
}

/// What was asked.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub origin: &'a Origin,
    /// The fleet file's name: the reason of a count the file sets.
    pub file: &'a str,
    /// `apply --force-file`: the file's values win, counts included.
    pub force_file: bool,
    /// The fleet the change makes (for a file, after the three-way merge).
    pub fleet: &'a Fleet,
    /// What the merge kept live against the file; the plan adds the counts it keeps.
    pub drift: Vec<Drift>,
}

/// A group as the change leaves it: what its record and plan become.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedGroup {
    pub desired: u32,
    pub desired_reason: String,
    pub generation: u64,
    pub rollout: RolloutRecord,
    /// The plan of `generation` (a held group keeps its plan).
    pub plan: Plan,
}

/// What the change commits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Nothing changes: nothing is stored.
    Nothing,
    /// A new revision with this number.
    Revision { number: u64 },
    /// A wave, or a deploy of what the revision already says to groups held by hand: the
    /// revision's change goes further, with no new revision: its new plans say the current
    /// revision (whose text a revert to them restores).
    Release,
}

/// A planned change: data only, carried out by a shell.
#[derive(Clone, Debug)]
pub struct ChangePlan {
    pub commit: Commit,
    /// The revision's summary (or, for a [`Commit::Release`], what the `applied` event says).
    pub summary: String,
    /// What changed in the fleet (secret values redacted).
    pub changes: Vec<Change>,
    /// One line per group whose plan changes or is held.
    pub plan_changes: Vec<String>,
    pub rollouts: Vec<RolloutPlan>,
    pub drift: Vec<Drift>,
    /// The next firings of the schedules the file adds or changes.
    pub schedules: Vec<ScheduleFirings>,
    /// Every group of the new fleet, as the change leaves it.
    pub groups: BTreeMap<String, PlannedGroup>,
    /// The new plans to store (a group's new generation), in fleet order.
    pub new_plans: Vec<Plan>,
    /// Groups gone from the fleet.
    pub removed: Vec<String>,
    /// The groups' events, in order (after the `applied` event).
    pub events: Vec<NewEvent>,
    /// Groups whose count the file (or a new group) set: autoscaling goes on from it.
    pub file_scaled: Vec<(String, u32)>,
}

impl ChangePlan {
    /// The `applied` event that opens the commit (none when nothing changes).
    pub fn applied_event(&self) -> Option<NewEvent> {
        match &self.commit {
            Commit::Nothing => None,
            Commit::Revision { number } => Some(NewEvent::new(
                EventKind::Applied,
                format!("revision {number}: {}", self.summary),
            )),
            Commit::Release => Some(NewEvent::new(EventKind::Applied, self.summary.clone())),
        }
    }
}

/// The groups of `fleet` that have none in `world` (they need
/// [`Situation::unused_generation`]).
pub fn new_groups(fleet: &Fleet, world: &Situation) -> Vec<String> {
    fleet
        .services
        .iter()
        .flat_map(|(s, svc)| svc.regions.iter().map(move |r| GroupId::new(s, r).0))
        .filter(|g| !world.groups.contains_key(g))
        .collect()
}

/// One group as the group rule reads it.
#[derive(Clone, Copy, Debug)]
pub struct GroupChange<'a> {
    pub group: &'a str,
    /// Its wave (0: the first; every group of a service without waves).
    pub wave: usize,
    /// Its service goes wave by wave.
    pub waves: bool,
    /// A fleet file changes something of its service (a group held by hand goes then).
    pub file_changes_service: bool,
    /// Its generation and rollout record now; none for a group new to the fleet.
    pub before: Option<(u64, &'a RolloutRecord)>,
    /// The change gives it a plan of other content.
    pub content_changed: bool,
    /// Its generation if it is new.
    pub unused_generation: u64,
}

/// How the change reaches a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Its plan stays (the change does not touch it).
    Same,
    /// A new generation, its rollout begun.
    NewGeneration,
    /// Held for its wave; `newly`: not held for one before.
    HeldForWave { newly: bool },
    /// Held by hand (`deploy --region` named other groups); `newly`: not held before.
    HeldByHand { newly: bool },
}

impl Reach {
    pub fn held(&self) -> bool {
        matches!(self, Reach::HeldForWave { .. } | Reach::HeldByHand { .. })
    }
}

/// What the group rule decides.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupStep {
    pub generation: u64,
    pub rollout: RolloutRecord,
    pub reach: Reach,
}

/// The group rule: does the change give this group a new generation now, hold it, or leave
/// it? Waves: a change reaches the first wave now, the others when the wave before them is
/// done (`waves::release`, then [`Origin::Wave`]); until then their plan is held.
/// `deploy --region` holds the service's other groups by hand: a wave, or an apply that does
/// not change the service, leaves them held; a deploy that names them (or names none), or a
/// file that changes the service, lets go. Rollbacks, destroys and reverts hold nothing. A
/// new group is never held.
pub fn group(origin: &Origin, g: &GroupChange, now: u64) -> GroupStep {
    let was_held = g.before.is_some_and(|(_, r)| r.held)
        && !(matches!(origin, Origin::File) && g.file_changes_service);
    let by_waves = g.waves && g.wave > 0;
    let named = |only: &[String]| only.iter().any(|o| o == g.group);
    let (held, by_hand) = match origin {
        Origin::Deploy { only, .. } if !only.is_empty() && named(only) => (false, false),
        Origin::Deploy { only, .. } if !only.is_empty() => (true, true),
        Origin::Deploy { .. } => (by_waves, false),
        Origin::File => (was_held || by_waves, was_held),
        Origin::Wave { groups, .. } => (!groups.iter().any(|x| x == g.group), was_held),
        Origin::Command(_) | Origin::AutoRevert { .. } => (false, false),
    };
    let held = held && g.content_changed && g.before.is_some();
    let by_hand = held && by_hand;
    match g.before {
        Some((generation, r)) if held || !g.content_changed => {
            let reach = if !held {
                Reach::Same
            } else if by_hand {
                Reach::HeldByHand { newly: !was_held }
            } else {
                Reach::HeldForWave {
                    newly: !r.wave_pending,
                }
            };
            let mut rollout = r.clone();
            // Held for its wave or by hand, or (its plan what the fleet says) nothing pending.
            rollout.wave_pending = held;
            rollout.held = by_hand;
            GroupStep {
                generation,
                rollout,
                reach,
            }
        }
        before => {
            let (revert, reverted_from) = match origin {
                Origin::AutoRevert { failed } => (true, failed.get(g.group).copied().unwrap_or(0)),
                _ => (false, 0),
            };
            GroupStep {
                generation: before.map(|(n, _)| n + 1).unwrap_or(g.unused_generation),
                rollout: rollout::begin(before.map(|(n, r)| (r, n)), now, revert, reverted_from),
                reach: Reach::NewGeneration,
            }
        }
    }
}

/// Plan a change of desired state.
pub fn plan(world: &Situation, req: &Request, now: u64) -> ChangePlan {
    let fleet = req.fleet;
    let origin = req.origin;
    let old_fleet = world.fleet;
    let current = world.revision;
    let next_revision = current + 1;
    let mut drift = req.drift.clone();
    let mut changes = drover_model::diff::diff(old_fleet, fleet);
    // Secret values never reach the answer, the stored summary or the events.
    drover_model::secret::redact_changes(&mut changes);
    // A wave, or a change of nothing in the fleet (a deploy that carries a held change on),
    // stores no revision: its new plans are the current revision's. Stamped with the next
    // number, a revert to such a generation would read another revision's text.
    let stores_revision = !matches!(origin, Origin::Wave { .. }) && !changes.is_empty();
    let plans_revision = if stores_revision {
        next_revision
    } else {
        current
    };
    let mut events = Vec::new();
    let mut plan_changes = Vec::new();
    let mut rollouts = Vec::new();
    let mut groups: BTreeMap<String, PlannedGroup> = BTreeMap::new();
    let mut new_plans: Vec<Plan> = Vec::new();
    let mut file_scaled: Vec<(String, u32)> = Vec::new();
    for (sname, svc) in &fleet.services {
        let service_path = format!("services.{sname}.");
        let file_changes_service = changes.iter().any(|c| c.path.starts_with(&service_path));
        let old_svc = old_fleet.and_then(|f| f.services.get(sname));
        for region in &svc.regions {
            let gid = GroupId::new(sname, region).0;
            let mut plan = drover_model::plan::plan_for(fleet, sname, svc, region);
            let old = world.groups.get(&gid);
            let wave = svc.rollout.wave_of(region);
            let step = group(
                origin,
                &GroupChange {
                    group: &gid,
                    wave,
                    waves: !svc.rollout.waves.is_empty(),
                    file_changes_service,
                    before: old.map(|g| (g.generation, g.rollout)),
                    content_changed: old.is_none_or(|g| !g.plan.same_content(&plan)),
                    unused_generation: world.unused_generation.get(&gid).copied().unwrap_or(1),
                },
                now,
            );
            let estimate = |desired: u32| {
                let step = (svc.rollout.max_surge + svc.rollout.max_unavailable).max(1);
                let batches = desired.div_ceil(step);
                let boot = world.boot_ms.unwrap_or(DEFAULT_BOOT_MS)
                    + svc.rollout.min_healthy_time.as_millis();
                let canary = svc
                    .rollout
                    .canary
                    .as_ref()
                    .map(|c| boot + c.bake.as_millis())
                    .unwrap_or(0);
                (batches, batches as u64 * boot + canary)
            };
            let wave_no = if svc.rollout.waves.is_empty() {
                0
            } else {
                wave as u32 + 1
            };
            let plan_changed = step.reach == Reach::NewGeneration;
            if let (true, Some(g)) = (step.reach.held(), old) {
                let (batches, estimated_ms) = estimate(g.desired);
                rollouts.push(RolloutPlan {
                    group: gid.clone(),
                    from_generation: g.generation,
                    to_generation: g.generation + 1,
                    replaced: g.desired,
                    batches,
                    estimated_ms,
                    wave: wave_no,
                    held: true,
                });
                let by_hand = matches!(step.reach, Reach::HeldByHand { .. });
                plan_changes.push(if by_hand {
                    format!(
                        "{gid}: held by hand ({} -> {} when a deploy names {region} or no region)",
                        g.plan.versions(),
                        plan.versions()
                    )
                } else {
                    format!(
                        "{gid}: held for wave {} ({} -> {} when the waves before it are done)",
                        wave + 1,
                        g.plan.versions(),
                        plan.versions()
                    )
                });
                match step.reach {
                    Reach::HeldByHand { newly: true } => events.push(
                        NewEvent::new(
                            EventKind::PlanChanged,
                            format!(
                                "the change ({}) was deployed to other regions only: this group keeps generation {} until a deploy names {region} (or no region)",
                                plan.versions(),
                                g.generation
                            ),
                        )
                        .group(&gid),
                    ),
                    Reach::HeldForWave { newly: true } => events.push(
                        NewEvent::new(
                            EventKind::PlanChanged,
                            format!(
                                "the change ({}) waits for wave {}: this group keeps generation {} until the waves before it are done",
                                plan.versions(),
                                wave + 1,
                                g.generation
                            ),
                        )
                        .group(&gid),
                    ),
                    _ => {}
                }
                plan = g.plan.clone();
            }
            let generation = step.generation;
            plan.generation = generation;
            plan.revision = match old {
                Some(g) if !plan_changed => g.plan.revision,
                _ => plans_revision,
            };
            // The file's desired count wins when it changed since the file was last applied
            // (or the group is new, or the apply is forced); otherwise keep the current count
            // (set by `scale` or autoscaling), clamped to the new range.
            let reference = match origin {
                Origin::File => world.last_applied.and_then(|f| f.services.get(sname)),
                _ => old_svc,
            };
            let file_desired_changed = (matches!(origin, Origin::File) && req.force_file)
                || reference.is_none_or(|o| o.capacity.desired != svc.capacity.desired);
            if let (Origin::File, Some(g)) = (origin, old) {
                if g.desired != svc.capacity.desired && reference.is_some() {
                    let kept = !file_desired_changed;
                    if kept || req.force_file {
                        drift.push(Drift {
                            field: format!("services.{sname}.capacity.desired ({gid})"),
                            file: svc.capacity.desired.to_string(),
                            live: g.desired.to_string(),
                            set_by: g.desired_reason.to_string(),
                            kept,
                        });
                    }
                }
            }
            // The range, raised by the schedules that hold now (the new file's and the
            // one-offs): a count a schedule set is not undone by an apply.
            let bounds = crate::Schedules {
                service: sname,
                region,
                base_min: svc.capacity.min,
                base_max: svc.capacity.max,
                file: &svc.schedule,
                once: world.once,
            }
            .bounds(now);
            let (desired, reason) = match old {
                Some(g) if !file_desired_changed => (
                    g.desired.clamp(bounds.min, bounds.max),
                    g.desired_reason.to_string(),
                ),
                _ => (svc.capacity.desired, format!("fleet file ({})", req.file)),
            };
            if plan_changed {
                let replaced = old.map(|_| desired).unwrap_or(0);
                if let Some(g) = old {
                    let (batches, estimated_ms) = estimate(replaced);
                    rollouts.push(RolloutPlan {
                        group: gid.clone(),
                        from_generation: g.generation,
                        to_generation: generation,
                        replaced,
                        batches,
                        estimated_ms,
                        wave: wave_no,
                        held: false,
                    });
                }
                plan_changes.push(match old {
                    Some(g) => format!(
                        "{gid}: generation {} -> {generation} ({} -> {})",
                        g.generation,
                        g.plan.versions(),
                        plan.versions()
                    ),
                    None => format!("{gid}: new group, generation 1 ({})", plan.versions()),
                });
                events.push(
                    NewEvent::new(
                        EventKind::PlanChanged,
                        match old {
                            Some(g) => format!(
                                "launch configuration is now generation {generation} ({}); instances on generation {} are stale",
                                plan.versions(),
                                g.generation
                            ),
                            None => format!(
                                "group created: generation 1 ({}), desired {desired}",
                                plan.versions()
                            ),
                        },
                    )
                    .group(&gid),
                );
                new_plans.push(plan.clone());
            }
            if old.is_none() || file_desired_changed {
                file_scaled.push((gid.clone(), desired));
            }
            if let Some(g) = old {
                if g.desired != desired {
                    events.push(
                        NewEvent::new(
                            EventKind::Scaled,
                            format!("desired {} -> {desired} ({reason})", g.desired),
                        )
                        .group(&gid),
                    );
                }
            }
            groups.insert(
                gid,
                PlannedGroup {
                    desired,
                    desired_reason: reason,
                    generation,
                    rollout: step.rollout,
                    plan,
                },
            );
        }
    }
    let removed: Vec<String> = world
        .groups
        .keys()
        .filter(|g| !groups.contains_key(*g))
        .cloned()
        .collect();
    for g in &removed {
        events.push(
            NewEvent::new(
                EventKind::PlanChanged,
                "group removed from the fleet; its instances will leave",
            )
            .group(g),
        );
    }
    // Schedules the file adds or changes: their next firings.
    let mut schedules = Vec::new();
    for (sname, svc) in &fleet.services {
        let old = old_fleet
            .and_then(|f| f.services.get(sname))
            .map(|s| s.schedule.as_slice())
            .unwrap_or(&[]);
        for (i, sch) in svc.schedule.iter().enumerate() {
            if old.get(i) == Some(sch) {
                continue;
            }
            let next = crate::schedule::next_firings(sname, i, sch, now, 5);
            schedules.push(ScheduleFirings {
                id: crate::schedule::file_id(sname, i),
                what: next.first().map(|w| w.what.clone()).unwrap_or_default(),
                next,
            });
        }
    }
    // The groups a held change reaches now.
    let let_go: Vec<&str> = groups
        .iter()
        .filter(|(k, g)| {
            world
                .groups
                .get(*k)
                .is_some_and(|o| o.rollout.held && !g.rollout.held)
        })
        .map(|(k, _)| k.as_str())
        .collect();
    let commit = if stores_revision {
        Commit::Revision {
            number: next_revision,
        }
    } else if matches!(origin, Origin::Wave { .. }) || !let_go.is_empty() {
        Commit::Release
    } else {
        Commit::Nothing
    };
    let summary = match (commit == Commit::Nothing, old_fleet, origin) {
        (true, _, _) => String::new(),
        (false, None, _) => format!(
            "fleet {} created: {} service(s) ({}), {} region(s)",
            fleet.fleet.name,
            fleet.services.len(),
            names(fleet.services.keys()),
            fleet.regions.len()
        ),
        (false, Some(_), Origin::File) => summarize(&changes),
        (false, Some(_), Origin::Deploy { why, .. }) if changes.is_empty() => format!(
            "{why}: the change of revision {current} reaches {}",
            let_go.join(", ")
        ),
        (false, Some(_), Origin::Command(why) | Origin::Deploy { why, .. }) => {
            format!("{why}: {}", summarize(&changes))
        }
        (false, Some(_), Origin::Wave { wave, groups }) => format!(
            "wave {} of revision {current} reaches {}",
            wave + 1,
            groups.join(", ")
        ),
        (false, Some(_), Origin::AutoRevert { failed }) => format!(
            "automatic revert after failed rollout of {}: {}",
            failed
                .iter()
                .map(|(g, n)| format!("{g} generation {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            summarize(&changes)
        ),
    };
    ChangePlan {
        commit,
        summary,
        changes,
        plan_changes,
        rollouts,
        drift,
        schedules,
        groups,
        new_plans,
        removed,
        events,
        file_scaled,
    }
}

/// Names for a message: `a, b`, or `none`.
fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = it.map(String::as_str).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// The first changes, each cut to 100 characters, and how many more.
fn summarize(changes: &[Change]) -> String {
    let shown: Vec<String> = changes
        .iter()
        .take(3)
        .map(|c| {
            let s = c.to_string();
            match s.char_indices().nth(100) {
                Some((i, _)) => format!("{}...", &s[..i]),
                None => s,
            }
        })
        .collect();
    let more = changes.len().saturating_sub(3);
    if more > 0 {
        format!("{} (and {more} more)", shown.join("; "))
    } else {
        shown.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fleet of one service `web` in regions a, b and c, on `version`, with `waves` (the
    /// TOML of `rollout.waves`, empty for none) and `desired` instances per group.
    fn fleet(version: &str, waves: &str, desired: u32) -> Fleet {
        let mut web = drover_test_support::fleets::web("sim", &["a", "b", "c"])
            .capacity(1, desired, 5)
            .version(version)
            .command("{drover}");
        if !waves.is_empty() {
            web = web.service(&format!("rollout = {{ waves = {waves} }}"));
        }
        drover_model::parse_fleet(&web.toml(), "drover.toml").unwrap()
    }

    /// What the server keeps, and carries a plan out on (as `apply_locked` does).
    #[derive(Default)]
    struct Live {
        fleet: Option<Fleet>,
        file: Option<Fleet>,
        revision: u64,
        groups: BTreeMap<String, PlannedGroup>,
        /// Every revision stored, by number (what a revert reads back).
        revisions: BTreeMap<u64, Fleet>,
    }

    impl Live {
        /// Each group as the planner sees it before the change.
        fn before(&self) -> BTreeMap<String, Before<'_>> {
            self.groups
                .iter()
                .map(|(k, g)| {
                    (
                        k.clone(),
                        Before {
                            desired: g.desired,
                            desired_reason: &g.desired_reason,
                            generation: g.generation,
                            rollout: &g.rollout,
                            plan: &g.plan,
                        },
                    )
                })
                .collect()
        }

        fn plan(&self, fleet: &Fleet, origin: &Origin, now: u64) -> ChangePlan {
            let world = Situation {
                fleet: self.fleet.as_ref(),
                revision: self.revision,
                last_applied: self.file.as_ref(),
                groups: self.before(),
                ..Situation::default()
            };
            plan(
                &world,
                &Request {
                    origin,
                    file: "drover.toml",
                    force_file: false,
                    fleet,
                    drift: Vec::new(),
                },
                now,
            )
        }

        fn change(&mut self, fleet: &Fleet, origin: &Origin, now: u64) -> ChangePlan {
            let p = self.plan(fleet, origin, now);
            match p.commit {
                Commit::Nothing => return p,
                Commit::Revision { number } => {
                    self.revision = number;
                    self.revisions.insert(number, fleet.clone());
                    self.fleet = Some(fleet.clone());
                    if matches!(origin, Origin::File) {
                        self.file = Some(fleet.clone());
                    }
                }
                Commit::Release => {}
            }
            self.groups = p.groups.clone();
            p
        }

        fn group(&self, g: &str) -> &PlannedGroup {
            &self.groups[g]
        }

        /// Every group's plan is what the revision it names says for the group: the text a
        /// revert to that generation restores runs what the generation ran.
        fn assert_plans_match_their_revisions(&self) {
            for (gid, g) in &self.groups {
                let fleet = self.revisions.get(&g.plan.revision).unwrap_or_else(|| {
                    panic!(
                        "{gid}: generation {} names revision {}, not stored (revisions {:?})",
                        g.generation,
                        g.plan.revision,
                        self.revisions.keys().collect::<Vec<_>>()
                    )
                });
                let (service, region) = (&g.plan.service, &g.plan.region);
                let of_revision =
                    drover_model::plan::plan_for(fleet, service, &fleet.services[service], region);
                assert!(
                    of_revision.same_content(&g.plan),
                    "{gid}: generation {} runs {} but its revision {} says {}",
                    g.generation,
                    g.plan.versions(),
                    g.plan.revision,
                    of_revision.versions()
                );
            }
        }
    }

    fn deploy(why: &str, only: &[&str]) -> Origin {
        Origin::Deploy {
            why: why.into(),
            only: only.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn messages(p: &ChangePlan, group: &str) -> Vec<String> {
        p.events
            .iter()
            .filter(|e| e.group.as_deref() == Some(group))
            .map(|e| e.message.clone())
            .collect()
    }

    #[test]
    fn a_first_apply_creates_every_group_and_an_unchanged_one_plans_nothing() {
        let mut live = Live::default();
        let v1 = fleet("v1", "", 2);
        let p = live.change(&v1, &Origin::File, 1_000);
        assert_eq!(p.commit, Commit::Revision { number: 1 });
        assert_eq!(
            p.applied_event().unwrap().message,
            "revision 1: fleet t created: 1 service(s) (web), 3 region(s)"
        );
        assert_eq!(p.new_plans.len(), 3);
        assert_eq!(
            messages(&p, "web/a"),
            ["group created: generation 1 (app=v1), desired 2"]
        );
        let a = live.group("web/a");
        assert_eq!((a.generation, a.desired), (1, 2));
        assert_eq!(a.desired_reason, "fleet file (drover.toml)");
        assert!(a.rollout.open && a.rollout.since_ms == 1_000);
        assert_eq!(p.file_scaled.len(), 3);

        // The same file again, and a deploy of the version it already says: nothing.
        for origin in [Origin::File, deploy("deploy web app v1", &[])] {
            let p = live.plan(&v1, &origin, 2_000);
            assert_eq!(p.commit, Commit::Nothing, "{origin:?}");
            assert!(p.applied_event().is_none());
            assert!(p.events.is_empty() && p.new_plans.is_empty() && p.removed.is_empty());
            assert!(p.plan_changes.is_empty() && p.rollouts.is_empty());
            assert_eq!(p.groups, live.groups, "every group as it was");
        }
    }

    #[test]
    fn a_deploy_naming_one_region_holds_the_others_by_hand_until_one_names_none() {
        let mut live = Live::default();
        live.change(&fleet("v1", "", 2), &Origin::File, 0);
        let v2 = fleet("v2", "", 2);
        let p = live.change(&v2, &deploy("deploy web app v2 to b only", &["web/b"]), 10);
        assert_eq!(p.commit, Commit::Revision { number: 2 });
        assert_eq!(
            p.summary,
            "deploy web app v2 to b only: ~ services.web.components.app.version: \"v1\" -> \"v2\""
        );
        let b = live.group("web/b");
        assert_eq!((b.generation, b.plan.versions().as_str()), (2, "app=v2"));
        assert!(b.rollout.open && !b.rollout.held && b.rollout.since_ms == 10);
        assert_eq!(
            messages(&p, "web/b"),
            ["launch configuration is now generation 2 (app=v2); instances on generation 1 are stale"]
        );
        for r in ["a", "c"] {
            let gid = format!("web/{r}");
            let g = live.group(&gid);
            assert_eq!(
                (g.generation, g.plan.versions().as_str()),
                (1, "app=v1"),
                "{gid}"
            );
            assert_eq!(g.plan.revision, 1, "{gid}: the plan of revision 1 stays");
            assert!(
                g.rollout.held && g.rollout.wave_pending,
                "{gid}: {:?}",
                g.rollout
            );
            assert_eq!(
                messages(&p, &gid),
                [format!(
                    "the change (app=v2) was deployed to other regions only: this group keeps generation 1 until a deploy names {r} (or no region)"
                )]
            );
            assert!(p.plan_changes.contains(&format!(
                "{gid}: held by hand (app=v1 -> app=v2 when a deploy names {r} or no region)"
            )));
            assert!(p
                .rollouts
                .iter()
                .any(|x| x.group == gid && x.held && x.to_generation == 2));
        }
        assert_eq!(p.new_plans.len(), 1, "only web/b's plan is new");

        // A wave (or anything else that is not a deploy naming them) keeps them held.
        let p = live.change(
            &v2,
            &Origin::Wave {
                wave: 0,
                groups: vec![],
            },
            20,
        );
        assert!(live.group("web/a").rollout.held && live.group("web/c").rollout.held);
        assert!(
            p.events.is_empty(),
            "held already: said once {:?}",
            p.events
        );

        // The same deploy naming no region carries the change on, with no new revision.
        let p = live.change(&v2, &deploy("deploy web app v2", &[]), 30);
        assert_eq!(p.commit, Commit::Release);
        assert_eq!(
            p.applied_event().unwrap().message,
            "deploy web app v2: the change of revision 2 reaches web/a, web/c"
        );
        for gid in ["web/a", "web/c"] {
            let g = live.group(gid);
            assert_eq!((g.generation, g.plan.versions().as_str()), (2, "app=v2"));
            assert!(!g.rollout.held && !g.rollout.wave_pending && g.rollout.open);
        }
        assert_eq!(live.revision, 2);
    }

    #[test]
    fn a_deploy_goes_to_the_first_wave_and_a_wave_release_carries_it_on() {
        let waves = "[[\"a\"], [\"b\", \"c\"]]";
        let mut live = Live::default();
        live.change(&fleet("v1", waves, 2), &Origin::File, 0);
        assert!(
            live.groups
                .values()
                .all(|g| g.generation == 1 && !g.rollout.wave_pending),
            "a new group is never held"
        );
        let v2 = fleet("v2", waves, 2);
        let p = live.change(&v2, &deploy("deploy web app v2", &[]), 10);
        assert_eq!(p.commit, Commit::Revision { number: 2 });
        assert_eq!(live.group("web/a").generation, 2);
        for gid in ["web/b", "web/c"] {
            let g = live.group(gid);
            assert_eq!(g.generation, 1, "{gid}");
            assert!(g.rollout.wave_pending && !g.rollout.held, "{gid}");
            assert_eq!(
                messages(&p, gid),
                ["the change (app=v2) waits for wave 2: this group keeps generation 1 until the waves before it are done"]
            );
            assert!(p.plan_changes.contains(&format!(
                "{gid}: held for wave 2 (app=v1 -> app=v2 when the waves before it are done)"
            )));
        }
        let wave = |r: &str| p.rollouts.iter().find(|x| x.group == r).unwrap().wave;
        assert_eq!((wave("web/a"), wave("web/b")), (1, 2));

        // An apply of the live file keeps them held, and does not say it twice.
        let p = live.plan(&v2, &Origin::File, 15);
        assert_eq!(p.commit, Commit::Nothing);
        let p = live.plan(&fleet("v2", waves, 3), &Origin::File, 15);
        assert_eq!(p.commit, Commit::Revision { number: 3 });
        assert!(p.groups["web/b"].rollout.wave_pending);
        assert_eq!(
            messages(&p, "web/b"),
            ["desired 2 -> 3 (fleet file (drover.toml))"],
            "still held: not said again"
        );

        let p = live.change(
            &v2,
            &Origin::Wave {
                wave: 1,
                groups: vec!["web/b".into(), "web/c".into()],
            },
            20,
        );
        assert_eq!(p.commit, Commit::Release);
        assert_eq!(p.summary, "wave 2 of revision 2 reaches web/b, web/c");
        for gid in ["web/b", "web/c"] {
            let g = live.group(gid);
            assert_eq!(g.generation, 2);
            assert!(!g.rollout.wave_pending && g.rollout.open && g.rollout.since_ms == 20);
        }
        assert_eq!(live.group("web/a").rollout.since_ms, 10, "web/a untouched");
        assert_eq!(live.revision, 2);
    }

    /// A release stores no revision, so the plans it makes are the current revision's: a
    /// later change that stores the next number must not become the revision of a
    /// generation it never made (an automatic revert to that generation rebuilds its
    /// components from its revision's text).
    #[test]
    fn a_release_stamps_its_plans_with_the_current_revision() {
        // A wave release.
        let waves = "[[\"a\"], [\"b\", \"c\"]]";
        let mut live = Live::default();
        live.change(&fleet("v1", waves, 2), &Origin::File, 0);
        let v2 = fleet("v2", waves, 2);
        live.change(&v2, &deploy("deploy web app v2", &[]), 10);
        let wave = Origin::Wave {
            wave: 1,
            groups: vec!["web/b".into(), "web/c".into()],
        };
        let p = live.change(&v2, &wave, 20);
        assert_eq!(p.commit, Commit::Release);
        assert_eq!(p.new_plans.len(), 2);
        for plan in &p.new_plans {
            assert_eq!(
                (plan.generation, plan.revision),
                (2, 2),
                "{}: the plan of a release is revision 2's",
                plan.group().0
            );
        }
        live.assert_plans_match_their_revisions();
        // The next change stores revision 3; web/b's generation 2 is still revision 2's.
        let p = live.change(
            &fleet("v3", waves, 2),
            &deploy("deploy web app v3", &[]),
            30,
        );
        assert_eq!(p.commit, Commit::Revision { number: 3 });
        assert_eq!(live.group("web/a").plan.revision, 3);
        assert_eq!(
            (
                live.group("web/b").generation,
                live.group("web/b").plan.revision
            ),
            (2, 2)
        );
        live.assert_plans_match_their_revisions();

        // A deploy naming no region that releases a change held by `deploy --region`.
        let mut live = Live::default();
        live.change(&fleet("v1", "", 2), &Origin::File, 0);
        let v2 = fleet("v2", "", 2);
        live.change(&v2, &deploy("deploy web app v2 to b only", &["web/b"]), 10);
        let p = live.change(&v2, &deploy("deploy web app v2", &[]), 20);
        assert_eq!(p.commit, Commit::Release);
        assert!(
            p.new_plans.iter().all(|plan| plan.revision == 2),
            "{:?}",
            p.new_plans
        );
        live.assert_plans_match_their_revisions();
        let p = live.change(
            &fleet("v3", "", 2),
            &deploy("deploy web app v3 to c only", &["web/c"]),
            30,
        );
        assert_eq!(p.commit, Commit::Revision { number: 3 });
        live.assert_plans_match_their_revisions();
    }

    #[test]
    fn a_rollback_restores_the_versions_and_lets_go_of_held_groups() {
        let mut live = Live::default();
        let v1 = fleet("v1", "", 2);
        live.change(&v1, &Origin::File, 0);
        live.change(
            &fleet("v2", "", 2),
            &deploy("deploy web app v2 to b only", &["web/b"]),
            10,
        );
        // A command holds nothing: a rollback that changes what held groups run reaches them
        // at once.
        let p = live.plan(&fleet("v0", "", 2), &Origin::Command("rollback".into()), 15);
        for gid in ["web/a", "web/b", "web/c"] {
            let g = &p.groups[gid];
            assert_eq!(g.plan.versions(), "app=v0", "{gid}");
            assert!(
                !g.rollout.held && !g.rollout.wave_pending && g.rollout.open,
                "{gid}"
            );
        }
        let why = "rollback web to the versions of revision 1 (app=v1)";
        let p = live.change(&v1, &Origin::Command(why.into()), 20);
        assert_eq!(p.commit, Commit::Revision { number: 3 });
        assert_eq!(
            p.summary,
            format!("{why}: ~ services.web.components.app.version: \"v2\" -> \"v1\"")
        );
        let b = live.group("web/b");
        assert_eq!((b.generation, b.plan.versions().as_str()), (3, "app=v1"));
        assert!(b.rollout.open && b.rollout.since_ms == 20 && b.rollout.good_generation == 1);
        // The groups held on v1 run what the fleet says again: nothing pending, no rollout.
        for gid in ["web/a", "web/c"] {
            let g = live.group(gid);
            assert_eq!(g.generation, 1, "{gid}");
            assert!(!g.rollout.held && !g.rollout.wave_pending, "{gid}");
            assert!(messages(&p, gid).is_empty(), "{gid}");
        }

        // An automatic revert has no canary stage and names what it reverts.
        let mut failed = BTreeMap::new();
        failed.insert("web/b".to_string(), 3);
        let p = live.change(&fleet("v3", "", 2), &deploy("deploy web app v3", &[]), 30);
        assert_eq!(p.commit, Commit::Revision { number: 4 });
        let p = live.change(&v1, &Origin::AutoRevert { failed }, 40);
        assert!(p
            .summary
            .starts_with("automatic revert after failed rollout of web/b generation 3: "));
        let b = live.group("web/b");
        assert_eq!((b.generation, b.rollout.reverted_from), (5, 3));
        assert!(b.rollout.canary_passed);
        assert_eq!(live.group("web/a").rollout.reverted_from, 0);
    }

    #[test]
    fn a_count_set_live_is_kept_by_an_apply_and_clamped_to_the_new_range() {
        let mut live = Live::default();
        live.change(&fleet("v1", "", 2), &Origin::File, 0);
        let g = live.groups.get_mut("web/a").unwrap();
        g.desired = 4;
        g.desired_reason = "scale by alice".into();
        // The file's count did not change: the live one stays (with its drift said).
        let p = live.plan(&fleet("v2", "", 2), &Origin::File, 10);
        let a = &p.groups["web/a"];
        assert_eq!(
            (a.desired, a.desired_reason.as_str()),
            (4, "scale by alice")
        );
        assert!(p
            .drift
            .iter()
            .any(|d| d.kept && d.live == "4" && d.file == "2"));
        assert!(!p.file_scaled.iter().any(|(g, _)| g == "web/a"));
        // The file's count changed: it wins, and says so.
        let p = live.plan(&fleet("v1", "", 3), &Origin::File, 10);
        assert_eq!(p.groups["web/a"].desired, 3);
        assert_eq!(
            messages(&p, "web/a"),
            ["desired 4 -> 3 (fleet file (drover.toml))"]
        );
    }

    #[test]
    fn a_group_gone_from_the_fleet_is_removed_and_one_back_continues_its_numbering() {
        let mut live = Live::default();
        live.change(&fleet("v1", "", 2), &Origin::File, 0);
        // Region c stays in the fleet; web no longer runs there.
        let two = drover_test_support::fleets::web("sim", &["a", "b"])
            .region("c", "sim")
            .capacity(1, 2, 5)
            .command("{drover}")
            .toml();
        let two = drover_model::parse_fleet(&two, "drover.toml").unwrap();
        let p = live.change(&two, &Origin::File, 10);
        assert_eq!(p.removed, ["web/c"]);
        assert_eq!(
            messages(&p, "web/c"),
            ["group removed from the fleet; its instances will leave"]
        );
        let v1 = fleet("v1", "", 2);
        let world = Situation::default();
        assert_eq!(new_groups(&v1, &world).len(), 3);
        let mut world = Situation {
            fleet: live.fleet.as_ref(),
            revision: live.revision,
            ..Situation::default()
        };
        world.groups = live.before();
        assert_eq!(new_groups(&v1, &world), ["web/c"]);
        world.unused_generation.insert("web/c".into(), 2);
        let p = plan(
            &world,
            &Request {
                origin: &Origin::File,
                file: "drover.toml",
                force_file: false,
                fleet: &v1,
                drift: Vec::new(),
            },
            20,
        );
        assert_eq!(p.groups["web/c"].generation, 2);
        assert_eq!(p.groups["web/c"].plan.generation, 2);
    }

    /// The rule on one group, as the simulation calls it.
    #[test]
    fn the_group_rule_holds_only_changed_groups_that_exist() {
        let r = RolloutRecord::default();
        let base = GroupChange {
            group: "web/b",
            wave: 1,
            waves: true,
            file_changes_service: false,
            before: Some((4, &r)),
            content_changed: true,
            unused_generation: 1,
        };
        let d = deploy("d", &[]);
        let step = group(&d, &base, 5);
        assert_eq!(step.reach, Reach::HeldForWave { newly: true });
        assert_eq!(step.generation, 4);
        assert!(step.rollout.wave_pending);
        let same = group(
            &d,
            &GroupChange {
                content_changed: false,
                ..base
            },
            5,
        );
        assert_eq!(same.reach, Reach::Same);
        assert!(!same.rollout.wave_pending);
        let new = group(
            &d,
            &GroupChange {
                before: None,
                unused_generation: 7,
                ..base
            },
            5,
        );
        assert_eq!((new.reach, new.generation), (Reach::NewGeneration, 7));
        let first = group(&d, &GroupChange { wave: 0, ..base }, 5);
        assert_eq!((first.reach, first.generation), (Reach::NewGeneration, 5));
        assert_eq!(first.rollout.since_ms, 5);
        // Held by hand, a file that changes the service lets go (to its wave).
        let held = RolloutRecord {
            held: true,
            wave_pending: true,
            ..RolloutRecord::default()
        };
        let by_hand = GroupChange {
            before: Some((4, &held)),
            wave: 0,
            ..base
        };
        assert_eq!(
            group(&Origin::File, &by_hand, 5).reach,
            Reach::HeldByHand { newly: false }
        );
        let changed = GroupChange {
            file_changes_service: true,
            ..by_hand
        };
        assert_eq!(
            group(&Origin::File, &changed, 5).reach,
            Reach::NewGeneration
        );
    }
}
