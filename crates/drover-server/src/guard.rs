//! The API's holds on long-lived requests: how many follow streams and long-polls are open,
//! in all and per caller (token id), so that no one token can hold the server's tasks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Most follow streams (`GET /v1/events?follow=true`) one token may hold open at once.
pub const FOLLOWS_PER_CALLER: usize = 16;
/// Most long-polls (`/v1/agent/permit`, `/v1/agent/peers`, `/v1/lb/config`) one token may hold
/// open at once; a group's agent token may serve a whole group (a poll or two per instance),
/// so this is generous.
pub const POLLS_PER_CALLER: usize = 4096;
/// Most long-polls one instance token may hold open at once (an agent holds two at most: its
/// permit and its peers).
pub const POLLS_PER_INSTANCE: usize = 8;

/// Open long-lived requests.
#[derive(Default)]
pub struct Guards {
    follows: AtomicUsize,
    polls: AtomicUsize,
    per_caller: Mutex<HashMap<(Kind, String), usize>>,
    /// The API's open connections.
    pub connections: Arc<Connections>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Follow,
    Poll,
    /// A long-poll by an instance token (the caller key names the instance).
    InstancePoll,
}

/// Held while one long-lived request is open; released on drop.
pub struct Held {
    guards: Arc<Guards>,
    kind: Kind,
    caller: String,
}

impl Guards {
    /// Holds over connections with `limits` (the default: [`ConnLimits::default`]).
    pub fn with_limits(limits: ConnLimits) -> Guards {
        Guards {
            connections: Arc::new(Connections::with_limits(limits)),
            ..Default::default()
        }
    }

    /// Take a hold for `caller`, or None when it holds its limit already.
    pub fn hold(self: &Arc<Self>, kind: Kind, caller: &str) -> Option<Held> {
        let limit = match kind {
            Kind::Follow => FOLLOWS_PER_CALLER,
            Kind::Poll => POLLS_PER_CALLER,
            Kind::InstancePoll => POLLS_PER_INSTANCE,
        };
        let mut per = self.per_caller.lock().unwrap_or_else(|e| e.into_inner());
        let n = per.entry((kind, caller.to_string())).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        self.counter(kind).fetch_add(1, Ordering::Relaxed);
        Some(Held {
            guards: self.clone(),
            kind,
            caller: caller.to_string(),
        })
    }

    fn counter(&self, kind: Kind) -> &AtomicUsize {
        match kind {
            Kind::Follow => &self.follows,
            Kind::Poll | Kind::InstancePoll => &self.polls,
        }
    }

    /// Follow streams open now (each is one task).
    pub fn follows(&self) -> usize {
        self.follows.load(Ordering::Relaxed)
    }

    /// Long-polls open now.
    pub fn polls(&self) -> usize {
        self.polls.load(Ordering::Relaxed)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.guards
            .counter(self.kind)
            .fetch_sub(1, Ordering::Relaxed);
        let mut per = self
            .guards
            .per_caller
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = (self.kind, std::mem::take(&mut self.caller));
        if let Some(n) = per.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                per.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Past the per-address cap a connection is closed at once; one that sends nothing is
    /// closed after the first-byte timeout, one that sent a byte is kept until it has been
    /// idle; the counts go back down as they close.
    #[tokio::test]
    async fn connections_are_capped_per_address_and_silent_ones_closed() {
        let limits = ConnLimits {
            max: 1000,
            per_ip: 20,
            first_byte: std::time::Duration::from_millis(300),
            idle: std::time::Duration::from_millis(900),
            head: HEAD_TIMEOUT,
        };
        let conns = Arc::new(Connections::with_limits(limits));
        let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let mut l = Capped::new(inner, conns.clone());
        // The server side: accept and hold every admitted connection, echoing what it reads.
        let server = tokio::spawn(async move {
            let mut held = tokio::task::JoinSet::new();
            loop {
                let (mut io, _) = l.accept().await;
                held.spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let mut clients = Vec::new();
        for _ in 0..30 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // One talks: it stays past the first-byte timeout.
        clients[0].write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        clients[0].read_exact(&mut b).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(conns.open(), 20);
        assert_eq!(conns.refused(), 10);
        // The 10 refused are closed at once (read: end of stream, or reset).
        for c in &mut clients[20..] {
            let r = tokio::time::timeout(std::time::Duration::from_secs(2), c.read(&mut b)).await;
            assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
        }
        // The silent ones go after the first-byte timeout; the talker stays until idle.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(conns.open(), 1);
        clients[0].write_all(b"y").await.unwrap();
        clients[0].read_exact(&mut b).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
        assert_eq!(conns.open(), 0);
        server.abort();
    }

    /// What `c` reads until an answer ending in `ok`; panics if it is closed before.
    async fn answered(c: &mut tokio::net::TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"ok") {
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    /// A client that sends its request head a byte every 500 ms (each byte resets the idle
    /// timeout) is closed at the head deadline; whole requests are answered, one after
    /// another on a connection, and the server stops once its connections are gone.
    #[tokio::test]
    async fn a_slow_request_head_is_closed_at_its_deadline() {
        let limits = ConnLimits {
            head: std::time::Duration::from_secs(2),
            ..Default::default()
        };
        let conns = Arc::new(Connections::with_limits(limits));
        let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let app = axum::Router::new().route("/v1/health", axum::routing::get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(Capped::new(inner, conns.clone()), app, async move {
            let _ = stopped.await;
        }));
        let mut normal = tokio::net::TcpStream::connect(addr).await.unwrap();
        let ask = b"GET /v1/health HTTP/1.1\r\nhost: drover\r\n\r\n";
        for _ in 0..2 {
            normal.write_all(ask).await.unwrap();
            assert!(answered(&mut normal).await.starts_with("HTTP/1.1 200"));
        }
        drop(normal);
        // The slow one.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        let t0 = std::time::Instant::now();
        let (mut rd, mut wr) = slow.split();
        let drip = async {
            for b in ask.iter().cycle() {
                if wr.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            std::future::pending::<()>().await
        };
        let mut buf = [0u8; 1024];
        let closed = tokio::select! {
            r = rd.read(&mut buf) => r,
            _ = drip => unreachable!(),
            _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {
                panic!("a head sent a byte every 500 ms was still open after 10 s")
            }
        };
        let took = t0.elapsed();
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        assert!(
            took >= std::time::Duration::from_millis(1800)
                && took < std::time::Duration::from_secs(4),
            "closed after {took:?}"
        );
        // Others are still served.
        let mut normal = tokio::net::TcpStream::connect(addr).await.unwrap();
        normal.write_all(ask).await.unwrap();
        assert!(answered(&mut normal).await.starts_with("HTTP/1.1 200"));
        drop(normal);
        let _ = stop.send(());
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("the server stops")
            .unwrap();
    }

    #[test]
    fn a_caller_holds_at_most_its_limit_and_drops_give_back() {
        let g = Arc::new(Guards::default());
        let held: Vec<Held> = (0..FOLLOWS_PER_CALLER)
            .map(|_| g.hold(Kind::Follow, "t1").unwrap())
            .collect();
        assert!(g.hold(Kind::Follow, "t1").is_none());
        // Another caller, and another kind, are not affected.
        let other = g.hold(Kind::Follow, "t2").unwrap();
        let poll = g.hold(Kind::Poll, "t1").unwrap();
        assert_eq!((g.follows(), g.polls()), (FOLLOWS_PER_CALLER + 1, 1));
        drop(held);
        drop(other);
        drop(poll);
        assert_eq!((g.follows(), g.polls()), (0, 0));
        assert!(g.per_caller.lock().unwrap().is_empty());
        assert!(g.hold(Kind::Follow, "t1").is_some());
        // An instance token's long-polls: a few per instance.
        let polls: Vec<Held> = (0..POLLS_PER_INSTANCE)
            .map(|_| g.hold(Kind::InstancePoll, "t1/i-000001").unwrap())
            .collect();
        assert!(g.hold(Kind::InstancePoll, "t1/i-000001").is_none());
        assert!(g.hold(Kind::InstancePoll, "t1/i-000002").is_some());
        drop(polls);
        assert!(g.hold(Kind::InstancePoll, "t1/i-000001").is_some());
    }
}

/// Most API connections open at once, from everyone; and from one IP address. Past either, a
/// new connection is closed at once (what the kernel accepted costs no file descriptor of the
/// server's for long). One address holds at most a small share: thousands of idle
/// connections from one client leave room for every agent's heartbeats.
pub const MAX_CONNECTIONS: usize = 16_384;
pub const MAX_CONNECTIONS_PER_IP: usize = 512;
/// A new connection that sends nothing for this long is closed (no request, a slow loris).
pub const FIRST_BYTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A connection with no byte either way for this long is closed: longer than the longest
/// long-poll (60 s), so a held poll is never cut.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);
/// A request's head (its request line and headers) must come whole within this long of the
/// connection's start or of the answer before it: a slow loris sending a byte now and then
/// is closed however often it sends.
pub const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The caps and timeouts of [`Connections`].
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    pub max: usize,
    pub per_ip: usize,
    pub first_byte: std::time::Duration,
    pub idle: std::time::Duration,
    /// A request's whole head ([`HEAD_TIMEOUT`]); applied by [`serve`].
    pub head: std::time::Duration,
}

impl Default for ConnLimits {
    fn default() -> ConnLimits {
        ConnLimits {
            max: MAX_CONNECTIONS,
            per_ip: MAX_CONNECTIONS_PER_IP,
            first_byte: FIRST_BYTE_TIMEOUT,
            idle: IDLE_TIMEOUT,
            head: HEAD_TIMEOUT,
        }
    }
}

/// Open API connections, in all and per address.
#[derive(Default)]
pub struct Connections {
    limits: ConnLimits,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<std::net::IpAddr, usize>>,
    refused: std::sync::atomic::AtomicU64,
}

impl Connections {
    pub fn with_limits(limits: ConnLimits) -> Connections {
        Connections {
            limits,
            ..Default::default()
        }
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// How often a long answer that has nothing to say sends something anyway (a follow
    /// stream's keep-alive): a third of the idle timeout, so that it is never cut as idle.
    pub fn keep_alive(&self) -> std::time::Duration {
        self.limits.idle / 3
    }

    /// Connections closed at once because a cap was reached, since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn admit(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<ConnHeld> {
        let mut per = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per.entry(ip).or_default();
        if *n >= self.limits.per_ip || self.open.load(Ordering::Relaxed) >= self.limits.max {
            if *n == 0 {
                per.remove(&ip);
            }
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(ConnHeld {
            conns: self.clone(),
            ip,
        })
    }
}

struct ConnHeld {
    conns: Arc<Connections>,
    ip: std::net::IpAddr,
}

impl Drop for ConnHeld {
    fn drop(&mut self) {
        self.conns.open.fetch_sub(1, Ordering::Relaxed);
        let mut per = self.conns.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

/// A listener that admits connections within [`MAX_CONNECTIONS`] and
/// [`MAX_CONNECTIONS_PER_IP`] and closes those that stay silent ([`FIRST_BYTE_TIMEOUT`],
/// [`IDLE_TIMEOUT`]).
pub struct Capped<L> {
    inner: L,
    conns: Arc<Connections>,
}

impl<L> Capped<L> {
    pub fn new(inner: L, conns: Arc<Connections>) -> Capped<L> {
        Capped { inner, conns }
    }
}

impl<L> axum::serve::Listener for Capped<L>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    type Io = Timed<L::Io>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = self.inner.accept().await;
            match self.conns.admit(addr.ip()) {
                Some(held) => return (Timed::new(io, held), addr),
                None => drop(io),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Serves `app` over HTTP/1.1 on `listener` until `shutdown`, then waits until the open
/// connections have answered what they were asked (as `axum::serve` with its graceful
/// shutdown), and besides closes a connection whose request head does not come whole within
/// the limits' `head` (hyper's header read timeout: `axum::serve` sets none, so a byte every
/// minute kept a connection open for good).
pub async fn serve<L>(
    mut listener: Capped<L>,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(listener.conns.limits.head);
    // Each connection holds a receiver: closed() below waits until all are gone.
    let (close_tx, close_rx) = tokio::sync::watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (io, _addr) = tokio::select! {
            c = axum::serve::Listener::accept(&mut listener) => c,
            _ = &mut shutdown => break,
        };
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let app = app.clone();
                async move {
                    use tower::ServiceExt as _;
                    app.oneshot(req.map(axum::body::Body::new)).await
                }
            });
        let conn = http
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let mut close_rx = close_rx.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "API connection ended");
                    }
                    return;
                }
                _ = close_rx.changed() => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(close_rx);
    // Stop: every connection finishes its request, then closes.
    let _ = close_tx.send(());
    close_tx.closed().await;
}

/// A connection that ends with an error once it has been silent too long.
pub struct Timed<Io> {
    io: Io,
    idle: std::time::Duration,
    _held: ConnHeld,
    seen_bytes: bool,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<Io> Timed<Io> {
    fn new(io: Io, held: ConnHeld) -> Timed<Io> {
        let l = held.conns.limits;
        Timed {
            io,
            idle: l.idle,
            _held: held,
            seen_bytes: false,
            deadline: Box::pin(tokio::time::sleep(l.first_byte)),
        }
    }

    fn activity(&mut self) {
        self.seen_bytes = true;
        self.deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + self.idle);
    }

    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

use std::future::Future as _;
use std::task::Poll;

fn timed_out(first: bool) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        if first {
            "no request within the first-byte timeout"
        } else {
            "idle connection"
        },
    )
}

impl<Io: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Timed<Io> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.activity();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.expired(cx) {
                    let first = !self.seen_bytes;
                    Poll::Ready(Err(timed_out(first)))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<Io: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Timed<Io> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 && self.seen_bytes {
                self.activity();
            }
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
