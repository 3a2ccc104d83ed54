//! Events: the append-only record of everything that happened.

use serde::{Deserialize, Serialize};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A fleet revision was applied.
    Applied,
    /// A group got a new plan generation (its launch configuration changed).
    PlanChanged,
    /// A group's desired count changed.
    Scaled,
    /// The provider launched an instance.
    Launched,
    /// An instance reported all its components healthy for the first time.
    Healthy,
    /// An instance reported a component unhealthy or not running.
    Unhealthy,
    /// An instance reported that its agent restarted a component.
    Respawned,
    /// An instance stopped reporting.
    Silent,
    /// An instance's agent process ended (seen by the provider).
    Lost,
    /// The controller asked the provider to terminate an instance.
    Terminating,
    /// The instance is gone.
    Terminated,
    /// A stale instance was given leave to drain and terminate itself.
    Permit,
    /// An instance leaving on its permit finished draining (its agent's report: how long it
    /// took, whether the drain timeout ran out, which components got their drain signal).
    Drained,
    /// Balancer targets of a group changed.
    Targets,
    /// A rollout started, progressed, finished or failed.
    Rollout,
    /// The server started or stopped.
    Server,
    /// The provider made, changed or removed cloud resources (a launch template version, an
    /// Auto Scaling group, a load balancer).
    Provider,
    /// A schedule raised or dropped a group's bounds, or a one-off scheduled change was
    /// made or cancelled.
    Schedule,
    /// A balancer process (`drover lb`) started, was adopted, exited, handed its listeners
    /// over, or could not open a listener.
    Balancer,
    /// Somebody ran a command on an instance (`drover exec`): who, what, where, how it ended.
    Exec,
    /// The flight recorder kept the last lines of a component that died (or of an instance
    /// that left): `drover logs SERVICE --instance ID` shows them after the instance is gone.
    Output,
}

impl EventKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::Applied => "applied",
            EventKind::PlanChanged => "plan_changed",
            EventKind::Scaled => "scaled",
            EventKind::Launched => "launched",
            EventKind::Healthy => "healthy",
            EventKind::Unhealthy => "unhealthy",
            EventKind::Respawned => "respawned",
            EventKind::Silent => "silent",
            EventKind::Lost => "lost",
            EventKind::Terminating => "terminating",
            EventKind::Terminated => "terminated",
            EventKind::Permit => "permit",
            EventKind::Drained => "drained",
            EventKind::Targets => "targets",
            EventKind::Rollout => "rollout",
            EventKind::Server => "server",
            EventKind::Provider => "provider",
            EventKind::Balancer => "balancer",
            EventKind::Schedule => "schedule",
            EventKind::Exec => "exec",
            EventKind::Output => "output",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

/// An event not yet stored (no sequence number).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub message: String,
}

/// Longest event message stored, in bytes.
pub const EVENT_TEXT_MAX: usize = 4096;

impl NewEvent {
    /// An event; its message is cut to [`EVENT_TEXT_MAX`] bytes (what an agent reports can
    /// be long: a store row stays small whatever it says).
    pub fn new(kind: EventKind, message: impl Into<String>) -> NewEvent {
        let mut message = message.into();
        crate::api::truncate_text(&mut message, EVENT_TEXT_MAX);
        NewEvent {
            kind,
            group: None,
            instance: None,
            message,
        }
    }
    pub fn group(mut self, g: impl ToString) -> NewEvent {
        self.group = Some(g.to_string());
        self
    }
    pub fn instance(mut self, i: impl ToString) -> NewEvent {
        self.instance = Some(i.to_string());
        self
    }
}

/// A stored event: numbered in order, timestamped (milliseconds since the Unix epoch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: u64,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_message_is_capped() {
        let e = NewEvent::new(EventKind::Unhealthy, "x".repeat(1 << 20));
        assert!(e.message.len() <= EVENT_TEXT_MAX, "{}", e.message.len());
        assert!(e.message.ends_with('\u{2026}'));
        let short = NewEvent::new(EventKind::Healthy, "fine");
        assert_eq!(short.message, "fine");
    }
}
