//! Pinning images by digest when a plan is made: every `repository:tag` of a new plan is
//! resolved to `repository@sha256:…` through the registry's HTTP API (v2), so every instance of
//! the plan runs the same bytes, and a version whose image does not exist fails the deploy
//! before any instance is touched.
//!
//! - A manifest is asked for with `HEAD /v2/<name>/manifests/<tag>`, accepting OCI indexes and
//!   manifests and Docker manifest lists and manifests; the digest is the
//!   `Docker-Content-Digest` answer header (or the sha256 of the body of a `GET`).
//! - Registries on loopback (and those in `DROVER_INSECURE_REGISTRIES`, comma-separated
//!   `host:port`) are spoken to over plain http, the others over https, as Docker does.
//! - Credentials: `DROVER_REGISTRY_USER` and `DROVER_REGISTRY_PASSWORD`, else
//!   `$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`) with its credential helpers
//!   (`drover_creds`); used for Basic auth and to get a Bearer token from the
//!   registry's token service when it asks for one.
//! - A component whose image reference did not change keeps the digest its group already runs,
//!   and a version that ran before gets its old digest back (rollbacks and automatic reverts
//!   need no registry): only new references are resolved.
//! - Look-ups run before the write lock ([`prefetch`], on apply and deploy): a slow or
//!   hanging registry holds up the change that names it, never the controller's passes
//!   (permits, replacements, rollouts). Under the lock a plan takes what the prefetch found;
//!   a change that reaches the lock with a reference nobody prefetched (a later wave of a
//!   deploy, a revision changed meanwhile) is resolved there, bounded by `REQUEST_TIMEOUT`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use drover_creds::Sources;
use drover_model::image::{base64_encode, ImageRef};
use drover_model::Plan;
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};

use crate::engine::Engine;
use crate::state::Group;
use crate::ServerError;

/// Every manifest type a tag may point to.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json";
/// Timeout of one request to a registry.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How many earlier generations of a group are searched for a digest to reuse.
const HISTORY: u64 = 64;
/// How long a prefetched digest is taken under the lock: the later waves of a deploy run
/// the bytes its first wave resolved. Each apply or deploy resolves its tags again.
const PIN_FRESH: Duration = Duration::from_secs(3600);
/// How long a prefetched failure is given under the lock (the same request's look-up).
const FAILURE_FRESH: Duration = Duration::from_secs(60);

/// What a look-up found: the pinned reference, or why there is none.
type Found = Result<String, String>;

/// Tags resolved before the write lock, with when and what came of it.
#[derive(Default)]
pub(crate) struct Prefetched(std::sync::Mutex<HashMap<String, (std::time::Instant, Found)>>);

impl Prefetched {
    fn get(&self, reference: &str) -> Option<Found> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, (at, r)| {
            at.elapsed()
                < match r {
                    Ok(_) => PIN_FRESH,
                    Err(_) => FAILURE_FRESH,
                }
        });
        m.get(reference).map(|(_, r)| r.clone())
    }

    fn put(&self, reference: &str, result: Found) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(reference.to_string(), (std::time::Instant::now(), result));
    }
}

/// Resolve, before the write lock, every image tag of `fleet` that no group runs yet, so
/// that the plan made under the lock finds them (failures too: the error is given there).
pub(crate) async fn prefetch(engine: &Engine, fleet: &drover_model::Fleet) {
    let wanted: Vec<String> = {
        let st = engine.state();
        let mut wanted = Vec::new();
        for (name, svc) in &fleet.services {
            for region in &svc.regions {
                let plan = drover_model::plan::plan_for(fleet, name, svc, region);
                let running = st.groups.get(&plan.group().0).map(|g| &g.plan);
                for c in &plan.components {
                    let Some(d) = &c.docker else { continue };
                    if running.and_then(|p| pin_of(p, &d.image)).is_none()
                        && !wanted.contains(&d.image)
                    {
                        wanted.push(d.image.clone());
                    }
                }
            }
        }
        wanted
    };
    if wanted.is_empty() {
        return;
    }
    let mut resolver = Resolver::from_env();
    for image in wanted {
        let result = resolver.resolve(&image).await;
        engine.pins.put(&image, result);
    }
}

/// Pin the images of `new_plans` (changed groups) and carry the current pins over to the
/// groups whose plan did not change; the pinned plans are also the groups' plans.
pub(crate) async fn pin_images(
    engine: &Engine,
    old_groups: &BTreeMap<String, Group>,
    new_plans: &mut [Plan],
    new_groups: &mut BTreeMap<String, Group>,
) -> Result<(), ServerError> {
    // Unchanged groups keep running what they run.
    for (gid, g) in new_groups.iter_mut() {
        if new_plans.iter().any(|p| p.group().0 == *gid) {
            continue;
        }
        if let Some(old) = old_groups.get(gid) {
            copy_pins(&old.plan, &mut g.plan);
        }
    }
    if new_plans
        .iter()
        .all(|p| p.components.iter().all(|c| c.docker.is_none()))
    {
        return Ok(());
    }
    let mut resolver = Resolver::from_env();
    for plan in new_plans.iter_mut() {
        let gid = plan.group().0;
        let old = old_groups.get(&gid).map(|g| &g.plan);
        for c in plan.components.iter_mut() {
            let Some(d) = c.docker.as_mut() else { continue };
            if d.pinned.is_some() {
                continue;
            }
            let mut known = old.and_then(|o| pin_of(o, &d.image));
            if known.is_none() {
                let top = old.map(|o| o.generation).unwrap_or(plan.generation);
                for g in (top.saturating_sub(HISTORY).max(1)..top).rev() {
                    if let Some(p) = engine.store.plan(&gid, g)? {
                        known = pin_of(&p, &d.image);
                        if known.is_some() {
                            break;
                        }
                    }
                }
            }
            let found = match known {
                Some(p) => Ok(p),
                None => match engine.pins.get(&d.image) {
                    Some(r) => r,
                    None => resolver.resolve(&d.image).await,
                },
            };
            let pinned = match found {
                Ok(p) => p,
                Err(why) => {
                    return Err(ServerError::Conflict(format!(
                        "component {} version {}: image {}: {why}; nothing was changed",
                        c.name, c.version, d.image
                    )))
                }
            };
            tracing::info!(group = %gid, component = %c.name, image = %d.image, %pinned, "image pinned");
            d.pinned = Some(pinned);
        }
        if let Some(g) = new_groups.get_mut(&gid) {
            g.plan = plan.clone();
        }
    }
    Ok(())
}

/// The digest `plan` pinned for `image`, if it has that image.
fn pin_of(plan: &Plan, image: &str) -> Option<String> {
    plan.components.iter().find_map(|c| {
        let d = c.docker.as_ref()?;
        (d.image == image).then(|| d.pinned.clone()).flatten()
    })
}

fn copy_pins(from: &Plan, to: &mut Plan) {
    for c in to.components.iter_mut() {
        if let Some(d) = c.docker.as_mut() {
            if d.pinned.is_none() {
                d.pinned = pin_of(from, &d.image);
            }
        }
    }
}

/// Talks to registries; remembers what it resolved (the same image in many regions is asked
/// for once).
pub struct Resolver {
    client: reqwest::Client,
    credentials: Sources,
    insecure: Vec<String>,
    cache: HashMap<String, String>,
}

impl Resolver {
    /// Credentials and insecure registries from the environment (see the module's doc).
    pub fn from_env() -> Resolver {
        let insecure = std::env::var("DROVER_INSECURE_REGISTRIES")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        Resolver::new(Sources::from_env(), insecure)
    }

    pub fn new(credentials: Sources, insecure: Vec<String>) -> Resolver {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Resolver {
            client,
            credentials,
            insecure,
            cache: HashMap::new(),
        }
    }

    /// `reference` (`repository:tag`, or already with a digest) as `repository@sha256:…`,
    /// checked to exist in its registry. `Err` says why not, for a person.
    pub async fn resolve(&mut self, reference: &str) -> Result<String, String> {
        if let Some(p) = self.cache.get(reference) {
            return Ok(p.clone());
        }
        let r = ImageRef::parse(reference).map_err(|e| format!("not a valid reference: {e}"))?;
        let host = r.api_host().to_string();
        let scheme = if r.registry_is_loopback() || self.insecure.contains(&host) {
            "http"
        } else {
            "https"
        };
        let url = format!(
            "{scheme}://{host}/v2/{}/manifests/{}",
            r.api_repository(),
            r.api_reference()
        );
        let mut auth: Option<String> = None;
        let mut resp = self.head(&url, auth.as_deref()).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            auth = Some(self.authorize(&r, &challenge).await?);
            resp = self.head(&url, auth.as_deref()).await?;
        }
        let digest = match resp.status() {
            s if s.is_success() => match header(resp.headers(), "docker-content-digest") {
                Some(d) if d.starts_with("sha256:") => d,
                // Some registries leave the header out of HEAD answers: hash the manifest.
                _ => self.digest_by_get(&url, auth.as_deref()).await?,
            },
            StatusCode::NOT_FOUND => {
                return Err(format!(
                    "not found: registry {host} has no manifest {:?} for {} (check the version, or push the image first)",
                    r.api_reference(),
                    r.api_repository()
                ))
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(format!(
                    "registry {host} refused access ({}): check the credentials (DROVER_REGISTRY_USER and DROVER_REGISTRY_PASSWORD, or `docker login {}`)",
                    resp.status(),
                    r.registry_name()
                ))
            }
            s => return Err(format!("registry {host} answered {s} for {url}")),
        };
        if let Some(d) = &r.digest {
            if !d.eq_ignore_ascii_case(&digest) {
                return Err(format!("registry {host} serves digest {digest}, not {d}"));
            }
        }
        let pinned = r.pinned(&digest);
        self.cache.insert(reference.to_string(), pinned.clone());
        Ok(pinned)
    }

    async fn head(&self, url: &str, auth: Option<&str>) -> Result<reqwest::Response, String> {
        let mut req = self.client.head(url).header(ACCEPT, MANIFEST_TYPES);
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        req.send().await.map_err(|e| unreachable(url, &e))
    }

    async fn digest_by_get(&self, url: &str, auth: Option<&str>) -> Result<String, String> {
        let mut req = self.client.get(url).header(ACCEPT, MANIFEST_TYPES);
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        let resp = req.send().await.map_err(|e| unreachable(url, &e))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url} answered {}", resp.status()));
        }
        if let Some(d) = header(resp.headers(), "docker-content-digest") {
            if d.starts_with("sha256:") {
                return Ok(d);
            }
        }
        let body = resp.bytes().await.map_err(|e| unreachable(url, &e))?;
        Ok(format!("sha256:{}", hex::encode(Sha256::digest(&body))))
    }

    /// The `Authorization` value answering a `WWW-Authenticate` challenge.
    async fn authorize(&self, r: &ImageRef, challenge: &str) -> Result<String, String> {
        // A credential helper is a program: run it off the runtime's workers.
        let creds = {
            let (sources, registry) = (self.credentials.clone(), r.registry_name().to_string());
            tokio::task::spawn_blocking(move || sources.credentials(&registry))
                .await
                .map_err(|e| format!("looking up registry credentials failed: {e}"))??
        };
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let basic = creds
            .as_ref()
            .map(|(u, p)| format!("Basic {}", base64_encode(format!("{u}:{p}").as_bytes())));
        if scheme.eq_ignore_ascii_case("basic") {
            return basic.ok_or_else(|| {
                format!(
                    "registry {} needs credentials: set DROVER_REGISTRY_USER and DROVER_REGISTRY_PASSWORD, or run `docker login {}`",
                    r.api_host(),
                    r.registry_name()
                )
            });
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(format!(
                "registry {} asks for an authentication scheme drover does not speak: {challenge:?}",
                r.api_host()
            ));
        }
        let p = challenge_params(params);
        let realm = p.get("realm").ok_or_else(|| {
            format!(
                "registry {} sent a Bearer challenge with no realm",
                r.api_host()
            )
        })?;
        let scope = p
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", r.api_repository()));
        let mut req = self
            .client
            .get(realm.as_str())
            .query(&[("scope", scope.as_str())]);
        if let Some(service) = p.get("service") {
            req = req.query(&[("service", service.as_str())]);
        }
        if let Some(b) = &basic {
            req = req.header(AUTHORIZATION, b);
        }
        let resp = req.send().await.map_err(|e| unreachable(realm, &e))?;
        if !resp.status().is_success() {
            return Err(format!(
                "the token service of registry {} answered {}{}",
                r.api_host(),
                resp.status(),
                if creds.is_none() {
                    " (no credentials were given: set DROVER_REGISTRY_USER and DROVER_REGISTRY_PASSWORD, or `docker login`)"
                } else {
                    ""
                }
            ));
        }
        let body: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| format!("the token service answered no JSON: {e}"))?;
        let token = body
            .get("token")
            .or_else(|| body.get("access_token"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| "the token service answered no token".to_string())?;
        Ok(format!("Bearer {token}"))
    }
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

fn unreachable(url: &str, e: &reqwest::Error) -> String {
    let mut msg = format!("cannot reach the registry ({url}): {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

/// `realm="https://auth.example/token",service="registry",scope="repository:a:pull"`
fn challenge_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((k, v)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (val, after) = if let Some(q) = v.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match v.find(',') {
                Some(end) => (&v[..end], &v[end..]),
                None => (v, ""),
            }
        };
        out.insert(k, val.to_string());
        rest = after.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Path, Query, State};
    use axum::http::{HeaderMap as AxHeaders, Method, StatusCode as AxStatus};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{any, get};
    use axum::Router;
    use std::sync::{Arc, Mutex};

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[derive(Clone, Default)]
    struct Fake {
        /// None: open; Some("basic"): Basic alice:pw; Some("bearer"): token service.
        auth: Option<&'static str>,
        base: String,
        /// Leave Docker-Content-Digest out (hash the body instead).
        no_digest_header: bool,
        seen_accept: Arc<Mutex<Vec<String>>>,
    }

    async fn manifest(
        State(f): State<Fake>,
        method: Method,
        Path((repo, reference)): Path<(String, String)>,
        headers: AxHeaders,
    ) -> Response {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        f.seen_accept.lock().unwrap().push(
            headers
                .get("accept")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
        );
        match f.auth {
            Some("basic") if auth != format!("Basic {}", base64_encode(b"alice:pw")) => {
                return (
                    AxStatus::UNAUTHORIZED,
                    [("www-authenticate", "Basic realm=\"fake\"")],
                )
                    .into_response()
            }
            Some("bearer") if auth != "Bearer tok-123" => {
                let c = format!(
                    "Bearer realm=\"{}/token\",service=\"fake-registry\",scope=\"repository:{repo}:pull\"",
                    f.base
                );
                return (AxStatus::UNAUTHORIZED, [("www-authenticate", c)]).into_response();
            }
            _ => {}
        }
        if repo != "team/app" || (reference != "v1" && reference != DIGEST) {
            return (
                AxStatus::NOT_FOUND,
                "{\"errors\":[{\"code\":\"MANIFEST_UNKNOWN\"}]}",
            )
                .into_response();
        }
        let body = "{\"schemaVersion\":2}";
        let mut h = vec![(
            "content-type".to_string(),
            "application/vnd.oci.image.index.v1+json".to_string(),
        )];
        if !f.no_digest_header {
            h.push(("docker-content-digest".to_string(), DIGEST.to_string()));
        }
        let mut resp = if method == Method::HEAD {
            AxStatus::OK.into_response()
        } else {
            body.into_response()
        };
        for (k, v) in h {
            resp.headers_mut().insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        resp
    }

    async fn token(headers: AxHeaders, Query(q): Query<HashMap<String, String>>) -> Response {
        let ok = headers.get("authorization").and_then(|v| v.to_str().ok())
            == Some(&format!("Basic {}", base64_encode(b"alice:pw")));
        if !ok || q.get("service").map(String::as_str) != Some("fake-registry") {
            return AxStatus::UNAUTHORIZED.into_response();
        }
        axum::Json(serde_json::json!({ "token": "tok-123" })).into_response()
    }

    async fn serve(mut f: Fake) -> (String, Fake) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        f.base = format!("http://{addr}");
        let app = Router::new()
            .route(
                "/v2/{a}/{b}/manifests/{reference}",
                any(
                    |s: State<Fake>,
                     m: Method,
                     Path((a, b, r)): Path<(String, String, String)>,
                     h: AxHeaders| async move {
                        manifest(s, m, Path((format!("{a}/{b}"), r)), h).await
                    },
                ),
            )
            .route("/v2/{a}/manifests/{reference}", any(manifest))
            .route("/token", get(token))
            .with_state(f.clone());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        (addr.to_string(), f)
    }

    fn resolver(creds: bool) -> Resolver {
        Resolver::new(
            Sources {
                env: creds.then(|| ("alice".to_string(), "pw".to_string())),
                ..Sources::default()
            },
            vec![],
        )
    }

    #[tokio::test]
    async fn pins_a_tag_and_refuses_a_missing_one() {
        let (addr, fake) = serve(Fake::default()).await;
        let mut r = resolver(false);
        let pinned = r.resolve(&format!("{addr}/team/app:v1")).await.unwrap();
        assert_eq!(pinned, format!("{addr}/team/app@{DIGEST}"));
        let accept = fake.seen_accept.lock().unwrap()[0].clone();
        assert!(
            accept.contains("application/vnd.oci.image.index.v1+json"),
            "{accept}"
        );
        assert!(accept.contains("manifest.list.v2+json"), "{accept}");
        let e = r.resolve(&format!("{addr}/team/app:v9")).await.unwrap_err();
        assert!(e.contains("not found") && e.contains("\"v9\""), "{e}");
        // Already a digest: checked, kept.
        let d = r
            .resolve(&format!("{addr}/team/app@{DIGEST}"))
            .await
            .unwrap();
        assert_eq!(d, pinned);
    }

    #[tokio::test]
    async fn hashes_the_manifest_without_a_digest_header() {
        let (addr, _) = serve(Fake {
            no_digest_header: true,
            ..Fake::default()
        })
        .await;
        let pinned = resolver(false)
            .resolve(&format!("{addr}/team/app:v1"))
            .await
            .unwrap();
        let want = hex::encode(Sha256::digest(b"{\"schemaVersion\":2}"));
        assert_eq!(pinned, format!("{addr}/team/app@sha256:{want}"));
    }

    #[tokio::test]
    async fn basic_and_bearer_auth() {
        for kind in ["basic", "bearer"] {
            let (addr, _) = serve(Fake {
                auth: Some(kind),
                ..Fake::default()
            })
            .await;
            let image = format!("{addr}/team/app:v1");
            let pinned = resolver(true).resolve(&image).await.unwrap();
            assert!(pinned.ends_with(DIGEST), "{kind}: {pinned}");
            let e = resolver(false).resolve(&image).await.unwrap_err();
            assert!(e.contains("DROVER_REGISTRY_USER"), "{kind}: {e}");
        }
    }

    #[tokio::test]
    async fn credentials_from_a_docker_config() {
        let (addr, _) = serve(Fake {
            auth: Some("bearer"),
            ..Fake::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.json");
        std::fs::write(
            &cfg,
            format!(
                "{{\"auths\":{{\"{addr}\":{{\"auth\":\"{}\"}}}}}}",
                base64_encode(b"alice:pw")
            ),
        )
        .unwrap();
        let sources = Sources {
            docker_config: Some(cfg),
            ..Sources::default()
        };
        let mut r = Resolver::new(sources, vec![]);
        assert!(r.resolve(&format!("{addr}/team/app:v1")).await.is_ok());
    }

    /// `credsStore` in the Docker config: the helper program is asked for the registry.
    #[tokio::test]
    async fn credentials_from_a_credential_helper() {
        use std::os::unix::fs::PermissionsExt;
        let (addr, _) = serve(Fake {
            auth: Some("bearer"),
            ..Fake::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.json");
        std::fs::write(&cfg, r#"{"auths": {}, "credsStore": "fake"}"#).unwrap();
        let helper = dir.path().join("docker-credential-fake");
        std::fs::write(
            &helper,
            format!(
                "#!/bin/sh\ns=$(cat)\n[ \"$1\" = get ] && [ \"$s\" = \"{addr}\" ] && echo '{{\"Username\":\"alice\",\"Secret\":\"pw\"}}'\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sources = Sources {
            env: None,
            docker_config: Some(cfg),
            helper_path: Some(dir.path().as_os_str().to_owned()),
            helper_timeout: None,
        };
        let mut r = Resolver::new(sources.clone(), vec![]);
        let pinned = r.resolve(&format!("{addr}/team/app:v1")).await;
        assert!(pinned.is_ok(), "{pinned:?}");
        // A helper that cannot answer: the refusal names it.
        std::fs::write(&helper, "#!/bin/sh\necho 'keychain locked' >&2; exit 1\n").unwrap();
        let e = Resolver::new(sources, vec![])
            .resolve(&format!("{addr}/team/app:v1"))
            .await
            .unwrap_err();
        assert!(
            e.contains("docker-credential-fake") && e.contains("keychain locked"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn unreachable_registry_says_so() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = resolver(false)
            .resolve(&format!("127.0.0.1:{port}/team/app:v1"))
            .await
            .unwrap_err();
        assert!(e.contains("cannot reach the registry"), "{e}");
    }

    #[test]
    fn parses_challenges() {
        let p = challenge_params(
            "realm=\"https://auth.docker.io/token\",service=\"registry.docker.io\",scope=\"repository:library/nginx:pull\"",
        );
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/nginx:pull");
        let p = challenge_params("realm=fake, error=\"invalid_token\"");
        assert_eq!(p["realm"], "fake");
        assert_eq!(p["error"], "invalid_token");
    }
}
