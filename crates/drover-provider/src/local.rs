//! The `local` provider: every instance is an agent child process (`drover-agent`, or
//! `drover agent` when that binary is not installed) with its own
//! loopback address (127.B.x.y), its own directory, and a lifetime tied to the provider's.

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
    /// The data directory: instances live in `DATA/instances/ID/`, plans in `DATA/plans/`.
    pub data_dir: PathBuf,
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
        }
    }

    /// Where every instance's directory is.
    fn instances_root(&self) -> PathBuf {
        self.cfg.data_dir.join("instances")
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.instances_root().join(id)
    }

    fn plan_file(&self, req: &LaunchRequest) -> Result<PathBuf, ProviderError> {
        let dir = self.cfg.data_dir.join("plans");
        std::fs::create_dir_all(&dir).map_err(|e| ProviderError::Io(dir.clone(), e))?;
        let path = dir.join(format!(
            "{}-{}-g{}.json",
            req.plan.service, req.plan.region, req.plan.generation
        ));
        if !path.exists() {
            let body = serde_json::to_vec_pretty(&req.plan)
                .map_err(|e| ProviderError::Launch(e.to_string()))?;
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, body).map_err(|e| ProviderError::Io(tmp.clone(), e))?;
            std::fs::rename(&tmp, &path).map_err(|e| ProviderError::Io(path.clone(), e))?;
        }
        Ok(path)
    }

    fn spawn(&self, req: LaunchRequest) -> Result<Launched, ProviderError> {
        let addr = IpAddr::V4(drover_model::ids::loopback_addr(self.cfg.block, req.seq));
        let dir = self.instance_dir(&req.instance);
        std::fs::create_dir_all(&dir).map_err(|e| ProviderError::Io(dir.clone(), e))?;
        let plan_file = self.plan_file(&req)?;
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
            write_private(&token_file, token.as_bytes())
                .map_err(|e| ProviderError::Io(token_file.clone(), e))?;
            cmd.arg("--token-file").arg(&token_file);
            own_token = true;
        }
        if let Some(ca) = &self.cfg.credentials.ca {
            cmd.arg("--server-ca")
                .arg(&ca.file)
                .arg("--server-ca-sha256")
                .arg(&ca.sha256);
        }
        // The server's environment holds its own secrets (DROVER_TOKEN, registry and etcd
        // passwords, cloud keys): an agent, and so its components, get only the allow-list.
        cmd.env_clear().envs(agent_env(std::env::vars()));
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

/// Kill agents recorded in `DATA/instances/*/agent.pid` that are still running as
/// `drover agent` for that directory. Returns how many were killed.
pub fn reap_leftovers(data_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(data_dir.join("instances")) else {
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
}
