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
    /// Active health checks of each target in rotation; `None` (the default): none, every
    /// target is taken as up and only connect failures steer traffic away.
    pub health: Option<HealthCheckConfig>,
}

/// What one health check does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum HealthCheckKind {
    /// Passes when a TCP connection to the target's address is accepted within the timeout.
    #[default]
    Tcp,
    /// Passes when `GET <path> HTTP/1.0` to the target's address is answered with a 2xx
    /// or 3xx status line within the timeout (as HAProxy's `option httpchk`).
    Http {
        /// Starts with `/`, e.g. `/healthz`.
        path: String,
    },
}

/// Active health checks, with HAProxy's `inter`, `timeout check`, `rise` and `fall`.
///
/// A target starts *up* when it enters the target set, since it comes from a control plane
/// that already found it healthy; it goes *down* after `fall` consecutive failed checks and
/// back *up* after `rise` consecutive passed ones (HAProxy's `init-state fully-up`; its
/// default `up` would take a new server down at the first failure). A down target gets no
/// new connection, as if removed; its open connections continue. The first check runs as
/// soon as the target is added. With every target down, new clients are closed at once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheckConfig {
    pub kind: HealthCheckKind,
    /// Time between the starts of two checks of one target.
    pub interval: Duration,
    /// Longest a check may take (connect, and for http the status line); at most
    /// `interval`.
    pub timeout: Duration,
    /// Consecutive passed checks that bring a down target back up.
    pub rise: u32,
    /// Consecutive failed checks that take an up target down.
    pub fall: u32,
}

impl Default for HealthCheckConfig {
    /// HAProxy's defaults: a check every 2 s, rise 2, fall 3; the timeout is 1 s.
    fn default() -> Self {
        HealthCheckConfig {
            kind: HealthCheckKind::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

impl HealthCheckConfig {
    fn validate(&self) -> Result<(), String> {
        if self.interval.is_zero() {
            return Err("health.interval is 0: set it to a positive duration, e.g. 2s".into());
        }
        if self.timeout.is_zero() || self.timeout > self.interval {
            return Err(format!(
                "health.timeout is {:?}: set it above 0 and at most health.interval ({:?})",
                self.timeout, self.interval
            ));
        }
        if self.rise == 0 || self.fall == 0 {
            return Err(format!(
                "health.rise is {} and health.fall is {}: set both to at least 1",
                self.rise, self.fall
            ));
        }
        if let HealthCheckKind::Http { path } = &self.kind {
            let printable = path.bytes().all(|b| b.is_ascii_graphic());
            if !path.starts_with('/') || !printable {
                return Err(format!(
                    "health path {path:?} must start with / and hold no spaces or control \
                     characters, e.g. /healthz"
                ));
            }
        }
        Ok(())
    }
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
            health: None,
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
        if let Some(health) = &self.health {
            health.validate()?;
        }
        Ok(())
    }
}
