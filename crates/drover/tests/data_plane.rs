//! End to end: the data plane outlives the control plane. The balancer (`drover lb`) is a
//! process of its own: a deploy under load through it drops no request while the server is
//! SIGKILLed and restarted mid-rollout; a new balancer takes the listening sockets over from
//! the running one under load and drops nothing; a SIGKILLed balancer serves again within a
//! second.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A `drover server` with the example fleet applied and 3 instances in rotation.
fn fleet_on_server(dir: &std::path::Path) -> (Up, std::process::Child, u16) {
    let (api, ing) = (free_port(), free_port());
    let text =
        fleet_text(ing, subnet(), 3).replace("drain_timeout = \"10s\"", "drain_timeout = \"3s\"");
    std::fs::write(dir.join("drover.toml"), &text).unwrap();
    let server = start_server(dir, api);
    let up = Up::for_server(dir, api, ing);
    up.apply_when_up(Duration::from_secs(10));
    up.wait_healthy(3, Duration::from_secs(15));
    // The balancer has the targets once an answer comes through it.
    let t0 = Instant::now();
    while get(up.ingress).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no answer through the balancer"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (up, server, api)
}

/// Wait until every instance of the group is on `generation` and in rotation, and no other
/// instance is left.
fn wait_converged(up: &Up, generation: u64, timeout: Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(s) = up.status() {
            let g = &s.groups[0];
            if g.generation == generation
                && g.instances.len() == 3
                && g.instances
                    .iter()
                    .all(|i| i.generation == generation && i.in_rotation)
            {
                return;
            }
        }
        assert!(
            t0.elapsed() < timeout,
            "not converged on generation {generation}: {:#?}",
            up.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn events(up: &Up, kind: &str) -> Vec<drover_model::Event> {
    let (_, ev, _) = up.cli(&["events", "--kind", kind, "--json"]);
    serde_json::from_str(&ev).unwrap_or_default()
}

#[test]
fn a_deploy_under_load_drops_nothing_while_the_server_is_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = KillAgents(dir.path().to_path_buf());
    let (up, mut server, api) = fleet_on_server(dir.path());
    let lb = up.lb_pid().expect("the server started a balancer");
    // Let the first rollout end, so generation 1 is the known good one.
    std::thread::sleep(Duration::from_secs(3));

    let stop = Arc::new(AtomicBool::new(false));
    let closing = load(up.ingress, 2, false, stop.clone());
    let keep_alive = load(up.ingress, 2, true, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2"]);
    assert_eq!(code, 0, "{out}{err}");
    let t0 = Instant::now();
    while events(&up, "permit").is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no permit yet");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Mid-rollout: the server dies, and comes back 5 s later.
    unsafe { libc::kill(server.id() as i32, libc::SIGKILL) };
    server.wait().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(up.lb_pid(), Some(lb), "the balancer outlives the server");
    let mut server = start_server(dir.path(), api);
    wait_converged(&up, 2, Duration::from_secs(90));
    // Answers keep coming from the new version only, then the load stops.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let closing = closing.join().unwrap();
    let keep_alive = keep_alive.join().unwrap();
    for (what, r) in [("Connection: close", &closing), ("keep-alive", &keep_alive)] {
        assert_eq!(r.failed, 0, "{what}: {} failed: {:?}", r.failed, r.errors);
        // Enough requests that the outage and every replacement met some (the rate is a
        // benchmark's business; a busy machine halves it).
        assert!(
            r.ok >= 200,
            "{what}: {} requests ({:.0} req/s)",
            r.ok,
            r.rate()
        );
        assert_eq!(
            r.versions.last().map(String::as_str),
            Some("v2"),
            "{what}: {:?}",
            r.versions
        );
    }
    assert_eq!(up.lb_pid(), Some(lb), "the same balancer served throughout");
    let adopted = events(&up, "balancer");
    assert!(
        adopted.iter().any(|e| e
            .message
            .contains(&format!("adopted the running balancer (pid {lb})"))),
        "the restarted server adopted the balancer: {adopted:#?}"
    );
    assert_eq!(
        events(&up, "permit").len(),
        3,
        "one permit per replaced instance"
    );
    assert!(
        events(&up, "terminating").is_empty(),
        "every leaver left on its own"
    );
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    server.wait().unwrap();
    assert_eq!(
        up.lb_pid(),
        Some(lb),
        "a stopped server leaves the balancer running"
    );
}

#[test]
fn a_new_balancer_takes_the_listeners_over_under_load_and_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = KillAgents(dir.path().to_path_buf());
    let (up, mut server, api) = fleet_on_server(dir.path());
    let old = up.lb_pid().expect("the server started a balancer");
    let stop = Arc::new(AtomicBool::new(false));
    let closing = load(up.ingress, 2, false, stop.clone());
    let keep_alive = load(up.ingress, 2, true, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    let data = dir.path().join("data");
    let mut upgrade = Command::new(BIN)
        .arg("lb")
        .arg("--servers")
        .arg(format!("http://127.0.0.1:{api}"))
        .arg("--token-file")
        .arg(data.join("lb.token"))
        .arg("--dir")
        .arg(data.join("lb"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("lb-new.err")).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while up.lb_pid() != Some(upgrade.id() as i32) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the new balancer did not take over"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Served by the new process for a while, kept-alive connections still on the old one.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        alive(old),
        "the old balancer finishes its open (kept-alive) connections"
    );
    stop.store(true, Ordering::SeqCst);
    let closing = closing.join().unwrap();
    let keep_alive = keep_alive.join().unwrap();
    for (what, r) in [("Connection: close", &closing), ("keep-alive", &keep_alive)] {
        assert_eq!(r.failed, 0, "{what}: {} failed: {:?}", r.failed, r.errors);
        assert!(r.ok > 200, "{what}: only {} answers", r.ok);
    }
    // Its last connections closed, the old process leaves; the server adopts the new one.
    let t0 = Instant::now();
    while alive(old) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the old balancer did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t0 = Instant::now();
    loop {
        let ev = events(&up, "balancer");
        if ev.iter().any(|e| {
            e.message
                .contains(&format!("handed its listeners to pid {}", upgrade.id()))
        }) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "server did not adopt the new balancer: {ev:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(get(up.ingress).is_ok());
    assert!(
        upgrade.try_wait().unwrap().is_none(),
        "the new balancer keeps running"
    );
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    server.wait().unwrap();
    let _ = upgrade.kill();
    let _ = upgrade.wait();
}

#[test]
fn a_sigkilled_balancer_serves_again_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = KillAgents(dir.path().to_path_buf());
    let (up, mut server, _) = fleet_on_server(dir.path());
    let lb = up.lb_pid().expect("the server started a balancer");
    unsafe { libc::kill(lb, libc::SIGKILL) };
    let t0 = Instant::now();
    loop {
        if get(up.ingress).is_ok() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "not serving again");
        std::thread::sleep(Duration::from_millis(10));
    }
    let back = t0.elapsed();
    assert!(
        back < Duration::from_secs(1),
        "serving again after {back:?}"
    );
    let new = up.lb_pid().expect("a new balancer");
    assert_ne!(new, lb);
    // It serves the last targets from its state file, then follows the server again.
    let t0 = Instant::now();
    loop {
        let s = up.status().unwrap();
        if s.balancers
            .iter()
            .any(|b| b.lb.ends_with(&format!(":{new}")) && b.current)
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the new balancer is not current: {:?}",
            s.balancers
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    server.wait().unwrap();
}
