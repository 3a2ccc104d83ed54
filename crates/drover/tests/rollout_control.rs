//! End to end: a person acts on a rollout under way. A paused rollout hands out no permit,
//! also after a server SIGKILL and restart; resumed, it finishes; aborted, the group goes back
//! to its last good generation.

mod common;

use std::time::Duration;

use common::*;
use drover_test_support::wait_until;

fn permits(up: &Up) -> usize {
    let (_, ev, _) = up.cli(&["events", "--kind", "permit", "--json"]);
    serde_json::from_str::<Vec<drover_model::Event>>(&ev)
        .map(|v| v.len())
        .unwrap_or(0)
}

#[test]
fn a_paused_rollout_stays_paused_across_a_restart_then_resumes_or_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = KillAgents(dir.path().to_path_buf());
    let (api, ing) = (free_port(), free_port());
    let text = fleet_text(ing, subnet(), 3)
        .replace("drain_timeout = \"10s\"", "drain_timeout = \"1s\"")
        .replace("healthy_deadline = \"30s\"", "healthy_deadline = \"5s\"");
    std::fs::write(dir.path().join("drover.toml"), &text).unwrap();
    let mut server = start_server(dir.path(), api);
    let up = Up::for_server(dir.path(), api, ing);
    up.apply_when_up(Duration::from_secs(10));
    up.wait_healthy(3, Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(3));

    // Nothing to pause yet: a clear refusal.
    let (code, _, err) = up.cli(&["rollout", "pause", "web"]);
    assert_eq!(code, 1);
    assert!(err.contains("no rollout under way for web"), "{err}");

    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_until(Duration::from_secs(30), "a first permit", || {
        permits(&up) >= 1
    });
    let (code, out, err) = up.cli(&["rollout", "pause", "web"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("web/local: generation 2: paused"), "{out}");
    let (_, again, _) = up.cli(&["rollout", "pause", "web"]);
    assert!(again.contains("already paused"), "{again}");
    let paused_at = permits(&up);

    // The server dies and comes back: still paused. Longer than min_healthy_time and than
    // healthy_deadline: no permit, and the rollout does not fail.
    unsafe { libc::kill(server.id() as i32, libc::SIGKILL) };
    server.wait().unwrap();
    let mut server = start_server(dir.path(), api);
    wait_until(Duration::from_secs(10), "the server answers", || {
        up.status().is_some()
    });
    std::thread::sleep(Duration::from_secs(7));
    let s = up.status().unwrap();
    let r = &s.groups[0].rollout;
    assert!(r.in_progress && r.paused, "{r:?}");
    assert_eq!(r.phase, "paused");
    assert!(r.stale > 0, "stale instances wait: {r:?}");
    assert_eq!(permits(&up), paused_at, "no permit while paused");
    let (_, st, _) = up.cli(&["status"]);
    assert!(st.contains("paused at gen 2"), "{st}");

    // Resumed: it finishes.
    let (code, out, err) = up.cli(&["rollout", "resume", "web"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("resumed"), "{out}");
    wait_until(
        Duration::from_secs(60),
        "the rollout to v2 finishes",
        || {
            up.status().is_some_and(|s| {
                let g = &s.groups[0];
                g.rollout.phase == "done"
                    && g.instances.len() == 3
                    && g.instances
                        .iter()
                        .all(|i| i.generation == 2 && i.in_rotation)
            })
        },
    );
    let (_, ev, _) = up.cli(&["events", "--kind", "rollout"]);
    assert!(ev.contains("paused (drover rollout pause)"), "{ev}");
    assert!(ev.contains("resumed (drover rollout resume)"), "{ev}");

    // Abort: back to the last good generation (v2), every instance on it.
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v3"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = up.cli(&["rollout", "abort", "web"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("aborted; going back to generation 2"), "{out}");
    wait_until(Duration::from_secs(60), "back on v2", || {
        up.status().is_some_and(|s| {
            let g = &s.groups[0];
            g.versions == "app=v2"
                && g.rollout.reverted_from == 3
                && g.instances.len() == 3
                && g.instances
                    .iter()
                    .all(|i| i.generation == g.generation && i.in_rotation)
        })
    });
    let s = up.status().unwrap();
    assert!(
        s.groups[0]
            .rollout
            .failure
            .as_deref()
            .is_some_and(|f| f.contains("aborted")),
        "{:?}",
        s.groups[0].rollout
    );
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    server.wait().unwrap();
}
