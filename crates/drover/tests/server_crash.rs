//! End to end: `drover server` killed with SIGKILL in the middle of a rollout. Instances keep
//! running without it; after a restart the rollout resumes from stored state, hands out no
//! extra permit and never takes the group below its floor.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_rollout_survives_a_server_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let text = fleet_text(ing, subnet(), 3)
        .replace("min_healthy_time = \"2s\"", "min_healthy_time = \"3s\"")
        .replace("drain_timeout = \"10s\"", "drain_timeout = \"1s\"");
    std::fs::write(dir.path().join("drover.toml"), &text).unwrap();
    let _cleanup = KillAgents(dir.path().to_path_buf());
    let mut server = start_server(dir.path(), api);
    // A handle for the CLI and status (not owning the process).
    let up = Up::for_server(dir.path(), api, ing);
    up.apply_when_up(Duration::from_secs(10));
    up.wait_healthy(3, Duration::from_secs(10));
    // Let the first rollout finish so generation 1 is the known good one.
    std::thread::sleep(Duration::from_secs(4));

    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2"]);
    assert_eq!(code, 0, "{out}{err}");
    // Wait for the first permit, then kill the server mid-rollout.
    let t0 = Instant::now();
    loop {
        let (_, ev, _) = up.cli(&["events", "--kind", "permit", "--json"]);
        let n = serde_json::from_str::<Vec<drover_model::Event>>(&ev)
            .map(|v| v.len())
            .unwrap_or(0);
        if n >= 1 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no permit yet");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = up.status().unwrap();
    unsafe { libc::kill(server.id() as i32, libc::SIGKILL) };
    server.wait().unwrap();

    // Static stability: every instance keeps serving on its own address without the server.
    let serving: Vec<std::net::SocketAddr> = before.groups[0]
        .instances
        .iter()
        .filter(|i| i.state == drover_model::api::InstanceState::Healthy)
        .map(|i| format!("{}:8080", i.addr).parse().unwrap())
        .collect();
    assert!(serving.len() >= 3, "{before:#?}");
    std::thread::sleep(Duration::from_millis(500));
    for a in &serving {
        assert!(get(*a).is_ok(), "{a} stopped serving when the server died");
    }

    // Restart: the rollout resumes and completes.
    let mut server = start_server(dir.path(), api);
    let t0 = Instant::now();
    let mut min_in_rotation = usize::MAX;
    let mut seen_status = false;
    loop {
        if let Some(s) = up.status() {
            let g = &s.groups[0];
            let n = g.instances.iter().filter(|i| i.in_rotation).count();
            // Right after a restart nothing is known yet; count once every instance reported.
            if g.instances.iter().all(|i| i.last_heartbeat_ms.is_some()) {
                seen_status = true;
            }
            if seen_status {
                min_in_rotation = min_in_rotation.min(n);
            }
            if g.generation == 2
                && g.instances.len() == 3
                && g.instances
                    .iter()
                    .all(|i| i.generation == 2 && i.in_rotation)
            {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "rollout did not resume: {:#?}",
            up.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, ev, _) = up.cli(&["events", "--kind", "permit", "--json"]);
    let permits: Vec<drover_model::Event> = serde_json::from_str(&ev).unwrap();
    assert_eq!(
        permits.len(),
        3,
        "exactly one permit per replaced instance: {permits:#?}"
    );
    let (_, ev, _) = up.cli(&["events", "--kind", "terminating", "--json"]);
    let forced: Vec<drover_model::Event> = serde_json::from_str(&ev).unwrap();
    assert!(
        forced.is_empty(),
        "no instance was terminated without its permit: {forced:#?}"
    );
    assert!(seen_status);
    assert!(
        min_in_rotation >= 3,
        "never below the floor (3) once instances reported: {min_in_rotation}"
    );
    let (_, ev, _) = up.cli(&["events", "--kind", "rollout"]);
    assert!(ev.contains("rollout to generation 2"), "{ev}");

    // Stop the server; instances outlive it by design and are stopped by the guard.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    server.wait().unwrap();
}

/// Issue 20, items 4 and 10, across a SIGKILL of the server:
/// - an instance launched with its own token is never spoken for by its group's token, even
///   before its agent has reported to the restarted server (the binding is stored with the
///   instance, not learnt from its heartbeats): a jamming heartbeat (seq = 2^64-1) is refused;
/// - an agent the store has no record of (a server that died between a launch and its
///   record leaves one) is terminated by the restarted server, with an event, and the group
///   gets back to its count.
#[test]
fn after_a_restart_own_tokens_hold_and_unrecorded_agents_are_terminated() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let text = fleet_text(ing, subnet(), 2);
    std::fs::write(dir.path().join("drover.toml"), &text).unwrap();
    let _cleanup = KillAgents(dir.path().to_path_buf());
    let mut server = start_server(dir.path(), api);
    let up = Up::for_server(dir.path(), api, ing);
    up.apply_when_up(Duration::from_secs(10));
    up.wait_healthy(2, Duration::from_secs(20));
    let before = up.status().unwrap();
    let g = &before.groups[0];
    let (kept, lost) = (g.instances[0].clone(), g.instances[1].clone());
    let agent_pid = |id: &str| -> i32 {
        std::fs::read_to_string(dir.path().join(format!("data.instances/{id}/agent.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (kept_pid, lost_pid) = (agent_pid(&kept.id), agent_pid(&lost.id));

    unsafe { libc::kill(server.id() as i32, libc::SIGKILL) };
    server.wait().unwrap();
    // `kept`'s agent says nothing to the restarted server until the end of the check.
    unsafe { libc::kill(kept_pid, libc::SIGSTOP) };
    // As if the server had died between `lost`'s launch and its record.
    {
        let store = drover_store::SqliteStore::open(&dir.path().join("data/drover.db")).unwrap();
        use drover_store::Store;
        store
            .commit(
                vec![drover_store::Write::RemoveInstance(lost.id.clone())],
                1,
            )
            .unwrap();
    }
    let mut server = start_server(dir.path(), api);
    let group = "web/local";
    let t0 = Instant::now();
    while up.status().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no server");
        std::thread::sleep(Duration::from_millis(50));
    }
    let admin = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let (_, group_secret) =
        group_agent_token(up.api, admin.trim(), &dir.path().join("data"), group);
    let jam = app_heartbeat(
        &kept.id,
        group,
        kept.generation,
        &kept.addr,
        drover_model::api::AgentPhase::Running,
        u64::MAX,
        "v1",
        drover_model::api::ComponentState::Healthy,
    );
    let (code, out) = http_as(
        up.api,
        "POST",
        "/v1/agent/heartbeat",
        Some(&serde_json::to_string(&jam).unwrap()),
        Some(&group_secret),
    )
    .unwrap();
    unsafe { libc::kill(kept_pid, libc::SIGCONT) };
    assert_eq!(
        code, 403,
        "the group's token spoke for an instance launched with its own: {out}"
    );

    // The unrecorded agent is stopped, and said so; the group is back to 2, `kept` among them.
    let t0 = Instant::now();
    while alive(lost_pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the unrecorded agent {} (pid {lost_pid}) still runs",
            lost.id
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, ev, _) = up.cli(&["events", "--kind", "terminating", "--json"]);
    let events: Vec<drover_model::Event> = serde_json::from_str(&ev).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.instance.as_deref() == Some(lost.id.as_str())
                && e.message.contains("never recorded")),
        "{events:#?}"
    );
    up.wait_healthy(2, Duration::from_secs(30));
    let after = up.status().unwrap();
    assert!(
        after.groups[0].instances.iter().any(|i| i.id == kept.id),
        "{after:#?}"
    );
    assert!(alive(kept_pid));
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    server.wait().unwrap();
}
