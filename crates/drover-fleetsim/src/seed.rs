//! Seeding a stopped server's store with instances that the server will adopt on start.
//!
//! With the current code the server knows an instance only if it launched it, and the only
//! provider (`local`) launches a real `drover agent` per instance. To reach 10,000 known
//! instances without 10,000 agents, we write the instance records into the store while the
//! server is stopped, and for each one start a *holder*: a tiny process
//! (`drover-fleetsim hold agent DATA/instances/ID`, which only sleeps) whose pid goes in
//! `DATA/instances/ID/agent.pid`. On start the server's `local` provider adopts each instance
//! whose pid file names a live process whose command line contains ` agent ` and the instance
//! directory (`LocalProvider::adopt`). The simulated agents then heartbeat for those ids.
//! Terminating an instance (server side) kills its holder; a crashing or leaving simulated
//! agent kills its own holder, so the server sees the instance end, as with a real agent.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use drover_model::{EventKind, NewEvent};
use drover_store::{InstanceRecord, Lifecycle, SqliteStore, Store, Write};

pub fn seed(data_dir: &Path, per_group: u32, pids_out: Option<&Path>) -> anyhow::Result<()> {
    let data_dir = std::fs::canonicalize(data_dir)
        .with_context(|| format!("data directory {}", data_dir.display()))?;
    let store = SqliteStore::open(&data_dir.join("drover.db")).context("open the store")?;
    let snap = store.snapshot().context("read the store")?;
    let Some(rev) = snap.revision.as_ref() else {
        bail!(
            "no fleet applied in {}: apply the fleet file first (with desired 0)",
            data_dir.display()
        );
    };
    if !snap.instances.is_empty() {
        bail!(
            "the store already holds {} instances; seed a fresh data directory",
            snap.instances.len()
        );
    }
    let exe = std::env::current_exe().context("own executable")?;
    let mut seq = snap.counters.get("instance_seq").copied().unwrap_or(0);
    let now = crate::stats::epoch_ms();
    let mut writes = Vec::new();
    let mut pids = Vec::new();
    let started = std::time::Instant::now();
    for mut g in snap.groups.clone() {
        let region = g.group.split('/').nth(1).unwrap_or_default().to_string();
        let block = rev
            .fleet
            .regions
            .get(&region)
            .and_then(|r| r.subnet.as_deref())
            .and_then(drover_model::ids::parse_loopback_subnet)
            .unwrap_or(1);
        let seqs: Vec<u64> = (seq + 1..=seq + per_group as u64).collect();
        seq += per_group as u64;
        // Start the holders from a few threads: fork+exec is most of the seeding time.
        let started: Vec<anyhow::Result<(u64, u32)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = seqs
                .chunks(seqs.len().div_ceil(4).max(1))
                .map(|chunk| {
                    let (exe, data_dir) = (&exe, &data_dir);
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .map(|&n| {
                                let id = drover_model::ids::instance_id(n);
                                let dir: PathBuf = data_dir.join("instances").join(&id);
                                std::fs::create_dir_all(&dir)
                                    .with_context(|| format!("create {}", dir.display()))?;
                                let pid = spawn_holder(exe, &dir)?;
                                std::fs::write(dir.join("agent.pid"), pid.to_string())?;
                                Ok((n, pid))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for r in started {
            let (n, pid) = r?;
            pids.push(pid);
            writes.push(Write::Instance(InstanceRecord {
                id: drover_model::ids::instance_id(n),
                group: g.group.clone(),
                generation: g.generation,
                addr: drover_model::ids::loopback_addr(block, n).to_string(),
                provider_id: format!("pid:{pid}"),
                launched_at_ms: now,
                lifecycle: Lifecycle::Active,
                permit_at_ms: None,
            }));
        }
        g.desired = per_group;
        g.desired_reason = "seeded by drover-fleetsim".into();
        writes.push(Write::Group(g));
    }
    let n = pids.len();
    writes.push(Write::Counter {
        name: "instance_seq".into(),
        value: seq,
    });
    writes.push(Write::Event(NewEvent::new(
        EventKind::Server,
        format!("drover-fleetsim seeded {n} instances (holder processes, adopted on start)"),
    )));
    store
        .commit(writes.clone(), now)
        .context("commit the seeded instances")?;
    // The instances as the simulated agents need them (`run --instances-file`), so the
    // agents can start before the server does.
    let comps: std::collections::BTreeMap<String, Vec<(String, String)>> = snap
        .plans
        .iter()
        .map(|p| {
            (
                p.group().0,
                p.components
                    .iter()
                    .map(|c| (c.name.clone(), c.version.clone()))
                    .collect(),
            )
        })
        .collect();
    let list: Vec<serde_json::Value> = writes
        .iter()
        .filter_map(|w| match w {
            Write::Instance(r) => Some(serde_json::json!({
                "id": r.id, "group": r.group, "generation": r.generation, "addr": r.addr,
                "components": comps.get(&r.group).cloned().unwrap_or_default(),
            })),
            _ => None,
        })
        .collect();
    std::fs::write(
        data_dir.join("fleetsim-instances.json"),
        serde_json::to_vec(&list)?,
    )?;
    if let Some(p) = pids_out {
        let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
        std::fs::write(p, text)?;
    }
    eprintln!(
        "seeded {n} instances in {} groups in {:.1} s (holders started)",
        snap.groups.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn spawn_holder(exe: &Path, dir: &Path) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt;
    let child = Command::new(exe)
        .arg("hold")
        .arg("agent")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("start a holder process")?;
    Ok(child.id())
}

/// Kill every process named by `DATA/instances/*/agent.pid` that still runs for that
/// directory: holders, and `drover agent`s the server launched (their components die with
/// them by parent-death signal). Returns how many were killed.
pub fn reap(data_dir: &Path) -> anyhow::Result<usize> {
    let data_dir = std::fs::canonicalize(data_dir)?;
    let Ok(entries) = std::fs::read_dir(data_dir.join("instances")) else {
        return Ok(0);
    };
    let mut n = 0;
    for e in entries.flatten() {
        if let Some(pid) = crate::procfs::instance_pid(&e.path()) {
            crate::procfs::kill_group(pid, libc::SIGKILL);
            n += 1;
        }
    }
    // Holders whose pid file is gone (the server's provider removes it when it believes the
    // instance ended, or was killed between spawn and write): every process of ours runs as
    // `... hold agent DATA/instances/ID`, so find them by that exact marker.
    let marker = format!(" hold agent {}/", data_dir.join("instances").display());
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if crate::procfs::cmdline(pid).contains(&marker) && crate::procfs::running(pid) {
                crate::procfs::kill_group(pid, libc::SIGKILL);
                n += 1;
            }
        }
    }
    Ok(n)
}
