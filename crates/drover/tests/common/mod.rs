//! Helpers for end-to-end tests: run the real `drover` binary in a temporary directory, on
//! its own loopback block and free ports, and talk to it over real sockets.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use drover_model::api::FleetStatus;

pub const BIN: &str = env!("CARGO_BIN_EXE_drover");

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

static BLOCK: AtomicU32 = AtomicU32::new(0);

/// API address -> data directory of the server there: [`http`] sends that server's admin
/// token (from `DATA/admin.token`) with every request to it.
static API_DATA: std::sync::Mutex<Vec<(SocketAddr, PathBuf)>> = std::sync::Mutex::new(Vec::new());

/// Remember that the API at `api` keeps its data (and admin token) in `data`.
pub fn register_api(api: SocketAddr, data: PathBuf) {
    let mut all = API_DATA.lock().unwrap();
    all.retain(|(a, _)| *a != api);
    all.push((api, data));
}

/// The admin token of the server at `api`, if it was registered and has written one.
pub fn admin_token(api: SocketAddr) -> Option<String> {
    let data = API_DATA
        .lock()
        .unwrap()
        .iter()
        .find(|(a, _)| *a == api)
        .map(|(_, d)| d.clone())?;
    let t = std::fs::read_to_string(data.join("admin.token")).ok()?;
    Some(t.trim().to_string())
}

/// A loopback /16 for this test's instances, distinct per test and per test binary.
pub fn subnet() -> u8 {
    let base = (std::process::id() % 40) as u8 * 5 + 20; // 20..=215
                                                         // Another test process (a concurrent run) may use the block: skip one where the first
                                                         // instance addresses' port 8080 is taken.
    for _ in 0..200 {
        let n = BLOCK.fetch_add(1, Ordering::SeqCst);
        let block = 20 + ((u32::from(base - 20) + n) % 200) as u8;
        let free = (1..=12).all(|host| {
            std::net::TcpListener::bind((std::net::Ipv4Addr::new(127, block, 0, host), 8080))
                .is_ok()
        });
        if free {
            return block;
        }
    }
    panic!("no free loopback block 127.B.0.0/16 (port 8080 taken everywhere)");
}

/// The example fleet, moved to the given ingress port and loopback block.
pub fn fleet_text(ingress_port: u16, block: u8, desired: u32) -> String {
    example_text("hello", ingress_port, block)
        .replace("desired = 3", &format!("desired = {desired}"))
}

/// `examples/NAME/drover.toml` with its ingress on `ingress_port` and its local region on
/// `127.BLOCK.0.0/16`.
pub fn example_text(name: &str, ingress_port: u16, block: u8) -> String {
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
        .join("drover.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let text = text
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{ingress_port}"))
        .replace(
            "provider = \"local\"",
            &format!("provider = \"local\"\nsubnet = \"127.{block}.0.0/16\""),
        );
    assert!(text.contains(&format!("subnet = \"127.{block}.0.0/16\"")));
    text
}

/// A running `drover up`.
pub struct Up {
    pub child: Child,
    pub dir: PathBuf,
    pub api: SocketAddr,
    pub ingress: SocketAddr,
    pub file: PathBuf,
}

impl Up {
    /// Start `drover up` on `text` in `dir`.
    pub fn start(dir: &Path, text: &str, api_port: u16, ingress_port: u16) -> Up {
        let file = dir.join("drover.toml");
        std::fs::write(&file, text).unwrap();
        let child = Command::new(BIN)
            .arg("up")
            .arg(&file)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{api_port}"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("up.out")).unwrap())
            .stderr(std::fs::File::create(dir.join("up.err")).unwrap())
            .spawn()
            .unwrap();
        let up = Up {
            child,
            dir: dir.to_path_buf(),
            api: format!("127.0.0.1:{api_port}").parse().unwrap(),
            ingress: format!("127.0.0.1:{ingress_port}").parse().unwrap(),
            file,
        };
        up.register();
        up
    }

    /// Let [`http`] send this server's admin token.
    pub fn register(&self) {
        register_api(self.api, self.dir.join("data"));
    }

    pub fn server(&self) -> String {
        format!("http://{}", self.api)
    }

    pub fn status(&self) -> Option<FleetStatus> {
        self.register();
        let (code, body) = http(self.api, "GET", "/v1/status", None).ok()?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// Wait until `n` instances are healthy and in rotation; returns how long it took.
    pub fn wait_healthy(&self, n: usize, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(s) = self.status() {
                let ok = s
                    .groups
                    .iter()
                    .flat_map(|g| &g.instances)
                    .filter(|i| i.in_rotation)
                    .count();
                if ok >= n {
                    return t0.elapsed();
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "not {n} healthy instances within {timeout:?}; status: {:#?}\nup.err: {}",
            self.status(),
            std::fs::read_to_string(self.dir.join("up.err")).unwrap_or_default()
        );
    }

    /// Every pid drover started: the balancer and agents (from their pid files) and
    /// components (from status).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self.lb_pid().into_iter().collect();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("data.instances")) {
            for e in entries.flatten() {
                if let Ok(s) = std::fs::read_to_string(e.path().join("agent.pid")) {
                    if let Ok(p) = s.trim().parse() {
                        pids.push(p);
                    }
                }
            }
        }
        if let Some(s) = self.status() {
            for i in s.groups.iter().flat_map(|g| &g.instances) {
                for c in &i.components {
                    if let Some(p) = c.pid {
                        pids.push(p as i32);
                    }
                }
            }
        }
        pids
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Wait for `drover up` to exit; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Run a CLI command against this server; (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.register();
        let out = Command::new(BIN)
            .args(args)
            .env("DROVER_SERVER", self.server())
            // The CLI finds the admin token (and CA) in the server's data directory.
            .env("DROVER_DATA_DIR", self.dir.join("data"))
            .env_remove("DROVER_TOKEN")
            .current_dir(&self.dir)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// `drover server` with its data in `dir/data` and its API on `api`, in a process group of
/// its own; stderr to `dir/server-API.err`.
pub fn start_server(dir: &Path, api: u16) -> Child {
    start_server_with(dir, api, &[])
}

/// [`start_server`] with more arguments (e.g. `--store etcd://...`); stderr is appended to.
pub fn start_server_with(dir: &Path, api: u16, extra: &[&str]) -> Child {
    use std::os::unix::process::CommandExt;
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("server-{api}.err")))
        .unwrap();
    let child = Command::new(BIN)
        .args(["server", "--listen", &format!("127.0.0.1:{api}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap();
    // For `KillAgents`: a test that fails leaves no server behind.
    let mut pids = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.pids"))
        .unwrap();
    writeln!(pids, "{}", child.id()).unwrap();
    child
}

impl Up {
    /// A handle for the CLI and status of a `drover server` in `dir` (not owning it).
    pub fn for_server(dir: &Path, api: u16, ingress: u16) -> Up {
        let up = Up {
            child: Command::new("true").spawn().unwrap(),
            dir: dir.to_path_buf(),
            api: format!("127.0.0.1:{api}").parse().unwrap(),
            ingress: format!("127.0.0.1:{ingress}").parse().unwrap(),
            file: dir.join("drover.toml"),
        };
        up.register();
        up
    }

    /// The pid of the balancer process (`DATA/lb/lb.pid`), if it is alive.
    pub fn lb_pid(&self) -> Option<i32> {
        let p: i32 = std::fs::read_to_string(self.dir.join("data/lb/lb.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        alive(p).then_some(p)
    }

    /// Apply the fleet file, retrying while the server is not answering yet.
    pub fn apply_when_up(&self, timeout: Duration) {
        let t0 = Instant::now();
        loop {
            let (code, out, err) = self.cli(&["apply", "drover.toml"]);
            if code == 0 {
                return;
            }
            assert!(t0.elapsed() < timeout, "apply: {out}{err}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Stops the servers [`start_server`] started in `DIR`, and the agents and the balancer they
/// started (which outlive a server by design), even when the test fails: the servers by the
/// pids in `DIR/server.pids`; then every agent by its pid file and every process that names
/// `DIR` in its arguments or works in it (an agent whose pid file was never written, such as
/// one launched just before its server was SIGKILLed; what its components left), asked with
/// SIGTERM, then its process group SIGKILLed; it returns once they are gone (at most about
/// 3 s), before the directory goes.
pub struct KillAgents(pub PathBuf);

impl Drop for KillAgents {
    fn drop(&mut self) {
        // The servers `start_server` started here, if still ours (a pid not reused).
        let mut servers = Vec::new();
        if let Ok(pids) = std::fs::read_to_string(self.0.join("server.pids")) {
            for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    String::from_utf8_lossy(&c).contains(&*self.0.to_string_lossy())
                });
                if ours {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    servers.push(pid);
                }
            }
        }
        // No server launches an agent once they are gone.
        wait_gone(&servers, Duration::from_secs(2));
        if let Ok(p) = std::fs::read_to_string(self.0.join("data/lb/lb.pid")) {
            if let Ok(pid) = p.trim().parse::<i32>() {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let mut left: Vec<i32> = processes_in(&self.0);
        if let Ok(entries) = std::fs::read_dir(self.0.join("data.instances")) {
            for e in entries.flatten() {
                if let Ok(p) = std::fs::read_to_string(e.path().join("agent.pid")) {
                    if let Ok(pid) = p.trim().parse::<i32>() {
                        if !left.contains(&pid) {
                            left.push(pid);
                        }
                    }
                }
            }
        }
        if left.is_empty() {
            return;
        }
        // Asked first (an agent stops its components, containers included), then killed.
        for &pid in &left {
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        wait_gone(&left, Duration::from_secs(1));
        for pid in processes_in(&self.0) {
            if !left.contains(&pid) {
                left.push(pid);
            }
        }
        for &pid in &left {
            if alive(pid) {
                kill_group(pid);
            }
        }
        wait_gone(&left, Duration::from_secs(2));
    }
}

/// The processes (not this one, none a zombie) with an argument that is `dir` or a path in
/// it, or whose working directory is in it.
pub fn processes_in(dir: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let text = dir.to_string_lossy().into_owned();
    let inside = format!("{text}/");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || !alive(pid) {
            continue;
        }
        let named = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            c.split(|b| *b == 0)
                .map(String::from_utf8_lossy)
                .any(|a| a == text || a.contains(&inside))
        });
        let works_there =
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir));
        if named || works_there {
            found.push(pid);
        }
    }
    found
}

/// SIGKILL `pid`'s process group when it leads one (an agent does: its components are in
/// it), else `pid` alone. Never this test's own group.
pub fn kill_group(pid: i32) {
    // SAFETY: plain syscalls on a pid; a failure (gone, not ours) is ignored.
    unsafe {
        let pgid = libc::getpgid(pid);
        if pgid == pid && pgid != libc::getpgrp() {
            libc::kill(-pgid, libc::SIGKILL);
        } else {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Waits up to `within` for each of `pids` to be gone (a zombie is gone).
pub fn wait_gone(pids: &[i32], within: Duration) {
    let t0 = Instant::now();
    while pids.iter().any(|&p| alive(p)) && t0.elapsed() < within {
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A plain HTTP/1.1 request with `Connection: close`; (status, body). To a registered API
/// ([`register_api`]), its admin token goes along.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let token = admin_token(addr);
    http_as(addr, method, path, body, token.as_deref())
}

/// Like [`http`], with the given bearer token (or none).
pub fn http_as(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// GET / through an address; the body (the demo server names its instance).
pub fn get(addr: SocketAddr) -> std::io::Result<String> {
    let (code, body) = http(addr, "GET", "/", None)?;
    if code != 200 {
        return Err(std::io::Error::other(format!("status {code}: {body}")));
    }
    Ok(body)
}

/// The instance id named in a demo-server answer.
pub fn instance_of(body: &str) -> String {
    body.split("instance ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

/// What a load generator saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
    /// Versions in the order one client saw them change (the longest such sequence).
    pub versions: Vec<String>,
    pub seconds: f64,
}

impl LoadReport {
    pub fn rate(&self) -> f64 {
        (self.ok + self.failed) as f64 / self.seconds.max(0.001)
    }
}

/// Steady requests through `addr` on `threads` threads until `stop` is set. With
/// `keep_alive`, each thread reuses one connection (reconnecting, and retrying an idempotent
/// GET once, when the server closed an idle connection, as HTTP clients do).
pub fn load(
    addr: SocketAddr,
    threads: usize,
    keep_alive: bool,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<LoadReport> {
    load_paced(addr, threads, keep_alive, Duration::from_millis(2), stop)
}

/// Like [`load`], pausing `pause` between requests on each thread.
pub fn load_paced(
    addr: SocketAddr,
    threads: usize,
    keep_alive: bool,
    pause: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<LoadReport> {
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut r = LoadReport::default();
                    let mut conn: Option<TcpStream> = None;
                    while !stop.load(Ordering::SeqCst) {
                        let res = if keep_alive {
                            get_keep_alive(addr, &mut conn)
                        } else {
                            get(addr)
                        };
                        match res {
                            Ok(body) => {
                                r.ok += 1;
                                let v = body
                                    .split("version ")
                                    .nth(1)
                                    .and_then(|x| x.split(',').next())
                                    .unwrap_or("?")
                                    .to_string();
                                if r.versions.last() != Some(&v) {
                                    r.versions.push(v);
                                }
                            }
                            Err(e) => {
                                r.failed += 1;
                                if r.errors.len() < 20 {
                                    r.errors.push(e.to_string());
                                }
                            }
                        }
                        std::thread::sleep(pause);
                    }
                    r
                })
            })
            .collect();
        let mut total = LoadReport::default();
        for h in handles {
            let r = h.join().unwrap();
            total.ok += r.ok;
            total.failed += r.failed;
            total.errors.extend(r.errors);
            // The sequence seen by the thread that saw the most changes.
            if r.versions.len() > total.versions.len() {
                total.versions = r.versions;
            }
        }
        total.seconds = t0.elapsed().as_secs_f64();
        total
    })
}

/// One GET over a kept-alive connection.
pub fn get_keep_alive(addr: SocketAddr, conn: &mut Option<TcpStream>) -> std::io::Result<String> {
    for attempt in 0..2 {
        let reused = conn.is_some();
        if conn.is_none() {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_nodelay(true)?;
            *conn = Some(s);
        }
        let s = conn.as_mut().unwrap();
        let sent = write!(s, "GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        match sent.and_then(|_| read_response(s)) {
            Ok((code, body, close)) => {
                if close {
                    *conn = None;
                }
                if code != 200 {
                    return Err(std::io::Error::other(format!("status {code}: {body}")));
                }
                return Ok(body);
            }
            // The server closed an idle kept-alive connection before answering (seen as an
            // EOF, a reset, or, when the close came before the request was written, a broken
            // pipe): retry once on a new connection (RFC 9112 9.3.1), as HTTP clients do.
            Err(e)
                if reused
                    && attempt == 0
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
            {
                *conn = None;
            }
            Err(e) => {
                *conn = None;
                return Err(e);
            }
        }
    }
    Err(std::io::Error::other("retry failed"))
}

/// Read one HTTP/1.1 response with a Content-Length; (status, body, connection closing).
fn read_response(s: &mut TcpStream) -> std::io::Result<(u16, String, bool)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                if head.is_empty() {
                    "closed before any answer"
                } else {
                    "closed mid-answer"
                },
            ));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let close = head.contains("connection: close");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((code, String::from_utf8_lossy(&body).into_owned(), close))
}

/// The agent-token key as the server keeps it in `store` (made on its first start).
pub fn agent_key_in(store: &dyn drover_store::Store) -> Vec<u8> {
    store
        .secrets()
        .unwrap()
        .into_iter()
        .find(|(name, _)| name == "agent-token-key")
        .map(|(_, v)| v)
        .expect("the store holds no agent-token key: has the server started?")
}

/// The agent-token key of the server whose (SQLite) data directory is `data`.
pub fn agent_key(data: &Path) -> Vec<u8> {
    let store = drover_store::SqliteStore::open(&data.join("drover.db")).unwrap();
    agent_key_in(&store)
}

/// A group's agent token of id `id`, derived from `key` as the server does (HMAC-SHA256).
pub fn derive_agent_token(key: &[u8], id: &str) -> String {
    let mac = drover_model::token::hmac_sha256(key, format!("drover agent token {id}").as_bytes());
    format!("drover_agent_{}", hex::encode(mac))
}

/// The agent token `group`'s instances are launched from (the newest not revoked), as its
/// id and its secret derived from the agent-token key of the SQLite data directory `data`.
pub fn group_agent_token(
    api: SocketAddr,
    admin: &str,
    data: &Path,
    group: &str,
) -> (String, String) {
    let (code, out) = http_as(api, "GET", "/v1/tokens", None, Some(admin)).unwrap();
    assert_eq!(code, 200, "{out}");
    let all: Vec<drover_model::token::TokenInfo> = serde_json::from_str(&out).unwrap();
    let id = all
        .iter()
        .filter(|t| t.group.as_deref() == Some(group) && t.revoked_at_ms.is_none())
        .map(|t| t.id.clone())
        .max()
        .unwrap();
    let secret = derive_agent_token(&agent_key(data), &id);
    (id, secret)
}

/// A process that goes with the test, passed or failed (SIGKILL).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `drover exec -it TARGET... -- /bin/sh` on a pty of the test's (30 x 100): the shell's
/// terminal is a pty of that size, follows a resize to 40 x 120 (SIGWINCH to the CLI, as a
/// terminal sends), and `exit 5` comes back as the CLI's exit code.
pub fn it_on_a_terminal(up: &Up, target: &[&str]) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let winsize = |rows, cols| libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let (mut m, mut s) = (0, 0);
    let ws = winsize(30, 100);
    // SAFETY: openpty writes two fds through valid pointers.
    let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both were just opened; nothing else owns them.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    let mut cli = Command::new(BIN)
        .args(["exec", "-it"])
        .args(target)
        .args(["--", "/bin/sh"])
        .env("DROVER_SERVER", up.server())
        .env("DROVER_DATA_DIR", up.dir.join("data"))
        .env_remove("DROVER_TOKEN")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        let mut f = std::fs::File::from(master.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the CLI (the last holder of the slave) is gone.
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let mut keys = std::fs::File::from(master.try_clone().unwrap());
    let saw = |text: &str| seen.lock().unwrap().contains(text);
    keys.write_all(b"stty size; [ -t 0 ] && echo on a terminal\n")
        .unwrap();
    drover_test_support::wait_until(
        Duration::from_secs(10),
        "the first size and a terminal",
        || (saw("30 100") && saw("\non a terminal")).then_some(()),
    );
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    let ws = winsize(40, 120);
    assert_eq!(
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
        0
    );
    // (the CLI's terminal is not its controlling one: the signal a terminal would send)
    unsafe { libc::kill(cli.id() as i32, libc::SIGWINCH) };
    drover_test_support::wait_until(Duration::from_secs(10), "the new size", || {
        keys.write_all(b"stty size\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        saw("40 120").then_some(())
    });
    keys.write_all(b"exit 5\n").unwrap();
    let t0 = Instant::now();
    let code = loop {
        if let Some(st) = cli.try_wait().unwrap() {
            break st.code();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "still running: {}",
            seen.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(5), "{}", seen.lock().unwrap());
    drop(keys);
    drop(master);
    let _ = reader.join();
}

/// A fleet of one `sim` region (no process starts) and a service `web` of 3 instances
/// (`web/lab`) with one component `app`.
pub fn sim_fleet(block: u8) -> String {
    format!(
        r#"[fleet]
name = "simmed"

[regions.lab]
provider = "sim"
subnet = "127.{block}.0.0/16"

[services.web]
regions = ["lab"]
capacity = {{ min = 0, desired = 3, max = 4 }}
rollout = {{ max_surge = 1, max_unavailable = 1, min_healthy_time = "1s", drain_timeout = "1s", healthy_deadline = "60s" }}

[services.web.components.app]
runtime = "process"
version = "v1"
command = "{{drover}}"
args = ["demo-server", "--listen", "{{addr}}:{{port.http}}"]
ports = {{ http = 8080 }}
"#
    )
}

/// A heartbeat of `instance` whose one component `app` runs `version` in `state`.
#[allow(clippy::too_many_arguments)]
pub fn app_heartbeat(
    instance: &str,
    group: &str,
    generation: u64,
    addr: &str,
    phase: drover_model::api::AgentPhase,
    seq: u64,
    version: &str,
    state: drover_model::api::ComponentState,
) -> drover_model::api::Heartbeat {
    use drover_test_support::agent;
    let instance = agent::Instance {
        id: instance,
        group,
        generation,
        addr,
    };
    let app = agent::component("app", version, state);
    agent::heartbeat(instance, phase, seq, vec![app])
}
