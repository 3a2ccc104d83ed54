//! What a heartbeat changes in the world: the instance's soft state, the events it causes
//! (within a per-instance budget), and the canary window it feeds.

use std::collections::BTreeMap;

use drover_model::api::{ComponentReport, Heartbeat};
use drover_model::record::Lifecycle;

use super::Instance;
use crate::Health;

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

/// Events a heartbeat implies, and whether the instance's health changed.
pub fn absorb_heartbeat(
    inst: &mut Instance,
    hb: Heartbeat,
    now: u64,
) -> (Vec<drover_model::NewEvent>, bool) {
    use drover_model::{EventKind, NewEvent};
    let mut events = Vec::new();
    // Named only in an event (most heartbeats cause none).
    let ev = |inst: &Instance, kind, msg: String| {
        NewEvent::new(kind, msg)
            .group(&inst.record.group)
            .instance(&inst.record.id)
    };
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
                inst,
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
        events.push(ev(inst, EventKind::Drained, report.describe()));
    }
    if leaving && inst.record.lifecycle != Lifecycle::Active {
        // An agent leaving with a permit (or being terminated) stops its components on
        // purpose: not a health change. (An active instance that stops on its own is
        // unhealthy, and leaves rotation, below.)
        inst.soft.last_seen_ms = now;
        inst.soft.last_seq = hb.seq;
        inst.soft.components = hb.components;
        inst.soft.reporting = true;
        return (events, false);
    }
    let healthy = hb.healthy();
    if std::mem::take(&mut inst.soft.restored) {
        // Unknown, never healthy (see the server's `Engine::new`): healthy from now, or starting.
        inst.soft.health = inst
            .soft
            .health
            .after_report(healthy, inst.soft.ever_healthy, now);
        inst.soft.ever_healthy |= healthy;
        inst.soft.last_seen_ms = now;
        inst.soft.last_seq = hb.seq;
        inst.soft.components = hb.components;
        inst.soft.utilization = hb.utilization;
        inst.soft.reporting = true;
        return (events, true);
    }
    let before = inst.soft.health;
    let after = before.after_report(healthy, inst.soft.ever_healthy, now);
    let changed = std::mem::discriminant(&before) != std::mem::discriminant(&after);
    if changed {
        match after {
            Health::Healthy { .. } => events.push(ev(
                inst,
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
                    inst,
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
    inst.soft.components = hb.components;
    inst.soft.utilization = hb.utilization;
    inst.soft.reporting = true;
    (events, changed)
}
