//! The runtime abstraction: what the supervisor needs from a way of running a component —
//! prepare it (fetch its artifact, pull its image), start it, watch it, stop it, clean up —
//! for the `process` runtime (a child process in its own group) and the `docker` runtime (a
//! container of the local engine). The supervisor (backoff, health checks, reports) is the same
//! for both.

use std::time::Duration;

use drover_model::fleet::{HealthCheck, HealthKind, Runtime};
use drover_model::PlanComponent;
use tokio::process::Child;

use crate::health::Probe;
use crate::{artifact, docker, process, AgentError, Ctx};

/// A component's state across its runs.
pub(crate) enum Slot {
    Process { fetched: bool },
    Docker(docker::Slot),
}

/// One run of a component.
pub(crate) enum Running {
    Process {
        child: Child,
        pid: u32,
        /// Copies its output into its log; ends when the pipes close.
        capture: Option<tokio::task::JoinHandle<()>>,
    },
    Container(docker::Run),
}

/// Where a running component's drain signal goes: its main process, or its container's PID 1.
/// Held in the agent's shared state while the run lasts, so the leave path can signal every
/// component at once.
#[derive(Clone)]
pub(crate) enum DrainTarget {
    Pid(u32),
    Container(bollard::Docker, String),
}

impl DrainTarget {
    /// Send `signal` (a valid drain signal name, e.g. `SIGUSR1`).
    pub async fn signal(&self, signal: &str) -> Result<(), String> {
        match self {
            DrainTarget::Pid(pid) => {
                let n = drover_model::drain_signal_number(signal)
                    .ok_or_else(|| format!("{signal:?} is not a drain signal"))?;
                if *pid == 0 || *pid > i32::MAX as u32 {
                    return Err(format!("no process to signal (pid {pid})"));
                }
                // SAFETY: a plain syscall on the pid of a child this agent has not reaped yet
                // (the target is cleared in the same poll that reaps it), so it cannot be reused.
                if unsafe { libc::kill(*pid as libc::pid_t, n) } == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error().to_string())
                }
            }
            DrainTarget::Container(docker, id) => {
                let sig = if signal.starts_with("SIG") {
                    signal.to_string()
                } else {
                    format!("SIG{signal}")
                };
                docker::kill(docker, id, &sig).await
            }
        }
    }
}

/// What a running component did.
pub(crate) enum Event {
    /// It ended on its own (how, e.g. `exit status 1`, `signal 9`, `out of memory: ...`).
    Exited(String),
    /// Health reported by the runtime itself (an image's HEALTHCHECK).
    Healthy,
    Unhealthy(String),
}

impl Slot {
    pub fn new(comp: &PlanComponent) -> Slot {
        match comp.runtime {
            Runtime::Process => Slot::Process {
                fetched: comp.artifact.is_none(),
            },
            Runtime::Docker => Slot::Docker(docker::Slot::new()),
        }
    }

    /// Fetch the artifact or pull the image, once (a no-op when already done).
    pub async fn prepare(&mut self, ctx: &Ctx, idx: usize) -> Result<(), AgentError> {
        let comp = &ctx.plan.components[idx];
        match self {
            Slot::Process { fetched } => {
                let (false, Some(art)) = (*fetched, &comp.artifact) else {
                    return Ok(());
                };
                ctx.update(idx, |c| {
                    c.state = drover_model::api::ComponentState::Fetching
                });
                tracing::info!(component = %comp.name, url = %art.url, "fetching artifact");
                let dir = ctx.instance.component_dir(comp);
                let scratch = ctx.instance.dir.join(format!(".{}.download", comp.name));
                artifact::fetch_and_unpack(&ctx.client, art, &dir, &scratch).await?;
                *fetched = true;
                Ok(())
            }
            Slot::Docker(slot) => {
                let client = ctx.docker.client().await?;
                let image = comp
                    .docker
                    .as_ref()
                    .map(|d| d.reference().to_string())
                    .unwrap_or_default();
                docker::ensure_image(ctx, idx, slot, &client, &image).await
            }
        }
    }

    /// Start the component (or adopt its running container) and make its health probe.
    pub async fn start(
        &mut self,
        ctx: &Ctx,
        idx: usize,
    ) -> Result<(Running, Option<(Probe, HealthCheck)>), AgentError> {
        let comp = &ctx.plan.components[idx];
        match self {
            Slot::Process { .. } => {
                let launch = ctx.instance.launch(comp)?;
                let probe = ctx.instance.probe(comp)?;
                let spawn_error = |source| AgentError::Spawn {
                    component: comp.name.clone(),
                    command: launch.program.display().to_string(),
                    source,
                };
                let log = crate::logfile::LogFile::open(
                    &ctx.instance.log_file(comp),
                    drover_model::logs::rotation(comp.log.as_ref()),
                )
                .map_err(spawn_error)?;
                // Spawned from this task, i.e. on the runtime's thread (see process::spawn).
                let (child, capture) = process::spawn(&launch, log).map_err(spawn_error)?;
                let pid = child.id().unwrap_or(0);
                Ok((
                    Running::Process {
                        child,
                        pid,
                        capture: Some(capture),
                    },
                    probe,
                ))
            }
            Slot::Docker(slot) => {
                let client = ctx.docker.client().await?;
                let spec = docker::spec(&ctx.instance, &ctx.plan, comp)?;
                let run = docker::start(ctx, idx, slot, &client, &spec).await?;
                let probe = match &comp.health {
                    Some(check) if check.kind == HealthKind::Exec => {
                        let cmd = check
                            .command
                            .iter()
                            .map(|a| ctx.instance.render(comp, a))
                            .collect::<Result<Vec<_>, _>>()?;
                        let env = ctx
                            .instance
                            .env(comp)?
                            .into_iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect();
                        Some((
                            Probe::Container(docker::Exec {
                                docker: client,
                                container: run.id.clone(),
                                cmd,
                                env,
                            }),
                            check.clone(),
                        ))
                    }
                    _ => ctx.instance.probe(comp)?,
                };
                Ok((Running::Container(run), probe))
            }
        }
    }

    /// The agent is stopping: remove what the component leaves behind (its container).
    pub async fn cleanup(&mut self, ctx: &Ctx, idx: usize) {
        if let Slot::Docker(slot) = self {
            slot.remove(ctx, &ctx.plan.components[idx]).await;
        }
    }

    /// The container of a Docker component, once created.
    pub fn container_id(&self) -> Option<&str> {
        match self {
            Slot::Docker(s) => s.id.as_deref(),
            Slot::Process { .. } => None,
        }
    }
}

impl Running {
    /// The main process's pid (on the host), for reports and utilization.
    pub fn pid(&self) -> u32 {
        match self {
            Running::Process { pid, .. } => *pid,
            Running::Container(r) => r.pid,
        }
    }

    /// Where its drain signal goes.
    pub fn drain_target(&self) -> DrainTarget {
        match self {
            Running::Process { pid, .. } => DrainTarget::Pid(*pid),
            Running::Container(r) => {
                let (docker, id) = r.handle();
                DrainTarget::Container(docker, id)
            }
        }
    }

    /// Health comes from the runtime (an image HEALTHCHECK), not from a probe of drover's.
    pub fn runtime_health(&self) -> bool {
        matches!(self, Running::Container(r) if r.image_health)
    }

    /// The component was found running (a restarted agent adopting its container).
    pub fn adopted(&self) -> bool {
        matches!(self, Running::Container(r) if r.adopted)
    }

    /// What a container is called in logs.
    pub fn container(&self) -> Option<&str> {
        match self {
            Running::Container(r) => Some(&r.id[..r.id.len().min(12)]),
            Running::Process { .. } => None,
        }
    }

    /// The next event of this run.
    pub async fn next(&mut self) -> Event {
        match self {
            Running::Process {
                child,
                pid,
                capture,
            } => {
                let r = child.wait().await;
                // Whatever the leader left behind in its group goes with it.
                process::signal_group(*pid, libc::SIGKILL);
                finish_capture(capture).await;
                Event::Exited(match r {
                    Ok(st) => process::describe(&st),
                    Err(e) => format!("unknown ({e})"),
                })
            }
            Running::Container(r) => match r.next().await {
                docker::RunEvent::Exited(how) => Event::Exited(how),
                docker::RunEvent::Healthy => Event::Healthy,
                docker::RunEvent::Unhealthy(why) => Event::Unhealthy(why),
            },
        }
    }

    /// Stop gracefully: the stop signal, up to `grace`, then SIGKILL. Returns how it ended.
    pub async fn stop(&mut self, comp: &PlanComponent, grace: Duration) -> String {
        match self {
            Running::Process {
                child,
                pid,
                capture,
            } => {
                let signal =
                    drover_model::signal_number(&comp.stop_signal).unwrap_or(libc::SIGTERM);
                let how = match process::stop(child, *pid, signal, grace).await {
                    Ok(st) => process::describe(&st),
                    Err(e) => format!("unknown ({e})"),
                };
                finish_capture(capture).await;
                how
            }
            Running::Container(r) => r.stop(grace).await,
        }
    }
}

/// Wait (briefly) until a process's last lines are in its log: its pipes close when its group
/// is gone. A pipe kept open by something that escaped the group is let go after 1 s.
async fn finish_capture(capture: &mut Option<tokio::task::JoinHandle<()>>) {
    if let Some(mut task) = capture.take() {
        if tokio::time::timeout(Duration::from_secs(1), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}
