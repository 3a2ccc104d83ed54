//! What carrying out an instance's action changes, as a list of effects: the controller
//! decides ([`crate::reconcile`]), this plans the change, and a shell (the server's engine,
//! the simulation) carries the effects out in order — store and events first, then memory,
//! then the outside world. The phase rules and the events' wording live here only.

use drover_model::EventKind;

use crate::backoff::ends_failed_launch;
use crate::group::{Action, InstanceView, Phase};

/// One change to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Store the instance's new phase (with the permit's time when it gets one).
    SetPhase {
        instance: String,
        phase: Phase,
        permit_at_ms: Option<u64>,
    },
    /// The instance is gone: remove its record and forget it everywhere (a permit long-poll
    /// still held for it ends).
    Remove { instance: String },
    /// Record an event about the instance.
    Event {
        kind: EventKind,
        group: String,
        instance: String,
        message: String,
    },
    /// It ended before ever turning healthy: back off its group's launches
    /// ([`crate::backoff`]).
    LaunchFailed { group: String },
    /// Out of the balancers' targets, and of the provider's load balancer, now.
    OutOfRotation { group: String, instance: String },
    /// Its agent's permit long-poll answers now.
    WakePermitPoll { instance: String },
    /// The provider terminates it (its components get their stop grace).
    ProviderTerminate { instance: String },
    /// Launch one instance of the group on the generation.
    Launch { group: String, generation: u64 },
}

/// The effects of `action`, given the instance it names as the server knows it now (`None`:
/// it is already gone, and nothing happens). Actions on groups (rollouts, canaries) are not
/// instance actions: no effect here (see [`crate::rollout`]).
pub fn of(action: &Action, instance: Option<&InstanceView>, now: u64) -> Vec<Effect> {
    let mut out = Vec::new();
    if let Action::Launch { group, generation } = action {
        out.push(Effect::Launch {
            group: group.clone(),
            generation: *generation,
        });
        return out;
    }
    let Some(i) = instance else {
        return out;
    };
    if ends_failed_launch(action, i) {
        out.push(Effect::LaunchFailed {
            group: i.group.clone(),
        });
    }
    let event = |kind: EventKind, message: String| Effect::Event {
        kind,
        group: i.group.clone(),
        instance: i.id.clone(),
        message,
    };
    match action {
        Action::Forget { reason, .. } => {
            let (kind, message) = match i.phase {
                Phase::Active => (
                    EventKind::Lost,
                    format!("lost: {reason}; it will be replaced"),
                ),
                Phase::Draining | Phase::Terminating => {
                    (EventKind::Terminated, "terminated".to_string())
                }
            };
            out.push(Effect::Remove {
                instance: i.id.clone(),
            });
            out.push(event(kind, message));
        }
        Action::Terminate { reason, .. } => {
            if i.phase == Phase::Terminating || !i.alive {
                return out;
            }
            let message = match i.phase {
                // A leaver that overstayed its permit: not replaced, it was leaving anyway.
                Phase::Draining => format!("terminating: {reason}"),
                _ => format!("terminating: replacing it: {reason}"),
            };
            out.push(Effect::SetPhase {
                instance: i.id.clone(),
                phase: Phase::Terminating,
                permit_at_ms: i.permit_at_ms,
            });
            out.push(event(EventKind::Terminating, message));
            // A long-poll under way answers `permit: true` (the agent leaves by itself).
            out.push(Effect::WakePermitPoll {
                instance: i.id.clone(),
            });
            out.push(Effect::ProviderTerminate {
                instance: i.id.clone(),
            });
        }
        Action::Permit { reason, .. } => {
            if i.phase != Phase::Active || !i.alive {
                return out;
            }
            out.push(Effect::SetPhase {
                instance: i.id.clone(),
                phase: Phase::Draining,
                permit_at_ms: Some(now),
            });
            out.push(event(
                EventKind::Permit,
                format!("permit: {reason}; out of rotation, draining"),
            ));
            // Out of the balancer before the agent hears of its permit.
            out.push(Effect::OutOfRotation {
                group: i.group.clone(),
                instance: i.id.clone(),
            });
            out.push(Effect::WakePermitPoll {
                instance: i.id.clone(),
            });
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::Health;

    fn view(phase: Phase, ever_healthy: bool) -> InstanceView {
        InstanceView {
            id: "i-1".into(),
            group: "web/eu".into(),
            generation: 1,
            launched_at_ms: 0,
            phase,
            alive: true,
            health: Health::Starting,
            last_seen_ms: 0,
            ever_healthy,
            watched_since_ms: 0,
            exits_before_healthy: 0,
            last_failure: None,
            permit_at_ms: None,
            restored: false,
        }
    }

    fn kinds(e: &[Effect]) -> Vec<&'static str> {
        e.iter()
            .map(|e| match e {
                Effect::SetPhase { .. } => "set_phase",
                Effect::Remove { .. } => "remove",
                Effect::Event { .. } => "event",
                Effect::LaunchFailed { .. } => "launch_failed",
                Effect::OutOfRotation { .. } => "out_of_rotation",
                Effect::WakePermitPoll { .. } => "wake",
                Effect::ProviderTerminate { .. } => "terminate",
                Effect::Launch { .. } => "launch",
            })
            .collect()
    }

    #[test]
    fn a_permit_stores_its_time_leaves_rotation_then_wakes_the_agent() {
        let permit = Action::Permit {
            instance: "i-1".into(),
            reason: "stale".into(),
        };
        let e = of(&permit, Some(&view(Phase::Active, true)), 42);
        assert_eq!(kinds(&e), ["set_phase", "event", "out_of_rotation", "wake"]);
        assert_eq!(
            e[0],
            Effect::SetPhase {
                instance: "i-1".into(),
                phase: Phase::Draining,
                permit_at_ms: Some(42)
            }
        );
        // Twice, or on one already leaving, or gone: nothing.
        assert!(of(&permit, Some(&view(Phase::Draining, true)), 43).is_empty());
        assert!(of(&permit, None, 43).is_empty());
    }

    #[test]
    fn forgetting_and_terminating_say_what_happened_and_back_off_failed_launches() {
        let forget = Action::Forget {
            instance: "i-1".into(),
            reason: "its agent exited".into(),
        };
        let e = of(&forget, Some(&view(Phase::Active, false)), 1);
        assert_eq!(kinds(&e), ["launch_failed", "remove", "event"]);
        let Effect::Event { kind, message, .. } = &e[2] else {
            unreachable!()
        };
        assert_eq!(*kind, EventKind::Lost);
        assert_eq!(message, "lost: its agent exited; it will be replaced");
        let e = of(&forget, Some(&view(Phase::Draining, true)), 1);
        assert_eq!(kinds(&e), ["remove", "event"]);

        let terminate = Action::Terminate {
            instance: "i-1".into(),
            reason: "silent".into(),
        };
        let e = of(&terminate, Some(&view(Phase::Active, true)), 1);
        assert_eq!(kinds(&e), ["set_phase", "event", "wake", "terminate"]);
        let Effect::Event { message, .. } = &e[1] else {
            unreachable!()
        };
        assert_eq!(message, "terminating: replacing it: silent");
        let e = of(&terminate, Some(&view(Phase::Draining, true)), 1);
        let Effect::Event { message, .. } = &e[1] else {
            unreachable!()
        };
        assert_eq!(message, "terminating: silent", "a leaver is not replaced");
        assert!(of(&terminate, Some(&view(Phase::Terminating, true)), 1).is_empty());
    }
}
