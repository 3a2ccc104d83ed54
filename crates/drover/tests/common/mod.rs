//! Helpers for end-to-end tests: run the real `drover` binary in a temporary directory, on
//! its own loopback block and free ports, and talk to it over real sockets.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
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

static BLOCK: AtomicU8 = AtomicU8::new(0);

/// A loopback /16 for this test's instances, distinct per test and per test binary.
pub fn subnet() -> u8 {
    let base = (std::process::id() % 40) as u8 * 5 + 20; // 20..=215
    base + BLOCK.fetch_add(1, Ordering::SeqCst) % 5
}

/// The example fleet, moved to the given ingress port and loopback block.
pub fn fleet_text(ingress_port: u16, block: u8, desired: u32) -> String {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello/drover.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let text = text
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{ingress_port}"))
        .replace(
            "provider = \"local\"",
            &format!("provider = \"local\"\nsubnet = \"127.{block}.0.0/16\""),
        )
        .replace("desired = 3", &format!("desired = {desired}"));
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
        Up {
            child,
            dir: dir.to_path_buf(),
            api: format!("127.0.0.1:{api_port}").parse().unwrap(),
            ingress: format!("127.0.0.1:{ingress_port}").parse().unwrap(),
            file,
        }
    }

    pub fn server(&self) -> String {
        format!("http://{}", self.api)
    }

    pub fn status(&self) -> Option<FleetStatus> {
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

    /// Every pid drover started: agents (from their pid files) and components (from status).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("data/instances")) {
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
        let out = Command::new(BIN)
            .args(args)
            .env("DROVER_SERVER", self.server())
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

/// A plain HTTP/1.1 request with `Connection: close`; (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
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
