//! The records the store keeps, the writes that change them, and the shapes reads return.

use std::collections::BTreeMap;

use drover_model::api::Revision;
use drover_model::{Event, EventKind, Fleet, NewEvent, Plan};
use serde::{Deserialize, Serialize};

pub use drover_model::record::{GroupRecord, InstanceRecord, Lifecycle, RolloutRecord};

/// One change in a [`crate::Store::commit`].
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// A new fleet revision; gets the next revision number.
    Revision {
        file: String,
        summary: String,
        toml: String,
        fleet: Fleet,
        /// The base of the next apply's three-way merge.
        last_applied: Option<drover_model::api::LastApplied>,
    },
    /// Insert or replace the group with this name.
    Group(GroupRecord),
    RemoveGroup(String),
    /// Insert a plan under (`plan.group()`, `plan.generation`). Inserting an identical plan
    /// again is a no-op; a different one is [`crate::StoreError::PlanConflict`].
    Plan(Plan),
    /// Insert or replace the instance with this id.
    Instance(InstanceRecord),
    RemoveInstance(String),
    /// Insert or replace a named counter (e.g. the next instance number).
    Counter {
        name: String,
        value: u64,
    },
    /// Insert or replace a one-off scheduled change (by its id).
    Schedule(drover_model::api::ScheduledScale),
    /// Append an event with the next seq, stamped with the commit's time.
    Event(NewEvent),
    /// Insert a new API token (its id must be new). Only the token's hash is stored.
    Token(TokenRecord),
    /// Mark a token revoked at `at_ms` (a token already revoked keeps its first time).
    RevokeToken {
        id: String,
        at_ms: u64,
    },
}

/// An API token as stored: its sha256, never the token itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub info: drover_model::token::TokenInfo,
    /// Lowercase hex sha256 of the token.
    pub hash: String,
}

/// What a commit assigned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Committed {
    /// The number given to the commit's `Revision` write (the last one, if several).
    pub revision: Option<u64>,
    /// The commit's events as stored, in order.
    pub events: Vec<Event>,
}

/// The current state, read in one transaction.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The latest revision, if any was ever stored.
    pub revision: Option<Revision>,
    /// Ordered by group name.
    pub groups: Vec<GroupRecord>,
    /// The current-generation plan of each group that has one, ordered by group name.
    pub plans: Vec<Plan>,
    /// Ordered by id.
    pub instances: Vec<InstanceRecord>,
    pub counters: BTreeMap<String, u64>,
    /// One-off scheduled changes, by id (cancelled and past ones too).
    #[serde(default)]
    pub schedules: Vec<drover_model::api::ScheduledScale>,
    /// The seq of the newest event (0 when there is none).
    pub last_event_seq: u64,
}

/// Which events to read. `Default` is every event.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EventFilter {
    /// Only events with a greater seq.
    pub after_seq: u64,
    /// At most this many (the oldest matching ones); 0 means no limit.
    pub limit: usize,
    pub group: Option<String>,
    pub instance: Option<String>,
    pub kind: Option<EventKind>,
    /// Only events at or after this time (ms since the epoch; 0: any).
    #[serde(default)]
    pub since_ms: u64,
    /// With a limit: the newest matching events instead of the oldest (still oldest first).
    #[serde(default)]
    pub newest: bool,
}
