//! Active health checks: one checker task per target in rotation, HAProxy's rise/fall
//! state machine, and the tcp and http probes.
//!
//! A checker holds only a weak reference to its target's entry and stops when the entry
//! leaves the rotation (its token is cancelled), when the listener stops, or when the entry
//! is gone. A check allocates nothing of its own: the HTTP request is built once per
//! checker and the answer is read into a small stack buffer.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Weak;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{HealthCheckConfig, HealthCheckKind};
use crate::stats::TargetEntry;

/// Why a check failed, as stored in [`TargetEntry::last_check_error`]: 0 is "passed", an
/// HTTP status is stored as itself (100..=999), the other reasons below 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The TCP connection was refused or failed.
    Connect,
    /// No answer (connection, or the status line for http) within the timeout.
    Timeout,
    /// The target closed the connection, or reset it, before a status line.
    Closed,
    /// The answer does not start with an HTTP/1.x status line.
    NotHttp,
    /// An HTTP status outside 200..=399.
    Status(u16),
}

impl Failure {
    pub(crate) fn code(self) -> u32 {
        match self {
            Failure::Connect => 1,
            Failure::Timeout => 2,
            Failure::Closed => 3,
            Failure::NotHttp => 4,
            Failure::Status(s) => u32::from(s),
        }
    }

    /// The text for a stored code; `None` for 0 (the last check passed, or none ran).
    pub(crate) fn describe(code: u32) -> Option<String> {
        Some(match code {
            0 => return None,
            1 => "connect failed".to_string(),
            2 => "timed out".to_string(),
            3 => "closed before answering".to_string(),
            4 => "not an HTTP/1.x answer".to_string(),
            status => format!("HTTP status {status}"),
        })
    }
}

/// HAProxy's rise/fall: the state flips after `fall` consecutive failures (when up) or
/// `rise` consecutive passes (when down); a result agreeing with the state resets the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HealthState {
    up: bool,
    /// Consecutive results that disagree with `up`.
    run: u32,
}

impl HealthState {
    pub(crate) fn new(up: bool) -> Self {
        HealthState { up, run: 0 }
    }

    /// Records one check; returns the new state when it flips.
    pub(crate) fn record(&mut self, passed: bool, rise: u32, fall: u32) -> Option<bool> {
        if passed == self.up {
            self.run = 0;
            return None;
        }
        self.run += 1;
        let needed = if self.up { fall } else { rise };
        if self.run < needed {
            return None;
        }
        self.up = passed;
        self.run = 0;
        Some(passed)
    }
}

/// The status code of an `HTTP/1.x NNN ...` status line, if `answer` starts with one.
pub(crate) fn parse_status(answer: &[u8]) -> Option<u16> {
    let rest = answer.strip_prefix(b"HTTP/1.")?;
    let (&minor, rest) = rest.split_first()?;
    let rest = rest.strip_prefix(b" ")?;
    if !minor.is_ascii_digit() || rest.len() < 3 {
        return None;
    }
    let digits = &rest[..3];
    if !digits.iter().all(u8::is_ascii_digit) || digits[0] == b'0' {
        return None;
    }
    if rest.len() > 3 && !matches!(rest[3], b' ' | b'\r' | b'\n') {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u16::from(d - b'0')))
}

/// The request of an http check, built once per checker.
fn http_request(path: &str, addr: SocketAddr) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: drover-lb-check\r\n\
         Connection: close\r\n\r\n"
    )
    .into_bytes()
}

/// One check without its timeout: connect, and for http send `request` and read the
/// status line.
async fn probe(addr: SocketAddr, request: Option<&[u8]>) -> Result<(), Failure> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|_| Failure::Connect)?;
    let Some(request) = request else {
        return Ok(());
    };
    stream
        .write_all(request)
        .await
        .map_err(|_| Failure::Closed)?;
    // "HTTP/1.1 200 OK\r\n" fits many times over; a longer reason phrase is not needed.
    let mut buf = [0u8; 64];
    let mut len = 0;
    while len < buf.len() && !buf[..len].contains(&b'\n') {
        match stream.read(&mut buf[len..]).await {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(_) => return Err(Failure::Closed),
        }
    }
    match parse_status(&buf[..len]) {
        Some(status) if (200..400).contains(&status) => Ok(()),
        Some(status) => Err(Failure::Status(status)),
        None if len == 0 => Err(Failure::Closed),
        None => Err(Failure::NotHttp),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Checks one target every `cfg.interval` until `stop` is cancelled or the entry is gone.
pub(crate) async fn run_checker(
    listener: String,
    entry: Weak<TargetEntry>,
    cfg: HealthCheckConfig,
    stop: CancellationToken,
) {
    let Some((addr, up)) = entry.upgrade().map(|e| (e.target.addr, e.up.load(Relaxed))) else {
        return;
    };
    let request = match &cfg.kind {
        HealthCheckKind::Tcp => None,
        HealthCheckKind::Http { path } => Some(http_request(path, addr)),
    };
    let mut state = HealthState::new(up);
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let outcome = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            r = tokio::time::timeout(cfg.timeout, probe(addr, request.as_deref())) =>
                r.unwrap_or(Err(Failure::Timeout)),
        };
        let Some(entry) = entry.upgrade() else {
            return;
        };
        match outcome {
            Ok(()) => entry.last_check_error.store(0, Relaxed),
            Err(failure) => {
                entry.checks_failed.fetch_add(1, Relaxed);
                entry.last_check_error.store(failure.code(), Relaxed);
            }
        }
        let Some(now_up) = state.record(outcome.is_ok(), cfg.rise, cfg.fall) else {
            continue;
        };
        entry.up.store(now_up, Relaxed);
        entry.last_change_unix_ms.store(unix_ms(), Relaxed);
        let id = &entry.target.id;
        match outcome {
            Ok(()) => info!(listener = %listener, target = %id, %addr, rise = cfg.rise,
                            "target passed its health checks; back in rotation"),
            Err(failure) => warn!(listener = %listener, target = %id, %addr, fall = cfg.fall,
                                  open = entry.active.load(Relaxed),
                                  reason = Failure::describe(failure.code()).as_deref(),
                                  "target failed its health checks; no new connections"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goes_down_after_fall_consecutive_failures_only() {
        let mut s = HealthState::new(true);
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), None);
        // A pass in between starts the count again.
        assert_eq!(s.record(true, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), Some(false));
        assert_eq!(s.record(false, 2, 3), None, "already down");
    }

    #[test]
    fn comes_back_after_rise_consecutive_passes() {
        let mut s = HealthState::new(false);
        assert_eq!(s.record(true, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(true, 2, 3), None);
        assert_eq!(s.record(true, 2, 3), Some(true));
        assert_eq!(s.record(true, 2, 3), None, "already up");
    }

    #[test]
    fn rise_and_fall_of_one_flip_at_once() {
        let mut s = HealthState::new(true);
        assert_eq!(s.record(false, 1, 1), Some(false));
        assert_eq!(s.record(true, 1, 1), Some(true));
    }

    #[test]
    fn status_lines_are_parsed() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status(b"HTTP/1.1 204\r\n"), Some(204));
        assert_eq!(parse_status(b"HTTP/1.1 301"), Some(301));
        for bad in [
            &b""[..],
            b"HTTP/1.1",
            b"HTTP/1.1 20",
            b"HTTP/2 200 OK\r\n",
            b"SSH-2.0-OpenSSH\r\n",
            b"HTTP/1.1 2000 OK\r\n",
            b"HTTP/1.1 099 x\r\n",
            b"HTTP/1.x 200 OK\r\n",
        ] {
            assert_eq!(
                parse_status(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn failures_round_trip_through_their_codes() {
        assert_eq!(Failure::describe(0), None);
        for f in [
            Failure::Connect,
            Failure::Timeout,
            Failure::Closed,
            Failure::NotHttp,
        ] {
            assert!(f.code() < 100);
            assert!(Failure::describe(f.code()).is_some());
        }
        assert_eq!(
            Failure::describe(Failure::Status(500).code()).as_deref(),
            Some("HTTP status 500")
        );
    }

    #[test]
    fn http_request_names_path_and_host() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let req = String::from_utf8(http_request("/healthz", addr)).expect("utf8");
        assert!(req.starts_with("GET /healthz HTTP/1.0\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
    }
}
