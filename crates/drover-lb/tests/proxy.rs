//! End-to-end tests of the listener with real sockets on 127.0.0.1, port 0.

mod common;

use std::time::Duration;

use common::*;
use drover_lb::{Listener, ListenerConfig, Policy, Target};
use drover_test_support::wait_until_async;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};

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
    wait_until_async(WAIT, "all closed", || lb.stats().active == 0).await;
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
    wait_until_async(WAIT, "a and c drained", || {
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
    wait_until_async(WAIT, "all closed", || lb.stats().active == 0).await;
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
    wait_until_async(WAIT, "a drained", || lb.open_connections("a") == 0).await;
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
    wait_until_async(WAIT, "slot freed", || lb.stats().active == 1).await;
    let (c3, name) = open(lb.local_addr()).await;
    assert_eq!(name, "a");
    drop((c1, c3));
    wait_until_async(WAIT, "all closed", || lb.stats().active == 0).await;
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
    wait_until_async(WAIT, "idle connection released", || {
        lb.open_connections("a") == 0
    })
    .await;
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
    wait_until_async(WAIT, "closed", || lb.stats().active == 0).await;
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
    wait_until_async(WAIT, "closed", || lb.stats().active == 0).await;
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

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfers_under_back_pressure_arrive_intact_both_ways() {
    const LEN: usize = 8 * 1024 * 1024;
    // The backend waits before reading the upload (so the balancer's writes to it push
    // back), then sends the upload's length and a download the client is slow to read.
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (mut conn, _) = socket.accept().await.expect("accept");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut got = vec![0u8; LEN];
        conn.read_exact(&mut got).await.expect("read upload");
        assert!(got == pattern(LEN), "upload corrupted");
        conn.write_all(&(LEN as u64).to_be_bytes())
            .await
            .expect("ack");
        conn.write_all(&pattern(LEN)).await.expect("download");
        conn.shutdown().await.expect("shutdown");
    });
    let (lb, _tx) = start(ListenerConfig::default(), vec![Target::new("big", addr)]).await;
    let mut conn = TcpStream::connect(lb.local_addr()).await.expect("connect");
    let (mut r, mut w) = conn.split();
    let upload = async {
        w.write_all(&pattern(LEN)).await.expect("upload");
    };
    let download = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut ack = [0u8; 8];
        r.read_exact(&mut ack).await.expect("ack");
        assert_eq!(u64::from_be_bytes(ack), LEN as u64);
        let mut got = Vec::with_capacity(LEN);
        timeout(Duration::from_secs(20), r.read_to_end(&mut got))
            .await
            .expect("download in time")
            .expect("download");
        assert!(
            got == pattern(LEN),
            "download corrupted ({} bytes)",
            got.len()
        );
    };
    tokio::join!(upload, download);
    server.await.expect("server");
    drop(conn);
    wait_until_async(WAIT, "closed", || lb.stats().active == 0).await;
    let stats = lb.stats();
    assert_eq!(stats.bytes_in, LEN as u64);
    assert_eq!(stats.bytes_out, LEN as u64 + 8);
    lb.shutdown().await;
}

/// Connects to `lb`, sends `msg` and half-closes, all before the listener's task can run
/// (blocking calls, no `.await`): the balancer finds the bytes and the EOF already there
/// when it accepts, so it reads them while still connecting to a target.
fn send_before_accept(lb: std::net::SocketAddr, msg: &[u8]) -> TcpStream {
    use std::io::Write;
    let mut conn = std::net::TcpStream::connect(lb).expect("connect");
    conn.write_all(msg).expect("write");
    conn.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    conn.set_nonblocking(true).expect("nonblocking");
    TcpStream::from_std(conn).expect("register")
}

#[tokio::test]
async fn bytes_read_while_connecting_survive_a_refused_target() {
    let b = backend("b").await;
    let dead = Target::new("dead", dead_addr().await);
    // Round robin starts with `dead`: its connect is refused after the client's request
    // was read, and the request goes to `b`, followed by the client's EOF.
    let (lb, _tx) = start(ListenerConfig::default(), vec![dead, b.target.clone()]).await;
    let mut conn = send_before_accept(lb.local_addr(), b"hello\n");
    let mut got = Vec::new();
    timeout(WAIT, conn.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .expect("read");
    assert_eq!(got, b"b\nhello\n");
    wait_until_async(WAIT, "closed", || lb.stats().active == 0).await;
    let stats = lb.stats();
    assert_eq!((stats.connect_failures, stats.unrouted), (1, 0));
    let by_id = |id: &str| stats.targets.iter().find(|t| t.id == id).expect("target");
    assert_eq!((by_id("dead").bytes_in, by_id("dead").total), (0, 0));
    assert_eq!((by_id("b").bytes_in, by_id("b").bytes_out), (6, 8));
    assert_eq!(stats.bytes_in, 6);
    lb.shutdown().await;
}

#[tokio::test]
async fn bytes_read_while_connecting_survive_a_connect_timeout() {
    let b = backend("b").await;
    let (hole, _fillers) = black_hole().await;
    let cfg = ListenerConfig {
        connect_timeout: Duration::from_millis(150),
        ..Default::default()
    };
    // The first target never answers the handshake: the early send finds it still
    // connecting, the bytes are kept, and after the timeout `b` gets them.
    let (lb, _tx) = start(cfg, vec![Target::new("hole", hole), b.target.clone()]).await;
    let mut conn = send_before_accept(lb.local_addr(), b"ping\n");
    let mut got = Vec::new();
    timeout(WAIT, conn.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .expect("read");
    assert_eq!(got, b"b\nping\n");
    let stats = lb.stats();
    let by_id = |id: &str| stats.targets.iter().find(|t| t.id == id).expect("target");
    assert_eq!(by_id("hole").connect_failures, 1);
    assert_eq!((by_id("hole").bytes_in, by_id("b").bytes_in), (0, 5));
    lb.shutdown().await;
}

#[tokio::test]
async fn a_target_that_closes_first_is_seen_closing_by_a_client_that_waits() {
    // A server that speaks first and closes (say, a banner); the client never closes its
    // side, so the target's EOF must reach it as a half-close.
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (mut conn, _) = socket.accept().await.expect("accept");
        conn.write_all(b"bye\n").await.expect("write");
        conn.shutdown().await.expect("shutdown");
        // Whatever the client sends after our EOF still arrives.
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).await.expect("read");
        rest
    });
    let (lb, _tx) = start(ListenerConfig::default(), vec![Target::new("s", addr)]).await;
    let mut conn = TcpStream::connect(lb.local_addr()).await.expect("connect");
    let mut got = Vec::new();
    timeout(WAIT, conn.read_to_end(&mut got))
        .await
        .expect("target's EOF forwarded")
        .expect("read");
    assert_eq!(got, b"bye\n");
    conn.write_all(b"late\n").await.expect("write after EOF");
    conn.shutdown().await.expect("half-close");
    let rest = timeout(WAIT, server)
        .await
        .expect("server done")
        .expect("task");
    assert_eq!(rest, b"late\n");
    wait_until_async(WAIT, "closed", || lb.stats().active == 0).await;
    lb.shutdown().await;
}

/// A target whose accept queue is full: the kernel drops new SYNs, so a connection to it
/// stays under way (SYN retransmitted) until the connect times out. The returned
/// streams and listener keep the queue full.
fn unanswering_target() -> (std::net::TcpListener, Vec<std::net::TcpStream>) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let addr: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
    socket.bind(&addr.into()).expect("bind");
    socket.listen(0).expect("listen");
    let listener: std::net::TcpListener = socket.into();
    let addr = listener.local_addr().expect("addr");
    let mut fill = Vec::new();
    // With a backlog of 0 the queue holds one connection; a connect that then times out
    // proves it full.
    for _ in 0..4 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => fill.push(s),
            Err(_) => return (listener, fill),
        }
    }
    panic!("the accept queue of {addr} never filled");
}

#[tokio::test]
async fn a_connection_still_connecting_to_a_removed_target_counts_until_it_ends() {
    let (slow, _fill) = unanswering_target();
    let slow = Target::new("slow", slow.local_addr().expect("addr"));
    let b = backend("b").await;
    let cfg = ListenerConfig {
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let (lb, tx) = start(cfg, vec![slow, b.target.clone()]).await;
    // Round robin sends the first connection to `slow`, where it hangs connecting.
    let mut client = TcpStream::connect(lb.local_addr()).await.expect("connect");
    client.write_all(b"hello").await.expect("write");
    wait_until_async(WAIT, "the attempt is under way", || {
        lb.open_connections("slow") == 1
    })
    .await;
    let t = lb
        .stats()
        .targets
        .into_iter()
        .find(|t| t.id == "slow")
        .expect("slow");
    assert_eq!((t.active, t.connecting), (0, 1), "{t:?}");

    // Removed while the attempt is under way: a drain reading the target now must not see
    // it idle, for the attempt may still reach it.
    tx.send(vec![b.target.clone()]).expect("send");
    for _ in 0..3 {
        assert_eq!(open(lb.local_addr()).await.1, "b");
    }
    assert_eq!(lb.open_connections("slow"), 1);
    let t = lb
        .stats()
        .targets
        .into_iter()
        .find(|t| t.id == "slow")
        .expect("slow");
    assert!(!t.in_rotation && t.connecting == 1, "{t:?}");

    // The attempt times out; a target out of rotation is not tried again, and the client
    // moves on to `b` with what it sent.
    let mut greeting = [0u8; 2];
    timeout(Duration::from_secs(5), client.read_exact(&mut greeting))
        .await
        .expect("answered after the connect timeout")
        .expect("read");
    assert_eq!(&greeting, b"b\n");
    wait_until_async(WAIT, "the attempt ended", || {
        lb.open_connections("slow") == 0
    })
    .await;
    lb.shutdown().await;
}
