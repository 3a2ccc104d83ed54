//! drover-creds: registry credentials as Docker finds them: `DROVER_REGISTRY_USER` and
//! `DROVER_REGISTRY_PASSWORD`, else `$DOCKER_CONFIG/config.json` (default
//! `~/.docker/config.json`) with its credential helpers (`credHelpers`, `credsStore`). Shared by
//! the server (resolving tags to digests) and the agent (pulling). Where the config says the
//! credentials are is decided by `drover_model::image::config_auth` (pure); this crate reads
//! the files and runs the helpers.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use drover_model::image::{config_auth, ConfigAuth};

/// How long a credential helper may take to answer.
pub const HELPER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Most bytes of a helper's output read (each of stdout and stderr).
const HELPER_OUTPUT_MAX: u64 = 1 << 20;

/// Where credentials come from.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// `DROVER_REGISTRY_USER` and `DROVER_REGISTRY_PASSWORD`: for every registry.
    pub env: Option<(String, String)>,
    /// The Docker `config.json` to read.
    pub docker_config: Option<PathBuf>,
    /// Where `docker-credential-*` programs are looked for (a `PATH`); `None`: the process's
    /// own `PATH`.
    pub helper_path: Option<OsString>,
    /// How long a helper may take; `None`: [`HELPER_TIMEOUT`].
    pub helper_timeout: Option<std::time::Duration>,
}

impl Sources {
    /// From the environment, as the module's doc says.
    pub fn from_env() -> Sources {
        let env = match (
            std::env::var("DROVER_REGISTRY_USER"),
            std::env::var("DROVER_REGISTRY_PASSWORD"),
        ) {
            (Ok(u), Ok(p)) if !u.is_empty() => Some((u, p)),
            _ => None,
        };
        let docker_config = match std::env::var_os("DOCKER_CONFIG") {
            Some(d) => Some(PathBuf::from(d).join("config.json")),
            None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")),
        };
        Sources {
            env,
            docker_config,
            helper_path: None,
            helper_timeout: None,
        }
    }

    /// The user name and password for `registry` (as written in references: `ghcr.io`,
    /// `127.0.0.1:5000`, `docker.io`). `Ok(None)`: none are configured (anonymous access);
    /// `Err`: they are configured but cannot be had, with what to fix.
    pub fn credentials(&self, registry: &str) -> Result<Option<(String, String)>, String> {
        if let Some(c) = &self.env {
            return Ok(Some(c.clone()));
        }
        let Some(path) = &self.docker_config else {
            return Ok(None);
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        match config_auth(&text, registry) {
            None => Ok(None),
            Some(ConfigAuth::Basic(u, p)) => Ok(Some((u, p))),
            Some(ConfigAuth::Helper { name, server }) => {
                self.run_helper(&name, &server).map_err(|e| {
                    format!(
                        "{e} (the credential helper {path} names for {registry})",
                        path = path.display()
                    )
                })
            }
        }
    }

    /// `docker-credential-NAME get`, asked for `server` on its standard input; it answers
    /// `{"Username": …, "Secret": …}`, or fails with "credentials not found".
    fn run_helper(&self, name: &str, server: &str) -> Result<Option<(String, String)>, String> {
        let program = format!("docker-credential-{name}");
        let resolved = self.find(&program).ok_or_else(|| {
            format!("`{program}` is not installed (not found in PATH): install it, or remove it from the Docker config")
        })?;
        let mut child = Command::new(&resolved)
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run `{program} get`: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(server.as_bytes());
        }
        // Its output is read while it runs (a helper that prints more than a pipe holds would
        // block on it otherwise), up to HELPER_OUTPUT_MAX bytes each.
        let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(p) = pipe {
                    use std::io::Read;
                    let _ = p.take(HELPER_OUTPUT_MAX).read_to_end(&mut buf);
                }
                buf
            })
        };
        let out_reader = drain(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        );
        let err_reader = drain(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        );
        // A helper that hangs (a locked keychain waiting for a prompt) must not hang the
        // caller: it gets HELPER_TIMEOUT, then it is killed.
        let timeout = self.helper_timeout.unwrap_or(HELPER_TIMEOUT);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "`{program} get` did not answer within {}",
                        drover_model::Dur(timeout)
                    ));
                }
                Err(e) => return Err(format!("cannot run `{program} get`: {e}")),
            }
        }
        let status = child
            .wait()
            .map_err(|e| format!("cannot run `{program} get`: {e}"))?;
        let out = std::process::Output {
            status,
            stdout: out_reader.join().unwrap_or_default(),
            stderr: err_reader.join().unwrap_or_default(),
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let said = format!(
                "{} {}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            if said.to_lowercase().contains("credentials not found") {
                return Ok(None);
            }
            return Err(format!(
                "`{program} get` failed ({}): {}",
                out.status,
                said.trim()
            ));
        }
        let v: serde_json::Value = serde_json::from_str(&stdout)
            .map_err(|e| format!("`{program} get` answered something that is not JSON: {e}"))?;
        let user = v
            .get("Username")
            .and_then(|u| u.as_str())
            .unwrap_or_default();
        let secret = v.get("Secret").and_then(|s| s.as_str()).unwrap_or_default();
        if user == "<token>" {
            return Err(format!(
                "`{program}` holds an identity token for {server}, which drover cannot use: set DROVER_REGISTRY_USER and DROVER_REGISTRY_PASSWORD"
            ));
        }
        if user.is_empty() {
            return Ok(None);
        }
        Ok(Some((user.to_string(), secret.to_string())))
    }

    fn find(&self, program: &str) -> Option<PathBuf> {
        let path = self
            .helper_path
            .clone()
            .or_else(|| std::env::var_os("PATH"))?;
        std::env::split_paths(&path)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A `docker-credential-NAME` script in `dir` that runs `body` (sh).
    fn helper(dir: &std::path::Path, name: &str, body: &str) {
        let p = dir.join(format!("docker-credential-{name}"));
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn sources(dir: &std::path::Path, config: &str) -> Sources {
        let cfg = dir.join("config.json");
        std::fs::write(&cfg, config).unwrap();
        Sources {
            env: None,
            docker_config: Some(cfg),
            helper_path: Some(dir.as_os_str().to_owned()),
            helper_timeout: None,
        }
    }

    #[test]
    fn helpers_are_asked_for_their_server() {
        let dir = tempfile::tempdir().unwrap();
        // Answers only for the server it is asked about, as real helpers do.
        helper(
            dir.path(),
            "fake",
            r#"s=$(cat); if [ "$s" = "127.0.0.1:5000" ]; then echo '{"ServerURL":"127.0.0.1:5000","Username":"alice","Secret":"pw"}'; else echo "credentials not found in native keychain"; exit 1; fi"#,
        );
        let src = sources(dir.path(), r#"{"credsStore": "fake"}"#);
        assert_eq!(
            src.credentials("127.0.0.1:5000").unwrap(),
            Some(("alice".into(), "pw".into()))
        );
        assert_eq!(src.credentials("ghcr.io").unwrap(), None);
    }

    #[test]
    fn a_broken_helper_says_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        helper(dir.path(), "broken", "echo 'keychain locked' >&2; exit 3");
        let src = sources(
            dir.path(),
            r#"{"credHelpers": {"ghcr.io": "broken", "quay.io": "missing"}}"#,
        );
        let e = src.credentials("ghcr.io").unwrap_err();
        assert!(
            e.contains("docker-credential-broken get") && e.contains("keychain locked"),
            "{e}"
        );
        let e = src.credentials("quay.io").unwrap_err();
        assert!(
            e.contains("docker-credential-missing") && e.contains("not installed"),
            "{e}"
        );
        helper(
            dir.path(),
            "tok",
            r#"echo '{"Username":"<token>","Secret":"x"}'"#,
        );
        let src = sources(dir.path(), r#"{"credsStore": "tok"}"#);
        assert!(src
            .credentials("docker.io")
            .unwrap_err()
            .contains("identity token"));
    }

    /// Issue 20, item 11: a helper that prints more than a pipe holds (64 KiB) answers; it
    /// used to block on its output until it was killed as hanging.
    #[test]
    fn a_helper_with_a_large_answer_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let pad = "x".repeat(200_000);
        helper(
            dir.path(),
            "big",
            &format!(
                r#"cat >/dev/null; echo '{{"Username":"alice","Secret":"pw","Pad":"{pad}"}}'"#
            ),
        );
        let mut src = sources(dir.path(), r#"{"credsStore": "big"}"#);
        src.helper_timeout = Some(std::time::Duration::from_secs(5));
        assert_eq!(
            src.credentials("ghcr.io").unwrap(),
            Some(("alice".into(), "pw".into()))
        );
    }

    #[test]
    fn a_hanging_helper_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        helper(dir.path(), "hang", "exec sleep 600");
        let mut src = sources(dir.path(), r#"{"credsStore": "hang"}"#);
        src.helper_timeout = Some(std::time::Duration::from_millis(300));
        let t0 = std::time::Instant::now();
        let e = src.credentials("ghcr.io").unwrap_err();
        assert!(e.contains("did not answer within 300ms"), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn environment_first_then_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = sources(
            dir.path(),
            &format!(
                r#"{{"auths": {{"r.example": {{"auth": "{}"}}}}}}"#,
                drover_model::image::base64_encode(b"bob:pw2")
            ),
        );
        assert_eq!(
            src.credentials("r.example").unwrap(),
            Some(("bob".into(), "pw2".into()))
        );
        src.env = Some(("env".into(), "e".into()));
        assert_eq!(
            src.credentials("r.example").unwrap(),
            Some(("env".into(), "e".into()))
        );
        src.env = None;
        src.docker_config = Some(dir.path().join("absent.json"));
        assert_eq!(src.credentials("r.example").unwrap(), None);
    }
}
