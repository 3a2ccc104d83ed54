//! `drover demo-server`: a small HTTP server to try drover with. `/` answers with its message,
//! version and instance address; `/healthz` answers health checks; flags make it misbehave.
//!
//! It drains the way a server behind drover should: on its drain signal (`--drain-signal`,
//! SIGUSR1 by default; the fleet file's `drain_signal`) every answer from then on carries
//! `Connection: close` and kept-alive connections are closed as soon as they are idle, while
//! new connections are still served, until it is stopped. On SIGTERM it does the same for
//! `--lame-duck`, then stops accepting, finishes what is in flight and exits.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use drover_model::Dur;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

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
    /// Answer `/` with 500 to this share of requests when this instance's version is one of
    /// these, e.g. `--error-rate-on-versions v3=0.2`: a version bad only under load (for
    /// canary analysis). `/error_rate` serves the last second's share of 500 answers.
    #[arg(long, value_delimiter = ',', value_parser = parse_error_rate)]
    pub error_rate_on_versions: Vec<(String, f64)>,
    /// Requests per second one instance is meant to serve: `/utilization` answers the last
    /// second's rate divided by this (a custom metric to autoscale on).
    #[arg(long, default_value_t = 100.0)]
    pub capacity_rps: f64,
    /// On SIGTERM, keep serving this long, answering with `Connection: close` so kept-alive
    /// clients move to other instances, then stop.
    #[arg(long, default_value = "1s")]
    pub lame_duck: Dur,
    /// The signal that starts a drain: from then on answers carry `Connection: close` and
    /// idle kept-alive connections are closed, while new connections are still served.
    /// One of SIGUSR1, SIGUSR2, SIGHUP, SIGINT, SIGQUIT, SIGTERM (SIGINT and SIGTERM also stop it).
    #[arg(long, default_value = "SIGUSR1", value_parser = parse_drain_signal)]
    pub drain_signal: i32,
    /// Answer `/` by calling this URL and passing its answer on (a front in front of a core),
    /// e.g. `http://core.drover:8080/`: a host under `.drover` is resolved for every request
    /// through the agent's DNS responder (`$DROVER_DNS`, service discovery), one of its
    /// addresses in turn.
    #[arg(long)]
    pub upstream: Option<reqwest::Url>,
}

fn parse_error_rate(s: &str) -> Result<(String, f64), String> {
    let (v, r) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: use VERSION=SHARE, e.g. v3=0.2"))?;
    let r: f64 = r
        .parse()
        .map_err(|_| format!("{r:?} is not a number between 0 and 1"))?;
    if !(0.0..=1.0).contains(&r) {
        return Err(format!("{r} is not between 0 and 1"));
    }
    Ok((v.to_string(), r))
}

fn parse_drain_signal(s: &str) -> Result<i32, String> {
    drover_model::drain_signal_number(s).ok_or_else(|| {
        format!(
            "unknown drain signal {s:?}; allowed: {}",
            drover_model::DRAIN_SIGNALS
        )
    })
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
    /// The share of `/` answered 500 (`--error-rate-on-versions`), as every Nth request.
    error_every: Option<u64>,
    /// 500 answers this second, and the last full second's share (per mille).
    errors: AtomicU64,
    last_error_permille: AtomicU64,
    /// `--upstream`, with the client that calls it and the DNS responder that resolves it.
    upstream: Option<(reqwest::Url, reqwest::Client, Option<SocketAddr>)>,
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
        error_every: {
            let version = std::env::var("DROVER_VERSION").unwrap_or_default();
            args.error_rate_on_versions
                .iter()
                .find(|(v, _)| *v == version)
                .filter(|(_, r)| *r > 0.0)
                .map(|(_, r)| (1.0 / r).round().max(1.0) as u64)
        },
        errors: AtomicU64::new(0),
        last_error_permille: AtomicU64::new(0),
        upstream: args.upstream.clone().map(|u| {
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(5))
                .build()
                .unwrap_or_default();
            let dns = std::env::var("DROVER_DNS")
                .ok()
                .and_then(|d| d.parse().ok());
            (u, client, dns)
        }),
    });
    if let Some(n) = demo.error_every {
        eprintln!(
            "demo-server: version {} answers 500 to 1 request in {n} (--error-rate-on-versions)",
            demo.version
        );
    }
    // Timers of this server: owned here, aborted when it returns.
    let mut background = tokio::task::JoinSet::new();
    {
        let demo = demo.clone();
        background.spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                let n = demo.count.swap(0, Ordering::Relaxed);
                demo.last_rate.store(n, Ordering::Relaxed);
                let e = demo.errors.swap(0, Ordering::Relaxed);
                let permille = (e * 1000).checked_div(n).unwrap_or(0);
                demo.last_error_permille.store(permille, Ordering::Relaxed);
            }
        });
    }
    if let Some(d) = args.fail_health_after {
        let demo = demo.clone();
        background.spawn(async move {
            tokio::time::sleep(d.0).await;
            demo.healthy.store(false, Ordering::SeqCst);
            eprintln!("demo-server: failing health checks from now on (--fail-health-after)");
        });
    }
    if let Some(d) = args.crash_after {
        background.spawn(async move {
            tokio::time::sleep(d.0).await;
            eprintln!("demo-server: crashing as asked (--crash-after)");
            std::process::exit(1);
        });
    }
    let app = Router::new()
        .route("/", get(root))
        .route("/healthz", get(healthz))
        .route("/utilization", get(utilization))
        .route("/error_rate", get(error_rate))
        .route("/fail-health", post(fail_health))
        .layer(axum::middleware::map_response_with_state(
            demo.clone(),
            close_when_stopping,
        ))
        .with_state(demo.clone());
    let mut drain_sig = match signal(SignalKind::from_raw(args.drain_signal)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("demo-server: cannot watch for the drain signal: {e}");
            return exit::FAILED;
        }
    };
    eprintln!("demo-server: listening on {}", args.listen);
    // `draining`: connections close once idle. `stopping`: they close once idle, for good.
    let (draining, _) = watch::channel(false);
    let (stopping, _) = watch::channel(false);
    // Every connection's task, awaited before exiting.
    let connections = tokio_util::task::TaskTracker::new();
    let mut shutdown = pin!(crate::shutdown_signal());
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let lame_duck_over = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // E.g. out of file descriptors: wait a little rather than spin.
                        eprintln!("demo-server: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                connections.spawn(connection(
                    stream,
                    app.clone(),
                    draining.subscribe(),
                    stopping.subscribe(),
                ));
            }
            _ = drain_sig.recv() => {
                if !demo.closing.swap(true, Ordering::SeqCst) {
                    eprintln!("demo-server: draining: answers close their connections, idle ones are closed; still serving until stopped");
                }
                draining.send_replace(true);
            }
            _ = &mut shutdown, if deadline.is_none() => {
                // Lame duck: answers now close their connections; clients reconnect elsewhere.
                demo.closing.store(true, Ordering::SeqCst);
                draining.send_replace(true);
                deadline = Some(tokio::time::Instant::now() + args.lame_duck.0);
            }
            _ = lame_duck_over => break,
        }
    }
    drop(listener);
    stopping.send_replace(true);
    connections.close();
    connections.wait().await;
    exit::OK
}

/// Serve one connection. Once the server drains, a kept-alive connection (one that has
/// already been answered) is closed as soon as it is idle (after the answer in flight, if
/// any); one that has not yet sent its first request gets [`UNASKED_GRACE`] to send it, and
/// one opened during the drain is served; each answer says `Connection: close`.
///
/// Closing an idle connection that was never answered would drop a request: the balancer
/// may have sent it just before taking the instance out of rotation, and it may still be in
/// the socket, unread. A client may retry a kept-alive connection closed under it
/// (RFC 9112 9.3.1), not a new one.
async fn connection(
    stream: tokio::net::TcpStream,
    app: Router,
    mut draining: watch::Receiver<bool>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut opened_draining = *draining.borrow_and_update();
    let asked = Arc::new(AtomicBool::new(false));
    let service = tower::ServiceBuilder::new()
        .map_request({
            let asked = asked.clone();
            move |req| {
                asked.store(true, Ordering::Relaxed);
                req
            }
        })
        .service(app);
    let builder = hyper::server::conn::http1::Builder::new();
    let mut conn =
        pin!(builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service)));
    // A connection not yet asked when the drain began: closed after this grace (its first
    // answer, if a request comes, says `Connection: close`), so a client that connected and
    // never asks does not hold the drain until its timeout.
    let mut unasked_deadline: Option<tokio::time::Instant> = None;
    loop {
        let unasked_over = async {
            match unasked_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = draining.wait_for(|d| *d), if !opened_draining => {
                if asked.load(Ordering::Relaxed) {
                    conn.as_mut().graceful_shutdown();
                    break;
                }
                opened_draining = true;
                unasked_deadline = Some(tokio::time::Instant::now() + UNASKED_GRACE);
            }
            // A request under way by then is answered first.
            _ = unasked_over => {
                conn.as_mut().graceful_shutdown();
                break;
            }
            _ = stopping.wait_for(|s| *s) => {
                conn.as_mut().graceful_shutdown();
                break;
            }
        }
    }
    let _ = conn.await;
}

/// How long a connection accepted but not yet asked when a drain begins waits for its first
/// request (one the balancer sent just before taking the instance out arrives in
/// milliseconds).
const UNASKED_GRACE: Duration = Duration::from_secs(1);

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

async fn root(State(d): State<Arc<Demo>>) -> (StatusCode, String) {
    let n = d.count.fetch_add(1, Ordering::Relaxed) + 1;
    if let Some((url, client, dns)) = &d.upstream {
        return match call_upstream(url, client, *dns, n).await {
            Ok((status, body)) => (
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                format!(
                    "{} (version {}, instance {}) -> {body}",
                    d.message, d.version, d.instance
                ),
            ),
            Err(e) => (
                StatusCode::BAD_GATEWAY,
                format!(
                    "{} (instance {}): upstream {url}: {e}\n",
                    d.message, d.instance
                ),
            ),
        };
    }
    if d.error_every.is_some_and(|every| n % every == 0) {
        d.errors.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "error from version {} (--error-rate-on-versions), instance {}\n",
                d.version, d.instance
            ),
        );
    }
    (
        StatusCode::OK,
        format!(
            "{} (version {}, instance {} at {})\n",
            d.message, d.version, d.instance, d.listen
        ),
    )
}

/// Call `url`; a `.drover` host is resolved through the DNS responder, the `n`th address.
async fn call_upstream(
    url: &reqwest::Url,
    client: &reqwest::Client,
    dns: Option<SocketAddr>,
    n: u64,
) -> Result<(u16, String), String> {
    let mut url = url.clone();
    let host = url.host_str().unwrap_or_default().to_string();
    if host.ends_with(".drover") || host.ends_with(".drover.") {
        let dns = dns.ok_or("$DROVER_DNS is not set: does the component `use` the service?")?;
        let name = if host.ends_with('.') {
            host
        } else {
            format!("{host}.")
        };
        let ips = drover_agent::lookup(dns, &name).await?;
        if ips.is_empty() {
            return Err(format!("no instance of {name} in rotation"));
        }
        let ip = ips[(n as usize) % ips.len()];
        url.set_ip_host(ip)
            .map_err(|_| "cannot set the address".to_string())?;
    }
    let resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// The last second's share of `/` answered 500, e.g. `0.200`.
async fn error_rate(State(d): State<Arc<Demo>>) -> String {
    format!(
        "{:.3}\n",
        d.last_error_permille.load(Ordering::Relaxed) as f64 / 1000.0
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
