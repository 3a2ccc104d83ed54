//! `drover demo-server`: a small HTTP server to try drover with. `/` answers with its message,
//! version and instance address; `/healthz` answers health checks; flags make it misbehave.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use drover_model::Dur;

use crate::exit;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Address to listen on, e.g. 127.1.0.3:8080.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The text `/` answers with.
    #[arg(long, default_value = "hello from drover")]
    pub message: String,
    /// Start failing `/healthz` (503) after this long.
    #[arg(long)]
    pub fail_health_after: Option<Dur>,
    /// Exit with status 1 after this long (0s: at once, before listening).
    #[arg(long)]
    pub crash_after: Option<Dur>,
    /// Exit with status 1 at start when this instance's version (DROVER_VERSION) is one of
    /// these: a way to try a broken deploy, e.g. `--crash-on-versions broken`.
    #[arg(long, value_delimiter = ',')]
    pub crash_on_versions: Vec<String>,
}

struct Demo {
    message: String,
    instance: String,
    version: String,
    listen: SocketAddr,
    healthy: AtomicBool,
}

pub fn run(args: DemoArgs) -> u8 {
    let version = std::env::var("DROVER_VERSION").unwrap_or_default();
    if args.crash_on_versions.contains(&version) {
        eprintln!("demo-server: version {version} crashes at start (--crash-on-versions)");
        return exit::FAILED;
    }
    if args.crash_after.is_some_and(|d| d.0.is_zero()) {
        eprintln!("demo-server: crashing at start as asked (--crash-after 0s)");
        return exit::FAILED;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo-server: {e}");
            return exit::FAILED;
        }
    };
    rt.block_on(serve(args))
}

async fn serve(args: DemoArgs) -> u8 {
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-server: cannot listen on {}: {e}", args.listen);
            return exit::FAILED;
        }
    };
    let demo = Arc::new(Demo {
        message: args.message.clone(),
        instance: std::env::var("DROVER_INSTANCE").unwrap_or_else(|_| "-".into()),
        version: std::env::var("DROVER_VERSION").unwrap_or_else(|_| "-".into()),
        listen: args.listen,
        healthy: AtomicBool::new(true),
    });
    if let Some(d) = args.fail_health_after {
        let demo = demo.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d.0).await;
            demo.healthy.store(false, Ordering::SeqCst);
            eprintln!("demo-server: failing health checks from now on (--fail-health-after)");
        });
    }
    if let Some(d) = args.crash_after {
        tokio::spawn(async move {
            tokio::time::sleep(d.0).await;
            eprintln!("demo-server: crashing as asked (--crash-after)");
            std::process::exit(1);
        });
    }
    let app = Router::new()
        .route("/", get(root))
        .route("/healthz", get(healthz))
        .route("/fail-health", post(fail_health))
        .with_state(demo);
    eprintln!("demo-server: listening on {}", args.listen);
    let shutdown = crate::shutdown_signal();
    match axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("demo-server: {e}");
            exit::FAILED
        }
    }
}

async fn root(State(d): State<Arc<Demo>>) -> String {
    format!(
        "{} (version {}, instance {} at {})\n",
        d.message, d.version, d.instance, d.listen
    )
}

async fn healthz(State(d): State<Arc<Demo>>) -> (StatusCode, &'static str) {
    if d.healthy.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "failing on purpose\n")
    }
}

/// Make `/healthz` fail from now on (for tests and demos).
async fn fail_health(State(d): State<Arc<Demo>>) -> &'static str {
    d.healthy.store(false, Ordering::SeqCst);
    "health checks will fail from now on\n"
}
