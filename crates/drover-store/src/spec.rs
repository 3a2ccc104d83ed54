//! Which store to open: `sqlite:PATH` or `etcd://HOST:PORT,...[/PREFIX]`, as given to
//! `drover server --store` and `drover store copy`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::{SqliteStore, Store, StoreError};

/// What `--store` accepts, for error messages.
pub const STORE_FORMS: &str = "sqlite:PATH, or etcd://HOST:PORT[,HOST:PORT...][/PREFIX] \
    (optionally etcd://USER:PASSWORD@HOST:PORT,... and ?timeout_ms=N&max_txn_ops=N&max_request_bytes=N)";

/// The key prefix of an etcd store whose URL names none.
pub const DEFAULT_ETCD_PREFIX: &str = "/drover/default/";

/// A store to open.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// The embedded SQLite file.
    Sqlite(PathBuf),
    /// An etcd v3 cluster.
    Etcd(EtcdConfig),
}

/// How to reach an etcd cluster, and where drover's keys live in it.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `host:port` of each member's client URL.
    pub endpoints: Vec<String>,
    /// Every key of this store starts with it; starts and ends with `/`.
    pub prefix: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// TLS: the CA that signed the members' certificates (TLS is on when this is set).
    pub ca: Option<PathBuf>,
    /// TLS client certificate and key (PEM), for members run with `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// How long one request to etcd may take before it fails (and with it the operation).
    pub timeout: Duration,
    /// etcd's `--max-txn-ops` (128 by default): a group commit is split to fit.
    pub max_txn_ops: usize,
    /// etcd's `--max-request-bytes` (1.5 MiB by default).
    pub max_request_bytes: usize,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: DEFAULT_ETCD_PREFIX.to_string(),
            user: None,
            password: None,
            ca: None,
            cert: None,
            key: None,
            timeout: Duration::from_secs(5),
            max_txn_ops: 128,
            max_request_bytes: 1536 * 1024,
        }
    }

    /// The same cluster under another key prefix.
    pub fn with_prefix(mut self, prefix: &str) -> EtcdConfig {
        self.prefix = normalize_prefix(prefix);
        self
    }

    /// Whether requests go over TLS.
    pub fn tls(&self) -> bool {
        self.ca.is_some() || self.cert.is_some()
    }

    /// The endpoints as one string, for messages.
    pub fn endpoints_display(&self) -> String {
        let scheme = if self.tls() { "https://" } else { "" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}{e}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl fmt::Debug for EtcdConfig {
    // Never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("timeout", &self.timeout)
            .field("max_txn_ops", &self.max_txn_ops)
            .field("max_request_bytes", &self.max_request_bytes)
            .finish()
    }
}

impl fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
            StoreSpec::Etcd(c) => f.debug_tuple("Etcd").field(c).finish(),
        }
    }
}

/// `sqlite:PATH` or `etcd://HOSTS/PREFIX` (with the user, never the password).
impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            StoreSpec::Etcd(c) => {
                write!(f, "etcd://")?;
                if let Some(u) = &c.user {
                    write!(f, "{u}@")?;
                }
                write!(
                    f,
                    "{}{}",
                    c.endpoints.join(","),
                    c.prefix.trim_end_matches('/')
                )
            }
        }
    }
}

fn bad(value: &str, why: &str) -> StoreError {
    StoreError::Config(format!(
        "invalid store {value:?}: {why}; expected {STORE_FORMS}"
    ))
}

fn normalize_prefix(p: &str) -> String {
    let p = p.trim_matches('/');
    if p.is_empty() {
        "/".to_string()
    } else {
        format!("/{p}/")
    }
}

impl StoreSpec {
    /// Parse a `--store` value.
    pub fn parse(value: &str) -> Result<StoreSpec, StoreError> {
        if let Some(path) = value.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(bad(value, "sqlite: needs the path of the database file"));
            }
            return Ok(StoreSpec::Sqlite(PathBuf::from(path)));
        }
        let Some(rest) = value.strip_prefix("etcd://") else {
            return Err(bad(value, "unknown kind of store"));
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (userinfo, hosts) = match hosts.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, hosts),
        };
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let h = h.trim();
            if h.is_empty() {
                return Err(bad(value, "an empty etcd endpoint"));
            }
            let Some((host, port)) = h.rsplit_once(':') else {
                return Err(bad(value, &format!("etcd endpoint {h:?} has no :PORT")));
            };
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad(value, &format!("etcd endpoint {h:?} is not HOST:PORT")));
            }
            endpoints.push(h.to_string());
        }
        let mut cfg = EtcdConfig::new(endpoints);
        if !prefix.trim_matches('/').is_empty() {
            cfg.prefix = normalize_prefix(prefix);
        }
        if let Some(u) = userinfo {
            let (user, password) = match u.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (u, None),
            };
            if user.is_empty() {
                return Err(bad(value, "an empty etcd user name"));
            }
            cfg.user = Some(percent_decode(user));
            cfg.password = password.map(percent_decode);
        }
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let n: u64 = v
                .parse()
                .map_err(|_| bad(value, &format!("option {k}={v:?} needs a positive number")))?;
            if n == 0 {
                return Err(bad(value, &format!("option {k} must be more than 0")));
            }
            match k {
                "timeout_ms" => cfg.timeout = Duration::from_millis(n),
                "max_txn_ops" if n >= 2 => cfg.max_txn_ops = n as usize,
                "max_request_bytes" => cfg.max_request_bytes = n as usize,
                _ => {
                    return Err(bad(
                        value,
                        &format!(
                            "unknown option {k:?} (known: timeout_ms, max_txn_ops (at least 2), max_request_bytes)"
                        ),
                    ))
                }
            }
        }
        Ok(StoreSpec::Etcd(cfg))
    }

    /// An etcd store (several servers may share it; they elect a leader).
    pub fn is_etcd(&self) -> bool {
        matches!(self, StoreSpec::Etcd(_))
    }

    /// Open the store this names.
    pub fn open(&self) -> Result<Box<dyn Store>, StoreError> {
        match self {
            StoreSpec::Sqlite(path) => Ok(Box::new(SqliteStore::open(path)?)),
            #[cfg(feature = "etcd")]
            StoreSpec::Etcd(cfg) => Ok(Box::new(crate::EtcdStore::open(cfg)?)),
            #[cfg(not(feature = "etcd"))]
            StoreSpec::Etcd(_) => Err(StoreError::Config(
                "this drover was built without the etcd store (cargo feature `etcd` of drover-store)"
                    .into(),
            )),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds() {
        assert_eq!(
            StoreSpec::parse("sqlite:/var/lib/drover/drover.db").unwrap(),
            StoreSpec::Sqlite("/var/lib/drover/drover.db".into())
        );
        let StoreSpec::Etcd(c) =
            StoreSpec::parse("etcd://alice:p%40ss@h1:2379,h2:2379,10.0.0.3:2379/drover/prod?timeout_ms=2000&max_txn_ops=1024")
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(c.endpoints, ["h1:2379", "h2:2379", "10.0.0.3:2379"]);
        assert_eq!(c.prefix, "/drover/prod/");
        assert_eq!(c.user.as_deref(), Some("alice"));
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(c.max_txn_ops, 1024);
        assert!(
            !format!("{c:?}").contains("p@ss"),
            "Debug hides the password"
        );
        let StoreSpec::Etcd(c) = StoreSpec::parse("etcd://h1:2379").unwrap() else {
            panic!()
        };
        assert_eq!(c.prefix, DEFAULT_ETCD_PREFIX);
        assert_eq!(
            StoreSpec::parse("etcd://u:secret@h1:2379/x")
                .unwrap()
                .to_string(),
            "etcd://u@h1:2379/x"
        );
    }

    #[test]
    fn refuses_what_it_cannot_use_and_says_what_is_allowed() {
        for bad in [
            "postgres://x",
            "sqlite:",
            "etcd://",
            "etcd://h1",
            "etcd://h1:notaport",
            "etcd://h1:2379,,h2:2379",
            "etcd://h1:2379?timeout_ms=abc",
            "etcd://h1:2379?colour=blue",
            "/some/file.db",
        ] {
            let err = StoreSpec::parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("sqlite:PATH") && err.contains("etcd://"),
                "{bad}: {err}"
            );
        }
    }
}
