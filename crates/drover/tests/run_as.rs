//! End to end, as root: a `local` region with `run_as = "nobody"` runs its instances' agents
//! and components as that user, in directories outside the data directory, so a component
//! cannot read what makes one fleet admin (the admin token, the store, plans with secrets).
//! Skipped, with the reason printed, when not run as root (unless DROVER_CI=1).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::*;

fn fleet(block: u8, data: &std::path::Path, run_as: &str) -> String {
    let d = data.display();
    format!(
        r#"
[fleet]
name = "runas"

[regions.local]
provider = "local"
subnet = "127.{block}.0.0/16"
{run_as}

[services.probe]
regions = ["local"]
capacity = {{ min = 1, desired = 1, max = 1 }}

[services.probe.components.p]
runtime = "process"
version = "v1"
command = "sh"
args = ["-c", 'for f in {d}/admin.token {d}/drover.db {d}/plans/planted.json {d}/server.url; do if cat "$f" > /dev/null 2>&1; then echo "read $f"; else echo "refused $f"; fi; done > probe.tmp; id -u >> probe.tmp; mv probe.tmp probe.out; exec sleep 600']
"#
    )
}

/// Whether to run: as root; otherwise skipped with the reason (an error under DROVER_CI=1).
fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("DROVER_CI").as_deref() != Ok("1"),
            "run_as needs root, and DROVER_CI=1 says not to skip"
        );
        eprintln!("skipped: run_as needs the server to run as root (this test runs as uid != 0)");
        return false;
    }
    true
}

/// Run the probe fleet in `dir` (with `run_as_line` in its region) until the probe has
/// written what it could read: (its instance directory, the probe's output).
fn probe(dir: &std::path::Path, run_as_line: &str) -> (Up, KillAgents, std::path::PathBuf, String) {
    let data = dir.join("data");
    let (api, ing) = (free_port(), free_port());
    let up = Up::start(dir, &fleet(subnet(), &data, run_as_line), api, ing);
    let kill = KillAgents(dir.to_path_buf());
    let instances = dir.join("data.instances");
    let t0 = Instant::now();
    loop {
        let found = std::fs::read_dir(&instances).ok().and_then(|d| {
            d.flatten().find_map(|e| {
                let p = e.path().join("p/probe.out");
                let q = e.path().join("probe.out");
                std::fs::read_to_string(&p)
                    .or_else(|_| std::fs::read_to_string(&q))
                    .ok()
                    .map(|t| (e.path(), t))
            })
        });
        if let Some((idir, out)) = found {
            eprintln!("{out}");
            return (up, kill, idir, out);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no probe output; up.err: {}",
            std::fs::read_to_string(dir.join("up.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What `run_as` is for: without it a component runs as the server's user (root here), and
/// reads the data directory by its path (docs/security.md says so).
#[test]
fn without_run_as_a_component_reads_the_data_directory() {
    if !as_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_up, _kill, _idir, out) = probe(dir.path(), "");
    let d = dir.path().join("data");
    assert!(
        out.contains(&format!("read {}/admin.token", d.display())),
        "{out}"
    );
    assert_eq!(out.lines().last(), Some("0"), "{out}");
}

#[test]
fn a_component_run_as_nobody_cannot_read_the_data_directory() {
    if !as_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // nobody must reach its instance directory (DIR/data.instances/ID) through DIR.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let data = dir.path().join("data");
    // What an older drover kept there: every group's plan, secrets and all.
    std::fs::create_dir_all(data.join("plans")).unwrap();
    std::fs::write(data.join("plans/planted.json"), "{\"secret\": 1}").unwrap();
    let (_up, _kill, idir, out) = probe(dir.path(), "run_as = \"nobody\"");
    let instances = dir.path().join("data.instances");
    let d = data.display();
    for f in [
        "admin.token",
        "drover.db",
        "plans/planted.json",
        "server.url",
    ] {
        assert!(
            out.contains(&format!("refused {d}/{f}")),
            "{f} must be refused: {out}"
        );
    }
    assert_eq!(out.lines().last(), Some("65534"), "runs as nobody: {out}");
    assert!(
        data.join("admin.token").exists(),
        "the files the probe tried exist"
    );

    // The instance directory is outside the data directory, nobody's, 0700; the root 0711.
    let meta = std::fs::metadata(&idir).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o700));
    assert_eq!(std::fs::metadata(&instances).unwrap().mode() & 0o777, 0o711);
    // Its plan is its own copy (0600, nobody's); the server wrote no plan into DATA/plans.
    let plan = std::fs::metadata(idir.join("plan.json")).unwrap();
    assert_eq!((plan.uid(), plan.mode() & 0o777), (65534, 0o600));
    let plans: Vec<_> = std::fs::read_dir(data.join("plans"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(plans, ["planted.json"]);
    // The token file was read and deleted.
    assert!(!idir.join("agent.token").exists());
    // The agent itself runs as nobody too.
    let pid = std::fs::read_to_string(idir.join("agent.pid")).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid}"
    );
}
