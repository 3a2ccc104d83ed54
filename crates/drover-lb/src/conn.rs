//! One client connection: choose a target, connect (moving on to the next target on
//! failure), then copy bytes both ways until both sides close or the connection idles out.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tracing::{debug, warn};

use crate::listener::{ActiveSlot, Shared, Snapshot, FAILURE_PENALTY};
use crate::select::{select_by, Candidate};
use crate::signal::Armed;
use crate::stats::TargetEntry;

/// Largest read, in both directions. 16 KiB is HAProxy's default `tune.bufsize`: a bulk
/// transfer moves in few syscalls, and a connection whose writer pushes back holds at
/// most this much per direction (see [`Flow`]), so `max_connections` (10 000 by default)
/// connections stay within a few hundred MB even when all are stalled.
const COPY_BUF: usize = 16 * 1024;

/// The task of one accepted client connection: serves it until it ends or the listener
/// aborts its connections. `slot` keeps it counted in the listener's `active` for its
/// whole life. `shard` spreads the abort waiters (see [`crate::signal`]).
pub(crate) async fn run(
    slot: ActiveSlot,
    client: TcpStream,
    peer: SocketAddr,
    snapshot: Snapshot,
    shard: usize,
) {
    let shared = &*slot.0;
    let abort = shared.abort.notified(shard);
    tokio::pin!(abort);
    let mut armed = Armed::default();
    let work = serve(shared, client, peer, snapshot);
    tokio::pin!(work);
    poll_fn(|cx| {
        if armed.poll(&shared.abort, abort.as_mut(), cx).is_ready() {
            debug!(listener = %shared.name, %peer, "connection aborted by shutdown");
            return Poll::Ready(());
        }
        work.as_mut().poll(cx)
    })
    .await;
}

async fn serve(shared: &Shared, client: TcpStream, peer: SocketAddr, snapshot: Snapshot) {
    // One timer for the connection's whole life: the connect timeout, then the idle
    // timeout. Each timer registered or cancelled takes tokio's timer lock, and one that
    // becomes the runtime's earliest wakes its driver (a syscall); a connection's timer,
    // kept from its start, is almost never the earliest while other connections are open.
    let timer = tokio::time::sleep(shared.connect_timeout);
    tokio::pin!(timer);
    let Some((backend, connected)) = connect_any(shared, &snapshot, timer.as_mut()).await else {
        shared.counters.unrouted.fetch_add(1, Relaxed);
        debug!(listener = %shared.name, %peer, targets = snapshot.len(),
               "no target could take the connection; closing it");
        return; // dropping `client` closes it
    };
    drop(snapshot);
    let entry = &connected.0;
    proxy(shared, client, backend, entry, peer, timer).await;
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

/// The targets already tried for one client connection: a bit set on the stack for up
/// to 128 targets, a vector beyond.
struct Tried {
    small: u128,
    large: Vec<bool>,
}

impl Tried {
    fn new(len: usize) -> Self {
        let large = if len > 128 {
            vec![false; len]
        } else {
            Vec::new()
        };
        Tried { small: 0, large }
    }

    fn contains(&self, i: usize) -> bool {
        match self.large.get(i) {
            Some(&tried) => tried,
            None => self.small & (1 << i) != 0,
        }
    }

    fn insert(&mut self, i: usize) {
        match self.large.get_mut(i) {
            Some(tried) => *tried = true,
            None => self.small |= 1 << i,
        }
    }
}

/// Tries targets in policy order, each at most once, until one accepts. Failures are
/// counted and penalize the target. Targets removed since accept, or down by their health
/// checks, are not tried. Allocates nothing for up to 128 targets.
async fn connect_any(
    shared: &Shared,
    snapshot: &[Arc<TargetEntry>],
    mut timer: Pin<&mut Sleep>,
) -> Option<(TcpStream, Connected)> {
    let cursor = shared.cursor.fetch_add(1, Relaxed);
    let mut tried = Tried::new(snapshot.len());
    let mut first = true;
    loop {
        let now = shared.now_ms();
        let i = select_by(shared.policy, snapshot.len(), cursor, |i| {
            let e = &snapshot[i];
            Candidate {
                active: e.active.load(Relaxed) + e.pending.load(Relaxed),
                penalized: e.is_penalized(now),
                excluded: tried.contains(i) || !e.in_rotation.load(Relaxed) || !e.up.load(Relaxed),
            }
        })?;
        tried.insert(i);
        let entry = &snapshot[i];
        if !std::mem::take(&mut first) {
            timer
                .as_mut()
                .reset(Instant::now() + shared.connect_timeout);
        }
        let pending = Held::new(&entry.pending);
        let attempt = tokio::select! {
            biased;
            connected = connect(entry.target.addr) => Ok(connected),
            () = timer.as_mut() => Err(()),
        };
        drop(pending);
        match attempt {
            Ok(Ok(stream)) => {
                entry.active.fetch_add(1, Relaxed);
                entry.total.fetch_add(1, Relaxed);
                return Some((stream, Connected(entry.clone())));
            }
            Ok(Err(error)) => {
                warn!(listener = %shared.name, target = %entry.target.id,
                      addr = %entry.target.addr, %error,
                      "connect to target failed; trying the next one");
            }
            Err(_) => {
                warn!(listener = %shared.name, target = %entry.target.id,
                      addr = %entry.target.addr, timeout = ?shared.connect_timeout,
                      "connect to target timed out; trying the next one");
            }
        }
        entry.connect_failures.fetch_add(1, Relaxed);
        shared.counters.connect_failures.fetch_add(1, Relaxed);
        let until = shared
            .now_ms()
            .saturating_add(u64::try_from(FAILURE_PENALTY.as_millis()).unwrap_or(u64::MAX));
        entry.penalized_until_ms.store(until, Relaxed);
    }
}

/// Opens a connection to a target in four syscalls: `socket` (non-blocking, close-on-exec),
/// `setsockopt(TCP_NODELAY)`, `connect`, and the `epoll_ctl` that registers the socket.
///
/// The outcome is read from the readiness epoll reports, as HAProxy does: writable without
/// an error or hang-up is established. `TcpStream::connect` would also ask the socket for
/// its error (`getsockopt(SO_ERROR)`) after every connect; here that happens only when
/// epoll reported a failure, to tell which.
async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if let Err(e) = socket.set_tcp_nodelay(true) {
        debug!(%addr, error = %e, "cannot set TCP_NODELAY on target connection");
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed while connecting",
            )
        }));
    }
    Ok(stream)
}

/// Copies both ways until both sides have closed (a side's EOF shuts down writing on the
/// other, so half-closed connections work), a side fails, or nothing moved in either
/// direction for `idle_timeout`.
async fn proxy(
    shared: &Shared,
    mut client: TcpStream,
    mut backend: TcpStream,
    entry: &TargetEntry,
    peer: SocketAddr,
    mut idle: Pin<&mut Sleep>,
) {
    let idle_timeout = shared.idle_timeout;
    let mut last_activity = Instant::now();
    // The timer still holds the connect deadline. Firing before the idle deadline only
    // re-arms it (below); firing after would close an idle connection late, so pull it in.
    if last_activity + idle_timeout < idle.deadline() {
        idle.as_mut().reset(last_activity + idle_timeout);
    }
    let mut up = Flow::default();
    let mut down = Flow::default();
    let outcome = poll_fn(|cx| {
        let mut moved = false;
        let copied = poll_both(
            cx,
            &mut up,
            &mut down,
            &mut client,
            &mut backend,
            entry,
            &mut moved,
        );
        if moved {
            last_activity = Instant::now();
        }
        if let Poll::Ready(result) = copied {
            return Poll::Ready(Some(result));
        }
        // The timer is re-armed only when it fires, not on every byte.
        while idle.as_mut().poll(cx).is_ready() {
            let deadline = last_activity + idle_timeout;
            if deadline <= idle.deadline() {
                return Poll::Ready(None);
            }
            idle.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await;
    let target = &entry.target.id;
    let (up, down) = (up.bytes, down.bytes);
    match outcome {
        Some(Ok(())) => debug!(listener = %shared.name, %peer, %target, up, down,
                               "connection closed"),
        Some(Err(e)) => debug!(listener = %shared.name, %peer, %target, up, down, error = %e,
                               "connection ended with an error"),
        None => debug!(listener = %shared.name, %peer, %target, up, down,
                       timeout = ?idle_timeout, "idle timeout; closing connection"),
    }
}

/// Moves whatever can move in both directions; Ready when both are done or one failed.
fn poll_both(
    cx: &mut Context<'_>,
    up: &mut Flow,
    down: &mut Flow,
    client: &mut TcpStream,
    backend: &mut TcpStream,
    entry: &TargetEntry,
    moved: &mut bool,
) -> Poll<io::Result<()>> {
    if !up.is_done() {
        if let Poll::Ready(Err(e)) =
            up.poll(cx, client, backend, down.is_done(), &entry.bytes_in, moved)
        {
            return Poll::Ready(Err(e));
        }
    }
    if !down.is_done() {
        if let Poll::Ready(Err(e)) =
            down.poll(cx, backend, client, up.is_done(), &entry.bytes_out, moved)
        {
            return Poll::Ready(Err(e));
        }
    }
    if up.is_done() && down.is_done() {
        Poll::Ready(Ok(()))
    } else {
        Poll::Pending
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum FlowState {
    #[default]
    Open,
    /// The reader sent EOF; what is spilled still goes out, then the writer is shut down.
    Eof,
    Done,
}

/// One direction of a proxied connection.
///
/// Bytes are read into a buffer on the stack of the poll and written on at once; only what
/// the writer does not take (it pushes back) is copied into `spill`, allocated the first
/// time that happens and kept for the connection's life. A connection that never meets
/// back-pressure (most request/response traffic) holds no copy buffer at all, and an idle
/// connection costs no buffer memory.
#[derive(Debug, Default)]
struct Flow {
    spill: Option<Box<[u8]>>,
    /// `spill[start..end]` is still to be written.
    start: usize,
    end: usize,
    state: FlowState,
    /// Bytes read from this direction's reader.
    bytes: u64,
}

impl Flow {
    fn is_done(&self) -> bool {
        self.state == FlowState::Done
    }

    /// Copies `from` to `to` until one of them is not ready (Pending), or this direction
    /// is done (Ready(Ok)), or fails. `other_done`: the opposite direction is done, so both
    /// sockets are closed as soon as this one is; then `to` is not shut down first (closing
    /// it sends the same FIN, one syscall fewer).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut TcpStream,
        to: &mut TcpStream,
        other_done: bool,
        counter: &AtomicU64,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(spill) = &self.spill {
                while self.start < self.end {
                    let n =
                        ready!(Pin::new(&mut *to).poll_write(cx, &spill[self.start..self.end]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.start += n;
                    *moved = true;
                }
            }
            match self.state {
                FlowState::Open => {}
                FlowState::Eof => {
                    if !other_done {
                        ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                    }
                    self.state = FlowState::Done;
                    return Poll::Ready(Ok(()));
                }
                FlowState::Done => return Poll::Ready(Ok(())),
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); COPY_BUF];
            let mut buf = ReadBuf::uninit(&mut stack);
            ready!(Pin::new(&mut *from).poll_read(cx, &mut buf))?;
            let data = buf.filled();
            if data.is_empty() {
                self.state = FlowState::Eof;
                continue;
            }
            counter.fetch_add(data.len() as u64, Relaxed);
            self.bytes += data.len() as u64;
            *moved = true;
            let written = match Pin::new(&mut *to).poll_write(cx, data) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => 0,
            };
            if written < data.len() {
                let rest = &data[written..];
                let spill = self
                    .spill
                    .get_or_insert_with(|| vec![0; COPY_BUF].into_boxed_slice());
                spill[..rest.len()].copy_from_slice(rest);
                self.start = 0;
                self.end = rest.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Tried;

    #[test]
    fn tried_targets_are_remembered_on_the_stack_and_beyond() {
        for len in [1, 3, 128, 129, 1000] {
            let mut tried = Tried::new(len);
            assert_eq!(tried.large.is_empty(), len <= 128);
            let picks: Vec<usize> = (0..len).filter(|i| i % 3 == 0 || i + 1 == len).collect();
            for &i in &picks {
                assert!(!tried.contains(i));
                tried.insert(i);
            }
            for i in 0..len {
                assert_eq!(
                    tried.contains(i),
                    picks.contains(&i),
                    "len {len}, index {i}"
                );
            }
        }
    }
}
