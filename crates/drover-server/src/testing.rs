//! Test helpers: a store that records how it is read (what, on which thread, how many
//! events), and an engine over it.

use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use drover_model::api::{Revision, RevisionSummary};
use drover_model::{Event, Plan};
use drover_store::{
    Committed, EventFilter, Snapshot, SqliteStore, Store, StoreError, TokenRecord, Write,
};

use crate::engine::Engine;

/// One read of a [`Watched`] store.
#[derive(Clone, Debug)]
pub(crate) struct Read {
    pub what: &'static str,
    pub thread: ThreadId,
    /// For `events`: the filter's limit.
    pub limit: Option<usize>,
}

/// A SQLite store that records its reads.
pub(crate) struct Watched {
    pub inner: SqliteStore,
    pub reads: Mutex<Vec<Read>>,
}

impl Watched {
    pub fn open(dir: &std::path::Path) -> Arc<Watched> {
        Arc::new(Watched {
            inner: SqliteStore::open(&dir.join("drover.db")).unwrap(),
            reads: Mutex::new(Vec::new()),
        })
    }

    fn saw(&self, what: &'static str, limit: Option<usize>) {
        self.reads.lock().unwrap().push(Read {
            what,
            thread: std::thread::current().id(),
            limit,
        });
    }

    /// The reads since the last call.
    pub fn take(&self) -> Vec<Read> {
        std::mem::take(&mut *self.reads.lock().unwrap())
    }
}

impl Store for Watched {
    fn commit(&self, w: Vec<Write>, now: u64) -> Result<Committed, StoreError> {
        self.inner.commit(w, now)
    }
    fn commit_many(&self, b: Vec<(Vec<Write>, u64)>) -> Vec<Result<Committed, StoreError>> {
        self.inner.commit_many(b)
    }
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.saw("snapshot", None);
        self.inner.snapshot()
    }
    fn revision(&self, n: u64) -> Result<Option<Revision>, StoreError> {
        self.saw("revision", None);
        self.inner.revision(n)
    }
    fn revisions(&self) -> Result<Vec<RevisionSummary>, StoreError> {
        self.saw("revisions", None);
        self.inner.revisions()
    }
    fn plan(&self, g: &str, n: u64) -> Result<Option<Plan>, StoreError> {
        self.saw("plan", None);
        self.inner.plan(g, n)
    }
    fn events(&self, f: &EventFilter) -> Result<Vec<Event>, StoreError> {
        self.saw("events", Some(f.limit));
        self.inner.events(f)
    }
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.saw("tokens", None);
        self.inner.tokens()
    }
    fn keep_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.inner.keep_secret(name, candidate)
    }
    fn secrets(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.saw("secrets", None);
        self.inner.secrets()
    }
}

/// An engine over `store` (restored from what it holds), with test providers in `dir`.
pub(crate) fn engine(dir: &std::path::Path, store: Arc<Watched>) -> Arc<Engine> {
    Arc::new(
        Engine::new_shared(
            store,
            drover_control::Timing {
                leave_within_ms: 30_000,
                silent_after_ms: 5000,
            },
            crate::ProviderFactory::for_tests(dir),
        )
        .unwrap(),
    )
}
