//! End to end: deploys by replacement under load, a broken version reverted, a server crash
//! mid-rollout. Real binary, real processes, real sockets.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// The example fleet tuned for tests: quick health, short drain, a version that crashes.
fn test_fleet(ingress: u16, block: u8, desired: u32) -> String {
    fleet_text(ingress, block, desired)
        .replace("min_healthy_time = \"2s\"", "min_healthy_time = \"1s\"")
        .replace("drain_timeout = \"10s\"", "drain_timeout = \"2s\"")
        .replace("healthy_deadline = \"30s\"", "healthy_deadline = \"8s\"")
        .replace(
            "\"--message\", \"hello from web {version}\"]",
            "\"--message\", \"hello from web {version}\", \"--crash-on-versions\", \"broken\"]",
        )
}

fn wait_generation_everywhere(up: &Up, generation: u64, n: usize, timeout: Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(s) = up.status() {
            let g = &s.groups[0];
            let on = g
                .instances
                .iter()
                .filter(|i| i.generation == generation && i.in_rotation)
                .count();
            if g.instances.len() == n && on == n {
                return;
            }
        }
        assert!(
            t0.elapsed() < timeout,
            "not all {n} instances on generation {generation}: {:#?}",
            up.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn deploys_v1_v2_v3_under_load_with_zero_failed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let up = Up::start(dir.path(), &test_fleet(ing, subnet(), 3), api, ing);
    up.wait_healthy(3, Duration::from_secs(10));

    let stop = Arc::new(AtomicBool::new(false));
    let closing = load(up.ingress, 2, false, stop.clone());
    let keep_alive = load(up.ingress, 2, true, stop.clone());
    std::thread::sleep(Duration::from_millis(500));

    for (version, generation) in [("v2", 2), ("v3", 3)] {
        let (code, out, err) =
            up.cli(&["deploy", "web", "app", version, "--wait", "--timeout", "2m"]);
        assert_eq!(code, 0, "deploy {version}: {out}{err}");
        assert!(out.contains("done in"), "a summary: {out}");
        wait_generation_everywhere(&up, generation, 3, Duration::from_secs(5));
    }
    // Rollback on demand: back to the versions of the previous revision (v2).
    let (code, out, err) = up.cli(&["rollback", "web", "--wait", "--timeout", "2m"]);
    assert_eq!(code, 0, "rollback: {out}{err}");
    assert!(out.contains("\"v3\" -> \"v2\""), "{out}");
    wait_generation_everywhere(&up, 4, 3, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let closing = closing.join().unwrap();
    let keep_alive = keep_alive.join().unwrap();
    eprintln!(
        "without keep-alive: {} ok, {} failed, {:.0} req/s; with keep-alive: {} ok, {} failed, {:.0} req/s",
        closing.ok,
        closing.failed,
        closing.rate(),
        keep_alive.ok,
        keep_alive.failed,
        keep_alive.rate()
    );
    for (name, r) in [
        ("without keep-alive", &closing),
        ("with keep-alive", &keep_alive),
    ] {
        assert_eq!(r.failed, 0, "{name}: failed requests: {:?}", r.errors);
        // Enough requests that every replacement met some (the rate is a benchmark's
        // business, bench/deploy.py; a busy machine halves it).
        assert!(
            r.ok >= 200,
            "{name}: at least 200 requests over the three deploys: {}",
            r.ok
        );
        let mut first_seen: Vec<&str> = Vec::new();
        for v in &r.versions {
            if !first_seen.contains(&v.as_str()) {
                first_seen.push(v);
            }
        }
        assert_eq!(
            first_seen,
            ["v1", "v2", "v3"],
            "{name}: v1 first, then a mix, then v2, then v3"
        );
        assert_eq!(
            r.versions.last().map(String::as_str),
            Some("v2"),
            "{name}: only v2 after the rollback"
        );
    }
    // Every replacement went through a permit; the story is in the events.
    let (_, ev, _) = up.cli(&["events", "--kind", "permit", "--json"]);
    let permits: Vec<drover_model::Event> = serde_json::from_str(&ev).unwrap();
    assert_eq!(
        permits.len(),
        9,
        "3 instances replaced three times, each with a permit"
    );
    let (_, ev, _) = up.cli(&["events", "--kind", "lost", "--json"]);
    assert_eq!(ev.trim(), "[]", "no instance was lost: {ev}");
    let (_, hist, _) = up.cli(&["history"]);
    assert!(hist.contains("deploy web app v3"), "{hist}");
    assert!(hist.contains("rollback web"), "{hist}");
}

/// Permit long-polls the server holds now (`/metrics`).
fn long_polls(up: &Up) -> u64 {
    let (code, body) = http(up.api, "GET", "/metrics", None).unwrap();
    assert_eq!(code, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix("drover_permit_long_polls "))
        .and_then(|v| v.trim().parse().ok())
        .expect("drover_permit_long_polls in /metrics")
}

/// Current instances hold no permit long-poll (their heartbeats are answered
/// `leave_soon: false`); a deploy hints the stale ones, which then hold one, get their permits
/// at once and leave promptly.
#[test]
fn only_instances_about_to_leave_hold_a_permit_long_poll() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let up = Up::start(dir.path(), &test_fleet(ing, subnet(), 3), api, ing);
    up.wait_healthy(3, Duration::from_secs(10));
    // Heartbeats come every second: two of them after turning healthy.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(long_polls(&up), 0, "idle instances hold no long-poll");

    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2"]);
    assert_eq!(code, 0, "deploy: {out}{err}");
    let t0 = Instant::now();
    let mut most = 0;
    loop {
        most = most.max(long_polls(&up));
        let done = up.status().is_some_and(|s| {
            let g = &s.groups[0];
            g.instances.len() == 3
                && g.instances
                    .iter()
                    .all(|i| i.generation == 2 && i.in_rotation)
        });
        if done {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{:#?}", up.status());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        most >= 1,
        "stale instances held long-polls during the rollout"
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        long_polls(&up),
        0,
        "none left once every instance is current"
    );

    // Each stale instance was hinted before its permit: it reacted at once (drain with no
    // open connection, stop, exit), not a heartbeat interval later. The demo server's lame
    // duck on SIGTERM takes 1 s of this.
    let events = |kind: &str| -> Vec<drover_model::Event> {
        let (_, ev, _) = up.cli(&["events", "--kind", kind, "--json"]);
        serde_json::from_str(&ev).unwrap()
    };
    let permits = events("permit");
    let terminated = events("terminated");
    assert_eq!(permits.len(), 3, "{permits:#?}");
    for p in &permits {
        let gone = terminated
            .iter()
            .find(|t| t.instance == p.instance)
            .unwrap_or_else(|| panic!("{:?} terminated: {terminated:#?}", p.instance));
        let took = gone.at_ms - p.at_ms;
        eprintln!("{:?}: permit -> terminated {took} ms", p.instance);
        assert!(took < 2000, "{:?} took {took} ms to leave", p.instance);
    }
}

#[test]
fn a_broken_version_is_reverted_and_the_service_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let up = Up::start(dir.path(), &test_fleet(ing, subnet(), 3), api, ing);
    up.wait_healthy(3, Duration::from_secs(10));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(up.ingress, 2, false, stop.clone());

    // Watch the floor while the broken deploy runs.
    let watcher = {
        let stop = stop.clone();
        let api = up.api;
        std::thread::spawn(move || {
            let mut min_in_rotation = usize::MAX;
            while !stop.load(Ordering::SeqCst) {
                if let Ok((200, body)) = http(api, "GET", "/v1/status", None) {
                    let s: drover_model::api::FleetStatus = serde_json::from_str(&body).unwrap();
                    let n = s.groups[0]
                        .instances
                        .iter()
                        .filter(|i| i.in_rotation)
                        .count();
                    min_in_rotation = min_in_rotation.min(n);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            min_in_rotation
        })
    };
    let t0 = Instant::now();
    let (code, out, err) = up.cli(&[
        "deploy",
        "web",
        "app",
        "broken",
        "--wait",
        "--timeout",
        "2m",
    ]);
    assert_eq!(code, 1, "a failed deploy exits 1: {out}{err}");
    let took = t0.elapsed();
    eprintln!("broken deploy reported failed after {took:?}");
    assert!(err.contains("failed"), "{err}");
    // Fail fast: the crashing version fails its rollout at its third exit, well before
    // healthy_deadline (8s here), and says why with what the component printed.
    assert!(
        err.contains("exited 3 times before it was ever healthy (fail_after_exits = 3)"),
        "says why: {err}"
    );
    assert!(err.contains("exit status 1"), "the exit status: {err}");
    assert!(
        err.contains("demo-server: version broken crashes at start"),
        "the crash line: {err}"
    );
    // The failing instance's last lines, as `drover logs` shows them (its agent's, or the
    // flight recorder's), and where to read more.
    assert!(
        err.contains("(`drover logs web --instance i-"),
        "where its lines are: {err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains(" app | ") && l.contains("version broken crashes at start")),
        "its last lines: {err}"
    );
    assert!(
        took < Duration::from_secs(8),
        "failed after {took:?}, not by its deadline"
    );
    // auto_revert: generation 3 runs v1 again, and every instance ends up on it.
    wait_generation_everywhere(&up, 3, 3, Duration::from_secs(60));
    stop.store(true, Ordering::SeqCst);
    let r = traffic.join().unwrap();
    let floor = watcher.join().unwrap();
    assert_eq!(
        r.failed, 0,
        "the service never stopped answering: {:?}",
        r.errors
    );
    assert_eq!(
        floor, 3,
        "never below desired - max_unavailable = 3 in rotation"
    );
    assert_eq!(
        r.versions,
        ["v1"],
        "no answer ever came from the broken version"
    );
    let s = up.status().unwrap();
    assert_eq!(s.groups[0].versions, "app=v1");
    assert_eq!(s.groups[0].rollout.reverted_from, 2);
    let failure = s.groups[0].rollout.failure.clone().unwrap_or_default();
    assert!(
        failure.contains("crashes at start"),
        "status says why: {failure}"
    );
    let (_, ev, _) = up.cli(&["events", "--kind", "rollout"]);
    assert!(ev.contains("generation 2 failed"), "{ev}");
    let (_, ev_json, _) = up.cli(&["events", "--kind", "rollout", "--json"]);
    assert!(
        ev_json.contains("the last lines of i-")
            && ev_json.contains("`drover logs web --instance i-"),
        "the failure's event points at the flight record: {ev_json}"
    );
    assert!(ev.contains("going back to generation 1"), "{ev}");
    let (_, hist, _) = up.cli(&["history"]);
    assert!(hist.contains("automatic revert"), "{hist}");
}

#[test]
fn a_version_whose_artifact_cannot_be_fetched_fails_before_any_instance_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    // A small artifact for v1 only.
    let tgz = dir.path().join("app-v1.tar.gz");
    {
        let f = std::fs::File::create(&tgz).unwrap();
        let mut b = tar_builder(f);
        let data = b"hello";
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "README", &data[..]).unwrap();
        b.into_inner().unwrap().finish().unwrap();
    }
    let sha = sha256_hex(&std::fs::read(&tgz).unwrap());
    let artifact = format!(
        "artifact = {{ url = \"{}/app-{{version}}.tar.gz\", sha256 = \"{sha}\" }}\nrestart =",
        dir.path().display()
    );
    let text = test_fleet(ing, subnet(), 2).replacen("restart =", &artifact, 1);
    let up = Up::start(dir.path(), &text, api, ing);
    up.wait_healthy(2, Duration::from_secs(10));
    let before = up.status().unwrap();
    let (_, hist_before, _) = up.cli(&["history", "--json"]);

    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2", "--wait"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("cannot be fetched"), "{err}");
    assert!(err.contains("app-v2.tar.gz"), "names the artifact: {err}");
    assert!(err.contains("nothing was changed"), "{err}");
    let (_, hist_after, _) = up.cli(&["history", "--json"]);
    assert_eq!(hist_before, hist_after, "no revision stored");
    std::thread::sleep(Duration::from_secs(1));
    let after = up.status().unwrap();
    let ids = |s: &drover_model::api::FleetStatus| -> Vec<(String, u64)> {
        s.groups[0]
            .instances
            .iter()
            .map(|i| (i.id.clone(), i.generation))
            .collect()
    };
    assert_eq!(ids(&before), ids(&after), "no instance touched");
    let (_, ev, _) = up.cli(&["events", "--kind", "permit", "--json"]);
    assert_eq!(ev.trim(), "[]");
}

fn tar_builder(f: std::fs::File) -> tar::Builder<flate2::write::GzEncoder<std::fs::File>> {
    tar::Builder::new(flate2::write::GzEncoder::new(
        f,
        flate2::Compression::default(),
    ))
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
