//! The store's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the store. A failed commit wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or initialised.
    #[error("cannot open store {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer drover.
    #[error("store schema version {found} is newer than this drover supports ({supported}); upgrade drover")]
    SchemaTooNew { found: i64, supported: i64 },
    /// A plan generation already exists with different content; plans are immutable.
    #[error("plan {group} generation {generation} already exists with different content; plans are immutable")]
    PlanConflict { group: String, generation: u64 },
    /// A value could not be turned into (or read back from) JSON.
    #[error("cannot encode or decode {what} as JSON: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// The transaction shared by a group of commits ([`crate::Store::commit_many`]) could
    /// not begin or commit: none of them was written.
    #[error("store: group commit failed: {0}")]
    Group(String),
    /// Any other database error (including a stored value this drover does not understand).
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A `--store` value (or another store setting) that cannot be used.
    #[error("{0}")]
    Config(String),
    /// No etcd endpoint answered: nothing was written.
    #[error("cannot reach etcd at {endpoints}: {detail}; check that the etcd members run, that the addresses and ports are right, and the TLS settings (https:// endpoints need --etcd-ca); nothing was written")]
    EtcdUnreachable { endpoints: String, detail: String },
    /// etcd answers but cannot commit or read: it has no leader (lost quorum) or did not
    /// answer in time. `outcome` says whether the write may still be applied.
    #[error("etcd at {endpoints} cannot serve the request ({detail}): the cluster has probably lost quorum (a majority of its members down or cut off); check `etcdctl endpoint status --cluster` and the members' logs; {outcome}")]
    EtcdUnavailable {
        endpoints: String,
        detail: String,
        outcome: String,
    },
    /// etcd refused the user, the password or the permissions.
    #[error("etcd refused drover's credentials ({detail}); check DROVER_ETCD_USER and DROVER_ETCD_PASSWORD (or user:password@ in the store URL) and that the user's role may read and write the keys under {prefix}")]
    EtcdAuth { detail: String, prefix: String },
    /// One commit is more than one etcd transaction may hold.
    #[error("a commit of {ops} etcd operations and {bytes} bytes is more than one etcd transaction may hold ({max_ops} operations, {max_bytes} bytes); raise --max-txn-ops and --max-request-bytes on every etcd member and max_txn_ops / max_request_bytes in the store URL; nothing was written")]
    EtcdTooLarge {
        ops: usize,
        bytes: usize,
        max_ops: usize,
        max_bytes: usize,
    },
    /// The extra conditions of this store's writes (a leader's election key) no longer hold.
    #[error("the store refused the write: this server's write condition no longer holds ({0}); it no longer leads; nothing was written")]
    Fenced(String),
    /// Other writers kept changing the store while a commit retried.
    #[error("store: {0}; nothing was written")]
    Contended(String),
    /// A token id or token hash that is already stored.
    #[error("token {id} (or its hash) is already stored")]
    TokenExists { id: String },
    /// Any other etcd error.
    #[error("etcd: {0}")]
    Etcd(String),
}

impl StoreError {
    /// The store cannot be reached or cannot commit now (etcd unreachable or without quorum):
    /// asking again later may succeed (an API answers 503).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::EtcdUnreachable { .. } | StoreError::EtcdUnavailable { .. }
        )
    }
}
