//! Errors returned by the load balancer.

use std::net::SocketAddr;

/// What can go wrong when starting a listener.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// The listen address could not be bound (in use, not local, no permission).
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The bound socket did not report its local address.
    #[error("listener {name}: cannot read local address: {source}")]
    LocalAddr {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// The configuration cannot work; the message names the field and the fix.
    #[error("listener {name}: invalid configuration: {reason}")]
    InvalidConfig { name: String, reason: String },
}
