//! [`Store`] on an embedded SQLite file: WAL journal, `synchronous=FULL`, one connection.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use drover_model::api::{Revision, RevisionSummary};
use drover_model::{Event, EventKind, Plan};
use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{
    Committed, EventFilter, GroupRecord, InstanceRecord, Lifecycle, Snapshot, Store, StoreError,
    Write,
};

/// Schema migrations: entry `i` takes `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE revisions (
    number        INTEGER PRIMARY KEY,
    applied_at_ms INTEGER NOT NULL,
    file          TEXT NOT NULL,
    summary       TEXT NOT NULL,
    toml          TEXT NOT NULL,
    fleet         TEXT NOT NULL          -- drover_model::Fleet as JSON
);
CREATE TABLE groups (
    grp            TEXT PRIMARY KEY,
    desired        INTEGER NOT NULL,
    desired_reason TEXT NOT NULL,
    generation     INTEGER NOT NULL,
    rollout        TEXT NOT NULL DEFAULT '{}'   -- RolloutRecord as JSON
);
CREATE TABLE plans (
    grp        TEXT NOT NULL,
    generation INTEGER NOT NULL,
    plan       TEXT NOT NULL,            -- drover_model::Plan as JSON
    PRIMARY KEY (grp, generation)
);
CREATE TABLE instances (
    id             TEXT PRIMARY KEY,
    grp            TEXT NOT NULL,
    generation     INTEGER NOT NULL,
    addr           TEXT NOT NULL,
    provider_id    TEXT NOT NULL,
    launched_at_ms INTEGER NOT NULL,
    lifecycle      TEXT NOT NULL,
    permit_at_ms   INTEGER
);
CREATE INDEX instances_by_group ON instances (grp);
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE events (
    seq      INTEGER PRIMARY KEY,        -- the rowid: events are read by seq
    at_ms    INTEGER NOT NULL,
    kind     TEXT NOT NULL,
    grp      TEXT,
    instance TEXT,
    message  TEXT NOT NULL
);
CREATE INDEX events_by_group ON events (grp, seq);
CREATE INDEX events_by_instance ON events (instance, seq);
CREATE INDEX events_by_kind ON events (kind, seq);
"#,
    r#"
CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    scope         TEXT NOT NULL,         -- admin, read, agent
    grp           TEXT,                  -- the group of an agent token
    hash          TEXT NOT NULL UNIQUE,  -- sha256 of the token, hex; never the token
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
);
"#,
    // The last applied file (three-way merge of apply), JSON of `LastApplied`; NULL in
    // revisions stored before it.
    "ALTER TABLE revisions ADD COLUMN last_applied TEXT;",
    // One-off scheduled changes (`drover scale web 50 --at ...`), kept after they ended or
    // were cancelled.
    r#"
CREATE TABLE schedules (
    id      INTEGER PRIMARY KEY,
    service TEXT NOT NULL,
    body    TEXT NOT NULL                -- drover_model::api::ScheduledScale as JSON
);
"#,
    // The control plane's own secrets (the agent-token key, the API's CA), made once.
    r#"
CREATE TABLE secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"#,
    // Whether an instance was launched with a token of its own (its group's token never
    // speaks for it); 0 for instances stored before.
    "ALTER TABLE instances ADD COLUMN own_token INTEGER NOT NULL DEFAULT 0;",
];

/// The schema version this code writes.
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The SQLite store. One connection behind a mutex for commits (serialised), and one for
/// reads: under WAL a reader sees the last commit and never waits for a writer's fsync, so
/// a reader (the API) cannot stall the controller's writes, nor they it.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// None in memory (one connection is the whole database there).
    read: Option<Mutex<Connection>>,
}

impl SqliteStore {
    /// Open (creating if needed) the store file at `path`; its directory must exist.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let with_path = |e: StoreError| match e {
            StoreError::Sqlite(source) => StoreError::Open {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        };
        let conn = Connection::open(path).map_err(|e| with_path(e.into()))?;
        let mut store = SqliteStore::init(conn).map_err(with_path)?;
        let read = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| with_path(e.into()))?;
        read.busy_timeout(Duration::from_secs(5))
            .map_err(|e| with_path(e.into()))?;
        store.read = Some(Mutex::new(read));
        tracing::debug!(path = %path.display(), "store opened");
        Ok(store)
    }

    /// A store that lives as long as the value (tests, dry runs).
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        SqliteStore::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<SqliteStore, StoreError> {
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if mode != "wal" && mode != "memory" {
            tracing::warn!(mode, "store: WAL journal not available");
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            read: None,
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock dropped its transaction, which rolled back.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection for reads (the write connection in memory).
    fn reader(&self) -> MutexGuard<'_, Connection> {
        match &self.read {
            Some(r) => r.lock().unwrap_or_else(|e| e.into_inner()),
            None => self.conn(),
        }
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tracing::info!(from = i, to = i + 1, "store: migrating schema");
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

fn to_json<T: Serialize>(what: &str, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|source| StoreError::Json {
        what: what.to_string(),
        source,
    })
}

fn from_json<T: DeserializeOwned>(what: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|source| StoreError::Json {
        what: what.to_string(),
        source,
    })
}

/// Next number of a table whose numbers are never deleted: max + 1, inside the transaction.
fn next_number(tx: &Connection, sql: &str) -> Result<u64, StoreError> {
    let max: Option<u64> = tx.query_row(sql, [], |r| r.get(0))?;
    Ok(max.unwrap_or(0) + 1)
}

fn apply(
    tx: &Connection,
    write: Write,
    now_ms: u64,
    out: &mut Committed,
) -> Result<(), StoreError> {
    match write {
        Write::Revision {
            file,
            summary,
            toml,
            fleet,
            last_applied,
        } => {
            let fleet = to_json("fleet", &fleet)?;
            let last_applied = match &last_applied {
                Some(l) => Some(to_json("last applied file", l)?),
                None => None,
            };
            let number = next_number(tx, "SELECT MAX(number) FROM revisions")?;
            tx.execute(
                "INSERT INTO revisions (number, applied_at_ms, file, summary, toml, fleet, last_applied)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![number, now_ms, file, summary, toml, fleet, last_applied],
            )?;
            out.revision = Some(number);
        }
        Write::Group(g) => {
            tx.execute(
                "INSERT OR REPLACE INTO groups (grp, desired, desired_reason, generation, rollout)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    g.group,
                    g.desired,
                    g.desired_reason,
                    g.generation,
                    serde_json::to_string(&g.rollout).unwrap_or_else(|_| "{}".into())
                ],
            )?;
        }
        Write::RemoveGroup(group) => {
            tx.execute("DELETE FROM groups WHERE grp = ?1", [group])?;
        }
        Write::Plan(plan) => {
            let group = plan.group().0;
            let existing: Option<String> = tx
                .query_row(
                    "SELECT plan FROM plans WHERE grp = ?1 AND generation = ?2",
                    params![group, plan.generation],
                    |r| r.get(0),
                )
                .optional()?;
            match existing {
                Some(text) if from_json::<Plan>("plan", &text)? == plan => {}
                Some(_) => {
                    return Err(StoreError::PlanConflict {
                        group,
                        generation: plan.generation,
                    })
                }
                None => {
                    tx.execute(
                        "INSERT INTO plans (grp, generation, plan) VALUES (?1, ?2, ?3)",
                        params![group, plan.generation, to_json("plan", &plan)?],
                    )?;
                }
            }
        }
        Write::Instance(i) => {
            tx.execute(
                "INSERT OR REPLACE INTO instances
                 (id, grp, generation, addr, provider_id, launched_at_ms, lifecycle, permit_at_ms,
                  own_token)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    i.id,
                    i.group,
                    i.generation,
                    i.addr,
                    i.provider_id,
                    i.launched_at_ms,
                    i.lifecycle.as_str(),
                    i.permit_at_ms,
                    i.own_token
                ],
            )?;
        }
        Write::RemoveInstance(id) => {
            tx.execute("DELETE FROM instances WHERE id = ?1", [id])?;
        }
        Write::Counter { name, value } => {
            tx.execute(
                "INSERT OR REPLACE INTO counters (name, value) VALUES (?1, ?2)",
                params![name, value],
            )?;
        }
        Write::Schedule(o) => {
            tx.execute(
                "INSERT OR REPLACE INTO schedules (id, service, body) VALUES (?1, ?2, ?3)",
                params![o.id, o.service, to_json("schedule", &o)?],
            )?;
        }
        Write::Event(e) => {
            let seq = next_number(tx, "SELECT MAX(seq) FROM events")?;
            tx.execute(
                "INSERT INTO events (seq, at_ms, kind, grp, instance, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![seq, now_ms, e.kind.as_str(), e.group, e.instance, e.message],
            )?;
            out.events.push(Event {
                seq,
                at_ms: now_ms,
                kind: e.kind,
                group: e.group,
                instance: e.instance,
                message: e.message,
            });
        }
        Write::Token(t) => {
            tx.execute(
                "INSERT INTO tokens (id, name, scope, grp, hash, created_at_ms, revoked_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    t.info.id,
                    t.info.name,
                    t.info.scope.as_str(),
                    t.info.group,
                    t.hash,
                    t.info.created_at_ms,
                    t.info.revoked_at_ms
                ],
            )?;
        }
        Write::RevokeToken { id, at_ms } => {
            tx.execute(
                "UPDATE tokens SET revoked_at_ms = ?2 WHERE id = ?1 AND revoked_at_ms IS NULL",
                params![id, at_ms],
            )?;
        }
    }
    Ok(())
}

const REVISION_COLUMNS: &str = "number, applied_at_ms, file, summary, toml, fleet, last_applied";

type RevisionRow = (RevisionSummary, String, String, Option<String>);

fn revision_row(row: &Row) -> rusqlite::Result<RevisionRow> {
    Ok((
        RevisionSummary {
            number: row.get(0)?,
            applied_at_ms: row.get(1)?,
            file: row.get(2)?,
            summary: row.get(3)?,
        },
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
    ))
}

fn full_revision((s, toml, fleet, last_applied): RevisionRow) -> Result<Revision, StoreError> {
    Ok(Revision {
        fleet: from_json(&format!("fleet of revision {}", s.number), &fleet)?,
        last_applied: match last_applied {
            Some(l) => Some(from_json(
                &format!("last applied file of revision {}", s.number),
                &l,
            )?),
            None => None,
        },
        number: s.number,
        applied_at_ms: s.applied_at_ms,
        file: s.file,
        summary: s.summary,
        toml,
    })
}

/// Column `idx` parsed by `parse`; an unknown value is a conversion error naming it.
fn parsed<T>(
    row: &Row,
    idx: usize,
    what: &str,
    parse: fn(&str) -> Option<T>,
) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    parse(&text).ok_or_else(|| {
        let msg = format!("unknown {what} {text:?}");
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, msg.into())
    })
}

fn event_row(row: &Row) -> rusqlite::Result<Event> {
    Ok(Event {
        seq: row.get(0)?,
        at_ms: row.get(1)?,
        kind: parsed(row, 2, "event kind", EventKind::parse)?,
        group: row.get(3)?,
        instance: row.get(4)?,
        message: row.get(5)?,
    })
}

fn instance_row(row: &Row) -> rusqlite::Result<InstanceRecord> {
    Ok(InstanceRecord {
        id: row.get(0)?,
        group: row.get(1)?,
        generation: row.get(2)?,
        addr: row.get(3)?,
        provider_id: row.get(4)?,
        launched_at_ms: row.get(5)?,
        lifecycle: parsed(row, 6, "lifecycle", Lifecycle::parse)?,
        permit_at_ms: row.get(7)?,
        own_token: row.get(8)?,
    })
}

fn token_row(row: &Row) -> rusqlite::Result<crate::TokenRecord> {
    Ok(crate::TokenRecord {
        info: drover_model::token::TokenInfo {
            id: row.get(0)?,
            name: row.get(1)?,
            scope: parsed(
                row,
                2,
                "token scope",
                drover_model::token::TokenScope::parse,
            )?,
            group: row.get(3)?,
            created_at_ms: row.get(5)?,
            revoked_at_ms: row.get(6)?,
        },
        hash: row.get(4)?,
    })
}

impl Store for SqliteStore {
    fn commit(&self, writes: Vec<Write>, now_ms: u64) -> Result<Committed, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut out = Committed {
            revision: None,
            events: Vec::new(),
        };
        let n = writes.len();
        for write in writes {
            apply(&tx, write, now_ms, &mut out)?; // dropping `tx` rolls back
        }
        tx.commit()?;
        tracing::trace!(writes = n, revision = ?out.revision, events = out.events.len(), "store: committed");
        Ok(out)
    }

    fn commit_many(&self, batches: Vec<(Vec<Write>, u64)>) -> Vec<Result<Committed, StoreError>> {
        let n = batches.len();
        let mut conn = self.conn();
        let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => return failed_batch(n, &e.to_string()),
        };
        let mut results = Vec::with_capacity(n);
        for (writes, now_ms) in batches {
            // Each batch in its own savepoint: all of it or none of it, whatever the others do.
            let one = (|| {
                let sp = tx.savepoint()?;
                let mut out = Committed {
                    revision: None,
                    events: Vec::new(),
                };
                for write in writes {
                    apply(&sp, write, now_ms, &mut out)?; // dropping `sp` rolls it back
                }
                sp.commit()?;
                Ok(out)
            })();
            results.push(one);
        }
        // One commit, one fsync, for every batch.
        if let Err(e) = tx.commit() {
            return failed_batch(n, &e.to_string());
        }
        tracing::trace!(batches = n, "store: committed a group");
        results
    }

    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?; // one read transaction: a consistent view
        let revision = tx
            .query_row(
                &format!("SELECT {REVISION_COLUMNS} FROM revisions ORDER BY number DESC LIMIT 1"),
                [],
                revision_row,
            )
            .optional()?
            .map(full_revision)
            .transpose()?;
        let groups = tx
            .prepare(
                "SELECT grp, desired, desired_reason, generation, rollout FROM groups ORDER BY grp",
            )?
            .query_map([], |r| {
                let rollout: String = r.get(4)?;
                Ok(GroupRecord {
                    group: r.get(0)?,
                    desired: r.get(1)?,
                    desired_reason: r.get(2)?,
                    generation: r.get(3)?,
                    rollout: serde_json::from_str(&rollout).unwrap_or_default(),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let plans = tx
            .prepare(
                "SELECT p.plan FROM groups g
                 JOIN plans p ON p.grp = g.grp AND p.generation = g.generation
                 ORDER BY g.grp",
            )?
            .query_map([], |r| r.get::<_, String>(0))?
            .map(|text| from_json::<Plan>("plan", &text?))
            .collect::<Result<Vec<_>, _>>()?;
        let instances = tx
            .prepare(
                "SELECT id, grp, generation, addr, provider_id, launched_at_ms, lifecycle, permit_at_ms,
                        own_token
                 FROM instances ORDER BY id",
            )?
            .query_map([], instance_row)?
            .collect::<Result<Vec<_>, _>>()?;
        let counters = tx
            .prepare("SELECT name, value FROM counters")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let schedules = tx
            .prepare("SELECT body FROM schedules ORDER BY id")?
            .query_map([], |r| r.get::<_, String>(0))?
            .map(|text| from_json("schedule", &text?))
            .collect::<Result<Vec<_>, _>>()?;
        let last_event_seq: Option<u64> =
            tx.query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))?;
        Ok(Snapshot {
            revision,
            groups,
            plans,
            instances,
            counters,
            schedules,
            last_event_seq: last_event_seq.unwrap_or(0),
        })
    }

    fn revision(&self, number: u64) -> Result<Option<Revision>, StoreError> {
        self.reader()
            .query_row(
                &format!("SELECT {REVISION_COLUMNS} FROM revisions WHERE number = ?1"),
                [number],
                revision_row,
            )
            .optional()?
            .map(full_revision)
            .transpose()
    }

    fn revisions(&self) -> Result<Vec<RevisionSummary>, StoreError> {
        // The summaries only: the bodies (fleet file, parsed fleet) are never read here.
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT number, applied_at_ms, file, summary FROM revisions ORDER BY number",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok(RevisionSummary {
                number: row.get(0)?,
                applied_at_ms: row.get(1)?,
                file: row.get(2)?,
                summary: row.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn plan(&self, group: &str, generation: u64) -> Result<Option<Plan>, StoreError> {
        self.reader()
            .query_row(
                "SELECT plan FROM plans WHERE grp = ?1 AND generation = ?2",
                params![group, generation],
                |r| r.get::<_, String>(0),
            )
            .optional()?
            .map(|text| from_json("plan", &text))
            .transpose()
    }

    fn events(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let mut sql = String::from(
            "SELECT seq, at_ms, kind, grp, instance, message FROM events WHERE seq > ?",
        );
        let mut args: Vec<Value> = vec![Value::Integer(clamp_i64(filter.after_seq))];
        let mut and = |column: &str, value: &str| {
            sql.push_str(&format!(" AND {column} = ?"));
            args.push(Value::Text(value.to_string()));
        };
        if let Some(g) = &filter.group {
            and("grp", g);
        }
        if let Some(i) = &filter.instance {
            and("instance", i);
        }
        if let Some(k) = &filter.kind {
            and("kind", k.as_str());
        }
        if filter.since_ms > 0 {
            sql.push_str(" AND at_ms >= ?");
            args.push(Value::Integer(clamp_i64(filter.since_ms)));
        }
        if filter.newest && filter.limit > 0 {
            // The newest `limit`, oldest first.
            sql = format!("SELECT * FROM ({sql} ORDER BY seq DESC LIMIT ?) ORDER BY seq");
            args.push(Value::Integer(clamp_i64(filter.limit as u64)));
        } else {
            sql.push_str(" ORDER BY seq");
            if filter.limit > 0 {
                sql.push_str(" LIMIT ?");
                args.push(Value::Integer(clamp_i64(filter.limit as u64)));
            }
        }
        let conn = self.reader();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), event_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn prune_events(&self, keep_last: u64, before_ms: u64) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let newest: Option<u64> = tx.query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))?;
        let Some(newest) = newest else {
            return Ok(0);
        };
        let by_count = newest.saturating_sub(keep_last);
        let by_age: Option<u64> = tx.query_row(
            "SELECT MAX(seq) FROM events WHERE at_ms < ?1",
            params![clamp_i64(before_ms)],
            |r| r.get(0),
        )?;
        let cutoff = by_count.max(by_age.unwrap_or(0)).min(newest - 1);
        let n = tx.execute(
            "DELETE FROM events WHERE seq <= ?1",
            params![clamp_i64(cutoff)],
        )?;
        tx.commit()?;
        Ok(n as u64)
    }

    fn all_plans(&self) -> Result<Vec<Plan>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare("SELECT plan FROM plans ORDER BY grp, generation")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|text| from_json("plan", &text?)).collect()
    }

    fn keep_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR IGNORE INTO secrets (name, value) VALUES (?1, ?2)",
            rusqlite::params![name, candidate],
        )?;
        Ok(
            conn.query_row("SELECT value FROM secrets WHERE name = ?1", [name], |r| {
                r.get(0)
            })?,
        )
    }

    fn secrets(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare("SELECT name, value FROM secrets ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn tokens(&self) -> Result<Vec<crate::TokenRecord>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT id, name, scope, grp, hash, created_at_ms, revoked_at_ms FROM tokens ORDER BY id",
        )?;
        let rows = stmt.query_map([], token_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// `n` failures for batches whose shared transaction could not begin or commit.
fn failed_batch(n: usize, why: &str) -> Vec<Result<Committed, StoreError>> {
    (0..n)
        .map(|_| Err(StoreError::Group(why.to_string())))
        .collect()
}

fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
