//! Counters of a listener and of each target, and their serializable snapshot.

use std::net::SocketAddr;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicUsize,
    Ordering::{Relaxed, SeqCst},
};

use serde::{Deserialize, Serialize};

use crate::config::Target;
use crate::health::Failure;

/// A point-in-time copy of a listener's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStats {
    pub name: String,
    pub local_addr: SocketAddr,
    /// Client sockets accepted, including those refused over the limit.
    pub accepted: u64,
    /// Client connections open now (connecting or proxying).
    pub active: usize,
    /// Accepted sockets closed at once because `max_connections` were open.
    pub refused_over_limit: u64,
    /// Failed connection attempts to targets (refused, unreachable or timed out).
    pub connect_failures: u64,
    /// Client connections closed because no target was available or all attempts failed.
    pub unrouted: u64,
    /// Bytes read from clients (and sent on to targets).
    pub bytes_in: u64,
    /// Bytes read from targets (and sent on to clients).
    pub bytes_out: u64,
    /// Targets in rotation, and removed targets still draining, sorted by id.
    pub targets: Vec<TargetStats>,
}

/// A point-in-time copy of one target's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStats {
    pub id: String,
    pub addr: SocketAddr,
    /// Proxied connections open now.
    pub active: usize,
    /// Connection attempts to it under way. A drain waits for these too: each may still
    /// become a connection.
    #[serde(default)]
    pub connecting: usize,
    /// Proxied connections established since the target was first seen.
    pub total: u64,
    pub connect_failures: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// In the current target set; `false` while a removed target drains.
    pub in_rotation: bool,
    /// A recent connect failure keeps it out of selection for a short while.
    pub penalized: bool,
    /// Health: `false` once it failed `fall` consecutive active checks, until it passes
    /// `rise`; always `true` without health checks. A down target gets no new connection.
    pub up: bool,
    /// Active health checks that failed since the target was first seen.
    pub checks_failed: u64,
    /// When `up` last changed, in milliseconds since the Unix epoch; `None` if never.
    pub last_change_unix_ms: Option<u64>,
    /// Why the latest health check failed (e.g. `"connect failed"`, `"HTTP status 500"`);
    /// `None` when it passed or none ran.
    pub last_check_error: Option<String>,
}

/// Live state of one target, shared by the accept loop and its connections.
#[derive(Debug)]
pub(crate) struct TargetEntry {
    pub(crate) target: Target,
    pub(crate) in_rotation: AtomicBool,
    /// Established proxied connections.
    pub(crate) active: AtomicUsize,
    /// Connection attempts under way; counted by least-connections selection.
    pub(crate) pending: AtomicUsize,
    pub(crate) total: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    /// Milliseconds on the listener's clock before which the target is penalized.
    pub(crate) penalized_until_ms: AtomicU64,
    /// Health state; written only by the target's checker.
    pub(crate) up: AtomicBool,
    pub(crate) checks_failed: AtomicU64,
    /// 0: never changed.
    pub(crate) last_change_unix_ms: AtomicU64,
    /// A [`Failure`] code; 0 when the latest check passed.
    pub(crate) last_check_error: AtomicU32,
}

impl TargetEntry {
    pub(crate) fn new(target: Target) -> Self {
        TargetEntry {
            target,
            in_rotation: AtomicBool::new(true),
            active: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            penalized_until_ms: AtomicU64::new(0),
            up: AtomicBool::new(true),
            checks_failed: AtomicU64::new(0),
            last_change_unix_ms: AtomicU64::new(0),
            last_check_error: AtomicU32::new(0),
        }
    }

    /// Established connections and attempts under way: every connection that may still
    /// reach the target. `active` is raised before `pending` is lowered, so a connection
    /// is always in one of them, and reading `pending` first never misses it.
    pub(crate) fn open(&self) -> usize {
        let (pending, active) = self.counts();
        pending + active
    }

    /// (`pending`, `active`), read in that order (see [`Self::open`]).
    fn counts(&self) -> (usize, usize) {
        let pending = self.pending.load(SeqCst);
        (pending, self.active.load(SeqCst))
    }

    pub(crate) fn is_penalized(&self, now_ms: u64) -> bool {
        self.penalized_until_ms.load(Relaxed) > now_ms
    }

    pub(crate) fn snapshot(&self, now_ms: u64) -> TargetStats {
        let (connecting, active) = self.counts();
        TargetStats {
            id: self.target.id.clone(),
            addr: self.target.addr,
            active,
            connecting,
            total: self.total.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            in_rotation: self.in_rotation.load(Relaxed),
            penalized: self.is_penalized(now_ms),
            up: self.up.load(Relaxed),
            checks_failed: self.checks_failed.load(Relaxed),
            last_change_unix_ms: Some(self.last_change_unix_ms.load(Relaxed)).filter(|&ms| ms != 0),
            last_check_error: Failure::describe(self.last_check_error.load(Relaxed)),
        }
    }
}

/// Listener-wide counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) accepted: AtomicU64,
    pub(crate) active: AtomicUsize,
    pub(crate) refused_over_limit: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) unrouted: AtomicU64,
    /// Bytes of targets no longer listed (see `Shared::prune`); the listed ones count
    /// their own.
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
}
