//! End to end (issue 15): a region with `provider = "sim"` validates; `drover server` launches
//! its instances without starting any process; a fake agent heartbeats for them over HTTP with
//! its group's agent token and they turn healthy; a deploy replaces them through permits, each
//! leaver ending by `POST /v1/agent/exit`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use drover_model::api::{AgentPhase, ComponentState, FleetStatus, HeartbeatReply, InstanceState};
use drover_test_support::agent as api;

/// What the fake agent knows of one instance.
#[derive(Default)]
struct Agent {
    seq: u64,
    generation: u64,
    addr: String,
    version: String,
    leaving: bool,
}

/// The fake agent: the agent API's requests of `drover_test_support::agent`, on a runtime of
/// its own (the test itself is blocking), ended with it.
struct Fake {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    urls: api::Urls,
    /// `Bearer TOKEN` of the group's agent token.
    auth: String,
    agents: BTreeMap<String, Agent>,
    ended: BTreeSet<String>,
    permits: usize,
}

/// How long one request of the fake agent may take.
const WITHIN: Duration = Duration::from_secs(5);

impl Fake {
    fn new(api: std::net::SocketAddr, token: &str) -> Fake {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Fake {
            rt,
            client: reqwest::Client::new(),
            urls: api::Urls::new(&format!("http://{api}")),
            auth: api::bearer(token),
            agents: BTreeMap::new(),
            ended: BTreeSet::new(),
            permits: 0,
        }
    }

    fn beat(&mut self, id: &str, phase: AgentPhase) -> HeartbeatReply {
        let a = self.agents.get_mut(id).unwrap();
        a.seq += 1;
        let state = match phase {
            AgentPhase::Running => ComponentState::Healthy,
            _ => ComponentState::Stopped,
        };
        let instance = api::Instance {
            id,
            group: "web/lab",
            generation: a.generation,
            addr: &a.addr,
        };
        let app = api::component("app", &a.version, state);
        let hb = api::heartbeat(instance, phase, a.seq, vec![app]);
        let reply = self.rt.block_on(api::send_heartbeat(
            &self.client,
            &self.urls,
            Some(&self.auth),
            &hb,
            WITHIN,
        ));
        reply
            .unwrap_or_else(|e| panic!("heartbeat of {id}: {e}"))
            .unwrap_or_else(|| panic!("heartbeat of {id}: the answer is not a HeartbeatReply"))
    }

    /// `POST /v1/agent/exit` for `id`: whether the server ended it with this call.
    fn exit(&self, id: &str, status: &str) -> Result<bool, api::ApiError> {
        let auth = Some(self.auth.as_str());
        self.rt.block_on(api::report_exit(
            &self.client,
            &self.urls,
            auth,
            id,
            status,
            WITHIN,
        ))
    }

    /// One round: an agent for every instance status lists, a heartbeat each, and for those
    /// told `leave_soon` a permit poll; a permitted one drains, stops and ends.
    fn round(&mut self, status: &FleetStatus) {
        for i in status.groups.iter().flat_map(|g| &g.instances) {
            if self.ended.contains(&i.id) {
                continue;
            }
            let version = status.groups[0].versions.clone();
            let a = self.agents.entry(i.id.clone()).or_default();
            if a.addr.is_empty() {
                a.generation = i.generation;
                a.addr = i.addr.clone();
                // "app=v2" -> "v2"
                a.version = version.split('=').nth(1).unwrap_or("v1").to_string();
            }
        }
        let ids: Vec<String> = self
            .agents
            .keys()
            .filter(|id| !self.ended.contains(*id))
            .cloned()
            .collect();
        for id in ids {
            let reply = self.beat(&id, AgentPhase::Running);
            assert!(reply.known, "{id} unknown to the server");
            if !reply.wants_permit_poll() || self.agents[&id].leaving {
                continue;
            }
            let p = self.rt.block_on(api::poll_permit(
                &self.client,
                &self.urls,
                Some(&self.auth),
                &id,
                0,
            ));
            let p = p.unwrap_or_else(|e| panic!("permit poll of {id}: {e}"));
            if !p.permit {
                continue;
            }
            self.permits += 1;
            self.agents.get_mut(&id).unwrap().leaving = true;
            self.beat(&id, AgentPhase::Draining);
            self.beat(&id, AgentPhase::Stopping);
            let ended = self.exit(&id, "left on its permit");
            assert!(ended.unwrap(), "{id}: the exit ended it");
            self.ended.insert(id);
        }
    }
}

fn healthy_on(status: &FleetStatus, generation: u64) -> usize {
    status
        .groups
        .iter()
        .flat_map(|g| &g.instances)
        .filter(|i| {
            i.state == InstanceState::Healthy && i.generation == generation && i.in_rotation
        })
        .count()
}

#[test]
fn sim_instances_are_launched_without_processes_heartbeated_healthy_and_replaced_by_a_deploy() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    std::fs::write(dir.path().join("drover.toml"), sim_fleet(subnet())).unwrap();
    // The balancer process the server starts outlives it by design: stopped last.
    let _cleanup = KillAgents(dir.path().to_path_buf());
    let _server = KillOnDrop(start_server_with(
        dir.path(),
        api,
        &["--heartbeat-interval", "1s"],
    ));
    let up = Up::for_server(dir.path(), api, ing);
    let (code, out, err) = up.cli(&["validate", "drover.toml"]);
    assert_eq!(code, 0, "{out}{err}");
    up.apply_when_up(Duration::from_secs(20));

    // The group's agent token, as the load tool gets it.
    let (code, body) = http(
        up.api,
        "POST",
        "/v1/tokens",
        Some(r#"{"scope":"agent","group":"web/lab","name":"fake-agent"}"#),
    )
    .unwrap();
    assert_eq!(code, 201, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut fake = Fake::new(up.api, token["token"].as_str().unwrap());

    // Launched: three instances, recorded, nothing started.
    let t0 = Instant::now();
    let status = loop {
        let s = up.status().unwrap();
        if s.groups.iter().map(|g| g.instances.len()).sum::<usize>() == 3 {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not launched: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.groups[0].provider, "sim");
    for i in &status.groups[0].instances {
        assert_eq!(i.state, InstanceState::Launching, "{i:?}");
        assert!(i.addr.starts_with("127."), "{i:?}");
    }
    assert!(
        !dir.path().join("data.instances").exists(),
        "a sim launch starts no agent and makes no instance directory"
    );
    let first: BTreeSet<String> = status.groups[0]
        .instances
        .iter()
        .map(|i| i.id.clone())
        .collect();

    // The fake agent reports: healthy, in rotation.
    let t0 = Instant::now();
    loop {
        let s = up.status().unwrap();
        fake.round(&s);
        if healthy_on(&up.status().unwrap(), 1) == 3 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not healthy: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(fake.permits, 0);

    // A deploy replaces every instance through permits.
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2"]);
    assert_eq!(code, 0, "{out}{err}");
    let t0 = Instant::now();
    let done = loop {
        let s = up.status().unwrap();
        fake.round(&s);
        let s = up.status().unwrap();
        let ids: BTreeSet<String> = s.groups[0].instances.iter().map(|i| i.id.clone()).collect();
        if healthy_on(&s, 2) == 3 && ids.len() == 3 {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "deploy not done: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(done.groups[0].generation, 2);
    let now: BTreeSet<String> = done.groups[0]
        .instances
        .iter()
        .map(|i| i.id.clone())
        .collect();
    assert!(now.is_disjoint(&first), "{first:?} -> {now:?}");
    assert_eq!(fake.permits, 3, "each old instance left on a permit");
    assert!(fake.ended.is_superset(&first));

    // Status: summaries without instances, and one group's instances a page at a time.
    let (code, body) = http(up.api, "GET", "/v1/status?instances=none", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let summary: FleetStatus = serde_json::from_str(&body).unwrap();
    assert_eq!(summary.groups[0].healthy, 3);
    assert_eq!(summary.groups[0].rollout.current, 3);
    assert!(summary.groups[0].instances.is_empty());
    let (code, body) = http(
        up.api,
        "GET",
        "/v1/status?group=web/lab&page=2&per_page=2",
        None,
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let page: FleetStatus = serde_json::from_str(&body).unwrap();
    let mut sorted: Vec<String> = now.iter().cloned().collect();
    sorted.sort();
    assert_eq!(
        page.groups[0]
            .instances
            .iter()
            .map(|i| i.id.clone())
            .collect::<Vec<_>>(),
        vec![sorted[2].clone()],
        "page 2 of 2 a page: the third id"
    );
    let (code, _) = http(up.api, "GET", "/v1/status?group=nope/lab", None).unwrap();
    assert_eq!(code, 404);
    let (code, _) = http(up.api, "GET", "/v1/status?page=2", None).unwrap();
    assert_eq!(code, 400, "a page without its group");
    let (code, out, err) = up.cli(&["status", "web", "--per-page", "2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("web/lab: page 1 of 2 (3 instances, 2 a page); --page 2 for the next"),
        "{out}"
    );
    assert_eq!(out.matches("i-0").count(), 2, "{out}");

    // The exit call: an unknown instance is 404; a token of another group may not end one.
    let unknown = fake.exit("i-999999", "").unwrap_err();
    assert!(unknown.is_not_found(), "{unknown}");
    let (code, _) = http(
        up.api,
        "POST",
        "/v1/agent/exit",
        Some(&format!(
            r#"{{"instance":"{}"}}"#,
            now.iter().next().unwrap()
        )),
    )
    .unwrap();
    assert_eq!(code, 403, "the admin token is not an agent's");
}
