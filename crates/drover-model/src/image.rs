//! Container image references (`registry/repository:tag@sha256:…`) and registry credentials
//! from a Docker `config.json`. Pure: the callers read files and talk to registries.

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

/// Credentials for `registry` (as written in references, e.g. `127.0.0.1:5000` or `docker.io`)
/// from the text of a Docker `config.json` (`auths`: `auth` = base64 of `user:password`, or
/// `username` and `password`). Credential helpers (`credsStore`, `credHelpers`) are not used.
pub fn config_credentials(config_json: &str, registry: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(config_json).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let hub = matches!(
        registry,
        DOCKER_HUB | "index.docker.io" | "registry-1.docker.io"
    );
    let entry = auths.iter().find_map(|(k, e)| {
        let host = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let host = host.split('/').next().unwrap_or(host);
        let matches = host == registry
            || (hub
                && matches!(
                    host,
                    "index.docker.io" | "docker.io" | "registry-1.docker.io"
                ));
        matches.then_some(e)
    })?;
    if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
        let decoded = base64_decode(auth)?;
        let text = String::from_utf8(decoded).ok()?;
        let (u, p) = text.split_once(':')?;
        return Some((u.to_string(), p.to_string()));
    }
    let u = entry.get("username")?.as_str()?;
    let p = entry.get("password")?.as_str()?;
    Some((u.to_string(), p.to_string()))
}

/// Standard base64 (padding optional); `None` on any other character.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.trim().bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk.len();
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let x = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        out.push(T[(x >> 18) as usize & 63] as char);
        out.push(T[(x >> 12) as usize & 63] as char);
        out.push(if n > 1 {
            T[(x >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if n > 2 {
            T[x as usize & 63] as char
        } else {
            '='
        });
    }
    out
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
            config_credentials(&cfg, "127.0.0.1:5000"),
            Some(("alice".into(), "s3cret:x".into()))
        );
        assert_eq!(
            config_credentials(&cfg, "docker.io"),
            Some(("hub".into(), "pw".into()))
        );
        assert_eq!(config_credentials(&cfg, "ghcr.io"), None);
        assert_eq!(config_credentials("not json", "ghcr.io"), None);
    }

    #[test]
    fn base64_round_trip() {
        for s in [&b""[..], b"a", b"ab", b"abc", b"abcd", b"\xff\x00\x10"] {
            assert_eq!(base64_decode(&base64_encode(s)).unwrap(), s);
        }
        assert_eq!(base64_encode(b"user:pass"), "dXNlcjpwYXNz");
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
