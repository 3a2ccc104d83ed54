//! Who may call what: bearer tokens with scopes, stored hashed, checked on every API call.
//!
//! - `admin`: every endpoint but the agent ones (desired state, tokens, and everything `read`
//!   may do).
//! - `read`: status, events, revisions, plans, metrics.
//! - `agent`: bound to one group: heartbeats, permit polls and connection counts for that
//!   group's instances, and that group's plans.
//!
//! `GET /v1/health` needs no token. A missing, unknown or revoked token is answered `401`;
//! a valid token of the wrong scope or group `403`.
//!
//! Admin and read tokens are 32 random bytes. Agent tokens are derived from a key kept in the
//! store ([`AGENT_KEY_SECRET`], made once) and the token's id (HMAC-SHA256), so any server on
//! that store hands the same tokens to the instances it launches, after a restart or a
//! failover too, while the store keeps only hashes of tokens.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use drover_model::token::{CreateTokenResponse, TokenInfo, TokenScope};
use drover_model::{EventKind, NewEvent};
use drover_provider::Credentials;
use drover_store::{Store, TokenRecord, Write};
use sha2::{Digest, Sha256};

use crate::engine::{now_ms, Engine};
use crate::ServerError;

/// The file, in the data directory, that holds the first admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The file, in the data directory, that holds the token of the server's balancer process.
pub const LB_TOKEN_FILE: &str = "lb.token";
/// The name, in the store, of the key agent tokens are derived from.
pub const AGENT_KEY_SECRET: &str = "agent-token-key";
/// Where an older drover kept that key (in the data directory): taken into the store once.
const AGENT_KEY_FILE: &str = "agent-token.key";

/// Who is calling: the token's id, scope and (for agents) group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub id: String,
    pub scope: TokenScope,
    pub group: Option<String>,
}

/// The tokens, by hash, and the agent-token key.
pub struct Auth {
    tokens: RwLock<HashMap<String, TokenInfo>>,
    key: [u8; 32],
    /// The launch configuration's credentials, shared with the providers.
    pub credentials: Credentials,
    /// Serialises token creation (ids are max + 1).
    create: tokio::sync::Mutex<()>,
}

/// Every stored token, by its hash.
fn tokens_by_hash(store: &dyn Store) -> Result<HashMap<String, TokenInfo>, ServerError> {
    Ok(store
        .tokens()?
        .into_iter()
        .map(|t| (t.hash, t.info))
        .collect())
}

/// Lowercase hex sha256 of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub(crate) fn random_bytes() -> Result<[u8; 32], ServerError> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| ServerError::Io("/dev/urandom".into(), e))?;
    Ok(b)
}

/// A new random secret of a scope other than `agent`.
fn new_secret(scope: TokenScope) -> Result<String, ServerError> {
    Ok(format!(
        "drover_{}_{}",
        scope.as_str(),
        hex::encode(random_bytes()?)
    ))
}

fn hmac_sha256(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    drover_model::token::hmac_sha256(key, msg)
}

/// The instance an instance token speaks for (None: any token but an instance token). Put in
/// every authenticated request's extensions beside the [`Caller`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BoundInstance(pub Option<String>);

impl Auth {
    /// Load the tokens and the agent-token key from `store`. The key is made on the first
    /// start (taken from `DATA/agent-token.key` when an older drover left one there, which
    /// is then removed): every server on the store derives the same agent tokens.
    pub fn load(
        store: &dyn Store,
        data_dir: &Path,
        credentials: Credentials,
    ) -> Result<Auth, ServerError> {
        let key_path = data_dir.join(AGENT_KEY_FILE);
        let old = std::fs::read(&key_path).ok().filter(|k| k.len() == 32);
        let candidate = match &old {
            Some(k) => k.to_vec(),
            None => random_bytes()?.to_vec(),
        };
        let stored = store.keep_secret(AGENT_KEY_SECRET, &candidate)?;
        let key: [u8; 32] = stored.as_slice().try_into().map_err(|_| {
            ServerError::Internal(format!(
                "the store's {AGENT_KEY_SECRET} is {} bytes long, not 32: the store was written by something else than drover",
                stored.len()
            ))
        })?;
        if old.is_some_and(|k| k == stored) {
            // The store holds it now: no second copy on this disk.
            let _ = std::fs::remove_file(&key_path);
        }
        Ok(Auth {
            tokens: RwLock::new(tokens_by_hash(store)?),
            key,
            credentials,
            create: tokio::sync::Mutex::new(()),
        })
    }

    fn agent_secret(&self, id: &str) -> String {
        let mac = hmac_sha256(&self.key, format!("drover agent token {id}").as_bytes());
        format!("drover_agent_{}", hex::encode(mac))
    }

    /// The token of the balancer process the leader runs: derived too, so that whichever
    /// server leads hands its balancer the same token (none is made per server).
    fn lb_secret(&self, id: &str) -> String {
        let mac = hmac_sha256(&self.key, format!("drover lb token {id}").as_bytes());
        format!("drover_lb_{}", hex::encode(mac))
    }

    /// Read the tokens from `store` again (a server that does not lead: the leader creates
    /// and revokes them).
    pub fn refresh(&self, store: &dyn Store) -> Result<(), ServerError> {
        let tokens = tokens_by_hash(store)?;
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = tokens;
        Ok(())
    }

    /// Every token, by id (never a secret).
    pub fn list(&self) -> Vec<TokenInfo> {
        let mut all: Vec<TokenInfo> = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The token of id `id`, revoked or not.
    pub fn by_id(&self, id: &str) -> Option<TokenInfo> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|t| t.id == id)
            .cloned()
    }

    /// Who holds the `Authorization` header; `401` when it is missing, unknown or revoked.
    pub fn authenticate(&self, value: Option<&HeaderValue>) -> Result<Caller, ServerError> {
        self.authenticate_bound(value).map(|(c, _)| c)
    }

    /// [`Auth::authenticate`], and the instance an instance token is bound to. An instance
    /// token is checked against its group token (which must be valid): the caller is that
    /// group token, bound to one instance.
    pub fn authenticate_bound(
        &self,
        value: Option<&HeaderValue>,
    ) -> Result<(Caller, BoundInstance), ServerError> {
        let Some(value) = value else {
            return Err(ServerError::TokenNeeded);
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ServerError::NotBearer)?;
        let mut bound = BoundInstance(None);
        let mut token = std::borrow::Cow::Borrowed(token);
        if let Some((instance, id)) = drover_model::token::parse_instance_token(&token) {
            let group_secret = self.agent_secret(id);
            let expected = drover_model::token::instance_token(&group_secret, id, instance);
            // Compared by hash: no early exit on the secret's bytes.
            if hash_token(&expected) != hash_token(&token) {
                return Err(ServerError::UnknownToken);
            }
            bound = BoundInstance(Some(instance.to_string()));
            token = std::borrow::Cow::Owned(group_secret);
        }
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        let Some(info) = tokens.get(&hash_token(&token)) else {
            return Err(ServerError::TokenNotCreated);
        };
        if info.revoked_at_ms.is_some() {
            return Err(ServerError::TokenRevoked {
                id: info.id.clone(),
            });
        }
        if bound.0.is_some() && info.scope != TokenScope::Agent {
            return Err(ServerError::UnknownToken);
        }
        Ok((
            Caller {
                id: info.id.clone(),
                scope: info.scope,
                group: info.group.clone(),
            },
            bound,
        ))
    }

    fn next_id(&self) -> String {
        let n = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(|t| t.id.strip_prefix("t-").and_then(|n| n.parse::<u64>().ok()))
            .max()
            .unwrap_or(0);
        format!("t-{:06}", n + 1)
    }

    /// Create a token; its secret is in the answer and nowhere else.
    pub async fn create(
        &self,
        engine: &Engine,
        scope: TokenScope,
        name: Option<String>,
        group: Option<String>,
    ) -> Result<CreateTokenResponse, ServerError> {
        self.create_with(engine, scope, name, group, Secret::Made)
            .await
    }

    /// [`Auth::create`], with the secret given (an admin or read token) or made.
    pub(crate) async fn create_with(
        &self,
        engine: &Engine,
        scope: TokenScope,
        name: Option<String>,
        group: Option<String>,
        secret: Secret,
    ) -> Result<CreateTokenResponse, ServerError> {
        let name = name.unwrap_or_else(|| scope.as_str().to_string());
        if name.len() > 100 || name.chars().any(char::is_control) {
            return Err(ServerError::BadRequest(
                "a token name has at most 100 characters and no control characters".into(),
            ));
        }
        match (scope, &group) {
            (TokenScope::Agent, None) => {
                return Err(ServerError::BadRequest(
                    "an agent token needs a group (`service/region`)".into(),
                ))
            }
            (TokenScope::Agent, Some(_)) => {}
            (_, Some(_)) => {
                return Err(ServerError::BadRequest(
                    "only agent tokens have a group".into(),
                ))
            }
            _ => {}
        }
        let _guard = self.create.lock().await;
        let id = self.next_id();
        let token = match (scope, secret) {
            (TokenScope::Agent, _) => self.agent_secret(&id),
            (TokenScope::Lb, Secret::Derived) => self.lb_secret(&id),
            (_, Secret::Given(s)) => s,
            _ => new_secret(scope)?,
        };
        let info = TokenInfo {
            id: id.clone(),
            name,
            scope,
            group: group.clone(),
            created_at_ms: now_ms(),
            revoked_at_ms: None,
        };
        let hash = hash_token(&token);
        let mut event = NewEvent::new(
            EventKind::Server,
            format!("token {id} created ({scope}, {:?})", info.name),
        );
        if let Some(g) = &group {
            event = event.group(g);
        }
        engine
            .commit(vec![
                Write::Token(TokenRecord {
                    info: info.clone(),
                    hash: hash.clone(),
                }),
                Write::Event(event),
            ])
            .await?;
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hash, info.clone());
        if let (TokenScope::Agent, Some(g)) = (scope, &group) {
            // The newest agent token of a group is the one new instances get.
            self.credentials.set_token(g, &id, token.clone());
        }
        Ok(CreateTokenResponse { info, token })
    }

    /// Revoke a token: refused from now on. Revoking a group's current agent token makes a
    /// new one for the instances launched from now on.
    pub async fn revoke(&self, engine: &Engine, id: &str) -> Result<TokenInfo, ServerError> {
        // One change of the token set at a time: two revokes of the last two admin tokens
        // cannot both see the other one still there.
        let guard = self.create.lock().await;
        let info = self
            .list()
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| ServerError::NoToken(id.to_string()))?;
        if info.revoked_at_ms.is_some() {
            return Ok(info);
        }
        if info.scope == TokenScope::Admin {
            let admins = self
                .list()
                .iter()
                .filter(|t| t.scope == TokenScope::Admin && t.revoked_at_ms.is_none())
                .count();
            if admins <= 1 {
                return Err(ServerError::LastAdminToken(id.to_string()));
            }
        }
        let now = now_ms();
        let mut event = NewEvent::new(EventKind::Server, format!("token {id} revoked"));
        if let Some(g) = &info.group {
            event = event.group(g);
        }
        engine
            .commit(vec![
                Write::RevokeToken {
                    id: id.to_string(),
                    at_ms: now,
                },
                Write::Event(event),
            ])
            .await?;
        let mut out = info.clone();
        {
            let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
            for t in tokens.values_mut() {
                if t.id == id {
                    t.revoked_at_ms = Some(now);
                    out = t.clone();
                }
            }
        }
        drop(guard);
        if let (TokenScope::Agent, Some(g)) = (info.scope, &info.group) {
            self.credentials.remove_token(g);
            self.ensure_agent_tokens(engine, [g.as_str()]).await?;
        }
        Ok(out)
    }

    /// Make sure every group in `groups` has a usable agent token for its launches.
    pub async fn ensure_agent_tokens<'a>(
        &self,
        engine: &Engine,
        groups: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ServerError> {
        for g in groups {
            let newest = self
                .tokens
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|(_, t)| {
                    t.scope == TokenScope::Agent
                        && t.revoked_at_ms.is_none()
                        && t.group.as_deref() == Some(g)
                })
                .max_by(|a, b| a.1.id.cmp(&b.1.id))
                .map(|(hash, t)| (hash.clone(), t.id.clone()));
            match newest {
                // Derivable from the key: the same token as before.
                Some((hash, id)) if hash_token(&self.agent_secret(&id)) == hash => {
                    self.credentials.set_token(g, &id, self.agent_secret(&id));
                }
                _ => {
                    self.create(
                        engine,
                        TokenScope::Agent,
                        Some(format!("agent {g}")),
                        Some(g.to_string()),
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// On first start (no admin token that is not revoked): make one and write it to
    /// `DATA/admin.token` (0600). Returns the file when one was written.
    pub async fn ensure_admin(
        &self,
        engine: &Engine,
        data_dir: &Path,
    ) -> Result<Option<PathBuf>, ServerError> {
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        let pending = data_dir.join(format!("{ADMIN_TOKEN_FILE}.new"));
        // The file is written before the token is committed, and renamed once it is: a crash
        // in between leaves the pending file, taken here on the next start, never a stored
        // admin token that nobody has.
        if let Ok(text) = std::fs::read_to_string(&pending) {
            let stored = HeaderValue::from_str(&format!("Bearer {}", text.trim()))
                .ok()
                .and_then(|v| self.authenticate(Some(&v)).ok())
                .is_some_and(|c| c.scope == TokenScope::Admin);
            if stored {
                std::fs::rename(&pending, &path)
                    .map_err(|e| ServerError::Io(path.display().to_string(), e))?;
                return Ok(Some(path));
            }
            let _ = std::fs::remove_file(&pending);
        }
        let any = self
            .list()
            .iter()
            .any(|t| t.scope == TokenScope::Admin && t.revoked_at_ms.is_none());
        if any {
            return Ok(None);
        }
        let secret = new_secret(TokenScope::Admin)?;
        crate::tls::write_private(&pending, format!("{secret}\n").as_bytes())?;
        self.create_with(
            engine,
            TokenScope::Admin,
            Some("admin (made on first start)".into()),
            None,
            Secret::Given(secret),
        )
        .await?;
        std::fs::rename(&pending, &path)
            .map_err(|e| ServerError::Io(path.display().to_string(), e))?;
        Ok(Some(path))
    }
}

impl Auth {
    /// The token of the server's own balancer process, in `DATA/lb.token` (0600): the one
    /// there if it is a valid `lb` token, else a new one (made once, kept across restarts).
    pub async fn ensure_lb(
        &self,
        engine: &Engine,
        data_dir: &Path,
    ) -> Result<PathBuf, ServerError> {
        let path = data_dir.join(LB_TOKEN_FILE);
        // The server's balancer token, as any server on this store derives it.
        let derived = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(hash, t)| {
                t.scope == TokenScope::Lb
                    && t.revoked_at_ms.is_none()
                    && hash_token(&self.lb_secret(&t.id)) == **hash
            })
            .map(|(_, t)| t.id.clone())
            .max();
        let token = match derived {
            Some(id) => self.lb_secret(&id),
            None => {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    // An older drover's balancer token, made at random: still good.
                    let value = HeaderValue::from_str(&format!("Bearer {}", text.trim()));
                    if value.is_ok_and(|v| {
                        self.authenticate(Some(&v))
                            .is_ok_and(|c| c.scope == TokenScope::Lb)
                    }) {
                        return Ok(path);
                    }
                }
                self.create_with(
                    engine,
                    TokenScope::Lb,
                    Some("lb (the server's balancer process)".into()),
                    None,
                    Secret::Derived,
                )
                .await?
                .token
            }
        };
        let line = format!("{token}\n");
        if std::fs::read_to_string(&path).ok().as_deref() != Some(line.as_str()) {
            crate::tls::write_private(&path, line.as_bytes())?;
        }
        Ok(path)
    }
}

/// Where a new token's secret comes from.
pub(crate) enum Secret {
    /// 32 random bytes (an agent token's is always derived).
    Made,
    /// This one (the first admin token, whose file is written before it is stored).
    Given(String),
    /// Derived from the agent-token key and the token's id, as every server on the store
    /// derives it (the balancer process's token).
    Derived,
}

/// What an endpoint asks of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    Nothing,
    /// Any valid token (unknown paths: 404 or 405 only to callers with a token).
    Any,
    Read,
    /// Read, or an agent token (the handler checks the agent's group).
    ReadOrAgent,
    Admin,
    /// An admin or an exec token: `drover exec`.
    Exec,
    Agent,
    /// A balancer process (or an admin): the ingress config and connection reports.
    Lb,
}

pub(crate) fn need(method: &axum::http::Method, path: &str) -> Need {
    match path {
        "/v1/health" => Need::Nothing,
        // The dashboard's pages and login (they check the session themselves).
        "/ui" => Need::Nothing,
        p if p.starts_with("/ui/") => Need::Nothing,
        p if p.starts_with("/v1/ui/") => Need::Read,
        "/v1/schedules" if method == axum::http::Method::GET => Need::Read,
        "/v1/schedules" => Need::Admin,
        p if p.starts_with("/v1/schedules/") => Need::Admin,
        "/v1/apply" | "/v1/deploy" | "/v1/rollback" | "/v1/scale" | "/v1/destroy"
        | "/v1/rollout" | "/v1/tokens" => Need::Admin,
        "/v1/exec" => Need::Exec,
        p if p.starts_with("/v1/exec/") => Need::Exec,
        "/v1/status" | "/v1/events" | "/v1/revisions" | "/v1/logs" | "/metrics" => Need::Read,
        p if p.starts_with("/v1/tokens/") => Need::Admin,
        p if p.starts_with("/v1/revisions/") => Need::Read,
        p if p.starts_with("/v1/plans/") => Need::ReadOrAgent,
        p if p.starts_with("/v1/agent/") => Need::Agent,
        p if p.starts_with("/v1/lb/") => Need::Lb,
        _ => Need::Any,
    }
}

/// Whether `caller` may make a call that needs `need`: `403`, saying what it needs, if not.
pub(crate) fn allow(
    need: Need,
    caller: &Caller,
    method: &Method,
    path: &str,
) -> Result<(), ServerError> {
    let ok = match (need, caller.scope) {
        (Need::Nothing | Need::Any, _) => true,
        (Need::Admin, s) => s == TokenScope::Admin,
        (Need::Read, s) => matches!(s, TokenScope::Admin | TokenScope::Read | TokenScope::Exec),
        (Need::Exec, s) => matches!(s, TokenScope::Admin | TokenScope::Exec),
        (Need::ReadOrAgent, s) => s != TokenScope::Lb,
        (Need::Agent, s) => s == TokenScope::Agent,
        (Need::Lb, s) => matches!(s, TokenScope::Admin | TokenScope::Lb),
    };
    if ok {
        return Ok(());
    }
    let needs = match need {
        Need::Admin if method == Method::GET => "needs an admin token",
        Need::Admin => "changes desired state or tokens and needs an admin token",
        Need::Read => "needs a read, exec or admin token",
        Need::Exec => "runs a command on an instance and needs an admin or exec token",
        Need::Agent => "is for agents and needs the agent token of the instance's group",
        Need::Lb => "is for balancers and needs an lb token",
        Need::ReadOrAgent => "needs a read, admin or agent token",
        _ => "needs another token",
    };
    Err(ServerError::NotAllowed {
        method: method.to_string(),
        path: path.to_string(),
        needs,
        caller: describe(caller),
    })
}

fn describe(c: &Caller) -> String {
    match &c.group {
        Some(g) => format!("{} is an {} token of group {g}", c.id, c.scope),
        None => format!("{} is {} {} token", c.id, article(c.scope), c.scope),
    }
}

fn article(s: TokenScope) -> &'static str {
    match s {
        TokenScope::Admin | TokenScope::Agent | TokenScope::Exec => "an",
        TokenScope::Read => "a",
        TokenScope::Lb => "an",
    }
}

/// The auth layer: authenticate, check the scope for the path, and hand the [`Caller`] to the
/// handler (which checks an agent's group).
pub async fn layer(
    State(engine): State<std::sync::Arc<Engine>>,
    mut req: Request,
    next: Next,
) -> Response {
    let need = need(req.method(), req.uri().path());
    if need == Need::Nothing {
        return next.run(req).await;
    }
    let auth = engine.auth();
    // A bearer token, else the dashboard's session cookie (CSRF-checked for changes).
    let by_cookie =
        req.headers().get(header::AUTHORIZATION).is_none() && crate::ui::has_session(&req);
    let caller = if by_cookie {
        crate::ui::session_caller(&engine, &mut req).map(|c| (c, BoundInstance(None)))
    } else {
        auth.authenticate_bound(req.headers().get(header::AUTHORIZATION))
    };
    let (caller, bound) = match caller {
        Ok(c) => c,
        Err(e) => {
            let mut resp = e.into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"drover\""),
            );
            return resp;
        }
    };
    if let Err(e) = allow(need, &caller, req.method(), req.uri().path()) {
        return e.into_response();
    }
    req.extensions_mut().insert(caller);
    req.extensions_mut().insert(bound);
    next.run(req).await
}

/// For agent endpoints: an agent token may only act for instances of its own group.
pub fn check_group(caller: &Caller, group: &str, what: &str) -> Result<(), ServerError> {
    if caller.scope == TokenScope::Agent && caller.group.as_deref() != Some(group) {
        return Err(ServerError::OtherGroup {
            what: what.to_string(),
            group: group.to_string(),
            caller: describe(caller),
        });
    }
    Ok(())
}

impl Engine {
    /// The API's tokens.
    pub fn auth(&self) -> &Auth {
        &self.factory.auth
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_shape() {
        // HMAC is deterministic and key-dependent.
        let a = hmac_sha256(&[1; 32], b"x");
        assert_eq!(a, hmac_sha256(&[1; 32], b"x"));
        assert_ne!(a, hmac_sha256(&[2; 32], b"x"));
        assert_ne!(a, hmac_sha256(&[1; 32], b"y"));
    }

    #[test]
    fn every_path_has_a_need() {
        const G: axum::http::Method = axum::http::Method::GET;
        assert_eq!(need(&G, "/v1/health"), Need::Nothing);
        assert_eq!(need(&G, "/v1/apply"), Need::Admin);
        assert_eq!(need(&G, "/v1/tokens/t-000001"), Need::Admin);
        assert_eq!(need(&G, "/v1/status"), Need::Read);
        assert_eq!(need(&G, "/v1/logs"), Need::Read);
        assert_eq!(need(&axum::http::Method::POST, "/v1/exec"), Need::Exec);
        assert_eq!(
            need(&axum::http::Method::POST, "/v1/exec/7/input"),
            Need::Exec
        );
        assert_eq!(need(&G, "/v1/agent/tasks"), Need::Agent);
        assert_eq!(
            need(&axum::http::Method::POST, "/v1/agent/flight"),
            Need::Agent
        );
        assert_eq!(
            need(&axum::http::Method::POST, "/v1/agent/tail"),
            Need::Agent
        );
        assert_eq!(need(&G, "/v1/revisions/3"), Need::Read);
        assert_eq!(need(&G, "/v1/plans/web/local/1"), Need::ReadOrAgent);
        assert_eq!(need(&G, "/v1/agent/heartbeat"), Need::Agent);
        assert_eq!(need(&G, "/v1/lb/config"), Need::Lb);
        assert_eq!(need(&G, "/v1/health/"), Need::Any);
        assert_eq!(need(&G, "/nope"), Need::Any);
        assert_eq!(need(&G, "/ui/"), Need::Nothing);
        assert_eq!(need(&G, "/ui/login"), Need::Nothing);
        assert_eq!(need(&G, "/v1/ui/summary"), Need::Read);
        assert_eq!(
            need(&axum::http::Method::POST, "/v1/ui/login-links"),
            Need::Read
        );
        assert_eq!(need(&G, "/v1/schedules"), Need::Read);
        assert_eq!(
            need(&axum::http::Method::POST, "/v1/schedules"),
            Need::Admin
        );
        assert_eq!(
            need(&axum::http::Method::DELETE, "/v1/schedules/3"),
            Need::Admin
        );
    }
}
