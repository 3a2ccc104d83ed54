//! Changing desired state: apply a fleet file, deploy a version, roll back, revert a failed
//! rollout. Every path ends in one validated, atomically stored revision. What a change does
//! to the groups is planned by `drover_control::change` (pure); this is its shell.

use std::collections::BTreeMap;

use drover_control::change::Commit;
use drover_model::api::{
    ApplyRequest, ApplyResponse, DeployRequest, DestroyRequest, LastApplied, Revision,
    RollbackRequest,
};
use drover_store::Write;

use crate::engine::{now_ms, Engine};
use crate::state::Group;
use crate::ServerError;

/// Why desired state changes (planned by `drover_control::change`).
pub use drover_control::change::Origin;

impl Engine {
    /// Validate, diff and store a fleet file as a new revision. Nothing changes on error.
    pub async fn apply(&self, req: ApplyRequest) -> Result<ApplyResponse, ServerError> {
        // Artifacts are fetched and image tags resolved before the lock: a slow host holds up
        // this apply only.
        if !req.dry_run {
            if let Ok(fleet) = drover_model::parse_fleet(&req.toml, &req.file) {
                crate::artifact::prefetch(self, &fleet).await;
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
                    crate::artifact::prefetch(self, &fleet).await;
                    crate::registry::prefetch(self, &fleet).await;
                }
            }
        }
        let _w = self.write_lock.lock().await;
        let rev = self
            .current_revision()
            .ok_or(ServerError::NothingApplied { to: None })?;
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
        let rev = self.current_revision().ok_or(ServerError::NothingApplied {
            to: Some("destroy"),
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
        let rev = self.current_revision().ok_or(ServerError::NothingApplied {
            to: Some("roll back"),
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
        let (n, versions) = target.ok_or_else(|| ServerError::NothingToRollBack {
            service: req.service.clone(),
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
    pub(crate) async fn auto_revert(
        &self,
        group: &str,
        failed: u64,
        good: u64,
    ) -> Result<(), ServerError> {
        let Some(rev) = self.state().revision.clone() else {
            return Ok(());
        };
        let Some(plan) = self.store.plan(group, good)? else {
            return Ok(());
        };
        let back = drover_control::rollout::revert_to(&plan);
        let components: Vec<String> = back.versions.iter().map(|(c, _)| c.clone()).collect();
        let toml = match self.store.revision(back.revision)? {
            Some(old) => restore_components(&rev.toml, &old.toml, &back.service, &components)?,
            None => set_versions(&rev.toml, &back.service, &back.versions)?,
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

    /// The body of every change of desired state, a shell around `drover_control::change`:
    /// it decides the revision's text (the three-way merge of a file, or the text a command
    /// made), gathers the world, has the change planned, then carries the plan out: new
    /// artifacts checked, images pinned, providers and agent tokens ready, ingresses
    /// checked, one store commit, then memory, then balancers. The caller holds the write
    /// lock.
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
        let (toml, fleet, drift, last_applied) = match &origin {
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
        // The plan, from the world as the change finds it: pure. Only the first unused
        // generation of a group new to the fleet comes from the store.
        let mut world = drover_control::change::Situation {
            fleet: old_fleet.as_ref(),
            revision: current,
            last_applied: base_fleet.as_ref(),
            groups: old_groups
                .iter()
                .map(|(k, g)| (k.clone(), g.before()))
                .collect(),
            unused_generation: BTreeMap::new(),
            boot_ms,
            once: &once,
        };
        for gid in drover_control::change::new_groups(&fleet, &world) {
            let n = self.next_unused_generation(&gid)?;
            world.unused_generation.insert(gid, n);
        }
        let plan = drover_control::change::plan(
            &world,
            &drover_control::change::Request {
                origin: &origin,
                file: &req.file,
                force_file: req.force_file,
                fleet: &fleet,
                drift,
            },
            now,
        );
        drop(world);
        let response = |revision, applied| ApplyResponse {
            revision,
            applied,
            changes: plan.changes.clone(),
            plan_changes: plan.plan_changes.clone(),
            rollouts: plan.rollouts.clone(),
            drift: plan.drift.clone(),
            schedules: plan.schedules.clone(),
        };
        let wave_release = plan.commit == Commit::Release;
        if plan.commit == Commit::Nothing || req.dry_run {
            return Ok(response(current, false));
        }
        let mut new_groups: BTreeMap<String, Group> = plan
            .groups
            .iter()
            .map(|(gid, g)| (gid.clone(), Group::planned(gid, g, &fleet)))
            .collect();
        let mut new_plans = plan.new_plans.clone();
        // Nothing is stored unless every new artifact can be fetched and matches its sha256.
        for p in &new_plans {
            crate::artifact::check_new_artifacts(self, &old_groups, p).await?;
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
        let summary = plan.summary.clone();
        let mut writes: Vec<Write> = plan.applied_event().into_iter().map(Write::Event).collect();
        if !wave_release {
            writes.push(Write::Revision {
                file: req.file.clone(),
                summary: summary.clone(),
                toml: toml.clone(),
                fleet: fleet.clone(),
                last_applied: Some(last_applied.clone()),
            });
        }
        writes.extend(new_plans.into_iter().map(Write::Plan));
        for g in new_groups.values() {
            writes.push(Write::Group(g.record.clone()));
        }
        for g in &plan.removed {
            writes.push(Write::RemoveGroup(g.clone()));
        }
        writes.extend(plan.events.iter().cloned().map(Write::Event));
        let committed = self.commit(writes).await?;
        let number =
            committed
                .revision
                .unwrap_or(if wave_release { current } else { next_revision });
        let revision = (!wave_release).then(|| Revision {
            number,
            applied_at_ms: now,
            file: req.file.clone(),
            summary,
            toml,
            fleet,
            last_applied: Some(last_applied),
        });
        self.state()
            .take_applied(revision, new_groups, &plan.file_scaled, now);
        if wave_release {
            self.wake.notify_one();
            return Ok(response(number, true));
        }
        for g in &plan.removed {
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
        known: Some(fleet.services.keys().cloned().collect()),
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
