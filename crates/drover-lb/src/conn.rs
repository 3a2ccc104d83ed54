//! One client connection: choose a target, connect (moving on to the next target on
//! failure), then copy bytes both ways until both sides close or the connection idles out.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::listener::{ActiveSlot, Shared, Snapshot, FAILURE_PENALTY};
use crate::select::{select_target, Candidate};
use crate::stats::TargetEntry;

/// Copy buffer, client to target. 16 KiB matches HAProxy's default `tune.bufsize`:
/// large enough that a bulk upload moves in few syscalls, small enough that
/// `max_connections` (10 000 by default) open connections stay within a few hundred MB.
pub(crate) const CLIENT_TO_TARGET_BUF: usize = 16 * 1024;

/// Copy buffer, target to client; the same reasoning as [`CLIENT_TO_TARGET_BUF`].
pub(crate) const TARGET_TO_CLIENT_BUF: usize = 16 * 1024;

/// Serves one accepted client connection until it ends. `_slot` keeps it counted in the
/// listener's `active` for its whole life.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    snapshot: Snapshot,
    _slot: ActiveSlot,
) {
    if let Err(e) = client.set_nodelay(true) {
        debug!(listener = %shared.name, %peer, error = %e, "cannot set TCP_NODELAY on client");
    }
    let Some((backend, connected)) = connect_any(&shared, &snapshot).await else {
        shared.counters.unrouted.fetch_add(1, Relaxed);
        debug!(listener = %shared.name, %peer, targets = snapshot.len(),
               "no target could take the connection; closing it");
        return; // dropping `client` closes it
    };
    drop(snapshot);
    let entry = &connected.0;
    if let Err(e) = backend.set_nodelay(true) {
        debug!(listener = %shared.name, target = %entry.target.id, error = %e,
               "cannot set TCP_NODELAY on target connection");
    }
    proxy(&shared, client, backend, entry, peer).await;
}

/// Counts one unit in a target's `active` or `pending` while alive.
struct Held<'a>(&'a AtomicUsize);

impl<'a> Held<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Relaxed);
        Held(counter)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// An established proxied connection, counted in its target's `active` until dropped.
struct Connected(Arc<TargetEntry>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// Tries targets in policy order, each at most once, until one accepts. Failures are
/// counted and penalize the target. Targets removed since accept are not tried.
async fn connect_any(
    shared: &Shared,
    snapshot: &[Arc<TargetEntry>],
) -> Option<(TcpStream, Connected)> {
    let cursor = shared.cursor.fetch_add(1, Relaxed);
    let mut tried = vec![false; snapshot.len()];
    loop {
        let now = shared.now_ms();
        let candidates: Vec<Candidate> = snapshot
            .iter()
            .zip(&tried)
            .map(|(e, &tried)| Candidate {
                active: e.active.load(Relaxed) + e.pending.load(Relaxed),
                penalized: e.is_penalized(now),
                excluded: tried || !e.in_rotation.load(Relaxed),
            })
            .collect();
        let i = select_target(shared.policy, &candidates, cursor)?;
        tried[i] = true;
        let entry = &snapshot[i];
        let pending = Held::new(&entry.pending);
        let attempt = tokio::time::timeout(
            shared.connect_timeout,
            TcpStream::connect(entry.target.addr),
        )
        .await;
        let error = match attempt {
            Ok(Ok(stream)) => {
                entry.active.fetch_add(1, Relaxed);
                entry.total.fetch_add(1, Relaxed);
                drop(pending);
                return Some((stream, Connected(entry.clone())));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("timed out after {:?}", shared.connect_timeout),
        };
        drop(pending);
        entry.connect_failures.fetch_add(1, Relaxed);
        shared.counters.connect_failures.fetch_add(1, Relaxed);
        let until = shared
            .now_ms()
            .saturating_add(u64::try_from(FAILURE_PENALTY.as_millis()).unwrap_or(u64::MAX));
        entry.penalized_until_ms.store(until, Relaxed);
        warn!(listener = %shared.name, target = %entry.target.id, addr = %entry.target.addr,
              %error, "connect to target failed; trying the next one");
    }
}

/// Copies both ways with half-close propagation (a side's EOF shuts down writing on the
/// other), counting bytes as they are read, and closes the pair after `idle_timeout`
/// without a byte in either direction.
async fn proxy(
    shared: &Shared,
    client: TcpStream,
    backend: TcpStream,
    entry: &TargetEntry,
    peer: SocketAddr,
) {
    let last_activity = AtomicU64::new(shared.now_ms());
    let mut client = Metered {
        io: client,
        counters: [&shared.counters.bytes_in, &entry.bytes_in],
        last_activity: &last_activity,
        epoch: shared.epoch,
    };
    let mut backend = Metered {
        io: backend,
        counters: [&shared.counters.bytes_out, &entry.bytes_out],
        last_activity: &last_activity,
        epoch: shared.epoch,
    };
    let target = &entry.target.id;
    tokio::select! {
        copied = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut backend,
            CLIENT_TO_TARGET_BUF,
            TARGET_TO_CLIENT_BUF,
        ) => match copied {
            Ok((up, down)) => debug!(listener = %shared.name, %peer, %target, up, down,
                                     "connection closed"),
            Err(e) => debug!(listener = %shared.name, %peer, %target, error = %e,
                             "connection ended with an error"),
        },
        () = idle(&last_activity, shared.epoch, shared.idle_timeout) => {
            debug!(listener = %shared.name, %peer, %target, timeout = ?shared.idle_timeout,
                   "idle timeout; closing connection");
        }
    }
}

/// Resolves once `idle_timeout` has passed since the last recorded activity.
async fn idle(last_activity: &AtomicU64, epoch: Instant, idle_timeout: Duration) {
    loop {
        let last = Duration::from_millis(last_activity.load(Relaxed));
        let deadline = epoch + last + idle_timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// A stream that counts the bytes read from it and stamps the pair's last activity.
struct Metered<'a, S> {
    io: S,
    counters: [&'a AtomicU64; 2],
    last_activity: &'a AtomicU64,
    epoch: Instant,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            for counter in this.counters {
                counter.fetch_add(n as u64, Relaxed);
            }
            let now = u64::try_from(this.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            this.last_activity.store(now, Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
