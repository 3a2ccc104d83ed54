//! The server's own balancer process (`drover lb`): adopted from its pid file when one runs,
//! else started; started again at once when it dies; left running when the server stops or
//! dies, so the data plane outlives the control plane. Under `drover up` it is tied to the
//! server (parent-death signal) and stopped with it.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_model::{EventKind, NewEvent};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use crate::Engine;

/// How to start the balancer.
#[derive(Clone, Debug)]
pub struct LbSpawn {
    pub drover_bin: PathBuf,
    /// Its directory (`DATA/lb`): pid file, state, handover socket, log.
    pub dir: PathBuf,
    pub server_url: String,
    pub token_file: PathBuf,
    pub ca_file: Option<PathBuf>,
    /// Dies with the server and is stopped with it (`drover up`).
    pub tied: bool,
}

/// A balancer that lived at least this long is restarted at once when it dies; one that
/// dies sooner is restarted after a backoff that doubles up to [`MAX_BACKOFF`].
const STEADY: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a tied balancer gets to stop (its connections end with the instances anyway).
const TIED_STOP: Duration = Duration::from_secs(5);

enum Running {
    Child(tokio::process::Child),
    Adopted(u32),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Child(c) => c.id().unwrap_or_default(),
            Running::Adopted(p) => *p,
        }
    }

    /// Resolves when the process has ended, with how it ended.
    async fn wait(&mut self) -> String {
        match self {
            Running::Child(c) => match c.wait().await {
                Ok(s) => describe(s),
                Err(e) => format!("cannot wait for it: {e}"),
            },
            Running::Adopted(pid) => {
                match pidfd(*pid) {
                    Ok(fd) => {
                        // A pidfd turns readable when its process ends.
                        // SAFETY: the AsyncFd owns the fd, which stays open while registered.
                        if let Ok(afd) = unsafe { AsyncFd::register(fd) } {
                            let _ = afd.readable().await;
                        }
                    }
                    Err(_) => {
                        while process_running(*pid) {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                "exited".to_string()
            }
        }
    }
}

fn describe(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "exited".to_string(),
    }
}

fn pidfd(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall; a valid fd it returns is ours to own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie has ended.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The pid in `DIR/lb.pid` when it runs `drover lb` for `dir`.
pub fn running_lb(dir: &Path) -> Option<u32> {
    running_lb_args(dir).map(|(pid, _)| pid)
}

/// [`running_lb`] with its arguments.
fn running_lb_args(dir: &Path) -> Option<(u32, Vec<String>)> {
    let pid: u32 = std::fs::read_to_string(dir.join("lb.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let is_lb = args.iter().any(|a| a == "lb");
    let for_dir = args.iter().any(|a| Path::new(a) == dir);
    (is_lb && for_dir && process_running(pid)).then_some((pid, args))
}

/// Kill a balancer that an earlier `drover up` left (it was tied to a server that is gone).
pub fn reap_leftover(dir: &Path) -> bool {
    match running_lb(dir) {
        Some(pid) => {
            // SAFETY: a plain syscall on a pid checked to run our balancer.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            true
        }
        None => false,
    }
}

fn start(spawn: &LbSpawn) -> std::io::Result<tokio::process::Child> {
    std::fs::create_dir_all(&spawn.dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(spawn.dir.join("lb.log"))?;
    let mut cmd = tokio::process::Command::new(&spawn.drover_bin);
    cmd.arg("lb")
        .arg("--servers")
        .arg(&spawn.server_url)
        .arg("--token-file")
        .arg(&spawn.token_file)
        .arg("--dir")
        .arg(&spawn.dir);
    if let Some(ca) = &spawn.ca_file {
        cmd.arg("--ca").arg(ca);
    }
    if spawn.tied {
        cmd.args(["--drain-timeout", "5s"]);
    }
    cmd.env_remove("DROVER_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        // Its own process group: a Ctrl-C meant for the server does not reach it.
        .process_group(0)
        .kill_on_drop(false);
    if spawn.tied {
        // SAFETY: only an async-signal-safe syscall between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.spawn()
}

/// Keep one balancer running until `stop`; then stop it if it is tied to the server.
pub async fn supervise(engine: Arc<Engine>, spawn: LbSpawn, stop: CancellationToken) {
    let mut backoff = FIRST_BACKOFF;
    let mut running: Option<(Running, Instant)> = None;
    loop {
        if running.is_none() {
            let found = running_lb_args(&spawn.dir);
            // One that follows another URL (the server moved) is replaced: the new one takes
            // its listeners over, and the old one leaves.
            // `server_url` may list every server of the control plane (comma separated).
            let ours: Vec<&str> = spawn.server_url.split(',').collect();
            let follows_us = found.as_ref().is_some_and(|(_, args)| {
                args.iter().any(|a| a.split(',').any(|u| ours.contains(&u)))
            });
            if let (Some((pid, _)), false) = (&found, follows_us) {
                engine.record(vec![NewEvent::new(
                    EventKind::Balancer,
                    format!(
                        "the running balancer (pid {pid}) follows another server URL; starting one for {} (it takes the listeners over)",
                        spawn.server_url
                    ),
                )]);
            }
            if let (Some((pid, _)), true) = (found, follows_us) {
                engine.record(vec![NewEvent::new(
                    EventKind::Balancer,
                    format!("adopted the running balancer (pid {pid})"),
                )]);
                running = Some((Running::Adopted(pid), Instant::now()));
            } else {
                match start(&spawn) {
                    Ok(child) => {
                        let pid = child.id().unwrap_or_default();
                        engine.record(vec![NewEvent::new(
                            EventKind::Balancer,
                            format!(
                                "started the balancer (pid {pid}; log {})",
                                spawn.dir.join("lb.log").display()
                            ),
                        )]);
                        running = Some((Running::Child(child), Instant::now()));
                    }
                    Err(e) => {
                        engine.record(vec![NewEvent::new(
                            EventKind::Balancer,
                            format!(
                                "cannot start the balancer ({} lb): {e}; trying again in {}",
                                spawn.drover_bin.display(),
                                drover_model::Dur(backoff)
                            ),
                        )]);
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
        }
        let Some((proc, since)) = running.as_mut() else {
            continue;
        };
        let pid = proc.pid();
        let how = tokio::select! {
            _ = stop.cancelled() => {
                if spawn.tied {
                    stop_tied(proc).await;
                }
                return;
            }
            how = proc.wait() => how,
        };
        let lived = since.elapsed();
        running = None;
        // A successor that took the listeners over wrote its own pid: adopt it.
        if let Some(next) = running_lb(&spawn.dir).filter(|p| *p != pid) {
            engine.record(vec![NewEvent::new(
                EventKind::Balancer,
                format!("the balancer (pid {pid}) handed its listeners to pid {next} and {how}"),
            )]);
            continue;
        }
        let wait = if lived >= STEADY {
            backoff = FIRST_BACKOFF;
            Duration::ZERO
        } else {
            let w = backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            w
        };
        engine.record(vec![NewEvent::new(
            EventKind::Balancer,
            format!(
                "the balancer (pid {pid}) {how} after {}; starting it again{}",
                drover_model::Dur(Duration::from_millis(lived.as_millis() as u64)),
                if wait.is_zero() {
                    String::new()
                } else {
                    format!(" in {}", drover_model::Dur(wait))
                }
            ),
        )]);
        if !wait.is_zero() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// SIGTERM, then SIGKILL after [`TIED_STOP`].
async fn stop_tied(proc: &mut Running) {
    let pid = proc.pid() as i32;
    if pid <= 1 {
        return;
    }
    // SAFETY: plain syscalls on the pid of our own balancer.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if tokio::time::timeout(TIED_STOP + Duration::from_secs(1), proc.wait())
        .await
        .is_err()
    {
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = proc.wait().await;
    }
}
