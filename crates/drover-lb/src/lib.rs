//! drover-lb: the built-in L4 (TCP) load balancer, one [`Listener`] per service ingress.
//!
//! It knows nothing of the rest of drover: a listener takes its target set from a
//! [`tokio::sync::watch`] channel and reports per-target connection counts through
//! [`Listener::open_connections`] and [`Listener::stats`].
//!
//! Invariants:
//! - the target set is read at accept time, so a target removed by a `send` that has
//!   returned gets no new connection; its open connections are left to drain;
//! - only connection attempts are retried (each target at most once per client connection),
//!   never a connection that already carried bytes;
//! - the accept path takes no lock unless the target set changed.

mod config;
mod conn;
mod error;
mod listener;
mod select;
mod stats;

pub use config::{ListenerConfig, Policy, Target};
pub use error::LbError;
pub use listener::Listener;
pub use select::{select_target, Candidate};
pub use stats::{ListenerStats, TargetStats};
