//! The etcd half of the conformance suite: one 3-member cluster on loopback, every case under
//! a key prefix of its own, then member loss, quorum loss and credentials.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use drover_model::{EventKind, NewEvent};
use drover_store::local_etcd::{etcd_or_skip, LocalEtcd};
use drover_store::{EtcdStore, Store, StoreError, Write};

use super::{revision_write, Fixture, CASES};

struct EtcdFixture<'a> {
    cluster: &'a Mutex<LocalEtcd>,
    prefix: String,
}

impl Fixture for EtcdFixture<'_> {
    fn store(&self) -> Box<dyn Store> {
        let cfg = self.cluster.lock().unwrap().config(&self.prefix);
        Box::new(EtcdStore::open(&cfg).unwrap())
    }
    fn restart(&self) {
        let mut c = self.cluster.lock().unwrap();
        for i in 0..3 {
            c.kill(i);
        }
        for i in 0..3 {
            c.restart(i).unwrap();
        }
        c.wait_healthy(Duration::from_secs(30)).unwrap();
    }
    fn spec(&self) -> String {
        self.cluster.lock().unwrap().url(&self.prefix)
    }
}

/// Every conformance case against etcd, then what only etcd has.
#[test]
fn etcd_conformance() {
    let Some(bin) = etcd_or_skip("etcd_conformance") else {
        return;
    };
    let cluster = Mutex::new(LocalEtcd::start(&bin, 3).unwrap());
    for (name, case) in CASES {
        eprintln!("etcd conformance: {name}");
        let t = Instant::now();
        case(&EtcdFixture {
            cluster: &cluster,
            prefix: format!("/drover-test/{name}/"),
        });
        eprintln!("etcd conformance: {name} ok in {:?}", t.elapsed());
    }
    eprintln!("etcd: oversized commit");
    an_oversized_commit_is_refused_whole(&cluster);
    eprintln!("etcd: losing members");
    losing_one_member_changes_nothing_losing_two_fails_clearly(&cluster);
    eprintln!("etcd: write conditions");
    write_conditions_fence_every_commit(&cluster);
    eprintln!("etcd: newest events read");
    a_newest_events_read_costs_its_limit(&cluster);
    eprintln!("etcd: election");
    one_leader_at_a_time_and_a_deposed_one_cannot_commit(&cluster);
    eprintln!("etcd: unreachable");
    unreachable_endpoints_fail_clearly();
    // Last: it turns authentication on for the whole cluster.
    eprintln!("etcd: credentials");
    credentials_are_used_and_refusals_are_clear(&cluster);
}

/// Bytes the cluster's members have sent their clients (`/metrics`), in all.
fn sent_to_clients(cluster: &Mutex<LocalEtcd>) -> u64 {
    use std::io::{Read, Write};
    let endpoints = cluster.lock().unwrap().endpoints();
    endpoints
        .iter()
        .map(|url| {
            let addr = url.trim_start_matches("http://");
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(format!("GET /metrics HTTP/1.0\r\nhost: {addr}\r\n\r\n").as_bytes())
                .unwrap();
            let mut body = String::new();
            c.read_to_string(&mut body).unwrap();
            body.lines()
                .filter(|l| l.starts_with("etcd_network_client_grpc_sent_bytes_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        })
        .sum()
}

/// `drover events --limit 10` of a store that keeps thousands: about 10 events are read,
/// not every one kept (the whole range was read, dropping all but the newest).
fn a_newest_events_read_costs_its_limit(cluster: &Mutex<LocalEtcd>) {
    let cfg = cluster.lock().unwrap().config("/drover-test/newest-cost/");
    let store = EtcdStore::open(&cfg).unwrap();
    store.commit(vec![revision_write("first")], 1).unwrap();
    let pad = "x".repeat(200);
    for c in 0..40u64 {
        let writes = (0..100u64)
            .map(|i| {
                Write::Event(NewEvent::new(
                    EventKind::Healthy,
                    format!("e{} {pad}", c * 100 + i),
                ))
            })
            .collect();
        store.commit(writes, 1000 + c).unwrap();
    }
    let filter = drover_store::EventFilter {
        limit: 10,
        newest: true,
        ..Default::default()
    };
    // Once to warm the connection up; then counted.
    store.events(&filter).unwrap();
    let before = sent_to_clients(cluster);
    let got = store.events(&filter).unwrap();
    let sent = sent_to_clients(cluster) - before;
    let msgs: Vec<String> = got
        .iter()
        .map(|e| e.message.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(
        msgs,
        (3990..4000).map(|n| format!("e{n}")).collect::<Vec<_>>()
    );
    // 4,000 events of some 300 bytes each are 1.2 MB; ten of them, and a window of 16, a
    // few kB (the /metrics answers themselves are not gRPC).
    eprintln!("a newest-10 read of 4,000 events: {sent} bytes sent");
    assert!(sent > 0, "no bytes counted: is the metric's name right?");
    assert!(
        sent < 32 << 10,
        "a newest-10 read made the cluster send {sent} bytes"
    );
}

/// With authentication on: no user or a wrong password is refused clearly, the right one
/// works (from the config, as the URL's userinfo or DROVER_ETCD_USER/PASSWORD give it).
fn credentials_are_used_and_refusals_are_clear(cluster: &Mutex<LocalEtcd>) {
    let cfg = cluster.lock().unwrap().config("/drover-test/auth/");
    let admin = EtcdStore::open(&cfg).unwrap();
    let mut client = admin.client();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        client.user_add("root", "s3cret", None).await.unwrap();
        client.user_grant_role("root", "root").await.unwrap();
        client.auth_enable().await.unwrap();
    });
    let with = |user: Option<&str>, password: &str| {
        let mut c = cfg.clone();
        c.user = user.map(str::to_string);
        c.password = Some(password.to_string());
        EtcdStore::open(&c)
    };
    let err = with(Some("root"), "wrong").err().expect("a wrong password");
    eprintln!("wrong password: {err}");
    assert!(matches!(err, StoreError::EtcdAuth { .. }), "{err:?}");
    assert!(err.to_string().contains("DROVER_ETCD_PASSWORD"), "{err}");
    assert!(
        !err.to_string().contains("wrong"),
        "the password is not shown: {err}"
    );
    let err = with(None, "").err().expect("no user");
    eprintln!("no user: {err}");
    assert!(matches!(err, StoreError::EtcdAuth { .. }), "{err:?}");
    let store = with(Some("root"), "s3cret").unwrap();
    assert_eq!(
        commit_one(&store, "authenticated").unwrap().revision,
        Some(1)
    );
    rt.block_on(async {
        let mut c = store.client();
        c.auth_disable().await.unwrap();
    });
}

fn commit_one(store: &dyn Store, what: &str) -> Result<drover_store::Committed, StoreError> {
    store.commit(
        vec![
            revision_write(what),
            Write::Event(NewEvent::new(EventKind::Applied, what)),
        ],
        1,
    )
}

/// One commit over etcd's transaction limit is refused with what to change, and nothing of it
/// is written; the others of its group commit are.
fn an_oversized_commit_is_refused_whole(cluster: &Mutex<LocalEtcd>) {
    let cfg = cluster.lock().unwrap().config("/drover-test/oversized/");
    let store = EtcdStore::open(&cfg).unwrap();
    let big: Vec<Write> = (0..200)
        .map(|k| Write::Event(NewEvent::new(EventKind::Launched, format!("e{k}"))))
        .collect();
    let results = store.commit_many(vec![
        (vec![revision_write("small")], 1),
        (big, 2),
        (vec![revision_write("small again")], 3),
    ]);
    assert_eq!(results[0].as_ref().unwrap().revision, Some(1));
    let err = results[1].as_ref().unwrap_err();
    assert!(matches!(err, StoreError::EtcdTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("--max-txn-ops"), "{err}");
    assert_eq!(results[2].as_ref().unwrap().revision, Some(2));
    assert_eq!(store.snapshot().unwrap().last_event_seq, 0);
}

fn losing_one_member_changes_nothing_losing_two_fails_clearly(cluster: &Mutex<LocalEtcd>) {
    let cfg = cluster.lock().unwrap().config("/drover-test/outage/");
    let store = EtcdStore::open(&cfg).unwrap();
    commit_one(&store, "before").unwrap();
    // One member of three lost (it may be the leader): every commit still succeeds.
    cluster.lock().unwrap().kill(0);
    let mut slowest = Duration::ZERO;
    for k in 0..20 {
        let t = Instant::now();
        commit_one(&store, &format!("one down {k}"))
            .unwrap_or_else(|e| panic!("commit {k} with one member down: {e}"));
        slowest = slowest.max(t.elapsed());
    }
    eprintln!("one member down: 20 commits, the slowest took {slowest:?}");
    store.snapshot().unwrap();
    {
        let mut c = cluster.lock().unwrap();
        c.restart(0).unwrap();
        c.wait_healthy(Duration::from_secs(30)).unwrap();
    }
    // Two of three lost: no quorum. A commit fails within the timeout (plus the time to tell
    // an unreachable endpoint from a cluster without quorum), clearly.
    {
        let mut c = cluster.lock().unwrap();
        c.kill(1);
        c.kill(2);
    }
    let t = Instant::now();
    let err = commit_one(&store, "no quorum").unwrap_err();
    let took = t.elapsed();
    eprintln!("no quorum: commit failed after {took:?}: {err}");
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().contains("quorum"), "{err}");
    assert!(took < cfg.timeout + Duration::from_secs(3), "took {took:?}");
    let t = Instant::now();
    let err = store.snapshot().unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(t.elapsed() < cfg.timeout + Duration::from_secs(3));
    // Back: commits succeed again, numbered on from the last acknowledged one.
    {
        let mut c = cluster.lock().unwrap();
        c.restart(1).unwrap();
        c.restart(2).unwrap();
        c.wait_healthy(Duration::from_secs(30)).unwrap();
    }
    let c = commit_one(&store, "after").unwrap();
    let numbers: Vec<u64> = store
        .revisions()
        .unwrap()
        .iter()
        .map(|r| r.number)
        .collect();
    assert_eq!(numbers, (1..=c.revision.unwrap()).collect::<Vec<_>>());
    assert!(
        c.revision == Some(22) || c.revision == Some(23),
        "the refused commit is there at most once: {c:?}"
    );
}

/// The fencing hook: extra compares on every write; a failed one writes nothing.
fn write_conditions_fence_every_commit(cluster: &Mutex<LocalEtcd>) {
    use drover_store::etcd_client::{Compare, CompareOp};
    let cfg = cluster.lock().unwrap().config("/drover-test/fence/");
    let store = EtcdStore::open(&cfg).unwrap();
    let c = commit_one(&store, "unfenced").unwrap();
    assert_eq!(c.revision, Some(1));
    // "This key exists": it does not, so the commit is fenced.
    store.set_write_conditions(vec![Compare::version(
        "/drover-test/fence-election/leader",
        CompareOp::Greater,
        0,
    )]);
    let err = commit_one(&store, "fenced").unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    assert!(err.to_string().contains("no longer leads"), "{err}");
    store.set_write_conditions(Vec::new());
    let c = commit_one(&store, "unfenced again").unwrap();
    assert_eq!(c.revision, Some(2), "the fenced commit took no number");
}

/// The lead: one holder at a time; it lives while kept alive, its end lets another take it,
/// and the deposed holder's commits are fenced while the new one's go through.
fn one_leader_at_a_time_and_a_deposed_one_cannot_commit(cluster: &Mutex<LocalEtcd>) {
    use drover_store::LeaderInfo;
    let cfg = cluster.lock().unwrap().config("/drover-test/election/");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let a = EtcdStore::open(&cfg).unwrap();
    let b = EtcdStore::open(&cfg).unwrap();
    let who = |id: &str| LeaderInfo {
        id: id.into(),
        url: format!("http://{id}"),
        since_ms: 1,
    };
    let ttl = Duration::from_secs(2);
    rt.block_on(async {
        assert_eq!(a.leader().await.unwrap(), None);
        let mut la = a.try_lead(&who("a"), ttl).await.unwrap().expect("a leads");
        assert!(la.valid_until() > Instant::now());
        assert!(
            b.try_lead(&who("b"), ttl).await.unwrap().is_none(),
            "one at a time"
        );
        let seen = b.leader().await.unwrap().unwrap();
        assert_eq!(seen.leader, who("a"));
        assert_eq!(seen.create_revision, la.create_revision);
        // Kept alive past its TTL, it still leads.
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(a.keep_alive(&mut la).await.unwrap());
        }
        assert!(la.valid_until() > Instant::now() + Duration::from_secs(1));
        commit_one(&a, "the leader writes").unwrap();
        // No keep-alive for longer than the TTL (a pause): the lease expires, b takes over.
        tokio::time::sleep(ttl + Duration::from_millis(1500)).await;
        assert!(
            la.valid_until() < Instant::now(),
            "a knows it may no longer act"
        );
        let lb = b.try_lead(&who("b"), ttl).await.unwrap().expect("b leads");
        assert_ne!(lb.create_revision, la.create_revision);
        let err = commit_one(&a, "the deposed leader writes").unwrap_err();
        assert!(matches!(err, StoreError::Fenced(_)), "{err}");
        assert!(!a.keep_alive(&mut la).await.unwrap(), "a's lease is gone");
        commit_one(&b, "the new leader writes").unwrap();
        // Giving the lead up frees it at once.
        b.resign(lb).await.unwrap();
        assert_eq!(a.leader().await.unwrap(), None);
    });
}

fn unreachable_endpoints_fail_clearly() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = drover_store::EtcdConfig::new(vec![format!("127.0.0.1:{port}")]);
    cfg.timeout = Duration::from_secs(2);
    let t = Instant::now();
    let err = EtcdStore::open(&cfg).err().expect("nobody listens");
    eprintln!("unreachable: {err} (after {:?})", t.elapsed());
    assert!(matches!(err, StoreError::EtcdUnreachable { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(6));
}
