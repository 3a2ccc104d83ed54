//! The `local` provider: every instance is an agent child process (`drover-agent`, or
//! `drover agent` when that binary is not installed) with its own
//! loopback address (127.B.x.y), its own directory, and a lifetime tied to the provider's.
//!
//! Instance directories are outside the data directory ([`default_instances_dir`]:
//! `DATA.instances/ID/`), and hold all an agent reads: its plan (`plan.json`, `0600`), its
//! token (read and deleted at start) and the server's CA certificate. Nothing under the data
//! directory is handed to an instance, so with `run_as` (the region's user; the server runs as
//! root) an instance's agent and components run as that user and cannot read the data
//! directory (`0700`): its admin token, store and keys.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::tasks::Tasks;
use crate::{Exit, LaunchRequest, Launched, Provider, ProviderError};

/// How the local provider starts agents.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// The server's data directory (nothing of it is handed to an instance).
    pub data_dir: PathBuf,
    /// Where instance directories are made, `INSTANCES/ID/` ([`default_instances_dir`]).
    pub instances_dir: PathBuf,
    /// The user agents run as (the region's `run_as`: a name or `UID[:GID]`); `None`: the
    /// server's own. Needs the server to run as root.
    pub run_as: Option<String>,
    /// The drover binary to run as `drover agent`.
    pub drover_bin: PathBuf,
    /// The lean agent binary (`drover-agent`), run with the same arguments as `drover agent`
    /// instead of it; `None`: `drover agent`.
    pub agent_bin: Option<PathBuf>,
    /// Base URL of the server the agents report to.
    pub server_url: String,
    /// Second octet of the loopback block instance addresses come from (127.B.0.0/16).
    pub block: u8,
    pub heartbeat_interval: Duration,
    /// Tie every agent's life to this process (`drover up`): an agent gets SIGKILL when the
    /// process that launched it dies. Off for `drover server`, whose agents keep running
    /// without it and are adopted again when it restarts.
    pub tied: bool,
    /// Agent tokens and the server's CA: handed to each agent at launch, never on its
    /// command line (the token goes in a 0600 file the agent reads and deletes).
    pub credentials: crate::Credentials,
}

/// Local processes as instances.
pub struct LocalProvider {
    cfg: LocalConfig,
    exits: mpsc::UnboundedSender<Exit>,
    /// Live agents: instance id → pid (also the process group id).
    agents: Arc<Mutex<HashMap<String, u32>>>,
    /// Exit watchers and kills after a stop grace.
    tasks: Tasks,
    /// The environment agents' variables are taken from (through [`agent_env`]): `None`, the
    /// server's own; set by tests ([`LocalProvider::with_env`]), since setting a test
    /// process's own environment races its other threads.
    env: Option<Vec<(String, String)>>,
}

impl LocalProvider {
    /// A provider whose agents' exits are sent on `exits`. Call [`reap_leftovers`] once at
    /// start-up, before any provider on the same data directory launches.
    pub fn new(cfg: LocalConfig, exits: mpsc::UnboundedSender<Exit>) -> LocalProvider {
        LocalProvider {
            cfg,
            exits,
            agents: Arc::new(Mutex::new(HashMap::new())),
            tasks: Tasks::default(),
            env: None,
        }
    }

    /// Agents' variables taken from `vars` rather than from the server's environment (only
    /// the allow-list of them, as always).
    pub fn with_env(mut self, vars: Vec<(String, String)>) -> LocalProvider {
        self.env = Some(vars);
        self
    }

    /// Where every instance's directory is (outside the data directory).
    fn instances_root(&self) -> PathBuf {
        self.cfg.instances_dir.clone()
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.instances_root().join(id)
    }

    /// The instance's own copy of its plan, `DIR/plan.json` (`0600`, the instance's user's):
    /// never a file of the data directory, which holds every group's plan and secrets.
    fn plan_file(
        &self,
        req: &LaunchRequest,
        dir: &Path,
        user: Option<&User>,
    ) -> Result<PathBuf, ProviderError> {
        let path = dir.join("plan.json");
        let body = serde_json::to_vec_pretty(&req.plan)
            .map_err(|e| ProviderError::Launch(e.to_string()))?;
        write_owned(&path, &body, 0o600, user)?;
        Ok(path)
    }

    /// The instances directory (made `0711`: each instance reaches its own directory, lists
    /// none; one that exists keeps its mode) and a new directory for one instance (`0700`,
    /// the server's until [`LocalProvider::spawn`] has written its files into it: then the
    /// instance's user's, so no other process of that user can plant a link the server
    /// would write through).
    fn make_instance_dir(&self, id: &str) -> Result<PathBuf, ProviderError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let root = &self.cfg.instances_dir;
        let io = |p: &Path, e| ProviderError::Io(p.to_path_buf(), e);
        if !root.is_dir() {
            if let Some(parent) = root.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
            }
            match std::fs::DirBuilder::new().mode(0o711).create(root) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io(root, e)),
                _ => {}
            }
            // Whatever the umask says.
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| io(root, e))?;
        }
        let dir = self.instance_dir(id);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io(&dir, e))?;
        Ok(dir)
    }

    fn spawn(&self, req: LaunchRequest) -> Result<Launched, ProviderError> {
        let addr = IpAddr::V4(drover_model::ids::loopback_addr(self.cfg.block, req.seq));
        let user = match &self.cfg.run_as {
            Some(spec) => Some(User::lookup(spec)?),
            None => None,
        };
        let dir = self.make_instance_dir(&req.instance)?;
        let plan_file = self.plan_file(&req, &dir, user.as_ref())?;
        let log_path = dir.join("agent.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| ProviderError::Io(log_path.clone(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| ProviderError::Io(log_path.clone(), e))?;
        let program = self.cfg.agent_bin.as_ref().unwrap_or(&self.cfg.drover_bin);
        // Written while the directory was the server's alone; now the instance's.
        let own_dir = |user: &User| {
            std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid))
                .map_err(|e| ProviderError::Io(dir.clone(), e))
        };
        let mut cmd = tokio::process::Command::new(program);
        if self.cfg.agent_bin.is_none() {
            cmd.arg("agent");
        }
        // Its own instance token: it cannot speak for any other instance of its group.
        let mut own_token = false;
        if let Some(token) = self
            .cfg
            .credentials
            .instance_token(&req.group, &req.instance)
        {
            let token_file = dir.join("agent.token");
            write_owned(&token_file, token.as_bytes(), 0o600, user.as_ref())?;
            cmd.arg("--token-file").arg(&token_file);
            own_token = true;
        }
        if let Some(ca) = &self.cfg.credentials.ca {
            // A copy: the server's lives in the data directory. Public, and pinned anyway.
            let pem = std::fs::read(&ca.file).map_err(|e| ProviderError::Io(ca.file.clone(), e))?;
            let ca_file = dir.join("server-ca.pem");
            write_owned(&ca_file, &pem, 0o644, user.as_ref())?;
            cmd.arg("--server-ca")
                .arg(&ca_file)
                .arg("--server-ca-sha256")
                .arg(&ca.sha256);
        }
        // The server's environment holds its own secrets (DROVER_TOKEN, registry and etcd
        // passwords, cloud keys): an agent, and so its components, get only the allow-list.
        let vars: Box<dyn Iterator<Item = (String, String)>> = match &self.env {
            Some(v) => Box::new(v.clone().into_iter()),
            None => Box::new(std::env::vars()),
        };
        cmd.env_clear().envs(agent_env(vars));
        if let Some(u) = &user {
            own_dir(u)?;
            // std drops the supplementary groups too when root sets a uid.
            cmd.uid(u.uid).gid(u.gid);
            cmd.env("HOME", &dir);
            if let Some(name) = &u.name {
                cmd.env("USER", name).env("LOGNAME", name);
            } else {
                cmd.env_remove("USER").env_remove("LOGNAME");
            }
        }
        cmd.arg("--instance")
            .arg(&req.instance)
            .arg("--group")
            .arg(&req.group)
            .arg("--addr")
            .arg(addr.to_string())
            .arg("--server")
            .arg(&self.cfg.server_url)
            .arg("--plan-file")
            .arg(&plan_file)
            .arg("--dir")
            .arg(&dir)
            .arg("--heartbeat-interval")
            .arg(drover_model::Dur(self.cfg.heartbeat_interval).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(false)
            .process_group(0);
        if self.cfg.tied {
            // SAFETY: prctl is async-signal-safe; it ties the agent's life to this process, so
            // no agent outlives the provider, even when the provider is killed with SIGKILL.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|e| {
            ProviderError::Launch(format!("cannot start {}: {e}", program.display()))
        })?;
        let pid = child.id().unwrap_or_default();
        let _ = std::fs::write(dir.join("agent.pid"), pid.to_string());
        self.agents
            .lock()
            .expect("agents lock")
            .insert(req.instance.clone(), pid);
        let exits = self.exits.clone();
        let agents = self.agents.clone();
        let instance = req.instance.clone();
        let pid_file = dir.join("agent.pid");
        self.tasks.spawn(async move {
            let status = match child.wait().await {
                Ok(s) => describe(s),
                Err(e) => format!("wait failed: {e}"),
            };
            agents.lock().expect("agents lock").remove(&instance);
            let _ = std::fs::remove_file(pid_file);
            tracing::info!(%instance, %status, "agent exited");
            let _ = exits.send(Exit { instance, status });
        });
        Ok(Launched {
            provider_id: format!("pid:{pid}"),
            addr,
            instance: None,
            own_token,
        })
    }
}

/// A user agents run as: `run_as` resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// The name, when given by name.
    pub name: Option<String>,
}

impl User {
    /// `NAME` (from the user database: its uid and primary group) or `UID[:GID]` (the gid
    /// defaults to the uid). Only a server running as root can run agents as another user.
    pub fn lookup(spec: &str) -> Result<User, ProviderError> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(ProviderError::Launch(format!(
                "run_as = {spec:?} needs the server to run as root (it runs as uid {euid}); \
                 remove run_as to run instances as the server's user"
            )));
        }
        let (u, g) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let bad = || ProviderError::Launch(format!("run_as = {spec:?}: no such user"));
        let user = if let Ok(uid) = u.parse::<u32>() {
            User {
                uid,
                gid: uid,
                name: None,
            }
        } else {
            let (uid, gid) = getpwnam(u).ok_or_else(bad)?;
            User {
                uid,
                gid,
                name: Some(u.to_string()),
            }
        };
        let gid = match g {
            Some(g) => g.parse::<u32>().map_err(|_| bad())?,
            None => user.gid,
        };
        Ok(User { gid, ..user })
    }
}

/// The uid and primary gid of a user name.
fn getpwnam(name: &str) -> Option<(u32, u32)> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a zeroed passwd is a valid out-buffer; buf outlives the call; result points
    // into pw or is null.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let r = libc::getpwnam_r(
            c.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        (r == 0 && !result.is_null()).then_some((pw.pw_uid, pw.pw_gid))
    }
}

/// Where instance directories go by default: beside the data directory, not in it,
/// `DATA.instances` (`/var/lib/drover` → `/var/lib/drover.instances`).
pub fn default_instances_dir(data_dir: &Path) -> PathBuf {
    let abs = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "drover".into());
    abs.with_file_name(format!("{name}.instances"))
}

/// [`write_private`] with `mode`, owned by `user` when given.
fn write_owned(
    path: &Path,
    data: &[u8],
    mode: u32,
    user: Option<&User>,
) -> Result<(), ProviderError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e| ProviderError::Io(path.to_path_buf(), e);
    write_private(path, data).map_err(io)?;
    if let Some(u) = user {
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid)).map_err(io)?;
    }
    if mode != 0o600 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    Ok(())
}

/// Write a file only its owner can read (created 0600, truncated if it exists).
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn describe(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "ended".to_string(),
    }
}

fn signal_group(pid: u32, sig: i32) {
    if pid > 1 {
        // SAFETY: plain syscalls on a pid we started; errors (ESRCH) are harmless.
        unsafe {
            libc::kill(-(pid as i32), sig);
            libc::kill(pid as i32, sig);
        }
    }
}

impl Provider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<Launched, ProviderError>> {
        Box::pin(async move { self.spawn(req) })
    }

    fn terminate(
        &self,
        instance: &str,
        grace: Duration,
    ) -> BoxFuture<'_, Result<(), ProviderError>> {
        let pid = self
            .agents
            .lock()
            .expect("agents lock")
            .get(instance)
            .copied();
        let agents = self.agents.clone();
        let instance = instance.to_string();
        Box::pin(async move {
            let Some(pid) = pid else {
                return Ok(()); // already gone
            };
            // The agent stops its components gracefully on SIGTERM.
            signal_group(pid, libc::SIGTERM);
            self.tasks.spawn(async move {
                let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(2);
                while tokio::time::Instant::now() < deadline {
                    if !agents.lock().expect("agents lock").contains_key(&instance) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tracing::warn!(%instance, pid, "agent did not stop in time; killing it");
                signal_group(pid, libc::SIGKILL);
            });
            Ok(())
        })
    }

    fn alive(&self, instance: &str) -> bool {
        self.agents
            .lock()
            .expect("agents lock")
            .contains_key(instance)
    }

    fn adopt(&self, instance: &str) -> bool {
        let pid_file = self.instance_dir(instance).join("agent.pid");
        let Some(pid) = read_pid(&pid_file) else {
            return false;
        };
        if !is_our_agent(pid, &self.instance_dir(instance)) {
            return false;
        }
        self.agents
            .lock()
            .expect("agents lock")
            .insert(instance.to_string(), pid);
        // Not our child: watch /proc for its end.
        let exits = self.exits.clone();
        let agents = self.agents.clone();
        let instance = instance.to_string();
        self.tasks.spawn(async move {
            while process_running(pid) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            agents.lock().expect("agents lock").remove(&instance);
            let _ = std::fs::remove_file(pid_file);
            tracing::info!(%instance, "adopted agent exited");
            let _ = exits.send(Exit {
                instance,
                status: "exited (adopted agent)".into(),
            });
        });
        tracing::info!(pid, "adopted a running agent");
        true
    }

    fn unrecorded(&self, known: &std::collections::BTreeSet<String>) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.instances_root()) else {
            return Vec::new();
        };
        let mut found: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| !known.contains(id) && self.adopt(id))
            .collect();
        found.sort();
        found
    }

    fn shutdown(&self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let pids: Vec<u32> = self
                .agents
                .lock()
                .expect("agents lock")
                .values()
                .copied()
                .collect();
            for pid in &pids {
                signal_group(*pid, libc::SIGTERM);
            }
            let deadline = tokio::time::Instant::now() + grace;
            while tokio::time::Instant::now() < deadline
                && !self.agents.lock().expect("agents lock").is_empty()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let left: Vec<u32> = self
                .agents
                .lock()
                .expect("agents lock")
                .values()
                .copied()
                .collect();
            for pid in left {
                signal_group(pid, libc::SIGKILL);
            }
            // Give the reaper tasks a moment so exits are recorded.
            for _ in 0..50 {
                if self.agents.lock().expect("agents lock").is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.tasks.close())
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` runs `drover agent` or `drover-agent` (or a stand-in that keeps the word
/// `agent` and the directory in its arguments) for the instance directory `dir`.
fn is_our_agent(pid: u32, dir: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    runs_agent_for(&String::from_utf8_lossy(&cmdline), dir) && process_running(pid)
}

/// Whether a `/proc/PID/cmdline` (arguments separated by NULs) is an agent's for `dir`.
fn runs_agent_for(cmdline: &str, dir: &Path) -> bool {
    let args: Vec<&str> = cmdline.split('\0').collect();
    let agent = args.iter().skip(1).any(|a| *a == "agent")
        || args
            .first()
            .is_some_and(|a0| Path::new(a0).file_name() == Some("drover-agent".as_ref()));
    let dir = dir.display().to_string();
    agent && args.iter().any(|a| *a == dir)
}

/// Whether a process exists and is not a zombie.
fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Variables of the server's environment an agent (and so its components) inherits: what a
/// process needs to run (search path, locale, time zone, temporary directory, home), the
/// agent's log settings and how to reach Docker. Nothing else: the server's environment holds
/// secrets (`DROVER_TOKEN`, `DROVER_REGISTRY_PASSWORD`, `DROVER_ETCD_PASSWORD`, `AWS_*`).
pub const AGENT_ENV_ALLOW: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "NO_COLOR",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "XDG_RUNTIME_DIR",
];

/// The allowed part of `vars` ([`AGENT_ENV_ALLOW`], and `LC_*`).
pub fn agent_env(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    vars.filter(|(k, _)| AGENT_ENV_ALLOW.contains(&k.as_str()) || k.starts_with("LC_"))
        .collect()
}

/// Kill agents recorded in `INSTANCES/*/agent.pid` (`instances_dir`, see
/// [`default_instances_dir`]) that are still running as `drover agent` for that directory.
/// Returns how many were killed.
pub fn reap_leftovers(instances_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(instances_dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let pid_file = e.path().join("agent.pid");
        let Some(pid) = read_pid(&pid_file) else {
            continue;
        };
        if is_our_agent(pid, &e.path()) {
            signal_group(pid, libc::SIGKILL);
            n += 1;
        }
        let _ = std::fs::remove_file(&pid_file);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_inherit_only_the_allow_list() {
        let vars = [
            ("PATH", "/usr/bin"),
            ("LC_ALL", "C.UTF-8"),
            ("DROVER_TOKEN", "drover_admin_x"),
            ("DROVER_REGISTRY_PASSWORD", "p"),
            ("DROVER_ETCD_PASSWORD", "p"),
            ("AWS_SECRET_ACCESS_KEY", "k"),
            ("AWS_ACCESS_KEY_ID", "k"),
            ("RUST_LOG", "debug"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let got: Vec<String> = agent_env(vars.into_iter())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(got, ["PATH", "LC_ALL", "RUST_LOG"]);
    }

    #[test]
    fn agents_are_recognized_by_their_command_line() {
        let dir = Path::new("/d/instances/i-000001");
        let yes = [
            "/usr/bin/drover\0agent\0--token-file\0/t\0--dir\0/d/instances/i-000001\0",
            "/usr/bin/drover-agent\0--instance\0i-000001\0--dir\0/d/instances/i-000001\0",
            // bench/fleet.sh's stand-in for an agent.
            "/b/drover\0hold\0agent\0/d/instances/i-000001\0",
        ];
        for c in yes {
            assert!(runs_agent_for(c, dir), "{c:?}");
        }
        let no = [
            "/usr/bin/drover\0agent\0--dir\0/d/instances/i-000002\0",
            "/usr/bin/drover\0server\0--data-dir\0/d/instances/i-000001\0",
            "/bin/sleep\0/d/instances/i-000001\0",
            "",
        ];
        for c in no {
            assert!(!runs_agent_for(c, dir), "{c:?}");
        }
    }
    /// At the spawn: an agent (a stand-in script that writes its environment down) gets the
    /// allow-list of the server's environment and nothing else, neither the secrets beside
    /// it nor anything the server itself inherited.
    #[tokio::test]
    async fn a_launched_agent_gets_only_the_allow_list() {
        let tmp = tempfile::tempdir().unwrap();
        let dump = tmp.path().join("env.txt");
        let script = tmp.path().join("fake-agent");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nenv > '{}.part'\nmv '{0}.part' '{0}'\n",
                dump.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let allowed = |k: &str| AGENT_ENV_ALLOW.contains(&k) || k.starts_with("LC_");
        // The server's environment: this process's (cargo's CARGO_* and the like are not on
        // the list: they must not come through either) and secrets.
        let mut vars: Vec<(String, String)> = std::env::vars().collect();
        assert!(
            vars.iter().any(|(k, _)| !allowed(k)),
            "this test needs a variable off the list in its environment (cargo sets CARGO_*)"
        );
        vars.retain(|(k, _)| !matches!(k.as_str(), "PATH" | "RUST_LOG" | "LC_ALL"));
        for (k, v) in [
            ("PATH", "/usr/bin:/bin"),
            ("RUST_LOG", "drover=debug"),
            ("LC_ALL", "C"),
            ("DROVER_TOKEN", "drover_admin_secret"),
            ("DROVER_REGISTRY_PASSWORD", "registry-secret"),
            ("DROVER_ETCD_PASSWORD", "etcd-secret"),
            ("AWS_SECRET_ACCESS_KEY", "aws-secret"),
        ] {
            vars.push((k.into(), v.into()));
        }
        let data_dir = tmp.path().join("data");
        let (exits, mut exited) = mpsc::unbounded_channel();
        let provider = LocalProvider::new(
            LocalConfig {
                instances_dir: default_instances_dir(&data_dir),
                data_dir,
                run_as: None,
                drover_bin: "/bin/false".into(),
                agent_bin: Some(script),
                server_url: "http://127.0.0.1:1".into(),
                block: 77,
                heartbeat_interval: Duration::from_secs(1),
                tied: true,
                credentials: Default::default(),
            },
            exits,
        )
        .with_env(vars);
        provider
            .launch(LaunchRequest {
                instance: "i-000001".into(),
                seq: 1,
                group: "web/local".into(),
                plan: drover_model::Plan {
                    fleet: "f".into(),
                    service: "web".into(),
                    region: "local".into(),
                    generation: 1,
                    revision: 1,
                    components: Vec::new(),
                },
            })
            .await
            .unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(10), exited.recv())
            .await
            .expect("the stand-in agent exits")
            .unwrap();
        let got = std::fs::read_to_string(&dump).unwrap_or_else(|e| panic!("{exit:?}: {e}"));
        let names: Vec<&str> = got
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, _)| k)
            .collect();
        for secret in [
            "DROVER_TOKEN",
            "DROVER_REGISTRY_PASSWORD",
            "DROVER_ETCD_PASSWORD",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(
                !names.contains(&secret),
                "{secret} reached the agent:\n{got}"
            );
        }
        // The shell's own (sh sets PWD, some SHLVL and _) besides the list.
        let off: Vec<&&str> = names
            .iter()
            .filter(|k| !allowed(k) && !matches!(**k, "PWD" | "OLDPWD" | "SHLVL" | "_"))
            .collect();
        assert!(off.is_empty(), "off the allow-list: {off:?}\n{got}");
        for want in ["PATH=/usr/bin:/bin", "RUST_LOG=drover=debug", "LC_ALL=C"] {
            assert!(got.lines().any(|l| l == want), "no {want}:\n{got}");
        }
    }
}
