//! `drover demo-server`: a small HTTP server to try drover with. `/` answers with its message,
//! version and instance address; `/healthz` answers health checks; flags make it misbehave.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Requests per second one instance is meant to serve: `/utilization` answers the last
    /// second's rate divided by this (a custom metric to autoscale on).
    #[arg(long, default_value_t = 100.0)]
    pub capacity_rps: f64,
    /// On SIGTERM, keep serving this long, answering with `Connection: close` so kept-alive
    /// clients move to other instances, then stop.
    #[arg(long, default_value = "1s")]
    pub lame_duck: Dur,
}

struct Demo {
    message: String,
    instance: String,
    version: String,
    listen: SocketAddr,
    healthy: AtomicBool,
    /// Requests this second, and the last full second's count.
    count: AtomicU64,
    last_rate: AtomicU64,
    capacity_rps: f64,
    /// Stopping: every answer says `Connection: close`.
    closing: AtomicBool,
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
        count: AtomicU64::new(0),
        last_rate: AtomicU64::new(0),
        capacity_rps: args.capacity_rps.max(0.001),
        closing: AtomicBool::new(false),
    });
    {
        let demo = demo.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                let n = demo.count.swap(0, Ordering::Relaxed);
                demo.last_rate.store(n, Ordering::Relaxed);
            }
        });
    }
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
        .route("/utilization", get(utilization))
        .route("/fail-health", post(fail_health))
        .layer(axum::middleware::map_response_with_state(
            demo.clone(),
            close_when_stopping,
        ))
        .with_state(demo.clone());
    eprintln!("demo-server: listening on {}", args.listen);
    let lame_duck = args.lame_duck.0;
    let shutdown = async move {
        crate::shutdown_signal().await;
        // Lame duck: answers now close their connections; clients reconnect elsewhere.
        demo.closing.store(true, Ordering::SeqCst);
        tokio::time::sleep(lame_duck).await;
    };
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

async fn close_when_stopping(
    State(d): State<Arc<Demo>>,
    mut resp: axum::response::Response,
) -> axum::response::Response {
    if d.closing.load(Ordering::Relaxed) {
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// The last second's request rate over the capacity, e.g. `0.42`.
async fn utilization(State(d): State<Arc<Demo>>) -> String {
    let rate = d.last_rate.load(Ordering::Relaxed) as f64;
    format!("{:.3}\n", rate / d.capacity_rps)
}

async fn root(State(d): State<Arc<Demo>>) -> String {
    d.count.fetch_add(1, Ordering::Relaxed);
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
