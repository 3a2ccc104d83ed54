//! End to end: service discovery on the two-tier example. `front` (behind the ingress) calls
//! `core` by its discovery name through its agent's DNS responder; its agent also keeps
//! `$DROVER_PEERS`. A deploy of core under load through front's ingress fails no request: a
//! leaving core instance stops only once every front agent dropped it.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use drover_model::api::PeersReply;

fn fleet(ingress: u16, block: u8) -> String {
    // Core stops listening the moment it is told to stop (no lame duck): only the wait for
    // the front agents keeps its last requests from failing.
    let text = example_text("two-tier", ingress, block).replace(
        "\"--message\", \"core {version}\"]",
        "\"--message\", \"core {version}\", \"--lame-duck\", \"0s\"]",
    );
    assert!(text.contains("--lame-duck"));
    text
}

/// The peers file of every front instance: (instance, its content).
fn peer_files(up: &Up) -> Vec<(String, PeersReply)> {
    let s = up.status().unwrap();
    let mut out = Vec::new();
    for i in s
        .groups
        .iter()
        .filter(|g| g.service == "front")
        .flat_map(|g| &g.instances)
    {
        let path = up
            .dir
            .join("data.instances")
            .join(&i.id)
            .join("peers/app.json");
        if let Ok(text) = std::fs::read_to_string(&path) {
            out.push((i.id.clone(), serde_json::from_str(&text).unwrap()));
        }
    }
    out
}

fn core_in_rotation(up: &Up) -> Vec<String> {
    let s = up.status().unwrap();
    let mut ids: Vec<String> = s
        .groups
        .iter()
        .filter(|g| g.service == "core")
        .flat_map(|g| &g.instances)
        .filter(|i| i.in_rotation)
        .map(|i| i.addr.clone())
        .collect();
    ids.sort();
    ids
}

#[test]
fn front_finds_core_by_name_and_a_core_deploy_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ingress) = (free_port(), free_port());
    let up = Up::start(dir.path(), &fleet(ingress, subnet()), api, ingress);
    up.wait_healthy(5, Duration::from_secs(30));

    // Through the ingress: front, then core by its name.
    let t0 = Instant::now();
    let body = loop {
        let b = get(up.ingress).unwrap_or_default();
        if b.contains("-> core v1") || t0.elapsed() > Duration::from_secs(10) {
            break b;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        body.starts_with("front v1") && body.contains("-> core v1"),
        "{body}"
    );

    // $DROVER_PEERS of each front instance: core's three instances with their port.
    let t0 = Instant::now();
    loop {
        let files = peer_files(&up);
        let want = core_in_rotation(&up);
        let ok = files.len() == 2
            && files.iter().all(|(_, f)| {
                let mut got: Vec<String> =
                    f.services["core"].iter().map(|p| p.addr.clone()).collect();
                got.sort();
                got == want && f.services["core"].iter().all(|p| p.ports["http"] == 8080)
            });
        if ok {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "peers files {files:#?} against core in rotation {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A deploy of core under load through front: no failed request, and front's answers move
    // from core v1 to core v2.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(up.ingress, 2, false, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let (code, out, err) = up.cli(&["deploy", "core", "app", "v2", "--wait", "--timeout", "120s"]);
    assert_eq!(code, 0, "{out}{err}");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let r = traffic.join().unwrap();
    eprintln!(
        "core deploy under load through front: {} ok, {} failed",
        r.ok, r.failed
    );
    assert!(r.ok > 100, "{r:?}", r = (r.ok, &r.errors));
    assert_eq!(r.failed, 0, "{:?}", r.errors);
    let body = get(up.ingress).unwrap();
    assert!(body.contains("-> core v2"), "{body}");
    // Every leaving core instance waited for the front agents: their drains were confirmed,
    // not cut by drain_timeout.
    let (_, ev, _) = up.cli(&["events", "--kind", "drained", "--json", "--limit", "10000"]);
    let drained: Vec<drover_model::Event> = serde_json::from_str(&ev).unwrap();
    let core: Vec<_> = drained
        .iter()
        .filter(|e| e.group.as_deref() == Some("core/local"))
        .collect();
    assert_eq!(core.len(), 3, "{drained:#?}");
    assert!(
        core.iter().all(|e| !e.message.contains("timeout")),
        "{core:#?}"
    );
    // ... and they waited: a core leaver's drain is confirmed no sooner than the DNS TTL
    // after the front agents applied the set without it (without the wait, a core instance
    // with no ingress connection would stop within milliseconds of its permit).
    for e in &core {
        let took = e
            .message
            .split("drained in ")
            .nth(1)
            .and_then(|t| t.split(':').next())
            .unwrap_or_default();
        let ms = match (took.strip_suffix("ms"), took.strip_suffix('s')) {
            (Some(ms), _) => ms.parse::<f64>().unwrap_or(0.0),
            (None, Some(s)) => s.parse::<f64>().unwrap_or(0.0) * 1000.0,
            _ => 0.0,
        };
        assert!(ms >= 1000.0, "drained after {took}: {}", e.message);
    }

    // Events read like a log: `--limit N` is the latest N, oldest first; `--since` by time.
    let all = |args: &[&str]| -> Vec<u64> {
        let (code, out, err) = up.cli(args);
        assert_eq!(code, 0, "{out}{err}");
        let evs: Vec<drover_model::Event> = serde_json::from_str(&out).unwrap();
        evs.iter().map(|e| e.seq).collect()
    };
    let every = all(&["events", "--json"]);
    assert!(every.len() > 10);
    assert_eq!(
        all(&["events", "--json", "--limit", "3"]),
        every[every.len() - 3..].to_vec()
    );
    assert_eq!(all(&["events", "--json", "--since", "1h"]), every);
    assert_eq!(
        all(&["events", "--json", "--after", "2", "--limit", "2"]),
        vec![3, 4]
    );
    let (code, _, err) = up.cli(&["events", "--since", "ten minutes"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--since"), "{err}");
}
