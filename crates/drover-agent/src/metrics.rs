//! Custom metrics: numbers components serve over HTTP (`custom_metrics` in the fleet file),
//! read with every heartbeat and reported for autoscaling.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use drover_model::Plan;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Read every custom metric of the plan's components on `addr`. A metric that cannot be read
/// (component down, bad body) is left out: no data is better than a made-up value.
pub(crate) async fn read_all(
    plan: &Plan,
    addr: IpAddr,
    timeout: Duration,
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for c in &plan.components {
        for (name, m) in &c.custom_metrics {
            let Some(port) = c.ports.get(&m.port) else {
                continue;
            };
            let at = SocketAddr::new(addr, *port);
            match tokio::time::timeout(timeout, get_number(at, &m.path)).await {
                Ok(Ok(v)) => {
                    out.insert(name.clone(), v);
                }
                Ok(Err(e)) => tracing::debug!(metric = %name, "custom metric not read: {e}"),
                Err(_) => tracing::debug!(metric = %name, "custom metric timed out"),
            }
        }
    }
    out
}

/// GET `path` and parse the body as one number.
async fn get_number(addr: SocketAddr, path: &str) -> Result<f64, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: drover-agent\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    // A number fits in a small answer; refuse anything large.
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 256];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 4096 {
            return Err("answer too large for a number".into());
        }
    }
    parse_answer(&buf)
}

fn parse_answer(buf: &[u8]) -> Result<f64, String> {
    let text = std::str::from_utf8(buf).map_err(|_| "answer is not UTF-8".to_string())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "not an HTTP answer".to_string())?;
    let ok = head
        .split_ascii_whitespace()
        .nth(1)
        .is_some_and(|c| c.starts_with('2'));
    if !ok {
        return Err(format!(
            "status {}",
            head.lines().next().unwrap_or_default()
        ));
    }
    body.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| format!("body {:?} is not a number", body.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_number_answer() {
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n0.75\n"),
            Ok(0.75)
        );
        assert!(parse_answer(b"HTTP/1.1 500 Oops\r\n\r\n1").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n\r\nNaN").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n\r\nlots").is_err());
    }
}
