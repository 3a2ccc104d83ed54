//! How the CLI reaches the server: which URL, which token, which CA.
//!
//! - URL: `--server` / `DROVER_SERVER`, else the `server.url` the server wrote in the data
//!   directory (`--data-dir` / `DROVER_DATA_DIR`, default `.drover`), else
//!   `http://127.0.0.1:7878`. The data directory's `server.url` is used only when the
//!   directory is this user's and closed to others (the server makes it `0700`): a `.drover`
//!   that someone else could write (planted in a checkout, say) would otherwise send them
//!   `DROVER_TOKEN`. Such a directory is an error that says what to do.
//! - Token: `--token` / `DROVER_TOKEN`, else `DATA/admin.token`, but only when the URL is the
//!   one that data directory's server wrote (a local token is never sent to another server).
//! - CA (for `https`): `--ca FILE` / `DROVER_CA`, else `DATA/ca.pem` when present, else the
//!   usual public roots. `--insecure` skips verification, with a warning.

use std::path::{Path, PathBuf};

use anyhow::Context;

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7878";

/// What the CLI knows about reaching the server.
#[derive(Clone)]
pub struct Access {
    pub server: String,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
    pub insecure: bool,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "(hidden)"))
            .field("ca", &self.ca)
            .field("insecure", &self.insecure)
            .finish()
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// Why `path` (a data directory, or a file in it) may hold what someone else wrote: not
/// owned by this user, or writable by others (a directory: open to others at all).
fn not_private(path: &Path, dir: bool) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Some(format!(
            "{} belongs to uid {}, not to you (uid {me})",
            path.display(),
            m.uid()
        ));
    }
    let open = if dir { 0o077 } else { 0o022 };
    if m.mode() & open != 0 {
        return Some(format!(
            "{} is open to others (mode {:o})",
            path.display(),
            m.mode() & 0o777
        ));
    }
    None
}

/// The data directory's `server.url`, if there is one and the directory is private to this
/// user (its own, `0700`, the file not writable by others); an error for one that is not.
pub fn local_server_url(data_dir: &Path) -> anyhow::Result<Option<String>> {
    let path = data_dir.join("server.url");
    let Some(url) = read_trimmed(&path) else {
        return Ok(None);
    };
    if let Some(why) = not_private(data_dir, true).or_else(|| not_private(&path, false)) {
        anyhow::bail!(
            "not using {}: {why}, so anyone could have written the URL your token would go to \
             (a drover server makes its data directory yours and 0700). Name the server with \
             --server URL (or DROVER_SERVER), or another data directory with --data-dir; if \
             this one is yours, `chmod 700 {}`",
            path.display(),
            data_dir.display()
        );
    }
    Ok(Some(url))
}

/// Work out the URL, token and CA from the flags, the environment and the data directory.
/// An error when the URL would come from a data directory that is not private to this user.
pub fn resolve(
    server: Option<String>,
    token: Option<String>,
    ca: Option<PathBuf>,
    insecure: bool,
    data_dir: &Path,
) -> anyhow::Result<Access> {
    let local_url = match (&server, local_server_url(data_dir)) {
        (_, Ok(url)) => url,
        // Named elsewhere: the directory's URL (and so its token) is not used.
        (Some(_), Err(_)) => None,
        (None, Err(e)) => return Err(e),
    };
    let server = server
        .or_else(|| local_url.clone())
        .unwrap_or_else(|| DEFAULT_SERVER.to_string())
        .trim_end_matches('/')
        .to_string();
    let token = token.filter(|t| !t.trim().is_empty()).or_else(|| {
        // `server.url` lists every server of that control plane (comma separated): the
        // token goes only to servers of that list.
        let same_server = local_url.as_deref().is_some_and(|u| {
            let local: Vec<&str> = u
                .split(',')
                .map(|u| u.trim().trim_end_matches('/'))
                .collect();
            server
                .split(',')
                .map(|s| s.trim().trim_end_matches('/'))
                .all(|s| local.contains(&s))
        });
        same_server
            .then(|| read_trimmed(&data_dir.join(drover_server::auth::ADMIN_TOKEN_FILE)))
            .flatten()
    });
    let ca = ca.or_else(|| {
        let p = data_dir.join("ca.pem");
        (server.starts_with("https://") && p.exists()).then_some(p)
    });
    Ok(Access {
        server,
        token: token.map(|t| t.trim().to_string()),
        ca,
        insecure,
    })
}

impl Access {
    /// The HTTP client: the token on every request, the CA trusted.
    pub fn client(&self) -> anyhow::Result<reqwest::Client> {
        let mut b = reqwest::Client::builder();
        if let Some(token) = &self.token {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .context("the token is not valid text")?;
            v.set_sensitive(true);
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(reqwest::header::AUTHORIZATION, v);
            b = b.default_headers(h);
        }
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read the CA {}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("{} is not a PEM certificate", ca.display()))?;
            // The given CA only: not the public roots as well.
            b = b.tls_built_in_root_certs(false).add_root_certificate(cert);
        }
        if self.insecure {
            eprintln!(
                "warning: --insecure: the server's certificate is not verified; anyone between you and {} can read your token",
                self.server
            );
            b = b.danger_accept_invalid_certs(true);
        }
        b.build().context("cannot build the HTTP client")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory as a server makes it: this user's, 0700.
    fn private_dir() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    #[test]
    fn the_local_token_goes_to_the_servers_of_the_local_control_plane_only() {
        let dir = private_dir();
        std::fs::write(
            dir.path().join("server.url"),
            "http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3",
        )
        .unwrap();
        std::fs::write(dir.path().join("admin.token"), "drover_admin_x\n").unwrap();
        let token = |server: &str| {
            resolve(Some(server.into()), None, None, false, dir.path())
                .unwrap()
                .token
        };
        assert_eq!(
            token("http://127.0.0.1:2").as_deref(),
            Some("drover_admin_x")
        );
        assert_eq!(
            token("http://127.0.0.1:3,http://127.0.0.1:1/").as_deref(),
            Some("drover_admin_x")
        );
        assert_eq!(token("http://127.0.0.1:2,http://10.0.0.1:7878"), None);
        assert_eq!(token("http://10.0.0.1:7878"), None);
    }

    #[test]
    fn the_local_token_goes_only_to_the_local_server() {
        let dir = private_dir();
        std::fs::write(dir.path().join("server.url"), "http://127.0.0.1:9999\n").unwrap();
        std::fs::write(dir.path().join("admin.token"), "drover_admin_x\n").unwrap();
        let a = resolve(None, None, None, false, dir.path()).unwrap();
        assert_eq!(a.server, "http://127.0.0.1:9999");
        assert_eq!(a.token.as_deref(), Some("drover_admin_x"));
        let b = resolve(
            Some("http://10.0.0.1:7878".into()),
            None,
            None,
            false,
            dir.path(),
        )
        .unwrap();
        assert_eq!(b.token, None, "never sent to another server");
        let c = resolve(
            Some("http://10.0.0.1:7878".into()),
            Some("t".into()),
            None,
            false,
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.token.as_deref(), Some("t"));
        let d = resolve(None, None, None, false, &dir.path().join("nothing")).unwrap();
        assert_eq!(d.server, DEFAULT_SERVER);
        assert_eq!(d.token, None);
    }

    #[test]
    fn a_token_never_goes_to_a_url_found_in_a_directory_others_can_write() {
        use std::os::unix::fs::PermissionsExt;
        // A `.drover` planted where the user runs drover: the URL is the planter's.
        let dir = tempfile::tempdir().unwrap();
        let planted = dir.path().join(".drover");
        std::fs::create_dir(&planted).unwrap();
        std::fs::write(planted.join("server.url"), "http://10.9.9.9:7878\n").unwrap();
        let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        for (dir_mode, file_mode) in [(0o755, 0o644), (0o777, 0o644), (0o700, 0o666)] {
            mode(&planted, dir_mode).unwrap();
            mode(&planted.join("server.url"), file_mode).unwrap();
            let given = Some("drover_admin_mine".to_string());
            let e = resolve(None, given.clone(), None, false, &planted)
                .expect_err("the planted URL must not receive the user's token");
            let e = format!("{e:#}");
            assert!(e.contains("--server"), "says what to do: {e}");
            assert!(e.contains("open to others"), "{e}");
            // Named explicitly, the server gets the token; the directory is not used.
            let a = resolve(
                Some("http://127.0.0.1:7878".into()),
                given,
                None,
                false,
                &planted,
            )
            .unwrap();
            assert_eq!(a.server, "http://127.0.0.1:7878");
            assert_eq!(a.token.as_deref(), Some("drover_admin_mine"));
        }
        // The directory a server makes (its user's, 0700) is used.
        mode(&planted, 0o700).unwrap();
        mode(&planted.join("server.url"), 0o644).unwrap();
        let a = resolve(None, Some("t".into()), None, false, &planted).unwrap();
        assert_eq!(a.server, "http://10.9.9.9:7878");
    }
}
