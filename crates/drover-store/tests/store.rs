//! Behaviour of the SQLite store: round trips, atomicity, plan immutability, event filters,
//! reopen and crash durability.

use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};

use drover_model::{parse_fleet, EventKind, Fleet, NewEvent, Plan};
use drover_store::{
    EventFilter, GroupRecord, InstanceRecord, Lifecycle, SqliteStore, Store, StoreError, Write,
};

const FLEET: &str = r#"
[fleet]
name = "demo"

[regions.local]
provider = "local"

[services.web]
regions = ["local"]
capacity = { min = 1, desired = 2, max = 4 }
ingress = { listen = "127.0.0.1:8080", port = "http" }

[services.web.components.app]
runtime = "process"
version = "v1"
command = "./app-{version}"
args = ["--port", "${port.http}"]
env = { MODE = "prod" }
ports = { http = 9000 }
health = { type = "http", port = "http", path = "/health" }
"#;

fn fleet() -> Fleet {
    parse_fleet(FLEET, "drover.toml").expect("test fleet is valid")
}

fn plan(version: &str, generation: u64) -> Plan {
    let fleet = fleet();
    let svc = &fleet.services["web"];
    let mut p = drover_model::plan::plan_for(&fleet, "web", svc, "local");
    p.components[0].version = version.to_string();
    p.generation = generation;
    p.revision = 1;
    p
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

fn group(generation: u64) -> GroupRecord {
    GroupRecord {
        group: "web/local".into(),
        desired: 2,
        desired_reason: "apply".into(),
        generation,
        rollout: drover_store::RolloutRecord {
            since_ms: 1000 + generation,
            open: generation > 1,
            good_generation: generation.saturating_sub(1),
            reverted_from: 0,
            failed_generation: 0,
            failure: None,
        },
    }
}

fn instance(id: &str, lifecycle: Lifecycle, permit_at_ms: Option<u64>) -> InstanceRecord {
    InstanceRecord {
        id: id.into(),
        group: "web/local".into(),
        generation: 1,
        addr: "127.0.0.1:40001".into(),
        provider_id: "pid:4242".into(),
        launched_at_ms: 1_000,
        lifecycle,
        permit_at_ms,
    }
}

/// Fills a store with one of everything.
fn populate(store: &dyn Store) {
    let c = store
        .commit(
            vec![
                revision_write("first"),
                Write::Group(group(1)),
                Write::Plan(plan("v1", 1)),
                Write::Instance(instance("i-000001", Lifecycle::Active, None)),
                Write::Instance(instance("i-000002", Lifecycle::Draining, Some(5_000))),
                Write::Counter {
                    name: "next_instance".into(),
                    value: 3,
                },
                Write::Event(NewEvent::new(EventKind::Applied, "revision 1")),
            ],
            100,
        )
        .unwrap();
    assert_eq!(c.revision, Some(1));
    assert_eq!(c.events.len(), 1);
    assert_eq!((c.events[0].seq, c.events[0].at_ms), (1, 100));
}

#[test]
fn every_record_round_trips_through_snapshot() {
    let store = SqliteStore::open_in_memory().unwrap();
    let empty = store.snapshot().unwrap();
    assert_eq!(empty.revision, None);
    assert_eq!(empty.last_event_seq, 0);
    assert!(empty.groups.is_empty() && empty.plans.is_empty() && empty.instances.is_empty());

    populate(&store);
    let s = store.snapshot().unwrap();
    let rev = s.revision.unwrap();
    assert_eq!(
        (
            rev.number,
            rev.applied_at_ms,
            rev.file.as_str(),
            rev.summary.as_str()
        ),
        (1, 100, "drover.toml", "first")
    );
    assert_eq!(rev.toml, FLEET);
    assert_eq!(rev.fleet, fleet());
    assert_eq!(s.groups, vec![group(1)]);
    assert_eq!(s.plans, vec![plan("v1", 1)]);
    assert_eq!(
        s.instances,
        vec![
            instance("i-000001", Lifecycle::Active, None),
            instance("i-000002", Lifecycle::Draining, Some(5_000)),
        ]
    );
    assert_eq!(s.counters.get("next_instance"), Some(&3));
    assert_eq!(s.last_event_seq, 1);

    // Upserts replace, removals remove, and the snapshot follows the group's generation.
    let mut g = group(2);
    g.desired = 5;
    g.desired_reason = "scale by alice".into();
    let mut i1 = instance("i-000001", Lifecycle::Terminating, Some(9_000));
    i1.addr = "127.0.0.1:40009".into();
    store
        .commit(
            vec![
                Write::Plan(plan("v2", 2)),
                Write::Group(g.clone()),
                Write::Instance(i1.clone()),
                Write::RemoveInstance("i-000002".into()),
                Write::Counter {
                    name: "next_instance".into(),
                    value: u64::MAX >> 1,
                },
            ],
            200,
        )
        .unwrap();
    let s = store.snapshot().unwrap();
    assert_eq!(s.groups, vec![g]);
    assert_eq!(s.plans, vec![plan("v2", 2)]);
    assert_eq!(s.instances, vec![i1]);
    assert_eq!(s.counters["next_instance"], u64::MAX >> 1);
    assert_eq!(store.plan("web/local", 1).unwrap(), Some(plan("v1", 1)));
    assert_eq!(store.plan("web/local", 3).unwrap(), None);

    store
        .commit(vec![Write::RemoveGroup("web/local".into())], 300)
        .unwrap();
    let s = store.snapshot().unwrap();
    assert!(s.groups.is_empty() && s.plans.is_empty());
    assert_eq!(
        store.plan("web/local", 2).unwrap(),
        Some(plan("v2", 2)),
        "plans are kept"
    );
}

#[test]
fn revisions_are_numbered_and_all_kept() {
    let store = SqliteStore::open_in_memory().unwrap();
    for (i, summary) in ["one", "two", "three"].iter().enumerate() {
        let c = store
            .commit(vec![revision_write(summary)], 10 * i as u64)
            .unwrap();
        assert_eq!(c.revision, Some(i as u64 + 1));
    }
    let all = store.revisions().unwrap();
    let numbers: Vec<_> = all.iter().map(|r| (r.number, r.summary.as_str())).collect();
    assert_eq!(numbers, vec![(1, "one"), (2, "two"), (3, "three")]);
    assert_eq!(store.revision(2).unwrap().unwrap().summary, "two");
    assert_eq!(store.revision(2).unwrap().unwrap().applied_at_ms, 10);
    assert_eq!(store.revision(4).unwrap(), None);
    assert_eq!(store.snapshot().unwrap().revision.unwrap().number, 3);
    let c = store.commit(vec![], 0).unwrap();
    assert_eq!((c.revision, c.events.len()), (None, 0));
}

#[test]
fn plans_are_immutable() {
    let store = SqliteStore::open_in_memory().unwrap();
    store.commit(vec![Write::Plan(plan("v1", 1))], 0).unwrap();
    // The same plan again is a no-op.
    store.commit(vec![Write::Plan(plan("v1", 1))], 0).unwrap();
    // A different plan under the same generation is refused, and takes the commit with it.
    let err = store
        .commit(
            vec![
                Write::Event(NewEvent::new(EventKind::PlanChanged, "web/local -> 1")),
                revision_write("would be 1"),
                Write::Plan(plan("v2", 1)),
            ],
            0,
        )
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::PlanConflict { group, generation: 1 } if group == "web/local"),
        "{err}"
    );
    assert!(err.to_string().contains("immutable"), "{err}");
    assert_eq!(store.plan("web/local", 1).unwrap(), Some(plan("v1", 1)));
    assert!(store.events(&EventFilter::default()).unwrap().is_empty());
    assert!(store.revisions().unwrap().is_empty());
    // Numbering is not consumed by the failed commit.
    let c = store
        .commit(
            vec![
                revision_write("one"),
                Write::Event(NewEvent::new(EventKind::Applied, "ok")),
            ],
            0,
        )
        .unwrap();
    assert_eq!((c.revision, c.events[0].seq), (Some(1), 1));
}

#[test]
fn a_group_commit_applies_each_commit_alone_in_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.db");
    let store = SqliteStore::open(&path).unwrap();
    store.commit(vec![Write::Plan(plan("v1", 1))], 0).unwrap();
    let results = store.commit_many(vec![
        (
            vec![Write::Event(NewEvent::new(EventKind::Healthy, "first"))],
            10,
        ),
        // Refused as a whole (a different plan under generation 1); the others stay.
        (
            vec![
                revision_write("would be 1"),
                Write::Event(NewEvent::new(EventKind::PlanChanged, "refused")),
                Write::Plan(plan("v2", 1)),
            ],
            20,
        ),
        (
            vec![
                revision_write("one"),
                Write::Event(NewEvent::new(EventKind::Applied, "second")),
            ],
            30,
        ),
        (vec![], 40),
    ]);
    assert_eq!(results.len(), 4);
    let first = results[0].as_ref().unwrap();
    assert_eq!((first.events[0].seq, first.events[0].at_ms), (1, 10));
    assert!(matches!(results[1], Err(StoreError::PlanConflict { .. })));
    let third = results[2].as_ref().unwrap();
    // Numbering is not consumed by the refused commit.
    assert_eq!((third.revision, third.events[0].seq), (Some(1), 2));
    assert_eq!(third.events[0].at_ms, 30);
    assert!(results[3].as_ref().unwrap().events.is_empty());
    drop(store);
    // Durable: all of it is in the file.
    let store = SqliteStore::open(&path).unwrap();
    let messages: Vec<String> = store
        .events(&EventFilter::default())
        .unwrap()
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert_eq!(messages, ["first", "second"]);
    assert_eq!(store.revisions().unwrap().len(), 1);
    assert_eq!(store.plan("web/local", 1).unwrap(), Some(plan("v1", 1)));
}

#[test]
fn event_filters() {
    let store = SqliteStore::open_in_memory().unwrap();
    let events = vec![
        NewEvent::new(EventKind::Applied, "revision 1"),
        NewEvent::new(EventKind::Launched, "a")
            .group("web/local")
            .instance("i-000001"),
        NewEvent::new(EventKind::Launched, "b")
            .group("api/local")
            .instance("i-000002"),
        NewEvent::new(EventKind::Healthy, "a ok")
            .group("web/local")
            .instance("i-000001"),
        NewEvent::new(EventKind::Scaled, "web 2->3").group("web/local"),
        NewEvent::new(EventKind::Healthy, "b ok")
            .group("api/local")
            .instance("i-000002"),
    ];
    let c = store
        .commit(events.into_iter().map(Write::Event).collect(), 7)
        .unwrap();
    let seqs: Vec<u64> = c.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
    assert!(c.events.iter().all(|e| e.at_ms == 7));

    let q =
        |f: EventFilter| -> Vec<u64> { store.events(&f).unwrap().iter().map(|e| e.seq).collect() };
    assert_eq!(q(EventFilter::default()), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(store.events(&EventFilter::default()).unwrap(), c.events);
    assert_eq!(
        q(EventFilter {
            after_seq: 4,
            ..Default::default()
        }),
        vec![5, 6]
    );
    assert_eq!(
        q(EventFilter {
            limit: 2,
            ..Default::default()
        }),
        vec![1, 2]
    );
    assert_eq!(
        q(EventFilter {
            after_seq: 2,
            limit: 2,
            ..Default::default()
        }),
        vec![3, 4]
    );
    let web = Some("web/local".to_string());
    assert_eq!(
        q(EventFilter {
            group: web.clone(),
            ..Default::default()
        }),
        vec![2, 4, 5]
    );
    assert_eq!(
        q(EventFilter {
            instance: Some("i-000002".into()),
            ..Default::default()
        }),
        vec![3, 6]
    );
    assert_eq!(
        q(EventFilter {
            kind: Some(EventKind::Healthy),
            ..Default::default()
        }),
        vec![4, 6]
    );
    assert_eq!(
        q(EventFilter {
            group: web.clone(),
            kind: Some(EventKind::Launched),
            ..Default::default()
        }),
        vec![2]
    );
    assert_eq!(
        q(EventFilter {
            group: web,
            after_seq: 2,
            limit: 1,
            ..Default::default()
        }),
        vec![4]
    );
    assert_eq!(
        q(EventFilter {
            after_seq: 6,
            ..Default::default()
        }),
        Vec::<u64>::new()
    );
    assert_eq!(
        q(EventFilter {
            after_seq: u64::MAX,
            ..Default::default()
        }),
        Vec::<u64>::new()
    );
}

#[test]
fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.db");
    let before = {
        let store = SqliteStore::open(&path).unwrap();
        populate(&store);
        store.commit(vec![revision_write("second")], 150).unwrap();
        store.snapshot().unwrap()
    };
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.snapshot().unwrap(), before);
    assert_eq!(store.revisions().unwrap().len(), 2);
    assert_eq!(store.plan("web/local", 1).unwrap(), Some(plan("v1", 1)));
    // Numbering continues where it stopped.
    let c = store
        .commit(
            vec![
                revision_write("third"),
                Write::Event(NewEvent::new(EventKind::Server, "restarted")),
            ],
            400,
        )
        .unwrap();
    assert_eq!((c.revision, c.events[0].seq), (Some(3), 2));
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

// --- crash durability -------------------------------------------------------------------

const CHILD_ENV: &str = "DROVER_STORE_CRASH_CHILD_DB";
/// `group`: the child commits through `commit_many`, three commits per group.
const CHILD_MODE: &str = "DROVER_STORE_CRASH_CHILD_MODE";
/// Commits per group in the `group` mode.
const PER_GROUP: u64 = 3;
const CHILD_COMMITS: u64 = 100_000;
const KILL_AFTER: u64 = 30;

/// The writer half of `acknowledged_commits_survive_sigkill`; a no-op in a normal test run.
#[test]
fn crash_writer_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let store = SqliteStore::open(Path::new(&path)).unwrap();
    let mut out = std::io::stdout().lock();
    let one = |k: u64| {
        vec![
            revision_write(&format!("revision {k}")),
            Write::Event(NewEvent::new(EventKind::Applied, format!("revision {k}"))),
            Write::Counter {
                name: "last".into(),
                value: k,
            },
        ]
    };
    if std::env::var(CHILD_MODE).as_deref() == Ok("group") {
        for g in 0..CHILD_COMMITS / PER_GROUP {
            let ks: Vec<u64> = (1..=PER_GROUP).map(|i| g * PER_GROUP + i).collect();
            let results = store.commit_many(ks.iter().map(|&k| (one(k), k)).collect());
            for (k, c) in ks.iter().zip(results) {
                let c = c.unwrap();
                assert_eq!(c.revision, Some(*k));
                assert_eq!(c.events[0].seq, *k);
                out.write_all(format!("\ncommitted {k}\n").as_bytes())
                    .unwrap();
            }
            out.flush().unwrap();
        }
        return;
    }
    for k in 1..=CHILD_COMMITS {
        let c = store
            .commit(
                vec![
                    revision_write(&format!("revision {k}")),
                    Write::Event(NewEvent::new(EventKind::Applied, format!("revision {k}"))),
                    Write::Counter {
                        name: "last".into(),
                        value: k,
                    },
                ],
                k,
            )
            .unwrap();
        assert_eq!(c.revision, Some(k));
        assert_eq!(c.events[0].seq, k);
        // One write(2) per line: the parent never sees half an acknowledgement.
        out.write_all(format!("\ncommitted {k}\n").as_bytes())
            .unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn acknowledged_commits_survive_sigkill() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    crash_and_check("one", 1);
}

/// The same through group commits: every commit of an acknowledged group is there.
#[test]
fn acknowledged_group_commits_survive_sigkill() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    crash_and_check("group", PER_GROUP);
}

/// Run `crash_writer_child` in `mode`, SIGKILL it mid-stream, and check that every
/// acknowledged commit is in the reopened store (and at most `in_flight` more).
fn crash_and_check(mode: &str, in_flight: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_writer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .env(CHILD_MODE, mode)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut acked = Vec::new();
    let mut killed = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(k) = line
            .strip_prefix("committed ")
            .and_then(|k| k.parse::<u64>().ok())
        {
            acked.push(k);
        }
        if !killed && acked.len() as u64 >= KILL_AFTER {
            child.kill().unwrap(); // SIGKILL, mid-stream
            killed = true;
        }
    }
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        killed,
        "child ended before being killed ({status}): {stderr}"
    );
    assert!(!status.success(), "child should have died of SIGKILL");
    assert_eq!(acked, (1..=acked.len() as u64).collect::<Vec<_>>());
    let last_acked = *acked.last().unwrap();
    eprintln!("child acknowledged {last_acked} commits before SIGKILL");
    assert!(
        last_acked < CHILD_COMMITS,
        "the kill landed after the last commit"
    );

    let store = SqliteStore::open(&path).unwrap();
    let numbers: Vec<u64> = store
        .revisions()
        .unwrap()
        .iter()
        .map(|r| r.number)
        .collect();
    let n = numbers.len() as u64;
    // Every acknowledged commit is there; at most one more (one group more) was in flight
    // when the kill landed.
    assert!(
        n >= last_acked && n <= last_acked + in_flight,
        "acknowledged {last_acked} revisions, found {n}"
    );
    eprintln!("found {n} revisions after reopening");
    assert_eq!(
        numbers,
        (1..=n).collect::<Vec<_>>(),
        "revision numbers are contiguous"
    );
    let seqs: Vec<u64> = store
        .events(&EventFilter::default())
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "each revision has its event, no gaps"
    );
    let s = store.snapshot().unwrap();
    assert_eq!(s.counters["last"], n);
    assert_eq!(s.revision.unwrap().summary, format!("revision {n}"));
    let c = store
        .commit(vec![revision_write("after crash")], 0)
        .unwrap();
    assert_eq!(c.revision, Some(n + 1));
}

#[test]
fn tokens_are_stored_by_hash_revoked_once_and_survive_reopen() {
    use drover_model::token::{TokenInfo, TokenScope};
    use drover_store::TokenRecord;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.db");
    let rec = |id: &str, scope, group: Option<&str>, hash: &str| TokenRecord {
        info: TokenInfo {
            id: id.into(),
            name: format!("{scope:?}"),
            scope,
            group: group.map(str::to_string),
            created_at_ms: 5,
            revoked_at_ms: None,
        },
        hash: hash.into(),
    };
    {
        let store = SqliteStore::open(&path).unwrap();
        store
            .commit(
                vec![
                    Write::Token(rec("t-000001", TokenScope::Admin, None, "aa")),
                    Write::Token(rec("t-000002", TokenScope::Agent, Some("web/local"), "bb")),
                ],
                10,
            )
            .unwrap();
        // A second token with the same hash is refused and the whole commit rolls back.
        let err = store.commit(
            vec![
                Write::Token(rec("t-000003", TokenScope::Read, None, "cc")),
                Write::Token(rec("t-000004", TokenScope::Read, None, "aa")),
            ],
            11,
        );
        assert!(err.is_err());
        store
            .commit(
                vec![Write::RevokeToken {
                    id: "t-000002".into(),
                    at_ms: 20,
                }],
                20,
            )
            .unwrap();
        store
            .commit(
                vec![Write::RevokeToken {
                    id: "t-000002".into(),
                    at_ms: 30,
                }],
                30,
            )
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let tokens = store.tokens().unwrap();
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    assert_eq!(tokens[0].hash, "aa");
    assert_eq!(tokens[0].info.revoked_at_ms, None);
    assert_eq!(tokens[1].info.group.as_deref(), Some("web/local"));
    assert_eq!(
        tokens[1].info.revoked_at_ms,
        Some(20),
        "first revocation kept"
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
