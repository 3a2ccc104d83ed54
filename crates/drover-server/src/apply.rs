//! Changing desired state: apply a fleet file, deploy a version, roll back, revert a failed
//! rollout. Every path ends in one validated, atomically stored revision.

use std::collections::BTreeMap;

use drover_model::api::{
    ApplyRequest, ApplyResponse, DeployRequest, DestroyRequest, LastApplied, Revision,
    RollbackRequest, RolloutPlan,
};
use drover_model::{EventKind, NewEvent, Plan};
use drover_store::{GroupRecord, Write};

use crate::engine::{now_ms, Engine};
use crate::state::Group;
use crate::ServerError;

/// Why a revision is being made.
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
    /// A rollout failed; these groups go back to their last good generation.
    AutoRevert { failed: BTreeMap<String, u64> },
}

/// Boot time assumed for estimates when a group has no history yet.
const DEFAULT_BOOT_MS: u64 = 3_000;

impl Engine {
    /// Validate, diff and store a fleet file as a new revision. Nothing changes on error.
    pub async fn apply(&self, req: ApplyRequest) -> Result<ApplyResponse, ServerError> {
        // Artifacts are fetched and image tags resolved before the lock: a slow host holds up
        // this apply only.
        if !req.dry_run {
            if let Ok(fleet) = drover_model::parse_fleet(&req.toml, &req.file) {
                crate::artifact::prefetch(&fleet).await;
                crate::registry::prefetch(self, &fleet).await;
            }
        }
        let _w = self.write_lock.lock().await;
        self.apply_locked(req, Origin::File).await
    }

    /// Make `version` preferred for one component of a service.
    pub async fn deploy(&self, req: DeployRequest) -> Result<ApplyResponse, ServerError> {
        // The file as it will be, to fetch its new artifacts before the lock (if the revision
        // changes meanwhile, the check under the lock fetches what is still missing).
        if let Some(rev) = self.current_revision().filter(|_| !req.dry_run) {
            let pair = [(req.component.clone(), req.version.clone())];
            if let Ok(toml) = set_versions(&rev.toml, &req.service, &pair) {
                if let Ok(fleet) = drover_model::parse_fleet(&toml, &rev.file) {
                    crate::artifact::prefetch(&fleet).await;
                    crate::registry::prefetch(self, &fleet).await;
                }
            }
        }
        let _w = self.write_lock.lock().await;
        let rev = self.current_revision().ok_or_else(|| {
            ServerError::Conflict("nothing applied yet: run `drover apply FILE` first".into())
        })?;
        let svc = rev
            .fleet
            .services
            .get(&req.service)
            .ok_or_else(|| no_service(&req.service, &rev.fleet))?;
        if !svc.components.contains_key(&req.component) {
            return Err(ServerError::NoComponent {
                service: req.service.clone(),
                component: req.component.clone(),
                known: svc.components.keys().cloned().collect(),
            });
        }
        let mut only = Vec::new();
        for r in &req.regions {
            if !svc.regions.contains(r) {
                return Err(ServerError::NoRegion {
                    service: req.service.clone(),
                    region: r.clone(),
                    known: svc.regions.clone(),
                });
            }
            only.push(drover_model::GroupId::new(&req.service, r).0);
        }
        let toml = set_versions(
            &rev.toml,
            &req.service,
            &[(req.component.clone(), req.version.clone())],
        )?;
        let mut why = format!("deploy {} {} {}", req.service, req.component, req.version);
        if !req.regions.is_empty() {
            why.push_str(&format!(" to {} only", req.regions.join(", ")));
        }
        self.apply_locked(
            ApplyRequest {
                file: rev.file.clone(),
                toml,
                dry_run: req.dry_run,
                force_file: false,
            },
            Origin::Deploy { why, only },
        )
        .await
    }

    /// Remove a service (or all of them) from the fleet: a new revision without it. Its
    /// instances leave by the drain path; its provider resources go once they are gone.
    pub async fn destroy(&self, req: DestroyRequest) -> Result<ApplyResponse, ServerError> {
        let _w = self.write_lock.lock().await;
        let rev = self.current_revision().ok_or_else(|| {
            ServerError::Conflict("nothing applied yet: there is nothing to destroy".into())
        })?;
        let services: Vec<String> = match &req.service {
            Some(s) if !rev.fleet.services.contains_key(s) => {
                return Err(no_service(s, &rev.fleet))
            }
            Some(s) => vec![s.clone()],
            None => rev.fleet.services.keys().cloned().collect(),
        };
        let toml = remove_services(&rev.toml, &services)?;
        let why = format!("destroy {}", services.join(", "));
        self.apply_locked(
            ApplyRequest {
                file: rev.file.clone(),
                toml,
                dry_run: req.dry_run,
                force_file: false,
            },
            Origin::Command(why),
        )
        .await
    }

    /// Go back to the versions a service had in the latest earlier revision that differs.
    pub async fn rollback(&self, req: RollbackRequest) -> Result<ApplyResponse, ServerError> {
        let _w = self.write_lock.lock().await;
        let rev = self.current_revision().ok_or_else(|| {
            ServerError::Conflict("nothing applied yet: there is nothing to roll back".into())
        })?;
        let current =
            versions_in(&rev, &req.service).ok_or_else(|| no_service(&req.service, &rev.fleet))?;
        let mut target = None;
        for n in (1..rev.number).rev() {
            let Some(old) = self.store.revision(n)? else {
                continue;
            };
            if let Some(v) = versions_in(&old, &req.service) {
                // Only components that still exist can go back.
                let v: Vec<(String, String)> = v
                    .into_iter()
                    .filter(|(c, _)| current.iter().any(|(k, _)| k == c))
                    .collect();
                if !v.is_empty() && v.iter().any(|x| !current.contains(x)) {
                    target = Some((n, v));
                    break;
                }
            }
        }
        let (n, versions) = target.ok_or_else(|| {
            ServerError::Conflict(format!(
                "no earlier revision runs other versions of {}; `drover history` lists them",
                req.service
            ))
        })?;
        // Each component as revision n had it: its version with what goes with it (an
        // artifact's sha256, arguments, environment).
        let components: Vec<String> = versions.iter().map(|(c, _)| c.clone()).collect();
        let toml = match self.store.revision(n)? {
            Some(old) => restore_components(&rev.toml, &old.toml, &req.service, &components)?,
            None => set_versions(&rev.toml, &req.service, &versions)?,
        };
        let why = format!(
            "rollback {} to the versions of revision {n} ({})",
            req.service,
            versions
                .iter()
                .map(|(c, v)| format!("{c}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.apply_locked(
            ApplyRequest {
                file: rev.file.clone(),
                toml,
                dry_run: req.dry_run,
                force_file: false,
            },
            Origin::Command(why),
        )
        .await
    }

    /// After a failed rollout: make the group's last good versions preferred again.
    /// The caller holds the write lock.
    pub(crate) async fn auto_revert(&self, group: &str, failed: u64) -> Result<(), ServerError> {
        let (rev, good) = {
            let st = self.state();
            let Some(g) = st.groups.get(group) else {
                return Ok(());
            };
            (st.revision.clone(), g.record.rollout.good_generation)
        };
        let (Some(rev), true) = (rev, good > 0) else {
            return Ok(());
        };
        let Some(plan) = self.store.plan(group, good)? else {
            return Ok(());
        };
        let versions: Vec<(String, String)> = plan
            .components
            .iter()
            .map(|c| (c.name.clone(), c.version.clone()))
            .collect();
        // The components as the revision that planned the good generation had them: a
        // broken change may be more than a version (an artifact's sha256 that goes with it,
        // arguments, environment), and all of it goes back.
        let components: Vec<String> = versions.iter().map(|(c, _)| c.clone()).collect();
        let toml = match self.store.revision(plan.revision)? {
            Some(old) => restore_components(&rev.toml, &old.toml, &plan.service, &components)?,
            None => set_versions(&rev.toml, &plan.service, &versions)?,
        };
        let mut failed_map = BTreeMap::new();
        failed_map.insert(group.to_string(), failed);
        self.apply_locked(
            ApplyRequest {
                file: rev.file.clone(),
                toml,
                dry_run: false,
                force_file: false,
            },
            Origin::AutoRevert { failed: failed_map },
        )
        .await
        .map(|_| ())
    }

    /// The body of every change of desired state. The caller holds the write lock.
    pub(crate) async fn apply_locked(
        &self,
        req: ApplyRequest,
        origin: Origin,
    ) -> Result<ApplyResponse, ServerError> {
        let file_fleet = drover_model::parse_fleet(&req.toml, &req.file)?;
        let now = now_ms();
        let (old_fleet, old_groups, current, boot_ms, old_last, once) = {
            let st = self.state();
            (
                st.fleet().cloned(),
                st.groups.clone(),
                st.revision.as_ref().map(|r| r.number).unwrap_or(0),
                st.observed_boot_ms(),
                st.revision.as_ref().map(|r| {
                    r.last_applied.clone().unwrap_or_else(|| LastApplied {
                        toml: r.toml.clone(),
                        set_by: BTreeMap::new(),
                    })
                }),
                st.once.clone(),
            )
        };
        let next_revision = current + 1;
        // The file as a person last applied it: the base of the three-way merge.
        let base_fleet = old_last
            .as_ref()
            .and_then(|l| drover_model::parse_fleet(&l.toml, &req.file).ok());
        let old_set_by = old_last
            .as_ref()
            .map(|l| l.set_by.clone())
            .unwrap_or_default();
        let (toml, fleet, mut drift, last_applied) = match &origin {
            Origin::File => {
                let m = drover_model::merge::three_way(
                    base_fleet.as_ref(),
                    &file_fleet,
                    old_fleet.as_ref(),
                    &old_set_by,
                    req.force_file,
                );
                let mut toml = req.toml.clone();
                for (service, component, version) in &m.keep_versions {
                    toml = set_versions(&toml, service, &[(component.clone(), version.clone())])?;
                }
                if !m.keep_removed.is_empty() {
                    toml = remove_services(&toml, &m.keep_removed)?;
                }
                let fleet = if toml == req.toml {
                    file_fleet
                } else {
                    drover_model::parse_fleet(&toml, &req.file)?
                };
                // Who set a live value stays known while the value is kept.
                let set_by = old_set_by
                    .into_iter()
                    .filter(|(k, _)| m.drift.iter().any(|d| d.kept && &d.field == k))
                    .collect();
                (
                    toml,
                    fleet,
                    m.drift,
                    LastApplied {
                        toml: req.toml.clone(),
                        set_by,
                    },
                )
            }
            Origin::Command(why) | Origin::Deploy { why, .. } => {
                let set_by = drover_model::merge::commanded(
                    &old_set_by,
                    old_fleet.as_ref(),
                    &file_fleet,
                    why,
                    next_revision,
                );
                let base = old_last.map(|l| l.toml).unwrap_or_else(|| req.toml.clone());
                (
                    req.toml.clone(),
                    file_fleet,
                    Vec::new(),
                    LastApplied { toml: base, set_by },
                )
            }
            Origin::Wave { .. } => (
                req.toml.clone(),
                file_fleet,
                Vec::new(),
                old_last.unwrap_or_else(|| LastApplied {
                    toml: req.toml.clone(),
                    set_by: BTreeMap::new(),
                }),
            ),
            Origin::AutoRevert { .. } => {
                let set_by = drover_model::merge::commanded(
                    &old_set_by,
                    old_fleet.as_ref(),
                    &file_fleet,
                    "automatic revert",
                    next_revision,
                );
                let base = old_last.map(|l| l.toml).unwrap_or_else(|| req.toml.clone());
                (
                    req.toml.clone(),
                    file_fleet,
                    Vec::new(),
                    LastApplied { toml: base, set_by },
                )
            }
        };
        let mut changes = drover_model::diff::diff(old_fleet.as_ref(), &fleet);
        // Secret values never reach the answer, the stored summary or the events.
        drover_model::secret::redact_changes(&mut changes);
        let mut events = Vec::new();
        let mut plan_changes = Vec::new();
        let mut rollouts = Vec::new();
        let mut new_groups: BTreeMap<String, Group> = BTreeMap::new();
        let mut new_plans: Vec<Plan> = Vec::new();
        // Groups whose count the file set: autoscaling goes on from it.
        let mut file_scaled: Vec<(String, u32)> = Vec::new();
        for (sname, svc) in &fleet.services {
            for region in &svc.regions {
                let gid = drover_model::GroupId::new(sname, region).0;
                let plan = drover_model::plan::plan_for(&fleet, sname, svc, region);
                let old = old_groups.get(&gid);
                let old_svc = old_fleet.as_ref().and_then(|f| f.services.get(sname));
                let (generation, mut plan_changed) = match old {
                    Some(g) if g.plan.same_content(&plan) => (g.record.generation, false),
                    Some(g) => (g.record.generation + 1, true),
                    // A group that existed before (removed, now back) continues its numbering:
                    // plans are immutable and kept.
                    None => (self.next_unused_generation(&gid)?, true),
                };
                // Waves: a change reaches the first wave now, the others when the wave before
                // them is done (`release_waves`); until then their plan is held.
                // `deploy --region` holds the service's other groups by hand: a wave, or an
                // apply that does not change the service, leaves them held; a deploy that
                // names them (or names none), or a file that changes the service, lets go.
                let wave = svc.rollout.wave_of(region);
                let service_path = format!("services.{sname}.");
                let was_held = old.is_some_and(|g| g.record.rollout.held)
                    && !(matches!(origin, Origin::File)
                        && changes.iter().any(|c| c.path.starts_with(&service_path)));
                let by_waves = !svc.rollout.waves.is_empty() && wave > 0;
                let (held, by_hand) = match &origin {
                    Origin::Deploy { only, .. } if !only.is_empty() && only.contains(&gid) => {
                        (false, false)
                    }
                    Origin::Deploy { only, .. } if !only.is_empty() => (true, true),
                    Origin::Deploy { .. } => (by_waves, false),
                    Origin::File => (was_held || by_waves, was_held),
                    Origin::Wave { groups, .. } => (!groups.contains(&gid), was_held),
                    Origin::Command(_) | Origin::AutoRevert { .. } => (false, false),
                };
                let held = held && plan_changed && old.is_some();
                let by_hand = held && by_hand;
                let estimate = |desired: u32| {
                    let step = (svc.rollout.max_surge + svc.rollout.max_unavailable).max(1);
                    let batches = desired.div_ceil(step);
                    let boot = boot_ms.unwrap_or(DEFAULT_BOOT_MS)
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
                let (mut plan, generation) = match (held, old) {
                    (true, Some(g)) => {
                        let (batches, estimated_ms) = estimate(g.record.desired);
                        rollouts.push(RolloutPlan {
                            group: gid.clone(),
                            from_generation: g.record.generation,
                            to_generation: g.record.generation + 1,
                            replaced: g.record.desired,
                            batches,
                            estimated_ms,
                            wave: wave_no,
                            held: true,
                        });
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
                        if by_hand && !was_held {
                            events.push(
                                NewEvent::new(
                                    EventKind::PlanChanged,
                                    format!(
                                        "the change ({}) was deployed to other regions only: this group keeps generation {} until a deploy names {region} (or no region)",
                                        plan.versions(),
                                        g.record.generation
                                    ),
                                )
                                .group(&gid),
                            );
                        } else if !by_hand && !g.record.rollout.wave_pending {
                            events.push(
                            NewEvent::new(
                                EventKind::PlanChanged,
                                format!(
                                    "the change ({}) waits for wave {}: this group keeps generation {} until the waves before it are done",
                                    plan.versions(),
                                    wave + 1,
                                    g.record.generation
                                ),
                            )
                            .group(&gid),
                        );
                        }
                        plan_changed = false;
                        (g.plan.clone(), g.record.generation)
                    }
                    _ => (plan, generation),
                };
                plan.generation = generation;
                plan.revision = match old {
                    Some(g) if !plan_changed => g.plan.revision,
                    _ => next_revision,
                };
                // The file's desired count wins when it changed since the file was last
                // applied (or the group is new, or the apply is forced); otherwise keep the
                // current count (set by `scale` or autoscaling), clamped to the new range.
                let reference = match &origin {
                    Origin::File => base_fleet.as_ref().and_then(|f| f.services.get(sname)),
                    _ => old_svc,
                };
                let file_desired_changed = (matches!(origin, Origin::File) && req.force_file)
                    || reference.is_none_or(|o| o.capacity.desired != svc.capacity.desired);
                if let (Origin::File, Some(g)) = (&origin, old) {
                    if g.record.desired != svc.capacity.desired && reference.is_some() {
                        let kept = !file_desired_changed;
                        if kept || req.force_file {
                            drift.push(drover_model::api::Drift {
                                field: format!("services.{sname}.capacity.desired ({gid})"),
                                file: svc.capacity.desired.to_string(),
                                live: g.record.desired.to_string(),
                                set_by: g.record.desired_reason.clone(),
                                kept,
                            });
                        }
                    }
                }
                // The range, raised by the schedules that hold now (the new file's and the
                // one-offs): a count a schedule set is not undone by an apply.
                let bounds = drover_control::Schedules {
                    service: sname,
                    region,
                    base_min: svc.capacity.min,
                    base_max: svc.capacity.max,
                    file: &svc.schedule,
                    once: &once,
                }
                .bounds(now);
                let (desired, reason) = match old {
                    Some(g) if !file_desired_changed => (
                        g.record.desired.clamp(bounds.min, bounds.max),
                        g.record.desired_reason.clone(),
                    ),
                    _ => (svc.capacity.desired, format!("fleet file ({})", req.file)),
                };
                let rollout = match (old, plan_changed) {
                    (Some(g), false) => {
                        let mut r = g.record.rollout.clone();
                        // Held for its wave or by hand, or (its plan what the fleet says)
                        // nothing pending.
                        r.wave_pending = held;
                        r.held = by_hand;
                        r
                    }
                    (old, _) => drover_control::rollout::begin(
                        old.map(|g| (&g.record.rollout, g.record.generation)),
                        now,
                        matches!(origin, Origin::AutoRevert { .. }),
                        match &origin {
                            Origin::AutoRevert { failed } => failed.get(&gid).copied().unwrap_or(0),
                            _ => 0,
                        },
                    ),
                };
                if plan_changed {
                    let replaced = old.map(|_| desired).unwrap_or(0);
                    if let Some(g) = old {
                        let (batches, estimated_ms) = estimate(replaced);
                        rollouts.push(RolloutPlan {
                            group: gid.clone(),
                            from_generation: g.record.generation,
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
                            g.record.generation,
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
                                    g.record.generation
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
                if old.is_none() || (old.is_some() && file_desired_changed) {
                    file_scaled.push((gid.clone(), desired));
                }
                if let Some(g) = old {
                    if g.record.desired != desired {
                        events.push(
                            NewEvent::new(
                                EventKind::Scaled,
                                format!("desired {} -> {desired} ({reason})", g.record.desired),
                            )
                            .group(&gid),
                        );
                    }
                }
                let (provider, ingress) =
                    crate::engine::provider_and_ingress(&fleet, sname, region);
                new_groups.insert(
                    gid.clone(),
                    Group {
                        record: GroupRecord {
                            group: gid.clone(),
                            desired,
                            desired_reason: reason,
                            generation,
                            rollout,
                        },
                        plan,
                        provider,
                        ingress,
                    },
                );
            }
        }
        let removed: Vec<String> = old_groups
            .keys()
            .filter(|g| !new_groups.contains_key(*g))
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
                .as_ref()
                .and_then(|f| f.services.get(sname))
                .map(|s| s.schedule.as_slice())
                .unwrap_or(&[]);
            for (i, sch) in svc.schedule.iter().enumerate() {
                if old.get(i) == Some(sch) {
                    continue;
                }
                let next = drover_control::schedule::next_firings(sname, i, sch, now, 5);
                schedules.push(drover_model::api::ScheduleFirings {
                    id: drover_control::schedule::file_id(sname, i),
                    what: next.first().map(|w| w.what.clone()).unwrap_or_default(),
                    next,
                });
            }
        }
        let response = |revision, applied| ApplyResponse {
            revision,
            applied,
            changes: changes.clone(),
            plan_changes: plan_changes.clone(),
            rollouts: rollouts.clone(),
            drift: drift.clone(),
            schedules: schedules.clone(),
        };
        // A wave, or a deploy of what the revision already says to groups held by hand,
        // carries the revision's change further without a new revision.
        let let_go = new_groups.iter().any(|(k, g)| {
            old_groups
                .get(k)
                .is_some_and(|o| o.record.rollout.held && !g.record.rollout.held)
        });
        let wave_release = matches!(origin, Origin::Wave { .. }) || (changes.is_empty() && let_go);
        if (changes.is_empty() && !wave_release) || req.dry_run {
            return Ok(response(current, false));
        }
        // Nothing is stored unless every new artifact can be fetched and matches its sha256.
        for plan in &new_plans {
            let old = old_groups.get(&plan.group().0).map(|g| &g.plan);
            crate::artifact::check_new_artifacts(old, plan).await?;
        }
        // ... and every new image tag resolves to a digest in its registry (the plans pin it).
        crate::registry::pin_images(self, &old_groups, &mut new_plans, &mut new_groups).await?;
        self.ensure_providers(&fleet)?;
        // Every group gets its agent token before any instance of it can be launched.
        self.auth()
            .ensure_agent_tokens(self, new_groups.keys().map(String::as_str))
            .await?;
        // Check new ingresses before committing, so a port in use refuses the whole apply.
        for g in new_groups.values() {
            if let Some((addr, _)) = g.ingress {
                self.check_ingress(&g.record.group, addr)?;
            }
        }
        let summary = match (&old_fleet, &origin) {
            (None, _) => format!(
                "fleet {} created: {} service(s) ({}), {} region(s)",
                fleet.fleet.name,
                fleet.services.len(),
                list(fleet.services.keys()),
                fleet.regions.len()
            ),
            (Some(_), Origin::File) => summarize(&changes),
            (Some(_), Origin::Deploy { why, .. }) if changes.is_empty() => {
                let reached: Vec<&str> = new_groups
                    .iter()
                    .filter(|(k, g)| {
                        old_groups
                            .get(*k)
                            .is_some_and(|o| o.record.rollout.held && !g.record.rollout.held)
                    })
                    .map(|(k, _)| k.as_str())
                    .collect();
                format!(
                    "{why}: the change of revision {current} reaches {}",
                    reached.join(", ")
                )
            }
            (Some(_), Origin::Command(why) | Origin::Deploy { why, .. }) => {
                format!("{why}: {}", summarize(&changes))
            }
            (Some(_), Origin::Wave { wave, groups }) => format!(
                "wave {} of revision {current} reaches {}",
                wave + 1,
                groups.join(", ")
            ),
            (Some(_), Origin::AutoRevert { failed }) => format!(
                "automatic revert after failed rollout of {}: {}",
                failed
                    .iter()
                    .map(|(g, n)| format!("{g} generation {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                summarize(&changes)
            ),
        };
        let mut writes = if wave_release {
            // The revision is the same: the wave carries its change further.
            vec![Write::Event(NewEvent::new(
                EventKind::Applied,
                summary.clone(),
            ))]
        } else {
            vec![
                Write::Event(NewEvent::new(
                    EventKind::Applied,
                    format!("revision {next_revision}: {summary}"),
                )),
                Write::Revision {
                    file: req.file.clone(),
                    summary: summary.clone(),
                    toml: toml.clone(),
                    fleet: fleet.clone(),
                    last_applied: Some(last_applied.clone()),
                },
            ]
        };
        writes.extend(new_plans.into_iter().map(Write::Plan));
        for g in new_groups.values() {
            writes.push(Write::Group(g.record.clone()));
        }
        for g in &removed {
            writes.push(Write::RemoveGroup(g.clone()));
        }
        writes.extend(events.into_iter().map(Write::Event));
        let committed = self.commit(writes).await?;
        let number =
            committed
                .revision
                .unwrap_or(if wave_release { current } else { next_revision });
        {
            let mut st = self.state();
            if wave_release {
                st.groups = new_groups;
                drop(st);
                self.wake.notify_one();
                return Ok(response(number, true));
            }
            st.revision = Some(Revision {
                number,
                applied_at_ms: now,
                file: req.file.clone(),
                summary,
                toml,
                fleet,
                last_applied: Some(last_applied),
            });
            st.groups = new_groups;
            for (g, d) in file_scaled {
                st.autoscale.entry(g).or_default().manual(now, d);
            }
        }
        for g in &removed {
            self.close_ingress(g);
        }
        self.open_ingresses();
        self.wake.notify_one();
        Ok(response(number, true))
    }
}

impl Engine {
    /// The first generation of `group` with no stored plan.
    fn next_unused_generation(&self, group: &str) -> Result<u64, ServerError> {
        let mut g = 1;
        while self.store.plan(group, g)?.is_some() {
            g += 1;
        }
        Ok(g)
    }
}

/// The component versions of a service in a revision.
fn versions_in(rev: &Revision, service: &str) -> Option<Vec<(String, String)>> {
    rev.fleet.services.get(service).map(|s| {
        s.components
            .iter()
            .map(|(n, c)| (n.clone(), c.version.clone()))
            .collect()
    })
}

/// The fleet file's text with some versions of one service changed, formatting kept.
pub fn set_versions(
    toml: &str,
    service: &str,
    versions: &[(String, String)],
) -> Result<String, ServerError> {
    let mut doc: toml_edit::DocumentMut = toml
        .parse()
        .map_err(|e| ServerError::Internal(format!("stored fleet file does not parse: {e}")))?;
    for (component, version) in versions {
        let slot = doc
            .get_mut("services")
            .and_then(|s| s.get_mut(service))
            .and_then(|s| s.get_mut("components"))
            .and_then(|c| c.get_mut(component))
            .and_then(|c| c.as_table_like_mut())
            .ok_or_else(|| {
                ServerError::NotFound(format!(
                    "service {service} has no component {component} in the current revision"
                ))
            })?;
        slot.insert("version", toml_edit::value(version.as_str()));
    }
    Ok(doc.to_string())
}

/// The fleet file's text with some components of one service as they are in `from` (an
/// earlier revision's text), whole: version, artifact, arguments, environment. A component
/// `from` does not have is left as it is. The rest of the file, formatting included, is
/// kept.
pub fn restore_components(
    toml: &str,
    from: &str,
    service: &str,
    components: &[String],
) -> Result<String, ServerError> {
    let parse = |t: &str| {
        t.parse::<toml_edit::DocumentMut>()
            .map_err(|e| ServerError::Internal(format!("stored fleet file does not parse: {e}")))
    };
    let mut doc = parse(toml)?;
    let old = parse(from)?;
    let old_components = old
        .get("services")
        .and_then(|s| s.get(service))
        .and_then(|s| s.get("components"));
    for component in components {
        let Some(item) = old_components.and_then(|c| c.get(component)) else {
            continue;
        };
        let slot = doc
            .get_mut("services")
            .and_then(|s| s.get_mut(service))
            .and_then(|s| s.get_mut("components"))
            .and_then(|c| c.as_table_like_mut())
            .ok_or_else(|| {
                ServerError::NotFound(format!(
                    "service {service} has no components in the current revision"
                ))
            })?;
        if slot.contains_key(component) {
            slot.insert(component, item.clone());
        }
    }
    Ok(doc.to_string())
}

/// The fleet file without these services (comments and layout of the rest kept).
pub fn remove_services(toml: &str, services: &[String]) -> Result<String, ServerError> {
    let mut doc: toml_edit::DocumentMut = toml
        .parse()
        .map_err(|e| ServerError::Internal(format!("stored fleet file does not parse: {e}")))?;
    if let Some(t) = doc.get_mut("services").and_then(|s| s.as_table_like_mut()) {
        for s in services {
            t.remove(s);
        }
    }
    Ok(doc.to_string())
}

/// The error for a service `fleet` does not have.
pub(crate) fn no_service(service: &str, fleet: &drover_model::Fleet) -> ServerError {
    ServerError::NoService {
        service: service.to_string(),
        known: fleet.services.keys().cloned().collect(),
    }
}

fn list<'a>(it: impl Iterator<Item = &'a String>) -> String {
    crate::names(&it.cloned().collect::<Vec<_>>())
}

fn summarize(changes: &[drover_model::diff::Change]) -> String {
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

    #[test]
    fn set_versions_keeps_formatting_and_handles_inline_tables() {
        let text = "# comment\n[services.web.components.app]\nversion = \"v1\" # pinned\ncommand = \"x\"\n\n[services.web.components]\nside = { version = \"1\", command = \"y\" }\n";
        let out = set_versions(
            text,
            "web",
            &[("app".into(), "v2".into()), ("side".into(), "2".into())],
        )
        .unwrap();
        assert!(out.starts_with("# comment\n"), "{out}");
        assert!(out.contains("version = \"v2\""), "{out}");
        assert!(out.contains("side = { version = \"2\""), "{out}");
        assert!(set_versions(text, "web", &[("nope".into(), "1".into())]).is_err());
    }

    /// A revert takes a component back whole: a broken change that came with its own
    /// artifact sha256 and arguments goes back to the good ones, not only to the good
    /// version (which would keep the broken sha256 and fail the revert).
    #[test]
    fn restore_components_takes_back_version_artifact_and_arguments() {
        let good = "[fleet]\nname = \"t\"\n\n[services.web.components.app]\nversion = \"v3\"\nargs = [\"--ok\"]\nartifact = { url = \"http://h/app-{version}.tgz\", sha256 = \"aaa\" }\n\n[services.web.components.side]\nversion = \"1\"\n";
        let broken = "[fleet]\nname = \"t\"\n# kept\n[services.web]\nregions = [\"local\"]\n\n[services.web.components.app]\nversion = \"v4\"\nargs = [\"--crash\"]\nartifact = { url = \"http://h/app-{version}.tgz\", sha256 = \"bbb\" }\n\n[services.web.components.new]\nversion = \"9\"\n";
        let out = restore_components(
            broken,
            good,
            "web",
            &["app".into(), "new".into(), "side".into()],
        )
        .unwrap();
        let doc: toml_edit::DocumentMut = out.parse().unwrap();
        let comps = &doc["services"]["web"]["components"];
        let app = &comps["app"];
        assert_eq!(app["version"].as_str(), Some("v3"), "{out}");
        assert_eq!(app["artifact"]["sha256"].as_str(), Some("aaa"), "{out}");
        assert_eq!(app["args"][0].as_str(), Some("--ok"), "{out}");
        // Not in the good revision: left as it is; not in the current one: not added.
        assert_eq!(comps["new"]["version"].as_str(), Some("9"));
        assert!(comps.get("side").is_none(), "{out}");
        assert_eq!(doc["services"]["web"]["regions"][0].as_str(), Some("local"));
        assert!(out.contains("# kept"), "{out}");
    }
}
