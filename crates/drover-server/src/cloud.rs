//! The server's side of providers that keep resources per group (Auto Scaling groups, launch
//! templates, load balancers on AWS): make each group's launch configuration current before
//! the controller acts, and remove a group's resources once it has left the fleet and its
//! instances are gone. Every change a provider reports is an event.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use drover_model::{EventKind, NewEvent};
use drover_provider::{GroupSetup, IngressPlan, Provider};

use crate::engine::{balancer_health, region_of, Engine};

impl Engine {
    /// What each group's provider must make exist, from the current revision.
    fn group_specs(&self) -> Vec<(Arc<dyn Provider>, GroupSetup)> {
        let st = self.state();
        let Some(fleet) = st.fleet() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (gid, g) in &st.groups {
            let Some(svc) = fleet.services.get(&g.plan.service) else {
                continue;
            };
            let Some(provider) = self.provider(region_of(gid)) else {
                continue;
            };
            let ingress = svc.ingress.as_ref().and_then(|ing| {
                let listen: std::net::SocketAddr = ing.listen.parse().ok()?;
                let (_, _, target_port) = drover_model::Fleet::ingress_target(svc)?;
                let health = balancer_health(svc);
                Some(IngressPlan {
                    listen_port: listen.port(),
                    target_port,
                    http_path: health.as_ref().and_then(|h| match &h.kind {
                        drover_lb::HealthCheckKind::Http { path } => Some(path.clone()),
                        drover_lb::HealthCheckKind::Tcp => None,
                    }),
                    interval: health
                        .as_ref()
                        .map(|h| h.interval)
                        .unwrap_or(std::time::Duration::from_secs(10)),
                    rise: health.as_ref().map(|h| h.rise).unwrap_or(3),
                    fall: health.as_ref().map(|h| h.fall).unwrap_or(3),
                    drain: svc.rollout.drain_timeout.0,
                })
            });
            out.push((
                provider,
                GroupSetup {
                    fleet: fleet.fleet.name.clone(),
                    group: gid.clone(),
                    service: g.plan.service.clone(),
                    region: g.plan.region.clone(),
                    plan: g.plan.clone(),
                    instance_type: svc.instance_type.clone(),
                    // Surge instances, plus the instances draining on a permit (at most
                    // surge + max_unavailable at once) that the group still counts.
                    max_size: svc.capacity.max
                        + 2 * svc.rollout.max_surge
                        + svc.rollout.max_unavailable,
                    ingress,
                    // Only the fallback of an agent whose permit does not say (the permit's
                    // `decrement` decides, see `World::leaver_decrements`): with surge the
                    // controller launches every replacement itself, so the leaver's capacity
                    // goes with it; without, the Auto Scaling group replaces a stale leaver.
                    decrement_on_leave: svc.rollout.max_surge > 0,
                },
            ));
        }
        out
    }

    /// Bring every group's launch configuration up to date at its provider. A failure is an
    /// event once (until it changes or clears) and is retried every tick.
    pub(crate) async fn prepare_groups(&self) {
        for (provider, spec) in self.group_specs() {
            let group = spec.group.clone();
            let result = provider.prepare(spec).await;
            let mut events = Vec::new();
            {
                let mut errors = self.provider_errors.lock().expect("provider errors lock");
                match result {
                    Ok(lines) => {
                        if errors.remove(&group).is_some() && lines.is_empty() {
                            events.push(
                                NewEvent::new(EventKind::Provider, "provider calls succeed again")
                                    .group(&group),
                            );
                        }
                        events.extend(
                            lines
                                .into_iter()
                                .map(|l| NewEvent::new(EventKind::Provider, l).group(&group)),
                        );
                    }
                    Err(e) => {
                        let msg = format!("cannot make the group current at its provider: {e}");
                        if errors.get(&group) != Some(&msg) {
                            tracing::error!(group = %group, "{msg}");
                            events.push(NewEvent::new(EventKind::Provider, &msg).group(&group));
                            errors.insert(group.clone(), msg);
                        }
                    }
                }
            }
            self.record(events);
        }
    }

    /// Let each provider remove what it made for groups that left the fleet and have no
    /// instance left.
    pub(crate) async fn sweep_providers(&self) {
        let (providers, keep) = {
            let st = self.state();
            let mut keep: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for g in st.groups.keys() {
                keep.entry(region_of(g).to_string())
                    .or_default()
                    .insert(g.clone());
            }
            // A group whose instances are still leaving is kept until they are gone.
            for g in st.instances.groups() {
                keep.entry(region_of(g).to_string())
                    .or_default()
                    .insert(g.clone());
            }
            (self.providers_by_region(), keep)
        };
        for (region, p) in providers {
            if !p.balances() {
                continue;
            }
            let keep = keep.get(&region).cloned().unwrap_or_default();
            match p.sweep(keep).await {
                Ok(lines) => self.record(
                    lines
                        .into_iter()
                        .map(|l| NewEvent::new(EventKind::Provider, l))
                        .collect(),
                ),
                Err(e) => {
                    tracing::warn!(region = %region, "removing groups that left the fleet: {e}")
                }
            }
        }
    }
}
