//! Reading other processes from `/proc`: CPU time, memory, command lines.

use std::path::Path;

/// Clock ticks per second (`utime`/`stime` unit).
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Fields after the `(comm)` of `/proc/PID/stat`, starting with the state.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(String::from).collect())
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    // Field 14 (utime) and 15 (stime) of proc(5); f[0] is field 3 (state).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// (VmRSS, VmHWM) in KiB.
pub fn mem_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let get = |key: &str| -> Option<u64> {
        s.lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((get("VmRSS:")?, get("VmHWM:").unwrap_or(0)))
}

/// Number of threads and open file descriptors.
pub fn threads_fds(pid: u32) -> (u64, u64) {
    let threads = stat_fields(pid)
        .and_then(|f| f.get(17).and_then(|x| x.parse().ok()))
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    (threads, fds)
}

/// Whether a process exists and is not a zombie.
pub fn running(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z"))
}

/// The command line, NULs as spaces.
pub fn cmdline(pid: u32) -> String {
    let b = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&b).replace('\0', " ")
}

/// Read `DIR/agent.pid` and return the pid if that process still runs for `DIR` (a holder we
/// started, or a `drover agent` the server started there). Guards against pid reuse.
pub fn instance_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("agent.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmd = cmdline(pid);
    (pid > 1 && cmd.contains(" agent ") && cmd.contains(&dir.display().to_string()) && running(pid))
        .then_some(pid)
}

/// SIGKILL a process group and its leader (every holder and agent leads its own group).
pub fn kill_group(pid: u32, sig: i32) {
    if pid > 1 {
        // SAFETY: plain syscalls on a pid checked by `instance_pid`.
        unsafe {
            libc::kill(-(pid as i32), sig);
            libc::kill(pid as i32, sig);
        }
    }
}

/// Raise the soft limit of open files to the hard limit; returns (soft, hard) after.
pub fn raise_nofile() -> (u64, u64) {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
        (r.rlim_cur as u64, r.rlim_max as u64)
    }
}
