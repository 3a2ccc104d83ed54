//! A real etcd cluster on loopback, for tests and benchmarks: `n` members of Debian's
//! `etcd` binary (`/usr/bin/etcd`, or `DROVER_ETCD_BIN`), on free ports, each with its own
//! data directory. Members can be SIGKILLed and started again; everything is stopped and
//! removed when the value is dropped (also when a test panics).

use std::io::{Read, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::spec::EtcdConfig;

/// Where the `etcd` binary is, if it is installed.
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DROVER_ETCD_BIN") {
        return Some(PathBuf::from(p));
    }
    let candidates = ["/usr/bin/etcd", "/usr/local/bin/etcd"];
    if let Some(p) = candidates.iter().map(PathBuf::from).find(|p| p.is_file()) {
        return Some(p);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    })
}

/// For tests: the etcd binary, or `None` after printing why the test is skipped; with
/// `DROVER_CI=1` a missing etcd is a failure instead.
pub fn etcd_or_skip(test: &str) -> Option<PathBuf> {
    match etcd_binary() {
        Some(p) => Some(p),
        None if std::env::var("DROVER_CI").as_deref() == Ok("1") => {
            panic!("{test}: etcd is not installed (apt-get install etcd-server) and DROVER_CI=1")
        }
        None => {
            eprintln!(
                "SKIPPED {test}: etcd is not installed (apt-get install etcd-server, or set DROVER_ETCD_BIN)"
            );
            None
        }
    }
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    data: PathBuf,
    child: Option<Child>,
}

/// A running local cluster.
pub struct LocalEtcd {
    bin: PathBuf,
    dir: PathBuf,
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
}

/// Free loopback ports, held until all are picked so that they differ.
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

impl LocalEtcd {
    /// Start `n` members with `bin` and wait until the cluster has a leader (at most 30 s).
    pub fn start(bin: &Path, n: usize) -> std::io::Result<LocalEtcd> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = format!("drover-test-{}-{k}", std::process::id());
        let dir = std::env::temp_dir().join(&token);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let ports = free_ports(2 * n)?;
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: ports[2 * i],
                peer: ports[2 * i + 1],
                data: dir.join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = LocalEtcd {
            bin: bin.to_path_buf(),
            dir,
            members,
            initial_cluster,
            token,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> std::io::Result<()> {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", m.name)))?;
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let child = Command::new(&self.bin)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            // Quicker elections than the default (100 ms / 1 s) on loopback.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// `127.0.0.1:PORT` of every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect()
    }

    /// A store configuration for this cluster under `prefix`, with a short timeout.
    pub fn config(&self, prefix: &str) -> EtcdConfig {
        let mut c = EtcdConfig::new(self.endpoints()).with_prefix(prefix);
        c.timeout = Duration::from_secs(3);
        c
    }

    /// `etcd://127.0.0.1:P1,...,127.0.0.1:P3/PREFIX`, as `--store` takes it.
    pub fn url(&self, prefix: &str) -> String {
        format!(
            "etcd://{}/{}",
            self.endpoints().join(","),
            prefix.trim_matches('/')
        )
    }

    /// The pid of member `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// SIGKILL member `i` and wait for it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        self.kill(i);
        self.spawn(i)
    }

    /// Wait until every running member says it is healthy (it has a leader).
    pub fn wait_healthy(&self, within: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + within;
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            loop {
                if health(m.client) {
                    break;
                }
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(self.dir.join(format!("{}.log", m.name)))
                        .unwrap_or_default();
                    return Err(std::io::Error::other(format!(
                        "etcd member {} (127.0.0.1:{}) not healthy within {within:?}; its log:\n{}",
                        m.name,
                        m.client,
                        tail(&log, 3000)
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The logs of every member (for a failing test's message).
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = std::fs::read_to_string(self.dir.join(format!("{}.log", m.name)))
                    .unwrap_or_default();
                format!("--- {}:\n{}", m.name, tail(&log, 2000))
            })
            .collect()
    }
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    &s[start..]
}

/// `GET /health` on a member's client port: `{"health":"true"}` once it has a leader.
fn health(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
