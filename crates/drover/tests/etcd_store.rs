//! End to end on a real 3-member etcd cluster on loopback: `drover server --store etcd://...`
//! runs the example fleet, is SIGKILLed and restarted on the same etcd and finds the same
//! revision and instances; `drover store copy` moves a SQLite store over with the same
//! revisions, events, tokens and secrets, and a server started on the copy carries on.
#![cfg(feature = "etcd")]

mod common;

use std::collections::BTreeSet;
use std::process::Child;
use std::time::Duration;

use common::*;
use drover_store::local_etcd::{etcd_or_skip, LocalEtcd};
use drover_store::{EtcdStore, SqliteStore, Store};

/// SIGKILLs the server when the test ends, however it ends.
struct KillServer(Child);

impl KillServer {
    fn kill(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

impl Drop for KillServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn instance_ids(up: &Up) -> BTreeSet<String> {
    up.status()
        .unwrap()
        .groups
        .iter()
        .flat_map(|g| &g.instances)
        .map(|i| i.id.clone())
        .collect()
}

fn server_log(dir: &std::path::Path, api: u16) -> String {
    std::fs::read_to_string(dir.join(format!("server-{api}.err"))).unwrap_or_default()
}

#[test]
fn a_server_on_etcd_finds_its_fleet_again_after_a_sigkill() {
    let Some(bin) = etcd_or_skip("a_server_on_etcd_finds_its_fleet_again_after_a_sigkill") else {
        return;
    };
    let cluster = LocalEtcd::start(&bin, 3).unwrap();
    let url = cluster.url("/drover/e2e");
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    std::fs::write(dir.path().join("drover.toml"), fleet_text(ing, subnet(), 2)).unwrap();
    let _agents = KillAgents(dir.path().to_path_buf());
    let mut server = KillServer(start_server_with(dir.path(), api, &["--store", &url]));
    let up = Up::for_server(dir.path(), api, ing);
    up.apply_when_up(Duration::from_secs(30));
    up.wait_healthy(2, Duration::from_secs(60));
    let before_ids = instance_ids(&up);
    let before_rev = up.status().unwrap().revision;
    assert_eq!(before_rev, Some(1));
    assert!(
        !dir.path().join("data/drover.db").exists(),
        "the state is in etcd, not in a SQLite file"
    );
    // What the server wrote is in etcd.
    let store = EtcdStore::open(&cluster.config("/drover/e2e")).unwrap();
    let snap = store.snapshot().unwrap();
    assert_eq!(snap.revision.as_ref().map(|r| r.number), Some(1));
    let stored: BTreeSet<String> = snap.instances.iter().map(|i| i.id.clone()).collect();
    assert_eq!(stored, before_ids);
    assert!(snap.last_event_seq > 0);

    server.kill();
    let mut server = KillServer(start_server_with(dir.path(), api, &["--store", &url]));
    up.wait_healthy(2, Duration::from_secs(60));
    let after = up.status().unwrap();
    assert_eq!(
        after.revision,
        before_rev,
        "{}",
        server_log(dir.path(), api)
    );
    assert_eq!(
        instance_ids(&up),
        before_ids,
        "the same instances, adopted, none replaced"
    );
    let (code, out, err) = up.cli(&["history"]);
    assert_eq!(code, 0, "{out}{err}");
    // A change after the restart commits to etcd too.
    let (code, out, err) = up.cli(&["scale", "web", "3"]);
    assert_eq!(code, 0, "{out}{err}");
    up.wait_healthy(3, Duration::from_secs(60));
    let snap = store.snapshot().unwrap();
    assert_eq!(snap.groups[0].desired, 3);
    server.kill();
}

#[test]
fn store_copy_moves_a_sqlite_fleet_to_etcd_and_a_server_carries_on_there() {
    let Some(bin) = etcd_or_skip("store_copy_moves_a_sqlite_fleet_to_etcd") else {
        return;
    };
    let cluster = LocalEtcd::start(&bin, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    std::fs::write(dir.path().join("drover.toml"), fleet_text(ing, subnet(), 2)).unwrap();
    let _agents = KillAgents(dir.path().to_path_buf());
    // A running example on SQLite, with a deploy (a second revision) and a token.
    let mut server = KillServer(start_server(dir.path(), api));
    let up = Up::for_server(dir.path(), api, ing);
    up.apply_when_up(Duration::from_secs(30));
    up.wait_healthy(2, Duration::from_secs(60));
    let (code, out, err) = up.cli(&["token", "create", "--scope", "read", "--name", "ci"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2"]);
    assert_eq!(code, 0, "{out}{err}");
    std::thread::sleep(Duration::from_secs(2));
    server.kill();
    let ids = {
        let sqlite = SqliteStore::open(&dir.path().join("data/drover.db")).unwrap();
        sqlite.snapshot().unwrap().instances.len()
    };
    assert!(ids >= 2);

    let db = format!("sqlite:{}", dir.path().join("data/drover.db").display());
    let url = cluster.url("/drover/moved");
    let copy = |extra: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(["store", "copy", "--from", &db, "--to", &url])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = copy(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("verified"), "{out}");
    eprintln!("{out}");
    // Not twice into the same place, unless --force.
    let (code, out, err) = copy(&[]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    let (code, out, err) = copy(&["--force"]);
    assert_eq!(code, 0, "{out}{err}");

    // The same revisions, events and tokens, read through both stores.
    let sqlite = SqliteStore::open(&dir.path().join("data/drover.db")).unwrap();
    let etcd = EtcdStore::open(&cluster.config("/drover/moved")).unwrap();
    assert_eq!(sqlite.revisions().unwrap(), etcd.revisions().unwrap());
    assert!(etcd.revisions().unwrap().len() >= 2);
    let all = drover_store::EventFilter::default();
    assert_eq!(sqlite.events(&all).unwrap(), etcd.events(&all).unwrap());
    assert_eq!(sqlite.tokens().unwrap(), etcd.tokens().unwrap());
    assert!(etcd.tokens().unwrap().iter().any(|t| t.info.name == "ci"));
    // The agent-token key moves with the store (no server's disk holds it): the instances'
    // tokens stay valid on etcd.
    assert_eq!(sqlite.secrets().unwrap(), etcd.secrets().unwrap());
    assert!(etcd
        .secrets()
        .unwrap()
        .iter()
        .any(|(name, v)| name == "agent-token-key" && v.len() == 32));
    assert!(!dir.path().join("data/agent-token.key").exists());
    let last_seq = sqlite.snapshot().unwrap().last_event_seq;
    drop(sqlite);

    // A start on etcd: the same revision and instances, and numbering goes on.
    std::fs::rename(
        dir.path().join("data/drover.db"),
        dir.path().join("data/drover.db.moved"),
    )
    .unwrap();
    let _ = std::fs::remove_file(dir.path().join("data/drover.db-wal"));
    let _ = std::fs::remove_file(dir.path().join("data/drover.db-shm"));
    let mut server = KillServer(start_server_with(dir.path(), api, &["--store", &url]));
    up.wait_healthy(2, Duration::from_secs(60));
    let status = up.status().unwrap();
    assert_eq!(
        status.revision,
        Some(etcd.revisions().unwrap().len() as u64),
        "{}",
        server_log(dir.path(), api)
    );
    let (code, out, err) = up.cli(&["events", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let events: Vec<drover_model::Event> = serde_json::from_str(&out).unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(seqs.len() as u64 >= last_seq);
    server.kill();
}
