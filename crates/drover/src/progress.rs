//! Following a rollout: a progress bar of instances on the new version, then a summary. A
//! rollout is followed until the last stale instance is gone (drained, stopped, terminated),
//! not only until the last permit is handed out: once it returns, only the new version answers.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use drover_model::api::InstanceState;
use drover_model::logs::LogLine;
use drover_model::{Event, EventKind};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::client::Client;
use crate::exit;

/// How many of a failing instance's last lines a failed `--wait` prints.
const LAST_LINES: usize = 10;

/// How one stale instance left, from its events.
#[derive(Clone, Debug, PartialEq)]
pub struct Leave {
    pub instance: String,
    /// From its permit to the end of its drain (its agent's `drained` event).
    pub drain_ms: Option<u64>,
    /// From its permit until it was gone (`terminated`).
    pub gone_ms: Option<u64>,
}

/// Follow the rollout of every group of `service` until each is done, with no stale instance
/// left, or one fails. `changed`: the request made a new revision (else the version was
/// already preferred, and what is followed is the rollout already under way, if any).
pub async fn follow(
    client: &Client,
    service: &str,
    what: &str,
    timeout: Duration,
    json: bool,
    changed: bool,
) -> anyhow::Result<u8> {
    let t0 = Instant::now();
    let start = client.fleet_status().await?;
    // The generation each group is rolling out to.
    // A group whose wave has not come yet rolls out to its next generation later.
    let targets: Vec<(String, u64)> = start
        .groups
        .iter()
        .filter(|g| g.service == service)
        // A group held by hand (`deploy --region` elsewhere) is not waited for.
        .filter(|g| !g.rollout.held)
        .map(|g| {
            let next = if g.rollout.wave_pending { 1 } else { 0 };
            (g.group.clone(), g.generation + next)
        })
        .collect();
    if !changed && !json {
        let under_way = start
            .groups
            .iter()
            .filter(|g| g.service == service)
            .any(|g| {
                g.rollout.in_progress || g.instances.iter().any(|i| i.generation < g.generation)
            });
        if under_way {
            println!("{what}: already preferred; following the rollout under way");
        }
    }
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
    // The instances whose output tells why (named by the failure's event).
    let mut failing: Vec<(String, String)> = Vec::new();
    // Every stale instance seen while following: their drains go in the summary.
    let mut leavers: BTreeSet<String> = BTreeSet::new();
    loop {
        let s = client.fleet_status().await?;
        let mut total = 0u32;
        let mut on_new = 0u32;
        let mut healthy = 0u32;
        let mut stale = 0u32;
        let mut draining = 0u32;
        let mut done = true;
        failed.clear();
        failing.clear();
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
            let old: Vec<_> = g
                .instances
                .iter()
                .filter(|i| i.generation < *target)
                .collect();
            stale += old.len() as u32;
            draining += old
                .iter()
                .filter(|i| {
                    matches!(
                        i.state,
                        InstanceState::Draining | InstanceState::Terminating
                    )
                })
                .count() as u32;
            leavers.extend(old.iter().map(|i| i.id.clone()));
            if g.rollout.failed_generation >= *target {
                // The status may show the failure a moment before its event is stored.
                let key = format!("generation {target} failed");
                let mut event = None;
                for _ in 0..20 {
                    event = client
                        .rollout_events(group)
                        .await
                        .ok()
                        .and_then(|ev| ev.into_iter().rev().find(|e| e.message.contains(&key)));
                    if event.is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if let Some(i) = event.as_ref().and_then(|e| e.instance.clone()) {
                    failing.push((g.service.clone(), i));
                }
                let why = event
                    .map(|e| e.message)
                    .unwrap_or_else(|| format!("rollout to generation {target} failed"));
                failed.push(format!("{group}: {why}"));
            } else if g.rollout.good_generation < *target
                || g.rollout.in_progress
                || !old.is_empty()
            {
                // Done only when no stale instance is left: one still draining may answer.
                done = false;
            }
        }
        bar.set_length(total as u64);
        bar.set_position(on_new.min(total) as u64);
        bar.set_message(if draining > 0 {
            format!("{healthy} healthy, {stale} stale ({draining} draining)")
        } else {
            format!("{healthy} healthy, {stale} stale")
        });
        if !failed.is_empty() {
            bar.abandon();
            let secs = t0.elapsed().as_secs_f64();
            // What the failing instances printed last (live, or from the flight recorder).
            let mut last = Vec::new();
            for (service, instance) in &failing {
                let lines = client
                    .last_lines(service, instance, LAST_LINES)
                    .await
                    .unwrap_or_default();
                last.push((service, instance, lines));
            }
            if json {
                let last: serde_json::Map<String, serde_json::Value> = last
                    .iter()
                    .map(|(_, i, lines)| ((*i).clone(), serde_json::json!(lines)))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "seconds": secs, "failed": failed, "last_lines": last})
                );
            } else {
                eprint!("{}", failure_report(what, secs, &failed, &last));
            }
            return Ok(exit::FAILED);
        }
        if done {
            bar.finish();
            let secs = t0.elapsed().as_secs_f64();
            let leaves = leaves(client, &leavers).await;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": true,
                        "seconds": secs,
                        "groups": targets.len(),
                        "instances": total,
                        "drains": leaves.iter().map(|l| serde_json::json!({
                            "instance": l.instance,
                            "drain_seconds": l.drain_ms.map(|ms| ms as f64 / 1000.0),
                            "gone_seconds": l.gone_ms.map(|ms| ms as f64 / 1000.0),
                        })).collect::<Vec<_>>(),
                    })
                );
            } else {
                println!(
                    "{what}: done in {secs:.1}s: {} group(s), {total} instance(s) on the new version, {healthy} healthy{}",
                    targets.len(),
                    drains_summary(&leaves)
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

/// What a failed `--wait` prints: why each group failed (from its failure event) and what
/// the failing instances printed last, agent-supplied text made printable.
pub fn failure_report(
    what: &str,
    secs: f64,
    failed: &[String],
    last: &[(&String, &String, Vec<LogLine>)],
) -> String {
    use crate::render::printable;
    use std::fmt::Write;
    let mut out = format!("{what} failed after {secs:.1}s:\n");
    for f in failed {
        let _ = writeln!(out, "  {}", printable(f));
    }
    for (service, instance, lines) in last {
        if lines.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "the last {} lines of {instance} (`drover logs {service} --instance {instance}`):",
            lines.len()
        );
        for l in lines {
            let _ = writeln!(
                out,
                "  {} {} | {}",
                printable(&l.instance),
                printable(&l.component),
                printable(&l.line)
            );
        }
    }
    out
}

/// How each of `instances` left, from its events (its last permit, drained and terminated).
async fn leaves(client: &Client, instances: &BTreeSet<String>) -> Vec<Leave> {
    let mut out = Vec::new();
    for id in instances {
        let Ok(events) = client.instance_events(id).await else {
            continue;
        };
        if let Some(l) = leave_of(id, &events) {
            out.push(l);
        }
    }
    out
}

/// How one instance left, from its events: None when it had no permit (lost, or terminated).
pub fn leave_of(instance: &str, events: &[Event]) -> Option<Leave> {
    let permit = events.iter().rev().find(|e| e.kind == EventKind::Permit)?;
    let after = |kind: EventKind| {
        events
            .iter()
            .find(|e| e.kind == kind && e.seq > permit.seq)
            .map(|e| e.at_ms.saturating_sub(permit.at_ms))
    };
    Some(Leave {
        instance: instance.to_string(),
        drain_ms: after(EventKind::Drained),
        gone_ms: after(EventKind::Terminated),
    })
}

/// `; 3 stale instance(s) drained in 12ms to 340ms, each gone at most 1.4s after its permit`.
pub fn drains_summary(leaves: &[Leave]) -> String {
    use drover_model::duration::short;
    if leaves.is_empty() {
        return String::new();
    }
    let drains: Vec<u64> = leaves.iter().filter_map(|l| l.drain_ms).collect();
    let gone = leaves.iter().filter_map(|l| l.gone_ms).max();
    let n = leaves.len();
    let drained = match (drains.iter().min(), drains.iter().max()) {
        (Some(lo), Some(hi)) if short(*lo) == short(*hi) => format!("drained in {}", short(*hi)),
        (Some(lo), Some(hi)) => format!("drained in {} to {}", short(*lo), short(*hi)),
        _ => "left (their agents did not report their drains)".to_string(),
    };
    let gone = gone
        .map(|g| format!(", each gone at most {} after its permit", short(g)))
        .unwrap_or_default();
    format!("; {n} stale instance(s) {drained}{gone}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, at_ms: u64, kind: EventKind) -> Event {
        Event {
            seq,
            at_ms,
            kind,
            group: Some("web/local".into()),
            instance: Some("i-000001".into()),
            message: String::new(),
        }
    }

    #[test]
    fn a_leave_counts_from_the_permit() {
        let events = [
            ev(1, 1_000, EventKind::Launched),
            ev(2, 1_500, EventKind::Healthy),
            ev(7, 10_000, EventKind::Permit),
            ev(8, 10_250, EventKind::Drained),
            ev(9, 11_300, EventKind::Terminated),
        ];
        let l = leave_of("i-000001", &events).unwrap();
        assert_eq!((l.drain_ms, l.gone_ms), (Some(250), Some(1_300)));
        // No permit (lost, or terminated by the server): not a drain.
        assert_eq!(leave_of("i-000001", &events[..2]), None);
        // Still draining: no end yet.
        let l = leave_of("i-000001", &events[..3]).unwrap();
        assert_eq!((l.drain_ms, l.gone_ms), (None, None));
    }

    /// Issue 20, item 11: a failure event's message and the failing instance's last lines
    /// reach the terminal without their escape sequences.
    #[test]
    fn a_failed_wait_prints_agent_text_without_control_characters() {
        let evil = "\u{1b}]0;pwned\u{7}\u{1b}[2J\rok";
        let (service, instance) = ("web".to_string(), "i-000001".to_string());
        let line = LogLine {
            at_ms: 0,
            instance: instance.clone(),
            component: "app".into(),
            stream: drover_model::logs::Stream::Stderr,
            line: format!("boom {evil}"),
        };
        let out = failure_report(
            "deploy web",
            1.5,
            &[format!(
                "web/local: generation 2 failed: app exited ({evil})"
            )],
            &[(&service, &instance, vec![line])],
        );
        assert!(
            !out.contains('\u{1b}') && !out.contains('\u{7}') && !out.contains('\r'),
            "{out:?}"
        );
        assert!(out.starts_with("deploy web failed after 1.5s:\n  web/local: generation 2 failed: app exited (\\u{1b}]0;pwned"), "{out}");
        assert!(
            out.contains("\n  i-000001 app | boom \\u{1b}]0;pwned"),
            "{out}"
        );
    }

    #[test]
    fn the_summary_says_how_long_the_drains_took() {
        let l = |drain, gone| Leave {
            instance: "i".into(),
            drain_ms: drain,
            gone_ms: gone,
        };
        assert_eq!(drains_summary(&[]), "");
        assert_eq!(
            drains_summary(&[l(Some(120), Some(1_200)), l(Some(340), Some(1_400))]),
            "; 2 stale instance(s) drained in 120ms to 340ms, each gone at most 1.4s after its permit"
        );
        assert_eq!(
            drains_summary(&[l(Some(200), Some(900))]),
            "; 1 stale instance(s) drained in 200ms, each gone at most 900ms after its permit"
        );
        assert_eq!(
            drains_summary(&[l(None, Some(10_900))]),
            "; 1 stale instance(s) left (their agents did not report their drains), each gone at most 10.9s after its permit"
        );
    }
}
