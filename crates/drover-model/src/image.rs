//! Container image references (`registry/repository:tag@sha256:…`) and where a Docker
//! `config.json` says a registry's credentials are. Pure: `drover-creds` reads the files and
//! runs the credential helpers.

use std::fmt;

/// The registry Docker uses for references without a registry part.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API actually answers.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference, as written (no normalization beyond splitting).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// `127.0.0.1:5000`, `ghcr.io`; `None` for Docker Hub short names (`nginx`, `me/app`).
    pub registry: Option<String>,
    /// `drover-demo`, `library/nginx`, `team/app`.
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:` followed by 64 lowercase hex digits.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parse a reference; `Err` says what is wrong with it.
    pub fn parse(s: &str) -> Result<ImageRef, String> {
        if s.is_empty() {
            return Err("the image reference is empty".into());
        }
        if s.len() > 512 {
            return Err("the image reference is longer than 512 characters".into());
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (s, None),
        };
        if let Some(d) = digest {
            let ok = d
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                return Err(format!(
                    "{d:?} is not a digest: expected sha256: followed by 64 hex digits"
                ));
            }
        }
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(format!(
                    "{t:?} is not a valid tag: use 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
                ));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (Some(first), path)
            }
            _ => (None, name),
        };
        if let Some(r) = registry {
            let ok = r
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
                && !r.starts_with(['-', '.', ':']);
            if !ok {
                return Err(format!("{r:?} is not a valid registry host[:port]"));
            }
        }
        if repository.is_empty() {
            return Err("the repository name is empty".into());
        }
        for part in repository.split('/') {
            if !valid_path_component(part) {
                return Err(format!(
                    "{part:?} is not a valid repository name component: use lowercase letters and digits, separated by '.', '_', '__' or '-'"
                ));
            }
        }
        Ok(ImageRef {
            registry: registry.map(str::to_string),
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest: digest.map(|d| d.to_ascii_lowercase()),
        })
    }

    /// The registry as Docker names it (`docker.io` for short names).
    pub fn registry_name(&self) -> &str {
        self.registry.as_deref().unwrap_or(DOCKER_HUB)
    }

    /// The host (and port) the registry's HTTP API answers on.
    pub fn api_host(&self) -> &str {
        match self.registry_name() {
            DOCKER_HUB | "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB_API,
            r => r,
        }
    }

    /// The repository as the registry API names it (`library/nginx` for `nginx` on Docker Hub).
    pub fn api_repository(&self) -> String {
        if self.api_host() == DOCKER_HUB_API && !self.repository.contains('/') {
            format!("library/{}", self.repository)
        } else {
            self.repository.clone()
        }
    }

    /// `registry/repository` as written, without tag or digest.
    pub fn name(&self) -> String {
        match &self.registry {
            Some(r) => format!("{r}/{}", self.repository),
            None => self.repository.clone(),
        }
    }

    /// What to ask the registry for: the digest if there is one, else the tag (`latest` if none).
    pub fn api_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// `name@digest`: the reference pinned to `digest`.
    pub fn pinned(&self, digest: &str) -> String {
        format!("{}@{digest}", self.name())
    }

    /// Whether the registry is on this machine (loopback), where plain http is expected.
    pub fn registry_is_loopback(&self) -> bool {
        let host = self.api_host();
        let host = match host.rfind(':') {
            Some(i) if !host.ends_with(']') => &host[..i],
            _ => host,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// A tag as Docker allows it: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && (t.as_bytes()[0].is_ascii_alphanumeric() || t.as_bytes()[0] == b'_')
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_path_component(p: &str) -> bool {
    let b = p.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or '-'+.
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &p[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// The reference a component runs: `image` with `{version}` substituted, and with the version as
/// its tag when it names neither a tag nor a digest.
pub fn with_version(image: &str, version: &str) -> String {
    let rendered =
        crate::subst::render_partial(image, |n| (n == "version").then(|| version.to_string()));
    // render_partial re-escapes braces; an image has none once `{version}` is gone.
    let rendered = rendered.replace("{{", "{").replace("}}", "}");
    match ImageRef::parse(&rendered) {
        Ok(r) if r.tag.is_none() && r.digest.is_none() => format!("{rendered}:{version}"),
        _ => rendered,
    }
}

/// Where a Docker `config.json` keeps the credentials of one registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigAuth {
    /// In the file itself (`auths`: `auth` = base64 of `user:password`, or `username` and
    /// `password`).
    Basic(String, String),
    /// In a credential helper: the program `docker-credential-NAME` (from `credHelpers` for
    /// this registry, else `credsStore`), asked for `server`.
    Helper { name: String, server: String },
}

/// Where the text of a Docker `config.json` says the credentials for `registry` (as written in
/// references, e.g. `127.0.0.1:5000` or `docker.io`) are, in Docker's own order: the registry's
/// `credHelpers` entry, then `credsStore`, then `auths`. `None`: nowhere (or not JSON).
pub fn config_auth(config_json: &str, registry: &str) -> Option<ConfigAuth> {
    let v: serde_json::Value = serde_json::from_str(config_json).ok()?;
    let hub = is_hub(registry);
    let host_of = |k: &str| -> String {
        let host = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        host.split('/').next().unwrap_or(host).to_string()
    };
    let matches = |k: &str| {
        let host = host_of(k);
        host == registry || (hub && is_hub(&host))
    };
    // Docker asks helpers for Docker Hub by its legacy index URL, for others by host.
    let server = if hub {
        "https://index.docker.io/v1/".to_string()
    } else {
        registry.to_string()
    };
    let helper = |name: &str| ConfigAuth::Helper {
        name: name.to_string(),
        server: server.clone(),
    };
    if let Some(name) = v
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .and_then(|h| h.iter().find(|(k, _)| matches(k)))
        .and_then(|(_, n)| n.as_str())
        .filter(|n| !n.is_empty())
    {
        return Some(helper(name));
    }
    if let Some(name) = v
        .get("credsStore")
        .and_then(|n| n.as_str())
        .filter(|n| !n.is_empty())
    {
        return Some(helper(name));
    }
    let entry = v
        .get("auths")?
        .as_object()?
        .iter()
        .find_map(|(k, e)| matches(k).then_some(e))?;
    if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
        let decoded = base64_decode(auth)?;
        let text = String::from_utf8(decoded).ok()?;
        let (u, p) = text.split_once(':')?;
        return Some(ConfigAuth::Basic(u.to_string(), p.to_string()));
    }
    let u = entry.get("username")?.as_str()?;
    let p = entry.get("password")?.as_str()?;
    Some(ConfigAuth::Basic(u.to_string(), p.to_string()))
}

fn is_hub(registry: &str) -> bool {
    matches!(
        registry,
        DOCKER_HUB | "index.docker.io" | "registry-1.docker.io"
    )
}

/// Standard base64, padding optional (also the URL-safe alphabet); `None` if it is not base64.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::DecodePaddingMode;
    use base64::Engine;
    let cfg = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let s = s.trim();
    GeneralPurpose::new(&base64::alphabet::STANDARD, cfg)
        .decode(s)
        .or_else(|_| GeneralPurpose::new(&base64::alphabet::URL_SAFE, cfg).decode(s))
        .ok()
}

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Parse a memory size: bytes, or a number with a unit `b`, `k`, `m`, `g` (binary: 1k = 1024),
/// optionally followed by `b`/`ib` (`512m`, `1.5g`, `256MiB`, `64MB`).
pub fn parse_memory(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let unit = unit.trim();
    let mult: u64 = match unit {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    let v = n * mult as f64;
    (v.is_finite() && v >= 0.0 && v < u64::MAX as f64).then_some(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let r = ImageRef::parse("127.0.0.1:5000/drover-demo:v1").unwrap();
        assert_eq!(r.registry.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(r.repository, "drover-demo");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert!(r.registry_is_loopback());
        assert_eq!(
            r.pinned(&format!("sha256:{}", "a".repeat(64))),
            format!("127.0.0.1:5000/drover-demo@sha256:{}", "a".repeat(64))
        );

        let r = ImageRef::parse("nginx").unwrap();
        assert_eq!(r.registry_name(), "docker.io");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.api_repository(), "library/nginx");
        assert_eq!(r.api_reference(), "latest");
        assert!(!r.registry_is_loopback());

        let r = ImageRef::parse("localhost/team/app_x:1.2.3").unwrap();
        assert_eq!(r.registry.as_deref(), Some("localhost"));
        assert_eq!(r.repository, "team/app_x");
        assert_eq!(r.to_string(), "localhost/team/app_x:1.2.3");

        let d = format!("sha256:{}", "0f".repeat(32));
        let r = ImageRef::parse(&format!("ghcr.io/o/a:t@{d}")).unwrap();
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.api_reference(), d);

        for bad in [
            "",
            "UPPER/case",
            "a//b",
            "app:",
            "app:-x",
            "app@sha256:xyz",
            "-app",
            "app--",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn version_becomes_tag() {
        assert_eq!(with_version("reg:5000/app", "v2"), "reg:5000/app:v2");
        assert_eq!(
            with_version("reg:5000/app:{version}-slim", "v2"),
            "reg:5000/app:v2-slim"
        );
        assert_eq!(with_version("app:stable", "v2"), "app:stable");
    }

    #[test]
    fn credentials_from_config() {
        let cfg = format!(
            r#"{{"auths": {{"127.0.0.1:5000": {{"auth": "{}"}}, "https://index.docker.io/v1/": {{"username": "hub", "password": "pw"}}}}}}"#,
            base64_encode(b"alice:s3cret:x")
        );
        assert_eq!(
            config_auth(&cfg, "127.0.0.1:5000"),
            Some(ConfigAuth::Basic("alice".into(), "s3cret:x".into()))
        );
        assert_eq!(
            config_auth(&cfg, "docker.io"),
            Some(ConfigAuth::Basic("hub".into(), "pw".into()))
        );
        assert_eq!(config_auth(&cfg, "ghcr.io"), None);
        assert_eq!(config_auth("not json", "ghcr.io"), None);
    }

    #[test]
    fn credential_helpers_come_first_as_in_docker() {
        let cfg = r#"{"auths": {"ghcr.io": {}, "127.0.0.1:5000": {"auth": "YTpi"}},
                      "credsStore": "desktop", "credHelpers": {"ghcr.io": "gh"}}"#;
        let helper = |name: &str, server: &str| {
            Some(ConfigAuth::Helper {
                name: name.into(),
                server: server.into(),
            })
        };
        assert_eq!(config_auth(cfg, "ghcr.io"), helper("gh", "ghcr.io"));
        assert_eq!(
            config_auth(cfg, "127.0.0.1:5000"),
            helper("desktop", "127.0.0.1:5000")
        );
        assert_eq!(
            config_auth(cfg, "docker.io"),
            helper("desktop", "https://index.docker.io/v1/")
        );
    }

    #[test]
    fn base64_round_trip() {
        for s in [&b""[..], b"a", b"ab", b"abc", b"abcd", b"\xff\x00\x10"] {
            assert_eq!(base64_decode(&base64_encode(s)).unwrap(), s);
        }
        assert_eq!(base64_encode(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64_decode("dXNlcjpwYXM").unwrap(), b"user:pas");
        assert_eq!(base64_decode("not base64!"), None);
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512m"), Some(512 << 20));
        assert_eq!(parse_memory("1.5g"), Some(3 << 29));
        assert_eq!(parse_memory("256MiB"), Some(256 << 20));
        assert_eq!(parse_memory("4096"), Some(4096));
        assert_eq!(parse_memory("12 parsecs"), None);
        assert_eq!(parse_memory("m"), None);
    }
}
