//! Component processes: spawn (own process group, killed if the agent dies), signal, stop, describe.

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

/// Everything needed to start one component process, placeholders already rendered.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Added to the agent's own environment.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
}

/// Start `launch` in its own process group, with stdout and stderr copied line by line into
/// `log` (timestamped, rotated) by the returned task, which ends once both pipes are closed.
///
/// The child gets `PR_SET_PDEATHSIG = SIGKILL`: it dies with the thread that spawned it, so
/// call this from the runtime's thread (a task), never from `spawn_blocking`.
pub(crate) fn spawn(
    launch: &Launch,
    log: crate::logfile::LogFile,
) -> io::Result<(Child, tokio::task::JoinHandle<()>)> {
    let mut cmd = Command::new(&launch.program);
    cmd.args(&launch.args)
        .envs(
            launch
                .env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
        .current_dir(&launch.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    die_with_agent(&mut cmd);
    let mut child = cmd.spawn()?;
    let capture = tokio::spawn(crate::logfile::capture(
        child.stdout.take(),
        child.stderr.take(),
        log,
    ));
    Ok((child, capture))
}

/// Arrange for the child to get SIGKILL when the spawning thread dies.
pub(crate) fn die_with_agent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The agent died between fork and prctl: do not outlive it.
            if libc::getppid() != parent {
                return Err(io::Error::other(
                    "the agent exited while starting this process",
                ));
            }
            Ok(())
        });
    }
}

/// Send `signal` to the process group `pgid`. Returns false when the group is gone.
pub(crate) fn signal_group(pgid: u32, signal: i32) -> bool {
    if pgid == 0 || pgid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: plain syscall on a process group id we created.
    unsafe { libc::kill(-(pgid as libc::pid_t), signal) == 0 }
}

/// Stop a running component: `signal` to its group, up to `grace` for it to exit, then SIGKILL
/// to the group. Always reaps the leader, and kills whatever else is left in its group.
pub(crate) async fn stop(
    child: &mut Child,
    pgid: u32,
    signal: i32,
    grace: Duration,
) -> io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        signal_group(pgid, libc::SIGKILL);
        return Ok(status);
    }
    signal_group(pgid, signal);
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status?,
        Err(_) => {
            tracing::warn!(
                pgid,
                grace_ms = grace.as_millis() as u64,
                "still running after the grace period; sending SIGKILL"
            );
            signal_group(pgid, libc::SIGKILL);
            child.wait().await?
        }
    };
    // Members of the group that outlived the leader (e.g. children of a shell).
    signal_group(pgid, libc::SIGKILL);
    Ok(status)
}

/// `exit status 1`, `signal 9`: how a process ended, for reports.
pub(crate) fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        (None, None) => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn describes_exits_and_signals() {
        let s = Command::new("/bin/sh")
            .args(["-c", "exit 3"])
            .status()
            .await
            .unwrap();
        assert_eq!(describe(&s), "exit status 3");
        let s = Command::new("/bin/sh")
            .args(["-c", "kill -9 $$"])
            .status()
            .await
            .unwrap();
        assert_eq!(describe(&s), "signal 9");
    }

    #[tokio::test]
    async fn stop_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild");
        let launch = Launch {
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                format!(
                    "trap '' TERM; sleep 30 & echo $! > {}; wait",
                    pidfile.display()
                ),
            ],
            env: vec![],
            cwd: dir.path().into(),
        };
        let log = crate::logfile::LogFile::open(&dir.path().join("log"), (1 << 20, 2)).unwrap();
        let (mut child, _capture) = spawn(&launch, log).unwrap();
        let pgid = child.id().unwrap();
        let grandchild = loop {
            if let Ok(s) = std::fs::read_to_string(&pidfile) {
                if let Ok(p) = s.trim().parse::<i32>() {
                    break p;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let status = stop(&mut child, pgid, libc::SIGTERM, Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(describe(&status), "signal 9");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The grandchild got the group's SIGTERM (sleep does not ignore it) or SIGKILL.
        // It is a child of the shell, now reparented; it must be gone or a zombie.
        let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || stat.contains(") Z"), "{stat}");
    }
}
