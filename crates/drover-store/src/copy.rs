//! Moving a fleet from one store to another (`drover store copy`): every revision, plan,
//! group, instance, counter, event, token and control-plane secret, with their numbers and
//! times; then a
//! comparison of the two stores, record by record.

use std::fmt;

use drover_model::NewEvent;

use crate::{Committed, EventFilter, Store, StoreError, Write};

/// Commits handed to one `commit_many` (the store packs them into as few transactions as
/// its limits allow).
const GROUP: usize = 256;
/// Events read per page.
const EVENT_PAGE: usize = 2000;

/// How much a store holds (what a copy moved, or what a comparison found on both sides).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub revisions: usize,
    pub plans: usize,
    pub groups: usize,
    pub instances: usize,
    pub counters: usize,
    pub events: usize,
    pub tokens: usize,
    /// The control plane's own secrets (the agent-token key, the API's CA).
    pub secrets: usize,
}

impl Counts {
    pub fn is_empty(&self) -> bool {
        *self == Counts::default()
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} revisions, {} plans, {} groups, {} instances, {} counters, {} events, {} tokens, {} secrets",
            self.revisions,
            self.plans,
            self.groups,
            self.instances,
            self.counters,
            self.events,
            self.tokens,
            self.secrets
        )
    }
}

/// What a store holds, counted.
pub fn counts(store: &dyn Store) -> Result<Counts, StoreError> {
    let snap = store.snapshot()?;
    Ok(Counts {
        revisions: store.revisions()?.len(),
        plans: store.all_plans()?.len(),
        groups: snap.groups.len(),
        instances: snap.instances.len(),
        counters: snap.counters.len(),
        events: count_events(store)?,
        tokens: store.tokens()?.len(),
        secrets: store.secrets()?.len(),
    })
}

fn count_events(store: &dyn Store) -> Result<usize, StoreError> {
    let mut n = 0;
    let mut after = 0;
    loop {
        let page = store.events(&EventFilter {
            after_seq: after,
            limit: EVENT_PAGE,
            ..Default::default()
        })?;
        n += page.len();
        match page.last() {
            Some(e) if page.len() == EVENT_PAGE => after = e.seq,
            _ => return Ok(n),
        }
    }
}

fn commit_all(
    to: &dyn Store,
    batches: Vec<(Vec<Write>, u64)>,
) -> Result<Vec<Committed>, StoreError> {
    let mut out = Vec::with_capacity(batches.len());
    let mut it = batches.into_iter().peekable();
    while it.peek().is_some() {
        let group: Vec<_> = it.by_ref().take(GROUP).collect();
        for r in to.commit_many(group) {
            out.push(r?);
        }
    }
    Ok(out)
}

fn mismatch(what: String) -> StoreError {
    StoreError::Config(format!(
        "copy: {what}; the destination is incomplete, copy again with --force"
    ))
}

/// Copy everything `from` holds into `to`, which must be empty. Revision numbers and event
/// seqs come out the same because both are given in order, without gaps, from 1.
pub fn copy(from: &dyn Store, to: &dyn Store) -> Result<Counts, StoreError> {
    if !counts(to)?.is_empty() {
        return Err(StoreError::Config(
            "the destination store is not empty (use --force to replace what it holds)".into(),
        ));
    }
    let mut done = Counts::default();
    // Revisions, each at its own time.
    let summaries = from.revisions()?;
    let mut batches = Vec::new();
    for (i, s) in summaries.iter().enumerate() {
        if s.number != i as u64 + 1 {
            return Err(StoreError::Config(format!(
                "copy: the source's revisions are not numbered 1, 2, 3… (revision {} at position {})",
                s.number,
                i + 1
            )));
        }
        let Some(r) = from.revision(s.number)? else {
            return Err(mismatch(format!(
                "revision {} vanished from the source",
                s.number
            )));
        };
        batches.push((
            vec![Write::Revision {
                file: r.file,
                summary: r.summary,
                toml: r.toml,
                fleet: r.fleet,
                last_applied: r.last_applied,
            }],
            r.applied_at_ms,
        ));
        if batches.len() == GROUP {
            check_revisions(commit_all(to, std::mem::take(&mut batches))?, &mut done)?;
        }
    }
    check_revisions(commit_all(to, batches)?, &mut done)?;
    // Plans of every generation, then the current state.
    let plans = from.all_plans()?;
    done.plans = plans.len();
    commit_all(
        to,
        plans
            .into_iter()
            .map(|p| (vec![Write::Plan(p)], 0))
            .collect(),
    )?;
    let snap = from.snapshot()?;
    done.groups = snap.groups.len();
    done.instances = snap.instances.len();
    done.counters = snap.counters.len();
    let mut state: Vec<(Vec<Write>, u64)> = Vec::new();
    state.extend(snap.groups.into_iter().map(|g| (vec![Write::Group(g)], 0)));
    state.extend(
        snap.instances
            .into_iter()
            .map(|i| (vec![Write::Instance(i)], 0)),
    );
    state.extend(
        snap.counters
            .into_iter()
            .map(|(name, value)| (vec![Write::Counter { name, value }], 0)),
    );
    state.extend(
        snap.schedules
            .into_iter()
            .map(|o| (vec![Write::Schedule(o)], 0)),
    );
    commit_all(to, state)?;
    // Events, each at its own time.
    let mut after = 0;
    loop {
        let page = from.events(&EventFilter {
            after_seq: after,
            limit: EVENT_PAGE,
            ..Default::default()
        })?;
        let Some(last) = page.last().map(|e| e.seq) else {
            break;
        };
        let seqs: Vec<u64> = page.iter().map(|e| e.seq).collect();
        let batches = page
            .into_iter()
            .map(|e| {
                (
                    vec![Write::Event(NewEvent {
                        kind: e.kind,
                        group: e.group,
                        instance: e.instance,
                        message: e.message,
                    })],
                    e.at_ms,
                )
            })
            .collect();
        for (c, want) in commit_all(to, batches)?.iter().zip(seqs) {
            let got = c.events.first().map_or(0, |e| e.seq);
            if got != want {
                return Err(mismatch(format!(
                    "source event {want} became event {got} (the source's events are not numbered 1, 2, 3…)"
                )));
            }
            done.events += 1;
        }
        after = last;
    }
    // Tokens (their hashes), revoked ones revoked at the same time.
    let tokens = from.tokens()?;
    done.tokens = tokens.len();
    let batches = tokens
        .into_iter()
        .map(|mut t| {
            let revoked = t.info.revoked_at_ms.take();
            let id = t.info.id.clone();
            let mut w = vec![Write::Token(t)];
            if let Some(at_ms) = revoked {
                w.push(Write::RevokeToken { id, at_ms });
            }
            (w, 0)
        })
        .collect();
    commit_all(to, batches)?;
    // The control plane's secrets: the same agent tokens, the same CA, on the new store.
    for (name, value) in from.secrets()? {
        if to.keep_secret(&name, &value)? != value {
            return Err(mismatch(format!(
                "the destination already holds another secret {name}"
            )));
        }
        done.secrets += 1;
    }
    Ok(done)
}

fn check_revisions(committed: Vec<Committed>, done: &mut Counts) -> Result<(), StoreError> {
    for c in committed {
        let want = done.revisions as u64 + 1;
        if c.revision != Some(want) {
            return Err(mismatch(format!(
                "source revision {want} became revision {:?}",
                c.revision
            )));
        }
        done.revisions += 1;
    }
    Ok(())
}

/// Compare two stores record by record. Returns what both hold (when they agree) or the
/// differences found (at most a few per kind).
pub fn compare(a: &dyn Store, b: &dyn Store) -> Result<Result<Counts, Vec<String>>, StoreError> {
    let mut diffs = Vec::new();
    let (sa, sb) = (a.snapshot()?, b.snapshot()?);
    let (ra, rb) = (a.revisions()?, b.revisions()?);
    if ra != rb {
        diffs.push(format!(
            "revisions differ: {} against {}",
            ra.len(),
            rb.len()
        ));
    } else {
        for s in &ra {
            if a.revision(s.number)? != b.revision(s.number)? {
                diffs.push(format!("revision {} differs", s.number));
                break;
            }
        }
    }
    if sa.revision != sb.revision {
        diffs.push("the latest revision differs".into());
    }
    let (pa, pb) = (a.all_plans()?, b.all_plans()?);
    if pa != pb {
        diffs.push(format!("plans differ: {} against {}", pa.len(), pb.len()));
    }
    if sa.groups != sb.groups {
        diffs.push(format!(
            "groups differ: {} against {}",
            sa.groups.len(),
            sb.groups.len()
        ));
    }
    if sa.plans != sb.plans {
        diffs.push("current plans differ".into());
    }
    if sa.instances != sb.instances {
        diffs.push(format!(
            "instances differ: {} against {}",
            sa.instances.len(),
            sb.instances.len()
        ));
    }
    if sa.schedules != sb.schedules {
        diffs.push(format!(
            "one-off schedules differ: {} against {}",
            sa.schedules.len(),
            sb.schedules.len()
        ));
    }
    if sa.counters != sb.counters {
        diffs.push(format!(
            "counters differ: {:?} against {:?}",
            sa.counters, sb.counters
        ));
    }
    if sa.last_event_seq != sb.last_event_seq {
        diffs.push(format!(
            "the last event differs: {} against {}",
            sa.last_event_seq, sb.last_event_seq
        ));
    }
    let mut events = 0;
    let mut after = 0;
    loop {
        let f = EventFilter {
            after_seq: after,
            limit: EVENT_PAGE,
            ..Default::default()
        };
        let (ea, eb) = (a.events(&f)?, b.events(&f)?);
        if ea != eb {
            let at = ea
                .iter()
                .zip(&eb)
                .find(|(x, y)| x != y)
                .map_or(after + ea.len().min(eb.len()) as u64 + 1, |(x, _)| x.seq);
            diffs.push(format!("events differ from seq {at}"));
            break;
        }
        events += ea.len();
        match ea.last() {
            Some(e) if ea.len() == EVENT_PAGE => after = e.seq,
            _ => break,
        }
    }
    let (ta, tb) = (a.tokens()?, b.tokens()?);
    if ta != tb {
        diffs.push(format!("tokens differ: {} against {}", ta.len(), tb.len()));
    }
    let (xa, xb) = (a.secrets()?, b.secrets()?);
    if xa != xb {
        let names = |x: &[(String, Vec<u8>)]| {
            x.iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        diffs.push(format!(
            "secrets differ: [{}] against [{}]{}",
            names(&xa),
            names(&xb),
            if names(&xa) == names(&xb) {
                " (same names, other values)"
            } else {
                ""
            }
        ));
    }
    if !diffs.is_empty() {
        return Ok(Err(diffs));
    }
    Ok(Ok(Counts {
        revisions: ra.len(),
        plans: pa.len(),
        groups: sa.groups.len(),
        instances: sa.instances.len(),
        counters: sa.counters.len(),
        events,
        tokens: ta.len(),
        secrets: xa.len(),
    }))
}
