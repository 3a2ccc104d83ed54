//! `drover up` and `drover server`: the control plane in the foreground.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use drover_model::api::ApplyRequest;
use drover_server::{Server, ServerConfig, ServerError};

use crate::{exit, render};

/// How long instances get to stop when drover stops.
const STOP_GRACE: Duration = Duration::from_secs(15);

fn config(
    data_dir: &Path,
    listen: SocketAddr,
    timing: &crate::TimingArgs,
) -> anyhow::Result<ServerConfig> {
    let bin = std::env::current_exe().context("cannot find the drover binary")?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", data_dir.display()))?;
    let mut cfg = ServerConfig::new(data_dir, listen, bin);
    cfg.instances_dir = timing.instances_dir.clone();
    cfg.heartbeat_interval = timing.heartbeat_interval.0;
    cfg.events_keep = timing.retention.events_keep;
    cfg.events_max_age = timing.retention.events_max_age.0;
    // Unless given: the default, or 3 intervals if that is more (a given value below that is
    // raised by the server, with a warning).
    cfg.silent_after = match timing.silent_after {
        Some(s) => s.0,
        None => cfg.effective_silent_after(),
    };
    Ok(cfg)
}

/// How `drover server` talks to cloud regions.
pub struct CloudArgs {
    pub advertise_url: Option<String>,
    pub poll: Duration,
    /// Start (or adopt) the balancer process.
    pub spawn_lb: bool,
    /// `--store`: none is the SQLite file in the data directory.
    pub store: Option<drover_store::StoreSpec>,
    /// `--servers`: every server of the control plane, for agents and balancers.
    pub servers: Vec<String>,
}

/// `drover server`: logs to stderr, runs until SIGTERM/SIGINT.
pub async fn serve(
    data_dir: &Path,
    listen: SocketAddr,
    tls: drover_server::tls::TlsMode,
    timing: &crate::TimingArgs,
    cloud: CloudArgs,
) -> anyhow::Result<u8> {
    crate::init_logs(std::io::stderr);
    let mut cfg = config(data_dir, listen, timing)?;
    cfg.advertise_url = cloud.advertise_url;
    cfg.cloud_poll = cloud.poll;
    cfg.spawn_lb = cloud.spawn_lb;
    cfg.store = cloud.store;
    cfg.servers = cloud.servers;
    if tls == drover_server::tls::TlsMode::Off && !listen.ip().is_loopback() {
        tracing::warn!(
            "the API is served over plain HTTP on {listen}: tokens cross the network in clear text (--no-tls); see docs/security.md"
        );
    }
    cfg.tls = tls;
    let server = Server::start(cfg).await?;
    tracing::info!("drover server listening on {}", server.url());
    if let Some(ca) = &server.ca_file {
        tracing::info!("clients trust the CA in {}", ca.display());
    }
    if let Some(f) = &server.admin_token_file {
        tracing::info!("admin token written to {} (0600)", f.display());
    }
    crate::shutdown_signal().await;
    tracing::info!("stopping");
    server.shutdown(STOP_GRACE).await;
    Ok(exit::OK)
}

/// `drover up FILE`: server + apply + live status, until Ctrl-C or SIGTERM.
pub async fn run(
    file: &Path,
    data_dir: &Path,
    listen: SocketAddr,
    tls: drover_server::tls::TlsMode,
    timing: &crate::TimingArgs,
    json: bool,
    force_file: bool,
) -> anyhow::Result<u8> {
    let mut cfg = config(data_dir, listen, timing)?;
    cfg.tls = tls;
    // One foreground command: its instances live and die with it.
    cfg.own_instances = true;
    // Logs go to a file so the status table stays readable.
    let log_path = cfg.data_dir.join("drover.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    crate::init_logs(std::sync::Mutex::new(log));

    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    // Refuse a broken file before starting anything.
    if let Err(errors) = drover_model::parse_fleet(&text, &file.display().to_string()) {
        eprintln!("{errors}");
        eprintln!(
            "{} problem(s) found; nothing was started or changed",
            errors.0.len()
        );
        return Ok(exit::FAILED);
    }
    let server = Server::start(cfg.clone()).await?;
    let applied = server
        .apply(ApplyRequest {
            file: file.display().to_string(),
            toml: text,
            dry_run: false,
            force_file,
        })
        .await;
    if let Ok(r) = &applied {
        // What deploy, scale or autoscaling set before this start stays (and says so).
        eprint!("{}", render::drift(&r.drift));
    }
    match applied {
        Ok(r) if r.applied => eprintln!("applied {} as revision {}", file.display(), r.revision),
        Ok(r) => eprintln!("{} is unchanged (revision {})", file.display(), r.revision),
        Err(e) => {
            match &e {
                ServerError::InvalidFleet(errors) => eprintln!("{errors}"),
                other => eprintln!("error: {other}"),
            }
            server.shutdown(STOP_GRACE).await;
            return Ok(exit::FAILED);
        }
    }
    // Without an election (`drover up` keeps its state in SQLite) the server always leads.
    let engine = server
        .engine()
        .context("drover up runs one server, which leads")?;
    let status = engine.status();
    eprintln!(
        "drover is up: API {} (data in {}, logs in {})",
        server.url(),
        cfg.data_dir.display(),
        log_path.display()
    );
    eprintln!(
        "  the CLI finds its admin token in {}",
        cfg.data_dir
            .join(drover_server::auth::ADMIN_TOKEN_FILE)
            .display()
    );
    for g in &status.groups {
        if let Some(ing) = &g.ingress {
            eprintln!("  {} is served on {ing}", g.group);
        }
    }
    eprintln!("  Ctrl-C stops everything.");

    let tty = std::io::stdout().is_terminal() && !json;
    let mut last = String::new();
    let mut link = Link::default();
    let stop = crate::shutdown_signal();
    tokio::pin!(stop);
    loop {
        let s = engine.status();
        let text = if json {
            serde_json::to_string(&s).unwrap_or_default()
        } else {
            // On a terminal: a login link, renewed before it expires; elsewhere (a log) the
            // dashboard's address, as a link would be stale by the time anyone reads it.
            let dashboard = if tty {
                link.current(&server)
            } else {
                format!("{}/ui/  (`drover ui` prints a login link)", server.url())
            };
            format!(
                "{}\n{}",
                pointers(&server, &s, &dashboard, &cfg.data_dir),
                render::status(&s, render::Listing::All)
            )
        };
        // On a terminal, redraw in place every second; otherwise print only changes.
        let shown = if tty { text.clone() } else { strip_ages(&text) };
        if tty || shown != last {
            let mut out = std::io::stdout().lock();
            if tty {
                let _ = write!(out, "\x1b[H\x1b[2J");
            }
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
            last = shown;
        }
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    eprintln!("stopping: draining and stopping every instance...");
    server.shutdown(STOP_GRACE).await;
    eprintln!("stopped");
    Ok(exit::OK)
}

/// How many of the newest events `drover up` shows.
const UP_EVENTS: usize = 5;

/// Where to look next: the dashboard, the API, each ingress, and the newest events.
fn pointers(
    server: &Server,
    status: &drover_model::api::FleetStatus,
    dashboard: &str,
    data_dir: &Path,
) -> String {
    let mut out = format!("dashboard  {dashboard}\n");
    out.push_str(&format!(
        "API        {}  (admin token in {})\n",
        server.url(),
        data_dir
            .join(drover_server::auth::ADMIN_TOKEN_FILE)
            .display()
    ));
    for g in &status.groups {
        if let Some(ing) = &g.ingress {
            out.push_str(&format!("ingress    {:<20} curl {ing}/\n", g.group));
        }
    }
    let (_, recent) = server.ui.history.recent();
    out.push_str("latest events:\n");
    let skip = recent.len().saturating_sub(UP_EVENTS);
    for e in &recent[skip..] {
        let mut line = render::event_line(e);
        if line.chars().count() > 160 {
            line = line.chars().take(157).collect::<String>() + "...";
        }
        out.push_str(&format!("  {line}\n"));
    }
    out
}

/// The dashboard login link `drover up` shows: one-time, renewed every [`LINK_RENEW`] so that
/// the one on screen has at least half a minute left.
#[derive(Default)]
struct Link {
    url: String,
    made: Option<std::time::Instant>,
}

const LINK_RENEW: Duration = Duration::from_secs(30);

impl Link {
    fn current(&mut self, server: &Server) -> String {
        if self.made.is_some_and(|t| t.elapsed() < LINK_RENEW) {
            return self.url.clone();
        }
        // For the first admin token (the one `drover up` wrote).
        let tokens = server.engine().map(|e| e.auth().list()).unwrap_or_default();
        let admin = tokens.into_iter().find(|t| {
            t.scope == drover_model::token::TokenScope::Admin && t.revoked_at_ms.is_none()
        });
        let Some(admin) = admin else {
            return format!("{}/ui/  (log in with a token)", server.url());
        };
        let caller = drover_server::auth::Caller {
            id: admin.id,
            scope: admin.scope,
            group: None,
        };
        match server.ui.sessions.new_link(&caller) {
            Ok((code, _)) => {
                self.url = format!(
                    "{}/ui/login?code={code}  (one-time login link, renewed every {}s; or `drover ui`)",
                    server.url(),
                    LINK_RENEW.as_secs()
                );
                self.made = Some(std::time::Instant::now());
                self.url.clone()
            }
            Err(_) => format!("{}/ui/  (`drover ui` prints a login link)", server.url()),
        }
    }
}

/// The status text without its AGE column values, to detect real changes.
fn strip_ages(s: &str) -> String {
    s.lines()
        .map(|l| {
            if l.contains('│') {
                l.trim_end_matches(|c: char| c != '│').to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}
