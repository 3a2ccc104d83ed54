//! Dashboard sessions: one-time login links, cookie sessions bound to a token, CSRF tokens.
//!
//! Kept in the server's memory only: a server restart (or a second server behind the same
//! address) ends every session and every link, and the dashboard asks to log in again. A
//! session holds the id and scope of the token it was made from, never the token itself, and
//! each request through it checks that this token is still valid: revoking the token ends its
//! sessions at once.

use std::collections::HashMap;
use std::sync::Mutex;

use drover_model::token::TokenScope;
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::engine::now_ms;
use crate::ServerError;

/// How long a login link printed by `drover ui` may be used (once).
pub const LINK_TTL_MS: u64 = 60_000;
/// A session unused for this long ends.
pub const IDLE_MS: u64 = 12 * 3600 * 1000;
/// A session ends this long after login, used or not.
pub const LIFETIME_MS: u64 = 7 * 24 * 3600 * 1000;
/// At most this many sessions (the oldest go first) and outstanding links.
const MAX_SESSIONS: usize = 10_000;
const MAX_LINKS: usize = 1_000;

/// One logged-in browser.
#[derive(Clone, Debug)]
pub struct Session {
    pub token_id: String,
    pub scope: TokenScope,
    /// Sent back by the page in `X-Drover-CSRF` with every request that changes something.
    pub csrf: String,
    pub created_ms: u64,
    pub last_ms: u64,
}

#[derive(Clone, Debug)]
struct Link {
    token_id: String,
    scope: TokenScope,
    expires_ms: u64,
}

/// A request's session, for the handlers (logout).
#[derive(Clone, Debug)]
pub struct SessionRef {
    /// The hash the session is kept under.
    pub key: String,
    pub csrf: String,
}

/// Why a login link was not accepted (each gets its own page).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkError {
    /// Never made here, or already used, or made before the server restarted.
    Unknown,
    Expired,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<String, Session>,
    links: HashMap<String, Link>,
}

/// Sessions and links, by the sha256 of their secret.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

fn key(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn secret() -> Result<String, ServerError> {
    Ok(hex::encode(crate::auth::random_bytes()?))
}

/// Equal strings, in time that does not depend on where they differ.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A one-time login link's secret for `caller`, valid for [`LINK_TTL_MS`].
    pub fn new_link(&self, caller: &Caller) -> Result<(String, u64), ServerError> {
        let code = secret()?;
        let now = now_ms();
        let expires_ms = now + LINK_TTL_MS;
        let mut inner = self.lock();
        inner.links.retain(|_, l| l.expires_ms > now);
        if inner.links.len() >= MAX_LINKS {
            return Err(ServerError::Unavailable(format!(
                "{MAX_LINKS} login links are outstanding; wait a minute for them to expire"
            )));
        }
        inner.links.insert(
            key(&code),
            Link {
                token_id: caller.id.clone(),
                scope: caller.scope,
                expires_ms,
            },
        );
        Ok((code, expires_ms))
    }

    /// Use a link (it is gone afterwards, accepted or expired): the token id and scope it
    /// stands for.
    pub fn take_link(&self, code: &str) -> Result<(String, TokenScope), LinkError> {
        let now = now_ms();
        let link = self.lock().links.remove(&key(code));
        match link {
            None => Err(LinkError::Unknown),
            Some(l) if l.expires_ms <= now => Err(LinkError::Expired),
            Some(l) => Ok((l.token_id, l.scope)),
        }
    }

    /// Start a session; returns the cookie's secret.
    pub fn create(&self, token_id: String, scope: TokenScope) -> Result<String, ServerError> {
        let sid = secret()?;
        let csrf = secret()?;
        let now = now_ms();
        let mut inner = self.lock();
        inner
            .sessions
            .retain(|_, s| now < s.last_ms + IDLE_MS && now < s.created_ms + LIFETIME_MS);
        if inner.sessions.len() >= MAX_SESSIONS {
            let oldest = inner
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.last_ms)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                inner.sessions.remove(&k);
            }
        }
        inner.sessions.insert(
            key(&sid),
            Session {
                token_id,
                scope,
                csrf,
                created_ms: now,
                last_ms: now,
            },
        );
        Ok(sid)
    }

    /// The live session of cookie secret `sid` (its last use set to now).
    pub fn get(&self, sid: &str) -> Option<(SessionRef, Session)> {
        let now = now_ms();
        let k = key(sid);
        let mut inner = self.lock();
        let live = inner
            .sessions
            .get(&k)
            .is_some_and(|s| now < s.last_ms + IDLE_MS && now < s.created_ms + LIFETIME_MS);
        if !live {
            inner.sessions.remove(&k);
            return None;
        }
        let s = inner.sessions.get_mut(&k)?;
        s.last_ms = now;
        Some((
            SessionRef {
                key: k,
                csrf: s.csrf.clone(),
            },
            s.clone(),
        ))
    }

    /// End a session (logout).
    pub fn remove(&self, r: &SessionRef) {
        self.lock().sessions.remove(&r.key);
    }

    /// Sessions now (for tests and the summary).
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(scope: TokenScope) -> Caller {
        Caller {
            id: "t-000001".into(),
            scope,
            group: None,
        }
    }

    #[test]
    fn a_link_works_once() {
        let s = Sessions::default();
        let (code, expires) = s.new_link(&caller(TokenScope::Read)).unwrap();
        assert!(expires > now_ms() + LINK_TTL_MS - 5_000);
        assert_eq!(
            s.take_link(&code),
            Ok(("t-000001".to_string(), TokenScope::Read))
        );
        assert_eq!(s.take_link(&code), Err(LinkError::Unknown));
        assert_eq!(s.take_link("nope"), Err(LinkError::Unknown));
    }

    #[test]
    fn an_expired_link_is_refused_and_gone() {
        let s = Sessions::default();
        let (code, _) = s.new_link(&caller(TokenScope::Admin)).unwrap();
        s.lock().links.values_mut().for_each(|l| l.expires_ms = 1);
        assert_eq!(s.take_link(&code), Err(LinkError::Expired));
        assert_eq!(s.take_link(&code), Err(LinkError::Unknown));
    }

    #[test]
    fn sessions_end_on_logout_and_when_idle() {
        let s = Sessions::default();
        let sid = s.create("t-000002".into(), TokenScope::Admin).unwrap();
        let (r, got) = s.get(&sid).unwrap();
        assert_eq!(got.scope, TokenScope::Admin);
        assert_eq!(got.csrf.len(), 64);
        assert!(s.get("other").is_none());
        s.remove(&r);
        assert!(s.get(&sid).is_none());
        let sid = s.create("t-000002".into(), TokenScope::Read).unwrap();
        s.lock()
            .sessions
            .values_mut()
            .for_each(|x| x.last_ms = now_ms() - IDLE_MS - 1);
        assert!(s.get(&sid).is_none());
        assert!(s.is_empty());
    }

    #[test]
    fn comparison_is_exact() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
    }
}
