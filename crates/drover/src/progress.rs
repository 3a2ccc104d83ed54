//! Following a rollout: a progress bar of instances on the new version, then a summary.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::client::Client;
use crate::exit;

/// Follow the rollout of every group of `service` until each is done or one fails.
pub async fn follow(
    client: &Client,
    service: &str,
    what: &str,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<u8> {
    let t0 = Instant::now();
    let start = client.fleet_status().await?;
    // The generation each group is rolling out to.
    let targets: Vec<(String, u64)> = start
        .groups
        .iter()
        .filter(|g| g.service == service)
        .map(|g| (g.group.clone(), g.generation))
        .collect();
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {prefix} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} on the new version, {msg} (ETA {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut failed: Vec<String> = Vec::new();
    let mut replaced = 0u32;
    loop {
        let s = client.fleet_status().await?;
        let mut total = 0u32;
        let mut on_new = 0u32;
        let mut healthy = 0u32;
        let mut stale = 0u32;
        let mut done = true;
        failed.clear();
        for (group, target) in &targets {
            let Some(g) = s.groups.iter().find(|g| &g.group == group) else {
                continue;
            };
            total += g.desired;
            on_new += g
                .instances
                .iter()
                .filter(|i| i.generation >= *target && i.in_rotation)
                .count() as u32;
            healthy += g.healthy;
            stale += g
                .instances
                .iter()
                .filter(|i| i.generation < *target)
                .count() as u32;
            if g.rollout.failed_generation >= *target {
                let why = client
                    .rollout_events(group)
                    .await
                    .ok()
                    .and_then(|ev| {
                        let key = format!("generation {target} failed");
                        ev.into_iter().rev().find(|e| e.message.contains(&key))
                    })
                    .map(|e| e.message)
                    .unwrap_or_else(|| format!("rollout to generation {target} failed"));
                failed.push(format!("{group}: {why}"));
            } else if g.rollout.good_generation < *target || g.rollout.in_progress {
                done = false;
            }
        }
        replaced = replaced.max(on_new);
        bar.set_length(total as u64);
        bar.set_position(on_new.min(total) as u64);
        bar.set_message(format!("{healthy} healthy, {stale} stale"));
        if !failed.is_empty() {
            bar.abandon();
            let secs = t0.elapsed().as_secs_f64();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "seconds": secs, "failed": failed})
                );
            } else {
                eprintln!("{what} failed after {secs:.1}s:");
                for f in &failed {
                    eprintln!("  {f}");
                }
            }
            return Ok(exit::FAILED);
        }
        if done {
            bar.finish();
            let secs = t0.elapsed().as_secs_f64();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": true, "seconds": secs, "groups": targets.len(), "instances": total})
                );
            } else {
                println!(
                    "{what}: done in {secs:.1}s: {} group(s), {total} instance(s) on the new version, {healthy} healthy",
                    targets.len()
                );
            }
            return Ok(exit::OK);
        }
        if t0.elapsed() > timeout {
            bar.abandon();
            eprintln!(
                "gave up waiting after {}: the rollout goes on; follow it with `drover status` or `drover events --follow`",
                drover_model::Dur(timeout)
            );
            return Ok(exit::FAILED);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
