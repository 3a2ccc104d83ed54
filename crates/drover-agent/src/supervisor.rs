//! One task per component: fetch its artifact, start it, watch its exit and health, respawn it
//! with backoff, and stop it gracefully when the agent stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_model::api::ComponentState;
use drover_model::fleet::HealthCheck;
use tokio::sync::{oneshot, watch};

use crate::backoff::Backoff;
use crate::health::{self, Probe, Tally, Verdict};
use crate::{runtime, AgentError, Ctx};

/// How the first health probe is delayed after a start (at most; less if the interval is shorter).
const FIRST_PROBE_DELAY: Duration = Duration::from_millis(100);

/// How one run of a component ended.
enum End {
    /// The agent is stopping; the process (if any) was stopped.
    Stopped,
    /// The process exited on its own.
    Exited { exit: String, ran: Duration },
    /// The process was stopped because it failed its health check.
    Unhealthy {
        exit: String,
        reason: String,
        ran: Duration,
    },
    /// It could not be started.
    Failed(AgentError),
}

/// Resolves once the agent asks components to stop (or is gone).
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Supervise component `idx` until `stop` turns true. `booted` is sent once the component has
/// been started (or failed to start) for the first time, so the agent starts components in order.
pub(crate) async fn supervise(
    ctx: Arc<Ctx>,
    idx: usize,
    mut stop: watch::Receiver<bool>,
    booted: oneshot::Sender<()>,
) {
    let comp = &ctx.plan.components[idx];
    let mut booted = Some(booted);
    let mut backoff = Backoff::from_policy(&comp.restart);
    let mut slot = runtime::Slot::new(comp);
    loop {
        let end = run_once(&ctx, idx, &mut slot, &mut booted, &mut stop).await;
        let ran = match end {
            End::Stopped => {
                keep_last_words(&ctx, idx, &slot).await;
                slot.cleanup(&ctx, idx).await;
                ctx.update(idx, |c| {
                    c.state = ComponentState::Stopped;
                    c.pid = None;
                });
                return;
            }
            End::Exited { exit, ran } => {
                tracing::warn!(component = %comp.name, %exit, ran_ms = ran.as_millis() as u64, "component exited; restarting");
                ctx.record_flight(idx, format!("exited ({exit})")).await;
                let output = match last_output(&ctx.instance.log_file(comp)) {
                    Some(o) => Some(o),
                    None => container_output(&ctx, &slot).await,
                };
                ctx.update(idx, |c| {
                    c.state = ComponentState::Backoff;
                    c.pid = None;
                    c.restarts += 1;
                    c.last_exit = Some(exit);
                    c.last_output = output;
                });
                ran
            }
            End::Unhealthy { exit, reason, ran } => {
                tracing::warn!(component = %comp.name, %reason, "component failed its health check; restarted");
                ctx.record_flight(
                    idx,
                    format!("failed its health check ({reason}); stopped: {exit}"),
                )
                .await;
                let output = match last_output(&ctx.instance.log_file(comp)) {
                    Some(o) => Some(o),
                    None => container_output(&ctx, &slot).await,
                };
                ctx.update(idx, |c| {
                    c.last_output = output;
                    c.state = ComponentState::Backoff;
                    c.pid = None;
                    c.restarts += 1;
                    c.last_exit = Some(exit);
                    c.message = Some(format!(
                        "restarted after failing its health check: {reason}"
                    ));
                });
                ran
            }
            End::Failed(e) => {
                tracing::error!(component = %comp.name, error = %e, "cannot start component; will retry");
                ctx.update(idx, |c| {
                    c.state = ComponentState::Failed;
                    c.pid = None;
                    c.message = Some(e.to_string());
                });
                Duration::ZERO
            }
        };
        if let Some(b) = booted.take() {
            let _ = b.send(());
        }
        let delay = backoff.next_delay(ran);
        if !delay.is_zero() {
            tracing::info!(component = %comp.name, delay_ms = delay.as_millis() as u64, "waiting before the next start");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop_requested(&mut stop) => {
                    keep_last_words(&ctx, idx, &slot).await;
                    slot.cleanup(&ctx, idx).await;
                    ctx.update(idx, |c| c.state = ComponentState::Stopped);
                    return;
                }
            }
        }
    }
}

/// A container's last lines, read before it is removed: its final flight record is made
/// after the stop, when the engine has them no more.
async fn keep_last_words(ctx: &Ctx, idx: usize, slot: &runtime::Slot) {
    if slot.container_id().is_some() {
        let lines = crate::relay::container_tail(ctx, idx).await;
        ctx.set_last_words(idx, lines);
    }
}

/// Prepare (once), start, and watch one run of the component.
async fn run_once(
    ctx: &Ctx,
    idx: usize,
    slot: &mut runtime::Slot,
    booted: &mut Option<oneshot::Sender<()>>,
    stop: &mut watch::Receiver<bool>,
) -> End {
    let comp = &ctx.plan.components[idx];
    if *stop.borrow() {
        return End::Stopped;
    }
    let dir = ctx.instance.component_dir(comp);
    if let Err(source) = tokio::fs::create_dir_all(&dir).await {
        return End::Failed(AgentError::Dir { path: dir, source });
    }
    tokio::select! {
        r = slot.prepare(ctx, idx) => {
            if let Err(e) = r {
                return End::Failed(e);
            }
        }
        _ = stop_requested(stop) => return End::Stopped,
    }
    let (mut run, probe) = match slot.start(ctx, idx).await {
        Ok(r) => r,
        Err(e) => return End::Failed(e),
    };
    let started = Instant::now();
    if let Some(id) = slot.container_id() {
        ctx.set_container(idx, id);
    }
    let pid = run.pid();
    let checked = probe.is_some() || run.runtime_health();
    match (run.container(), run.adopted()) {
        (Some(id), true) => {
            tracing::info!(component = %comp.name, pid, container = %id, "running container adopted")
        }
        (Some(id), false) => {
            tracing::info!(component = %comp.name, pid, container = %id, "component started")
        }
        (None, _) => tracing::info!(component = %comp.name, pid, "component started"),
    }
    ctx.update(idx, |c| {
        c.pid = Some(pid);
        c.state = if checked {
            ComponentState::Starting
        } else {
            ComponentState::Healthy
        };
        if !checked {
            c.message = None;
        }
    });
    if let Some(b) = booted.take() {
        let _ = b.send(());
    }
    if comp.drain_signal.is_some() {
        ctx.set_drain_target(idx, Some(run.drain_target()));
    }

    enum Ev {
        Exit(String),
        Unhealthy(String),
        Stop,
    }
    let ev = {
        let health = async {
            match &probe {
                Some((p, check)) => watch_health(ctx, idx, p, check, started).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(health);
        loop {
            tokio::select! {
                e = run.next() => match e {
                    runtime::Event::Exited(how) => break Ev::Exit(how),
                    runtime::Event::Healthy => ctx.update(idx, |c| {
                        c.state = ComponentState::Healthy;
                        c.message = None;
                    }),
                    runtime::Event::Unhealthy(reason) => {
                        ctx.update(idx, |c| {
                            c.state = ComponentState::Unhealthy;
                            c.message = Some(reason.clone());
                        });
                        break Ev::Unhealthy(reason);
                    }
                },
                reason = &mut health => break Ev::Unhealthy(reason),
                _ = stop_requested(stop) => break Ev::Stop,
            }
        }
    };
    // In the poll that saw the run end (a reaped pid is never signalled): nothing to drain now.
    ctx.set_drain_target(idx, None);
    let grace = comp.stop_grace.0;
    match ev {
        Ev::Exit(exit) => End::Exited {
            exit,
            ran: started.elapsed(),
        },
        Ev::Unhealthy(reason) => {
            let exit = run.stop(comp, grace).await;
            End::Unhealthy {
                exit,
                reason,
                ran: started.elapsed(),
            }
        }
        Ev::Stop => {
            tracing::info!(component = %comp.name, pid, signal = %comp.stop_signal, "stopping component");
            let e = run.stop(comp, grace).await;
            tracing::info!(component = %comp.name, pid, exit = %e, "component stopped");
            ctx.update(idx, |c| c.last_exit = Some(e));
            End::Stopped
        }
    }
}

/// Probe every interval and publish Healthy/Unhealthy; resolves (with the last failure) when the
/// component must be restarted: it is unhealthy and either had been healthy in this run or has
/// been running longer than its threshold window, `interval × (healthy + unhealthy thresholds)`.
async fn watch_health(
    ctx: &Ctx,
    idx: usize,
    probe: &Probe,
    check: &HealthCheck,
    started: Instant,
) -> String {
    let interval = check.interval.0.max(Duration::from_millis(10));
    let mut tally = Tally::new(check.healthy_threshold, check.unhealthy_threshold);
    let window = interval.saturating_mul(
        check
            .healthy_threshold
            .max(1)
            .saturating_add(check.unhealthy_threshold.max(1)),
    );
    tokio::time::sleep(interval.min(FIRST_PROBE_DELAY)).await;
    loop {
        let result = health::probe(probe, check.timeout.0).await;
        match (tally.record(result.is_ok()), result) {
            (Verdict::Healthy, _) => ctx.update(idx, |c| {
                c.state = ComponentState::Healthy;
                c.message = None;
            }),
            (Verdict::Unhealthy, Err(reason)) => {
                ctx.update(idx, |c| {
                    c.state = ComponentState::Unhealthy;
                    c.message = Some(reason.clone());
                });
                if tally.was_healthy || started.elapsed() >= window {
                    return reason;
                }
            }
            _ => {}
        }
        tokio::time::sleep(interval).await;
    }
}

/// A Docker component's last lines, from the engine's logs API (none for a process
/// component, or when the engine keeps no logs for it: a log driver such as `none`).
async fn container_output(ctx: &Ctx, slot: &runtime::Slot) -> Option<String> {
    let id = slot.container_id()?;
    let docker = ctx.docker.client().await.ok()?;
    crate::docker::last_output(&docker, id).await
}

/// The last lines of a component's log (what it printed before it exited), at most
/// [`drover_model::api::LAST_OUTPUT_MAX`] bytes, whole lines, without their timestamps.
/// `None` when there is no log (a Docker component: the engine keeps its output).
pub(crate) fn last_output(log: &std::path::Path) -> Option<String> {
    if !log.exists() {
        return None;
    }
    let lines = crate::logfile::last_lines(log, drover_model::api::LAST_OUTPUT_MAX);
    let text: Vec<&str> = lines.iter().map(|l| l.2.as_str()).collect();
    let text = text.join("\n");
    let text = text.trim_end();
    (!text.is_empty()).then(|| text.to_string())
}

/// The end of `buf` as text, at most [`drover_model::api::LAST_OUTPUT_MAX`] bytes, cut at a
/// line start (`mid_line`: `buf` itself starts mid-line) and at a character boundary.
pub(crate) fn capped_output(buf: &[u8], mid_line: bool) -> Option<String> {
    let max = drover_model::api::LAST_OUTPUT_MAX as u64;
    let mid_line = mid_line || buf.len() as u64 > max;
    let buf = &buf[buf.len().saturating_sub(max as usize)..];
    let text = String::from_utf8_lossy(buf);
    // Started mid-line: drop the partial first line.
    let text = match (mid_line, text.find('\n')) {
        (true, Some(i)) => &text[i + 1..],
        _ => &text[..],
    };
    let text = text.trim_end();
    if text.is_empty() {
        return None;
    }
    // Lossy decoding may have grown the text past the cap: keep the end.
    let mut cut = text.len().saturating_sub(max as usize);
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    Some(text[cut..].to_string())
}

#[cfg(test)]
mod last_output_tests {
    use super::last_output;

    #[test]
    fn the_last_lines_are_kept_within_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        assert_eq!(last_output(&log), None);
        std::fs::write(
            &log,
            "2024-01-01T00:00:00.000Z out starting\n2024-01-01T00:00:00.001Z err error: cannot bind 127.0.0.1:8080\n",
        )
        .unwrap();
        assert_eq!(
            last_output(&log).as_deref(),
            Some("starting\nerror: cannot bind 127.0.0.1:8080")
        );
        let long: String = (0..500).map(|i| format!("line {i} é\n")).collect();
        std::fs::write(&log, &long).unwrap();
        let out = last_output(&log).unwrap();
        assert!(
            out.len() <= drover_model::api::LAST_OUTPUT_MAX,
            "{}",
            out.len()
        );
        assert!(out.ends_with("line 499 é"), "{out}");
        assert!(out.starts_with("line "), "starts at a line: {out}");
    }
}
