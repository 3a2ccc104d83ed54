//! Custom metrics: numbers components serve over HTTP (`custom_metrics` in the fleet file),
//! read with every heartbeat and reported for autoscaling.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use drover_model::Plan;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Read every custom metric of the plan's components on `addr`, all at once, within one
/// `deadline`: a slow or hung endpoint costs no more than the deadline, however many there are,
/// so the heartbeat that carries them is never late. A metric that cannot be read in time
/// (component down, bad body, no answer) is left out: no data is better than a made-up value.
pub(crate) async fn read_all(
    plan: &Plan,
    addr: IpAddr,
    deadline: Duration,
) -> BTreeMap<String, f64> {
    let targets = plan
        .components
        .iter()
        .flat_map(|c| {
            c.custom_metrics.iter().filter_map(move |(name, m)| {
                let port = c.ports.get(&m.port)?;
                Some((name.clone(), SocketAddr::new(addr, *port), m.path.clone()))
            })
        })
        .collect();
    read_each(targets, deadline).await
}

async fn read_each(
    targets: Vec<(String, SocketAddr, String)>,
    deadline: Duration,
) -> BTreeMap<String, f64> {
    let reads = targets.into_iter().map(|(name, at, path)| async move {
        match tokio::time::timeout(deadline, get_number(at, &path)).await {
            Ok(Ok(v)) => Some((name, v)),
            Ok(Err(e)) => {
                tracing::debug!(metric = %name, "custom metric not read: {e}");
                None
            }
            Err(_) => {
                tracing::debug!(metric = %name, "custom metric timed out");
                None
            }
        }
    });
    futures::future::join_all(reads)
        .await
        .into_iter()
        .flatten()
        .collect()
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

    /// 40 endpoints that accept and never answer, and one that answers: read together, the
    /// good one is reported and the whole read ends with its deadline (one after another, the
    /// hung ones would take 40 deadlines).
    #[tokio::test]
    async fn hung_metrics_cost_one_deadline_not_one_each() {
        let mut held = Vec::new();
        let mut targets = Vec::new();
        for i in 0..40 {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            targets.push((
                format!("hung{i}"),
                l.local_addr().unwrap(),
                "/m".to_string(),
            ));
            held.push(l); // accepted by the kernel, never read or answered
        }
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        targets.push(("good".into(), good.local_addr().unwrap(), "/m".into()));
        let answer = tokio::spawn(async move {
            let (mut s, _) = good.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\n0.5").await.unwrap();
        });
        let deadline = Duration::from_millis(300);
        let t = std::time::Instant::now();
        let got = read_each(targets, deadline).await;
        let took = t.elapsed();
        answer.await.unwrap();
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            [("good".to_string(), 0.5)]
        );
        // 40 x 300 ms in sequence; at once, one deadline (with room for a loaded machine).
        assert!(took < deadline * 5, "{took:?}");
    }

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
