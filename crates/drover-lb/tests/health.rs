//! Active health checks: ejection within the fall count, return after rise passes, http
//! status handling, and checkers following the target set.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use common::*;
use drover_lb::{HealthCheckConfig, HealthCheckKind, ListenerConfig, Target, TargetStats};
use drover_test_support::wait_until_async;
use tokio::net::TcpStream;
use tokio::time::Instant;

const INTERVAL: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_millis(50);
const RISE: u32 = 2;
const FALL: u32 = 3;
/// Scheduling slack on a loaded machine.
const SLACK: Duration = Duration::from_millis(300);

fn checked(kind: HealthCheckKind) -> ListenerConfig {
    ListenerConfig {
        health: Some(HealthCheckConfig {
            kind,
            interval: INTERVAL,
            timeout: TIMEOUT,
            rise: RISE,
            fall: FALL,
        }),
        ..Default::default()
    }
}

fn target_stats(lb: &drover_lb::Listener, id: &str) -> TargetStats {
    lb.stats()
        .targets
        .into_iter()
        .find(|t| t.id == id)
        .unwrap_or_else(|| panic!("target {id} listed"))
}

/// Polls every 2 ms until `id`'s `up` is `want`; returns the time taken and the stats seen.
async fn wait_for_state(lb: &drover_lb::Listener, id: &str, want: bool) -> (Duration, TargetStats) {
    let start = Instant::now();
    loop {
        let t = target_stats(lb, id);
        if t.up == want {
            return (start.elapsed(), t);
        }
        assert!(start.elapsed() < WAIT, "{id} never became up={want}: {t:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn dead_backend_is_ejected_within_its_fall_count_and_returns_after_rise() {
    let (a, b) = (backend("a").await, backend("b").await);
    let (lb, _tx) = start(checked(HealthCheckKind::Tcp), targets(&[&a, &b])).await;
    let addr = lb.local_addr();
    // A connection to b opened before it dies must outlive its ejection.
    let (mut held, name) = open(addr).await;
    assert_eq!(name, "a");
    let (mut on_b, name) = open(addr).await;
    assert_eq!(name, "b");
    tokio::time::sleep(INTERVAL * 2).await;
    let before = target_stats(&lb, "b");
    assert!(before.up && before.checks_failed == 0, "{before:?}");
    assert_eq!(before.last_change_unix_ms, None);

    let b_addr = b.kill().await;
    let died = Instant::now();
    let (took, down) = wait_for_state(&lb, "b", false).await;
    let bound = INTERVAL * FALL + TIMEOUT;
    assert!(
        took <= bound + SLACK,
        "ejected after {took:?}, bound {bound:?}"
    );
    // Exactly `fall` failures took it down: none before it died, none to spare.
    assert_eq!(down.checks_failed, u64::from(FALL), "{down:?}");
    assert_eq!(down.last_check_error.as_deref(), Some("connect failed"));
    assert!(down.last_change_unix_ms.is_some());
    assert!(down.in_rotation, "down is not removed");

    // From fall x interval + timeout after the death on, no new connection reaches b:
    // the balancer does not even try it (no connect failure is counted).
    tokio::time::sleep_until(died + bound).await;
    for _ in 0..10 {
        assert_eq!(open(addr).await.1, "a");
    }
    let b_now = target_stats(&lb, "b");
    assert_eq!((b_now.total, b_now.connect_failures), (1, 0), "{b_now:?}");
    assert_eq!(lb.stats().unrouted, 0);
    // Its open connection goes on, as a removed target's would.
    echo(&mut on_b, b"still served").await;
    assert_eq!(lb.open_connections("b"), 1);
    echo(&mut held, b"a too").await;

    // Back on its port: up again after `rise` consecutive passes, not at the first one.
    let failed_before = target_stats(&lb, "b").checks_failed;
    let _b = backend_at("b", b_addr).await;
    let (took, up) = wait_for_state(&lb, "b", true).await;
    let bound = INTERVAL * RISE + TIMEOUT;
    assert!(
        took <= bound + SLACK,
        "back after {took:?}, bound {bound:?}"
    );
    assert!(
        took >= INTERVAL * (RISE - 1) - Duration::from_millis(20),
        "{took:?}"
    );
    assert_eq!(
        up.checks_failed, failed_before,
        "no failure while coming back"
    );
    assert_eq!(up.last_check_error, None);
    let mut names: Vec<String> = Vec::new();
    for _ in 0..4 {
        names.push(open(addr).await.1);
    }
    assert!(names.iter().any(|n| n == "b"), "{names:?}");
    drop((held, on_b));
    lb.shutdown().await;
}

#[tokio::test]
async fn http_check_fails_on_a_500_and_passes_on_a_200() {
    let a = http_backend("a", 200).await;
    let b = http_backend("b", 500).await;
    let kind = HealthCheckKind::Http {
        path: "/healthz".to_string(),
    };
    let (lb, _tx) = start(checked(kind), vec![a.target.clone(), b.target.clone()]).await;
    let (took, down) = wait_for_state(&lb, "b", false).await;
    // b answered 500 from its first check on: down at the third, two intervals later.
    assert!(took <= INTERVAL * (FALL - 1) + TIMEOUT + SLACK, "{took:?}");
    assert_eq!(down.last_check_error.as_deref(), Some("HTTP status 500"));
    assert_eq!(down.checks_failed, u64::from(FALL));
    let a_stats = target_stats(&lb, "a");
    assert!(a_stats.up && a_stats.checks_failed == 0, "{a_stats:?}");
    assert!(a.checks.load(SeqCst) >= FALL as usize);
    for _ in 0..6 {
        assert_eq!(http_get(lb.local_addr()).await, "a");
    }

    b.status.store(200, SeqCst);
    let (took, _) = wait_for_state(&lb, "b", true).await;
    assert!(took <= INTERVAL * RISE + TIMEOUT + SLACK, "{took:?}");
    let mut bodies = Vec::new();
    for _ in 0..4 {
        bodies.push(http_get(lb.local_addr()).await);
    }
    assert!(bodies.iter().any(|n| n == "b"), "{bodies:?}");
    lb.shutdown().await;
}

#[tokio::test]
async fn http_check_fails_on_an_answer_that_is_not_http() {
    // The echo backend greets with "a\n": a TCP check passes, an http one must not.
    let a = backend("a").await;
    let kind = HealthCheckKind::Http {
        path: "/healthz".to_string(),
    };
    let (lb, _tx) = start(checked(kind), targets(&[&a])).await;
    let (_, down) = wait_for_state(&lb, "a", false).await;
    assert_eq!(
        down.last_check_error.as_deref(),
        Some("not an HTTP/1.x answer")
    );
    lb.shutdown().await;
}

#[tokio::test]
async fn check_without_answer_in_time_fails_by_timeout() {
    let (hole, _fillers) = black_hole().await;
    let (lb, _tx) = start(
        checked(HealthCheckKind::Tcp),
        vec![Target::new("hole", hole)],
    )
    .await;
    let (took, down) = wait_for_state(&lb, "hole", false).await;
    assert!(took <= INTERVAL * (FALL - 1) + TIMEOUT + SLACK, "{took:?}");
    assert_eq!(down.last_check_error.as_deref(), Some("timed out"));
    lb.shutdown().await;
}

#[tokio::test]
async fn with_every_target_down_clients_are_closed_at_once() {
    let b = http_backend("b", 503).await;
    let kind = HealthCheckKind::Http {
        path: "/healthz".to_string(),
    };
    let (lb, _tx) = start(checked(kind), vec![b.target.clone()]).await;
    wait_for_state(&lb, "b", false).await;
    let mut conn = TcpStream::connect(lb.local_addr()).await.expect("connect");
    let took = expect_closed(&mut conn).await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    let stats = lb.stats();
    assert_eq!((stats.unrouted, stats.connect_failures), (1, 0));
    lb.shutdown().await;
}

#[tokio::test]
async fn checkers_follow_the_target_set_and_stop_with_the_listener() {
    let a = http_backend("a", 200).await;
    let b = http_backend("b", 200).await;
    let kind = HealthCheckKind::Http {
        path: "/healthz".to_string(),
    };
    let (lb, tx) = start(checked(kind), vec![a.target.clone()]).await;
    let checks_of = |be: &HttpBackend| be.checks.load(SeqCst);
    wait_until_async(WAIT, "a checked", || checks_of(&a) >= 2).await;
    assert_eq!(checks_of(&b), 0, "b is not a target yet");

    // Added: checked at once. Removed: no longer checked.
    tx.send(vec![a.target.clone(), b.target.clone()])
        .expect("send");
    wait_until_async(WAIT, "b checked", || checks_of(&b) >= 1).await;
    tx.send(vec![b.target.clone()]).expect("send");
    tokio::time::sleep(INTERVAL / 2).await; // a check under way may finish
    let a_after_removal = checks_of(&a);
    tokio::time::sleep(INTERVAL * 4).await;
    assert_eq!(
        checks_of(&a),
        a_after_removal,
        "a still checked after removal"
    );
    assert!(checks_of(&b) >= 3, "b checked every interval");

    // Re-added: checked again.
    tx.send(vec![a.target.clone(), b.target.clone()])
        .expect("send");
    wait_until_async(WAIT, "a checked again", || checks_of(&a) > a_after_removal).await;

    lb.shutdown().await;
    tokio::time::sleep(INTERVAL / 2).await;
    let (a_end, b_end) = (checks_of(&a), checks_of(&b));
    tokio::time::sleep(INTERVAL * 3).await;
    assert_eq!(
        (checks_of(&a), checks_of(&b)),
        (a_end, b_end),
        "checked after shutdown"
    );
}

#[tokio::test]
async fn dropping_the_listener_stops_its_checkers() {
    let a = http_backend("a", 200).await;
    let kind = HealthCheckKind::Http {
        path: "/healthz".to_string(),
    };
    let (lb, _tx) = start(checked(kind), vec![a.target.clone()]).await;
    wait_until_async(WAIT, "a checked", || a.checks.load(SeqCst) >= 1).await;
    drop(lb);
    tokio::time::sleep(INTERVAL / 2).await;
    let n = a.checks.load(SeqCst);
    tokio::time::sleep(INTERVAL * 3).await;
    assert_eq!(a.checks.load(SeqCst), n);
}

#[tokio::test]
async fn invalid_health_settings_are_rejected() {
    let (_tx, rx) = tokio::sync::watch::channel(Vec::new());
    let bad = [
        HealthCheckConfig {
            rise: 0,
            ..Default::default()
        },
        HealthCheckConfig {
            timeout: Duration::from_secs(3),
            ..Default::default()
        },
        HealthCheckConfig {
            interval: Duration::ZERO,
            ..Default::default()
        },
        HealthCheckConfig {
            kind: HealthCheckKind::Http {
                path: "healthz".to_string(),
            },
            ..Default::default()
        },
        HealthCheckConfig {
            kind: HealthCheckKind::Http {
                path: "/a b".to_string(),
            },
            ..Default::default()
        },
    ];
    for health in bad {
        let cfg = ListenerConfig {
            health: Some(health.clone()),
            ..Default::default()
        };
        let err = drover_lb::Listener::bind(cfg, rx.clone())
            .await
            .expect_err("invalid");
        assert!(err.to_string().contains("health"), "{health:?}: {err}");
    }
}
