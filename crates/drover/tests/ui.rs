//! End to end: the web dashboard in real headless browsers, driven over WebDriver by
//! fantoccini: Debian's `chromium` through `chromium-driver`, and Debian's `firefox-esr`
//! through geckodriver (from crates.io), each test once in each. With `drover up` on the
//! example fleet: log in with the link from `drover ui`, watch three healthy instances, deploy
//! v2 from the page and watch the rollout bar reach done while the instances change
//! generation, scale to 5, see events arrive live, compare two revisions, roll back with a
//! pause and a resume, read the logs as `drover logs` prints them (filtered, then followed
//! live), and check that a read token's session can act on nothing (no buttons, and a direct
//! POST is refused 403), in the dark scheme. With a canary and an autoscaled service: the
//! group page shows the canary's analysis check by check with the server's numbers, and the
//! fleet and group pages chart desired against the metric and its target.
//!
//! Skips with a printed reason when a browser or its driver is missing, unless `DROVER_CI=1`.
//! The tests run one at a time. Screenshots go to `$DROVER_UI_SCREENSHOTS` (default: a
//! directory under the target directory; Firefox's in `firefox/` there); docs/ui.md shows
//! Chromium's.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const FIREFOX: &str = "/usr/bin/firefox-esr";

/// The browsers the dashboard is tested in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Debian's chromium, through chromium-driver.
    Chromium,
    /// Debian's firefox-esr, through geckodriver (`cargo install geckodriver`).
    Firefox,
}

/// A WebDriver server this test started; killed (by its pid) when dropped.
struct Driver(Child, u16, Kind);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// geckodriver on `PATH`, or where `cargo install` puts it.
fn geckodriver() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(c) = std::env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&c).join("bin"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(Path::new(&h).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("geckodriver"))
        .find(|p| p.is_file())
}

/// The WebDriver server of `kind`, or None (a printed reason) when it or its browser is
/// missing; with `DROVER_CI=1` a missing one fails the test instead.
fn driver(kind: Kind) -> Option<Driver> {
    let (program, missing, install) = match kind {
        Kind::Chromium => {
            let missing: Vec<&str> = [CHROMEDRIVER, CHROMIUM]
                .into_iter()
                .filter(|p| !Path::new(p).exists())
                .collect();
            (
                PathBuf::from(CHROMEDRIVER),
                missing.join(" and "),
                "install Debian's chromium and chromium-driver (.ci/run does)",
            )
        }
        Kind::Firefox => {
            let gecko = geckodriver();
            let mut missing = Vec::new();
            if gecko.is_none() {
                missing.push("geckodriver");
            }
            if !Path::new(FIREFOX).exists() {
                missing.push(FIREFOX);
            }
            (
                gecko.unwrap_or_default(),
                missing.join(" and "),
                "install Debian's firefox-esr and `cargo install geckodriver --locked` (.ci/run does)",
            )
        }
    };
    if !missing.is_empty() {
        let why = format!("{missing} missing: {install}");
        if std::env::var("DROVER_CI").as_deref() == Ok("1") {
            panic!("{why}");
        }
        eprintln!("skipping the {kind:?} browser test: {why}");
        return None;
    }
    let port = free_port();
    let child = Command::new(&program)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} did not listen",
            program.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Driver(child, port, kind))
}

/// One browser test at a time: each runs a fleet and a browser on a 2-core machine, and the
/// rollouts they watch are timed.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Run a browser test in `kind` (skipped, with its reason, when that browser is missing).
fn in_browser<F, Fut>(kind: Kind, test: F)
where
    F: FnOnce(Driver) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(d) = driver(kind) else { return };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(test(d));
}

/// A new browser (its own profile: no cookies), in the light scheme.
async fn browser(d: &Driver) -> Client {
    browser_with(d, false).await
}

/// A new browser whose system prefers the dark scheme when `dark`.
async fn browser_with(d: &Driver, dark: bool) -> Client {
    let mut caps = serde_json::Map::new();
    match d.2 {
        Kind::Chromium => {
            let mut args = vec![
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1400,1000",
                "--force-color-profile=srgb",
            ];
            if dark {
                args.push("--force-dark-mode");
            }
            caps.insert(
                "goog:chromeOptions".into(),
                json!({ "binary": CHROMIUM, "args": args }),
            );
        }
        Kind::Firefox => {
            // 0: dark, 1: light, for what pages see of prefers-color-scheme.
            caps.insert(
                "moz:firefoxOptions".into(),
                json!({ "binary": FIREFOX, "args": ["-headless"], "prefs": {
                    "layout.css.prefers-color-scheme.content-override": if dark { 0 } else { 1 },
                    "ui.systemUsesDarkTheme": if dark { 1 } else { 0 },
                } }),
            );
        }
    }
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", d.1))
        .await
        .unwrap_or_else(|e| panic!("a {:?} session: {e}", d.2));
    if d.2 == Kind::Firefox {
        c.set_window_size(1400, 1000).await.unwrap();
    }
    c
}

/// Run `script` (a function body) in the page until it returns something truthy; that value.
async fn until(c: &Client, what: &str, script: &str, timeout: Duration) -> Value {
    let t0 = Instant::now();
    let mut last = Value::Null;
    while t0.elapsed() < timeout {
        match c.execute(script, vec![]).await {
            Ok(v) if truthy(&v) => return v,
            Ok(v) => last = v,
            Err(e) => last = Value::String(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = c
        .execute("return document.body.innerText", vec![])
        .await
        .unwrap_or_default();
    panic!("not within {timeout:?}: {what} (last: {last})\npage:\n{text}");
}

/// Click element `id` (again, if a live refresh replaced it between the find and the click).
async fn click(c: &Client, id: &str) {
    let mut last = String::new();
    for _ in 0..50 {
        match c.find(Locator::Id(id)).await {
            Ok(el) => match el.click().await {
                Ok(()) => return,
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot click #{id}: {last}");
}

/// Set input `id` to `text` (in one step: a live refresh keeps what was typed).
async fn type_into(c: &Client, id: &str, text: &str) {
    let mut last = String::new();
    for _ in 0..50 {
        let r = async {
            let el = c.find(Locator::Id(id)).await?;
            el.clear().await?;
            el.send_keys(text).await
        }
        .await;
        match r {
            Ok(()) => {
                let v = c
                    .execute(
                        &format!("return document.getElementById({id:?}).value"),
                        vec![],
                    )
                    .await
                    .unwrap_or_default();
                if v == text {
                    return;
                }
                last = format!("value is {v}");
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot type into #{id}: {last}");
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

/// The text of `path` once it contains `what`.
fn until_file(path: &Path, what: &str, timeout: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(what) {
            return text;
        }
        assert!(
            t0.elapsed() < timeout,
            "{what} not in {}: {text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn shots() -> PathBuf {
    let dir = std::env::var_os("DROVER_UI_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A screenshot of the page; Firefox's go to `firefox/` (docs/ui.md shows Chromium's).
async fn shot(d: &Driver, c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let dir = match d.2 {
        Kind::Chromium => shots(),
        Kind::Firefox => shots().join("firefox"),
    };
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot {}", path.display());
}

/// The logs page's lines, as `drover logs` prints them, once its stream has ended.
async fn log_lines(c: &Client) -> Vec<String> {
    let v = until(
        c,
        "the logs page's lines",
        r#"const b = document.getElementById('log-lines');
           return b && b.dataset.state === 'done' && [...b.querySelectorAll('.log-line')].map(l => l.textContent);"#,
        Duration::from_secs(60),
    )
    .await;
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect()
}

/// The `drover ui` link: printed alone on stdout.
fn login_link(up: &Up) -> String {
    let (code, out, err) = up.cli(&["ui"]);
    assert_eq!(code, 0, "drover ui: {err}");
    let url = out.trim().to_string();
    assert!(
        url.starts_with(&format!("{}/ui/login?code=", up.server())),
        "{url}"
    );
    assert!(err.contains("works once"), "{err}");
    url
}

#[test]
fn the_dashboard_shows_the_fleet_deploys_scales_and_keeps_read_sessions_read_only() {
    in_browser(Kind::Chromium, the_main_flow);
}

#[test]
fn in_firefox_the_dashboard_shows_the_fleet_deploys_scales_and_keeps_read_sessions_read_only() {
    in_browser(Kind::Firefox, the_main_flow);
}

async fn the_main_flow(d: Driver) {
    let dir = tempfile::tempdir().unwrap();
    let _agents = KillAgents(dir.path().to_path_buf());
    let (api, ing) = (free_port(), free_port());
    let up = Up::start(dir.path(), &fleet_text(ing, subnet(), 3), api, ing);
    up.wait_healthy(3, Duration::from_secs(20));
    let long = Duration::from_secs(60);
    let base = up.server();
    // `drover up`'s screen points the way: the dashboard, the API, the ingress, the events.
    let screen = until_file(&dir.path().join("up.out"), "rollout to generation 1", long);
    assert!(
        screen.contains(&format!("dashboard  {base}/ui/")),
        "{screen}"
    );
    assert!(screen.contains(&format!("API        {base}")), "{screen}");
    assert!(
        screen.contains(&format!(
            "ingress    web/local            curl {}/",
            up.ingress
        )),
        "{screen}"
    );
    assert!(screen.contains("latest events:\n"), "{screen}");
    let c = browser(&d).await;

    // A bad link and a used one get a clear page, not a session.
    c.goto(&format!("{base}/ui/login?code=0123")).await.unwrap();
    let title = c
        .find(Locator::Id("login-title"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(title, "This login link is not valid");

    // 1. Log in with the link from `drover ui`.
    let link = login_link(&up);
    c.goto(&link).await.unwrap();
    // 2. Three healthy instances of web/local, on the fleet page.
    until(
        &c,
        "the fleet page shows web/local 3/3",
        r#"const el = document.querySelector('.cell[data-group="web/local"] [data-health]');
           return el && el.textContent === "3/3";"#,
        long,
    )
    .await;
    let url = c.current_url().await.unwrap();
    assert_eq!(url.path(), "/ui/", "the link leads to the dashboard");
    let who = c
        .find(Locator::Id("who"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(who.contains("admin"), "{who}");
    let cell = c
        .find(Locator::Css(r#".cell[data-group="web/local"]"#))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(cell.contains("app=v1 · gen 1"), "{cell}");
    assert!(cell.contains("2 / 3 / 6"), "min/desired/max: {cell}");
    // The link worked once.
    c.goto(&link).await.unwrap();
    let title = c
        .find(Locator::Id("login-title"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        title, "This login link is not valid",
        "a used link is refused"
    );
    // ... and the session it opened goes on.
    c.goto(&format!("{base}/ui/#/fleet")).await.unwrap();
    until(
        &c,
        "the session survives the used link",
        r#"const el = document.querySelector('.cell[data-group="web/local"] [data-health]');
           return el && el.textContent === "3/3";"#,
        long,
    )
    .await;
    let colors = c
        .execute(
            "const b = getComputedStyle(document.body); return [b.backgroundColor, b.color]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        colors,
        json!(["rgb(247, 247, 245)", "rgb(27, 31, 36)"]),
        "light scheme"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    shot(&d, &c, "fleet.png").await;

    // The group page: three instances on generation 1.
    c.goto(&format!("{base}/ui/#/group/web/local"))
        .await
        .unwrap();
    until(
        &c,
        "three instances of generation 1",
        r#"const rows = [...document.querySelectorAll('#instances tbody tr')];
           return rows.length === 3 && rows.every(r => r.dataset.generation === "1" && r.dataset.state === "healthy");"#,
        long,
    )
    .await;

    // 3. Deploy v2 from the page: the plan is shown, confirmed, and the rollout followed.
    let marker = "window.__same_page = 42; return true;";
    c.execute(marker, vec![]).await.unwrap();
    type_into(&c, "deploy-version", "v2").await;
    click(&c, "deploy").await;
    let plan = until(
        &c,
        "the deploy's plan in the dialog",
        r#"const ok = document.getElementById('confirm-ok');
           const p = document.getElementById('confirm-plan').textContent;
           return document.getElementById('confirm').open && !ok.disabled && p;"#,
        long,
    )
    .await;
    let plan = plan.as_str().unwrap().to_string();
    assert!(
        plan.contains(
            "rollout web/local: generation 1 -> 2: 3 instance(s) replaced in 3 batch(es)"
        ),
        "what `drover plan` says: {plan}"
    );
    assert!(plan.contains("dry run: nothing was stored"), "{plan}");
    // Nothing changed before the confirmation.
    assert_eq!(
        up.status().unwrap().groups[0].generation,
        1,
        "the preview stored nothing"
    );
    click(&c, "confirm-ok").await;

    // The bar moves batch by batch while the instance list changes generation.
    let t0 = Instant::now();
    let mut seen_done = std::collections::BTreeSet::new();
    let mut mixed = false;
    let mut mid_shot = false;
    loop {
        assert!(t0.elapsed() < Duration::from_secs(120), "rollout not done");
        let v = c
            .execute(
                r#"const r = document.querySelector('#rollout-section .rollout');
                   const gens = [...document.querySelectorAll('#instances tbody tr')].map(t => t.dataset.generation);
                   return { phase: r && r.dataset.phase, done: r && r.dataset.done, batches: r && r.dataset.batches,
                            gens, versions: (document.getElementById('group-versions') || {}).textContent,
                            batchItems: document.querySelectorAll('.batches li').length };"#,
                vec![],
            )
            .await
            .unwrap();
        if let Some(done) = v["done"].as_str() {
            seen_done.insert(done.to_string());
            assert_eq!(v["batches"], "3", "3 batches of 1: {v}");
            assert_eq!(v["batchItems"], 3, "each batch listed: {v}");
            if !mid_shot && done == "1" {
                shot(&d, &c, "group-rollout.png").await;
                mid_shot = true;
            }
        }
        let gens: Vec<&str> = v["gens"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|g| g.as_str())
            .collect();
        if gens.contains(&"1") && gens.contains(&"2") {
            mixed = true;
        }
        if v["phase"] == "done"
            && gens.len() == 3
            && gens.iter().all(|g| *g == "2")
            && v["versions"]
                .as_str()
                .unwrap_or_default()
                .contains("app=v2 · generation 2")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen_done.len() >= 2,
        "the bar moved through batches: {seen_done:?}"
    );
    assert!(
        mixed,
        "the instance list showed both generations mid-rollout"
    );
    assert_eq!(
        c.execute("return window.__same_page", vec![])
            .await
            .unwrap(),
        json!(42),
        "the page followed the rollout live, without a reload"
    );
    let answer = get(up.ingress).unwrap();
    assert!(answer.contains("version v2"), "{answer}");

    // 4. Scale to 5: the confirmation says what changes, then five healthy.
    type_into(&c, "scale-count", "5").await;
    click(&c, "scale").await;
    let plan = until(
        &c,
        "the scale's preview",
        r#"const ok = document.getElementById('confirm-ok');
           return !ok.disabled && document.getElementById('confirm-plan').textContent;"#,
        long,
    )
    .await;
    assert!(
        plan.as_str().unwrap().contains("desired 3 -> 5")
            && plan.as_str().unwrap().contains("2 instance(s) launched"),
        "{plan}"
    );
    click(&c, "confirm-ok").await;
    until(
        &c,
        "five healthy instances of generation 2",
        r#"const rows = [...document.querySelectorAll('#instances tbody tr')];
           return document.getElementById('group-health').textContent === "5/5 healthy" && rows.length === 5
             && rows.every(r => r.dataset.generation === "2");"#,
        long,
    )
    .await;
    assert_eq!(up.status().unwrap().groups[0].desired, 5);

    // A refusal shows the server's message: more than max.
    type_into(&c, "scale-count", "60").await;
    click(&c, "scale").await;
    until(
        &c,
        "the scale's preview",
        "return !document.getElementById('confirm-ok').disabled",
        long,
    )
    .await;
    click(&c, "confirm-ok").await;
    let refusal = until(
        &c,
        "the server's refusal",
        r#"const t = [...document.querySelectorAll('#toast div.bad')].map(d => d.textContent).join("\n");
           return t;"#,
        long,
    )
    .await;
    assert!(
        refusal.as_str().unwrap().starts_with("refused: ")
            && refusal.as_str().unwrap().contains("60"),
        "{refusal}"
    );
    assert_eq!(up.status().unwrap().groups[0].desired, 5, "nothing changed");

    // 5. Events arrive live: a change made elsewhere appears on the events page.
    c.goto(&format!("{base}/ui/#/events?kind=scaled"))
        .await
        .unwrap();
    until(
        &c,
        "the scaled events",
        r#"return document.querySelectorAll('#events tbody tr[data-kind="scaled"]').length >= 1"#,
        long,
    )
    .await;
    c.execute(marker, vec![]).await.unwrap();
    let before = c
        .execute(
            "return document.querySelectorAll('#events tbody tr').length",
            vec![],
        )
        .await
        .unwrap();
    let (code, _, err) = up.cli(&["scale", "web", "4"]);
    assert_eq!(code, 0, "{err}");
    let row = until(
        &c,
        "the new scaled event, live",
        &format!(
            r#"const rows = document.querySelectorAll('#events tbody tr');
               return rows.length > {before} && rows[0].textContent"#
        ),
        Duration::from_secs(10),
    )
    .await;
    assert!(row.as_str().unwrap().contains("scaled"), "{row}");
    assert!(row.as_str().unwrap().contains("desired 5 -> 4"), "{row}");
    assert_eq!(
        c.execute("return window.__same_page", vec![])
            .await
            .unwrap(),
        json!(42),
        "no reload"
    );
    // Filtered: only `scaled` rows.
    let kinds = c
        .execute(
            "return [...document.querySelectorAll('#events tbody tr')].map(r => r.dataset.kind)",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        kinds.as_array().unwrap().iter().all(|k| k == "scaled"),
        "{kinds}"
    );

    // History: the diff between revisions 1 and 2 side by side.
    c.goto(&format!("{base}/ui/#/history?a=1&b=2"))
        .await
        .unwrap();
    let diff = until(
        &c,
        "the diff of revisions 1 and 2",
        r#"const d = document.querySelector('#diff');
           if (!d) return null;
           return { del: [...d.querySelectorAll('pre.del')].map(p => p.textContent),
                    add: [...d.querySelectorAll('pre.add')].map(p => p.textContent),
                    revs: document.querySelectorAll('#revisions tbody tr').length };"#,
        long,
    )
    .await;
    let text = diff.to_string();
    assert!(
        diff["del"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("version = \"v1\"")),
        "{text}"
    );
    assert!(
        diff["add"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("version = \"v2\"")),
        "{text}"
    );
    assert!(diff["revs"].as_u64().unwrap() >= 2, "{text}");
    c.execute(
        "document.getElementById('toast').replaceChildren(); return true",
        vec![],
    )
    .await
    .unwrap();
    shot(&d, &c, "history-diff.png").await;

    // Roll back from the page, pause the rollout, see it hold, resume it to done.
    c.goto(&format!("{base}/ui/#/group/web/local"))
        .await
        .unwrap();
    until(
        &c,
        "the group page with four instances",
        "return document.querySelectorAll('#instances tbody tr').length === 4",
        long,
    )
    .await;
    click(&c, "rollback").await;
    let plan = until(
        &c,
        "the rollback's plan",
        r#"const ok = document.getElementById('confirm-ok');
           return !ok.disabled && document.getElementById('confirm-plan').textContent;"#,
        long,
    )
    .await;
    assert!(
        plan.as_str()
            .unwrap()
            .contains("rollout web/local: generation 2 -> 3"),
        "{plan}"
    );
    click(&c, "confirm-ok").await;
    until(
        &c,
        "the rollout under way, with its pause button",
        "return document.getElementById('rollout-pause')",
        long,
    )
    .await;
    click(&c, "rollout-pause").await;
    until(
        &c,
        "the pause's preview",
        "return !document.getElementById('confirm-ok').disabled",
        long,
    )
    .await;
    click(&c, "confirm-ok").await;
    until(
        &c,
        "the rollout shown paused, with a resume button",
        r#"const l = document.querySelector('#rollout-section .bar-label');
           return document.getElementById('rollout-resume') && l && l.textContent.startsWith('paused');"#,
        long,
    )
    .await;
    let gens = |c: &Client| {
        let c = c.clone();
        async move {
            c.execute(
                "return [...document.querySelectorAll('#instances tbody tr')].map(r => r.dataset.generation).sort().join(',')",
                vec![],
            )
            .await
            .unwrap()
        }
    };
    let held = up.status().unwrap().groups[0].clone();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let still = up.status().unwrap().groups[0].clone();
    assert!(still.rollout.paused, "{:?}", still.rollout);
    assert_eq!(
        (held.rollout.current, held.rollout.stale),
        (still.rollout.current, still.rollout.stale),
        "nothing moves while paused"
    );
    let before = gens(&c).await;
    click(&c, "rollout-resume").await;
    until(
        &c,
        "the resume's preview",
        "return !document.getElementById('confirm-ok').disabled",
        long,
    )
    .await;
    click(&c, "confirm-ok").await;
    until(
        &c,
        "the rollback done: four instances of generation 3 running v1",
        r#"const rows = [...document.querySelectorAll('#instances tbody tr')];
           const r = document.querySelector('#rollout-section .rollout');
           return r && r.dataset.phase === 'done' && rows.length === 4 && rows.every(t => t.dataset.generation === '3')
             && document.getElementById('group-versions').textContent.includes('app=v1 · generation 3');"#,
        Duration::from_secs(120),
    )
    .await;
    assert_ne!(before, gens(&c).await);
    assert!(get(up.ingress).unwrap().contains("version v1"));

    // Logs: the same view as `drover logs`, filtered by instance and component, then
    // followed live.
    let ids: std::collections::BTreeSet<String> = up.status().unwrap().groups[0]
        .instances
        .iter()
        .map(|i| i.id.clone())
        .collect();
    assert_eq!(ids.len(), 4);
    let (code, cli, err) = up.cli(&["logs", "web"]);
    assert_eq!(code, 0, "drover logs: {err}");
    c.goto(&format!("{base}/ui/#/logs?service=web"))
        .await
        .unwrap();
    let shown = log_lines(&c).await;
    assert_eq!(
        shown,
        cli.lines().collect::<Vec<_>>(),
        "the page shows what `drover logs web` prints"
    );
    for id in &ids {
        assert!(
            shown
                .iter()
                .any(|l| l.starts_with(&format!("{id} app | demo-server: listening on"))),
            "{id} is there: {shown:#?}"
        );
    }
    // Filtered from the form: one instance's app.
    let one = ids.iter().next().unwrap().clone();
    type_into(&c, "logs-instance", &one).await;
    type_into(&c, "logs-component", "app").await;
    click(&c, "logs-show").await;
    until(
        &c,
        "the filter in the address",
        &format!("return location.hash.includes('instance={one}') && location.hash.includes('component=app')"),
        long,
    )
    .await;
    let mine = log_lines(&c).await;
    let (code, cli, err) = up.cli(&["logs", "web", "app", "--instance", &one]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(mine, cli.lines().collect::<Vec<_>>());
    assert!(
        !mine.is_empty() && mine.iter().all(|l| l.starts_with(&format!("{one} app | "))),
        "{mine:#?}"
    );
    // Followed: the line of a component that restarts arrives live, without a reload.
    c.goto(&format!("{base}/ui/#/logs?service=web&follow=1"))
        .await
        .unwrap();
    until(
        &c,
        "the followed logs",
        r#"const b = document.getElementById('log-lines');
           return b && b.dataset.state === 'following' && b.querySelectorAll('.log-line').length >= 4;"#,
        long,
    )
    .await;
    c.execute(marker, vec![]).await.unwrap();
    let s = up.status().unwrap();
    let victim = s.groups[0].instances.iter().find(|i| i.id == one).unwrap();
    let pid = victim.components[0].pid.expect("the app's pid");
    let before = mine.len();
    // Killed: its agent starts it again at once, and it says so.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let again = until(
        &c,
        "the restarted app's line, live",
        &format!(
            r#"const l = [...document.querySelectorAll('#log-lines .log-line[data-instance="{one}"]')];
               return l.length > {before} && l[l.length - 1].textContent;"#
        ),
        Duration::from_secs(30),
    )
    .await;
    assert!(
        again
            .as_str()
            .unwrap()
            .starts_with(&format!("{one} app | demo-server: listening on")),
        "{again}"
    );
    assert_eq!(
        c.execute("return window.__same_page", vec![])
            .await
            .unwrap(),
        json!(42),
        "followed live, without a reload"
    );
    shot(&d, &c, "logs.png").await;
    up.wait_healthy(4, long);

    // Log out: the session is gone, the API refuses it.
    c.goto(&format!("{base}/ui/#/fleet")).await.unwrap();
    until(
        &c,
        "the fleet page",
        "return document.querySelector('.cell')",
        long,
    )
    .await;
    click(&c, "logout").await;
    until(
        &c,
        "the login page after logout",
        "return document.getElementById('token-form')",
        long,
    )
    .await;
    c.close().await.unwrap();

    // 6. A read token's session sees everything and can act on nothing.
    let (code, token, err) = up.cli(&["token", "create", "--scope", "read", "--name", "viewer"]);
    assert_eq!(code, 0, "{err}");
    let token = token.trim().to_string();
    // In the dark scheme.
    let r = browser_with(&d, true).await;
    r.goto(&format!("{base}/ui/")).await.unwrap();
    r.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(&token)
        .await
        .unwrap();
    r.find(Locator::Css("#token-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &r,
        "the read session's fleet page",
        r#"const el = document.querySelector('.cell[data-group="web/local"] [data-health]');
           return el && el.textContent === "4/4";"#,
        long,
    )
    .await;
    // Legible in both schemes: light text on a dark page here, dark on light before.
    let colors = r
        .execute(
            "const b = getComputedStyle(document.body); return [b.backgroundColor, b.color]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        colors,
        json!(["rgb(13, 17, 23)", "rgb(230, 237, 243)"]),
        "dark scheme"
    );
    shot(&d, &r, "fleet-dark.png").await;
    r.goto(&format!("{base}/ui/#/group/web/local"))
        .await
        .unwrap();
    until(
        &r,
        "the read session's group page",
        "return document.querySelectorAll('#instances tbody tr').length === 4",
        long,
    )
    .await;
    for id in ["deploy", "scale", "rollback", "deploy-form"] {
        assert!(
            r.find(Locator::Id(id)).await.is_err(),
            "a read session has no {id} button"
        );
    }
    let note = r
        .find(Locator::Id("read-only"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(note.contains("Read-only"), "{note}");
    // A direct POST from the page, with the session's CSRF token: 403.
    let got = r
        .execute_async(
            r#"const done = arguments[arguments.length - 1];
               (async () => {
                 const s = await (await fetch('/v1/ui/session')).json();
                 const post = (csrf) => fetch('/v1/deploy', { method: 'POST',
                   headers: Object.assign({ 'Content-Type': 'application/json' }, csrf ? { 'X-Drover-CSRF': csrf } : {}),
                   body: JSON.stringify({ service: 'web', component: 'app', version: 'v3' }) });
                 const a = await post(s.csrf);
                 const b = await post(null);
                 done({ with_csrf: a.status, message: (await a.json()).message, without: b.status, scope: s.scope });
               })();"#,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(got["scope"], "read", "{got}");
    assert_eq!(got["with_csrf"], 403, "{got}");
    assert_eq!(got["without"], 403, "{got}");
    assert!(
        got["message"]
            .as_str()
            .unwrap()
            .contains("needs an admin token"),
        "{got}"
    );
    let s = up.status().unwrap();
    assert_eq!(s.groups[0].versions, "app=v1", "nothing was deployed");
    r.close().await.unwrap();
}

/// Two services in one region: `web` deploys through a canary (one instance, a 4 s bake,
/// judged on the demo server's `error_rate` as well as the built-in checks), `api`
/// autoscales on the demo server's `load` (requests per second over its capacity, target 0.5).
fn canary_and_autoscale_fleet(web_ingress: u16, api_ingress: u16, block: u8) -> String {
    let web = fleet_text(web_ingress, block, 3)
        .replace("min_healthy_time = \"2s\"", "min_healthy_time = \"1s\"")
        .replace("drain_timeout = \"10s\"", "drain_timeout = \"2s\"")
        .replace(
            "auto_revert = true",
            "auto_revert = true\ncanary = { instances = 1, bake = \"4s\" }\nanalysis = { metrics = [{ metric = \"error_rate\", direction = \"lower\", max_ratio = 1.5, tolerance = 0.02 }] }",
        )
        .replace(
            "\"--message\", \"hello from web {version}\"]",
            "\"--message\", \"hello from web {version}\"]\ncustom_metrics = { error_rate = { port = \"http\", path = \"/error_rate\" } }",
        );
    let api = format!(
        r#"
[services.api]
regions = ["local"]
capacity = {{ min = 2, desired = 2, max = 4 }}
ingress = {{ listen = "127.0.0.1:{api_ingress}", component = "app", port = "http" }}
autoscale = {{ metric = "custom:load", target = 0.5, scale_out_cooldown = "2s", scale_in_stabilization = "10m", tolerance = 0.1, warmup = "1s" }}

[services.api.rollout]
drain_timeout = "2s"

[services.api.components.app]
runtime = "process"
version = "v1"
command = "{{drover}}"
args = ["demo-server", "--listen", "{{addr}}:{{port.http}}", "--message", "hello from api", "--capacity-rps", "50"]
ports = {{ http = 8080 }}
custom_metrics = {{ load = {{ port = "http", path = "/utilization" }} }}
health = {{ type = "http", port = "http", path = "/healthz", interval = "500ms", timeout = "400ms", healthy_threshold = 1, unhealthy_threshold = 3 }}
stop_grace = "2s"
drain_signal = "SIGUSR1"
"#
    );
    format!("{web}{api}")
}

/// Issue 19: the group page shows a canary's analysis, check by check with the numbers the
/// server judged, and the fleet page (and the group page) chart an autoscaled group's desired
/// count against its metric and target over the last hour, live.
#[test]
fn the_dashboard_shows_canary_numbers_and_the_autoscale_chart() {
    in_browser(Kind::Chromium, canary_and_autoscale);
}

#[test]
fn in_firefox_the_dashboard_shows_canary_numbers_and_the_autoscale_chart() {
    in_browser(Kind::Firefox, canary_and_autoscale);
}

async fn canary_and_autoscale(d: Driver) {
    let dir = tempfile::tempdir().unwrap();
    let _agents = KillAgents(dir.path().to_path_buf());
    let (api, web_ing, api_ing) = (free_port(), free_port(), free_port());
    let text = canary_and_autoscale_fleet(web_ing, api_ing, subnet());
    drover_model::parse_fleet(&text, "test").unwrap();
    let up = Up::start(dir.path(), &text, api, web_ing);
    up.wait_healthy(5, Duration::from_secs(30));
    let long = Duration::from_secs(60);
    let base = up.server();
    let c = browser(&d).await;
    c.goto(&login_link(&up)).await.unwrap();
    until(
        &c,
        "both groups on the fleet page",
        r#"return document.querySelectorAll('.cell[data-group]').length === 2"#,
        long,
    )
    .await;

    // A deploy of web through its canary, followed on the group page.
    c.goto(&format!("{base}/ui/#/group/web/local"))
        .await
        .unwrap();
    until(
        &c,
        "web's group page",
        "return document.querySelectorAll('#instances tbody tr').length === 3",
        long,
    )
    .await;
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2"]);
    assert_eq!(code, 0, "{out}{err}");
    let baking = until(
        &c,
        "the canary baking beside the old instances",
        r#"const r = document.querySelector('#rollout-section .rollout');
           const gens = [...document.querySelectorAll('#instances tbody tr')].map(t => t.dataset.generation);
           return r && r.dataset.phase === 'baking' && gens.filter(g => g === '2').length === 1
             && gens.filter(g => g === '1').length === 3 && r.textContent;"#,
        long,
    )
    .await;
    assert!(
        baking
            .as_str()
            .unwrap()
            .starts_with("baking to generation 2"),
        "{baking}"
    );
    let shown = until(
        &c,
        "the canary analysis, check by check",
        r#"const a = document.getElementById('canary');
           const rows = a ? [...a.querySelectorAll('#canary-checks tbody tr[data-check]')] : [];
           return a && rows.length >= 4 && { verdict: a.dataset.verdict, head: a.querySelector('p').textContent,
             checks: rows.map(r => [...r.cells].map(c => c.textContent)) };"#,
        long,
    )
    .await;
    // The numbers are the server's: those in the group's status, check by check.
    let s = up.status().unwrap();
    let web = s.groups.iter().find(|g| g.group == "web/local").unwrap();
    let analysis = web
        .rollout
        .analysis
        .clone()
        .expect("the status has the analysis");
    assert!(
        analysis.starts_with("passed: 1 canary against 3 baseline instance(s): "),
        "{analysis}"
    );
    assert_eq!(shown["verdict"], "passed", "{shown}");
    assert!(
        shown["head"]
            .as_str()
            .unwrap()
            .contains("1 canary against 3 baseline instance(s)"),
        "{shown}"
    );
    let checks = shown["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|r| r[0].as_str().unwrap()).collect();
    for want in [
        "restarts per instance",
        "turned unhealthy per instance",
        "balancer connect failures share",
        "error_rate",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    for row in checks {
        let r: Vec<&str> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(r[4], "ok", "{r:?}");
        let words = format!(
            "{}: canary {}, baseline {} (limit {})",
            r[0], r[1], r[2], r[3]
        );
        assert!(analysis.contains(&words), "{words} in {analysis}");
    }
    until(
        &c,
        "the rollout through its canary done",
        r#"const r = document.querySelector('#rollout-section .rollout');
           const gens = [...document.querySelectorAll('#instances tbody tr')].map(t => t.dataset.generation);
           return r && r.dataset.phase === 'done' && gens.length === 3 && gens.every(g => g === '2')
             && document.querySelector('#canary[data-verdict="passed"]');"#,
        Duration::from_secs(90),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    shot(&d, &c, "group-canary.png").await;

    // The fleet page: api's chart draws desired against the metric and its target. First
    // at 2 instances, idle (the history samples every 10 s) ...
    c.goto(&format!("{base}/ui/#/fleet")).await.unwrap();
    until(
        &c,
        "api's chart at 2 instances",
        r#"const cell = document.querySelector('.cell[data-group="api/local"]');
           return cell && cell.querySelector('svg.chart path.desired')
             && cell.querySelector('.legend').textContent.includes('desired 2');"#,
        long,
    )
    .await;
    // ... then under load: the autoscaler measures it and scales out.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = load(
        format!("127.0.0.1:{api_ing}").parse().unwrap(),
        2,
        false,
        stop.clone(),
    );
    let chart = until(
        &c,
        "api's autoscale chart with the metric measured after a scale-out",
        r#"const cell = document.querySelector('.cell[data-group="api/local"]');
           const svg = cell && cell.querySelector('svg.chart');
           const obs = svg && svg.querySelector('polyline.observed');
           const d = svg && svg.querySelector('path.desired');
           if (!obs || !d || !svg.querySelector('line.target')) return null;
           const legend = cell.querySelector('.legend').textContent;
           const desired = parseInt(cell.querySelector('[data-health]').textContent.split('/')[1], 10);
           const dd = d.getAttribute('d');
           const y0 = parseFloat(dd.slice(1).split(/[HV]/)[0].split(',')[1]);
           const stepped = [...dd.matchAll(/V([\d.]+)/g)].some(m => parseFloat(m[1]) < y0);
           return desired > 2 && stepped && { label: svg.getAttribute('aria-label'), legend, desired,
             points: obs.getAttribute('points').trim().split(' ').length, path: d.getAttribute('d') };"#,
        long,
    )
    .await;
    let s = up.status().unwrap();
    let g = s.groups.iter().find(|g| g.group == "api/local").unwrap();
    let a = g.autoscale.clone().expect("api autoscales");
    assert_eq!(a.metric, "custom:load");
    assert!(a.observed.unwrap_or(0.0) > 0.5, "{a:?}");
    let legend = chart["legend"].as_str().unwrap();
    assert!(legend.contains("custom:load"), "{chart}");
    assert!(legend.contains("target 0.5"), "{chart}");
    assert!(
        legend.contains(&format!("desired {}", chart["desired"])),
        "{chart}"
    );
    let label = chart["label"].as_str().unwrap();
    assert!(
        label.starts_with("last hour of api/local: desired ")
            && label.contains("custom:load")
            && label.contains("against target 0.5"),
        "{chart}"
    );
    assert!(chart["points"].as_u64().unwrap() >= 1, "{chart}");
    // The desired count stepped up: "M x,y" at 2 instances, then a "V y" higher on the chart.
    let path = chart["path"].as_str().unwrap();
    let y0: f64 = path
        .trim_start_matches('M')
        .split(['H', 'V'])
        .next()
        .and_then(|p| p.split(',').nth(1))
        .and_then(|y| y.parse().ok())
        .unwrap_or_else(|| panic!("{path}"));
    let ups = path
        .split('V')
        .skip(1)
        .filter_map(|p| p.split('H').next().and_then(|y| y.parse::<f64>().ok()))
        .filter(|y| *y < y0)
        .count();
    assert!(ups >= 1, "desired drawn stepping up from 2: {path}");
    // web has no autoscaling, and its chart says so.
    let web_legend = c
        .find(Locator::Css(r#".cell[data-group="web/local"] .legend"#))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(web_legend.contains("no autoscaling"), "{web_legend}");
    shot(&d, &c, "fleet-autoscale.png").await;
    // The group page charts the same.
    c.goto(&format!("{base}/ui/#/group/api/local"))
        .await
        .unwrap();
    until(
        &c,
        "api's group page chart",
        r#"const svg = document.querySelector('main svg.chart');
           return svg && svg.querySelector('polyline.observed') && svg.querySelector('line.target')
             && document.querySelector('main .legend').textContent.includes('target 0.5');"#,
        long,
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = traffic.join().unwrap();
    assert!(r.ok > 0, "{r:?}");
    c.close().await.unwrap();
}
