//! The agent's command line and start, shared by `drover agent` and the lean `drover-agent`
//! binary (the same agent without the server, the CLI and the store linked in).

use std::path::PathBuf;

use anyhow::Context;
use drover_model::Dur;

use crate::exit;

/// `drover agent` / `drover-agent` arguments.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// This instance's id.
    #[arg(long, required_unless_present = "aws")]
    pub instance: Option<String>,
    /// Its group (`service/region`).
    #[arg(long, required_unless_present = "aws")]
    pub group: Option<String>,
    /// Its own address; components bind there.
    #[arg(long, required_unless_present = "aws")]
    pub addr: Option<std::net::IpAddr>,
    /// On an EC2 instance: the identity comes from instance metadata (IMDSv2), the server,
    /// group, token and plan from the boot document in the user-data, and the agent
    /// terminates its instance through its Auto Scaling group when it leaves (docs/aws.md).
    #[arg(long, conflicts_with_all = ["instance", "group", "addr", "plan_file", "standalone", "token_file", "server_ca"])]
    pub aws: bool,
    /// With --aws: the metadata endpoint (default: the standard one, or
    /// AWS_EC2_METADATA_SERVICE_ENDPOINT).
    #[arg(long, requires = "aws")]
    pub imds_endpoint: Option<String>,
    /// Run without reporting to any server (the global --server is ignored).
    #[arg(long)]
    pub standalone: bool,
    /// The plan to run (JSON), written by the provider at launch.
    #[arg(long, required_unless_present = "aws")]
    pub plan_file: Option<PathBuf>,
    /// The instance's own directory.
    #[arg(long, default_value = "/var/lib/drover/instance")]
    pub dir: PathBuf,
    #[arg(long, default_value = "1s")]
    pub heartbeat_interval: Dur,
    /// A file holding the group's agent token; read once and deleted, so the components it
    /// starts cannot read it.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The server's CA (PEM): the only root the agent trusts for an https server.
    #[arg(long, requires = "server_ca_sha256")]
    pub server_ca: Option<PathBuf>,
    /// The sha256 of the CA's DER encoding, from the launch configuration: the CA is pinned.
    #[arg(long, requires = "server_ca")]
    pub server_ca_sha256: Option<String>,
}

/// Runs an agent that takes its identity and plan from its arguments (not `--aws`), until
/// SIGTERM or SIGINT or a permit; returns the exit code. `drover_bin` is what a component's
/// `drover` command runs (e.g. `drover demo-server`).
pub fn run(args: &AgentArgs, server: Option<String>, drover_bin: PathBuf) -> u8 {
    let auth = || -> anyhow::Result<drover_agent::AgentAuth> {
        let mut auth = drover_agent::AgentAuth::default();
        if let Some(f) = &args.token_file {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the token file {}", f.display()))?;
            // Read once: the components this agent starts cannot read it after this.
            let _ = std::fs::remove_file(f);
            auth.token = Some(t.trim().to_string()).filter(|t| !t.is_empty());
        }
        if let (Some(ca), Some(pin)) = (&args.server_ca, &args.server_ca_sha256) {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read the server CA {}", ca.display()))?;
            auth.pin_ca(pem, pin)?;
        }
        Ok(auth)
    };
    let init = || -> anyhow::Result<drover_agent::AgentConfig> {
        let (Some(plan_file), Some(instance), Some(group), Some(addr)) =
            (&args.plan_file, &args.instance, &args.group, args.addr)
        else {
            anyhow::bail!("--instance, --group, --addr and --plan-file are needed (or --aws)");
        };
        let text = std::fs::read_to_string(plan_file)
            .with_context(|| format!("cannot read plan {}", plan_file.display()))?;
        let plan: drover_model::Plan = serde_json::from_str(&text)
            .with_context(|| format!("plan {} is not valid", plan_file.display()))?;
        Ok(drover_agent::AgentConfig {
            instance: instance.clone(),
            group: group.clone(),
            addr,
            server: server.clone(),
            plan,
            dir: args.dir.clone(),
            drover_bin: drover_bin.clone(),
            heartbeat_interval: args.heartbeat_interval.0,
        })
    };
    init_logs(std::io::stderr);
    let (cfg, auth) = match init().and_then(|c| Ok((c, auth()?))) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return exit::FAILED;
        }
    };
    // One thread: the agent must cost almost nothing.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return exit::FAILED;
        }
    };
    let result =
        rt.block_on(async move { drover_agent::run_with_auth(cfg, auth, shutdown_signal()).await });
    match result {
        Ok(_) => exit::OK,
        Err(e) => {
            eprintln!("error: {e}");
            exit::FAILED
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    let mut int = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Logs to `writer`, filtered by RUST_LOG (default info).
pub fn init_logs<W>(writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .try_init();
}
