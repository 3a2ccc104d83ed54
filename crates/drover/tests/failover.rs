//! End to end: a control plane of 3 `drover server`s on a real 3-member etcd cluster on
//! loopback, running the example fleet behind its balancer process (`drover lb`), under
//! steady load. The leader is SIGKILLed mid-rollout, SIGSTOPped past its lease, and etcd
//! loses one member, then its quorum. Skipped (with the reason) when `etcd` is not
//! installed, unless `DROVER_CI=1`.
#![cfg(feature = "etcd")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use drover_model::api::{FleetStatus, Health};
use drover_model::Event;
use drover_store::local_etcd::{etcd_or_skip, LocalEtcd};

/// SIGKILLs a server when the test ends, however it ends (SIGCONT first, should it be stopped).
struct KillServer(Child);

impl KillServer {
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
    fn signal(&self, sig: i32) {
        // SAFETY: a plain syscall on the pid of a child this test started.
        unsafe { libc::kill(self.pid(), sig) };
    }
    fn kill(&mut self) {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGKILL);
        let _ = self.0.wait();
    }
}

impl Drop for KillServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// 3 servers sharing one data directory (the `local` provider's instances and the balancer
/// are this machine's processes) and one etcd store.
struct Plane {
    servers: Vec<Option<KillServer>>,
    apis: Vec<u16>,
    list: String,
    ing: u16,
    store: String,
    // Dropped after the servers and before the directory: the agents and the balancer
    // they left behind.
    _agents: KillAgents,
    dir: tempfile::TempDir,
    etcd: LocalEtcd,
}

impl Plane {
    fn start(test: &str, desired: u32) -> Option<Plane> {
        let bin = etcd_or_skip(test)?;
        let etcd = LocalEtcd::start(&bin, 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let apis: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let ing = free_port();
        std::fs::write(
            dir.path().join("drover.toml"),
            fleet_text(ing, subnet(), desired),
        )
        .unwrap();
        let list = apis
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut plane = Plane {
            servers: Vec::new(),
            apis,
            list,
            ing,
            store: etcd.url("/drover/failover"),
            _agents: KillAgents(dir.path().to_path_buf()),
            dir,
            etcd,
        };
        // The first leads; the others follow it.
        plane.servers.push(Some(plane.spawn(0)));
        assert_eq!(plane.wait_leader(None, Duration::from_secs(20)), 0);
        for i in 1..3 {
            let s = plane.spawn(i);
            plane.servers.push(Some(s));
        }
        for i in 1..3 {
            plane.wait_role(i, "follower", Duration::from_secs(20));
        }
        let up = plane.up(1);
        // Applied through a follower: forwarded to the leader.
        up.apply_when_up(Duration::from_secs(30));
        let t0 = Instant::now();
        while plane.status().map_or(0, |s| in_rotation(&s)) < desired as usize {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "not {desired} healthy: {:?}\n{}",
                http(plane.addr(1), "GET", "/v1/status", None),
                plane.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(plane)
    }

    fn spawn(&self, i: usize) -> KillServer {
        KillServer(start_server_with(
            self.dir.path(),
            self.apis[i],
            &["--store", &self.store, "--servers", &self.list],
        ))
    }

    fn addr(&self, i: usize) -> SocketAddr {
        format!("127.0.0.1:{}", self.apis[i]).parse().unwrap()
    }

    fn up(&self, i: usize) -> Up {
        Up::for_server(self.dir.path(), self.apis[i], self.ing)
    }

    /// `GET /v1/health` of server `i`, waiting at most 500 ms (a stopped server does not
    /// answer).
    fn health(&self, i: usize) -> Option<Health> {
        let mut s = TcpStream::connect_timeout(&self.addr(i), Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200")
            .then(|| serde_json::from_str(body).ok())?
    }

    /// The server that says it leads (only servers that run are asked).
    fn leader(&self) -> Option<usize> {
        self.leader_but(None)
    }

    fn leader_but(&self, not: Option<usize>) -> Option<usize> {
        (0..self.apis.len()).find(|&i| {
            Some(i) != not
                && self.servers.get(i).is_some_and(Option::is_some)
                && self.health(i).is_some_and(|h| h.role == "leader")
        })
    }

    fn wait_leader(&self, not: Option<usize>, within: Duration) -> usize {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.leader_but(not) {
                return l;
            }
            assert!(
                t0.elapsed() < within,
                "no leader within {within:?}: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_role(&self, i: usize, role: &str, within: Duration) -> Health {
        let t0 = Instant::now();
        loop {
            if let Some(h) = self.health(i).filter(|h| h.role == role) {
                return h;
            }
            assert!(
                t0.elapsed() < within,
                "server {i} not {role} within {within:?}: {:?}\n{}",
                self.health(i),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The status from the first server that answers it.
    fn status(&self) -> Option<FleetStatus> {
        status_from(self.dir.path(), &self.apis)
    }

    /// A CLI command given every server (`DROVER_SERVER=URL,URL,URL`).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        cli_all(self.dir.path(), &self.list, args)
    }

    fn events(&self, kind: &str) -> Vec<Event> {
        for i in 0..self.apis.len() {
            if self.servers[i].is_none() {
                continue;
            }
            register_api(self.addr(i), self.dir.path().join("data"));
            if let Ok((200, body)) = http(
                self.addr(i),
                "GET",
                &format!("/v1/events?kind={kind}"),
                None,
            ) {
                return serde_json::from_str(&body).unwrap();
            }
        }
        panic!("no server answered /v1/events: {}", self.logs());
    }

    fn logs(&self) -> String {
        self.apis
            .iter()
            .map(|a| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("server-{a}.err")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                format!(
                    "--- server {a}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn status_from(dir: &std::path::Path, apis: &[u16]) -> Option<FleetStatus> {
    apis.iter().find_map(|a| {
        let addr: SocketAddr = format!("127.0.0.1:{a}").parse().unwrap();
        register_api(addr, dir.join("data"));
        match http(addr, "GET", "/v1/status", None) {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    })
}

fn cli_all(dir: &std::path::Path, list: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("DROVER_SERVER", list)
        .env("DROVER_DATA_DIR", dir.join("data"))
        .env_remove("DROVER_TOKEN")
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn in_rotation(s: &FleetStatus) -> usize {
    s.groups
        .iter()
        .flat_map(|g| &g.instances)
        .filter(|i| i.in_rotation)
        .count()
}

fn instance_ids(s: &FleetStatus) -> BTreeSet<String> {
    s.groups
        .iter()
        .flat_map(|g| &g.instances)
        .map(|i| i.id.clone())
        .collect()
}

/// The pids of the agents (from their pid files).
fn agent_pids(dir: &std::path::Path) -> BTreeMap<String, i32> {
    let mut out = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("data.instances")) {
        for e in entries.flatten() {
            if let Some(pid) = std::fs::read_to_string(e.path().join("agent.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
                .filter(|p| alive(*p))
            {
                out.insert(e.file_name().to_string_lossy().into_owned(), pid);
            }
        }
    }
    out
}

#[test]
fn a_leader_sigkilled_mid_rollout_is_replaced_within_3s_and_the_rollout_finishes() {
    let Some(mut plane) = Plane::start("a_leader_sigkilled_mid_rollout", 3) else {
        return;
    };
    // A follower says who leads; `drover status` through it too.
    let h = plane.health(1).unwrap();
    assert_eq!(h.role, "follower");
    assert_eq!(
        h.leader.as_ref().map(|l| l.url.clone()),
        Some(format!("http://127.0.0.1:{}", plane.apis[0]))
    );
    let (code, out, err) = plane.up(2).cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "control plane: http://127.0.0.1:{} leads",
            plane.apis[0]
        )) && out.contains("is a follower"),
        "{out}"
    );
    let before = plane.status().unwrap();
    let old: BTreeSet<String> = instance_ids(&before);
    assert_eq!(old.len(), 3);

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(
        format!("127.0.0.1:{}", plane.ing).parse().unwrap(),
        4,
        true,
        stop.clone(),
    );
    // Changes acknowledged all through the failover (through any server) must all be there.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let writer = {
        let (dir, list, acked, stop) = (
            plane.dir.path().to_path_buf(),
            plane.list.clone(),
            acked.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let name = format!("ack-{n}");
                let (code, _, _) = cli_all(
                    &dir,
                    &list,
                    &["token", "create", "--scope", "read", "--name", &name],
                );
                if code == 0 {
                    acked.lock().unwrap().push(name);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // The floor: never fewer than desired - max_unavailable = 3 in rotation, in any view.
    let lowest = Arc::new(Mutex::new(usize::MAX));
    let sampler = {
        let (dir, apis, lowest, stop) = (
            plane.dir.path().to_path_buf(),
            plane.apis.clone(),
            lowest.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                // A view counts once the leader heard from every instance it restored (a
                // new leader's first second knows instances only from the store; the
                // balancer keeps its targets meanwhile).
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64;
                let rebuilt = |s: &FleetStatus| {
                    s.groups
                        .iter()
                        .flat_map(|g| &g.instances)
                        .all(|i| i.last_heartbeat_ms.is_some() || i.launched_at_ms + 3000 > now)
                };
                if let Some(s) = status_from(&dir, &apis).filter(rebuilt) {
                    let n = in_rotation(&s);
                    let mut l = lowest.lock().unwrap();
                    *l = (*l).min(n);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let (code, out, err) = plane.cli(&["deploy", "web", "app", "v2"]);
    assert_eq!(code, 0, "{out}{err}");
    // Mid-rollout: the first stale instance has its permit.
    let t0 = Instant::now();
    while plane.events("permit").is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no permit: {}",
            plane.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    plane.servers[0].as_mut().unwrap().kill();
    let killed = Instant::now();
    plane.servers[0] = None;
    let new = plane.wait_leader(Some(0), Duration::from_secs(10));
    let took = killed.elapsed();
    eprintln!("server {new} leads {took:?} after the leader's SIGKILL");
    if std::env::var("FAILOVER_DEBUG").is_ok() {
        eprintln!(
            "killed at {:?}\n{}",
            std::time::SystemTime::now() - took,
            plane.logs()
        );
    }
    assert!(took < Duration::from_secs(3), "a new leader after {took:?}");

    // The rollout resumes under the new leader and finishes.
    let t0 = Instant::now();
    let done = loop {
        if let Some(s) = plane.status() {
            let g = &s.groups[0];
            let all_new = g.instances.iter().all(|i| i.generation == g.generation);
            if g.generation == 2 && all_new && in_rotation(&s) == 3 && g.instances.len() == 3 {
                break s;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the rollout did not finish: {:#?}\n{}",
            plane.status(),
            plane.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let report = traffic.join().unwrap();
    writer.join().unwrap();
    sampler.join().unwrap();
    assert_eq!(
        report.failed, 0,
        "failed requests: {:?} ({} ok)",
        report.errors, report.ok
    );
    assert!(report.ok > 100, "{report:?}");
    assert!(
        report.versions.contains(&"v2".to_string()),
        "{:?}",
        report.versions
    );
    // Exactly one permit for each old instance, none for any other.
    let permits = plane.events("permit");
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for e in &permits {
        *per.entry(e.instance.clone().unwrap_or_default())
            .or_default() += 1;
    }
    assert_eq!(
        per.keys().cloned().collect::<BTreeSet<_>>(),
        old,
        "{permits:#?}"
    );
    assert!(per.values().all(|n| *n == 1), "{per:?}");
    assert!(instance_ids(&done).is_disjoint(&old));
    let lowest = *lowest.lock().unwrap();
    assert!(lowest >= 3, "the floor went down to {lowest}");
    // Every acknowledged change is there.
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 5, "{acked:?}");
    let (code, out, err) = plane.cli(&["token", "list", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    for name in &acked {
        assert!(out.contains(&format!("\"{name}\"")), "{name} is lost");
    }
    let (code, out, err) = plane.cli(&["history"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("deploy") || out.lines().count() >= 3, "{out}");
}

/// The agent token of id `id`, as the servers derive it from the key in the store.
fn agent_token(plane: &Plane, id: &str) -> String {
    let store = drover_store::EtcdStore::open(&plane.etcd.config("/drover/failover")).unwrap();
    derive_agent_token(&agent_key_in(&store), id)
}

/// Whether every thread of `pid` is stopped (state `T`).
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('T'))
        })
    })
}

/// Send a request now (while the server may be stopped) and read its answer later.
fn send_raw(addr: SocketAddr, request: String) -> std::thread::JoinHandle<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    std::thread::spawn(move || {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

#[test]
fn a_leader_paused_past_its_lease_neither_commits_nor_hands_out_a_permit() {
    let Some(plane) = Plane::start("a_leader_paused_past_its_lease", 2) else {
        return;
    };
    let dir = plane.dir.path();
    let (code, out, err) = plane.cli(&["token", "list", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let tokens: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let agent_id = tokens
        .iter()
        .filter(|t| t["scope"] == "agent" && t["group"] == "web/local")
        .filter_map(|t| t["id"].as_str())
        .max()
        .unwrap()
        .to_string();
    let token = agent_token(&plane, &agent_id);
    let admin = std::fs::read_to_string(dir.join("data/admin.token")).unwrap();
    let admin = admin.trim();

    // The leader stores a permit (mid-rollout), then is paused.
    let (code, out, err) = plane.cli(&["deploy", "web", "app", "v2"]);
    assert_eq!(code, 0, "{out}{err}");
    let t0 = Instant::now();
    let holder = loop {
        if let Some(e) = plane.events("permit").first() {
            break e.instance.clone().unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no permit");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The permit is in the store; a moment for the leader to take it into memory too.
    std::thread::sleep(Duration::from_millis(100));
    let paused = plane.servers[0].as_ref().unwrap();
    paused.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    // Every thread of it stopped before anything is sent to it.
    while !all_threads_stopped(paused.pid()) {
        assert!(
            stopped.elapsed() < Duration::from_secs(2),
            "SIGSTOP not delivered"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Calls that reach it while it sleeps; it reads them when it wakes up. Marked as
    // forwarded, so it answers them itself rather than forwarding them to the new leader.
    // With the holder's own instance token (its agent has reported with it, so its group's
    // token may no longer speak for it).
    let own = drover_model::token::instance_token(&token, &agent_id, &holder);
    let permit = send_raw(
        plane.addr(0),
        format!(
            "GET /v1/agent/permit?instance={holder}&wait_ms=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {own}\r\nx-drover-forwarded-by: test\r\n\r\n"
        ),
    );
    let body = r#"{"service":"web","desired":5}"#;
    let scale = send_raw(
        plane.addr(0),
        format!(
            "POST /v1/scale HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {admin}\r\nx-drover-forwarded-by: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    let new = plane.wait_leader(Some(0), Duration::from_secs(10));
    eprintln!(
        "server {new} leads {:?} after the SIGSTOP",
        stopped.elapsed()
    );
    assert!(stopped.elapsed() < Duration::from_secs(3));
    std::thread::sleep(Duration::from_secs(3).saturating_sub(stopped.elapsed()));
    paused.signal(libc::SIGCONT);
    let permit = permit.join().unwrap();
    let scale = scale.join().unwrap();
    eprintln!("the paused leader answered, on waking:\n{permit}\n{scale}");
    // Refused (503: its lease ran out, or it stepped down already), or, when it was paused
    // between storing the permit and taking it into memory, `permit: false`: never a permit.
    assert!(
        permit.starts_with("HTTP/1.1 503")
            || (permit.starts_with("HTTP/1.1 200") && permit.contains("\"permit\":false")),
        "a permit poll to the deposed leader: {permit}"
    );
    assert!(!permit.contains("\"permit\":true"), "{permit}");
    assert!(scale.starts_with("HTTP/1.1 503"), "a scale: {scale}");
    // Nothing of it was committed: the count is the file's, no scale event says 5.
    let s = plane.status().unwrap();
    assert_eq!(s.groups[0].desired, 2, "{s:#?}");
    assert!(
        plane
            .events("scaled")
            .iter()
            .all(|e| !e.message.contains("-> 5")),
        "{:#?}",
        plane.events("scaled")
    );
    // It knows it no longer leads, and says who does.
    let h = plane.wait_role(0, "follower", Duration::from_secs(3));
    assert_eq!(
        h.leader.map(|l| l.url),
        Some(format!("http://127.0.0.1:{}", plane.apis[new]))
    );
    // The rollout goes on under the new leader: one permit per old instance.
    let t0 = Instant::now();
    loop {
        if let Some(s) = plane.status() {
            let g = &s.groups[0];
            if g.instances.len() == 2
                && g.instances.iter().all(|i| i.generation == 2)
                && in_rotation(&s) == 2
            {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{:#?}\n{}",
            plane.status(),
            plane.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for e in plane.events("permit") {
        *per.entry(e.instance.unwrap_or_default()).or_default() += 1;
    }
    assert_eq!(per.len(), 2, "{per:?}");
    assert!(per.values().all(|n| *n == 1), "{per:?}");
}

#[test]
fn etcd_losing_one_member_changes_nothing_and_losing_quorum_refuses_changes_touching_nothing() {
    let Some(mut plane) = Plane::start("etcd_losing_members", 2) else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(
        format!("127.0.0.1:{}", plane.ing).parse().unwrap(),
        2,
        false,
        stop.clone(),
    );
    let leader = plane.leader().unwrap();
    let leader_id = plane.health(leader).unwrap().server.unwrap().id;

    // One member of three lost: a change goes through, the same server leads.
    plane.etcd.kill(0);
    let (code, out, err) = plane.cli(&["scale", "web", "3"]);
    assert_eq!(code, 0, "{out}{err}");
    plane.up(1).wait_healthy(3, Duration::from_secs(60));
    assert_eq!(plane.health(leader).unwrap().server.unwrap().id, leader_id);
    assert_eq!(plane.leader(), Some(leader), "{}", plane.logs());

    // Quorum lost: changes are refused clearly; no workload is touched.
    let ids = instance_ids(&plane.status().unwrap());
    let pids = agent_pids(plane.dir.path());
    assert_eq!(pids.len(), 3, "{pids:?}");
    plane.etcd.kill(1);
    let t0 = Instant::now();
    let (code, out, err) = plane.cli(&["scale", "web", "4"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("quorum") && err.contains("etcdctl endpoint status"),
        "what is wrong and what to check: {err}"
    );
    eprintln!("refused after {:?}: {err}", t0.elapsed());
    // No server leads once the lease is gone; each says why.
    let t0 = Instant::now();
    while plane.leader().is_some() {
        assert!(t0.elapsed() < Duration::from_secs(10), "still a leader");
        std::thread::sleep(Duration::from_millis(100));
    }
    let h = plane.health(2).unwrap();
    assert_eq!(h.role, "candidate");
    assert!(h.problem.is_some_and(|p| p.contains("etcd")));
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(agent_pids(plane.dir.path()), pids, "an agent stopped");

    // Back: the fleet goes on, nothing replaced.
    plane.etcd.restart(0).unwrap();
    plane.etcd.restart(1).unwrap();
    plane.etcd.wait_healthy(Duration::from_secs(20)).unwrap();
    plane.wait_leader(None, Duration::from_secs(20));
    plane.up(0).wait_healthy(3, Duration::from_secs(30));
    assert_eq!(instance_ids(&plane.status().unwrap()), ids);
    let t0 = Instant::now();
    loop {
        let (code, out, err) = plane.cli(&["scale", "web", "4"]);
        if code == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{out}{err}");
        std::thread::sleep(Duration::from_millis(200));
    }
    plane.up(0).wait_healthy(4, Duration::from_secs(60));
    let after = instance_ids(&plane.status().unwrap());
    assert!(ids.is_subset(&after), "{ids:?} {after:?}");
    assert!(plane
        .events("terminating")
        .iter()
        .all(|e| !e.message.contains("silent") && !e.message.contains("lost")));
    stop.store(true, Ordering::SeqCst);
    let report = traffic.join().unwrap();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    drop(plane.servers.drain(..));
}
