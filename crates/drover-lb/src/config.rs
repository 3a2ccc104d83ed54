//! Listener configuration, targets and the balancing policy.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One backend the listener may forward to: an instance's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Target {
    /// The instance id; the key for [`crate::Listener::open_connections`].
    pub id: String,
    pub addr: SocketAddr,
}

impl Target {
    pub fn new(id: impl Into<String>, addr: SocketAddr) -> Self {
        Target {
            id: id.into(),
            addr,
        }
    }
}

/// How a target is chosen for a new client connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Each new connection goes to the next target in turn.
    #[default]
    RoundRobin,
    /// The target with the fewest open connections; ties are broken round-robin.
    LeastConnections,
}

/// Settings of one listener. Build with `..Default::default()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Used in logs and stats, e.g. `"web/local"`.
    pub name: String,
    /// Where to listen; port 0 picks a free port (see [`crate::Listener::local_addr`]).
    pub listen: SocketAddr,
    /// Longest wait for a target to accept a connection before trying the next one.
    pub connect_timeout: Duration,
    /// A proxied connection with no bytes in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Open client connections allowed at once; sockets accepted beyond this are closed
    /// at once and counted in `refused_over_limit`.
    pub max_connections: usize,
    pub policy: Policy,
    /// How long [`crate::Listener::shutdown`] lets open connections finish before
    /// aborting them.
    pub shutdown_grace: Duration,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            name: "lb".to_string(),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5 * 60),
            max_connections: 10_000,
            policy: Policy::RoundRobin,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl ListenerConfig {
    /// Rejects settings under which the listener could never carry a connection.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("max_connections is 0: set it to at least 1".to_string());
        }
        if self.connect_timeout.is_zero() {
            return Err("connect_timeout is 0: set it to a positive duration, e.g. 2s".to_string());
        }
        if self.idle_timeout.is_zero() {
            return Err("idle_timeout is 0: set it to a positive duration, e.g. 5m".to_string());
        }
        Ok(())
    }
}
