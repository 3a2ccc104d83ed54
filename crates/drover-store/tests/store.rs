//! What only the SQLite store has: schema migrations, errors naming the file. Everything
//! both stores do (round trips, atomicity, numbering, plan immutability, event filters,
//! durability across SIGKILL) is in `conformance.rs`.

use drover_model::{parse_fleet, Fleet};
use drover_store::{SqliteStore, Store, StoreError, Write};
use drover_test_support::fleets::DEMO as FLEET;

fn fleet() -> Fleet {
    parse_fleet(FLEET, "drover.toml").expect("test fleet is valid")
}

fn revision_write(summary: &str) -> Write {
    Write::Revision {
        file: "drover.toml".into(),
        summary: summary.into(),
        toml: FLEET.into(),
        fleet: fleet(),
        last_applied: None,
    }
}

/// The last applied file (the base of apply's three-way merge) is kept with its revision;
/// revisions stored by a schema without it (a store made before) read as `None`.
#[test]
fn the_last_applied_file_is_kept_and_older_stores_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.db");
    {
        // A store at schema 1, as an older drover wrote it.
        let conn = rusqlite::Connection::open(&path).unwrap();
        let first = include_str!("../src/sqlite.rs");
        let schema = first
            .split("r#\"")
            .nth(1)
            .and_then(|s| s.split("\"#").next())
            .unwrap();
        conn.execute_batch(schema).unwrap();
        conn.execute(
            "INSERT INTO revisions (number, applied_at_ms, file, summary, toml, fleet) VALUES (1, 5, 'drover.toml', 'old', ?1, ?2)",
            rusqlite::params![FLEET, serde_json::to_string(&fleet()).unwrap()],
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let old = store.revision(1).unwrap().unwrap();
    assert_eq!(old.last_applied, None);
    let last = drover_model::api::LastApplied {
        toml: FLEET.into(),
        set_by: [(
            "services.web.components.app.version".to_string(),
            "deploy web app v2 (revision 2)".to_string(),
        )]
        .into_iter()
        .collect(),
    };
    let mut w = revision_write("deploy");
    if let Write::Revision { last_applied, .. } = &mut w {
        *last_applied = Some(last.clone());
    }
    store.commit(vec![w], 10).unwrap();
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(
        store.revision(2).unwrap().unwrap().last_applied,
        Some(last.clone())
    );
    assert_eq!(
        store.snapshot().unwrap().revision.unwrap().last_applied,
        Some(last)
    );
}

#[test]
fn open_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-dir").join("drover.db");
    let err = SqliteStore::open(&path).err().expect("open must fail");
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = SqliteStore::open(&path).err().expect("open must fail");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
        "{err:?}"
    );
}

#[test]
fn one_off_schedules_survive_a_reopen_and_are_replaced_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let once = drover_model::api::ScheduledScale {
        id: 1,
        service: "web".into(),
        region: None,
        desired: 50,
        start_ms: 1_800_000_000_000,
        end_ms: 1_800_010_800_000,
        timezone: "Europe/London".into(),
        created_ms: 5,
        cancelled_ms: None,
    };
    {
        let store = SqliteStore::open(&path).unwrap();
        store
            .commit(
                vec![
                    Write::Schedule(once.clone()),
                    Write::Schedule(drover_model::api::ScheduledScale {
                        id: 2,
                        ..once.clone()
                    }),
                ],
                1,
            )
            .unwrap();
        store
            .commit(
                vec![Write::Schedule(drover_model::api::ScheduledScale {
                    id: 2,
                    cancelled_ms: Some(9),
                    ..once.clone()
                })],
                2,
            )
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let s = store.snapshot().unwrap().schedules;
    assert_eq!(s.len(), 2);
    assert_eq!(s[0], once);
    assert_eq!((s[1].id, s[1].cancelled_ms), (2, Some(9)));
}

/// Issue 20, item 1: reads have a connection of their own. While one large commit is being
/// written (the write connection held), events and revisions are read at once, and see the
/// last commit, not the one in progress.
#[test]
fn reads_do_not_wait_for_a_commit_in_progress() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("drover.db")).unwrap());
    store.commit(vec![revision_write("first")], 1).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, done) = (store.clone(), done.clone());
        std::thread::spawn(move || {
            // A commit that takes a long while: 100,000 events of 512 bytes.
            let big: Vec<Write> = (0..100_000)
                .map(|i| {
                    Write::Event(drover_model::NewEvent::new(
                        drover_model::EventKind::Healthy,
                        format!("{i} {}", "x".repeat(512)),
                    ))
                })
                .collect();
            store.commit(big, 2).unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut reads = 0;
    while !done.load(Ordering::SeqCst) && reads < 20 {
        assert_eq!(store.revisions().unwrap().len(), 1);
        let evs = store.events(&drover_store::EventFilter::default()).unwrap();
        assert!(evs.is_empty(), "a read saw a commit in progress");
        reads += 1;
    }
    let finished_first = done.load(Ordering::SeqCst);
    writer.join().unwrap();
    assert!(
        reads == 20 && !finished_first,
        "the reads waited for the commit ({reads} done before it ended)"
    );
    assert_eq!(
        store
            .events(&drover_store::EventFilter {
                limit: 10,
                ..Default::default()
            })
            .unwrap()
            .len(),
        10
    );
}
