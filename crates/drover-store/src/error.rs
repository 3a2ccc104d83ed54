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
}
