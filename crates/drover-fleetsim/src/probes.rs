//! One-shot measurements: time until a (restarted) server knows every instance again, status
//! latency, and a deploy's time to its first permit.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::agents::{count_substr, with_auth};
use crate::procfs;
use crate::stats::{epoch_ms, summarize};

/// `Bearer TOKEN` from `token`, else DATA_DIR/admin.token.
pub fn admin_auth(token: Option<String>, data_dir: Option<&std::path::Path>) -> Option<String> {
    let t = token.filter(|t| !t.trim().is_empty()).or_else(|| {
        std::fs::read_to_string(data_dir?.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    })?;
    Some(format!("Bearer {}", t.trim()))
}

/// Poll `GET /v1/status?instances=none` (the per-group counts, not the instance list) until at
/// least `count` instances are healthy (a healthy instance reports). Times count from
/// `since_epoch_ms` (e.g. when the server was started).
pub async fn wait_healthy(
    admin: Option<String>,
    server: &str,
    count: usize,
    since_epoch_ms: Option<u64>,
    timeout: Duration,
    poll: Duration,
    server_pid: Option<u32>,
) -> anyhow::Result<Value> {
    let base = server.trim_end_matches('/');
    let since = since_epoch_ms.unwrap_or_else(epoch_ms);
    let cpu0 = server_pid.and_then(procfs::cpu_ticks);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    let (mut api_up, mut all_known, mut all_healthy) = (None, None, None);
    let mut last = (0, 0, 0);
    let mut polls = 0;
    while Instant::now() < deadline {
        let r = async {
            with_auth(
                client.get(format!("{base}/v1/status?instances=none")),
                admin.as_deref(),
            )
            .timeout(Duration::from_secs(30))
            .send()
            .await?
            .error_for_status()?
            .json::<drover_model::api::FleetStatus>()
            .await
        }
        .await;
        let at = epoch_ms().saturating_sub(since);
        if let Ok(s) = r {
            polls += 1;
            api_up.get_or_insert(at);
            let sum = |f: fn(&drover_model::api::GroupStatus) -> u32| {
                s.groups.iter().map(f).sum::<u32>() as usize
            };
            let total = sum(|g| g.rollout.current + g.rollout.stale);
            let healthy = sum(|g| g.healthy);
            // A healthy instance reports; the summary has no count of reporting ones.
            let reporting = healthy;
            last = (total, reporting, healthy);
            if reporting >= count && all_known.is_none() {
                all_known = Some(at);
            }
            if healthy >= count {
                all_healthy = Some(at);
                break;
            }
        }
        tokio::time::sleep(poll).await;
    }
    let cpu_s = match (cpu0, server_pid.and_then(procfs::cpu_ticks)) {
        (Some(a), Some(b)) => Some((b - a) as f64 / procfs::clk_tck() as f64),
        _ => None,
    };
    let out = json!({
        "count": count,
        "api_up_ms": api_up,
        "all_reporting_ms": all_known,
        "all_healthy_ms": all_healthy,
        "last_seen": {"instances": last.0, "reporting": last.1, "healthy": last.2},
        "status_polls": polls,
        "server_cpu_s_since_probe_start": cpu_s,
        "server_rss_mib": server_pid.and_then(procfs::mem_kib).map(|m| m.0 as f64 / 1024.0),
    });
    if all_healthy.is_none() {
        eprintln!("not every instance healthy within {timeout:?}: {out}");
    }
    Ok(out)
}

/// GET /v1/status `n` times in a row.
pub async fn status_latency(
    admin: Option<String>,
    server: &str,
    n: usize,
) -> anyhow::Result<Value> {
    let base = server.trim_end_matches('/');
    let client = reqwest::Client::new();
    let mut lat = Vec::new();
    let mut bytes = 0;
    let mut instances = 0;
    for _ in 0..n {
        let t = Instant::now();
        let body = with_auth(client.get(format!("{base}/v1/status")), admin.as_deref())
            .timeout(Duration::from_secs(60))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        lat.push(t.elapsed().as_micros() as u32);
        bytes = body.len();
        instances = count_substr(&body, b"\"launched_at_ms\"");
    }
    Ok(json!({"latency": summarize(lat), "bytes": bytes, "instances": instances}))
}

/// Highest seq among events of `kind` (0 if none).
async fn last_seq(
    client: &reqwest::Client,
    admin: Option<&str>,
    base: &str,
    kind: &str,
) -> anyhow::Result<u64> {
    let v: Value = with_auth(client.get(format!("{base}/v1/events")), admin)
        .query(&[("kind", kind), ("limit", "100000")])
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v.as_array()
        .and_then(|a| a.iter().filter_map(|e| e["seq"].as_u64()).max())
        .unwrap_or(0))
}

async fn first_after(
    client: &reqwest::Client,
    admin: Option<&str>,
    base: &str,
    kind: &str,
    after: u64,
) -> anyhow::Result<Option<Value>> {
    let v: Value = with_auth(client.get(format!("{base}/v1/events")), admin)
        .query(&[
            ("kind", kind),
            ("after", &after.to_string()),
            ("limit", "1"),
        ])
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v.as_array().and_then(|a| a.first().cloned()))
}

/// POST /v1/deploy and time the first `plan_changed`, `permit` and `launched` events after it
/// (server timestamps, same clock as ours).
pub async fn deploy_probe(
    admin: Option<String>,
    server: &str,
    service: &str,
    component: &str,
    version: &str,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let base = server.trim_end_matches('/');
    let client = reqwest::Client::new();
    let kinds = ["plan_changed", "permit", "launched"];
    let mut after = Vec::new();
    for k in kinds {
        after.push(
            last_seq(&client, admin.as_deref(), base, k)
                .await
                .with_context(|| format!("events of kind {k}"))?,
        );
    }
    let t0 = epoch_ms();
    let resp = with_auth(client.post(format!("{base}/v1/deploy")), admin.as_deref())
        .json(&json!({"service": service, "component": component, "version": version}))
        .timeout(Duration::from_secs(60))
        .send()
        .await?;
    let t1 = epoch_ms();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("deploy answered {status}: {body}");
    }
    let mut found: Vec<Option<Value>> = vec![None; kinds.len()];
    let mut seen_at: Vec<Option<u64>> = vec![None; kinds.len()];
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && found.iter().any(Option::is_none) {
        for (i, k) in kinds.iter().enumerate() {
            if found[i].is_none() {
                if let Some(ev) = first_after(&client, admin.as_deref(), base, k, after[i]).await? {
                    seen_at[i] = Some(epoch_ms() - t0);
                    found[i] = Some(ev);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rel = |i: usize| {
        found[i]
            .as_ref()
            .and_then(|e| e["at_ms"].as_u64())
            .map(|at| at as i64 - t0 as i64)
    };
    Ok(json!({
        "deploy_sent_epoch_ms": t0,
        "deploy_post_ms": t1 - t0,
        "plan_changed_event_ms": rel(0),
        "first_permit_event_ms": rel(1),
        "first_launch_event_ms": rel(2),
        "first_permit_seen_by_probe_ms": seen_at[1],
        "first_permit": found[1],
        "first_launch": found[2],
    }))
}
