//! End to end: `deploy --wait` waits for the fleet (until the last stale instance is gone, so
//! only the new version answers once it returns), and drains end early when a component closes
//! its kept-alive connections on its `drain_signal`. Real binary, real processes, real sockets.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use drover_model::{Event, EventKind};

/// The example fleet (its app has `drain_signal = "SIGUSR1"`, `drain_timeout` is 10 s) with
/// quick health checks.
fn test_fleet(ingress: u16, block: u8, desired: u32) -> String {
    let text = fleet_text(ingress, block, desired)
        .replace("min_healthy_time = \"2s\"", "min_healthy_time = \"1s\"");
    assert!(
        text.contains("drain_signal = \"SIGUSR1\""),
        "the example sets the demo's drain signal"
    );
    assert!(text.contains("drain_timeout = \"10s\""));
    text
}

/// Every answer one keep-alive client got: when it was read, and the version that sent it.
type Answers = Arc<Mutex<Vec<(Instant, String)>>>;

/// `threads` clients, each on one kept-alive connection (a new one when the server closes it,
/// retrying a GET once when an idle connection was closed under it, as HTTP clients do), until
/// `stop`. Returns the failures.
fn keep_alive_load(
    addr: SocketAddr,
    threads: usize,
    answers: Answers,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (answers, stop) = (answers.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut failures = Vec::new();
                    let mut conn: Option<TcpStream> = None;
                    while !stop.load(Ordering::SeqCst) {
                        match get_keep_alive(addr, &mut conn) {
                            Ok(body) => {
                                let v = body
                                    .split("version ")
                                    .nth(1)
                                    .and_then(|x| x.split(',').next())
                                    .unwrap_or("?")
                                    .to_string();
                                answers.lock().unwrap().push((Instant::now(), v));
                            }
                            Err(e) => failures.push(e.to_string()),
                        }
                        std::thread::sleep(Duration::from_millis(3));
                    }
                    failures
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

fn events(up: &Up, kind: EventKind) -> Vec<Event> {
    let (code, out, err) = up.cli(&["events", "--kind", kind.as_str(), "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Per instance that left on a permit: (permit event, drained event).
fn drains(up: &Up) -> Vec<(Event, Event)> {
    let drained = events(up, EventKind::Drained);
    let permits = events(up, EventKind::Permit);
    // Its agent reports the drain in every heartbeat after it; the server records it once.
    assert_eq!(drained.len(), permits.len(), "{drained:#?}");
    permits
        .into_iter()
        .map(|p| {
            let d = drained
                .iter()
                .find(|d| d.instance == p.instance && d.seq > p.seq)
                .unwrap_or_else(|| panic!("no drained event after {p:?}: {drained:#?}"))
                .clone();
            (p, d)
        })
        .collect()
}

#[test]
fn once_deploy_wait_returns_every_answer_comes_from_the_new_version() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    // Without a drain signal, kept-alive connections stay open: each drain runs to its
    // timeout, and the stale instances answer all along. `--wait` must outwait them.
    let text = test_fleet(ing, subnet(), 3)
        .replace("drain_signal = \"SIGUSR1\"", "")
        .replace("drain_timeout = \"10s\"", "drain_timeout = \"2s\"");
    let up = Up::start(dir.path(), &text, api, ing);
    up.wait_healthy(3, Duration::from_secs(15));

    let stop = Arc::new(AtomicBool::new(false));
    let answers: Answers = Default::default();
    let load = keep_alive_load(up.ingress, 4, answers.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));

    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2", "--wait", "--timeout", "2m"]);
    let returned = Instant::now();
    assert_eq!(code, 0, "deploy: {out}{err}");
    // Load on, for a while after the return.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let failures = load.join().unwrap();
    let answers = answers.lock().unwrap().clone();

    let before: Vec<&String> = answers
        .iter()
        .filter(|(t, _)| *t < returned)
        .map(|(_, v)| v)
        .collect();
    let after: Vec<&(Instant, String)> = answers.iter().filter(|(t, _)| *t >= returned).collect();
    let old_after: Vec<Duration> = after
        .iter()
        .filter(|(_, v)| v != "v2")
        .map(|(t, _)| *t - returned)
        .collect();
    eprintln!(
        "{} answers before the return ({} from v1), {} after ({} not from v2); {} failed\n{out}",
        before.len(),
        before.iter().filter(|v| v.as_str() == "v1").count(),
        after.len(),
        old_after.len(),
        failures.len()
    );
    assert!(
        before.iter().any(|v| v.as_str() == "v1"),
        "v1 answered first"
    );
    assert!(after.len() > 100, "the load went on after the return");
    assert!(
        old_after.is_empty(),
        "{} answers from the old version after `deploy --wait` returned, the last {:?} after",
        old_after.len(),
        old_after.last()
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");

    // The summary says how long the drains took; and the fleet agrees that it is done.
    assert!(out.contains("done in"), "{out}");
    assert!(out.contains("3 stale instance(s) drained in"), "{out}");
    assert!(out.contains("after its permit"), "{out}");
    let s = up.status().unwrap();
    let g = &s.groups[0];
    assert_eq!(g.instances.len(), 3, "{g:#?}");
    assert!(g.instances.iter().all(|i| i.generation == 2));
    // Each permit's drain is an event, reported by the instance's agent: here, each ran to
    // its timeout with the load's connections open.
    let drains = drains(&up);
    assert_eq!(drains.len(), 3, "{drains:#?}");
    for (_, d) in &drains {
        assert!(
            d.message
                .starts_with("drain timeout reached after 2.0s with")
                && d.message.contains("no component has a drain_signal"),
            "{}",
            d.message
        );
    }
    assert!(out.contains("drained in 2.0s"), "{out}");
}

#[test]
fn with_the_demo_servers_drain_signal_a_keep_alive_drain_ends_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let up = Up::start(dir.path(), &test_fleet(ing, subnet(), 2), api, ing);
    up.wait_healthy(2, Duration::from_secs(15));

    let stop = Arc::new(AtomicBool::new(false));
    let answers: Answers = Default::default();
    let load = keep_alive_load(up.ingress, 4, answers.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2", "--wait", "--timeout", "2m"]);
    assert_eq!(code, 0, "deploy: {out}{err}");
    stop.store(true, Ordering::SeqCst);
    let failures = load.join().unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");

    let drains = drains(&up);
    assert_eq!(drains.len(), 2, "{drains:#?}");
    for (permit, drained) in &drains {
        let took = drained.at_ms - permit.at_ms;
        eprintln!(
            "{}: permit → drained {took} ms: {}",
            permit.instance.as_deref().unwrap_or("?"),
            drained.message
        );
        assert!(
            drained.message.starts_with("drained in")
                && drained.message.contains("no open connection left"),
            "the connections closed before the 10 s drain_timeout: {}",
            drained.message
        );
        assert!(
            took < 1_000,
            "a keep-alive drain with the drain signal ends within 1 s (drain_timeout 10s): {took} ms"
        );
    }
    // And the keep-alive clients were under load on those instances while they drained: each
    // old instance answered until close to its permit.
    let answers = answers.lock().unwrap();
    assert!(answers.iter().filter(|(_, v)| v == "v1").count() > 100);
    // Under a second, the summary says it in milliseconds.
    assert!(out.contains("2 stale instance(s) drained in "), "{out}");
    assert!(
        out.split("drained in ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .split(" to ")
            .all(|d| d.ends_with("ms")),
        "{out}"
    );
}

#[test]
fn deploy_wait_of_the_preferred_version_follows_the_rollout_under_way() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let up = Up::start(dir.path(), &test_fleet(ing, subnet(), 2), api, ing);
    up.wait_healthy(2, Duration::from_secs(15));

    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2"]);
    assert_eq!(code, 0, "{out}{err}");
    let t0 = Instant::now();
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2", "--wait", "--timeout", "2m"]);
    let took = t0.elapsed();
    assert_eq!(code, 0, "{out}{err}");
    eprintln!("second deploy --wait took {took:?}:\n{out}");
    assert!(out.contains("no changes"), "nothing new was stored: {out}");
    assert!(
        out.contains("already preferred; following the rollout under way"),
        "{out}"
    );
    assert!(out.contains("done in"), "{out}");
    // It returned only once the rollout was over: two instances replaced, each healthy for
    // min_healthy_time (1 s) before its stale one got a permit.
    assert!(took > Duration::from_secs(2), "{took:?}");
    let s = up.status().unwrap();
    let g = &s.groups[0];
    assert!(!g.rollout.in_progress, "{g:#?}");
    assert_eq!(g.instances.len(), 2, "no stale instance left: {g:#?}");
    assert!(g
        .instances
        .iter()
        .all(|i| i.generation == 2 && i.in_rotation));

    // Nothing under way: it returns at once.
    let t0 = Instant::now();
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("following the rollout"), "{out}");
    assert!(out.contains("done in"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}
