//! End to end: waves across regions. Three `local` regions (each its own loopback subnet and
//! ingress) in two waves. A good version goes wave by wave and ends on every region; a version
//! bad only under load is caught by the canary of the first wave and reverted there, and the
//! regions of the later wave never launch it. `deploy --region` takes a version to one
//! region by hand and holds the others until a deploy names them; a broken one is reverted
//! there to what a wave released, and the held regions never launch it.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn fleet(ports: [u16; 3], blocks: [u8; 3]) -> String {
    format!(
        r#"[fleet]
name = "waves"

[regions.a]
provider = "local"
subnet = "127.{ba}.0.0/16"

[regions.b]
provider = "local"
subnet = "127.{bb}.0.0/16"

[regions.c]
provider = "local"
subnet = "127.{bc}.0.0/16"

[services.web]
regions = ["a", "b", "c"]
capacity = {{ min = 1, desired = 2, max = 4 }}
ingress = {{ listen = "127.0.0.1:{pa}", port = "http", listen_in = {{ b = "127.0.0.1:{pb}", c = "127.0.0.1:{pc}" }} }}

[services.web.rollout]
max_surge = 1
min_healthy_time = "1s"
healthy_deadline = "30s"
drain_timeout = "2s"
canary = {{ instances = 1, bake = "4s" }}
analysis = {{ metrics = [{{ metric = "error_rate", direction = "lower", max_ratio = 1.5, tolerance = 0.02 }}] }}
waves = [["a"], ["b", "c"]]
wave_bake = "2s"

[services.web.components.app]
runtime = "process"
version = "v1"
command = "{{drover}}"
args = ["demo-server", "--listen", "{{addr}}:{{port.http}}", "--error-rate-on-versions", "v3=0.2", "--crash-on-versions", "broken"]
ports = {{ http = 8080 }}
health = {{ type = "http", port = "http", path = "/healthz", interval = "500ms", timeout = "400ms", healthy_threshold = 1, unhealthy_threshold = 3 }}
custom_metrics = {{ error_rate = {{ port = "http", path = "/error_rate" }} }}
restart = {{ initial_delay = "200ms" }}
stop_grace = "2s"
drain_signal = "SIGUSR1"
"#,
        pa = ports[0],
        pb = ports[1],
        pc = ports[2],
        ba = blocks[0],
        bb = blocks[1],
        bc = blocks[2],
    )
}

fn events(up: &Up, kind: &str) -> Vec<drover_model::Event> {
    let (_, ev, _) = up.cli(&["events", "--kind", kind, "--json", "--limit", "10000"]);
    serde_json::from_str(&ev).unwrap_or_default()
}

fn on_everywhere(up: &Up, versions: &str) -> bool {
    up.status().is_some_and(|s| {
        s.groups.len() == 3
            && s.groups.iter().all(|g| {
                g.versions == versions
                    && g.instances.len() == 2
                    && g.instances
                        .iter()
                        .all(|i| i.generation == g.generation && i.in_rotation)
            })
    })
}

/// `drover up` of the three-region fleet, every instance healthy.
fn start(dir: &std::path::Path) -> Up {
    let api = free_port();
    let ports = [free_port(), free_port(), free_port()];
    let blocks = [subnet(), subnet(), subnet()];
    let up = Up::start(dir, &fleet(ports, blocks), api, ports[0]);
    up.wait_healthy(6, Duration::from_secs(20));
    up
}

#[test]
fn a_deploy_goes_wave_by_wave_and_a_bad_one_never_leaves_the_first_wave() {
    let dir = tempfile::tempdir().unwrap();
    let up = start(dir.path());

    // A good version, through both waves.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(up.ingress, 2, false, stop.clone());
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2", "--wait", "--timeout", "120s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(on_everywhere(&up, "app=v2"), "{:#?}", up.status());
    // The order: a done, then wave 2 reached b and c, then their launches on v2.
    let applied = events(&up, "applied");
    let wave2 = applied
        .iter()
        .find(|e| {
            e.message
                .contains("wave 2 of revision 2 reaches web/b, web/c")
        })
        .unwrap_or_else(|| panic!("{applied:#?}"))
        .seq;
    let done_a = events(&up, "rollout")
        .into_iter()
        .find(|e| {
            e.group.as_deref() == Some("web/a") && e.message.contains("rollout to generation 2")
        })
        .map(|e| e.seq)
        .expect("web/a done");
    assert!(done_a < wave2, "wave 2 started after wave 1 was done");
    let launched = events(&up, "launched");
    for g in ["web/b", "web/c"] {
        let first_v2 = launched
            .iter()
            .find(|e| e.group.as_deref() == Some(g) && e.message.contains("app=v2"))
            .unwrap_or_else(|| panic!("{g} launched v2: {launched:#?}"))
            .seq;
        assert!(first_v2 > wave2, "{g} launched v2 only after wave 2 began");
    }
    stop.store(true, Ordering::SeqCst);
    let r = traffic.join().unwrap();
    assert_eq!(r.failed, 0, "{:?}", r.errors);

    // A version bad under load: the canary of wave 1 (region a) catches it; b and c never run it.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(up.ingress, 2, false, stop.clone());
    let t0 = Instant::now();
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v3", "--wait", "--timeout", "120s"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("web/a: rollout to generation 3 failed: canary analysis failed"),
        "{err}"
    );
    eprintln!("bad version caught in wave 1 after {:?}", t0.elapsed());
    let t0 = Instant::now();
    while !on_everywhere(&up, "app=v2") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "back on v2: {:#?}",
            up.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    let r = traffic.join().unwrap();
    // The canary is one of region a's three instances in rotation (two old, one surge) and
    // fails 20% of its requests: failures stay within its share of traffic (a third of
    // 20%), and a bad version on every instance of a would have failed 20%.
    let share = r.failed as f64 / (r.ok + r.failed).max(1) as f64;
    eprintln!(
        "{} of {} requests ({:.2}%) failed during the bad canary",
        r.failed,
        r.ok + r.failed,
        share * 100.0
    );
    assert!(share < 0.2 / 3.0 + 0.02, "failed share {share:.3}");
    assert!(
        r.errors.iter().all(|e| e.contains("status 500")),
        "{:?}",
        r.errors
    );
    let launched = events(&up, "launched");
    for g in ["web/b", "web/c"] {
        assert!(
            !launched
                .iter()
                .any(|e| e.group.as_deref() == Some(g) && e.message.contains("app=v3")),
            "{g} never launched v3: {launched:#?}"
        );
    }
    let s = up.status().unwrap();
    for g in &s.groups {
        assert!(
            !g.rollout.wave_pending,
            "{}: nothing waits after the revert",
            g.group
        );
        assert_eq!(g.rollout.wave, if g.group == "web/a" { 1 } else { 2 });
    }
}

#[test]
fn deploy_region_takes_one_region_by_hand_and_holds_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let up = start(dir.path());
    let revision = |up: &Up| up.status().and_then(|s| s.revision);
    let group = |up: &Up, g: &str| {
        up.status()
            .and_then(|s| s.groups.into_iter().find(|x| x.group == g))
            .unwrap_or_else(|| panic!("no group {g}"))
    };

    // A region the service does not run in: a clear error, nothing stored.
    let before = revision(&up);
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2", "--region", "x"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("service web does not run in region \"x\"; its regions: a, b, c"),
        "{err}"
    );
    assert_eq!(revision(&up), before);

    // v2 to region b only (a later wave): b rolls out at once, a and c are held by hand.
    let (code, out, err) = up.cli(&[
        "deploy",
        "web",
        "app",
        "v2",
        "--region",
        "b",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let b = group(&up, "web/b");
    assert_eq!(b.versions, "app=v2");
    assert!(b.instances.iter().all(|i| i.generation == b.generation));
    for g in ["web/a", "web/c"] {
        let s = group(&up, g);
        assert_eq!(s.versions, "app=v1", "{g}");
        assert!(s.rollout.held, "{g}: {:?}", s.rollout);
        assert_eq!(s.rollout.phase, "held", "{g}");
    }
    let (_, table, _) = up.cli(&["status"]);
    assert!(table.contains("held by hand"), "{table}");

    // An apply of the unchanged file keeps v2 where it went and the others held; no wave
    // lets them go on its own.
    let (code, out, err) = up.cli(&["apply", up.file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(group(&up, "web/b").versions, "app=v2");
    for g in ["web/a", "web/c"] {
        let s = group(&up, g);
        assert!(s.rollout.held && s.versions == "app=v1", "{g}: {s:?}");
    }
    let launched = events(&up, "launched");
    assert!(
        !launched
            .iter()
            .any(|e| e.group.as_deref() != Some("web/b") && e.message.contains("app=v2")),
        "only web/b launched v2: {launched:#?}"
    );

    // A file that changes the service lets the held groups go (by waves): its plan says so;
    // the unchanged file's plan keeps them held by hand.
    let (_, plan, _) = up.cli(&["plan", up.file.to_str().unwrap()]);
    assert!(!plan.contains("plan web/a"), "nothing changes: {plan}");
    let v3 = dir.path().join("v3.toml");
    std::fs::write(
        &v3,
        std::fs::read_to_string(&up.file)
            .unwrap()
            .replace("version = \"v1\"", "version = \"v3\""),
    )
    .unwrap();
    let (code, plan, err) = up.cli(&["plan", v3.to_str().unwrap()]);
    assert_eq!(code, 0, "{plan}{err}");
    assert!(plan.contains("plan web/a: generation 1 -> 2"), "{plan}");
    assert!(plan.contains("plan web/c: held for wave 2"), "{plan}");
    assert!(!plan.contains("held by hand"), "{plan}");

    // The same deploy without --region carries it on to the others, wave by wave (a, then c)
    // with no new revision.
    let rev = revision(&up);
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2", "--wait", "--timeout", "120s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(on_everywhere(&up, "app=v2"), "{:#?}", up.status());
    assert_eq!(
        revision(&up),
        rev,
        "no new revision: the change was already stored"
    );
    let applied = events(&up, "applied");
    assert!(
        applied.iter().any(|e| e
            .message
            .contains("deploy web app v2: the change of revision")
            && e.message.contains("reaches web/a, web/c")),
        "{applied:#?}"
    );
    assert!(
        applied
            .iter()
            .any(|e| e.message.contains("wave 2 of revision") && e.message.contains("web/c")),
        "{applied:#?}"
    );
    let s = up.status().unwrap();
    assert!(s
        .groups
        .iter()
        .all(|g| !g.rollout.held && !g.rollout.wave_pending));

    // A version that crashes at start, to c by hand: it fails and is reverted to v2. c got
    // v2 from a release (wave 2), which stores no revision: the revert rebuilds v2 from the
    // revision the release's plans name (not from the broken deploy's, the next number),
    // and a and b, held by hand, never launch the broken version.
    let (code, out, err) = up.cli(&[
        "deploy",
        "web",
        "app",
        "broken",
        "--region",
        "c",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("web/c: rollout to generation"), "{err}");
    let t0 = Instant::now();
    while !on_everywhere(&up, "app=v2") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "back on v2: {:#?}",
            up.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let launched = events(&up, "launched");
    assert!(
        !launched
            .iter()
            .any(|e| e.group.as_deref() != Some("web/c") && e.message.contains("app=broken")),
        "only web/c launched the broken version: {launched:#?}"
    );
    let applied = events(&up, "applied");
    assert!(
        applied.iter().any(|e| e
            .message
            .contains("automatic revert after failed rollout of web/c")
            && e.message.contains("\"broken\" -> \"v2\"")),
        "{applied:#?}"
    );
    let s = up.status().unwrap();
    assert!(
        s.groups
            .iter()
            .all(|g| !g.rollout.held && !g.rollout.wave_pending),
        "{s:#?}"
    );
}
