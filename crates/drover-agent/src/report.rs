//! Reporting: utilization from `/proc`, and heartbeats POSTed to the server (best effort; an
//! unreachable server is logged at most once a minute and changes nothing else).

use std::time::{Duration, Instant};

use drover_model::api::{Heartbeat, HeartbeatReply, Utilization};

/// How often an unreachable server is logged at `warn`.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// CPU and memory of a set of processes, from `/proc`.
#[derive(Debug)]
pub(crate) struct Sampler {
    clk_tck: f64,
    page_size: u64,
    /// (pid, utime+stime ticks) at the last sample.
    prev: Vec<(u32, u64)>,
    last: Instant,
}

impl Sampler {
    pub fn new() -> Sampler {
        // SAFETY: sysconf has no preconditions.
        let (tck, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        Sampler {
            clk_tck: if tck > 0 { tck as f64 } else { 100.0 },
            page_size: if page > 0 { page as u64 } else { 4096 },
            prev: Vec::new(),
            last: Instant::now(),
        }
    }

    /// CPU cores used by `pids` since the last sample, their RSS, and the agent's own RSS.
    ///
    /// A pid not seen at the last sample counts from zero: it started since then (a respawn).
    pub fn sample(&mut self, pids: &[u32]) -> Utilization {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        let mut ticks_used = 0u64;
        let mut memory_bytes = 0u64;
        let mut next = Vec::with_capacity(pids.len());
        for &pid in pids {
            if let Some(ticks) = read_ticks(&format!("/proc/{pid}/stat")) {
                let before = self
                    .prev
                    .iter()
                    .find(|(p, _)| *p == pid)
                    .map_or(0, |(_, t)| *t);
                ticks_used += ticks.saturating_sub(before);
                next.push((pid, ticks));
            }
            if let Some(pages) = read_resident_pages(&format!("/proc/{pid}/statm")) {
                memory_bytes += pages * self.page_size;
            }
        }
        self.prev = next;
        let cpu = if elapsed > 0.0 {
            ticks_used as f64 / self.clk_tck / elapsed
        } else {
            0.0
        };
        Utilization {
            cpu,
            memory_bytes,
            agent_rss_bytes: read_resident_pages("/proc/self/statm").unwrap_or(0) * self.page_size,
            custom: Default::default(),
        }
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` file.
fn read_ticks(path: &str) -> Option<u64> {
    parse_ticks(&std::fs::read_to_string(path).ok()?)
}

fn parse_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // rest starts at field 3 (state); utime is field 14, i.e. the 12th here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The resident pages (second field) of a `/proc/PID/statm` file.
fn read_resident_pages(path: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_ascii_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Remembers whether calls to the server fail, so that failures are logged at `warn` at most
/// once a minute (with how many were held back) and recovery once
/// ([`drover_model::lograte::LogRate`]).
#[derive(Debug)]
pub(crate) struct Throttle(drover_model::lograte::LogRate);

impl Default for Throttle {
    fn default() -> Throttle {
        Throttle(drover_model::lograte::LogRate::new(WARN_EVERY))
    }
}

impl Throttle {
    /// A call failed: `Some(failures held back since the last warning)` when this one should
    /// be logged at `warn` (else at `debug`).
    pub fn failed(&mut self) -> Option<u64> {
        self.0.failed(Instant::now())
    }

    /// A call succeeded: `Some(failures held back)` when calls had been failing until now.
    pub fn recovered(&mut self) -> Option<u64> {
        self.0.recovered()
    }
}

/// The servers of the control plane (`--server URL[,URL...]`): calls go to the current one
/// and move on to the next when it does not answer (or answers that it cannot serve: 502,
/// 503, 504). Any server serves an agent (one that does not lead forwards to the leader).
#[derive(Clone, Debug)]
pub(crate) struct Servers {
    urls: std::sync::Arc<Vec<String>>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Servers {
    pub fn parse(list: &str) -> Servers {
        let urls: Vec<String> = list
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect();
        Servers {
            urls: std::sync::Arc::new(urls),
            current: Default::default(),
        }
    }

    /// Whether any server is given over https.
    pub fn https(&self) -> bool {
        self.urls.iter().any(|u| u.starts_with("https://"))
    }

    /// The URL of `path` on the current server, and which server that is.
    pub fn url(&self, path: &str) -> (usize, String) {
        let n = self.urls.len().max(1);
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed) % n;
        let base = self.urls.get(i).map(String::as_str).unwrap_or_default();
        (i, format!("{base}{path}"))
    }

    /// Server `i` did not answer: the next call goes to the next one (unless another call
    /// moved on already).
    pub fn failed(&self, i: usize) {
        let n = self.urls.len().max(1);
        let _ = self.current.compare_exchange(
            i,
            (i + 1) % n,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// An answer with this status means "ask another server".
    pub fn try_another(status: reqwest::StatusCode) -> bool {
        matches!(status.as_u16(), 502..=504)
    }
}

/// Sends heartbeats; remembers whether the server was reachable, to log failures sparingly.
#[derive(Debug)]
pub(crate) struct Reporter {
    client: reqwest::Client,
    servers: Servers,
    url: String,
    throttle: Throttle,
}

impl Reporter {
    pub fn new(client: reqwest::Client, servers: Servers) -> Reporter {
        Reporter {
            client,
            url: servers.url("/v1/agent/heartbeat").1,
            servers,
            throttle: Throttle::default(),
        }
    }

    /// POST one heartbeat; the server's answer when it accepted it. Never fails the caller.
    /// An accepted heartbeat whose answer cannot be read counts as an answer from a server
    /// that predates the permit hint (`leave_soon: None`: keep long-polling for a permit).
    pub async fn send(&mut self, hb: &Heartbeat, timeout: Duration) -> Option<HeartbeatReply> {
        let (server, url) = self.servers.url("/v1/agent/heartbeat");
        self.url = url;
        let result = self
            .client
            .post(&self.url)
            .timeout(timeout)
            .json(hb)
            .send()
            .await;
        match &result {
            Err(_) => self.servers.failed(server),
            Ok(r) if Servers::try_another(r.status()) => self.servers.failed(server),
            Ok(_) => {}
        }
        let (reply, problem) = match result {
            Ok(resp) if resp.status().is_success() => {
                // Read the (small) reply, also so the connection can be reused.
                let reply = resp
                    .bytes()
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice::<HeartbeatReply>(&b).ok())
                    .unwrap_or(HeartbeatReply {
                        known: true,
                        leave_soon: None,
                    });
                (Some(reply), None)
            }
            Ok(resp) => (None, Some(format!("server answered {}", resp.status()))),
            Err(e) => (None, Some(error_chain(&e))),
        };
        match problem {
            None => {
                if let Some(held_back) = self.throttle.recovered() {
                    tracing::info!(url = %self.url, held_back, "heartbeats reach the server again");
                }
                reply
            }
            Some(problem) => {
                if let Some(held_back) = self.throttle.failed() {
                    tracing::warn!(url = %self.url, %problem, held_back, "cannot report to the server; components keep running (logged at most once a minute)");
                } else {
                    tracing::debug!(url = %self.url, %problem, "heartbeat not delivered");
                }
                None
            }
        }
    }
}

/// An error and its causes on one line (reqwest's own message is often just "error sending request").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 1 0 100 1000 200";
        assert_eq!(parse_ticks(stat), Some(42));
        assert_eq!(parse_ticks("garbage"), None);
    }

    #[test]
    fn samples_self_and_a_busy_child() {
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut s = Sampler::new();
        s.sample(&[pid]);
        std::thread::sleep(Duration::from_millis(300));
        let u = s.sample(&[pid]);
        let _ = child.kill();
        let _ = child.wait();
        // A spinning child uses at most one core; on a machine busy with other tests it may
        // get much less than one, but never none over 300 ms.
        assert!(u.cpu > 0.02 && u.cpu < 1.5, "{u:?}");
        assert!(u.memory_bytes > 0, "{u:?}");
        assert!(u.agent_rss_bytes > 0, "{u:?}");
        // Gone processes count for nothing.
        let u = s.sample(&[pid]);
        assert_eq!(u.memory_bytes, 0);
    }
}
