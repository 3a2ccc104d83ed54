//! Counters of a listener and of each target, and their serializable snapshot.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

use serde::Serialize;

use crate::config::Target;

/// A point-in-time copy of a listener's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetStats {
    pub id: String,
    pub addr: SocketAddr,
    /// Proxied connections open now.
    pub active: usize,
    /// Proxied connections established since the target was first seen.
    pub total: u64,
    pub connect_failures: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// In the current target set; `false` while a removed target drains.
    pub in_rotation: bool,
    /// A recent connect failure keeps it out of selection for a short while.
    pub penalized: bool,
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
        }
    }

    pub(crate) fn is_penalized(&self, now_ms: u64) -> bool {
        self.penalized_until_ms.load(Relaxed) > now_ms
    }

    pub(crate) fn snapshot(&self, now_ms: u64) -> TargetStats {
        TargetStats {
            id: self.target.id.clone(),
            addr: self.target.addr,
            active: self.active.load(Relaxed),
            total: self.total.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            in_rotation: self.in_rotation.load(Relaxed),
            penalized: self.is_penalized(now_ms),
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
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
}
