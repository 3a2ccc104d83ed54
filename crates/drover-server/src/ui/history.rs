//! What the dashboard remembers that the store does not: each group's desired and healthy
//! counts and autoscaling metric over the last hour (sampled every [`SAMPLE_EVERY`], lost on
//! restart), and the newest events, for the fleet page and `drover up`'s screen.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_model::{Event, EventKind};
use drover_store::EventFilter;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::engine::{now_ms, Engine};
use crate::ServerError;

/// How often each group's counts are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// How far back the samples go.
pub const KEEP_MS: u64 = 3600 * 1000;
/// Events kept for the fleet page and `drover up`.
pub const RECENT: usize = 50;

/// One group at one time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    pub at_ms: u64,
    pub desired: u32,
    pub healthy: u32,
    /// The autoscaling metric's mean and target (groups that autoscale).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
}

/// Rollout events kept per group (canary numbers and verdicts among them).
pub const ROLLOUT_EVENTS: usize = 30;

#[derive(Default)]
pub struct History {
    samples: Mutex<BTreeMap<String, VecDeque<Sample>>>,
    recent: Mutex<(u64, VecDeque<Event>)>,
    rollouts: Mutex<BTreeMap<String, VecDeque<Event>>>,
}

impl History {
    /// A group's samples, oldest first.
    pub fn of(&self, group: &str) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(group)
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The newest event's seq and the newest events, oldest first.
    pub fn recent(&self) -> (u64, Vec<Event>) {
        let r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        (r.0, r.1.iter().cloned().collect())
    }

    fn push_event(&self, ev: Event) {
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if ev.seq <= r.0 {
            return;
        }
        if let (EventKind::Rollout, Some(g)) = (ev.kind, &ev.group) {
            self.push_rollout(g.clone(), ev.clone());
        }
        r.0 = ev.seq;
        r.1.push_back(ev);
        while r.1.len() > RECENT {
            r.1.pop_front();
        }
    }

    /// Sample every group now.
    pub fn sample(&self, e: &Engine) {
        let now = now_ms();
        // Group counts only: no instance list is built for a sample.
        let status = crate::status::fleet_status(e, &crate::state::Listing::None);
        let mut all = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|g, _| status.groups.iter().any(|s| &s.group == g));
        for g in &status.groups {
            let d = all.entry(g.group.clone()).or_default();
            d.push_back(Sample {
                at_ms: now,
                desired: g.desired,
                healthy: g.healthy,
                observed: g.autoscale.as_ref().and_then(|a| a.observed),
                target: g.autoscale.as_ref().map(|a| a.target),
            });
            while d.front().is_some_and(|s| s.at_ms + KEEP_MS < now) {
                d.pop_front();
            }
        }
    }

    fn push_rollout(&self, group: String, ev: Event) {
        let mut all = self.rollouts.lock().unwrap_or_else(|e| e.into_inner());
        let d = all.entry(group).or_default();
        if d.back().is_some_and(|last| last.seq >= ev.seq) {
            return;
        }
        d.push_back(ev);
        while d.len() > ROLLOUT_EVENTS {
            d.pop_front();
        }
    }

    /// A group's rollout events (canary numbers and verdicts among them), oldest first.
    pub fn rollout_events(&self, group: &str) -> Vec<Event> {
        self.rollouts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(group)
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Keep the history until `stop`: the newest events as they are published, and a sample of
/// every group each [`SAMPLE_EVERY`].
pub async fn run(e: Arc<Engine>, ui: Arc<super::Ui>, stop: CancellationToken) {
    let mut rx = e.events_tx.subscribe();
    // The newest stored events first (published ones after that are deduplicated by seq).
    let (e2, ui2) = (e.clone(), ui.clone());
    let backfill = tokio::task::spawn_blocking(move || -> Result<(), ServerError> {
        let sc = drover_model::secret::Scrubber::for_fleet(
            e2.state().revision.as_ref().map(|r| &r.fleet),
        );
        // Each group's latest rollout events, from the newest 5,000 of them.
        let rollouts = e2.store.events(&EventFilter {
            limit: 5_000,
            kind: Some(EventKind::Rollout),
            newest: true,
            ..Default::default()
        })?;
        for mut ev in rollouts {
            if let Some(g) = ev.group.clone() {
                sc.scrub_in_place(&mut ev.message);
                ui2.history.push_rollout(g, ev);
            }
        }
        let evs = e2.store.events(&EventFilter {
            limit: RECENT,
            newest: true,
            ..Default::default()
        })?;
        for mut ev in evs {
            sc.scrub_in_place(&mut ev.message);
            ui2.history.push_event(ev);
        }
        Ok(())
    });
    match backfill.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!("dashboard: cannot read the newest events: {err}"),
        Err(err) => tracing::warn!("dashboard: reading the newest events: {err}"),
    }
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Between ticks, a change of a desired count is sampled within a second (not every
    // event: a status of the whole fleet costs O(instances)).
    let mut soon = tokio::time::interval(Duration::from_secs(1));
    let mut changed = false;
    // The scrubber of the current revision, made again only when the revision changes.
    let mut scrubber: Option<(Option<u64>, drover_model::secret::Scrubber)> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                ui.history.sample(&e);
                changed = false;
            }
            _ = soon.tick() => {
                if changed {
                    ui.history.sample(&e);
                    changed = false;
                }
            }
            got = rx.recv() => match got {
                Ok(mut ev) => {
                    changed |= ev.kind == EventKind::Scaled;
                    let current = e.state().revision.as_ref().map(|r| r.number);
                    if scrubber.as_ref().is_none_or(|(n, _)| *n != current) {
                        let sc = drover_model::secret::Scrubber::for_fleet(
                            e.state().revision.as_ref().map(|r| &r.fleet),
                        );
                        scrubber = Some((current, sc));
                    }
                    if let Some((_, sc)) = &scrubber {
                        sc.scrub_in_place(&mut ev.message);
                    }
                    ui.history.push_event(ev);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            },
        }
    }
}
