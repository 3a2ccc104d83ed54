//! End to end: who gets in where. Every endpoint against every kind of caller (no token, a
//! wrong token, a revoked one, admin, read, the agent of group A and of group B); tokens made,
//! listed and revoked with the CLI; secrets redacted in everything the API serves; malformed
//! heartbeats and oversized or deeply nested bodies refused without changing anything.

mod common;

use std::time::{Duration, Instant};

use common::*;
use drover_model::api::{ApiError, FleetStatus};

const SECRET_WEB: &str = "hunter2-web-very-secret";
const SECRET_API: &str = "hunter2-api-very-secret";

/// Two services (groups web/local and api/local), one instance each, each with a secret.
fn fleet(block: u8, port: u16, web_secret: &str) -> String {
    let svc = |name: &str, secret: &str| {
        format!(
            r#"
[services.{name}]
regions = ["local"]
capacity = {{ min = 1, desired = 1, max = 2 }}

[services.{name}.components.app]
runtime = "process"
version = "v1"
command = "{{drover}}"
args = ["demo-server", "--listen", "{{addr}}:{{port.http}}", "--message", "hello from {name}"]
ports = {{ http = {port} }}
secret_env = {{ DB_PASSWORD = "{secret}" }}
health = {{ type = "http", port = "http", path = "/healthz", interval = "200ms", timeout = "200ms", healthy_threshold = 1, unhealthy_threshold = 3 }}
stop_grace = "2s"
"#
        )
    };
    format!(
        "[fleet]\nname = \"sec\"\n\n[regions.local]\nprovider = \"local\"\nsubnet = \"127.{block}.0.0/16\"\n{}{}",
        svc("web", web_secret),
        svc("api", SECRET_API)
    )
}

fn start() -> (tempfile::TempDir, Up) {
    let dir = tempfile::tempdir().unwrap();
    let text = fleet(subnet(), free_port(), SECRET_WEB);
    let up = Up::start(dir.path(), &text, free_port(), free_port());
    up.wait_healthy(2, Duration::from_secs(20));
    (dir, up)
}

fn admin(up: &Up) -> String {
    std::fs::read_to_string(up.dir.join("data/admin.token"))
        .unwrap()
        .trim()
        .to_string()
}

/// Create a token with the admin token; its secret.
fn create(up: &Up, body: &str) -> (String, String) {
    let (code, out) = http_as(up.api, "POST", "/v1/tokens", Some(body), Some(&admin(up))).unwrap();
    assert_eq!(code, 201, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    (
        v["id"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}

fn instance_of_group(s: &FleetStatus, group: &str) -> (String, String, u64) {
    let i = s
        .groups
        .iter()
        .find(|g| g.group == group)
        .and_then(|g| g.instances.first())
        .unwrap_or_else(|| panic!("no instance in {group}: {s:#?}"));
    (i.id.clone(), i.addr.clone(), i.generation)
}

fn heartbeat(instance: &str, group: &str, addr: &str, generation: u64) -> String {
    serde_json::json!({
        "instance": instance, "group": group, "generation": generation, "addr": addr,
        "phase": "running", "seq": 0,
        "components": [{"name": "app", "version": "v1", "state": "healthy", "restarts": 0}],
        "utilization": {"cpu": 0.0, "memory_bytes": 0, "agent_rss_bytes": 0}
    })
    .to_string()
}

/// The group agent token the server launches `group`'s instances from, and its id: derived
/// from the store's agent-token key as the server does (what the local provider gives an instance
/// is an instance token made from it).
fn group_token(up: &Up, group: &str) -> (String, String) {
    group_agent_token(up.api, &admin(up), &up.dir.join("data"), group)
}

/// Issue 20, item 4: one instance cannot silence another. An instance's token speaks for that
/// instance only (403 for another, with a message that names neither its group nor its
/// address); once an instance has reported with its own token, its group's token cannot speak
/// for it either, so a heartbeat with seq = 2^64-1 (which would make the real agent's
/// heartbeats "late" for ever) is refused, and the instance stays healthy and is not
/// replaced. A heartbeat with the wrong generation is refused without telling the right one.
#[test]
fn an_instance_token_speaks_for_its_own_instance_only() {
    let (_dir, up) = start();
    let status = up.status().unwrap();
    let (web_i, web_addr, web_gen) = instance_of_group(&status, "web/local");
    let (id, group_secret) = group_token(&up, "web/local");
    let own = drover_model::token::instance_token(&group_secret, &id, &web_i);
    // A second web instance, to speak for.
    let (code, out) = http_as(
        up.api,
        "POST",
        "/v1/scale",
        Some(r#"{"service":"web","desired":2}"#),
        Some(&admin(&up)),
    )
    .unwrap();
    assert_eq!(code, 200, "{out}");
    up.wait_healthy(3, Duration::from_secs(20));
    let status = up.status().unwrap();
    let web = status
        .groups
        .iter()
        .find(|g| g.group == "web/local")
        .unwrap();
    let other = web
        .instances
        .iter()
        .find(|i| i.id != web_i)
        .unwrap()
        .clone();
    let jam = |instance: &str, addr: &str, generation: u64| {
        serde_json::json!({
            "instance": instance, "group": "web/local", "generation": generation, "addr": addr,
            "phase": "running", "seq": u64::MAX,
            "components": [{"name": "app", "version": "v1", "state": "healthy", "restarts": 0}],
            "utilization": {"cpu": 0.0, "memory_bytes": 0, "agent_rss_bytes": 0}
        })
        .to_string()
    };
    // web_i's token for the other instance: refused, generically.
    let body = jam(&other.id, &other.addr, other.generation);
    let (code, out) = http_as(
        up.api,
        "POST",
        "/v1/agent/heartbeat",
        Some(&body),
        Some(&own),
    )
    .unwrap();
    assert_eq!(code, 403, "{out}");
    assert!(
        !out.contains(&other.addr) && !out.contains("web/local"),
        "{out}"
    );
    for path in [
        format!("/v1/agent/permit?instance={}", other.id),
        format!("/v1/agent/connections?instance={}", other.id),
        format!("/v1/agent/peers?instance={}&wait_ms=0", other.id),
        format!("/v1/agent/tasks?instance={}&wait_ms=0", other.id),
    ] {
        let (code, out) = http_as(up.api, "GET", &path, None, Some(&own)).unwrap();
        assert_eq!(code, 403, "{path}: {out}");
    }
    // The group's token, for an instance that reports with its own: refused too.
    let (code, out) = http_as(
        up.api,
        "POST",
        "/v1/agent/heartbeat",
        Some(&body),
        Some(&group_secret),
    )
    .unwrap();
    assert_eq!(code, 403, "{out}");
    // Its own token, wrong generation: 400 that does not say the right one or the address.
    let wrong = jam(&web_i, &web_addr, web_gen + 7);
    let (code, out) = http_as(
        up.api,
        "POST",
        "/v1/agent/heartbeat",
        Some(&wrong),
        Some(&own),
    )
    .unwrap();
    assert_eq!(code, 400, "{out}");
    assert!(!out.contains(&format!("generation {web_gen}")), "{out}");
    // A token made up for an instance, with a bad MAC: 401.
    let forged = format!("{}0", &own[..own.len() - 1]);
    let forged = if forged == own {
        format!("{}1", &own[..own.len() - 1])
    } else {
        forged
    };
    let (code, _) = http_as(up.api, "GET", "/v1/status", None, Some(&forged)).unwrap();
    assert_eq!(code, 401);
    // Well past silent_after (5 s): both instances still healthy, none replaced.
    std::thread::sleep(Duration::from_secs(8));
    let after = up.status().unwrap();
    let web = after
        .groups
        .iter()
        .find(|g| g.group == "web/local")
        .unwrap();
    let mut ids: Vec<&str> = web.instances.iter().map(|i| i.id.as_str()).collect();
    ids.sort();
    let mut want = vec![web_i.as_str(), other.id.as_str()];
    want.sort();
    assert_eq!(ids, want, "an instance was replaced: {web:#?}");
    assert_eq!(web.healthy, 2, "{web:#?}");
}

#[test]
fn every_endpoint_answers_every_caller_as_it_should() {
    let (_dir, up) = start();
    let status = up.status().unwrap();
    let (web_i, web_addr, web_gen) = instance_of_group(&status, "web/local");
    let (api_i, api_addr, api_gen) = instance_of_group(&status, "api/local");
    let admin = admin(&up);
    let (_, read) = create(&up, r#"{"scope":"read","name":"ci"}"#);
    let (revoked_id, revoked) = create(&up, r#"{"scope":"read","name":"old"}"#);
    let (code, out) = http_as(
        up.api,
        "DELETE",
        &format!("/v1/tokens/{revoked_id}"),
        None,
        Some(&admin),
    )
    .unwrap();
    assert_eq!(code, 200, "{out}");
    let (_, agent_a) = create(&up, r#"{"scope":"agent","group":"web/local"}"#);
    let (_, agent_b) = create(&up, r#"{"scope":"agent","group":"api/local"}"#);
    let (_, lb) = create(&up, r#"{"scope":"lb","name":"edge"}"#);
    let (_, exec) = create(&up, r#"{"scope":"exec","name":"oncall"}"#);
    assert!(exec.starts_with("drover_exec_"), "{exec}");
    let wrong = format!("drover_admin_{}", "0".repeat(64));
    let toml = std::fs::read_to_string(&up.file).unwrap();
    let apply_body =
        serde_json::json!({"file": "drover.toml", "toml": toml, "dry_run": true}).to_string();

    // Callers, in this order in every row below.
    let callers: [(&str, Option<&str>); 9] = [
        ("none", None),
        ("wrong", Some(&wrong)),
        ("revoked", Some(&revoked)),
        ("admin", Some(&admin)),
        ("read", Some(&read)),
        ("agent A", Some(&agent_a)),
        ("agent B", Some(&agent_b)),
        ("lb", Some(&lb)),
        ("exec", Some(&exec)),
    ];
    let hb_web = heartbeat(&web_i, "web/local", &web_addr, web_gen);
    let hb_api = heartbeat(&api_i, "api/local", &api_addr, api_gen);
    // A web instance claimed under group B: refused for A (wrong group) and B (not its instance).
    let hb_web_as_api = heartbeat(&web_i, "api/local", &web_addr, web_gen);
    let permit_web = format!("/v1/agent/permit?instance={web_i}");
    let permit_api = format!("/v1/agent/permit?instance={api_i}");
    let conns_web = format!("/v1/agent/connections?instance={web_i}");
    let conns_api = format!("/v1/agent/connections?instance={api_i}");
    let peers_web = format!("/v1/agent/peers?instance={web_i}&wait_ms=0");
    let tasks_web = format!("/v1/agent/tasks?instance={web_i}&wait_ms=0");
    let upload_web = format!("/v1/agent/tasks/1?instance={web_i}");
    let input_web = format!("/v1/agent/tasks/1/input?instance={web_i}");
    let flight_web = serde_json::json!({
        "instance": web_i, "group": "web/local", "generation": web_gen, "component": "app",
        "reason": "matrix", "at_ms": 0, "lines": []
    })
    .to_string();
    let tail_web = serde_json::json!({
        "instance": web_i, "group": "web/local", "generation": web_gen,
        "components": [{"component": "app", "reset": true, "lines": []}]
    })
    .to_string();
    const U: u16 = 401;
    const F: u16 = 403;
    #[rustfmt::skip]
    let rows: Vec<(&str, &str, Option<&str>, [u16; 9])> = vec![
        //                                                          none wrong revoked admin read agentA agentB lb exec
        ("GET", "/v1/health", None,                                [200, 200, 200, 200, 200, 200, 200, 200, 200]),
        ("GET", "/v1/status", None,                                [U, U, U, 200, 200, F, F, F, 200]),
        ("GET", "/v1/events?limit=5", None,                        [U, U, U, 200, 200, F, F, F, 200]),
        ("GET", "/v1/revisions", None,                             [U, U, U, 200, 200, F, F, F, 200]),
        ("GET", "/v1/revisions/1", None,                           [U, U, U, 200, 200, F, F, F, 200]),
        ("GET", "/metrics", None,                                  [U, U, U, 200, 200, F, F, F, 200]),
        ("GET", "/v1/plans/web/local/1", None,                     [U, U, U, 200, 200, 200, F, F, 200]),
        ("GET", "/v1/plans/api/local/1", None,                     [U, U, U, 200, 200, F, 200, F, 200]),
        ("POST", "/v1/apply", Some(&apply_body),                   [U, U, U, 200, F, F, F, F, F]),
        ("POST", "/v1/deploy", Some(r#"{"service":"web","component":"app","version":"v1","dry_run":true}"#),
                                                                   [U, U, U, 200, F, F, F, F, F]),
        ("POST", "/v1/rollback", Some(r#"{"service":"web","dry_run":true}"#),
                                                                   [U, U, U, 409, F, F, F, F, F]),
        ("POST", "/v1/scale", Some(r#"{"service":"web","desired":1}"#),
                                                                   [U, U, U, 200, F, F, F, F, F]),
        ("GET", "/v1/schedules", None,                             [U, U, U, 200, 200, F, F, F, 200]),
        ("POST", "/v1/schedules", Some(r#"{"service":"web","desired":2,"start_ms":4102444800000,"end_ms":4102448400000}"#),
                                                                   [U, U, U, 201, F, F, F, F, F]),
        ("DELETE", "/v1/schedules/999", None,                      [U, U, U, 404, F, F, F, F, F]),
        ("GET", "/v1/tokens", None,                                [U, U, U, 200, F, F, F, F, F]),
        ("POST", "/v1/tokens", Some(r#"{"scope":"read","name":"matrix"}"#),
                                                                   [U, U, U, 201, F, F, F, F, F]),
        ("DELETE", "/v1/tokens/t-999999", None,                    [U, U, U, 404, F, F, F, F, F]),
        // The instances report with their own instance tokens: a group's token no longer
        // speaks for them (an_instance_token_speaks_for_its_own_instance_only).
        ("POST", "/v1/agent/heartbeat", Some(&hb_web),             [U, U, U, F, F, F, F, F, F]),
        ("POST", "/v1/agent/heartbeat", Some(&hb_api),             [U, U, U, F, F, F, F, F, F]),
        ("POST", "/v1/agent/heartbeat", Some(&hb_web_as_api),      [U, U, U, F, F, F, F, F, F]),
        ("GET", &permit_web, None,                                 [U, U, U, F, F, F, F, F, F]),
        ("GET", &permit_api, None,                                 [U, U, U, F, F, F, F, F, F]),
        ("GET", &conns_web, None,                                  [U, U, U, F, F, F, F, F, F]),
        ("GET", &conns_api, None,                                  [U, U, U, F, F, F, F, F, F]),
        ("GET", &peers_web, None,                                  [U, U, U, F, F, F, F, F, F]),
        ("GET", &tasks_web, None,                                  [U, U, U, F, F, F, F, F, F]),
        ("POST", &upload_web, Some("{}"),                          [U, U, U, F, F, F, F, F, F]),
        ("POST", "/v1/agent/flight", Some(&flight_web),            [U, U, U, F, F, F, F, F, F]),
        ("POST", "/v1/agent/tail", Some(&tail_web),                [U, U, U, F, F, F, F, F, F]),
        ("GET", "/v1/logs?service=nope", None,                     [U, U, U, 404, 404, F, F, F, 404]),
        ("POST", "/v1/exec", Some(r#"{"service":"nope","command":["true"]}"#),
                                                                   [U, U, U, 404, F, F, F, F, 404]),
        ("POST", "/v1/exec/1/input", Some(r#"{"type":"eof"}"#),    [U, U, U, 404, F, F, F, F, 404]),
        ("GET", &input_web, None,                                  [U, U, U, F, F, F, F, F, F]),
        ("GET", "/v1/agent/permit?instance=i-999999", None,        [U, U, U, F, F, 404, 404, F, F]),
        ("GET", "/v1/nope", None,                                  [U, U, U, 404, 404, 404, 404, 404, 404]),
        ("POST", "/v1/status", None,                               [U, U, U, 405, 405, F, F, F, 405]),
        ("GET", "/v1/lb/config?wait_ms=0", None,                   [U, U, U, 200, F, F, F, 200, F]),
        ("POST", "/v1/lb/report", Some(r#"{"lb":"matrix","epoch":"","version":0,"accepting":false,"connections":{}}"#),
                                                                   [U, U, U, 200, F, F, F, 200, F]),
        // The dashboard's pages check the session cookie, never a bearer token: the login
        // page for everybody here (none has a session); its API needs read.
        ("GET", "/ui", None,                                       [308, 308, 308, 308, 308, 308, 308, 308, 308]),
        ("GET", "/ui/", None,                                      [200, 200, 200, 200, 200, 200, 200, 200, 200]),
        ("POST", "/ui/", None,                                     [405, 405, 405, 405, 405, 405, 405, 405, 405]),
        ("GET", "/ui/login", None,                                 [400, 400, 400, 400, 400, 400, 400, 400, 400]),
        ("GET", "/ui/login?code=0123", None,                       [U, U, U, U, U, U, U, U, U]),
        ("GET", "/ui/assets/app.js", None,                         [200, 200, 200, 200, 200, 200, 200, 200, 200]),
        ("GET", "/ui/assets/app.css", None,                        [200, 200, 200, 200, 200, 200, 200, 200, 200]),
        ("GET", "/ui/assets/nope.js", None,                        [404, 404, 404, 404, 404, 404, 404, 404, 404]),
        ("GET", "/v1/ui/session", None,                            [U, U, U, 200, 200, F, F, F, 200]),
        ("GET", "/v1/ui/summary", None,                            [U, U, U, 200, 200, F, F, F, 200]),
        ("GET", "/v1/ui/groups/web/local", None,                   [U, U, U, 200, 200, F, F, F, 200]),
        ("GET", "/v1/ui/groups/nope/local", None,                  [U, U, U, 404, 404, F, F, F, 404]),
        ("POST", "/v1/ui/login-links", None,                       [U, U, U, 201, 201, F, F, F, 201]),
        ("POST", "/v1/ui/logout", None,                            [U, U, U, 200, 200, F, F, F, 200]),
    ];
    let mut failures = Vec::new();
    let mut checked = 0;
    for (method, path, body, expected) in &rows {
        for ((who, token), want) in callers.iter().zip(expected) {
            let (code, out) = http_as(up.api, method, path, *body, *token).unwrap();
            checked += 1;
            if code != *want {
                failures.push(format!(
                    "{method} {path} as {who}: {code}, want {want}: {out}"
                ));
                continue;
            }
            // The pages answer HTML (the login page says why); the API an ApiError.
            if (code == U || code == F) && !path.starts_with("/ui") {
                let e: ApiError = serde_json::from_str(&out)
                    .unwrap_or_else(|_| panic!("{method} {path} as {who}: not an ApiError: {out}"));
                let want_code = if code == U {
                    "unauthorized"
                } else {
                    "forbidden"
                };
                assert_eq!(e.code, want_code, "{method} {path} as {who}");
                assert!(e.message.len() > 20, "a clear message: {out}");
            }
            // No answer ever carries a token's secret, except creation's own.
            for secret in [&admin, &read, &agent_a, &agent_b, &lb, &exec] {
                if !(path.starts_with("/v1/tokens") && *method == "POST") {
                    assert!(
                        !out.contains(secret.as_str()),
                        "{method} {path} leaked a token"
                    );
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} answers wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(checked, rows.len() * 9);

    // The revoked token says so; the messages name the problem.
    let (_, out) = http_as(up.api, "GET", "/v1/status", None, Some(&revoked)).unwrap();
    assert!(out.contains("revoked"), "{out}");
    let (_, out) = http_as(up.api, "GET", "/v1/status", None, Some(&agent_a)).unwrap();
    assert!(out.contains("agent token of group web/local"), "{out}");

    sessions_answer_as_their_tokens(&up, &admin, &read);

    // The instances still run and report with their own (launch) tokens.
    up.wait_healthy(2, Duration::from_secs(5));
}

/// A request with extra header lines: (status, head, body).
fn raw(
    up: &Up,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[String],
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&up.api, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = body.unwrap_or("");
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        up.api,
        body.len()
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, head.to_string(), body.to_string())
}

/// A dashboard session opened with `token` through a `drover ui` link: its `Cookie:` header
/// line and its CSRF token.
fn session(up: &Up, token: &str) -> (String, String) {
    let (code, out) = http_as(up.api, "POST", "/v1/ui/login-links", None, Some(token)).unwrap();
    assert_eq!(code, 201, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (code, head, body) = raw(up, "GET", v["path"].as_str().unwrap(), None, &[]);
    assert_eq!(code, 200, "{body}");
    let set = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {head}"));
    let pair = set
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .split(';')
        .next()
        .unwrap();
    let cookie = format!("Cookie: {pair}");
    let (code, _, body) = raw(
        up,
        "GET",
        "/v1/ui/session",
        None,
        std::slice::from_ref(&cookie),
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    (cookie, v["csrf"].as_str().unwrap().to_string())
}

/// The dashboard's routes and the API through session cookies: no session (or an ended or
/// made-up one) gets the login page and 401s; a read session sees everything and is refused
/// every change, CSRF token or not; an admin session acts only with its CSRF token, and
/// never when the browser says the request came from another site.
fn sessions_answer_as_their_tokens(up: &Up, admin: &str, read: &str) {
    let (acookie, acsrf) = session(up, admin);
    let (rcookie, rcsrf) = session(up, read);
    let (ended, ended_csrf) = session(up, admin);
    let (code, _, body) = raw(
        up,
        "POST",
        "/v1/ui/logout",
        None,
        &[ended.clone(), format!("X-Drover-CSRF: {ended_csrf}")],
    );
    assert_eq!(code, 200, "{body}");
    let name = acookie
        .trim_start_matches("Cookie: ")
        .split('=')
        .next()
        .unwrap();
    let made_up = format!("Cookie: {name}={}", "a".repeat(64));
    let csrf = |t: &str| format!("X-Drover-CSRF: {t}");
    let cross = "Sec-Fetch-Site: cross-site".to_string();
    let same = "Sec-Fetch-Site: same-origin".to_string();
    // Callers, in this order in every row below.
    let callers: Vec<(&str, Vec<String>)> = vec![
        ("no session", vec![]),
        ("ended session", vec![ended.clone(), csrf(&ended_csrf)]),
        ("made-up session", vec![made_up, csrf(&acsrf)]),
        (
            "admin session",
            vec![acookie.clone(), csrf(&acsrf), same.clone()],
        ),
        ("admin, no CSRF", vec![acookie.clone()]),
        ("admin, wrong CSRF", vec![acookie.clone(), csrf(&rcsrf)]),
        (
            "admin, cross-site",
            vec![acookie.clone(), csrf(&acsrf), cross.clone()],
        ),
        ("read session", vec![rcookie.clone(), csrf(&rcsrf), same]),
        ("read, no CSRF", vec![rcookie.clone()]),
    ];
    const U: u16 = 401;
    const F: u16 = 403;
    // 200 with the login page's token form, and 200 with the dashboard itself.
    const LOGIN: u16 = 1200;
    const DASH: u16 = 2200;
    let deploy = r#"{"service":"web","component":"app","version":"v1","dry_run":true}"#;
    #[rustfmt::skip]
    let rows: Vec<(&str, &str, Option<&str>, [u16; 9])> = vec![
        //                                         none  ended made-up admin noCSRF wrong cross read rnoCSRF
        ("GET", "/ui/", None,                     [LOGIN, LOGIN, LOGIN, DASH, DASH, DASH, DASH, DASH, DASH]),
        ("GET", "/ui/assets/app.js", None,        [200, 200, 200, 200, 200, 200, 200, 200, 200]),
        ("GET", "/v1/ui/session", None,           [U, U, U, 200, 200, 200, 200, 200, 200]),
        ("GET", "/v1/ui/summary", None,           [U, U, U, 200, 200, 200, 200, 200, 200]),
        ("GET", "/v1/ui/groups/web/local", None,  [U, U, U, 200, 200, 200, 200, 200, 200]),
        ("GET", "/v1/status", None,               [U, U, U, 200, 200, 200, 200, 200, 200]),
        ("GET", "/v1/events?limit=5", None,       [U, U, U, 200, 200, 200, 200, 200, 200]),
        ("GET", "/v1/revisions/1", None,          [U, U, U, 200, 200, 200, 200, 200, 200]),
        ("GET", "/v1/logs?service=nope", None,    [U, U, U, 404, 404, 404, 404, 404, 404]),
        ("GET", "/v1/tokens", None,               [U, U, U, 200, 200, 200, 200, F, F]),
        ("POST", "/v1/deploy", Some(deploy),      [U, U, U, 200, F, F, F, F, F]),
        ("POST", "/v1/scale", Some(r#"{"service":"web","desired":1}"#),
                                                  [U, U, U, 200, F, F, F, F, F]),
        ("POST", "/v1/rollout", Some(r#"{"service":"web","action":"resume"}"#),
                                                  [U, U, U, 200, F, F, F, F, F]),
        ("POST", "/v1/tokens", Some(r#"{"scope":"read","name":"by-session"}"#),
                                                  [U, U, U, 201, F, F, F, F, F]),
        ("POST", "/v1/exec", Some(r#"{"service":"nope","command":["true"]}"#),
                                                  [U, U, U, 404, F, F, F, F, F]),
        ("POST", "/v1/ui/login-links", None,      [U, U, U, 201, F, F, F, 201, F]),
        ("POST", "/v1/agent/heartbeat", Some("{}"),
                                                  [U, U, U, F, F, F, F, F, F]),
        ("GET", "/v1/lb/config?wait_ms=0", None,  [U, U, U, 200, 200, 200, 200, F, F]),
    ];
    let mut failures = Vec::new();
    for (method, path, body, expected) in &rows {
        for ((who, headers), want) in callers.iter().zip(expected) {
            let (code, _, out) = raw(up, method, path, *body, headers);
            let ok = match *want {
                LOGIN => code == 200 && out.contains("id=\"token-form\""),
                DASH => code == 200 && out.contains("/ui/assets/app.js"),
                w => code == w,
            };
            if !ok {
                failures.push(format!(
                    "{method} {path} as {who}: {code}, want {want}: {}",
                    out.chars().take(300).collect::<String>()
                ));
                continue;
            }
            if code == U || code == F {
                let e: ApiError = serde_json::from_str(&out)
                    .unwrap_or_else(|_| panic!("{method} {path} as {who}: not an ApiError: {out}"));
                assert!(e.message.len() > 20, "a clear message: {out}");
                // A change without the session's CSRF token (or from another site) is
                // refused for that; anything else as its token would be, naming it.
                let csrf_less = [
                    "admin, no CSRF",
                    "admin, wrong CSRF",
                    "admin, cross-site",
                    "read, no CSRF",
                ];
                if code == F && *method != "GET" && csrf_less.contains(who) {
                    assert!(
                        e.message.contains("CSRF"),
                        "{method} {path} as {who}: {out}"
                    );
                } else if code == F {
                    let scope = if who.starts_with("read") {
                        "read"
                    } else {
                        "admin"
                    };
                    assert!(
                        e.message.contains(&format!(
                            "is a{} {scope} token",
                            if scope == "admin" { "n" } else { "" }
                        )),
                        "{method} {path} as {who}: {out}"
                    );
                }
            }
            for secret in [admin, read, &acsrf[..], &rcsrf[..]] {
                if !path.starts_with("/v1/ui/session") {
                    assert!(
                        !out.contains(secret),
                        "{method} {path} as {who} leaked a secret"
                    );
                }
            }
            assert!(
                !out.contains(acookie.split('=').nth(1).unwrap()),
                "{method} {path} as {who} leaked a session id"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} answers wrong:\n{}",
        failures.len(),
        rows.len() * callers.len(),
        failures.join("\n")
    );
    // Logging out is a change too: refused without the CSRF token, then done with it; the
    // session is gone and the dashboard shows the login page.
    let (code, _, out) = raw(
        up,
        "POST",
        "/v1/ui/logout",
        None,
        std::slice::from_ref(&rcookie),
    );
    assert_eq!(code, F, "{out}");
    let (code, _, out) = raw(
        up,
        "POST",
        "/v1/ui/logout",
        None,
        &[rcookie.clone(), csrf(&rcsrf)],
    );
    assert_eq!(code, 200, "{out}");
    let (code, _, _) = raw(
        up,
        "GET",
        "/v1/ui/summary",
        None,
        std::slice::from_ref(&rcookie),
    );
    assert_eq!(code, U);
    let (_, _, page) = raw(up, "GET", "/ui/", None, std::slice::from_ref(&rcookie));
    assert!(page.contains("id=\"token-form\""), "{page}");
    // The admin session is untouched by the other's logout.
    let (code, _, _) = raw(
        up,
        "GET",
        "/v1/ui/summary",
        None,
        std::slice::from_ref(&acookie),
    );
    assert_eq!(code, 200);
}

#[test]
fn tokens_from_the_cli_secrets_redacted_and_hostile_bodies_refused() {
    let (_dir, up) = start();
    // The CLI finds the admin token in the data directory.
    let (code, out, err) = up.cli(&["token", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("admin (made on first start)") && out.contains("web/local"),
        "{out}"
    );
    let (code, secret, err) = up.cli(&["token", "create", "--scope", "read", "--name", "dash"]);
    assert_eq!(code, 0, "{err}");
    let secret = secret.trim().to_string();
    assert!(secret.starts_with("drover_read_"), "{secret}");
    assert!(err.contains("shown this once"), "{err}");
    let (_, list, _) = up.cli(&["token", "list", "--json"]);
    assert!(!list.contains(&secret), "list never shows a secret");
    let id = serde_json::from_str::<Vec<serde_json::Value>>(&list)
        .unwrap()
        .iter()
        .find(|t| t["name"] == "dash")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The read token reads, and cannot change anything.
    let with = |token: &str, args: &[&str]| {
        let mut all = vec!["--token", token];
        all.extend_from_slice(args);
        up.cli(&all)
    };
    let (code, _, err) = with(&secret, &["status"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = with(&secret, &["scale", "web", "2"]);
    assert_eq!(code, 1);
    assert!(err.contains("needs an admin token"), "{err}");
    let (code, _, err) = with(&secret, &["token", "list"]);
    assert_eq!(code, 1, "{err}");
    // Revoked: refused from then on.
    let (code, out, err) = up.cli(&["token", "revoke", &id]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = with(&secret, &["status"]);
    assert_eq!(code, 1);
    assert!(err.contains("revoked"), "{err}");
    // The last admin token cannot be revoked.
    let (code, _, err) = up.cli(&["token", "revoke", "t-000001"]);
    assert_eq!(code, 1);
    assert!(err.contains("last admin token"), "{err}");

    // The component got its secret ...
    let s = up.status().unwrap();
    let pid = s.groups[0].instances[0].components[0].pid.unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains(&format!("DB_PASSWORD={SECRET_API}"))
            || environ.contains(&format!("DB_PASSWORD={SECRET_WEB}")),
        "the component has its secret env"
    );
    // ... and no token.
    assert!(
        !environ.contains("drover_"),
        "no token in a component's environment"
    );

    // A secret change shows as a change, redacted; it rolls the group out like any change.
    let text = std::fs::read_to_string(&up.file).unwrap();
    let new_secret = "hunter3-web-rotated-secret";
    std::fs::write(&up.file, text.replace(SECRET_WEB, new_secret)).unwrap();
    let (code, out, err) = up.cli(&["apply", "drover.toml", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("secret_env.DB_PASSWORD") && out.contains("(secret)"),
        "{out}"
    );
    // A broken file that quotes a secret in an error: the error is redacted too.
    std::fs::write(
        up.dir.join("bad.toml"),
        text.replace(
            "version = \"v1\"",
            &format!("version = \"v1 {SECRET_WEB}\""),
        ),
    )
    .unwrap();
    let (code, bad_out, bad_err) = up.cli(&["apply", "bad.toml", "--json"]);
    assert_eq!(code, 1, "{bad_out}{bad_err}");
    assert!(bad_out.contains("version"), "{bad_out}");

    // Nothing the API serves holds a secret value: answers, events, history, revisions, plans.
    let mut served = vec![out, bad_out, bad_err];
    for args in [
        vec!["events", "--json"],
        vec!["history", "--json"],
        vec!["status", "--json"],
    ] {
        let (code, o, e) = up.cli(&args);
        assert_eq!(code, 0, "{args:?}: {e}");
        served.push(o);
    }
    for path in [
        "/v1/revisions/1",
        "/v1/revisions/2",
        "/v1/plans/web/local/1",
        "/v1/plans/web/local/2",
        "/v1/plans/api/local/1",
        "/v1/revisions",
        "/v1/events",
    ] {
        let (code, body) = http(up.api, "GET", path, None).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        served.push(body);
    }
    for (i, body) in served.iter().enumerate() {
        for secret in [SECRET_WEB, SECRET_API, new_secret] {
            assert!(!body.contains(secret), "answer {i} holds a secret: {body}");
        }
    }
    let (_, rev) = http(up.api, "GET", "/v1/revisions/2", None).unwrap();
    assert!(
        rev.contains("DB_PASSWORD") && rev.contains("(secret)"),
        "{rev}"
    );
    // Hostile bodies: too large, too deep, malformed heartbeats. Nothing changes (in group
    // api/local, which the secret change above does not roll out).
    let before = up.status().unwrap();
    let big = format!(
        "{{\"file\":\"x\",\"toml\":\"{}\"}}",
        "a".repeat(3 * 1024 * 1024)
    );
    let (code, body) = http(up.api, "POST", "/v1/apply", Some(&big)).unwrap();
    assert_eq!(code, 413, "{body}");
    let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let (code, body) = http(up.api, "POST", "/v1/apply", Some(&deep)).unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("nested deeper than 32"), "{body}");
    let (agent_id, agent) = create(&up, r#"{"scope":"agent","group":"api/local"}"#);
    let group = before
        .groups
        .iter()
        .find(|g| g.group == "api/local")
        .unwrap();
    let inst = &group.instances[0];
    // The instance's own token (made from any valid agent token of its group): its group's
    // token no longer speaks for it once it has reported with its own.
    let agent = drover_model::token::instance_token(&agent, &agent_id, &inst.id);
    let hb = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&heartbeat(
            &inst.id,
            "api/local",
            &inst.addr,
            inst.generation,
        ))
        .unwrap();
        f(&mut v);
        v.to_string()
    };
    let long = "x".repeat(5000);
    let bad: Vec<(&str, String)> = vec![
        ("another generation", hb(&|v| v["generation"] = 99.into())),
        ("another address", hb(&|v| v["addr"] = "127.0.0.99".into())),
        ("not an address", hb(&|v| v["addr"] = "nowhere".into())),
        (
            "an empty component name",
            hb(&|v| v["components"][0]["name"] = "".into()),
        ),
        (
            "negative cpu",
            hb(&|v| v["utilization"]["cpu"] = (-1.0).into()),
        ),
        (
            "a missing field",
            hb(&|v| {
                v.as_object_mut().unwrap().remove("phase");
            }),
        ),
        ("a wrong type", hb(&|v| v["seq"] = "one".into())),
        (
            "an unknown state",
            hb(&|v| v["components"][0]["state"] = "exploded".into()),
        ),
        (
            "too many components",
            hb(&|v| {
                v["components"] = serde_json::Value::Array(vec![v["components"][0].clone(); 300])
            }),
        ),
    ];
    for (what, body) in &bad {
        let (code, out) = http_as(
            up.api,
            "POST",
            "/v1/agent/heartbeat",
            Some(body),
            Some(&agent),
        )
        .unwrap();
        assert_eq!(code, 400, "{what}: {out}");
    }
    // A huge message is cut, not a reason to refuse (issue 20, item 8).
    let huge = hb(&|v| v["components"][0]["message"] = long.clone().into());
    let (code, out) = http_as(
        up.api,
        "POST",
        "/v1/agent/heartbeat",
        Some(&huge),
        Some(&agent),
    )
    .unwrap();
    assert_eq!(code, 200, "a huge message: {out}");
    let after = up.status().unwrap();
    let same = |s: &FleetStatus| {
        s.groups
            .iter()
            .filter(|g| g.group == "api/local")
            .flat_map(|g| &g.instances)
            .map(|i| {
                (
                    i.id.clone(),
                    i.addr.clone(),
                    i.generation,
                    i.components.len(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        same(&before),
        same(&after),
        "malformed heartbeats changed nothing"
    );
    let t0 = Instant::now();
    while up.status().unwrap().groups.iter().any(|g| g.healthy == 0) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the fleet stays healthy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A component's message that quotes its secret is scrubbed before it is stored or logged.
    let quoting = hb(&|v| {
        v["components"][0]["state"] = "unhealthy".into();
        v["components"][0]["message"] = format!("cannot log in with {SECRET_API}").into();
    });
    let (code, out) = http_as(
        up.api,
        "POST",
        "/v1/agent/heartbeat",
        Some(&quoting),
        Some(&agent),
    )
    .unwrap();
    assert_eq!(code, 200, "{out}");
    // Health events are soft state: written with the writer's next group, not before the
    // heartbeat is answered.
    let t0 = Instant::now();
    loop {
        let (_, events) = http(up.api, "GET", "/v1/events?kind=unhealthy", None).unwrap();
        if events.contains("cannot log in with (secret)") {
            assert!(!events.contains(SECRET_API), "{events}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{events}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Nor do the logs: the server's, and the agents'.
    let mut logs = std::fs::read_to_string(up.dir.join("data/drover.log")).unwrap();
    for e in std::fs::read_dir(up.dir.join("data.instances"))
        .unwrap()
        .flatten()
    {
        logs.push_str(&std::fs::read_to_string(e.path().join("agent.log")).unwrap_or_default());
        assert!(
            !e.path().join("agent.token").exists(),
            "an agent deletes its token file once read"
        );
    }
    for secret in [SECRET_WEB, SECRET_API, new_secret, &secret] {
        assert!(!logs.contains(secret), "a log holds a secret");
    }
    assert!(!logs.contains("drover_admin_") && !logs.contains("drover_agent_"));
}
