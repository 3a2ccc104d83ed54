//! The end-to-end tests' guard [`common::KillAgents`] leaves no process of its test behind,
//! even one no pid file names and that ignores SIGTERM (an agent launched just before its
//! server was SIGKILLed), nor what such an agent started.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{alive, KillAgents};

#[test]
fn kill_agents_stops_every_process_of_the_test_directory() {
    let dir = tempfile::tempdir().unwrap();
    let inst = dir.path().join("data.instances/i-000007");
    std::fs::create_dir_all(&inst).unwrap();
    // An "agent": named by its `--dir`, no pid file, SIGTERM ignored, a child in its group.
    let mut agent = Command::new("sh")
        .arg("-c")
        .arg("trap '' TERM; sleep 600 & echo $! > \"$2/child.pid\"; wait")
        .arg("drover-agent")
        .arg("--dir")
        .arg(&inst)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    // A process that works in the directory without naming it, in a group of its own.
    let mut stray = Command::new("sh")
        .arg("-c")
        .arg("trap '' TERM; echo $$ > stray.pid; exec sleep 600")
        .current_dir(&inst)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    // Each writes its file once it ignores SIGTERM.
    let read_pid = |name: &str| {
        let t0 = Instant::now();
        loop {
            if let Some(p) = std::fs::read_to_string(inst.join(name))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                return p;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "no {name}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let child = read_pid("child.pid");
    assert_eq!(read_pid("stray.pid"), stray.id() as i32);
    let pids = [agent.id() as i32, child, stray.id() as i32];
    // Should the guard fail, nothing is left behind by this test either.
    let _reap = Reap(pids.to_vec());
    for p in pids {
        assert!(alive(p), "{p} is not running");
    }
    assert!(!inst.join("agent.pid").exists());

    let t = Instant::now();
    drop(KillAgents(dir.path().to_path_buf()));
    let took = t.elapsed();
    for p in pids {
        assert!(!alive(p), "{p} outlived the guard");
    }
    assert!(took < Duration::from_secs(5), "{took:?}");
    let _ = agent.wait();
    let _ = stray.wait();
}

/// SIGKILLs these pids when dropped (after an assertion failed).
struct Reap(Vec<i32>);

impl Drop for Reap {
    fn drop(&mut self) {
        for &p in &self.0 {
            if alive(p) {
                // SAFETY: a plain syscall on a pid this test started.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
    }
}
