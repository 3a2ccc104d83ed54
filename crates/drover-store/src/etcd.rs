//! [`Store`] on etcd v3 (`etcd-client`): every key under one prefix, every commit one etcd
//! transaction conditioned on the `head` key, the numbering counter (see `docs/store.md`).
//!
//! The trait is synchronous; the store runs its own small tokio runtime and waits for it on a
//! plain channel, so it may be called from any thread, inside another runtime too.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_model::api::{Revision, RevisionSummary};
use drover_model::{Event, Plan};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KvClient,
    TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::spec::EtcdConfig;
use crate::{
    Committed, EventFilter, GroupRecord, InstanceRecord, Snapshot, Store, StoreError, TokenRecord,
    Write,
};

#[path = "election.rs"]
mod election;
pub use election::{LeaderInfo, Leadership, Lease};

/// The layout version this code writes (the `schema` key).
const SCHEMA: u64 = 1;
/// Keys per page of a range read.
const PAGE: i64 = 256;
/// Attempts of a commit that finds that another writer committed first.
const ATTEMPTS: usize = 64;
/// Bytes of a transaction besides its keys and values (compares, framing), counted against
/// `max_request_bytes`.
const TXN_OVERHEAD: usize = 4096;
/// The pause before a request that failed transiently is sent again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Per-operation framing in a transaction, counted against `max_request_bytes`.
const OP_OVERHEAD: usize = 16;

/// Whether event `e` passes `filter`'s group, instance, kind and time (not its seqs).
fn event_matches(filter: &EventFilter, e: &Event) -> bool {
    filter
        .group
        .as_ref()
        .map_or(true, |g| e.group.as_ref() == Some(g))
        && filter
            .instance
            .as_ref()
            .map_or(true, |i| e.instance.as_ref() == Some(i))
        && filter.kind.as_ref().map_or(true, |kd| &e.kind == kd)
        && e.at_ms >= filter.since_ms
}

/// The numbering counter: the last revision number and event seq given. Every commit
/// rewrites it, in the same transaction, conditioned on its `mod_revision`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    revision: u64,
    event_seq: u64,
    /// The id of the transaction that wrote it: after an ambiguous failure (the answer was
    /// lost), a commit finds out from it whether its transaction was applied.
    #[serde(default)]
    txn: u64,
}

/// A fresh transaction id.
fn txn_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.finish() | 1
}

/// Whether a request may be sent again: it did not get through (no endpoint, no leader,
/// no answer) and the operation still has time.
fn transient(e: &StoreError) -> bool {
    e.is_unavailable()
}

/// A revision's body, kept apart from its summary so `history` reads no fleet.
#[derive(Serialize, Deserialize)]
struct RevisionBody {
    toml: String,
    fleet: drover_model::Fleet,
    #[serde(default)]
    last_applied: Option<drover_model::api::LastApplied>,
}

/// Key names, under the store's prefix.
#[derive(Clone)]
struct Keys {
    p: String,
}

impl Keys {
    fn head(&self) -> String {
        format!("{}head", self.p)
    }
    fn schema(&self) -> String {
        format!("{}schema", self.p)
    }
    fn dir(&self, name: &str) -> String {
        format!("{}{name}/", self.p)
    }
    fn revision(&self, n: u64) -> String {
        format!("{}revisions/{n:020}", self.p)
    }
    fn body(&self, n: u64) -> String {
        format!("{}revision-bodies/{n:020}", self.p)
    }
    fn group(&self, g: &str) -> String {
        format!("{}groups/{g}", self.p)
    }
    fn plan(&self, g: &str, generation: u64) -> String {
        format!("{}plans/{g}/{generation:020}", self.p)
    }
    fn instance(&self, id: &str) -> String {
        format!("{}instances/{id}", self.p)
    }
    fn schedule(&self, id: u64) -> String {
        format!("{}schedules/{id:020}", self.p)
    }
    fn counter(&self, name: &str) -> String {
        format!("{}counters/{name}", self.p)
    }
    fn event(&self, seq: u64) -> String {
        format!("{}events/{seq:020}", self.p)
    }
    fn token(&self, id: &str) -> String {
        format!("{}tokens/{id}", self.p)
    }
    fn token_hash(&self, hash: &str) -> String {
        format!("{}token-hashes/{hash}", self.p)
    }
    fn secret(&self, name: &str) -> String {
        format!("{}secrets/{name}", self.p)
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The store on etcd. Cheap to share; every method blocks the calling thread until etcd
/// answered (bounded by the configured timeout).
pub struct EtcdStore {
    rt: Option<tokio::runtime::Runtime>,
    inner: Arc<Inner>,
}

struct Inner {
    kv: KvClient,
    client: Client,
    keys: Keys,
    endpoints: String,
    timeout: Duration,
    max_ops: usize,
    max_bytes: usize,
    /// Extra compares every write transaction carries (a leader's election key).
    conditions: Mutex<Vec<Compare>>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Not `drop`: that blocks, which is not allowed inside another runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl EtcdStore {
    /// Connect to the cluster and check that it answers (a linearizable read of the layout
    /// version: reachability, quorum and credentials at once).
    pub fn open(cfg: &EtcdConfig) -> Result<EtcdStore, StoreError> {
        if cfg.endpoints.is_empty() {
            return Err(StoreError::Config("no etcd endpoint given".into()));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("drover-etcd")
            .enable_all()
            .build()
            .map_err(|e| {
                StoreError::Etcd(format!("cannot start the etcd client's runtime: {e}"))
            })?;
        let mut opts = ConnectOptions::new()
            .with_timeout(cfg.timeout)
            .with_connect_timeout(cfg.timeout.min(Duration::from_secs(3)))
            .with_keep_alive(Duration::from_secs(2), cfg.timeout)
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        if let Some(user) = &cfg.user {
            opts = opts.with_user(user.clone(), cfg.password.clone().unwrap_or_default());
        }
        if cfg.tls() {
            opts = opts.with_tls(tls_options(cfg)?);
        }
        let endpoints = cfg.endpoints_display();
        let urls: Vec<String> = cfg
            .endpoints
            .iter()
            .map(|e| {
                let scheme = if cfg.tls() { "https" } else { "http" };
                format!("{scheme}://{e}")
            })
            .collect();
        let probe_eps = cfg.endpoints.clone();
        let timeout = cfg.timeout;
        let prefix = cfg.prefix.clone();
        let connected = {
            let endpoints = endpoints.clone();
            let prefix = prefix.clone();
            run_on(&rt, async move {
                match tokio::time::timeout(timeout, Client::connect(urls, Some(opts))).await {
                    Ok(Ok(c)) => Ok(c),
                    Ok(Err(e)) => Err(classify(e, &endpoints, &probe_eps, &prefix, false).await),
                    Err(_) => Err(classify_elapsed(&endpoints, &probe_eps, timeout, false).await),
                }
            })?
        };
        let inner = Arc::new(Inner {
            kv: connected
                .kv_client()
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
            client: connected,
            keys: Keys { p: prefix },
            endpoints,
            timeout,
            max_ops: cfg.max_txn_ops.max(2),
            max_bytes: cfg.max_request_bytes,
            conditions: Mutex::new(Vec::new()),
        });
        let store = EtcdStore {
            rt: Some(rt),
            inner,
        };
        let i = store.inner.clone();
        store.run(async move { i.init_schema().await })?;
        tracing::debug!(endpoints = %store.inner.endpoints, prefix = %store.inner.keys.p, "etcd store opened");
        Ok(store)
    }

    /// The etcd client this store uses (for an election on the same connection).
    pub fn client(&self) -> Client {
        self.inner.client.clone()
    }

    /// The key prefix of this store.
    pub fn prefix(&self) -> &str {
        &self.inner.keys.p
    }

    /// Condition every later write on `compares` too (e.g. "the election key still exists with
    /// this create_revision": `Compare::create_revision(key, CompareOp::Equal, rev)`). A
    /// commit whose conditions fail writes nothing and returns [`StoreError::Fenced`].
    /// An empty list removes the conditions.
    pub fn set_write_conditions(&self, compares: Vec<Compare>) {
        *self
            .inner
            .conditions
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = compares;
    }

    /// Delete every key under this store's prefix (`drover store copy --force`).
    pub fn wipe(&self) -> Result<(), StoreError> {
        let i = self.inner.clone();
        self.run(async move {
            let p = i.keys.p.clone();
            let mut kv = i.kv.clone();
            i.req(kv.delete(
                p.clone(),
                Some(etcd_client::DeleteOptions::new().with_range(prefix_end(&p))),
            ))
            .await?;
            i.init_schema().await
        })
    }

    /// Run `fut` on the store's runtime and wait for it on this thread.
    fn run<T, F>(&self, fut: F) -> T
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        run_on(
            self.rt
                .as_ref()
                .expect("runtime lives as long as the store"),
            fut,
        )
    }
}

fn run_on<T, F>(rt: &tokio::runtime::Runtime, fut: F) -> T
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().expect("the etcd store's runtime stopped")
}

fn tls_options(cfg: &EtcdConfig) -> Result<TlsOptions, StoreError> {
    let read = |what: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| {
            StoreError::Config(format!("cannot read the etcd {what} {}: {e}", p.display()))
        })
    };
    let mut tls = TlsOptions::new();
    match &cfg.ca {
        Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(read("CA (--etcd-ca)", ca)?)),
        None => {
            return Err(StoreError::Config(
                "TLS to etcd needs the CA that signed the members' certificates (--etcd-ca)".into(),
            ))
        }
    }
    match (&cfg.cert, &cfg.key) {
        (Some(c), Some(k)) => {
            tls = tls.identity(Identity::from_pem(
                read("client certificate (--etcd-cert)", c)?,
                read("client key (--etcd-key)", k)?,
            ))
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::Config(
                "--etcd-cert and --etcd-key go together".into(),
            ))
        }
    }
    Ok(tls)
}

/// Whether any endpoint accepts a TCP connection within a short time.
async fn any_reachable(endpoints: &[String]) -> bool {
    for e in endpoints {
        let t = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(e.as_str()),
        );
        if let Ok(Ok(_)) = t.await {
            return true;
        }
    }
    false
}

fn outcome(ambiguous: bool) -> String {
    if ambiguous {
        "the write may or may not have been applied: etcd can still commit it once it recovers"
            .into()
    } else {
        "nothing was written".into()
    }
}

async fn classify_elapsed(
    endpoints: &str,
    eps: &[String],
    timeout: Duration,
    ambiguous: bool,
) -> StoreError {
    let detail = format!("no answer within {} ms", timeout.as_millis());
    if any_reachable(eps).await {
        StoreError::EtcdUnavailable {
            endpoints: endpoints.into(),
            detail,
            outcome: outcome(ambiguous),
        }
    } else {
        StoreError::EtcdUnreachable {
            endpoints: endpoints.into(),
            detail: format!("{detail}, and no endpoint accepts connections"),
        }
    }
}

/// A clear [`StoreError`] for what etcd-client returned. `ambiguous`: the request was a
/// write that etcd may have received.
async fn classify(
    e: etcd_client::Error,
    endpoints: &str,
    eps: &[String],
    prefix: &str,
    ambiguous: bool,
) -> StoreError {
    use etcd_client::Error as E;
    let text = e.to_string();
    match &e {
        E::GRpcStatus(s) => {
            let msg = s.message().to_string();
            let code = s.code();
            if matches!(
                code,
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) || msg.contains("authentication failed")
                || msg.contains("permission denied")
                || msg.contains("invalid auth token")
                || msg.contains("user name is empty")
            {
                return StoreError::EtcdAuth {
                    detail: msg,
                    prefix: prefix.into(),
                };
            }
            if msg.contains("too many operations in txn request")
                || msg.contains("request is too large")
                || code == tonic::Code::ResourceExhausted
            {
                return StoreError::Etcd(format!(
                    "{msg}: the transaction is over the etcd members' --max-txn-ops or \
                     --max-request-bytes; set max_txn_ops / max_request_bytes in the store URL \
                     to the members' values"
                ));
            }
            // A member without leader (require_leader), a proposal that timed out, a
            // leader that changed mid-request: quorum trouble.
            let no_quorum = msg.contains("no leader")
                || msg.contains("timed out")
                || msg.contains("leader changed")
                || msg.contains("too many requests")
                || msg.contains("not capable");
            // Ambiguity: "no leader" is refused before the proposal; the rest may apply.
            let ambiguous = ambiguous && !msg.contains("no leader");
            if no_quorum || matches!(code, tonic::Code::DeadlineExceeded | tonic::Code::Cancelled) {
                return StoreError::EtcdUnavailable {
                    endpoints: endpoints.into(),
                    detail: msg,
                    outcome: outcome(ambiguous),
                };
            }
            if code == tonic::Code::Unavailable {
                if any_reachable(eps).await {
                    return StoreError::EtcdUnavailable {
                        endpoints: endpoints.into(),
                        detail: msg,
                        outcome: outcome(ambiguous),
                    };
                }
                return StoreError::EtcdUnreachable {
                    endpoints: endpoints.into(),
                    detail: msg,
                };
            }
            StoreError::Etcd(text)
        }
        E::TransportError(_) | E::IoError(_) => {
            if any_reachable(eps).await {
                StoreError::EtcdUnavailable {
                    endpoints: endpoints.into(),
                    detail: text,
                    outcome: outcome(ambiguous),
                }
            } else {
                StoreError::EtcdUnreachable {
                    endpoints: endpoints.into(),
                    detail: text,
                }
            }
        }
        E::InvalidArgs(_) | E::InvalidUri(_) => StoreError::Config(format!("etcd: {text}")),
        _ => StoreError::Etcd(text),
    }
}

/// An error again, for every commit of a group it concerns.
fn dup(e: &StoreError) -> StoreError {
    match e {
        StoreError::EtcdUnreachable { endpoints, detail } => StoreError::EtcdUnreachable {
            endpoints: endpoints.clone(),
            detail: detail.clone(),
        },
        StoreError::EtcdUnavailable {
            endpoints,
            detail,
            outcome,
        } => StoreError::EtcdUnavailable {
            endpoints: endpoints.clone(),
            detail: detail.clone(),
            outcome: outcome.clone(),
        },
        StoreError::EtcdAuth { detail, prefix } => StoreError::EtcdAuth {
            detail: detail.clone(),
            prefix: prefix.clone(),
        },
        StoreError::Fenced(s) => StoreError::Fenced(s.clone()),
        StoreError::Contended(s) => StoreError::Contended(s.clone()),
        StoreError::Config(s) => StoreError::Config(s.clone()),
        StoreError::Etcd(s) => StoreError::Etcd(s.clone()),
        other => StoreError::Etcd(other.to_string()),
    }
}

/// An etcd error that is worth one more try of a whole read: the revision it was reading
/// at was compacted away meanwhile.
fn compacted(e: &StoreError) -> bool {
    matches!(e, StoreError::Etcd(s) if s.contains("compacted"))
}

fn to_json<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Json {
        what: what.to_string(),
        source,
    })
}

fn from_json<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Json {
        what: what.to_string(),
        source,
    })
}

/// What a commit attempt read: the head and the records its writes must check.
#[derive(Clone, Default)]
struct View {
    head: Head,
    /// Plans, tokens and token hashes by key, as stored (`None`: absent), with what
    /// earlier commits of the same group wrote.
    values: HashMap<String, Option<Vec<u8>>>,
}

/// The last operation on each key of a transaction (etcd refuses a key twice in one).
type Ops = BTreeMap<String, Option<Vec<u8>>>;

fn ops_bytes(ops: &Ops) -> usize {
    ops.iter()
        .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + OP_OVERHEAD)
        .sum()
}

/// What became of a write transaction.
enum Written {
    /// Applied; the head's new mod_revision.
    Applied(i64),
    /// Another writer's commit came first: nothing of this one was written.
    Moved,
    /// The extra conditions failed: nothing was written.
    Fenced,
}

/// One commit, checked and turned into operations against a [`View`].
struct Staged {
    ops: Ops,
    committed: Committed,
    /// The head after this commit.
    head: Head,
}

impl Inner {
    /// One request, bounded by the timeout, its error made clear.
    async fn req<T>(
        &self,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        self.req_as(fut, false).await
    }

    /// A read, sent again on transient errors (a member just lost, an election under way)
    /// until the timeout has passed since `start`.
    async fn read_req<T, Fut>(
        &self,
        start: tokio::time::Instant,
        mut make: impl FnMut() -> Fut,
    ) -> Result<T, StoreError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        loop {
            match self.req(make()).await {
                Err(e) if transient(&e) && start.elapsed() + RETRY_PAUSE < self.timeout => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                other => return other,
            }
        }
    }

    async fn req_as<T>(
        &self,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
        ambiguous: bool,
    ) -> Result<T, StoreError> {
        let eps: Vec<String> = self
            .endpoints
            .split(',')
            .map(|e| e.trim_start_matches("https://").to_string())
            .collect();
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(e, &self.endpoints, &eps, &self.keys.p, ambiguous).await),
            Err(_) => Err(classify_elapsed(&self.endpoints, &eps, self.timeout, ambiguous).await),
        }
    }

    async fn init_schema(&self) -> Result<(), StoreError> {
        let key = self.keys.schema();
        let mut kv = self.kv.clone();
        let resp = self.req(kv.get(key.clone(), None)).await?;
        if let Some(v) = resp.kvs().first() {
            let found: u64 = std::str::from_utf8(v.value())
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| StoreError::Etcd(format!("key {key} holds no layout version")))?;
            if found > SCHEMA {
                return Err(StoreError::SchemaTooNew {
                    found: found as i64,
                    supported: SCHEMA as i64,
                });
            }
            return Ok(());
        }
        let txn = Txn::new()
            .when(vec![Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key, SCHEMA.to_string(), None)]);
        self.req(kv.txn(txn)).await?;
        Ok(())
    }

    async fn get_at(&self, key: String, rev: i64) -> Result<Option<Vec<u8>>, StoreError> {
        let opts = (rev > 0).then(|| GetOptions::new().with_revision(rev));
        let start = tokio::time::Instant::now();
        let mut resp = self
            .read_req(start, || {
                let mut kv = self.kv.clone();
                let (key, opts) = (key.clone(), opts.clone());
                async move { kv.get(key, opts).await }
            })
            .await?;
        Ok(resp
            .take_kvs()
            .into_iter()
            .next()
            .map(|kv| kv.into_key_value().1))
    }

    /// Every (key, value) in `[start, end)` at etcd revision `rev` (0: now), page by page;
    /// `each` returns false to stop. Returns the revision read at.
    async fn range(
        &self,
        start: String,
        end: Vec<u8>,
        mut rev: i64,
        mut each: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<i64, StoreError> {
        let mut from = start.into_bytes();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if rev > 0 {
                opts = opts.with_revision(rev);
            }
            let start = tokio::time::Instant::now();
            let mut resp = self
                .read_req(start, || {
                    let mut kv = self.kv.clone();
                    let (from, opts) = (from.clone(), opts.clone());
                    async move { kv.get(from, Some(opts)).await }
                })
                .await?;
            if rev <= 0 {
                rev = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last().map(|kv| kv.key().to_vec()) else {
                return Ok(rev);
            };
            for kv in &kvs {
                if !each(kv.key(), kv.value())? {
                    return Ok(rev);
                }
            }
            if !more {
                return Ok(rev);
            }
            from = last;
            from.push(0);
        }
    }

    /// The head as of now, with the etcd revision it was read at (to pin later reads to);
    /// `None` before the first write.
    async fn read_head(&self) -> Result<(i64, Option<Head>), StoreError> {
        let head_key = self.keys.head();
        let start = tokio::time::Instant::now();
        let resp = self
            .read_req(start, || {
                let mut kv = self.kv.clone();
                let key = head_key.clone();
                async move { kv.get(key, None).await }
            })
            .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let head = match resp.kvs().first() {
            Some(v) => Some(from_json::<Head>("the store's head", v.value())?),
            None => None,
        };
        Ok((rev, head))
    }

    /// The newest `filter.limit` events that match `filter` (`limit` > 0), oldest first:
    /// read back from the last seq given, a window of seqs at a time, at one etcd revision,
    /// until `limit` match or the oldest stored event is passed. About `limit` events are
    /// read when most match (a scan of the whole retained range read them all; etcd 3.4
    /// sorts a descending range only after reading all of it, so no descending read).
    async fn newest_events(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let (rev, head) = self.read_head().await?;
        let last = head.map_or(0, |h| h.event_seq);
        let prefix = self.keys.dir("events");
        // The oldest stored event at or after `after_seq + 1` (older ones were pruned): its
        // key alone.
        let from = self.keys.event(filter.after_seq.saturating_add(1));
        let mut opts = GetOptions::new()
            .with_range(prefix_end(&prefix))
            .with_limit(1)
            .with_keys_only();
        if rev > 0 {
            opts = opts.with_revision(rev);
        }
        let start = tokio::time::Instant::now();
        let resp = self
            .read_req(start, || {
                let mut kv = self.kv.clone();
                let (from, opts) = (from.clone(), opts.clone());
                async move { kv.get(from, Some(opts)).await }
            })
            .await?;
        let oldest = resp.kvs().first().map(|kv| {
            let key = String::from_utf8_lossy(kv.key());
            key[prefix.len()..]
                .parse::<u64>()
                .map_err(|_| StoreError::Etcd(format!("event key {key} has no seq")))
        });
        let Some(oldest) = oldest.transpose()? else {
            return Ok(Vec::new());
        };
        // Windows newest first, each one's events oldest first.
        let mut windows: Vec<Vec<Event>> = Vec::new();
        let mut found = 0;
        let mut hi = last.max(oldest);
        while found < filter.limit {
            let width = ((filter.limit - found) as u64).clamp(16, 4 * PAGE as u64);
            let lo = hi.saturating_sub(width - 1).max(oldest);
            let mut window = Vec::new();
            self.range(
                self.keys.event(lo),
                self.keys.event(hi.saturating_add(1)).into_bytes(),
                rev,
                |k, v| {
                    let e: Event = from_json(&String::from_utf8_lossy(k), v)?;
                    if event_matches(filter, &e) {
                        window.push(e);
                    }
                    Ok(true)
                },
            )
            .await?;
            found += window.len();
            windows.push(window);
            if lo <= oldest {
                break;
            }
            hi = lo - 1;
        }
        let mut out: Vec<Event> = windows.into_iter().rev().flatten().collect();
        out.drain(..out.len().saturating_sub(filter.limit));
        Ok(out)
    }

    /// Every value under `dir/` at `rev`, decoded.
    async fn all<T: DeserializeOwned>(&self, dir: &str, rev: i64) -> Result<Vec<T>, StoreError> {
        let prefix = self.keys.dir(dir);
        let mut out = Vec::new();
        self.range(prefix.clone(), prefix_end(&prefix), rev, |k, v| {
            out.push(from_json(&String::from_utf8_lossy(k), v)?);
            Ok(true)
        })
        .await?;
        Ok(out)
    }

    /// Read the head and `keys` atomically (read-only transactions, each with the head, so
    /// that they agree). Returns the view and the head's mod_revision (0: no head yet).
    async fn read_view(&self, keys: Vec<String>) -> Result<(View, i64), StoreError> {
        let head_key = self.keys.head();
        let mut view = View::default();
        let mut head_mod = None;
        let per = self.max_ops - 1;
        let mut chunks: Vec<&[String]> = keys.chunks(per).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for chunk in chunks {
            let mut ops = vec![TxnOp::get(head_key.clone(), None)];
            ops.extend(chunk.iter().map(|k| TxnOp::get(k.clone(), None)));
            let txn = Txn::new().and_then(ops);
            let start = tokio::time::Instant::now();
            let resp = self
                .read_req(start, || {
                    let mut kv = self.kv.clone();
                    let txn = txn.clone();
                    async move { kv.txn(txn).await }
                })
                .await?;
            let mut gets = resp.op_responses().into_iter().map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
                _ => None,
            });
            let head = gets.next().flatten();
            let m = head.as_ref().map_or(0, |(_, m)| *m);
            match head_mod {
                None => {
                    head_mod = Some(m);
                    view.head = match &head {
                        Some((v, _)) => from_json("the store's head", v)?,
                        None => Head::default(),
                    };
                }
                // Another commit came between two reads: the caller starts again.
                Some(before) if before != m => return Err(StoreError::Contended("moved".into())),
                Some(_) => {}
            }
            for (k, got) in chunk.iter().zip(gets) {
                view.values.insert(k.clone(), got.map(|(v, _)| v));
            }
        }
        Ok((view, head_mod.unwrap_or(0)))
    }

    /// The keys a commit's writes must read before they can be checked.
    fn keys_to_read(&self, writes: &[Write], out: &mut Vec<String>) {
        for w in writes {
            match w {
                Write::Plan(p) => out.push(self.keys.plan(&p.group().0, p.generation)),
                Write::Token(t) => {
                    out.push(self.keys.token(&t.info.id));
                    out.push(self.keys.token_hash(&t.hash));
                }
                Write::RevokeToken { id, .. } => out.push(self.keys.token(id)),
                _ => {}
            }
        }
    }

    /// Check one commit against `view` and turn it into operations; `view` then holds its
    /// effects. On error, `view` is unchanged.
    fn stage(
        &self,
        view: &mut View,
        writes: Vec<Write>,
        now_ms: u64,
    ) -> Result<Staged, StoreError> {
        let mut v = view.clone();
        let mut ops = Ops::new();
        let mut out = Committed {
            revision: None,
            events: Vec::new(),
        };
        let k = &self.keys;
        for w in writes {
            match w {
                Write::Revision {
                    file,
                    summary,
                    toml,
                    fleet,
                    last_applied,
                } => {
                    let n = v.head.revision + 1;
                    v.head.revision = n;
                    let s = RevisionSummary {
                        number: n,
                        applied_at_ms: now_ms,
                        file,
                        summary,
                    };
                    ops.insert(k.revision(n), Some(to_json("revision", &s)?));
                    let body = RevisionBody {
                        toml,
                        fleet,
                        last_applied,
                    };
                    ops.insert(k.body(n), Some(to_json("revision body", &body)?));
                    out.revision = Some(n);
                }
                Write::Group(g) => {
                    ops.insert(k.group(&g.group), Some(to_json("group", &g)?));
                }
                Write::RemoveGroup(g) => {
                    ops.insert(k.group(&g), None);
                }
                Write::Plan(plan) => {
                    let group = plan.group().0;
                    let key = k.plan(&group, plan.generation);
                    match v.values.get(&key).cloned().flatten() {
                        Some(stored) => {
                            if from_json::<Plan>("plan", &stored)? != plan {
                                return Err(StoreError::PlanConflict {
                                    group,
                                    generation: plan.generation,
                                });
                            }
                        }
                        None => {
                            let bytes = to_json("plan", &plan)?;
                            v.values.insert(key.clone(), Some(bytes.clone()));
                            ops.insert(key, Some(bytes));
                        }
                    }
                }
                Write::Instance(i) => {
                    ops.insert(k.instance(&i.id), Some(to_json("instance", &i)?));
                }
                Write::Schedule(o) => {
                    ops.insert(k.schedule(o.id), Some(to_json("schedule", &o)?));
                }
                Write::RemoveInstance(id) => {
                    ops.insert(k.instance(&id), None);
                }
                Write::Counter { name, value } => {
                    ops.insert(k.counter(&name), Some(value.to_string().into_bytes()));
                }
                Write::Event(e) => {
                    let seq = v.head.event_seq + 1;
                    v.head.event_seq = seq;
                    let ev = Event {
                        seq,
                        at_ms: now_ms,
                        kind: e.kind,
                        group: e.group,
                        instance: e.instance,
                        message: e.message,
                    };
                    ops.insert(k.event(seq), Some(to_json("event", &ev)?));
                    out.events.push(ev);
                }
                Write::Token(t) => {
                    let key = k.token(&t.info.id);
                    let hkey = k.token_hash(&t.hash);
                    let taken = |key: &String| v.values.get(key).is_some_and(|x| x.is_some());
                    if taken(&key) || taken(&hkey) {
                        return Err(StoreError::TokenExists { id: t.info.id });
                    }
                    let bytes = to_json("token", &t)?;
                    v.values.insert(key.clone(), Some(bytes.clone()));
                    v.values
                        .insert(hkey.clone(), Some(t.info.id.clone().into_bytes()));
                    ops.insert(key, Some(bytes));
                    ops.insert(hkey, Some(t.info.id.into_bytes()));
                }
                Write::RevokeToken { id, at_ms } => {
                    let key = k.token(&id);
                    if let Some(stored) = v.values.get(&key).cloned().flatten() {
                        let mut t: TokenRecord = from_json("token", &stored)?;
                        if t.info.revoked_at_ms.is_none() {
                            t.info.revoked_at_ms = Some(at_ms);
                            let bytes = to_json("token", &t)?;
                            v.values.insert(key.clone(), Some(bytes.clone()));
                            ops.insert(key, Some(bytes));
                        }
                    }
                }
            }
        }
        let bytes = ops_bytes(&ops) + TXN_OVERHEAD;
        if ops.len() + 1 > self.max_ops || bytes > self.max_bytes {
            return Err(StoreError::EtcdTooLarge {
                ops: ops.len() + 1,
                bytes,
                max_ops: self.max_ops,
                max_bytes: self.max_bytes,
            });
        }
        *view = v;
        Ok(Staged {
            ops,
            committed: out,
            head: view.head,
        })
    }

    fn head_compare(&self, head_mod: i64) -> Compare {
        if head_mod == 0 {
            Compare::version(self.keys.head(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(self.keys.head(), CompareOp::Equal, head_mod)
        }
    }

    /// Group commit: each batch all or nothing, in as few transactions as the limits allow.
    async fn commit_many(
        &self,
        batches: Vec<(Vec<Write>, u64)>,
    ) -> Vec<Result<Committed, StoreError>> {
        let n = batches.len();
        let mut results: Vec<Option<Result<Committed, StoreError>>> =
            (0..n).map(|_| None).collect();
        // The batches not yet decided, in order.
        let mut pending: Vec<usize> = (0..n).collect();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                // Another writer committed first: back off a little (jittered) and redo.
                let jitter = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos() as u64 % 1000);
                let ms = (attempt as u64).min(20) + jitter % (attempt as u64 + 1);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            match self.attempt(&batches, &pending, &mut results).await {
                Ok(rest) => {
                    pending = rest;
                    if pending.is_empty() {
                        break;
                    }
                }
                Err(e) => {
                    for i in pending {
                        results[i] = Some(Err(dup(&e)));
                    }
                    pending = Vec::new();
                    break;
                }
            }
        }
        for i in pending {
            results[i] = Some(Err(StoreError::Contended(format!(
                "the commit lost to other writers {ATTEMPTS} times in a row"
            ))));
        }
        results
            .into_iter()
            .map(|r| r.expect("every batch decided"))
            .collect()
    }

    /// One try at the `pending` batches: read, check, write. Decides the batches it can and
    /// returns those to try again (after another writer's commit came first).
    async fn attempt(
        &self,
        batches: &[(Vec<Write>, u64)],
        pending: &[usize],
        results: &mut [Option<Result<Committed, StoreError>>],
    ) -> Result<Vec<usize>, StoreError> {
        let mut keys = Vec::new();
        for &i in pending {
            self.keys_to_read(&batches[i].0, &mut keys);
        }
        keys.sort();
        keys.dedup();
        let (mut view, mut head_mod) = match self.read_view(keys).await {
            Ok(v) => v,
            Err(StoreError::Contended(_)) => return Ok(pending.to_vec()),
            Err(e) => return Err(e),
        };
        // Check every batch, in order, each against the effects of those before it.
        let mut staged: Vec<(usize, Result<Staged, StoreError>)> = Vec::new();
        for &i in pending {
            let (writes, now_ms) = &batches[i];
            staged.push((i, self.stage(&mut view, writes.clone(), *now_ms)));
        }
        // Pack the good ones into transactions within the limits.
        struct Chunk {
            ops: Ops,
            head: Head,
            /// Positions in `staged` of the batches it carries (the last one included).
            upto: usize,
            members: Vec<usize>,
        }
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut cur: Option<Chunk> = None;
        for (pos, (_, s)) in staged.iter().enumerate() {
            let Ok(s) = s else { continue };
            if let Some(c) = &cur {
                let new_keys = s.ops.keys().filter(|k| !c.ops.contains_key(*k)).count();
                let bytes = ops_bytes(&c.ops) + ops_bytes(&s.ops) + TXN_OVERHEAD;
                if c.ops.len() + new_keys + 1 > self.max_ops || bytes > self.max_bytes {
                    chunks.push(cur.take().expect("checked"));
                }
            }
            let c = cur.get_or_insert_with(|| Chunk {
                ops: Ops::new(),
                head: s.head,
                upto: pos,
                members: Vec::new(),
            });
            for (k, v) in &s.ops {
                c.ops.insert(k.clone(), v.clone());
            }
            c.head = s.head;
            c.upto = pos;
            c.members.push(pos);
        }
        chunks.extend(cur);
        let conditions = self
            .conditions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let head_key = self.keys.head();
        // Positions in `staged` decided so far (every one before this index).
        let mut decided = 0;
        let mut failure: Option<StoreError> = None;
        let mut retry = false;
        for c in chunks {
            let mut compares = vec![self.head_compare(head_mod)];
            compares.extend(conditions.iter().cloned());
            let mut ops: Vec<TxnOp> = c
                .ops
                .into_iter()
                .map(|(k, v)| match v {
                    Some(v) => TxnOp::put(k, v, None),
                    None => TxnOp::delete(k, None),
                })
                .collect();
            let id = txn_id();
            let head = Head { txn: id, ..c.head };
            ops.push(TxnOp::put(head_key.clone(), to_json("head", &head)?, None));
            let txn = Txn::new()
                .when(compares)
                .and_then(ops)
                .or_else(vec![TxnOp::get(head_key.clone(), None)]);
            match self.write(txn, head_mod, id).await {
                Ok(Written::Applied(m)) => {
                    head_mod = m;
                    decided = c.upto + 1;
                }
                Ok(Written::Moved) => {
                    retry = true;
                    break;
                }
                Ok(Written::Fenced) => {
                    failure = Some(StoreError::Fenced(
                        "a condition set with set_write_conditions failed".into(),
                    ));
                    break;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let all_done = failure.is_none() && !retry;
        let mut rest = Vec::new();
        for (pos, (i, s)) in staged.into_iter().enumerate() {
            if pos < decided || all_done {
                results[i] = Some(s.map(|s| s.committed));
            } else if let Some(e) = &failure {
                results[i] = Some(Err(dup(e)));
            } else {
                rest.push(i);
            }
        }
        Ok(rest)
    }

    /// Send one write transaction (conditioned on the head's `head_mod`, writing a head with
    /// transaction id `id`) and find out what became of it. After a transient failure it
    /// reads the head: the transaction was applied if the head carries `id`; it was not if
    /// the head is unchanged, and is sent again while the timeout allows.
    async fn write(&self, txn: Txn, head_mod: i64, id: u64) -> Result<Written, StoreError> {
        let start = tokio::time::Instant::now();
        let head_key = self.keys.head();
        let mut kv = self.kv.clone();
        let mut last = match self.req_as(kv.txn(txn.clone()), true).await {
            Ok(resp) => return Ok(self.written(&resp, head_mod)),
            Err(e) => e,
        };
        while transient(&last) && start.elapsed() + RETRY_PAUSE < self.timeout {
            tokio::time::sleep(RETRY_PAUSE).await;
            let mut kv = self.kv.clone();
            let head = match self.req(kv.get(head_key.clone(), None)).await {
                Ok(r) => r
                    .kvs()
                    .first()
                    .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let (now, now_mod) = match &head {
                Some((v, m)) => (from_json::<Head>("the store's head", v)?, *m),
                None => (Head::default(), 0),
            };
            if now.txn == id {
                return Ok(Written::Applied(now_mod));
            }
            if now_mod != head_mod {
                // Someone else committed; ours was not applied before theirs.
                return Ok(Written::Moved);
            }
            let mut kv = self.kv.clone();
            match self.req_as(kv.txn(txn.clone()), true).await {
                Ok(resp) => return Ok(self.written(&resp, head_mod)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn written(&self, resp: &etcd_client::TxnResponse, head_mod: i64) -> Written {
        if resp.succeeded() {
            return Written::Applied(resp.header().map_or(0, |h| h.revision()));
        }
        let now_mod = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map_or(0, |kv| kv.mod_revision())),
                _ => None,
            })
            .unwrap_or(0);
        if now_mod != head_mod {
            Written::Moved
        } else {
            Written::Fenced
        }
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let (rev, head) = self.read_head().await?;
        let head = head.unwrap_or_default();
        let revision = if head.revision > 0 {
            self.full_revision(head.revision, rev).await?
        } else {
            None
        };
        let groups: Vec<GroupRecord> = self.all("groups", rev).await?;
        let mut plans = Vec::new();
        let gets = groups
            .iter()
            .map(|g| self.get_at(self.keys.plan(&g.group, g.generation), rev));
        for got in futures::future::join_all(gets).await {
            if let Some(bytes) = got? {
                plans.push(from_json::<Plan>("plan", &bytes)?);
            }
        }
        let instances: Vec<InstanceRecord> = self.all("instances", rev).await?;
        let schedules: Vec<drover_model::api::ScheduledScale> = self.all("schedules", rev).await?;
        let mut counters = BTreeMap::new();
        let prefix = self.keys.dir("counters");
        self.range(prefix.clone(), prefix_end(&prefix), rev, |k, v| {
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let value = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::Etcd(format!("counter {name} is not a number")))?;
            counters.insert(name, value);
            Ok(true)
        })
        .await?;
        Ok(Snapshot {
            revision,
            groups,
            plans,
            instances,
            counters,
            last_event_seq: head.event_seq,
            schedules,
        })
    }

    async fn full_revision(&self, n: u64, rev: i64) -> Result<Option<Revision>, StoreError> {
        let (s, b) = futures::future::join(
            self.get_at(self.keys.revision(n), rev),
            self.get_at(self.keys.body(n), rev),
        )
        .await;
        let (Some(s), Some(b)) = (s?, b?) else {
            return Ok(None);
        };
        let s: RevisionSummary = from_json(&format!("revision {n}"), &s)?;
        let b: RevisionBody = from_json(&format!("body of revision {n}"), &b)?;
        Ok(Some(Revision {
            number: s.number,
            applied_at_ms: s.applied_at_ms,
            file: s.file,
            summary: s.summary,
            toml: b.toml,
            fleet: b.fleet,
            last_applied: b.last_applied,
        }))
    }

    async fn revision(&self, n: u64) -> Result<Option<Revision>, StoreError> {
        // Pin both reads at one etcd revision.
        let (rev, _) = self.read_head().await?;
        self.full_revision(n, rev).await
    }

    async fn events(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let prefix = self.keys.dir("events");
        let start = self.keys.event(filter.after_seq.saturating_add(1));
        let mut out = Vec::new();
        if filter.after_seq == u64::MAX {
            return Ok(out);
        }
        if filter.newest && filter.limit > 0 {
            return self.newest_events(filter).await;
        }
        self.range(start, prefix_end(&prefix), 0, |k, v| {
            let e: Event = from_json(&String::from_utf8_lossy(k), v)?;
            if event_matches(filter, &e) {
                out.push(e);
            }
            Ok(filter.limit == 0 || out.len() < filter.limit)
        })
        .await?;
        Ok(out)
    }

    /// Create-if-absent in one transaction, else read what is there. Sent again on
    /// transient errors: an earlier attempt that did create the key is then read back.
    async fn keep_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        let key = self.keys.secret(name);
        let start = tokio::time::Instant::now();
        let resp = self
            .read_req(start, || {
                let mut kv = self.kv.clone();
                let txn = Txn::new()
                    .when(vec![Compare::version(key.clone(), CompareOp::Equal, 0)])
                    .and_then(vec![TxnOp::put(key.clone(), candidate.to_vec(), None)])
                    .or_else(vec![TxnOp::get(key.clone(), None)]);
                async move { kv.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            return Ok(candidate.to_vec());
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(g) = op {
                if let Some(kv) = g.kvs().first() {
                    return Ok(kv.value().to_vec());
                }
            }
        }
        Err(StoreError::Etcd(format!(
            "the key {key} exists but could not be read back"
        )))
    }

    async fn secrets(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = self.keys.dir("secrets");
        let mut out = Vec::new();
        self.range(prefix.clone(), prefix_end(&prefix), 0, |k, v| {
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((name, v.to_vec()));
            Ok(true)
        })
        .await?;
        Ok(out)
    }

    async fn prune_events(&self, keep_last: u64, before_ms: u64) -> Result<u64, StoreError> {
        let prefix = self.keys.dir("events");
        // (seq, at_ms) of every stored event, oldest first.
        let mut seen: Vec<(u64, u64)> = Vec::new();
        self.range(prefix.clone(), prefix_end(&prefix), 0, |k, v| {
            let e: Event = from_json(&String::from_utf8_lossy(k), v)?;
            seen.push((e.seq, e.at_ms));
            Ok(true)
        })
        .await?;
        let Some(&(newest, _)) = seen.last() else {
            return Ok(0);
        };
        let by_count = newest.saturating_sub(keep_last);
        let by_age = seen
            .iter()
            .filter(|(_, at)| *at < before_ms)
            .map(|(seq, _)| *seq)
            .max()
            .unwrap_or(0);
        let cutoff = by_count.max(by_age).min(newest - 1);
        let n = seen.iter().filter(|(seq, _)| *seq <= cutoff).count() as u64;
        if n == 0 {
            return Ok(0);
        }
        let mut kv = self.kv.clone();
        let end = self.keys.event(cutoff + 1);
        self.req(kv.delete(
            prefix,
            Some(etcd_client::DeleteOptions::new().with_range(end)),
        ))
        .await?;
        Ok(n)
    }

    async fn all_plans(&self) -> Result<Vec<Plan>, StoreError> {
        let mut plans: Vec<Plan> = self.all("plans", 0).await?;
        plans.sort_by_key(|p| (p.group().0, p.generation));
        Ok(plans)
    }
}

impl EtcdStore {
    /// A read, tried again from the start when the revision it read at was compacted.
    fn read<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(Arc<Inner>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send,
        T: Send + 'static,
    {
        let inner = self.inner.clone();
        self.run(async move {
            let mut tries = 0;
            loop {
                match f(inner.clone()).await {
                    Err(e) if compacted(&e) && tries < 3 => tries += 1,
                    other => return other,
                }
            }
        })
    }
}

impl Store for EtcdStore {
    fn commit(&self, writes: Vec<Write>, now_ms: u64) -> Result<Committed, StoreError> {
        self.commit_many(vec![(writes, now_ms)])
            .pop()
            .expect("one result per commit")
    }

    fn commit_many(&self, batches: Vec<(Vec<Write>, u64)>) -> Vec<Result<Committed, StoreError>> {
        if batches.is_empty() {
            return Vec::new();
        }
        let i = self.inner.clone();
        let n = batches.len();
        let results = self.run(async move { i.commit_many(batches).await });
        tracing::trace!(batches = n, "etcd store: committed a group");
        results
    }

    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.read(|i| async move { i.snapshot().await })
    }

    fn revision(&self, number: u64) -> Result<Option<Revision>, StoreError> {
        self.read(move |i| async move { i.revision(number).await })
    }

    fn revisions(&self) -> Result<Vec<RevisionSummary>, StoreError> {
        self.read(|i| async move { i.all::<RevisionSummary>("revisions", 0).await })
    }

    fn plan(&self, group: &str, generation: u64) -> Result<Option<Plan>, StoreError> {
        let key = self.inner.keys.plan(group, generation);
        self.read(move |i| {
            let key = key.clone();
            async move {
                match i.get_at(key, 0).await? {
                    Some(b) => Ok(Some(from_json("plan", &b)?)),
                    None => Ok(None),
                }
            }
        })
    }

    fn events(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let filter = filter.clone();
        self.read(move |i| {
            let filter = filter.clone();
            async move { i.events(&filter).await }
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(|i| async move { i.all::<TokenRecord>("tokens", 0).await })
    }

    fn keep_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        let (i, name, candidate) = (self.inner.clone(), name.to_string(), candidate.to_vec());
        self.run(async move { i.keep_secret(&name, &candidate).await })
    }

    fn secrets(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(|i| async move { i.secrets().await })
    }

    fn all_plans(&self) -> Result<Vec<Plan>, StoreError> {
        self.read(|i| async move { i.all_plans().await })
    }

    fn prune_events(&self, keep_last: u64, before_ms: u64) -> Result<u64, StoreError> {
        let i = self.inner.clone();
        self.run(async move { i.prune_events(keep_last, before_ms).await })
    }
}
