//! One client connection: choose a target, connect (moving on to the next target on
//! failure), then copy bytes both ways until both sides close or the connection idles out.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
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

async fn serve(shared: &Shared, mut client: TcpStream, peer: SocketAddr, snapshot: Snapshot) {
    // One timer for the connection's whole life: the connect timeout, then the idle
    // timeout. Each timer registered or cancelled takes tokio's timer lock, and one that
    // becomes the runtime's earliest wakes its driver (a syscall); a connection's timer,
    // kept from its start, is almost never the earliest while other connections are open.
    let timer = tokio::time::sleep(shared.connect_timeout);
    tokio::pin!(timer);
    // Client to target. It may already hold what the client sent while a target was being
    // connected to (see `established`).
    let mut up = Flow::default();
    let found = connect_any(shared, &snapshot, &mut client, &mut up, timer.as_mut()).await;
    let (backend, connected) = match found {
        Ok(found) => found,
        Err(NotConnected::NoTarget) => {
            shared.counters.unrouted.fetch_add(1, Relaxed);
            debug!(listener = %shared.name, %peer, targets = snapshot.len(),
                   "no target could take the connection; closing it");
            return; // dropping `client` closes it
        }
        Err(NotConnected::Client(e)) => {
            debug!(listener = %shared.name, %peer, error = %e,
                   "client connection failed while connecting to a target");
            return;
        }
    };
    drop(snapshot);
    let entry = &connected.0;
    proxy(shared, client, backend, entry, peer, timer, up).await;
}

/// Why a client connection got no target connection.
enum NotConnected {
    /// No target left to try: none in rotation and up, or every attempt failed.
    NoTarget,
    /// Reading from the client failed meanwhile.
    Client(io::Error),
}

/// Why one connection attempt failed.
enum Failed {
    /// The target refused, was unreachable, or the socket could not be opened.
    Target(io::Error),
    TimedOut,
    /// Reading from the client failed: no other target is tried.
    Client(io::Error),
}

/// Counts one unit in a target's `active` or `pending` while alive.
struct Held<'a>(&'a AtomicUsize);

impl<'a> Held<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, SeqCst);
        Held(counter)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
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
/// checks, are not tried. Allocates nothing for up to 128 targets. What the client sends
/// meanwhile is kept in `up` (and offered to each target in turn, see `established`): no
/// target but the one connected to receives a byte.
async fn connect_any(
    shared: &Shared,
    snapshot: &[Arc<TargetEntry>],
    client: &mut TcpStream,
    up: &mut Flow,
    mut timer: Pin<&mut Sleep>,
) -> Result<(TcpStream, Connected), NotConnected> {
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
        })
        .ok_or(NotConnected::NoTarget)?;
        tried.insert(i);
        let entry = &snapshot[i];
        if !std::mem::take(&mut first) {
            timer
                .as_mut()
                .reset(Instant::now() + shared.connect_timeout);
        }
        let pending = Held::new(&entry.pending);
        // Out of rotation since it was chosen: a drain that read no attempt under way may
        // already have let the target stop. The listener clears `in_rotation` before a
        // report reads `pending` (`open_connections`), and this counts the attempt before
        // reading `in_rotation` again, all sequentially consistent: either this sees the
        // removal, or the report sees the attempt.
        if !entry.in_rotation.load(SeqCst) {
            continue;
        }
        let attempt = match open(entry.target.addr) {
            Ok(backend) => established(&backend, client, up, timer.as_mut())
                .await
                .map(|()| backend),
            Err(e) => Err(Failed::Target(e)),
        };
        match attempt {
            Ok(stream) => {
                // Counted as active before it stops being pending: a drain never reads
                // the connection as neither.
                entry.active.fetch_add(1, SeqCst);
                drop(pending);
                entry.total.fetch_add(1, Relaxed);
                // What was read from the client while connecting goes to this target.
                entry.bytes_in.fetch_add(up.bytes, Relaxed);
                return Ok((stream, Connected(entry.clone())));
            }
            Err(Failed::Client(e)) => return Err(NotConnected::Client(e)),
            Err(Failed::Target(error)) => {
                if let Some(held_back) = shared.connect_failed() {
                    warn!(listener = %shared.name, target = %entry.target.id,
                          addr = %entry.target.addr, %error, held_back,
                          "connect to target failed; trying the next one (logged at most once per 10 s, held_back: failed connects since the last line)");
                }
            }
            Err(Failed::TimedOut) => {
                if let Some(held_back) = shared.connect_failed() {
                    warn!(listener = %shared.name, target = %entry.target.id,
                          addr = %entry.target.addr, timeout = ?shared.connect_timeout, held_back,
                          "connect to target timed out; trying the next one (logged at most once per 10 s, held_back: failed connects since the last line)");
                }
            }
        }
        drop(pending);
        entry.connect_failures.fetch_add(1, Relaxed);
        shared.counters.connect_failures.fetch_add(1, Relaxed);
        let until = shared
            .now_ms()
            .saturating_add(u64::try_from(FAILURE_PENALTY.as_millis()).unwrap_or(u64::MAX));
        entry.penalized_until_ms.store(until, Relaxed);
    }
}

/// Starts a connection to a target in four syscalls: `socket` (non-blocking,
/// close-on-exec), `setsockopt(TCP_NODELAY)`, `connect`, and the `epoll_ctl` that registers
/// the socket. [`established`] tells how it ends.
fn open(addr: SocketAddr) -> io::Result<TcpStream> {
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
    TcpStream::from_std(socket.into())
}

/// Waits until the connection `open` started is established, fails, or `timer` fires.
///
/// Two things tell. First, bytes the client has already sent are offered to the target at
/// once (one `send`, bypassing tokio's readiness): on loopback the handshake is usually
/// over by the time `connect` returns, so the request goes out in the same pass as the
/// connect instead of an event-loop turn later; the target taking them proves the
/// connection, refusing them (`ECONNREFUSED`) fails it, and `EAGAIN` (still connecting)
/// leaves them kept in `up` for the proxy to send. Second, the readiness epoll reports, as
/// HAProxy reads it: writable without an error or hang-up is established. Unlike
/// `TcpStream::connect`, this asks the socket for its error (`getsockopt(SO_ERROR)`) only
/// when epoll reported one.
async fn established(
    backend: &TcpStream,
    client: &mut TcpStream,
    up: &mut Flow,
    mut timer: Pin<&mut Sleep>,
) -> Result<(), Failed> {
    let verdict = backend.ready(Interest::WRITABLE | Interest::ERROR);
    tokio::pin!(verdict);
    // At most one early `send` per attempt: once it met a handshake still under way, epoll
    // tells the rest.
    let mut offered = false;
    poll_fn(|cx| {
        if let Poll::Ready(ready) = verdict.as_mut().poll(cx) {
            let ready = ready.map_err(Failed::Target)?;
            if ready.is_error() || ready.is_write_closed() {
                let error = backend.take_error().ok().flatten().unwrap_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "connection closed while connecting",
                    )
                });
                return Poll::Ready(Err(Failed::Target(error)));
            }
            return Poll::Ready(Ok(()));
        }
        if !offered {
            if let Poll::Ready(offer) = up.poll_offer(cx, client, backend) {
                match offer {
                    Offer::Taken => return Poll::Ready(Ok(())),
                    Offer::NotYet => offered = true,
                    Offer::Refused(e) => return Poll::Ready(Err(Failed::Target(e))),
                    Offer::ClientFailed(e) => return Poll::Ready(Err(Failed::Client(e))),
                }
            }
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Failed::TimedOut));
        }
        Poll::Pending
    })
    .await
}

/// What became of client bytes offered to a target still connecting.
enum Offer {
    /// The target took some: the connection is established.
    Taken,
    /// The handshake is still under way (`EAGAIN`); the bytes are kept.
    NotYet,
    /// The connection failed (e.g. `ECONNREFUSED`); the bytes are kept for the next target.
    Refused(io::Error),
    ClientFailed(io::Error),
}

/// One `send(2)` straight on the socket, whatever tokio last heard of its readiness (which
/// stays untouched: the first epoll event of a new socket sets it).
fn send_now(socket: &TcpStream, data: &[u8]) -> io::Result<usize> {
    SockRef::from(socket).send_with_flags(data, libc::MSG_NOSIGNAL)
}

/// Copies both ways until both sides have closed (a side's EOF shuts down writing on the
/// other, so half-closed connections work), a side fails, or nothing moved in either
/// direction for `idle_timeout`. `up` may already hold client bytes read while connecting.
async fn proxy(
    shared: &Shared,
    mut client: TcpStream,
    mut backend: TcpStream,
    entry: &TargetEntry,
    peer: SocketAddr,
    mut idle: Pin<&mut Sleep>,
    mut up: Flow,
) {
    let idle_timeout = shared.idle_timeout;
    let mut last_activity = Instant::now();
    // The timer still holds the connect deadline. Firing before the idle deadline only
    // re-arms it (below); firing after would close an idle connection late, so pull it in.
    if last_activity + idle_timeout < idle.deadline() {
        idle.as_mut().reset(last_activity + idle_timeout);
    }
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
///
/// A direction whose reader sent EOF, once what it kept is written, shuts down its writer
/// so the peer sees the EOF too (half-closed connections work), at once: on loopback the
/// peer's side of the teardown then runs when the peer closes, on its own time. Only when
/// both directions are there in the same pass are both sockets just closed, which sends
/// the same FINs with one syscall fewer each.
fn poll_both(
    cx: &mut Context<'_>,
    up: &mut Flow,
    down: &mut Flow,
    client: &mut TcpStream,
    backend: &mut TcpStream,
    entry: &TargetEntry,
    moved: &mut bool,
) -> Poll<io::Result<()>> {
    if let Poll::Ready(Err(e)) = up.poll(cx, client, backend, &entry.bytes_in, moved) {
        return Poll::Ready(Err(e));
    }
    if let Poll::Ready(Err(e)) = down.poll(cx, backend, client, &entry.bytes_out, moved) {
        return Poll::Ready(Err(e));
    }
    let closing = |f: &Flow| matches!(f.state, FlowState::Flushed | FlowState::Done);
    if closing(up) && closing(down) {
        return Poll::Ready(Ok(()));
    }
    for (flow, to) in [(&mut *up, &mut *backend), (&mut *down, &mut *client)] {
        if flow.state == FlowState::Flushed {
            if let Poll::Ready(result) = Pin::new(to).poll_shutdown(cx) {
                result?;
                flow.state = FlowState::Done;
            }
        }
    }
    Poll::Pending
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum FlowState {
    #[default]
    Open,
    /// The reader sent EOF; what is kept still goes out.
    Eof,
    /// The reader sent EOF and everything is written; the writer is shut down next unless
    /// both sockets are about to be closed (see [`poll_both`]).
    Flushed,
    /// The writer is shut down.
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
    /// Keeps `rest`, what the writer did not take, to write it later. Only called with
    /// nothing kept.
    fn keep(&mut self, rest: &[u8]) {
        if rest.is_empty() {
            return;
        }
        let spill = self
            .spill
            .get_or_insert_with(|| vec![0; COPY_BUF].into_boxed_slice());
        spill[..rest.len()].copy_from_slice(rest);
        self.start = 0;
        self.end = rest.len();
    }

    /// Offers a target that is still connecting what the client sent: what was kept from
    /// an earlier attempt, or else what can be read now. Pending when there is nothing to
    /// offer (the client's read waker is registered); the bytes stay kept unless taken.
    fn poll_offer(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut TcpStream,
        backend: &TcpStream,
    ) -> Poll<Offer> {
        if self.start < self.end {
            let Some(spill) = &self.spill else {
                return Poll::Pending;
            };
            return Poll::Ready(match send_now(backend, &spill[self.start..self.end]) {
                Ok(0) => Offer::NotYet,
                Ok(n) => {
                    self.start += n;
                    Offer::Taken
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Offer::NotYet,
                Err(e) => Offer::Refused(e),
            });
        }
        if self.state != FlowState::Open {
            return Poll::Pending;
        }
        let mut stack = [MaybeUninit::<u8>::uninit(); COPY_BUF];
        let mut buf = ReadBuf::uninit(&mut stack);
        match Pin::new(&mut *client).poll_read(cx, &mut buf) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Offer::ClientFailed(e)),
            Poll::Ready(Ok(())) => {}
        }
        let data = buf.filled();
        if data.is_empty() {
            // The client is done sending before the target could take anything; its EOF
            // is forwarded once connected.
            self.state = FlowState::Eof;
            return Poll::Pending;
        }
        self.bytes += data.len() as u64;
        Poll::Ready(match send_now(backend, data) {
            Ok(n) if n > 0 => {
                self.keep(&data[n..]);
                Offer::Taken
            }
            Ok(_) => {
                self.keep(data);
                Offer::NotYet
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.keep(data);
                Offer::NotYet
            }
            Err(e) => {
                self.keep(data);
                Offer::Refused(e)
            }
        })
    }

    /// Copies `from` to `to` until one of them is not ready (Pending), or the reader's EOF
    /// is reached and everything written (Ready(Ok), state `Flushed`; the shutdown is
    /// [`poll_both`]'s), or it fails.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut TcpStream,
        to: &mut TcpStream,
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
                    self.state = FlowState::Flushed;
                    return Poll::Ready(Ok(()));
                }
                FlowState::Flushed | FlowState::Done => return Poll::Ready(Ok(())),
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
            self.keep(&data[written..]);
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
