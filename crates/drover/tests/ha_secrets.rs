//! End to end (issue 16, item 4): three `drover server`s on one etcd store, each with a data
//! directory of its own (as on three machines), over HTTPS with the CA they make. The CA and
//! the agent-token key live in the store, so every server presents a certificate of the same
//! CA, forwards to the leader over HTTPS, and accepts the tokens the instances already hold
//! after a failover: no instance is replaced and no new agent token is made. Skipped (with
//! the reason) when `etcd` is not installed, unless `DROVER_CI=1`.
#![cfg(feature = "etcd")]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use drover_model::api::{AgentPhase, ComponentState, FleetStatus, Health, InstanceState};
use drover_model::token::TokenInfo;
use drover_store::local_etcd::{etcd_or_skip, LocalEtcd};

const PREFIX: &str = "/drover/ha-secrets";

/// An HTTPS client that trusts one CA, and nothing else.
struct Https {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Https {
    fn new(ca_pem: &[u8]) -> Https {
        let client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).unwrap())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Https { rt, client }
    }

    /// `METHOD https://127.0.0.1:API/PATH`; None when the server does not answer.
    fn call(
        &self,
        api: u16,
        method: &str,
        path: &str,
        body: Option<String>,
        token: Option<&str>,
    ) -> Option<(u16, String)> {
        self.call_served(api, method, path, body, token)
            .map(|(code, body, _)| (code, body))
    }

    /// [`Https::call`], and the id of the server that answered a read itself, if one did.
    fn call_served(
        &self,
        api: u16,
        method: &str,
        path: &str,
        body: Option<String>,
        token: Option<&str>,
    ) -> Option<(u16, String, Option<String>)> {
        let url = format!("https://127.0.0.1:{api}{path}");
        let mut req = self
            .client
            .request(method.parse().unwrap(), url)
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        self.rt.block_on(async {
            let resp = req.send().await.ok()?;
            let code = resp.status().as_u16();
            let served = resp
                .headers()
                .get("x-drover-served-by")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            Some((code, resp.text().await.ok()?, served))
        })
    }

    fn health(&self, api: u16) -> Option<Health> {
        let (code, body) = self.call(api, "GET", "/v1/health", None, None)?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }
}

/// One server, on its own data directory (`DIR/data`). Dropped in this order: the server,
/// then the balancer process it left (it outlives its server by design), then the directory.
struct Member {
    child: Option<KillOnDrop>,
    _leftovers: KillAgents,
    dir: tempfile::TempDir,
    api: u16,
}

impl Member {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("server-{}.err", self.api)))
            .unwrap_or_default()
    }
}

fn logs(members: &[Member]) -> String {
    members
        .iter()
        .map(|m| {
            let log = m.log();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            format!(
                "--- server {}\n{}",
                m.api,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn wait_role(https: &Https, members: &[Member], i: usize, role: &str, within: Duration) {
    let t0 = Instant::now();
    while https.health(members[i].api).map(|h| h.role) != Some(role.to_string()) {
        assert!(
            t0.elapsed() < within,
            "server {i} not {role} within {within:?}: {:?}\n{}",
            https.health(members[i].api),
            logs(members)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One heartbeat as instance `id` (healthy, generation 1), with its own instance token.
fn beat(https: &Https, api: u16, id: &str, addr: &str, seq: u64, token: &str) -> Option<u16> {
    let hb = app_heartbeat(
        id,
        "web/lab",
        1,
        addr,
        AgentPhase::Running,
        seq,
        "v1",
        ComponentState::Healthy,
    );
    let body = serde_json::to_string(&hb).unwrap();
    https
        .call(api, "POST", "/v1/agent/heartbeat", Some(body), Some(token))
        .map(|(code, _)| code)
}

fn status(https: &Https, api: u16, admin: &str) -> Option<FleetStatus> {
    match https.call(api, "GET", "/v1/status", None, Some(admin))? {
        (200, body) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

fn files_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn servers_on_their_own_disks_share_the_ca_and_agent_key_through_the_store() {
    let Some(bin) = etcd_or_skip("servers_on_their_own_disks_share_the_ca_and_agent_key") else {
        return;
    };
    let etcd = LocalEtcd::start(&bin, 3).unwrap();
    let store = etcd.url(PREFIX);
    let mut members: Vec<Member> = (0..3)
        .map(|_| {
            let dir = tempfile::tempdir().unwrap();
            Member {
                child: None,
                _leftovers: KillAgents(dir.path().to_path_buf()),
                dir,
                api: free_port(),
            }
        })
        .collect();
    let list = members
        .iter()
        .map(|m| format!("https://127.0.0.1:{}", m.api))
        .collect::<Vec<_>>()
        .join(",");
    let spawn = |m: &Member| {
        KillOnDrop(start_server_with(
            m.dir.path(),
            m.api,
            &[
                "--tls",
                "--store",
                &store,
                "--servers",
                &list,
                "--heartbeat-interval",
                "1s",
                "--silent-after",
                "3s",
            ],
        ))
    };
    members[0].child = Some(spawn(&members[0]));
    let t0 = Instant::now();
    while !members[0].data().join("ca.pem").exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", logs(&members));
        std::thread::sleep(Duration::from_millis(20));
    }
    let ca = std::fs::read(members[0].data().join("ca.pem")).unwrap();
    let https = Https::new(&ca);
    wait_role(&https, &members, 0, "leader", Duration::from_secs(20));
    for m in members.iter_mut().skip(1) {
        m.child = Some(spawn(m));
    }
    for i in 1..3 {
        wait_role(&https, &members, i, "follower", Duration::from_secs(20));
    }

    // One CA for all, from the store; its key and the agent-token key on no server's disk.
    for m in &members {
        assert_eq!(std::fs::read(m.data().join("ca.pem")).unwrap(), ca);
        let files = files_in(&m.data());
        for secret in ["ca.key", "agent-token.key"] {
            assert!(!files.contains(secret), "{secret} in {files:?}");
        }
    }
    let admin = std::fs::read_to_string(members[0].data().join("admin.token")).unwrap();
    let admin = admin.trim().to_string();

    // The CLI, through a follower over HTTPS, trusting the CA as another server wrote it.
    std::fs::write(
        members[0].dir.path().join("drover.toml"),
        sim_fleet(subnet()),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["apply", "drover.toml"])
        .env(
            "DROVER_SERVER",
            format!("https://127.0.0.1:{}", members[1].api),
        )
        .env("DROVER_TOKEN", &admin)
        .env("DROVER_CA", members[2].data().join("ca.pem"))
        .env_remove("DROVER_DATA_DIR")
        .current_dir(members[0].dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Followers answer reads of the store themselves, with tokens as stored now.
    let id_of = |i: usize| https.health(members[i].api).unwrap().server.unwrap().id;
    for (i, m) in members.iter().enumerate().skip(1) {
        let (code, body, served) = https
            .call_served(m.api, "GET", "/v1/revisions", None, Some(&admin))
            .unwrap();
        assert_eq!(code, 200, "{body}");
        assert_eq!(served, Some(id_of(i)), "{body}");
        assert!(body.contains("\"number\":1"), "{body}");
        // Status is the leader's (its live health): forwarded.
        let (code, _, served) = https
            .call_served(m.api, "GET", "/v1/status", None, Some(&admin))
            .unwrap();
        assert_eq!((code, served), (200, None));
    }
    let (code, body) = https
        .call(
            members[1].api,
            "POST",
            "/v1/tokens",
            Some(r#"{"scope":"read","name":"dash"}"#.into()),
            Some(&admin),
        )
        .unwrap();
    assert_eq!(code, 201, "{body}");
    let made: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (read_token, read_id) = (
        made["token"].as_str().unwrap().to_string(),
        made["id"].as_str().unwrap().to_string(),
    );
    let (code, body, served) = https
        .call_served(
            members[2].api,
            "GET",
            "/v1/events?limit=3&newest=true",
            None,
            Some(&read_token),
        )
        .unwrap();
    assert_eq!(
        (code, served.as_deref()),
        (200, Some(id_of(2).as_str())),
        "{body}"
    );
    let (code, body, _) = https
        .call_served(members[2].api, "GET", "/v1/tokens", None, Some(&read_token))
        .unwrap();
    assert_eq!(code, 403, "a read token lists no tokens: {body}");
    let (code, body) = https
        .call(
            members[1].api,
            "DELETE",
            &format!("/v1/tokens/{read_id}"),
            None,
            Some(&admin),
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, body, _) = https
        .call_served(members[2].api, "GET", "/v1/events", None, Some(&read_token))
        .unwrap();
    assert_eq!(
        code, 401,
        "revoked on the leader, refused by a follower at once: {body}"
    );

    // The instances' tokens, as the launches carry them: from the store's key.
    let (code, body) = https
        .call(members[2].api, "GET", "/v1/tokens", None, Some(&admin))
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let tokens_before: Vec<TokenInfo> = serde_json::from_str(&body).unwrap();
    let agent_id = tokens_before
        .iter()
        .filter(|t| t.group.as_deref() == Some("web/lab") && t.revoked_at_ms.is_none())
        .map(|t| t.id.clone())
        .max()
        .expect("an agent token for web/lab");
    let key = agent_key_in(&drover_store::EtcdStore::open(&etcd.config(PREFIX)).unwrap());
    let group_secret = derive_agent_token(&key, &agent_id);
    let t0 = Instant::now();
    let instances: Vec<(String, String)> = loop {
        let s = status(&https, members[2].api, &admin);
        let found: Vec<(String, String)> = s
            .iter()
            .flat_map(|s| &s.groups)
            .flat_map(|g| &g.instances)
            .map(|i| (i.id.clone(), i.addr.clone()))
            .collect();
        if found.len() == 3 {
            break found;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{s:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let ids: BTreeSet<String> = instances.iter().map(|(id, _)| id.clone()).collect();
    let own: Vec<String> = instances
        .iter()
        .map(|(id, _)| drover_model::token::instance_token(&group_secret, &agent_id, id))
        .collect();
    let mut seq = 0;
    let mut round = |api: u16| -> Vec<Option<u16>> {
        seq += 1;
        instances
            .iter()
            .zip(&own)
            .map(|((id, addr), token)| beat(&https, api, id, addr, seq, token))
            .collect()
    };
    // Heartbeats to a follower reach the leader (forwarded over HTTPS).
    let t0 = Instant::now();
    loop {
        let codes = round(members[2].api);
        assert!(
            codes.iter().all(|c| *c == Some(200)),
            "{codes:?}\n{}",
            logs(&members)
        );
        let healthy = status(&https, members[2].api, &admin).map_or(0, |s| {
            s.groups
                .iter()
                .flat_map(|g| &g.instances)
                .filter(|i| i.state == InstanceState::Healthy)
                .count()
        });
        if healthy == 3 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", logs(&members));
        std::thread::sleep(Duration::from_millis(300));
    }

    // The leader, on its own disk, is lost. Another server, with another disk, leads, and
    // the instances go on with the tokens they hold.
    members[0].child.take();
    let killed = Instant::now();
    let mut refused = Vec::new();
    let new_leader = loop {
        let codes = round(members[2].api);
        refused.extend(
            codes
                .into_iter()
                .flatten()
                .filter(|c| *c != 200 && *c != 503),
        );
        if let Some(i) = (1..3).find(|&i| {
            https
                .health(members[i].api)
                .is_some_and(|h| h.role == "leader")
        }) {
            break i;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no new leader: {}",
            logs(&members)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "server {new_leader} leads {} ms after the leader's SIGKILL",
        killed.elapsed().as_millis()
    );
    // Past the silence limit (3 s) under the new leader: every heartbeat is taken.
    let led = Instant::now();
    while led.elapsed() < Duration::from_secs(5) {
        let codes = round(members[2].api);
        refused.extend(
            codes
                .into_iter()
                .flatten()
                .filter(|c| *c != 200 && *c != 503),
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let codes = round(members[2].api);
    assert!(codes.iter().all(|c| *c == Some(200)), "{codes:?}");
    assert_eq!(refused, Vec::<u16>::new(), "{}", logs(&members));

    let s = status(&https, members[new_leader].api, &admin).unwrap();
    let now: BTreeSet<String> = s
        .groups
        .iter()
        .flat_map(|g| &g.instances)
        .map(|i| i.id.clone())
        .collect();
    assert_eq!(now, ids, "no instance replaced");
    assert!(s
        .groups
        .iter()
        .flat_map(|g| &g.instances)
        .all(|i| i.state == InstanceState::Healthy));
    let (code, body) = https
        .call(members[1].api, "GET", "/v1/tokens", None, Some(&admin))
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let tokens_after: Vec<TokenInfo> = serde_json::from_str(&body).unwrap();
    assert_eq!(tokens_after, tokens_before, "the new leader made no token");
    let (code, body) = https
        .call(
            members[1].api,
            "GET",
            "/v1/events?kind=silent",
            None,
            Some(&admin),
        )
        .unwrap();
    assert_eq!((code, body.as_str()), (200, "[]"), "no instance silent");
}
