//! The records the server keeps of its groups and instances: a group's desired count,
//! generation and rollout (so a rollout resumes where it was after a restart), and each
//! instance it launched. The controllers change them (`drover_control`); the store keeps them.

use serde::{Deserialize, Serialize};

/// Where a group's rollout stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// When `generation` became preferred (ms since the epoch).
    #[serde(default)]
    pub since_ms: u64,
    /// A rollout to `generation` is under way (not yet done or failed).
    #[serde(default)]
    pub open: bool,
    /// The last generation every instance ran healthy: where a revert goes back to.
    #[serde(default)]
    pub good_generation: u64,
    /// The generation this one reverted (0: not a revert).
    #[serde(default)]
    pub reverted_from: u64,
    /// The last generation whose rollout failed (0: none).
    #[serde(default)]
    pub failed_generation: u64,
    /// Why it failed (the reason of its `rollout` event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Paused by a person (`drover rollout pause`): no permit, nothing new launched for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// When it was last resumed (ms): `healthy_deadline` counts from here too, so the time
    /// it spent paused does not fail it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resumed_ms: u64,
    /// When every canary was ready and the bake began (0: not yet, or no canary).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub canary_baking_ms: u64,
    /// The canary stage is over (its analysis passed, or a person promoted it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canary_passed: bool,
    /// The last canary analysis: verdict and numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<String>,
    /// The fleet's last change waits for this group's wave: its plan is held.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wave_pending: bool,
    /// Held by hand: the change was deployed to other regions only (`drover deploy
    /// --region`); this group keeps its plan until a deploy names it (or names none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// When its last rollout finished (ms): the next wave counts `wave_bake` from here.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub done_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A group's desired count and current plan generation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// `service/region`.
    pub group: String,
    pub desired: u32,
    /// Who or what set `desired` (e.g. `apply`, `scale by alice`, `autoscale`).
    pub desired_reason: String,
    /// The group's current plan generation.
    pub generation: u64,
    /// Rollout bookkeeping, so a rollout resumes where it was after a restart.
    #[serde(default)]
    pub rollout: RolloutRecord,
}

/// Where an instance is in its life, as the server decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    Active,
    Draining,
    Terminating,
}

impl Lifecycle {
    pub fn as_str(&self) -> &'static str {
        match self {
            Lifecycle::Active => "active",
            Lifecycle::Draining => "draining",
            Lifecycle::Terminating => "terminating",
        }
    }

    pub fn parse(s: &str) -> Option<Lifecycle> {
        match s {
            "active" => Some(Lifecycle::Active),
            "draining" => Some(Lifecycle::Draining),
            "terminating" => Some(Lifecycle::Terminating),
            _ => None,
        }
    }
}

/// One instance the server launched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub group: String,
    /// The plan generation it was launched with (never changes).
    pub generation: u64,
    pub addr: String,
    /// The provider's handle: a local pid, an EC2 instance id…
    pub provider_id: String,
    pub launched_at_ms: u64,
    pub lifecycle: Lifecycle,
    /// When it was given a permit to drain and terminate itself.
    pub permit_at_ms: Option<u64>,
    /// Launched with a token of its own (an HMAC of its id): its group's token never speaks
    /// for it, from its launch on and across restarts.
    #[serde(default)]
    pub own_token: bool,
}
