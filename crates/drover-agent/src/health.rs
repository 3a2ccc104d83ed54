//! Health probes (tcp connect, http GET, exec) and the threshold logic that turns their results
//! into component states.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::process::{self, Launch};

/// One rendered health check.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Probe {
    Tcp(SocketAddr),
    Http {
        addr: SocketAddr,
        path: String,
    },
    Exec(Launch),
    /// An exec check of a `docker` component: run inside its container.
    Container(crate::docker::Exec),
}

/// Run one probe; `Err` says why it failed.
pub(crate) async fn probe(p: &Probe, timeout: Duration) -> Result<(), String> {
    match p {
        Probe::Exec(launch) => exec(launch, timeout).await,
        Probe::Container(e) => e.run(timeout).await,
        _ => match tokio::time::timeout(timeout, network(p)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {}ms", timeout.as_millis())),
        },
    }
}

async fn network(p: &Probe) -> Result<(), String> {
    match p {
        Probe::Tcp(addr) => TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(|e| format!("tcp connect to {addr}: {e}")),
        Probe::Http { addr, path } => http_get(*addr, path).await,
        Probe::Exec(_) | Probe::Container(_) => {
            unreachable!("exec probes are not network probes")
        }
    }
}

/// A minimal HTTP/1.1 GET with `Connection: close`; 2xx and 3xx are healthy.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(), String> {
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("http GET {path} on {addr}: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: drover-agent\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("http GET {path} on {addr}: {e}"))?;
    let mut buf = [0u8; 64];
    let mut len = 0;
    while len < buf.len() && !buf[..len].contains(&b'\n') {
        let n = s
            .read(&mut buf[len..])
            .await
            .map_err(|e| format!("http GET {path} on {addr}: {e}"))?;
        if n == 0 {
            break;
        }
        len += n;
    }
    match status_code(&buf[..len]) {
        Some(code) if (200..400).contains(&code) => Ok(()),
        Some(code) => Err(format!("http GET {path} on {addr}: status {code}")),
        None => Err(format!("http GET {path} on {addr}: not an HTTP answer")),
    }
}

/// The status code of an HTTP/1.x status line.
fn status_code(head: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(head).ok()?.lines().next()?;
    let mut parts = line.split_ascii_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    (code.len() == 3).then(|| code.parse().ok()).flatten()
}

async fn exec(launch: &Launch, timeout: Duration) -> Result<(), String> {
    let mut cmd = Command::new(&launch.program);
    cmd.args(&launch.args)
        .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(&launch.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    process::die_with_agent(&mut cmd);
    let prog = launch.program.display();
    let mut child = cmd.spawn().map_err(|e| format!("exec {prog}: {e}"))?;
    let pgid = child.id().unwrap_or(0);
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(format!("exec {prog}: {}", process::describe(&st))),
        Ok(Err(e)) => Err(format!("exec {prog}: {e}")),
        Err(_) => {
            process::signal_group(pgid, libc::SIGKILL);
            let _ = child.wait().await;
            Err(format!(
                "exec {prog}: no exit within {}ms",
                timeout.as_millis()
            ))
        }
    }
}

/// What a probe result changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// No state change.
    Same,
    Healthy,
    Unhealthy,
}

/// Consecutive passes and failures against the thresholds.
#[derive(Clone, Debug)]
pub(crate) struct Tally {
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    passes: u32,
    fails: u32,
    /// Ever reached the healthy threshold in this run.
    pub was_healthy: bool,
}

impl Tally {
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Tally {
        Tally {
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
            passes: 0,
            fails: 0,
            was_healthy: false,
        }
    }

    pub fn record(&mut self, ok: bool) -> Verdict {
        if ok {
            self.fails = 0;
            self.passes = self.passes.saturating_add(1);
            if self.passes >= self.healthy_threshold {
                self.was_healthy = true;
                return Verdict::Healthy;
            }
        } else {
            self.passes = 0;
            self.fails = self.fails.saturating_add(1);
            if self.fails >= self.unhealthy_threshold {
                return Verdict::Unhealthy;
            }
        }
        Verdict::Same
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 302 Found\r\nLocation: /"), Some(302));
        assert_eq!(status_code(b"HTTP/1.1 500"), Some(500));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code(b""), None);
    }

    #[test]
    fn thresholds() {
        let mut t = Tally::new(2, 3);
        assert_eq!(t.record(true), Verdict::Same);
        assert_eq!(t.record(true), Verdict::Healthy);
        assert!(t.was_healthy);
        assert_eq!(t.record(false), Verdict::Same);
        assert_eq!(t.record(false), Verdict::Same);
        assert_eq!(t.record(true), Verdict::Same);
        assert_eq!(t.record(false), Verdict::Same);
        assert_eq!(t.record(false), Verdict::Same);
        assert_eq!(t.record(false), Verdict::Unhealthy);
        assert_eq!(t.record(false), Verdict::Unhealthy);
    }

    #[tokio::test]
    async fn tcp_and_http_probes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                n += 1;
                let answer: &[u8] = if n % 2 == 1 {
                    b"HTTP/1.1 204 No Content\r\n\r\n"
                } else {
                    b"HTTP/1.1 503 Unavailable\r\n\r\n"
                };
                let _ = s.write_all(answer).await;
            }
        });
        let t = Duration::from_secs(1);
        let http = Probe::Http {
            addr,
            path: "healthz".into(),
        };
        assert_eq!(probe(&http, t).await, Ok(()));
        let e = probe(&http, t).await.unwrap_err();
        assert!(e.contains("status 503"), "{e}");
        // A port nobody listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(probe(&Probe::Tcp(closed), t).await.is_err());
    }

    #[tokio::test]
    async fn exec_probe() {
        let launch = |script: &str| Launch {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![],
            cwd: std::env::temp_dir(),
        };
        let t = Duration::from_millis(300);
        assert_eq!(probe(&Probe::Exec(launch("exit 0")), t).await, Ok(()));
        let e = probe(&Probe::Exec(launch("exit 2")), t).await.unwrap_err();
        assert!(e.contains("exit status 2"), "{e}");
        let e = probe(&Probe::Exec(launch("sleep 5")), t).await.unwrap_err();
        assert!(e.contains("no exit within"), "{e}");
    }
}
