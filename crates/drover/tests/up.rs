//! End to end: `drover up` on the example fleet, with real processes, sockets and signals.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn up_serves_round_robin_heals_components_and_replaces_dead_agents() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let up = Up::start(dir.path(), &fleet_text(ing, subnet(), 3), api, ing);
    let took = up.wait_healthy(3, Duration::from_secs(10));
    eprintln!("3 healthy instances after {took:?}");

    // Answered by instance 1, 2, 3 in turn.
    let answers: Vec<String> = (0..6)
        .map(|_| instance_of(&get(up.ingress).unwrap()))
        .collect();
    let distinct: BTreeSet<&String> = answers.iter().collect();
    assert_eq!(distinct.len(), 3, "three instances answer: {answers:?}");
    assert_eq!(
        answers[0..3],
        answers[3..6],
        "round robin in turn: {answers:?}"
    );
    assert!(get(up.ingress).unwrap().contains("version v1"));

    // kill -9 of a component: serving again within 1 s.
    let s = up.status().unwrap();
    let victim = &s.groups[0].instances[0];
    let pid = victim.components[0].pid.unwrap() as i32;
    let addr: std::net::SocketAddr = format!("{}:8080", victim.addr).parse().unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t0 = Instant::now();
    while !alive(pid) && get(addr).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "component not serving again within 1 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    loop {
        if get(addr).is_ok() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "component not serving again within 1 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("component serving again after {:?}", t0.elapsed());
    // The restart is reported and recorded.
    let t0 = Instant::now();
    loop {
        let (_, out, _) = up.cli(&["events", "--kind", "respawned", "--json"]);
        if out.contains(&victim.id) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no respawned event: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // kill -9 of an agent: its instance is replaced, and once the loss is seen the balancer
    // sends it nothing.
    up.wait_healthy(3, Duration::from_secs(5));
    let s = up.status().unwrap();
    let dead = s.groups[0].instances[1].id.clone();
    let agent_pid: i32 =
        std::fs::read_to_string(dir.path().join(format!("data.instances/{dead}/agent.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    // The agent is the lean `drover-agent` binary, built beside `drover`.
    let exe = std::fs::read_link(format!("/proc/{agent_pid}/exe")).unwrap();
    assert_eq!(
        exe.file_name().unwrap(),
        "drover-agent",
        "the local provider started {exe:?}"
    );
    unsafe { libc::kill(agent_pid, libc::SIGKILL) };
    let t0 = Instant::now();
    loop {
        let s = up.status().unwrap();
        let ids: Vec<&str> = s.groups[0]
            .instances
            .iter()
            .map(|i| i.id.as_str())
            .collect();
        if !ids.contains(&dead.as_str()) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "dead instance still listed: {ids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..30 {
        let body = get(up.ingress).expect("every request through the balancer succeeds");
        assert_ne!(
            instance_of(&body),
            dead,
            "a new connection went to the dead instance"
        );
    }
    let took = up.wait_healthy(3, Duration::from_secs(10));
    eprintln!("replacement healthy {took:?} after the loss was seen");
    let s = up.status().unwrap();
    assert_eq!(s.groups[0].instances.len(), 3);
    let (_, ev, _) = up.cli(&["events", "--instance", &dead]);
    assert!(ev.contains("lost"), "the loss is an event: {ev}");

    // `events --follow` streams new events as they happen.
    let mut follow = std::process::Command::new(BIN)
        .args(["events", "--follow", "--json", "--kind", "respawned"])
        .env("DROVER_SERVER", up.server())
        .env("DROVER_DATA_DIR", up.dir.join("data"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(follow.stdout.take().unwrap()));
    // The one respawn so far comes first, then a new one when it happens.
    let first: drover_model::Event = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first.instance.as_deref(), Some(victim.id.as_str()));
    let s = up.status().unwrap();
    let pid = s.groups[0].instances[2].components[0].pid.unwrap() as i32;
    let id = s.groups[0].instances[2].id.clone();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let next: drover_model::Event = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(next.instance.as_deref(), Some(id.as_str()), "{next:?}");
    assert!(next.seq > first.seq);
    let _ = follow.kill();
    let _ = follow.wait();
}

#[test]
fn stopping_up_leaves_no_process_and_restart_keeps_history() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let text = fleet_text(ing, subnet(), 2);
    let mut up = Up::start(dir.path(), &text, api, ing);
    up.wait_healthy(2, Duration::from_secs(10));
    let pids = up.pids();
    assert!(pids.len() >= 4, "2 agents and 2 components: {pids:?}");
    let (code, hist1, _) = up.cli(&["history", "--json"]);
    assert_eq!(code, 0);
    let (_, events1, _) = up.cli(&["events", "--json"]);
    let events1: Vec<drover_model::Event> = serde_json::from_str(&events1).unwrap();

    // Ctrl-C: everything stops, exit 0.
    up.signal(libc::SIGINT);
    assert_eq!(
        up.wait_exit(Duration::from_secs(20)),
        Some(0),
        "drover up exits 0 on Ctrl-C"
    );
    for p in &pids {
        assert!(!alive(*p), "process {p} outlived drover up (SIGINT)");
    }

    // Restart on the same data directory: same revisions and events, then SIGKILL.
    let mut up = Up::start(dir.path(), &text, api, ing);
    up.wait_healthy(2, Duration::from_secs(10));
    let (_, hist2, _) = up.cli(&["history", "--json"]);
    assert_eq!(
        hist1, hist2,
        "the same file applied again makes no new revision"
    );
    let (_, events2, _) = up.cli(&["events", "--json"]);
    let events2: Vec<drover_model::Event> = serde_json::from_str(&events2).unwrap();
    assert_eq!(
        events2[..events1.len()],
        events1[..],
        "earlier events are kept, in order"
    );
    assert!(events2.len() > events1.len());
    let pids = up.pids();
    up.signal(libc::SIGKILL);
    up.wait_exit(Duration::from_secs(5)).unwrap();
    let t0 = Instant::now();
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "processes outlived SIGKILL of drover up: {:?}",
            pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // And SIGTERM.
    let mut up = Up::start(dir.path(), &text, api, ing);
    up.wait_healthy(2, Duration::from_secs(10));
    let pids = up.pids();
    up.signal(libc::SIGTERM);
    assert_eq!(up.wait_exit(Duration::from_secs(20)), Some(0));
    for p in &pids {
        assert!(!alive(*p), "process {p} outlived drover up (SIGTERM)");
    }
}

#[test]
fn broken_fleet_file_is_refused_with_its_location_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let good = fleet_text(ing, subnet(), 2);
    let up = Up::start(dir.path(), &good, api, ing);
    up.wait_healthy(2, Duration::from_secs(10));
    let (_, before, _) = up.cli(&["history", "--json"]);
    let status_before = up.status().unwrap();

    let bad = good.replace("min = 2, desired = 2", "min = 5, desired = 2");
    assert_ne!(bad, good);
    let bad_file = dir.path().join("bad.toml");
    std::fs::write(&bad_file, &bad).unwrap();
    let line = bad.lines().position(|l| l.contains("min = 5")).unwrap() + 1;

    // validate (offline), apply (through the server): exit 1, file:line:column, the field, the rule.
    for args in [vec!["validate", "bad.toml"], vec!["apply", "bad.toml"]] {
        let (code, _, err) = up.cli(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.contains(&format!("bad.toml:{line}:")),
            "{args:?} locates the error: {err}"
        );
        assert!(err.contains("services.web.capacity.min"), "{err}");
        assert!(err.contains("min <= desired <= max"), "{err}");
        assert!(err.contains("nothing was changed"), "{err}");
    }
    let (_, after, _) = up.cli(&["history", "--json"]);
    assert_eq!(before, after, "no revision was stored");
    let status_after = up.status().unwrap();
    assert_eq!(status_before.revision, status_after.revision);
    assert_eq!(status_after.groups[0].desired, 2);

    // JSON output of a refusal carries every located error.
    let (code, out, _) = up.cli(&["apply", "bad.toml", "--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["code"], "invalid_fleet");
    assert_eq!(v["errors"][0]["line"], line);

    // A bad API request: 4xx with a JSON error, nothing changes.
    let (code, body) = http(up.api, "POST", "/v1/apply", Some("{not json")).unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("\"code\":\"bad_request\""), "{body}");
    let (code, body) = http(up.api, "GET", "/v1/nope", None).unwrap();
    assert_eq!(code, 404, "{body}");
    let (code, body) = http(up.api, "GET", "/v1/apply", None).unwrap();
    assert_eq!(code, 405, "{body}");
    assert!(body.contains("\"code\":\"method_not_allowed\""), "{body}");
    let big = format!(
        "{{\"file\":\"x\",\"toml\":\"{}\"}}",
        "a".repeat(3 * 1024 * 1024)
    );
    let (code, body) = http(up.api, "POST", "/v1/apply", Some(&big)).unwrap();
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("\"code\":\"too_large\""), "{body}");
    let (code, body) = http(up.api, "GET", "/v1/events?kind=explosion", None).unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("unknown event kind"), "{body}");

    // An unreachable server is exit code 3, with what to do.
    let out = std::process::Command::new(BIN)
        .args([
            "status",
            "--server",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--server"));

    // `drover up` with a broken file starts nothing.
    let dir2 = tempfile::tempdir().unwrap();
    let mut up2 = Up::start(dir2.path(), &bad, free_port(), ing + 1);
    assert_eq!(up2.wait_exit(Duration::from_secs(10)), Some(1));
    let err = std::fs::read_to_string(dir2.path().join("up.err")).unwrap();
    assert!(err.contains(&format!(":{line}:")), "{err}");
    assert!(
        !dir2.path().join("data/drover.db").exists(),
        "nothing was created"
    );
}

#[test]
fn agent_keeps_running_its_components_without_a_server() {
    // Static stability: an agent whose server is unreachable keeps serving and respawning.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let block = subnet();
    let addr = format!("127.{block}.9.9");
    let plan = serde_json::json!({
        "fleet": "t", "service": "web", "region": "local", "generation": 1, "revision": 1,
        "components": [{
            "name": "app", "runtime": "process", "version": "v1", "command": "{drover}",
            "args": ["demo-server", "--listen", "{addr}:{port.http}"],
            "ports": {"http": port},
            "health": {"type": "http", "port": "http", "path": "/healthz", "interval": "200ms", "timeout": "100ms", "healthy_threshold": 1, "unhealthy_threshold": 3},
            "restart": {"initial_delay": "100ms", "max_delay": "1s", "reset_after": "10s"},
            "stop_grace": "2s", "stop_signal": "SIGTERM"
        }]
    });
    let plan_file = dir.path().join("plan.json");
    std::fs::write(&plan_file, plan.to_string()).unwrap();
    let dead_server = format!("http://127.0.0.1:{}", free_port());
    let mut agent = std::process::Command::new(BIN)
        .args([
            "agent",
            "--instance",
            "i-1",
            "--group",
            "web/local",
            "--addr",
            &addr,
        ])
        .arg("--server")
        .arg(&dead_server)
        .arg("--plan-file")
        .arg(&plan_file)
        .arg("--dir")
        .arg(dir.path().join("i-1"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let target: std::net::SocketAddr = format!("{addr}:{port}").parse().unwrap();
    let t0 = Instant::now();
    while get(target).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "component never served"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(get(target).is_ok(), "still serving with no server");
    // Kill the component: respawned without any server.
    let (_, body) = http(target, "GET", "/", None).unwrap();
    assert!(body.contains("version v1"), "{body}");
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", agent.id())).unwrap();
    let pid: i32 = children
        .split_whitespace()
        .next()
        .expect("the agent has a component child")
        .parse()
        .unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t0 = Instant::now();
    while alive(pid) && t0.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = Instant::now();
    while get(target).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "not respawned without a server"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", agent.id())).unwrap();
    assert!(!children.contains(&pid.to_string()), "a new process serves");
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    loop {
        if let Some(st) = agent.try_wait().unwrap() {
            assert!(st.success(), "agent exits 0 on SIGTERM");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "agent did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(get(target).is_err(), "components stop with their agent");
}
