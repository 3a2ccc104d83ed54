//! One task per component: fetch its artifact, start it, watch its exit and health, respawn it
//! with backoff, and stop it gracefully when the agent stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_model::api::ComponentState;
use drover_model::fleet::HealthCheck;
use tokio::sync::{oneshot, watch};

use crate::backoff::Backoff;
use crate::health::{self, Probe, Tally, Verdict};
use crate::{artifact, process, AgentError, Ctx};

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
    let mut fetched = comp.artifact.is_none();
    loop {
        let end = run_once(&ctx, idx, &mut fetched, &mut booted, &mut stop).await;
        let ran = match end {
            End::Stopped => {
                ctx.update(idx, |c| {
                    c.state = ComponentState::Stopped;
                    c.pid = None;
                });
                return;
            }
            End::Exited { exit, ran } => {
                tracing::warn!(component = %comp.name, %exit, ran_ms = ran.as_millis() as u64, "component exited; restarting");
                ctx.update(idx, |c| {
                    c.state = ComponentState::Backoff;
                    c.pid = None;
                    c.restarts += 1;
                    c.last_exit = Some(exit);
                });
                ran
            }
            End::Unhealthy { exit, reason, ran } => {
                tracing::warn!(component = %comp.name, %reason, "component failed its health check; restarted");
                ctx.update(idx, |c| {
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
                    ctx.update(idx, |c| c.state = ComponentState::Stopped);
                    return;
                }
            }
        }
    }
}

/// Fetch (once), start, and watch one run of the component.
async fn run_once(
    ctx: &Ctx,
    idx: usize,
    fetched: &mut bool,
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
    if let (false, Some(art)) = (*fetched, &comp.artifact) {
        ctx.update(idx, |c| c.state = ComponentState::Fetching);
        tracing::info!(component = %comp.name, url = %art.url, "fetching artifact");
        let scratch = ctx.instance.dir.join(format!(".{}.download", comp.name));
        tokio::select! {
            r = artifact::fetch_and_unpack(&ctx.client, art, &dir, &scratch) => match r {
                Ok(()) => *fetched = true,
                Err(e) => return End::Failed(e),
            },
            _ = stop_requested(stop) => return End::Stopped,
        }
    }
    let launch = match ctx.instance.launch(comp) {
        Ok(l) => l,
        Err(e) => return End::Failed(e),
    };
    let probe = match ctx.instance.probe(comp) {
        Ok(p) => p,
        Err(e) => return End::Failed(e),
    };
    // Spawned from this task, i.e. on the runtime's thread (see process::spawn).
    let mut child = match process::spawn(&launch, &ctx.instance.log_file(comp)) {
        Ok(c) => c,
        Err(source) => {
            return End::Failed(AgentError::Spawn {
                component: comp.name.clone(),
                command: launch.program.display().to_string(),
                source,
            })
        }
    };
    let started = Instant::now();
    let pid = child.id().unwrap_or(0);
    tracing::info!(component = %comp.name, pid, "component started");
    ctx.update(idx, |c| {
        c.pid = Some(pid);
        c.state = if probe.is_some() {
            ComponentState::Starting
        } else {
            ComponentState::Healthy
        };
        if probe.is_none() {
            c.message = None;
        }
    });
    if let Some(b) = booted.take() {
        let _ = b.send(());
    }

    enum Event {
        Exit(std::io::Result<std::process::ExitStatus>),
        Unhealthy(String),
        Stop,
    }
    let event = {
        let health = async {
            match &probe {
                Some((p, check)) => watch_health(ctx, idx, p, check, started).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = child.wait() => Event::Exit(r),
            reason = health => Event::Unhealthy(reason),
            _ = stop_requested(stop) => Event::Stop,
        }
    };
    let signal = drover_model::signal_number(&comp.stop_signal).unwrap_or(libc::SIGTERM);
    let exit = |r: std::io::Result<std::process::ExitStatus>| match r {
        Ok(st) => process::describe(&st),
        Err(e) => format!("unknown ({e})"),
    };
    match event {
        Event::Exit(r) => {
            // Whatever the leader left behind in its group goes with it.
            process::signal_group(pid, libc::SIGKILL);
            End::Exited {
                exit: exit(r),
                ran: started.elapsed(),
            }
        }
        Event::Unhealthy(reason) => {
            let r = process::stop(&mut child, pid, signal, comp.stop_grace.0).await;
            End::Unhealthy {
                exit: exit(r),
                reason,
                ran: started.elapsed(),
            }
        }
        Event::Stop => {
            tracing::info!(component = %comp.name, pid, signal = %comp.stop_signal, "stopping component");
            let r = process::stop(&mut child, pid, signal, comp.stop_grace.0).await;
            let e = exit(r);
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
