//! End to end, over plain HTTP against a real `drover server`: the dashboard's login links and
//! sessions through what a user does. A link works once; the cookie is HttpOnly and
//! SameSite=Strict; changes need the session's CSRF token from the same origin; a read
//! session is refused changes as its token is; agent tokens cannot log in; revoking the token
//! and logging out end the session; a server restart ends every session and link, and the
//! dashboard then shows its login page.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

struct Answer {
    code: u16,
    head: String,
    body: String,
}

impl Answer {
    /// The session cookie's `name=value` from `Set-Cookie`.
    fn cookie(&self) -> String {
        let line = self
            .head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
            .unwrap_or_else(|| panic!("no Set-Cookie in {}", self.head));
        line.split_once(':')
            .unwrap()
            .1
            .trim()
            .split(';')
            .next()
            .unwrap()
            .to_string()
    }
}

/// One request with the given extra header lines.
fn req(addr: SocketAddr, method: &str, path: &str, headers: &[String], body: &str) -> Answer {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    Answer {
        code: head.split_whitespace().nth(1).unwrap().parse().unwrap(),
        head: head.to_string(),
        body: body.to_string(),
    }
}

fn bearer(t: &str) -> String {
    format!("Authorization: Bearer {t}")
}

fn json(a: &Answer) -> serde_json::Value {
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {}", a.body))
}

fn wait_up(api: SocketAddr) {
    let t0 = Instant::now();
    while TcpStream::connect(api).is_err() || req(api, "GET", "/v1/health", &[], "").code != 200 {
        assert!(t0.elapsed() < Duration::from_secs(20), "server not up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A login link's path for this token.
fn link(api: SocketAddr, token: &str) -> String {
    let a = req(api, "POST", "/v1/ui/login-links", &[bearer(token)], "");
    assert_eq!(a.code, 201, "{}", a.body);
    json(&a)["path"].as_str().unwrap().to_string()
}

#[test]
fn dashboard_sessions_hold_through_what_a_user_does() {
    let dir = tempfile::tempdir().unwrap();
    let _agents = KillAgents(dir.path().to_path_buf());
    let port = free_port();
    let api: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut server = start_server(dir.path(), port);
    // Connecting retries until the socket is there.
    let t0 = Instant::now();
    while TcpStream::connect(api).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "server not listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_up(api);
    let admin = std::fs::read_to_string(dir.path().join("data/admin.token"))
        .unwrap()
        .trim()
        .to_string();

    // Without a session: the login page, not an error.
    let page = req(api, "GET", "/ui/", &[], "");
    assert_eq!(page.code, 200);
    assert!(page.body.contains("id=\"token-form\""), "{}", page.body);
    assert!(page
        .head
        .contains("content-security-policy: default-src 'self'"));
    // The API needs a token or a session.
    assert_eq!(req(api, "GET", "/v1/ui/summary", &[], "").code, 401);

    // A link works once and sets the cookie.
    let path = link(api, &admin);
    assert!(path.starts_with("/ui/login?code="), "{path}");
    let first = req(api, "GET", &path, &[], "");
    assert_eq!(first.code, 200, "{}", first.body);
    let set = first
        .head
        .lines()
        .find(|l| l.starts_with("set-cookie:"))
        .unwrap()
        .to_string();
    assert!(
        set.contains(&format!("drover_session_{port}="))
            && set.contains("HttpOnly")
            && set.contains("SameSite=Strict")
            && set.contains("Path=/"),
        "{set}"
    );
    assert!(first.body.contains("url=/ui/"), "moves on to the dashboard");
    let cookie = format!("Cookie: {}", first.cookie());
    let again = req(api, "GET", &path, &[], "");
    assert_eq!(again.code, 401);
    assert!(
        again.body.contains("This login link is not valid"),
        "{}",
        again.body
    );
    assert!(!again.head.contains("set-cookie"), "no second session");
    let bad = req(api, "GET", "/ui/login?code=", &[], "");
    assert_eq!(bad.code, 400);
    assert!(bad.body.contains("incomplete"), "{}", bad.body);

    // The session sees what its token sees, and the dashboard itself.
    let dash = req(api, "GET", "/ui/", std::slice::from_ref(&cookie), "");
    assert!(dash.body.contains("/ui/assets/app.js"), "{}", dash.body);
    let who = req(
        api,
        "GET",
        "/v1/ui/session",
        std::slice::from_ref(&cookie),
        "",
    );
    assert_eq!(who.code, 200, "{}", who.body);
    let who = json(&who);
    assert_eq!(who["scope"], "admin");
    let csrf = who["csrf"].as_str().unwrap().to_string();
    assert_eq!(csrf.len(), 64);
    let summary = req(
        api,
        "GET",
        "/v1/ui/summary",
        std::slice::from_ref(&cookie),
        "",
    );
    assert_eq!(summary.code, 200, "{}", summary.body);

    // A change needs the CSRF token, from the same origin.
    let make_read = r#"{"scope":"read","name":"viewer"}"#;
    let no_csrf = req(
        api,
        "POST",
        "/v1/tokens",
        std::slice::from_ref(&cookie),
        make_read,
    );
    assert_eq!(no_csrf.code, 403, "{}", no_csrf.body);
    assert!(no_csrf.body.contains("CSRF"), "{}", no_csrf.body);
    let wrong = req(
        api,
        "POST",
        "/v1/tokens",
        &[cookie.clone(), format!("X-Drover-CSRF: {}", "0".repeat(64))],
        make_read,
    );
    assert_eq!(wrong.code, 403);
    let cross = req(
        api,
        "POST",
        "/v1/tokens",
        &[
            cookie.clone(),
            format!("X-Drover-CSRF: {csrf}"),
            "Sec-Fetch-Site: cross-site".into(),
        ],
        make_read,
    );
    assert_eq!(cross.code, 403, "{}", cross.body);
    let made = req(
        api,
        "POST",
        "/v1/tokens",
        &[
            cookie.clone(),
            format!("X-Drover-CSRF: {csrf}"),
            "Sec-Fetch-Site: same-origin".into(),
        ],
        make_read,
    );
    assert_eq!(made.code, 201, "an admin session acts: {}", made.body);
    let made = json(&made);
    let read = made["token"].as_str().unwrap().to_string();
    let read_id = made["id"].as_str().unwrap().to_string();

    // A read token logs in by the form; its session is refused every change (403).
    let form = req(
        api,
        "POST",
        "/ui/login",
        &["Content-Type: application/x-www-form-urlencoded".into()],
        &format!("token={read}"),
    );
    assert_eq!(form.code, 200, "{}", form.body);
    let rcookie = format!("Cookie: {}", form.cookie());
    let rwho = json(&req(
        api,
        "GET",
        "/v1/ui/session",
        std::slice::from_ref(&rcookie),
        "",
    ));
    assert_eq!(rwho["scope"], "read");
    assert_eq!(rwho["can_act"], false);
    let rcsrf = rwho["csrf"].as_str().unwrap().to_string();
    for (path, body) in [
        (
            "/v1/deploy",
            r#"{"service":"web","component":"app","version":"v2"}"#,
        ),
        ("/v1/scale", r#"{"service":"web","desired":5}"#),
        ("/v1/tokens", make_read),
    ] {
        let a = req(
            api,
            "POST",
            path,
            &[rcookie.clone(), format!("X-Drover-CSRF: {rcsrf}")],
            body,
        );
        assert_eq!(a.code, 403, "{path}: {}", a.body);
        assert!(a.body.contains("needs an admin token"), "{}", a.body);
    }
    // A form posted from another site logs nobody in; neither do bad or agent tokens.
    let cross = req(
        api,
        "POST",
        "/ui/login",
        &[
            "Content-Type: application/x-www-form-urlencoded".into(),
            "Sec-Fetch-Site: cross-site".into(),
        ],
        &format!("token={read}"),
    );
    assert_eq!(cross.code, 403);
    assert!(!cross.head.contains("set-cookie"));
    let garbage = req(
        api,
        "POST",
        "/ui/login",
        &["Content-Type: application/x-www-form-urlencoded".into()],
        "token=nope",
    );
    assert_eq!(garbage.code, 401);
    assert!(
        garbage.body.contains("That token was not accepted"),
        "{}",
        garbage.body
    );
    let lb = std::fs::read_to_string(dir.path().join("data/lb.token"))
        .unwrap()
        .trim()
        .to_string();
    let lb_form = req(
        api,
        "POST",
        "/ui/login",
        &["Content-Type: application/x-www-form-urlencoded".into()],
        &format!("token={lb}"),
    );
    assert_eq!(lb_form.code, 403);
    assert!(
        lb_form.body.contains("admin or read token"),
        "{}",
        lb_form.body
    );

    // Revoking the token ends its session at once.
    let revoked = req(
        api,
        "DELETE",
        &format!("/v1/tokens/{read_id}"),
        &[bearer(&admin)],
        "",
    );
    assert_eq!(revoked.code, 200, "{}", revoked.body);
    let gone = req(
        api,
        "GET",
        "/v1/ui/session",
        std::slice::from_ref(&rcookie),
        "",
    );
    assert_eq!(gone.code, 401);
    assert!(gone.body.contains("was revoked"), "{}", gone.body);

    // Logging out ends the session and clears the cookie.
    let out = req(
        api,
        "POST",
        "/v1/ui/logout",
        &[cookie.clone(), format!("X-Drover-CSRF: {csrf}")],
        "",
    );
    assert_eq!(out.code, 200, "{}", out.body);
    assert!(out.head.contains("Max-Age=0"), "{}", out.head);
    assert_eq!(
        req(
            api,
            "GET",
            "/v1/ui/session",
            std::slice::from_ref(&cookie),
            ""
        )
        .code,
        401
    );

    // A server restart ends every session and every unused link: the dashboard asks to log
    // in again.
    let s2 = req(api, "GET", &link(api, &admin), &[], "");
    let cookie2 = format!("Cookie: {}", s2.cookie());
    let unused = link(api, &admin);
    assert_eq!(
        req(
            api,
            "GET",
            "/v1/ui/session",
            std::slice::from_ref(&cookie2),
            ""
        )
        .code,
        200
    );
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let _ = server.wait();
    let mut server = start_server(dir.path(), port);
    wait_up(api);
    let after = req(
        api,
        "GET",
        "/v1/ui/session",
        std::slice::from_ref(&cookie2),
        "",
    );
    assert_eq!(after.code, 401);
    assert!(after.body.contains("server restarted"), "{}", after.body);
    let page = req(api, "GET", "/ui/", std::slice::from_ref(&cookie2), "");
    assert!(
        page.body.contains("id=\"token-form\""),
        "the login page again"
    );
    let stale = req(api, "GET", &unused, &[], "");
    assert_eq!(stale.code, 401);
    assert!(stale.body.contains("not valid"), "{}", stale.body);
    // A new link works on the new server.
    let fresh = req(api, "GET", &link(api, &admin), &[], "");
    assert_eq!(fresh.code, 200);
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let _ = server.wait();
}
