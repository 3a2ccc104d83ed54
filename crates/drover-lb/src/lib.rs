//! drover-lb: the built-in L4 (TCP) load balancer, one [`Listener`] per service ingress.
//!
//! It knows nothing of the rest of drover: a listener takes its target set from a
//! [`tokio::sync::watch`] channel, optionally health-checks each target itself
//! ([`HealthCheckConfig`]), and reports per-target connection counts through
//! [`Listener::open_connections`] and [`Listener::stats`] ([`prometheus`] renders them).
//! How it works, its settings and what it measures: `docs/lb.md`.
//!
//! Invariants:
//! - the target set is read at accept time, so a target removed by a `send` that has
//!   returned gets no new connection; its open connections are left to drain;
//! - a target down by its health checks is skipped exactly like a removed one;
//! - only connection attempts are retried (each target at most once per client connection),
//!   never a connection that already carried bytes;
//! - the accept and copy paths take no lock of this crate's (the target registry is locked
//!   only when the target set changes and by stats queries) and allocate nothing beyond
//!   tokio's task and socket registrations, unless a writer pushes back.

mod config;
mod conn;
mod error;
pub mod handoff;
mod health;
mod listener;
mod metrics;
mod select;
mod signal;
mod stats;

pub use config::{HealthCheckConfig, HealthCheckKind, ListenerConfig, Policy, Target};
pub use error::LbError;
pub use listener::Listener;
pub use metrics::prometheus;
pub use select::{select_target, Candidate};
pub use stats::{ListenerStats, TargetStats};
