//! The revisioned store: fleet revisions, groups, plans, instances, counters and events, behind
//! one trait ([`Store`]), with an embedded SQLite implementation ([`SqliteStore`]) and, under
//! the cargo feature `etcd`, one on etcd v3 ([`EtcdStore`]). [`StoreSpec`] names either
//! (`sqlite:PATH`, `etcd://HOST:PORT,...`); [`copy`] moves everything from one to another.
//!
//! Every change goes through [`Store::commit`] (or [`Store::commit_many`], several commits under
//! one fsync): a batch of [`Write`]s applied atomically and
//! durably. Revisions and events are numbered 1, 2, 3… without gaps and are never deleted.

pub mod copy;
mod error;
#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "etcd")]
pub mod local_etcd;
mod record;
mod spec;
mod sqlite;

pub use error::StoreError;
#[cfg(feature = "etcd")]
pub use etcd::{EtcdStore, LeaderInfo, Leadership, Lease};
#[cfg(feature = "etcd")]
pub use etcd_client;
pub use record::{
    Committed, EventFilter, GroupRecord, InstanceRecord, Lifecycle, RolloutRecord, Snapshot,
    TokenRecord, Write,
};
pub use spec::{EtcdConfig, StoreSpec, DEFAULT_ETCD_PREFIX, STORE_FORMS};
pub use sqlite::SqliteStore;

use drover_model::api::{Revision, RevisionSummary};
use drover_model::{Event, Plan};

/// Where the server keeps desired and observed state. Synchronous: async callers use
/// `spawn_blocking` or call it directly (operations are short).
pub trait Store: Send + Sync {
    /// Apply all writes atomically in one transaction; durable (fsync'd) when this returns Ok.
    /// `now_ms` stamps revisions and events. On any error nothing is written.
    fn commit(&self, writes: Vec<Write>, now_ms: u64) -> Result<Committed, StoreError>;
    /// Group commit: several independent commits (writes, and the time that stamps them) in
    /// one transaction and one fsync, in order. Each is applied all or nothing, as by
    /// [`Store::commit`]; one that fails leaves the others in. Every `Ok` is durable when this
    /// returns. One result per commit, in order.
    fn commit_many(&self, batches: Vec<(Vec<Write>, u64)>) -> Vec<Result<Committed, StoreError>> {
        batches
            .into_iter()
            .map(|(writes, now_ms)| self.commit(writes, now_ms))
            .collect()
    }
    /// The current state: latest revision, groups, current plans, instances, counters.
    fn snapshot(&self) -> Result<Snapshot, StoreError>;
    /// One revision with its body.
    fn revision(&self, number: u64) -> Result<Option<Revision>, StoreError>;
    /// Every revision without its body, oldest first.
    fn revisions(&self) -> Result<Vec<RevisionSummary>, StoreError>;
    /// One plan generation of a group (`service/region`).
    fn plan(&self, group: &str, generation: u64) -> Result<Option<Plan>, StoreError>;
    /// Events matching `filter`, seq ascending, all with `seq > filter.after_seq`.
    fn events(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError>;
    /// Every API token (revoked ones too), by id.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Event retention: delete the events that are not among the newest `keep_last`, and
    /// those stamped before `before_ms`; the newest event is always kept (numbering goes on
    /// from it). Revisions, plans and everything else are kept. Returns how many went.
    fn prune_events(&self, keep_last: u64, before_ms: u64) -> Result<u64, StoreError> {
        let _ = (keep_last, before_ms);
        Err(StoreError::Config("this store cannot prune events".into()))
    }
    /// A secret of the control plane itself (the agent-token key, the API's CA), made once
    /// and shared by every server on this store: when nothing is stored under `name`, store
    /// `candidate`. Returns what is stored, so that servers starting together agree (the
    /// first one stored wins). Not fenced: any server may call it before it leads.
    fn keep_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError>;
    /// Every secret of the control plane, by name (what [`copy`] moves).
    fn secrets(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Every plan of every group and generation (current or not, of groups removed too),
    /// ordered by (group, generation): what [`copy`] moves.
    fn all_plans(&self) -> Result<Vec<Plan>, StoreError> {
        Err(StoreError::Config(
            "this store cannot list every plan".into(),
        ))
    }
}
