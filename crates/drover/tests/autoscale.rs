//! End to end: a group autoscales on a custom metric its components serve (the demo server's
//! request rate over its capacity): it grows toward max under load and shrinks back to min,
//! with no failed request; `drover scale` sets a count autoscaling goes on from.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn fleet(ingress: u16, block: u8) -> String {
    fleet_text(ingress, block, 2)
        .replace("min = 2, desired = 2, max = 6", "min = 2, desired = 2, max = 4")
        .replace("drain_timeout = \"10s\"", "drain_timeout = \"2s\"")
        .replace(
            "[services.web.rollout]",
            "autoscale = { metric = \"custom:load\", target = 0.5, scale_out_cooldown = \"2s\", scale_in_stabilization = \"6s\", tolerance = 0.1, warmup = \"1s\" }\n\n[services.web.rollout]",
        )
        .replace(
            "ports = { http = 8080 }",
            "ports = { http = 8080 }\ncustom_metrics = { load = { port = \"http\", path = \"/utilization\" } }",
        )
        .replace(
            "\"--message\", \"hello from web {version}\"]",
            "\"--message\", \"hello from web {version}\", \"--capacity-rps\", \"50\"]",
        )
}

fn desired(up: &Up) -> u32 {
    up.status().map(|s| s.groups[0].desired).unwrap_or(0)
}

/// Waits until `f` holds of the fleet's status (printed when it does not).
fn wait_for_status(
    up: &Up,
    what: &str,
    timeout: Duration,
    f: impl Fn(&drover_model::api::FleetStatus) -> bool,
) {
    drover_test_support::wait_until_or(
        timeout,
        what,
        || up.status().is_some_and(|s| f(&s)),
        || format!("{:#?}", up.status()),
    )
}

#[test]
fn grows_toward_max_under_load_and_shrinks_back_to_min_without_failures() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let text = fleet(ing, subnet());
    drover_model::parse_fleet(&text, "test").unwrap();
    let up = Up::start(dir.path(), &text, api, ing);
    up.wait_healthy(2, Duration::from_secs(10));
    assert_eq!(desired(&up), 2);

    // Light load all along (well under target); heavy load for a while.
    let stop_light = Arc::new(AtomicBool::new(false));
    let light = load_paced(
        up.ingress,
        1,
        false,
        Duration::from_millis(50),
        stop_light.clone(),
    );
    let stop_heavy = Arc::new(AtomicBool::new(false));
    let heavy = load(up.ingress, 2, false, stop_heavy.clone());

    let t0 = Instant::now();
    wait_for_status(
        &up,
        "scale out to max (4) and serve",
        Duration::from_secs(30),
        |s| {
            let g = &s.groups[0];
            g.desired == 4 && g.instances.iter().filter(|i| i.in_rotation).count() == 4
        },
    );
    eprintln!("at max, serving, {:?} after the load started", t0.elapsed());
    let s = up.status().unwrap();
    let a = s.groups[0]
        .autoscale
        .clone()
        .expect("status shows the autoscaler");
    assert_eq!(a.metric, "custom:load");
    assert!(a.observed.unwrap() > 0.5, "{a:?}");
    assert!(
        s.groups[0].desired_reason.contains("autoscale out"),
        "{}",
        s.groups[0].desired_reason
    );
    let (_, table, _) = up.cli(&["status"]);
    assert!(
        table.contains("custom:load"),
        "the status table shows the metric: {table}"
    );

    stop_heavy.store(true, Ordering::SeqCst);
    let heavy = heavy.join().unwrap();
    let t1 = Instant::now();
    wait_for_status(&up, "scale in to min (2)", Duration::from_secs(40), |s| {
        let g = &s.groups[0];
        g.desired == 2 && g.instances.len() == 2
    });
    eprintln!(
        "back to min {:?} after the heavy load stopped",
        t1.elapsed()
    );
    assert!(
        t1.elapsed() >= Duration::from_secs(5),
        "scale-in waits for the stabilization window"
    );
    stop_light.store(true, Ordering::SeqCst);
    let light = light.join().unwrap();
    assert_eq!(
        heavy.failed + light.failed,
        0,
        "no failed request: {:?} {:?}",
        heavy.errors,
        light.errors
    );

    let (_, ev, _) = up.cli(&["events", "--kind", "scaled"]);
    assert!(ev.contains("autoscale out"), "{ev}");
    assert!(ev.contains("autoscale in"), "{ev}");
    let (_, ev, _) = up.cli(&["events", "--kind", "permit"]);
    assert!(
        ev.contains("scale-in"),
        "scale-in goes through permits: {ev}"
    );

    // A manual count: refused outside min..max; accepted inside, then autoscaling goes on.
    let (code, _, err) = up.cli(&["scale", "web", "9"]);
    assert_eq!(code, 1);
    assert!(err.contains("min..max = 2..4"), "{err}");
    assert_eq!(desired(&up), 2, "a refused scale changes nothing");
    let (code, out, err) = up.cli(&["scale", "web", "3"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 -> 3"), "{out}");
    let s = up.status().unwrap();
    assert_eq!(s.groups[0].desired_reason, "manual: drover scale");
    // With no load the autoscaler brings it back to min, after its window.
    let t2 = Instant::now();
    wait_for_status(
        &up,
        "autoscaling takes over from the manual count",
        Duration::from_secs(30),
        |s| s.groups[0].desired == 2,
    );
    assert!(
        t2.elapsed() >= Duration::from_secs(5),
        "not before the stabilization window"
    );
}
