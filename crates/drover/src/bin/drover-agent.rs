//! `drover-agent`: the instance agent alone, without the server, the CLI, the store and the
//! balancer that the `drover` binary also carries, so that it costs less memory on every
//! instance (the kernel maps the code around every page the agent runs, so a smaller binary
//! is a smaller resident set). It takes the same arguments as `drover agent`; the `local`
//! provider starts it instead of `drover agent` when it sits next to the `drover` binary.

#[path = "../agent_cli.rs"]
mod agent_cli;
#[path = "../exit.rs"]
#[allow(dead_code)] // UNREACHABLE: a client's code, not the agent's.
mod exit;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Run an instance's agent (started by providers, not by people): it starts the plan's
/// components, respawns them, reports to the server and leaves on its permit.
///
/// The same agent as `drover agent`, in a binary of its own. On EC2 (`--aws`) use
/// `drover agent --aws` from a `drover` built with the `aws` feature.
#[derive(Parser, Debug)]
#[command(name = "drover-agent", version, about, long_about)]
struct Cli {
    /// The server's API URL.
    #[arg(long, env = "DROVER_SERVER", default_value = "http://127.0.0.1:7878")]
    server: String,
    #[command(flatten)]
    agent: agent_cli::AgentArgs,
}

fn main() -> ExitCode {
    let cli: Cli = match exit::parse() {
        Ok(c) => c,
        Err(code) => return code,
    };
    if cli.agent.aws {
        eprintln!(
            "error: drover-agent has no AWS support; on EC2 run `drover agent --aws` from a drover built with `--features aws`"
        );
        return ExitCode::from(exit::USAGE);
    }
    let server = (!cli.agent.standalone).then_some(cli.server);
    // A component's `drover` command (e.g. `drover demo-server`) is the `drover` binary next
    // to this one.
    let drover_bin = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("drover")))
        .unwrap_or_else(|| PathBuf::from("drover"));
    ExitCode::from(agent_cli::run(&cli.agent, server, drover_bin))
}
