//! The store's one writer: every write goes through a thread of its own that commits whatever
//! has queued up in one transaction and one fsync (group commit), off the async workers.
//!
//! Two ways in. [`Writer::commit`] resolves once its writes are durable: changes of desired
//! state (apply, deploy, scale, rollback, tokens) and the controller's decisions wait for it,
//! so an accepted change survives a crash. [`Writer::submit`] only queues: soft-state events
//! (health changes from heartbeats, rotation) are written with the next group, and nothing
//! waits for them, so a heartbeat never waits for an fsync. Writes are committed in the order
//! they were queued; the events a commit stored are published (log, `events --follow`) in
//! that order once it is durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use drover_model::Event;
use drover_store::{Committed, Store, StoreError, Write};
use tokio::sync::oneshot;

/// Most commits in one group: a bound on one transaction's size, not a pacing.
const MAX_GROUP: usize = 4096;

/// Most commits waiting for the writer. A durable commit waits for room (back-pressure on
/// the API); a soft-state event that finds the queue full is dropped and counted
/// ([`WriterStats::dropped`]): a slow disk never grows the server's memory without bound.
pub const QUEUE: usize = 16_384;

struct Job {
    writes: Vec<Write>,
    now_ms: u64,
    /// Some: the caller waits for durability.
    done: Option<oneshot::Sender<Result<Committed, StoreError>>>,
}

/// Upper bounds (ms) of the buckets of [`WriterStats::group_ms`]; the last bucket has none.
pub const GROUP_MS_BUCKETS: [u64; 11] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000];

/// Counters of the writer, for tests, logs and `/metrics`.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed (fsyncs).
    pub groups: AtomicU64,
    /// Commits in them.
    pub commits: AtomicU64,
    /// Records written by them (revisions, instances, events, ...).
    pub writes: AtomicU64,
    /// Soft-state events dropped because the queue was full.
    pub dropped: AtomicU64,
    /// How long each group took to commit (the store's round trip and fsync), by bucket of
    /// [`GROUP_MS_BUCKETS`] (not cumulative; one more for longer ones).
    pub group_ms: [AtomicU64; GROUP_MS_BUCKETS.len() + 1],
    /// Their sum, in microseconds.
    pub group_us_sum: AtomicU64,
}

impl WriterStats {
    fn record_group(&self, took: std::time::Duration) {
        let ms = took.as_micros() as u64;
        let i = GROUP_MS_BUCKETS
            .iter()
            .position(|b| ms <= b * 1000)
            .unwrap_or(GROUP_MS_BUCKETS.len());
        self.group_ms[i].fetch_add(1, Ordering::Relaxed);
        self.group_us_sum.fetch_add(ms, Ordering::Relaxed);
    }

    /// Prometheus text: commits, records and group commit latency (a histogram).
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        for (name, help, v) in [
            (
                "drover_store_groups_total",
                "Store transactions (group commits) written.",
                &self.groups,
            ),
            (
                "drover_store_commits_total",
                "Commits in them.",
                &self.commits,
            ),
            (
                "drover_store_writes_total",
                "Records they wrote.",
                &self.writes,
            ),
            (
                "drover_store_dropped_total",
                "Soft-state events dropped because the writer's queue was full.",
                &self.dropped,
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        out.push_str("# HELP drover_store_commit_seconds How long a group commit took (the store's round trip and fsync).\n# TYPE drover_store_commit_seconds histogram\n");
        let mut cumulative = 0;
        for (i, bound) in GROUP_MS_BUCKETS.iter().enumerate() {
            cumulative += self.group_ms[i].load(Ordering::Relaxed);
            out.push_str(&format!(
                "drover_store_commit_seconds_bucket{{le=\"{}\"}} {cumulative}\n",
                *bound as f64 / 1000.0
            ));
        }
        cumulative += self.group_ms[GROUP_MS_BUCKETS.len()].load(Ordering::Relaxed);
        out.push_str(&format!(
            "drover_store_commit_seconds_bucket{{le=\"+Inf\"}} {cumulative}\ndrover_store_commit_seconds_sum {}\ndrover_store_commit_seconds_count {cumulative}\n",
            self.group_us_sum.load(Ordering::Relaxed) as f64 / 1e6
        ));
        out
    }
}

/// Handle to the writer thread; the thread ends when the last handle is dropped, after
/// writing what was queued.
pub struct Writer {
    tx: mpsc::Sender<Job>,
    stats: Arc<WriterStats>,
}

impl Writer {
    /// Start the writer thread on `store`; `publish` sees every stored event once durable.
    pub fn start(
        store: Arc<dyn Store>,
        publish: impl Fn(&Event) + Send + 'static,
    ) -> std::io::Result<Writer> {
        Writer::start_with(store, publish, QUEUE)
    }

    /// [`Writer::start`] with a queue of `queue` commits.
    pub fn start_with(
        store: Arc<dyn Store>,
        publish: impl Fn(&Event) + Send + 'static,
        queue: usize,
    ) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel::<Job>(queue);
        let stats = Arc::new(WriterStats::default());
        let s = stats.clone();
        std::thread::Builder::new()
            .name("drover-store-writer".into())
            .spawn(move || run(&*store, rx, &publish, &s))?;
        Ok(Writer { tx, stats })
    }

    /// Commit `writes` with the next group; resolves once they are durable.
    pub async fn commit(&self, writes: Vec<Write>, now_ms: u64) -> Result<Committed, StoreError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Job {
                writes,
                now_ms,
                done: Some(done),
            })
            .await
            .map_err(|_| StoreError::Group("the store writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Group("the store writer has stopped".into()))?
    }

    /// Queue `writes` for the next group and return at once. A failure is logged.
    pub fn submit(&self, writes: Vec<Write>, now_ms: u64) {
        if writes.is_empty() {
            return;
        }
        let job = Job {
            writes,
            now_ms,
            done: None,
        };
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => {
                let k = job.writes.len() as u64;
                let n = self.stats.dropped.fetch_add(k, Ordering::Relaxed);
                // Said once per 1,000 dropped, not once each.
                if n == 0 || n / 1000 != (n + k) / 1000 {
                    tracing::error!(
                        dropped = n + k,
                        "the store cannot keep up: soft-state events dropped ({QUEUE} commits queued)"
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("cannot record events: the store writer has stopped");
            }
        }
    }

    /// Resolves once everything queued before this call is durable.
    pub async fn flush(&self) {
        let _ = self.commit(Vec::new(), 0).await;
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }
}

fn run(
    store: &dyn Store,
    mut rx: mpsc::Receiver<Job>,
    publish: &dyn Fn(&Event),
    stats: &WriterStats,
) {
    // Whatever queued while the last group was being written makes the next group.
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let batches: Vec<_> = jobs
            .iter_mut()
            .map(|j| (std::mem::take(&mut j.writes), j.now_ms))
            .collect();
        let records: usize = batches.iter().map(|(w, _)| w.len()).sum();
        let began = std::time::Instant::now();
        let results = store.commit_many(batches);
        stats.record_group(began.elapsed());
        stats.writes.fetch_add(records as u64, Ordering::Relaxed);
        stats.groups.fetch_add(1, Ordering::Relaxed);
        stats
            .commits
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        for (job, result) in jobs.into_iter().zip(results) {
            if let Ok(c) = &result {
                for e in &c.events {
                    publish(e);
                }
            }
            match job.done {
                Some(done) => {
                    let _ = done.send(result);
                }
                None => {
                    if let Err(e) = result {
                        tracing::error!("cannot record events: {e}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use drover_model::{EventKind, NewEvent};
    use drover_store::{EventFilter, SqliteStore};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// A store whose commits take `delay` (a slow fsync) and that counts them.
    pub(crate) struct Slow {
        pub inner: SqliteStore,
        pub delay: Duration,
        pub groups: Mutex<Vec<usize>>,
        /// While set, every commit fails (a store that is down).
        pub fail: std::sync::atomic::AtomicBool,
        /// While set, every commit that writes an instance record fails (the rest pass).
        pub refuse_instances: std::sync::atomic::AtomicBool,
    }

    impl Store for Slow {
        fn commit(&self, writes: Vec<Write>, now_ms: u64) -> Result<Committed, StoreError> {
            self.commit_many(vec![(writes, now_ms)]).pop().unwrap()
        }
        fn commit_many(
            &self,
            batches: Vec<(Vec<Write>, u64)>,
        ) -> Vec<Result<Committed, StoreError>> {
            std::thread::sleep(self.delay);
            self.groups.lock().unwrap().push(batches.len());
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return batches
                    .iter()
                    .map(|_| Err(StoreError::Group("the store is down (test)".into())))
                    .collect();
            }
            if self
                .refuse_instances
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return batches
                    .into_iter()
                    .map(|(writes, now)| {
                        if writes.iter().any(|w| matches!(w, Write::Instance(_))) {
                            Err(StoreError::Group(
                                "instance records are refused (test)".into(),
                            ))
                        } else {
                            self.inner.commit(writes, now)
                        }
                    })
                    .collect();
            }
            self.inner.commit_many(batches)
        }
        fn snapshot(&self) -> Result<drover_store::Snapshot, StoreError> {
            self.inner.snapshot()
        }
        fn revision(&self, n: u64) -> Result<Option<drover_model::api::Revision>, StoreError> {
            self.inner.revision(n)
        }
        fn revisions(&self) -> Result<Vec<drover_model::api::RevisionSummary>, StoreError> {
            self.inner.revisions()
        }
        fn plan(&self, g: &str, n: u64) -> Result<Option<drover_model::Plan>, StoreError> {
            self.inner.plan(g, n)
        }
        fn events(&self, f: &EventFilter) -> Result<Vec<Event>, StoreError> {
            self.inner.events(f)
        }
        fn tokens(&self) -> Result<Vec<drover_store::TokenRecord>, StoreError> {
            self.inner.tokens()
        }
        fn keep_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
            self.inner.keep_secret(name, candidate)
        }
        fn secrets(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.inner.secrets()
        }
    }

    fn event(msg: &str) -> Vec<Write> {
        vec![Write::Event(NewEvent::new(EventKind::Healthy, msg))]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_share_fsyncs_and_are_durable_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.db");
        let store = Arc::new(Slow {
            inner: SqliteStore::open(&path).unwrap(),
            delay: Duration::from_millis(20),
            groups: Mutex::new(Vec::new()),
            fail: Default::default(),
            refuse_instances: Default::default(),
        });
        let published = Arc::new(Mutex::new(Vec::new()));
        let p = published.clone();
        let w =
            Arc::new(Writer::start(store.clone(), move |e| p.lock().unwrap().push(e.seq)).unwrap());
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let w = w.clone();
                tokio::spawn(async move { w.commit(event(&format!("e{i}")), i).await })
            })
            .collect();
        for t in tasks {
            let c = t.await.unwrap().unwrap();
            assert_eq!(c.events.len(), 1);
        }
        let groups = store.groups.lock().unwrap().clone();
        eprintln!("50 commits in {} groups: {groups:?}", groups.len());
        assert_eq!(groups.iter().sum::<usize>(), 50);
        assert!(groups.len() < 25, "commits were grouped: {groups:?}");
        assert_eq!(w.stats().commits.load(Ordering::Relaxed), 50);
        assert_eq!(w.stats().writes.load(Ordering::Relaxed), 50);
        // Each group took the slow store's 20 ms at least: the histogram says so.
        let text = w.stats().prometheus();
        let n = groups.len();
        assert!(
            text.contains("drover_store_commit_seconds_bucket{le=\"0.01\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!("drover_store_commit_seconds_count {n}\n")),
            "{text}"
        );
        assert!(text.contains("drover_store_writes_total 50\n"), "{text}");
        // Published once durable, in seq order.
        assert_eq!(*published.lock().unwrap(), (1..=50).collect::<Vec<u64>>());
        drop(w);
        // Durable: a fresh connection to the file sees every one.
        let again = SqliteStore::open(&path).unwrap();
        assert_eq!(again.events(&EventFilter::default()).unwrap().len(), 50);
    }

    /// A slow disk and a flood of soft-state events: the queue holds at most its bound, the
    /// rest is dropped and counted (before, every one queued in memory, without bound).
    #[tokio::test]
    async fn a_full_queue_drops_soft_events_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Slow {
            inner: SqliteStore::open(&dir.path().join("drover.db")).unwrap(),
            delay: Duration::from_millis(200),
            groups: Mutex::new(Vec::new()),
            fail: Default::default(),
            refuse_instances: Default::default(),
        });
        let w = Writer::start_with(store.clone(), |_| {}, 8).unwrap();
        for i in 0..1000 {
            w.submit(event(&format!("flood {i}")), i);
        }
        let dropped = w.stats().dropped.load(Ordering::Relaxed);
        // A durable commit still gets through (it waits for room).
        w.commit(event("durable"), 2000).await.unwrap();
        w.flush().await;
        let stored = store.inner.events(&EventFilter::default()).unwrap();
        eprintln!(
            "1000 submitted to a queue of 8: {dropped} dropped, {} stored",
            stored.len()
        );
        // The writer takes what is queued while the loop runs; the rest never fits in 8.
        assert!(dropped >= 900, "{dropped}");
        assert_eq!(stored.len() as u64, 1000 - dropped + 1);
        assert_eq!(stored.last().unwrap().message, "durable");
    }

    #[tokio::test]
    async fn submit_returns_before_the_fsync_and_flush_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Slow {
            inner: SqliteStore::open(&dir.path().join("drover.db")).unwrap(),
            delay: Duration::from_millis(300),
            groups: Mutex::new(Vec::new()),
            fail: Default::default(),
            refuse_instances: Default::default(),
        });
        let w = Writer::start(store.clone(), |_| {}).unwrap();
        let t = Instant::now();
        for i in 0..100 {
            w.submit(event(&format!("soft {i}")), i);
        }
        let queued = t.elapsed();
        assert!(queued < Duration::from_millis(50), "{queued:?}");
        w.flush().await;
        let flushed = t.elapsed();
        eprintln!("100 submits queued in {queued:?}, durable after {flushed:?}");
        assert!(flushed >= Duration::from_millis(300), "{flushed:?}");
        assert_eq!(
            store.inner.events(&EventFilter::default()).unwrap().len(),
            100
        );
        // At most: the first submit alone, then the other 99 and the flush together.
        assert!(store.groups.lock().unwrap().len() <= 3);
    }
}
