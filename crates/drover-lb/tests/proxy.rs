//! End-to-end tests of the listener with real sockets on 127.0.0.1, port 0.

use std::net::SocketAddr;
use std::time::Duration;

use drover_lb::{Listener, ListenerConfig, Policy, Target};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

const WAIT: Duration = Duration::from_secs(3);

/// A backend that greets each connection with `name\n`, then echoes until EOF and closes.
struct Backend {
    target: Target,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend(name: &str) -> Backend {
    backend_at(name, "127.0.0.1:0".parse().expect("addr")).await
}

async fn backend_at(name: &str, addr: SocketAddr) -> Backend {
    let socket = TcpListener::bind(addr).await.expect("bind backend");
    let addr = socket.local_addr().expect("backend addr");
    let greeting = format!("{name}\n");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = socket.accept().await else {
                return;
            };
            let greeting = greeting.clone();
            tokio::spawn(async move {
                if conn.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Backend {
        target: Target::new(name, addr),
        task,
    }
}

/// An address nothing listens on: connecting to it is refused.
async fn dead_addr() -> SocketAddr {
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    socket.local_addr().expect("addr")
}

type Conn = BufReader<TcpStream>;

/// Connects through the listener and returns the stream and the backend's name.
async fn open(lb: SocketAddr) -> (Conn, String) {
    let stream = TcpStream::connect(lb).await.expect("connect to listener");
    let mut conn = BufReader::new(stream);
    let mut line = String::new();
    timeout(WAIT, conn.read_line(&mut line))
        .await
        .expect("greeting in time")
        .expect("read greeting");
    assert!(line.ends_with('\n'), "no greeting, got {line:?}");
    line.pop();
    (conn, line)
}

/// Sends `msg` and expects it echoed back.
async fn echo(conn: &mut Conn, msg: &[u8]) {
    conn.get_mut().write_all(msg).await.expect("write");
    let mut got = vec![0; msg.len()];
    timeout(WAIT, conn.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("read echo");
    assert_eq!(got, msg);
}

/// Expects the peer to close `stream` soon (EOF or reset); returns how long it took.
async fn expect_closed<S: AsyncReadExt + Unpin>(stream: &mut S) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 64];
    match timeout(WAIT, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => start.elapsed(),
        Ok(Ok(n)) => panic!("expected close, got {n} bytes: {:?}", &buf[..n]),
        Err(_) => panic!("connection not closed within {WAIT:?}"),
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn start(
    cfg: ListenerConfig,
    targets: Vec<Target>,
) -> (Listener, watch::Sender<Vec<Target>>) {
    let (tx, rx) = watch::channel(targets);
    let lb = Listener::bind(cfg, rx).await.expect("bind listener");
    (lb, tx)
}

fn targets(backends: &[&Backend]) -> Vec<Target> {
    backends.iter().map(|b| b.target.clone()).collect()
}

#[tokio::test]
async fn round_robin_spreads_connections_evenly_in_turn() {
    let (a, b, c) = (backend("a").await, backend("b").await, backend("c").await);
    let (lb, _tx) = start(ListenerConfig::default(), targets(&[&a, &b, &c])).await;
    let mut names = Vec::new();
    for _ in 0..9 {
        let (_conn, name) = open(lb.local_addr()).await;
        names.push(name);
    }
    assert_eq!(names, ["a", "b", "c", "a", "b", "c", "a", "b", "c"]);
    wait_until("all closed", || lb.stats().active == 0).await;
    let stats = lb.stats();
    assert_eq!(stats.accepted, 9);
    for t in &stats.targets {
        assert_eq!(t.total, 3, "{t:?}");
        assert!(t.in_rotation);
    }
    lb.shutdown().await;
}

#[tokio::test]
async fn least_connections_prefers_targets_with_fewest_open() {
    let (a, b, c) = (backend("a").await, backend("b").await, backend("c").await);
    let cfg = ListenerConfig {
        policy: Policy::LeastConnections,
        ..Default::default()
    };
    let (lb, _tx) = start(cfg, targets(&[&a, &b, &c])).await;
    let addr = lb.local_addr();
    // All idle: ties are broken in turn.
    let (ca, na) = open(addr).await;
    let (cb, nb) = open(addr).await;
    let (cc, nc) = open(addr).await;
    assert_eq!([na.as_str(), nb.as_str(), nc.as_str()], ["a", "b", "c"]);
    // Free a and c; the next two go there, never to b, which still holds one.
    drop(ca);
    drop(cc);
    wait_until("a and c drained", || {
        lb.open_connections("a") == 0 && lb.open_connections("c") == 0
    })
    .await;
    let (_x, nx) = open(addr).await;
    let (_y, ny) = open(addr).await;
    let mut got = [nx, ny];
    got.sort();
    assert_eq!(got, ["a", "c"]);
    assert_eq!(lb.open_connections("a"), 1);
    assert_eq!(lb.open_connections("b"), 1);
    assert_eq!(lb.open_connections("c"), 1);
    // All tied again: three more give each target one more, none a third.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open(addr).await);
    }
    for id in ["a", "b", "c"] {
        assert_eq!(lb.open_connections(id), 2, "{id}");
    }
    drop((cb, held, _x, _y));
    wait_until("all closed", || lb.stats().active == 0).await;
    lb.shutdown().await;
}

#[tokio::test]
async fn removed_target_gets_no_new_connection_after_send() {
    let (a, b) = (backend("a").await, backend("b").await);
    let (lb, tx) = start(ListenerConfig::default(), targets(&[&a, &b])).await;
    tx.send(targets(&[&b])).expect("send");
    for _ in 0..4 {
        assert_eq!(open(lb.local_addr()).await.1, "b");
    }
    tx.send(targets(&[&a])).expect("send");
    assert_eq!(open(lb.local_addr()).await.1, "a");
    tx.send(targets(&[&a, &b])).expect("send");
    let mut seen = vec![open(lb.local_addr()).await.1, open(lb.local_addr()).await.1];
    seen.sort();
    assert_eq!(seen, ["a", "b"]);
    lb.shutdown().await;
}

#[tokio::test]
async fn removed_target_drains_its_open_connections() {
    let (a, b) = (backend("a").await, backend("b").await);
    let (lb, tx) = start(ListenerConfig::default(), targets(&[&a, &b])).await;
    let (mut held, name) = open(lb.local_addr()).await;
    assert_eq!(name, "a");
    assert_eq!(lb.open_connections("a"), 1);

    tx.send(targets(&[&b])).expect("send");
    echo(&mut held, b"still here").await;
    for _ in 0..3 {
        assert_eq!(open(lb.local_addr()).await.1, "b");
    }
    assert_eq!(lb.open_connections("a"), 1);
    let a_stats = lb
        .stats()
        .targets
        .into_iter()
        .find(|t| t.id == "a")
        .expect("draining target listed");
    assert!(!a_stats.in_rotation);
    assert_eq!(a_stats.active, 1);
    echo(&mut held, b"and here").await;

    drop(held);
    wait_until("a drained", || lb.open_connections("a") == 0).await;
    assert!(lb.stats().targets.iter().all(|t| t.id != "a"));
    lb.shutdown().await;
}

#[tokio::test]
async fn connect_failure_moves_on_and_penalizes_the_target() {
    let b = backend("b").await;
    let dead = Target::new("dead", dead_addr().await);
    let (lb, _tx) = start(ListenerConfig::default(), vec![dead, b.target.clone()]).await;
    // Cursor 0 picks dead, fails, moves on to b; later turns skip dead while penalized.
    for _ in 0..4 {
        assert_eq!(open(lb.local_addr()).await.1, "b");
    }
    let stats = lb.stats();
    assert_eq!(stats.connect_failures, 1);
    assert_eq!(stats.unrouted, 0);
    let dead = stats.targets.iter().find(|t| t.id == "dead").expect("dead");
    assert_eq!(dead.connect_failures, 1);
    assert_eq!(dead.total, 0);
    assert!(dead.penalized);
    lb.shutdown().await;
}

#[tokio::test]
async fn penalized_target_is_still_used_when_it_is_the_only_one() {
    let port = dead_addr().await;
    let (lb, _tx) = start(ListenerConfig::default(), vec![Target::new("a", port)]).await;
    let mut conn = TcpStream::connect(lb.local_addr()).await.expect("connect");
    expect_closed(&mut conn).await;
    let stats = lb.stats();
    assert_eq!((stats.unrouted, stats.connect_failures), (1, 1));
    assert!(stats.targets[0].penalized);
    // The target comes up within its penalty: being the only one, it is tried anyway.
    let _a = backend_at("a", port).await;
    assert_eq!(open(lb.local_addr()).await.1, "a");
    lb.shutdown().await;
}

#[tokio::test]
async fn all_targets_failing_closes_the_client() {
    let t1 = Target::new("d1", dead_addr().await);
    let t2 = Target::new("d2", dead_addr().await);
    let (lb, _tx) = start(ListenerConfig::default(), vec![t1, t2]).await;
    let mut conn = TcpStream::connect(lb.local_addr()).await.expect("connect");
    expect_closed(&mut conn).await;
    let stats = lb.stats();
    assert_eq!(stats.connect_failures, 2, "each target tried once");
    assert_eq!(stats.unrouted, 1);
    assert_eq!(lb.open_connections("d1"), 0);
    lb.shutdown().await;
}

/// A listener whose accept queue is full: further SYNs are dropped, so connects hang.
async fn black_hole() -> (SocketAddr, Vec<TcpStream>) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    let listener = socket.listen(1).expect("listen");
    std::mem::forget(listener); // keep it listening, never accepting
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match timeout(Duration::from_millis(100), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => panic!("unexpected connect error {e}"),
            Err(_) => return (addr, fillers),
        }
    }
    panic!("accept queue never filled");
}

#[tokio::test]
async fn connect_timeout_moves_on_to_the_next_target() {
    let b = backend("b").await;
    let (hole, _fillers) = black_hole().await;
    let cfg = ListenerConfig {
        connect_timeout: Duration::from_millis(150),
        ..Default::default()
    };
    let (lb, _tx) = start(cfg, vec![Target::new("hole", hole), b.target.clone()]).await;
    let start = Instant::now();
    assert_eq!(open(lb.local_addr()).await.1, "b");
    assert!(start.elapsed() >= Duration::from_millis(140));
    let stats = lb.stats();
    let hole = stats.targets.iter().find(|t| t.id == "hole").expect("hole");
    assert_eq!(hole.connect_failures, 1);
    lb.shutdown().await;
}

#[tokio::test]
async fn empty_target_set_closes_the_client_at_once() {
    let (lb, _tx) = start(ListenerConfig::default(), Vec::new()).await;
    let mut conn = TcpStream::connect(lb.local_addr()).await.expect("connect");
    let took = expect_closed(&mut conn).await;
    assert!(took < Duration::from_millis(500), "took {took:?}");
    assert_eq!(lb.stats().unrouted, 1);
    lb.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_and_counted() {
    let a = backend("a").await;
    let cfg = ListenerConfig {
        max_connections: 2,
        ..Default::default()
    };
    let (lb, _tx) = start(cfg, targets(&[&a])).await;
    let (mut c1, _) = open(lb.local_addr()).await;
    let (c2, _) = open(lb.local_addr()).await;
    for _ in 0..3 {
        let mut over = TcpStream::connect(lb.local_addr()).await.expect("connect");
        expect_closed(&mut over).await;
    }
    let stats = lb.stats();
    assert_eq!(stats.refused_over_limit, 3);
    assert_eq!(stats.active, 2);
    assert_eq!(stats.accepted, 5);
    echo(&mut c1, b"unaffected").await;
    drop(c2);
    wait_until("slot freed", || lb.stats().active == 1).await;
    let (c3, name) = open(lb.local_addr()).await;
    assert_eq!(name, "a");
    drop((c1, c3));
    wait_until("all closed", || lb.stats().active == 0).await;
    lb.shutdown().await;
}

#[tokio::test]
async fn idle_connections_are_closed_and_traffic_keeps_them_open() {
    let a = backend("a").await;
    let cfg = ListenerConfig {
        idle_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let (lb, _tx) = start(cfg, targets(&[&a])).await;
    let (mut busy, _) = open(lb.local_addr()).await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        echo(&mut busy, b"tick").await;
    }
    // 500 ms in, more than the timeout, still open thanks to traffic; now go quiet.
    let took = expect_closed(&mut busy).await;
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    wait_until("idle connection released", || lb.open_connections("a") == 0).await;
    lb.shutdown().await;
}

#[tokio::test]
async fn half_close_is_propagated_and_bytes_are_counted() {
    let a = backend("a").await;
    let (lb, _tx) = start(ListenerConfig::default(), targets(&[&a])).await;
    let payload = vec![7u8; 300 * 1024]; // larger than the copy buffers
    let mut conn = TcpStream::connect(lb.local_addr()).await.expect("connect");
    let (mut r, mut w) = conn.split();
    let send = async {
        w.write_all(&payload).await.expect("write");
        w.shutdown().await.expect("half-close");
    };
    let mut got = Vec::new();
    let recv = async {
        timeout(WAIT, r.read_to_end(&mut got))
            .await
            .expect("backend closed after our EOF")
            .expect("read");
    };
    tokio::join!(send, recv);
    assert_eq!(&got[..2], b"a\n");
    assert_eq!(&got[2..], &payload[..]);
    drop(conn);
    wait_until("closed", || lb.stats().active == 0).await;
    let stats = lb.stats();
    assert_eq!(stats.bytes_in, payload.len() as u64);
    assert_eq!(stats.bytes_out, payload.len() as u64 + 2);
    let t = &stats.targets[0];
    assert_eq!((t.bytes_in, t.bytes_out), (stats.bytes_in, stats.bytes_out));
    assert_eq!((t.total, t.active), (1, 0));
    lb.shutdown().await;
}

#[tokio::test]
async fn shutdown_releases_the_port() {
    let a = backend("a").await;
    let (lb, _tx) = start(ListenerConfig::default(), targets(&[&a])).await;
    let addr = lb.local_addr();
    let (mut conn, _) = open(addr).await;
    echo(&mut conn, b"x").await;
    drop(conn);
    wait_until("closed", || lb.stats().active == 0).await;
    lb.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    let again = Listener::bind(
        ListenerConfig {
            listen: addr,
            ..Default::default()
        },
        watch::channel(targets(&[&a])).1,
    )
    .await
    .expect("rebind the same port");
    assert_eq!(again.local_addr(), addr);
    assert_eq!(open(addr).await.1, "a");
    again.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_connections_finish_then_aborts_them() {
    let a = backend("a").await;
    let cfg = ListenerConfig {
        shutdown_grace: Duration::from_millis(300),
        ..Default::default()
    };
    let (lb, _tx) = start(cfg, targets(&[&a])).await;
    let (mut held, _) = open(lb.local_addr()).await;
    let started = Instant::now();
    let shutdown = tokio::spawn(lb.clone().shutdown());
    // During the grace period the connection still works.
    echo(&mut held, b"during grace").await;
    let closed_after = expect_closed(&mut held).await + started.elapsed();
    timeout(WAIT, shutdown)
        .await
        .expect("shutdown returns")
        .expect("shutdown task");
    assert!(closed_after >= Duration::from_millis(250));
    assert_eq!(lb.stats().active, 0);
}

#[tokio::test]
async fn shutdown_returns_at_once_without_connections() {
    let (lb, _tx) = start(ListenerConfig::default(), Vec::new()).await;
    timeout(Duration::from_millis(500), lb.shutdown())
        .await
        .expect("prompt shutdown");
}

#[tokio::test]
async fn dropped_sender_keeps_the_last_target_set() {
    let a = backend("a").await;
    let (lb, tx) = start(ListenerConfig::default(), Vec::new()).await;
    tx.send(targets(&[&a])).expect("send");
    drop(tx);
    for _ in 0..2 {
        assert_eq!(open(lb.local_addr()).await.1, "a");
    }
    lb.shutdown().await;
}

#[tokio::test]
async fn invalid_config_and_busy_port_are_errors() {
    let (_tx, rx) = watch::channel(Vec::new());
    let zero = ListenerConfig {
        max_connections: 0,
        ..Default::default()
    };
    let err = Listener::bind(zero, rx.clone()).await.expect_err("invalid");
    assert!(err.to_string().contains("max_connections"), "{err}");
    let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let busy = ListenerConfig {
        listen: taken.local_addr().expect("addr"),
        ..Default::default()
    };
    let err = Listener::bind(busy, rx).await.expect_err("port in use");
    assert!(matches!(err, drover_lb::LbError::Bind { .. }), "{err}");
}

#[tokio::test]
async fn stats_serialize_to_json() {
    let a = backend("a").await;
    let (lb, _tx) = start(ListenerConfig::default(), targets(&[&a])).await;
    let _ = open(lb.local_addr()).await;
    let json = serde_json::to_value(lb.stats()).expect("serialize");
    assert_eq!(json["targets"][0]["id"], "a");
    assert_eq!(json["targets"][0]["in_rotation"], true);
    assert!(json["accepted"].as_u64().is_some());
    lb.shutdown().await;
}
