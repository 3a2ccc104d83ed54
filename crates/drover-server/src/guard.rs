//! The API's holds on long-lived requests: how many follow streams and long-polls are open,
//! in all and per caller (token id), so that no one token can hold the server's tasks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Most follow streams (`GET /v1/events?follow=true`) one token may hold open at once.
pub const FOLLOWS_PER_CALLER: usize = 16;
/// Most long-polls (`/v1/agent/permit`, `/v1/lb/config`) one token may hold open at once; an
/// agent token serves a whole group (one permit poll per instance), so this is generous.
pub const POLLS_PER_CALLER: usize = 4096;

/// Open long-lived requests.
#[derive(Default)]
pub struct Guards {
    follows: AtomicUsize,
    polls: AtomicUsize,
    per_caller: Mutex<HashMap<(Kind, String), usize>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Follow,
    Poll,
}

/// Held while one long-lived request is open; released on drop.
pub struct Held {
    guards: Arc<Guards>,
    kind: Kind,
    caller: String,
}

impl Guards {
    /// Take a hold for `caller`, or None when it holds its limit already.
    pub fn hold(self: &Arc<Self>, kind: Kind, caller: &str) -> Option<Held> {
        let limit = match kind {
            Kind::Follow => FOLLOWS_PER_CALLER,
            Kind::Poll => POLLS_PER_CALLER,
        };
        let mut per = self.per_caller.lock().unwrap_or_else(|e| e.into_inner());
        let n = per.entry((kind, caller.to_string())).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        self.counter(kind).fetch_add(1, Ordering::Relaxed);
        Some(Held {
            guards: self.clone(),
            kind,
            caller: caller.to_string(),
        })
    }

    fn counter(&self, kind: Kind) -> &AtomicUsize {
        match kind {
            Kind::Follow => &self.follows,
            Kind::Poll => &self.polls,
        }
    }

    /// Follow streams open now (each is one task).
    pub fn follows(&self) -> usize {
        self.follows.load(Ordering::Relaxed)
    }

    /// Long-polls open now.
    pub fn polls(&self) -> usize {
        self.polls.load(Ordering::Relaxed)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.guards
            .counter(self.kind)
            .fetch_sub(1, Ordering::Relaxed);
        let mut per = self
            .guards
            .per_caller
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = (self.kind, std::mem::take(&mut self.caller));
        if let Some(n) = per.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                per.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_holds_at_most_its_limit_and_drops_give_back() {
        let g = Arc::new(Guards::default());
        let held: Vec<Held> = (0..FOLLOWS_PER_CALLER)
            .map(|_| g.hold(Kind::Follow, "t1").unwrap())
            .collect();
        assert!(g.hold(Kind::Follow, "t1").is_none());
        // Another caller, and another kind, are not affected.
        let other = g.hold(Kind::Follow, "t2").unwrap();
        let poll = g.hold(Kind::Poll, "t1").unwrap();
        assert_eq!((g.follows(), g.polls()), (FOLLOWS_PER_CALLER + 1, 1));
        drop(held);
        drop(other);
        drop(poll);
        assert_eq!((g.follows(), g.polls()), (0, 0));
        assert!(g.per_caller.lock().unwrap().is_empty());
        assert!(g.hold(Kind::Follow, "t1").is_some());
    }
}
