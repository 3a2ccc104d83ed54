//! A running listener: binding, the accept loop, the target registry and shutdown.

use std::collections::{HashMap, HashSet};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{HealthCheckConfig, ListenerConfig, Policy, Target};
use crate::conn;
use crate::error::LbError;
use crate::health;
use crate::signal::{Armed, Signal};
use crate::stats::{Counters, ListenerStats, TargetEntry};

/// How long a target whose connect failed is left out of selection (unless it is the only
/// one left).
pub(crate) const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Shortest interval between two warnings about refused or failed accepts.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Failed connects to targets are logged at most once per this (the first at once, then one
/// line with how many were held back): a target that is down cannot flood the log.
pub(crate) const CONNECT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Pending connections the kernel queues before the accept loop takes them (tokio's and
/// std's `bind` use the same).
const LISTEN_BACKLOG: u32 = 1024;

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
    /// Fired to stop accepting (shutdown, or the last handle dropped).
    pub(crate) stop: Signal,
    /// Fired when the shutdown grace has elapsed: open connections are dropped.
    pub(crate) abort: Signal,
    health: Option<HealthCheckConfig>,
    /// Parent of every checker's token; cancelled when the listener stops.
    checks: CancellationToken,
    /// The health checkers' tasks, awaited by the shutdown.
    checkers: TaskTracker,
    /// Every target in rotation, plus removed ones still referenced by a connection,
    /// keyed by (id, addr). Locked only on target-set changes and by stats queries.
    registry: Mutex<Registry>,
    /// Failed connects to targets, logged at most once per [`CONNECT_LOG_EVERY`].
    connect_log: Mutex<drover_model::lograte::LogRate>,
}

type Registry = HashMap<(String, SocketAddr), Registered>;

#[derive(Debug)]
struct Registered {
    entry: Arc<TargetEntry>,
    /// Stops the target's health checker when dropped (or replaced by `None`).
    checker: Option<DropGuard>,
}

impl Shared {
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A failed connect to a target: `Some(failures held back since the last line)` when it
    /// is to be logged.
    pub(crate) fn connect_failed(&self) -> Option<u64> {
        self.connect_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failed(std::time::Instant::now())
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
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
        for ((id, addr), reg) in registry.iter_mut() {
            if keys.contains(&(id.as_str(), *addr)) {
                continue;
            }
            reg.checker = None;
            if reg.entry.in_rotation.swap(false, SeqCst) {
                info!(listener = %self.name, target = %id, %addr,
                      open = reg.entry.active.load(Relaxed), "target removed; draining");
            }
        }
        let snapshot: Vec<Arc<TargetEntry>> = wanted
            .iter()
            .map(|t| {
                let reg = registry.entry((t.id.clone(), t.addr)).or_insert_with(|| {
                    info!(listener = %self.name, target = %t.id, addr = %t.addr, "target added");
                    Registered {
                        entry: Arc::new(TargetEntry::new((*t).clone())),
                        checker: None,
                    }
                });
                reg.entry.in_rotation.store(true, Relaxed);
                if let (None, Some(cfg)) = (&reg.checker, &self.health) {
                    reg.checker = Some(self.start_checker(&reg.entry, cfg));
                }
                reg.entry.clone()
            })
            .collect();
        self.prune(&mut registry);
        drop(registry);
        debug!(listener = %self.name, targets = snapshot.len(), "target set updated");
        snapshot.into()
    }

    /// Spawns the health checker of one target in rotation; it stops when the returned
    /// guard is dropped, when the listener stops, or when the entry is gone.
    fn start_checker(&self, entry: &Arc<TargetEntry>, cfg: &HealthCheckConfig) -> DropGuard {
        let token = self.checks.child_token();
        self.checkers.spawn(health::run_checker(
            self.name.clone(),
            Arc::downgrade(entry),
            cfg.clone(),
            token.clone(),
        ));
        token.drop_guard()
    }

    /// Forgets removed targets nobody refers to any more. Only the registry, snapshots
    /// and connections hold entries (checkers hold weak references), so a count of one
    /// means none of those uses it. Their bytes move to the listener's retired counters.
    fn prune(&self, registry: &mut Registry) {
        registry.retain(|_, r| {
            let keep = r.entry.in_rotation.load(Relaxed) || Arc::strong_count(&r.entry) > 1;
            if !keep {
                let c = &self.counters;
                c.bytes_in
                    .fetch_add(r.entry.bytes_in.load(Relaxed), Relaxed);
                c.bytes_out
                    .fetch_add(r.entry.bytes_out.load(Relaxed), Relaxed);
            }
            keep
        });
    }

    fn open_connections(&self, target_id: &str) -> usize {
        self.registry()
            .iter()
            .filter(|((id, _), _)| id == target_id)
            .map(|(_, r)| r.entry.open())
            .sum()
    }

    fn stats(&self) -> ListenerStats {
        let now = self.now_ms();
        let mut registry = self.registry();
        self.prune(&mut registry);
        let mut targets: Vec<_> = registry.values().map(|r| r.entry.snapshot(now)).collect();
        // Bytes are counted per target only (one atomic per read, not two); the listener's
        // are its targets' plus those of targets forgotten since, summed under the lock.
        let c = &self.counters;
        let bytes_in = c.bytes_in.load(Relaxed) + targets.iter().map(|t| t.bytes_in).sum::<u64>();
        let bytes_out =
            c.bytes_out.load(Relaxed) + targets.iter().map(|t| t.bytes_out).sum::<u64>();
        drop(registry);
        targets.sort_by(|a, b| a.id.cmp(&b.id).then(a.addr.cmp(&b.addr)));
        ListenerStats {
            name: self.name.clone(),
            local_addr: self.local_addr,
            accepted: c.accepted.load(Relaxed),
            active: c.active.load(Relaxed),
            refused_over_limit: c.refused_over_limit.load(Relaxed),
            connect_failures: c.connect_failures.load(Relaxed),
            unrouted: c.unrouted.load(Relaxed),
            bytes_in,
            bytes_out,
            targets,
        }
    }
}

/// One client connection counted in `active`; released when its task ends. It also
/// carries the connection task's reference to the listener's shared state.
pub(crate) struct ActiveSlot(pub(crate) Arc<Shared>);

impl Drop for ActiveSlot {
    fn drop(&mut self) {
        self.0.counters.active.fetch_sub(1, Relaxed);
    }
}

/// A running listener. Clones are handles to the same listener.
///
/// Dropping the last handle without [`Listener::shutdown`] stops accepting, stops the
/// health checks and releases the port; open connections then run to completion.
#[derive(Clone, Debug)]
pub struct Listener {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    /// The listening socket, owned by the accept loop until shutdown.
    #[cfg(unix)]
    raw_fd: std::os::fd::RawFd,
    shutdown_grace: Duration,
    connections: TaskTracker,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stop.fire();
        self.shared.checks.cancel();
    }
}

impl Listener {
    /// Binds `cfg.listen` and starts accepting; `targets` is read at every accept. With
    /// `cfg.health`, each target in rotation gets a health checker.
    pub async fn bind(
        cfg: ListenerConfig,
        targets: watch::Receiver<Vec<Target>>,
    ) -> Result<Listener, LbError> {
        cfg.validate().map_err(|reason| LbError::InvalidConfig {
            name: cfg.name.clone(),
            reason,
        })?;
        let socket = bind_socket(cfg.listen).map_err(|source| LbError::Bind {
            name: cfg.name.clone(),
            addr: cfg.listen,
            source,
        })?;
        Self::start(cfg, socket, targets)
    }

    /// Like [`Listener::bind`], on a socket that is already bound and listening: one handed
    /// over by another process (see [`crate::handoff`]) or [`Listener::clone_socket`] of a
    /// listener being replaced. Connections the kernel queued on it are accepted here.
    /// `cfg.listen` is ignored; the socket's own address is used.
    pub fn adopt(
        cfg: ListenerConfig,
        socket: std::net::TcpListener,
        targets: watch::Receiver<Vec<Target>>,
    ) -> Result<Listener, LbError> {
        cfg.validate().map_err(|reason| LbError::InvalidConfig {
            name: cfg.name.clone(),
            reason,
        })?;
        let addr = socket.local_addr().unwrap_or(cfg.listen);
        let bind_err = |source| LbError::Bind {
            name: cfg.name.clone(),
            addr,
            source,
        };
        socket.set_nonblocking(true).map_err(bind_err)?;
        let socket = TcpListener::from_std(socket).map_err(bind_err)?;
        Self::start(cfg, socket, targets)
    }

    fn start(
        cfg: ListenerConfig,
        socket: TcpListener,
        targets: watch::Receiver<Vec<Target>>,
    ) -> Result<Listener, LbError> {
        #[cfg(unix)]
        let raw_fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
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
            stop: Signal::new(),
            abort: Signal::new(),
            health: cfg.health.clone(),
            checks: CancellationToken::new(),
            checkers: TaskTracker::new(),
            registry: Mutex::new(HashMap::new()),
            connect_log: Mutex::new(drover_model::lograte::LogRate::new(CONNECT_LOG_EVERY)),
        });
        let mut targets = targets;
        let snapshot = shared.rebuild(&targets.borrow_and_update());
        let connections = TaskTracker::new();
        let accept = AcceptLoop {
            shared: shared.clone(),
            socket,
            targets,
            sender_gone: false,
            change_wait: None,
            change_waker: None,
            pause: None,
            snapshot,
            max_connections: cfg.max_connections,
            connections: connections.clone(),
            refused_log: RateLimit::default(),
            accept_error_log: RateLimit::default(),
            nodelay_inherited: None,
        };
        let accept_task = tokio::spawn(accept.run());
        info!(listener = %cfg.name, addr = %local_addr, policy = ?cfg.policy,
              health = ?cfg.health, "listening");
        Ok(Listener {
            inner: Arc::new(Inner {
                shared,
                #[cfg(unix)]
                raw_fd,
                shutdown_grace: cfg.shutdown_grace,
                connections,
                accept_task: Mutex::new(Some(accept_task)),
            }),
        })
    }

    /// The bound address (with the real port when the configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.shared.local_addr
    }

    /// Open proxied connections to the target with this id right now, and attempts to
    /// connect to it under way, including those of a removed target that is draining; 0 if
    /// the id is unknown. Read after an update removed the target, it counts every
    /// connection that may still reach it (see `conn::connect_any`).
    pub fn open_connections(&self, target_id: &str) -> usize {
        self.inner.shared.open_connections(target_id)
    }

    /// A snapshot of the listener's and each target's counters and health.
    pub fn stats(&self) -> ListenerStats {
        self.inner.shared.stats()
    }

    /// Stops accepting and health checking and releases the port, then lets open
    /// connections finish for up to `shutdown_grace` (see [`ListenerConfig`]); connections
    /// still open after that are aborted (both sockets closed). Returns when every
    /// connection task has ended. Affects every clone of this handle.
    pub async fn shutdown(self) {
        let grace = self.inner.shutdown_grace;
        self.shutdown_within(grace).await
    }

    /// A second handle on the listening socket (`dup`), to hand to another process or to a
    /// listener that replaces this one: the socket, and the connections queued on it, live
    /// on while either is open. Fails once [`Listener::shutdown`] has begun.
    #[cfg(unix)]
    pub fn clone_socket(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        if self.inner.shared.stop.is_fired() {
            return Err(std::io::Error::other("the listener is shutting down"));
        }
        // SAFETY: the accept loop owns this fd and keeps it open until `stop` fires, which
        // (checked above) it has not; only `shutdown` fires it, and it takes `self`.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.inner.raw_fd) };
        fd.try_clone_to_owned()
    }

    /// [`Listener::shutdown`] with its own grace instead of `shutdown_grace` (a handover
    /// lets old connections run longer than a stop does).
    pub async fn shutdown_within(self, grace: Duration) {
        let inner = &self.inner;
        inner.shared.stop.fire();
        inner.shared.checks.cancel();
        inner.shared.checkers.close();
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
        // Cancelled above: each ends at its next await.
        inner.shared.checkers.wait().await;
        inner.connections.close();
        let open = inner.shared.counters.active.load(Relaxed);
        if open > 0 {
            info!(listener = %inner.shared.name, open, grace = ?grace,
                  "waiting for open connections to finish");
        }
        if tokio::time::timeout(grace, inner.connections.wait())
            .await
            .is_err()
        {
            warn!(listener = %inner.shared.name,
                  open = inner.shared.counters.active.load(Relaxed),
                  "shutdown grace elapsed; aborting open connections");
            inner.shared.abort.fire();
            inner.connections.wait().await;
        }
        info!(listener = %inner.shared.name, "shut down");
    }
}

/// Binds and listens like `TcpListener::bind` (`SO_REUSEADDR`, backlog 1024), with
/// `TCP_NODELAY` set on the listening socket: accepted sockets inherit it (Linux and the
/// BSDs), which saves a `setsockopt` per connection. [`AcceptLoop::admit`] checks the first
/// accepted socket and sets it per connection where it is not inherited.
fn bind_socket(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Lets a warning through at most once per [`LOG_EVERY`], counting the ones held back.
#[derive(Debug)]
struct RateLimit(drover_model::lograte::LogRate);

impl Default for RateLimit {
    fn default() -> RateLimit {
        RateLimit(drover_model::lograte::LogRate::new(LOG_EVERY))
    }
}

impl RateLimit {
    /// `Some(suppressed since the last one)` when a warning may be logged now.
    fn allow(&mut self) -> Option<u64> {
        self.0.failed(std::time::Instant::now())
    }
}

/// Wakes the accept loop when the target set changes; allocated once per change.
type ChangeWait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The accept loop, written as one poll function so that a pass through it takes no lock:
/// the stop signal and the target channel are waited on through wakers registered once,
/// and otherwise checked with atomic loads (see [`crate::signal`]).
struct AcceptLoop {
    shared: Arc<Shared>,
    socket: TcpListener,
    targets: watch::Receiver<Vec<Target>>,
    /// The sender was dropped: the last target set stays in force.
    sender_gone: bool,
    /// Resolves when the target set changes after the last refresh; `None` until armed.
    change_wait: Option<ChangeWait>,
    /// The waker `change_wait` was last polled with.
    change_waker: Option<Waker>,
    /// Set after an accept error (e.g. out of file descriptors) so the loop does not spin.
    pause: Option<Pin<Box<Sleep>>>,
    snapshot: Snapshot,
    max_connections: usize,
    connections: TaskTracker,
    refused_log: RateLimit,
    accept_error_log: RateLimit,
    /// Whether accepted sockets inherit the listening socket's `TCP_NODELAY`: `None` until
    /// the first one is checked (see [`bind_socket`]).
    nodelay_inherited: Option<bool>,
}

impl AcceptLoop {
    async fn run(mut self) {
        let shared = self.shared.clone();
        let stop = shared.stop.notified(0);
        tokio::pin!(stop);
        let mut stop_armed = Armed::default();
        poll_fn(|cx| {
            if stop_armed.poll(&shared.stop, stop.as_mut(), cx).is_ready() {
                return Poll::Ready(());
            }
            self.poll_accept(cx)
        })
        .await;
        // Dropping `self.socket` here releases the port.
        debug!(listener = %self.shared.name, "accept loop stopped");
    }

    /// Accepts until the socket has nothing more (or the task's budget is spent); Ready
    /// only when the stop signal fired meanwhile.
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.watch_targets(cx);
        loop {
            if let Some(pause) = &mut self.pause {
                std::task::ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            match self.socket.poll_accept(cx) {
                Poll::Ready(Ok((client, peer))) => self.admit(client, peer),
                Poll::Ready(Err(e)) => {
                    if let Some(suppressed) = self.accept_error_log.allow() {
                        warn!(listener = %self.shared.name, error = %e, suppressed,
                              "accept failed");
                    }
                    self.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
                }
                Poll::Pending => return Poll::Pending,
            }
            if self.shared.stop.is_fired() {
                return Poll::Ready(());
            }
        }
    }

    /// Takes a new target set if one was sent, and makes sure the next change wakes
    /// this task even when no client arrives (so checkers start and stop promptly).
    fn watch_targets(&mut self, cx: &mut Context<'_>) {
        self.take_new_targets();
        if self.sender_gone {
            return;
        }
        let armed = self.change_wait.is_some()
            && self
                .change_waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()));
        if armed {
            return;
        }
        let wait = self.change_wait.get_or_insert_with(|| {
            let mut rx = self.targets.clone();
            Box::pin(async move {
                // An error means the sender is gone, which `take_new_targets` sees too.
                let _ = rx.changed().await;
            })
        });
        if wait.as_mut().poll(cx).is_ready() {
            // Changed between the check above and now: take it on the next pass.
            self.change_wait = None;
            self.change_waker = None;
            cx.waker().wake_by_ref();
            return;
        }
        self.change_waker = Some(cx.waker().clone());
    }

    /// One atomic load when nothing changed.
    fn take_new_targets(&mut self) {
        match self.targets.has_changed() {
            Ok(false) => return,
            Ok(true) => {}
            // Closed: `has_changed` no longer reports a final unseen value, so take it once.
            Err(_) if !self.sender_gone => {
                self.sender_gone = true;
                debug!(listener = %self.shared.name,
                       "target sender dropped; keeping the last target set");
            }
            Err(_) => return,
        }
        let targets = self.targets.borrow_and_update();
        self.snapshot = self.shared.rebuild(&targets);
        drop(targets);
        // The armed wait compares against the old version; arm a new one.
        self.change_wait = None;
        self.change_waker = None;
    }

    /// Makes sure `TCP_NODELAY` is on for an accepted client socket: one `getsockopt` on
    /// the listener's first connection, then nothing where the option is inherited.
    fn set_nodelay(&mut self, client: &TcpStream, peer: SocketAddr) {
        let inherited = *self
            .nodelay_inherited
            .get_or_insert_with(|| client.nodelay().unwrap_or(false));
        if inherited {
            return;
        }
        if let Err(e) = client.set_nodelay(true) {
            debug!(listener = %self.shared.name, %peer, error = %e,
                   "cannot set TCP_NODELAY on client");
        }
    }

    fn admit(&mut self, client: TcpStream, peer: SocketAddr) {
        let counters = &self.shared.counters;
        let n = counters.accepted.fetch_add(1, Relaxed);
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
        self.set_nodelay(&client, peer);
        // A `send` that returned before this accept must be seen by this connection.
        self.take_new_targets();
        let shard = usize::try_from(n).unwrap_or_default();
        self.connections
            .spawn(conn::run(slot, client, peer, self.snapshot.clone(), shard));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_tcp_nodelay_from_the_listener() {
        let listener = bind_socket("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(accepted.nodelay().expect("getsockopt"));
        // Not a property of new sockets in general.
        assert!(!client.nodelay().expect("getsockopt"));
    }
}
