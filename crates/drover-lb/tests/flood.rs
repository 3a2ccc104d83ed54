//! Limits under a flood of idle connections: the listener stays up, refuses the excess and
//! counts it, closes the idle ones after the timeout and then serves normal clients again.

mod common;

use std::time::Duration;

use common::*;
use drover_lb::ListenerConfig;
use drover_test_support::wait_until_async;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

const FLOOD: usize = 2_000;
const MAX: usize = 500;
const IDLE: Duration = Duration::from_millis(1_500);

/// Raises the soft open-file limit towards what the flood needs (each admitted connection
/// costs four descriptors in this process: client, accepted, to the backend, backend's);
/// returns how many connections the flood may use.
fn flood_size() -> usize {
    let needed = (FLOOD + 3 * MAX + 200) as libc::rlim_t;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return FLOOD;
        }
        if lim.rlim_cur < needed {
            lim.rlim_cur = needed.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    let room = usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
    // Keep the flood at least twice the limit even when descriptors are short.
    FLOOD.min(room.saturating_sub(3 * MAX + 200)).max(2 * MAX)
}

/// What one flooding client saw: whether it was proxied (got the greeting) and when the
/// balancer closed it, measured from when it connected.
struct Seen {
    proxied: bool,
    closed_after: Duration,
}

async fn idle_client(mut conn: TcpStream, connected: Instant) -> Seen {
    let mut buf = [0u8; 16];
    let mut proxied = false;
    loop {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => proxied = true,
        }
    }
    Seen {
        proxied,
        closed_after: connected.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_is_refused_counted_and_timed_out() {
    let flood = flood_size();
    let a = backend("a").await;
    let cfg = ListenerConfig {
        max_connections: MAX,
        idle_timeout: IDLE,
        ..Default::default()
    };
    let (lb, _tx) = start(cfg, targets(&[&a])).await;
    let addr = lb.local_addr();

    let began = Instant::now();
    let mut clients = Vec::with_capacity(flood);
    let mut peak = 0;
    for i in 0..flood {
        let conn = timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time: the listener keeps accepting")
            .expect("connect");
        clients.push(tokio::spawn(idle_client(conn, Instant::now())));
        if i % 100 == 0 {
            peak = peak.max(lb.stats().active);
        }
    }
    let flooded_in = began.elapsed();
    wait_until_async(WAIT, "every socket accepted", || {
        lb.stats().accepted == flood as u64
    })
    .await;
    let stats = lb.stats();
    peak = peak.max(stats.active);
    assert!(peak <= MAX, "{peak} open over a limit of {MAX}");
    // While the flood lasts less than the idle timeout no slot frees up: exactly the
    // excess is refused. (A slower run frees slots; then fewer are refused.)
    let refused = usize::try_from(stats.refused_over_limit).expect("count");
    if flooded_in < IDLE {
        assert_eq!(refused, flood - MAX, "{stats:?}");
    } else {
        assert!(refused >= flood - 2 * MAX, "{stats:?}");
    }

    let mut proxied = 0;
    let mut refused_seen = 0;
    for client in clients {
        let seen = timeout(IDLE + WAIT, client)
            .await
            .expect("every flooding connection is closed by the balancer")
            .expect("client task");
        if seen.proxied {
            proxied += 1;
            assert!(
                seen.closed_after >= IDLE - Duration::from_millis(50),
                "an idle proxied connection closed after {:?}",
                seen.closed_after
            );
        } else {
            refused_seen += 1;
        }
    }
    let stats = lb.stats();
    assert_eq!(proxied + refused_seen, flood);
    assert_eq!(refused_seen as u64, stats.refused_over_limit, "{stats:?}");
    assert_eq!(stats.accepted, flood as u64);
    wait_until_async(WAIT, "every slot released", || lb.stats().active == 0).await;
    assert_eq!(lb.open_connections("a"), 0);

    // Still serving: a normal client gets through and is echoed.
    let (mut conn, name) = open(addr).await;
    assert_eq!(name, "a");
    echo(&mut conn, b"after the flood").await;
    drop(conn);
    lb.shutdown().await;
}

#[tokio::test]
async fn a_slow_client_keeps_its_connection_while_idle_and_stuck_ones_are_closed() {
    let a = backend("a").await;
    let cfg = ListenerConfig {
        max_connections: 4,
        idle_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let (lb, _tx) = start(cfg, targets(&[&a])).await;
    let (mut slow, _) = open(lb.local_addr()).await;
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(open(lb.local_addr()).await.0);
    }
    // Stuck: sends half a request and never reads again.
    let (mut stuck, _) = open(lb.local_addr()).await;
    stuck.get_mut().write_all(b"GET / HT").await.expect("write");
    idle.push(stuck);
    // Full: the next one is refused.
    let mut over = TcpStream::connect(lb.local_addr()).await.expect("connect");
    expect_closed(&mut over).await;
    // One byte every 100 ms keeps the slow one open past the idle timeout.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        echo(&mut slow, b".").await;
    }
    for conn in &mut idle {
        // The stuck one gets its half request echoed back first.
        let mut rest = Vec::new();
        timeout(WAIT, conn.read_to_end(&mut rest))
            .await
            .expect("closed by the idle timeout")
            .expect("read");
        assert!(rest.is_empty() || rest == b"GET / HT", "{rest:?}");
    }
    wait_until_async(WAIT, "idle slots freed", || lb.stats().active == 1).await;
    let (_fresh, name) = open(lb.local_addr()).await;
    assert_eq!(name, "a");
    echo(&mut slow, b"still here").await;
    assert_eq!(lb.stats().refused_over_limit, 1);
    lb.shutdown().await;
}
