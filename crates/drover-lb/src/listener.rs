//! A running listener: binding, the accept loop, the target registry and shutdown.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{ListenerConfig, Policy, Target};
use crate::conn;
use crate::error::LbError;
use crate::stats::{Counters, ListenerStats, TargetEntry};

/// How long a target whose connect failed is left out of selection (unless it is the only
/// one left).
pub(crate) const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Shortest interval between two warnings about refused or failed accepts.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Pause after an accept error (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The targets in rotation, in target-set order, as captured at accept time.
pub(crate) type Snapshot = Arc<[Arc<TargetEntry>]>;

/// State shared by the handle, the accept loop and every connection task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) local_addr: SocketAddr,
    pub(crate) connect_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) policy: Policy,
    /// Origin of the listener's millisecond clock (penalties, idle tracking).
    pub(crate) epoch: Instant,
    /// Advances by one per client connection; drives round-robin.
    pub(crate) cursor: std::sync::atomic::AtomicUsize,
    pub(crate) counters: Counters,
    /// Every target in rotation, plus removed ones still referenced by a connection,
    /// keyed by (id, addr). Locked only on target-set changes and by stats queries.
    registry: Mutex<HashMap<(String, SocketAddr), Arc<TargetEntry>>>,
}

impl Shared {
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn registry(&self) -> MutexGuard<'_, HashMap<(String, SocketAddr), Arc<TargetEntry>>> {
        // The registry holds no invariant a panicking holder could break half-way.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `targets` the rotation and returns it as a snapshot. Entries are kept across
    /// updates (same id and address), so counters and penalties survive; removed entries
    /// stay listed while a connection still holds them.
    fn rebuild(&self, targets: &[Target]) -> Snapshot {
        let mut seen = HashSet::with_capacity(targets.len());
        let mut wanted = Vec::with_capacity(targets.len());
        for t in targets {
            if seen.insert(t.id.as_str()) {
                wanted.push(t);
            } else {
                warn!(listener = %self.name, target = %t.id, addr = %t.addr,
                      "duplicate target id in update; keeping the first");
            }
        }
        let keys: HashSet<(&str, SocketAddr)> =
            wanted.iter().map(|t| (t.id.as_str(), t.addr)).collect();

        let mut registry = self.registry();
        for ((id, addr), entry) in registry.iter() {
            let keep = keys.contains(&(id.as_str(), *addr));
            if !keep && entry.in_rotation.swap(false, Relaxed) {
                info!(listener = %self.name, target = %id, %addr,
                      open = entry.active.load(Relaxed), "target removed; draining");
            }
        }
        let snapshot: Vec<Arc<TargetEntry>> = wanted
            .iter()
            .map(|t| {
                let entry = registry
                    .entry((t.id.clone(), t.addr))
                    .or_insert_with(|| {
                        info!(listener = %self.name, target = %t.id, addr = %t.addr, "target added");
                        Arc::new(TargetEntry::new((*t).clone()))
                    })
                    .clone();
                entry.in_rotation.store(true, Relaxed);
                entry
            })
            .collect();
        Self::prune(&mut registry);
        drop(registry);
        debug!(listener = %self.name, targets = snapshot.len(), "target set updated");
        snapshot.into()
    }

    /// Forgets removed targets nobody refers to any more. Only the registry, snapshots
    /// and connections hold entries, so a count of one means none of those uses it.
    fn prune(registry: &mut HashMap<(String, SocketAddr), Arc<TargetEntry>>) {
        registry.retain(|_, e| e.in_rotation.load(Relaxed) || Arc::strong_count(e) > 1);
    }

    fn open_connections(&self, target_id: &str) -> usize {
        self.registry()
            .iter()
            .filter(|((id, _), _)| id == target_id)
            .map(|(_, e)| e.active.load(Relaxed))
            .sum()
    }

    fn stats(&self) -> ListenerStats {
        let now = self.now_ms();
        let mut registry = self.registry();
        Self::prune(&mut registry);
        let mut targets: Vec<_> = registry.values().map(|e| e.snapshot(now)).collect();
        drop(registry);
        targets.sort_by(|a, b| a.id.cmp(&b.id).then(a.addr.cmp(&b.addr)));
        let c = &self.counters;
        ListenerStats {
            name: self.name.clone(),
            local_addr: self.local_addr,
            accepted: c.accepted.load(Relaxed),
            active: c.active.load(Relaxed),
            refused_over_limit: c.refused_over_limit.load(Relaxed),
            connect_failures: c.connect_failures.load(Relaxed),
            unrouted: c.unrouted.load(Relaxed),
            bytes_in: c.bytes_in.load(Relaxed),
            bytes_out: c.bytes_out.load(Relaxed),
            targets,
        }
    }
}

/// One client connection counted in `active`; released when its task ends.
pub(crate) struct ActiveSlot(Arc<Shared>);

impl Drop for ActiveSlot {
    fn drop(&mut self) {
        self.0.counters.active.fetch_sub(1, Relaxed);
    }
}

/// A running listener. Clones are handles to the same listener.
///
/// Dropping the last handle without [`Listener::shutdown`] stops accepting and releases
/// the port; open connections then run to completion.
#[derive(Clone, Debug)]
pub struct Listener {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    shutdown_grace: Duration,
    stop_accepting: CancellationToken,
    abort_connections: CancellationToken,
    connections: TaskTracker,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_accepting.cancel();
    }
}

impl Listener {
    /// Binds `cfg.listen` and starts accepting; `targets` is read at every accept.
    pub async fn bind(
        cfg: ListenerConfig,
        targets: watch::Receiver<Vec<Target>>,
    ) -> Result<Listener, LbError> {
        cfg.validate().map_err(|reason| LbError::InvalidConfig {
            name: cfg.name.clone(),
            reason,
        })?;
        let socket = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| LbError::Bind {
                name: cfg.name.clone(),
                addr: cfg.listen,
                source,
            })?;
        let local_addr = socket.local_addr().map_err(|source| LbError::LocalAddr {
            name: cfg.name.clone(),
            source,
        })?;
        let shared = Arc::new(Shared {
            name: cfg.name.clone(),
            local_addr,
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            policy: cfg.policy,
            epoch: Instant::now(),
            cursor: Default::default(),
            counters: Counters::default(),
            registry: Mutex::new(HashMap::new()),
        });
        let mut targets = targets;
        let snapshot = shared.rebuild(&targets.borrow_and_update());
        let stop_accepting = CancellationToken::new();
        let abort_connections = CancellationToken::new();
        let connections = TaskTracker::new();
        let accept = AcceptLoop {
            shared: shared.clone(),
            socket,
            targets,
            sender_gone: false,
            snapshot,
            max_connections: cfg.max_connections,
            stop: stop_accepting.clone(),
            abort: abort_connections.clone(),
            connections: connections.clone(),
            refused_log: RateLimit::default(),
            accept_error_log: RateLimit::default(),
        };
        let accept_task = tokio::spawn(accept.run());
        info!(listener = %cfg.name, addr = %local_addr, policy = ?cfg.policy, "listening");
        Ok(Listener {
            inner: Arc::new(Inner {
                shared,
                shutdown_grace: cfg.shutdown_grace,
                stop_accepting,
                abort_connections,
                connections,
                accept_task: Mutex::new(Some(accept_task)),
            }),
        })
    }

    /// The bound address (with the real port when the configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.shared.local_addr
    }

    /// Open proxied connections to the target with this id right now, including those of
    /// a removed target that is draining; 0 if the id is unknown.
    pub fn open_connections(&self, target_id: &str) -> usize {
        self.inner.shared.open_connections(target_id)
    }

    /// A snapshot of the listener's and each target's counters.
    pub fn stats(&self) -> ListenerStats {
        self.inner.shared.stats()
    }

    /// Stops accepting and releases the port, then lets open connections finish for up
    /// to `shutdown_grace` (see [`ListenerConfig`]); connections still open after that are
    /// aborted (both sockets closed). Returns when every connection task has ended.
    /// Affects every clone of this handle.
    pub async fn shutdown(self) {
        let inner = &self.inner;
        inner.stop_accepting.cancel();
        let accept_task = inner
            .accept_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = accept_task {
            if let Err(e) = task.await {
                warn!(listener = %inner.shared.name, error = %e, "accept loop ended abnormally");
            }
        }
        inner.connections.close();
        let open = inner.shared.counters.active.load(Relaxed);
        if open > 0 {
            info!(listener = %inner.shared.name, open, grace = ?inner.shutdown_grace,
                  "waiting for open connections to finish");
        }
        if tokio::time::timeout(inner.shutdown_grace, inner.connections.wait())
            .await
            .is_err()
        {
            warn!(listener = %inner.shared.name,
                  open = inner.shared.counters.active.load(Relaxed),
                  "shutdown grace elapsed; aborting open connections");
            inner.abort_connections.cancel();
            inner.connections.wait().await;
        }
        info!(listener = %inner.shared.name, "shut down");
    }
}

/// Lets a warning through at most once per [`LOG_EVERY`], counting the ones held back.
#[derive(Debug, Default)]
struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// `Some(suppressed since the last one)` when a warning may be logged now.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < LOG_EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

struct AcceptLoop {
    shared: Arc<Shared>,
    socket: TcpListener,
    targets: watch::Receiver<Vec<Target>>,
    /// The sender was dropped: the last target set stays in force.
    sender_gone: bool,
    snapshot: Snapshot,
    max_connections: usize,
    stop: CancellationToken,
    abort: CancellationToken,
    connections: TaskTracker,
    refused_log: RateLimit,
    accept_error_log: RateLimit,
}

impl AcceptLoop {
    async fn run(mut self) {
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                changed = self.targets.changed(), if !self.sender_gone => {
                    if changed.is_err() {
                        self.sender_gone = true;
                        debug!(listener = %self.shared.name,
                               "target sender dropped; keeping the last target set");
                    }
                    self.refresh();
                }
                accepted = self.socket.accept() => match accepted {
                    Ok((client, peer)) => self.admit(client, peer),
                    Err(e) => {
                        if let Some(suppressed) = self.accept_error_log.allow() {
                            warn!(listener = %self.shared.name, error = %e, suppressed,
                                  "accept failed");
                        }
                        tokio::select! {
                            _ = self.stop.cancelled() => break,
                            _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                        }
                    }
                },
            }
        }
        // Dropping `self.socket` here releases the port.
        debug!(listener = %self.shared.name, "accept loop stopped");
    }

    fn refresh(&mut self) {
        let targets = self.targets.borrow_and_update();
        self.snapshot = self.shared.rebuild(&targets);
    }

    fn admit(&mut self, client: TcpStream, peer: SocketAddr) {
        let counters = &self.shared.counters;
        counters.accepted.fetch_add(1, Relaxed);
        if counters.active.load(Relaxed) >= self.max_connections {
            counters.refused_over_limit.fetch_add(1, Relaxed);
            if let Some(suppressed) = self.refused_log.allow() {
                warn!(listener = %self.shared.name, %peer, max = self.max_connections,
                      suppressed, "connection limit reached; closing new connection");
            }
            drop(client);
            return;
        }
        counters.active.fetch_add(1, Relaxed);
        let slot = ActiveSlot(self.shared.clone());
        // A `send` that returned before this accept must be seen by this connection.
        match self.targets.has_changed() {
            Ok(true) => self.refresh(),
            Ok(false) => {}
            // Closed: `has_changed` no longer reports a final unseen value, so take it once.
            Err(_) if !self.sender_gone => {
                self.sender_gone = true;
                self.refresh();
            }
            Err(_) => {}
        }
        let task = conn::serve(
            self.shared.clone(),
            client,
            peer,
            self.snapshot.clone(),
            slot,
        );
        let abort = self.abort.clone();
        self.connections.spawn(async move {
            tokio::select! {
                _ = abort.cancelled() => debug!(%peer, "connection aborted by shutdown"),
                _ = task => {}
            }
        });
    }
}
