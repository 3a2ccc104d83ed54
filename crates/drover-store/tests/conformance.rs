//! One conformance suite for every store: each case runs against SQLite (a test of its
//! own) and, with the cargo feature `etcd`, against a real 3-member etcd cluster on loopback
//! (`etcd_conformance`: one cluster, one key prefix per case). Then what only etcd has:
//! losing members, credentials.

use std::io::{BufRead, BufReader, Write as _};
use std::process::{Command, Stdio};

use drover_model::{parse_fleet, EventKind, Fleet, NewEvent, Plan};
use drover_store::{
    EventFilter, GroupRecord, InstanceRecord, Lifecycle, SqliteStore, Store, StoreError, StoreSpec,
    Write,
};
use drover_test_support::fleets::DEMO as FLEET;

/// One store under test: handles on it, and a restart of what holds it.
pub trait Fixture: Sync {
    /// A new handle (a new connection) on the same store.
    fn store(&self) -> Box<dyn Store>;
    /// SQLite: nothing (the next handle reopens the file). etcd: SIGKILL every member and
    /// start them again on their data directories.
    fn restart(&self);
    /// The `--store` value of this store.
    fn spec(&self) -> String;
}

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
            ..Default::default()
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
        // Stored and read back by every store (the binding holds across restarts).
        own_token: true,
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

pub fn every_record_round_trips_through_snapshot(f: &dyn Fixture) {
    let store = f.store();
    let empty = store.snapshot().unwrap();
    assert_eq!(empty.revision, None);
    assert_eq!(empty.last_event_seq, 0);
    assert!(empty.groups.is_empty() && empty.plans.is_empty() && empty.instances.is_empty());

    populate(&*store);
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

pub fn revisions_are_numbered_and_all_kept(f: &dyn Fixture) {
    let store = f.store();
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

pub fn plans_are_immutable(f: &dyn Fixture) {
    let store = f.store();
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

pub fn a_group_commit_applies_each_commit_alone_in_one_transaction(f: &dyn Fixture) {
    let store = f.store();
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
    // Durable: all of it is there after a restart (of every etcd member).
    f.restart();
    let store = f.store();
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

pub fn event_filters(f: &dyn Fixture) {
    let store = f.store();
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
    // The newest N (as `drover events --limit N`), still oldest first; with a filter too.
    assert_eq!(
        q(EventFilter {
            limit: 2,
            newest: true,
            ..Default::default()
        }),
        vec![5, 6]
    );
    let all = q(EventFilter::default());
    let newest_of_kind = |kind: EventKind, n: usize| {
        let of: Vec<u64> = store
            .events(&EventFilter {
                kind: Some(kind),
                ..Default::default()
            })
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        let got = q(EventFilter {
            kind: Some(kind),
            limit: n,
            newest: true,
            ..Default::default()
        });
        (of[of.len().saturating_sub(n)..].to_vec(), got)
    };
    let (want, got) = newest_of_kind(EventKind::Launched, 1);
    assert_eq!(got, want);
    assert!(!got.is_empty() && all.contains(&got[0]));
    // By time: every event here is at 7 ms.
    assert_eq!(
        q(EventFilter {
            since_ms: 7,
            ..Default::default()
        }),
        all
    );
    assert_eq!(
        q(EventFilter {
            since_ms: 8,
            ..Default::default()
        }),
        Vec::<u64>::new()
    );
}

pub fn reopen_keeps_everything(f: &dyn Fixture) {
    let before = {
        let store = f.store();
        populate(&*store);
        store.commit(vec![revision_write("second")], 150).unwrap();
        store.snapshot().unwrap()
    };
    f.restart();
    let store = f.store();
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

pub fn tokens_are_stored_by_hash_revoked_once_and_survive_reopen(f: &dyn Fixture) {
    use drover_model::token::{TokenInfo, TokenScope};
    use drover_store::TokenRecord;
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
        let store = f.store();
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
    f.restart();
    let store = f.store();
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

/// The control plane's secrets: the first one stored under a name wins, for every handle and
/// after a restart; nothing else changes (no revision, no event).
pub fn a_secret_is_kept_once_and_the_first_wins(f: &dyn Fixture) {
    {
        let a = f.store();
        let b = f.store();
        assert_eq!(a.secrets().unwrap(), Vec::new());
        assert_eq!(
            a.keep_secret("agent-token-key", b"first").unwrap(),
            b"first"
        );
        // Another server starting with another candidate gets the first one.
        assert_eq!(
            b.keep_secret("agent-token-key", b"second").unwrap(),
            b"first"
        );
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(b.keep_secret("api-ca", &bytes).unwrap(), bytes);
    }
    f.restart();
    let store = f.store();
    let bytes: Vec<u8> = (0..=255).collect();
    assert_eq!(
        store.secrets().unwrap(),
        vec![
            ("agent-token-key".to_string(), b"first".to_vec()),
            ("api-ca".to_string(), bytes)
        ]
    );
    assert_eq!(
        store.keep_secret("agent-token-key", b"third").unwrap(),
        b"first"
    );
    let snap = store.snapshot().unwrap();
    assert_eq!((snap.revision, snap.last_event_seq), (None, 0));
}

/// Writers on several handles at once: every commit gets its own numbers, without gaps, and
/// a commit's revision and event are numbered together.
pub fn concurrent_commits_stay_gapless_and_whole(f: &dyn Fixture) {
    const THREADS: u64 = 4;
    const EACH: u64 = 12;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                let store = f.store();
                for k in 0..EACH {
                    let name = format!("t{t}-{k}");
                    let c = store
                        .commit(
                            vec![
                                revision_write(&name),
                                Write::Event(NewEvent::new(EventKind::Applied, name.clone())),
                                Write::Counter {
                                    name: format!("t{t}"),
                                    value: k + 1,
                                },
                            ],
                            k,
                        )
                        .unwrap();
                    assert_eq!(c.revision, Some(c.events[0].seq), "numbered together");
                }
            });
        }
    });
    let store = f.store();
    let revisions = store.revisions().unwrap();
    let n = THREADS * EACH;
    assert_eq!(
        revisions.iter().map(|r| r.number).collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    let events = store.events(&EventFilter::default()).unwrap();
    assert_eq!(events.len() as u64, n);
    for (r, e) in revisions.iter().zip(&events) {
        assert_eq!(
            (r.number, &r.summary),
            (e.seq, &e.message),
            "one commit, both numbers"
        );
    }
    let s = store.snapshot().unwrap();
    for t in 0..THREADS {
        assert_eq!(s.counters[&format!("t{t}")], EACH);
    }
}

/// A group commit larger than one etcd transaction may hold is split, yet each commit in it
/// is all or nothing and the numbers stay in order.
pub fn a_large_group_commit_keeps_each_commit_whole(f: &dyn Fixture) {
    const N: u64 = 300;
    let store = f.store();
    store.commit(vec![Write::Plan(plan("v1", 1))], 0).unwrap();
    let batches: Vec<(Vec<Write>, u64)> = (1..=N)
        .map(|k| {
            let mut w = vec![
                revision_write(&format!("r{k}")),
                Write::Event(NewEvent::new(EventKind::Launched, format!("e{k}"))),
                Write::Instance(instance(&format!("i-{k:06}"), Lifecycle::Active, None)),
                Write::Counter {
                    name: "last".into(),
                    value: k,
                },
            ];
            if k == 150 {
                w.push(Write::Plan(plan("v2", 1))); // refused: this whole commit goes
            }
            (w, k)
        })
        .collect();
    let results = store.commit_many(batches);
    assert_eq!(results.len() as u64, N);
    let mut next = 1;
    for (k, r) in (1..=N).zip(&results) {
        if k == 150 {
            assert!(matches!(r, Err(StoreError::PlanConflict { .. })), "{r:?}");
            continue;
        }
        let c = r.as_ref().unwrap();
        assert_eq!(
            (c.revision, c.events[0].seq, c.events[0].at_ms),
            (Some(next), next, k)
        );
        next += 1;
    }
    let s = store.snapshot().unwrap();
    assert_eq!(s.instances.len() as u64, N - 1);
    assert!(!s.instances.iter().any(|i| i.id == "i-000150"));
    assert_eq!(s.counters["last"], N);
    assert_eq!(s.last_event_seq, N - 1);
    assert_eq!(store.revisions().unwrap().len() as u64, N - 1);
    let page = store
        .events(&EventFilter {
            after_seq: 100,
            limit: 3,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [101, 102, 103]
    );
}

/// `drover store copy`: everything arrives, with its numbers and times, and the stores
/// compare equal; a store that holds something is refused.
pub fn copy_moves_everything_and_compares_equal(f: &dyn Fixture) {
    use drover_model::token::{TokenInfo, TokenScope};
    let src = SqliteStore::open_in_memory().unwrap();
    populate(&src);
    src.commit(
        vec![
            revision_write("deploy"),
            Write::Plan(plan("v2", 2)),
            Write::Group(group(2)),
            Write::Event(
                NewEvent::new(EventKind::PlanChanged, "web/local -> 2").group("web/local"),
            ),
            Write::Token(drover_store::TokenRecord {
                info: TokenInfo {
                    id: "t-000001".into(),
                    name: "ci".into(),
                    scope: TokenScope::Admin,
                    group: None,
                    created_at_ms: 5,
                    revoked_at_ms: None,
                },
                hash: "ab".repeat(32),
            }),
            Write::Token(drover_store::TokenRecord {
                info: TokenInfo {
                    id: "t-000002".into(),
                    name: "agent".into(),
                    scope: TokenScope::Agent,
                    group: Some("web/local".into()),
                    created_at_ms: 6,
                    revoked_at_ms: None,
                },
                hash: "cd".repeat(32),
            }),
        ],
        2_000,
    )
    .unwrap();
    src.commit(
        vec![Write::RevokeToken {
            id: "t-000002".into(),
            at_ms: 3_000,
        }],
        3_000,
    )
    .unwrap();
    for k in 0..40 {
        src.commit(
            vec![Write::Event(
                NewEvent::new(EventKind::Healthy, format!("h{k}")).instance("i-000001"),
            )],
            4_000 + k,
        )
        .unwrap();
    }
    src.keep_secret("agent-token-key", &[7; 32]).unwrap();
    let dst = f.store();
    let moved = drover_store::copy::copy(&src, &*dst).unwrap();
    assert_eq!(moved.secrets, 1);
    assert_eq!(
        dst.secrets().unwrap(),
        vec![("agent-token-key".to_string(), vec![7; 32])]
    );
    assert_eq!(
        (
            moved.revisions,
            moved.plans,
            moved.groups,
            moved.instances,
            moved.events,
            moved.tokens
        ),
        (2, 2, 1, 2, 42, 2)
    );
    let same = drover_store::copy::compare(&src, &*dst).unwrap();
    assert_eq!(same, Ok(moved.clone()));
    // Not into a store that holds something.
    let again = drover_store::copy::copy(&src, &*dst).unwrap_err();
    assert!(again.to_string().contains("not empty"), "{again}");
    // A differing store is reported as such.
    dst.commit(
        vec![Write::Event(NewEvent::new(EventKind::Server, "extra"))],
        9,
    )
    .unwrap();
    let diff = drover_store::copy::compare(&src, &*dst)
        .unwrap()
        .unwrap_err();
    assert!(diff.iter().any(|d| d.contains("event")), "{diff:?}");
    src.keep_secret("api-ca", b"ca").unwrap();
    let diff = drover_store::copy::compare(&src, &*dst)
        .unwrap()
        .unwrap_err();
    assert!(
        diff.iter().any(|d| d.contains("secrets differ")),
        "{diff:?}"
    );
    // The copy goes on numbering where the source stopped.
    let c = dst
        .commit(vec![revision_write("after the copy")], 10)
        .unwrap();
    assert_eq!(c.revision, Some(3));
}

/// Acknowledged commits survive a SIGKILL of the writer (and, on etcd, of every member
/// right after), one commit at a time and in group commits.
pub fn acknowledged_commits_survive_sigkill(f: &dyn Fixture) {
    crash_and_check(f, "one", 1);
}

pub fn acknowledged_group_commits_survive_sigkill(f: &dyn Fixture) {
    crash_and_check(f, "group", PER_GROUP);
}

// --- crash durability -------------------------------------------------------------------

const CHILD_ENV: &str = "DROVER_STORE_CRASH_CHILD_SPEC";
/// `group`: the child commits through `commit_many`, three commits per group.
const CHILD_MODE: &str = "DROVER_STORE_CRASH_CHILD_MODE";
/// Commits per group in the `group` mode.
const PER_GROUP: u64 = 3;
const CHILD_COMMITS: u64 = 100_000;
const KILL_AFTER: u64 = 30;

fn crash_commit(k: u64) -> Vec<Write> {
    vec![
        revision_write(&format!("revision {k}")),
        Write::Event(NewEvent::new(EventKind::Applied, format!("revision {k}"))),
        Write::Counter {
            name: "last".into(),
            value: k,
        },
    ]
}

/// The writer half of the SIGKILL cases; a no-op in a normal test run.
#[test]
fn crash_writer_child() {
    let Some(spec) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let spec = StoreSpec::parse(spec.to_str().unwrap()).unwrap();
    let store = spec.open().unwrap();
    let mut out = std::io::stdout().lock();
    if std::env::var(CHILD_MODE).as_deref() == Ok("group") {
        for g in 0..CHILD_COMMITS / PER_GROUP {
            let ks: Vec<u64> = (1..=PER_GROUP).map(|i| g * PER_GROUP + i).collect();
            let results = store.commit_many(ks.iter().map(|&k| (crash_commit(k), k)).collect());
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
        let c = store.commit(crash_commit(k), k).unwrap();
        assert_eq!(c.revision, Some(k));
        assert_eq!(c.events[0].seq, k);
        // One write(2) per line: the parent never sees half an acknowledgement.
        out.write_all(format!("\ncommitted {k}\n").as_bytes())
            .unwrap();
        out.flush().unwrap();
    }
}

/// Run `crash_writer_child` in `mode` on the fixture's store, SIGKILL it mid-stream, restart
/// what holds the store, and check that every acknowledged commit is there (and at most
/// `in_flight` more).
fn crash_and_check(f: &dyn Fixture, mode: &str, in_flight: u64) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_writer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, f.spec())
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
    f.restart();
    let store = f.store();
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
    eprintln!("found {n} revisions after the restart");
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

/// The newest N of many events (more than a read's page), with filters, after `after_seq`
/// and after pruning: the last N of those that match, oldest first, for every N.
pub fn newest_events_are_the_last_that_match(f: &dyn Fixture) {
    let store = f.store();
    store.commit(vec![revision_write("first")], 1).unwrap();
    // 1,500 events in commits of 100: every third a launch in group web/a, the rest healthy.
    for c in 0..15u64 {
        let writes = (0..100u64)
            .map(|i| {
                let n = c * 100 + i;
                Write::Event(if n % 3 == 0 {
                    NewEvent::new(EventKind::Launched, format!("e{n}")).group("web/a")
                } else {
                    NewEvent::new(EventKind::Healthy, format!("e{n}"))
                })
            })
            .collect();
        store.commit(writes, 1000 + c).unwrap();
    }
    // Retention took the oldest 300.
    assert_eq!(store.prune_events(1200, 0).unwrap(), 300);
    let all = store.events(&EventFilter::default()).unwrap();
    assert_eq!(all.len(), 1200);
    let filters = [
        EventFilter::default(),
        EventFilter {
            kind: Some(EventKind::Launched),
            ..Default::default()
        },
        EventFilter {
            group: Some("web/a".into()),
            since_ms: 1010,
            ..Default::default()
        },
        EventFilter {
            kind: Some(EventKind::Exec),
            ..Default::default()
        },
        EventFilter {
            after_seq: all[900].seq,
            ..Default::default()
        },
        EventFilter {
            kind: Some(EventKind::Healthy),
            after_seq: all[100].seq,
            ..Default::default()
        },
    ];
    for base in filters {
        let matching: Vec<u64> = store.events(&base).unwrap().iter().map(|e| e.seq).collect();
        for limit in [1, 7, 16, 17, 300, 399, 400, 401, 1199, 1200, 5000] {
            let got: Vec<u64> = store
                .events(&EventFilter {
                    limit,
                    newest: true,
                    ..base.clone()
                })
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect();
            let want = &matching[matching.len().saturating_sub(limit)..];
            assert_eq!(got, want, "newest {limit} of {base:?}");
        }
    }
}

/// Retention: events beyond the newest N, and those older than the cut-off, go; revisions
/// stay; numbering goes on after the newest, which is always kept.
pub fn prune_events_keeps_the_newest_and_every_revision(f: &dyn Fixture) {
    let store = f.store();
    store.commit(vec![revision_write("first")], 1).unwrap();
    for t in 0..20u64 {
        let ev = NewEvent::new(EventKind::Healthy, format!("e{t}"));
        store.commit(vec![Write::Event(ev)], 1000 + t).unwrap();
    }
    // By count: the newest 5 stay.
    assert_eq!(store.prune_events(5, 0).unwrap(), 15);
    let left = store.events(&EventFilter::default()).unwrap();
    let msgs: Vec<&str> = left.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(msgs, ["e15", "e16", "e17", "e18", "e19"]);
    // By age: those stamped before 1018 go, even within the count.
    assert_eq!(store.prune_events(100, 1018).unwrap(), 3);
    let left = store.events(&EventFilter::default()).unwrap();
    assert_eq!(left.len(), 2);
    // Never the newest, so numbering carries on.
    assert_eq!(store.prune_events(0, u64::MAX).unwrap(), 1);
    let c = store
        .commit(
            vec![Write::Event(NewEvent::new(EventKind::Healthy, "next"))],
            2000,
        )
        .unwrap();
    assert_eq!(c.events[0].seq, 21);
    assert_eq!(store.revisions().unwrap().len(), 1);
    assert_eq!(store.prune_events(0, 0).unwrap(), 1);
}

/// Every case, by name.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        #[allow(dead_code)]
        const CASES: &[(&str, fn(&dyn Fixture))] = &[$((stringify!($name), $name)),*];
        /// Each case on a SQLite file of its own.
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name(&super::SqliteFixture::new());
                }
            )*
        }
    };
}

suite!(
    every_record_round_trips_through_snapshot,
    revisions_are_numbered_and_all_kept,
    plans_are_immutable,
    a_group_commit_applies_each_commit_alone_in_one_transaction,
    event_filters,
    reopen_keeps_everything,
    tokens_are_stored_by_hash_revoked_once_and_survive_reopen,
    a_secret_is_kept_once_and_the_first_wins,
    concurrent_commits_stay_gapless_and_whole,
    a_large_group_commit_keeps_each_commit_whole,
    copy_moves_everything_and_compares_equal,
    acknowledged_commits_survive_sigkill,
    acknowledged_group_commits_survive_sigkill,
    prune_events_keeps_the_newest_and_every_revision,
    newest_events_are_the_last_that_match,
);

struct SqliteFixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl SqliteFixture {
    fn new() -> SqliteFixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.db");
        SqliteFixture { _dir: dir, path }
    }
}

impl Fixture for SqliteFixture {
    fn store(&self) -> Box<dyn Store> {
        Box::new(SqliteStore::open(&self.path).unwrap())
    }
    fn restart(&self) {}
    fn spec(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }
}

#[cfg(feature = "etcd")]
#[path = "conformance/etcd.rs"]
mod etcd;
