//! End to end: the API over TLS with the CA the server makes. Agents pin that CA (its
//! fingerprint is in their launch configuration) and report; the CLI verifies the server by
//! default and refuses a server whose certificate another CA signed.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use drover_model::api::FleetStatus;

fn cli(dir: &Path, envs: &[(&str, String)], args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(dir)
        .env_remove("DROVER_TOKEN")
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_CA");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn agents_pin_the_ca_and_the_cli_refuses_a_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let file = dir.path().join("drover.toml");
    std::fs::write(&file, fleet_text(ing, subnet(), 2)).unwrap();
    let data = dir.path().join("data");
    let child = Command::new(BIN)
        .arg("up")
        .arg(&file)
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{api}"), "--tls"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("up.out")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("up.err")).unwrap())
        .spawn()
        .unwrap();
    // Owns the process: killed (with its instances) when the test ends.
    let _up = Up {
        child,
        dir: dir.path().to_path_buf(),
        api: format!("127.0.0.1:{api}").parse().unwrap(),
        ingress: format!("127.0.0.1:{ing}").parse().unwrap(),
        file,
    };
    let url = format!("https://127.0.0.1:{api}");
    // With only the data directory, the CLI finds the URL (https), the token and the CA.
    let local = [("DROVER_DATA_DIR", data.display().to_string())];
    let t0 = Instant::now();
    loop {
        let (code, out, err) = cli(dir.path(), &local, &["status", "--json"]);
        if code == 0 {
            let s: FleetStatus = serde_json::from_str(&out).unwrap();
            let healthy = s.groups.iter().map(|g| g.healthy).sum::<u32>();
            if healthy == 2 {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "agents did not report over TLS: {out}{err}\n{}",
            std::fs::read_to_string(dir.path().join("up.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        std::fs::read_to_string(data.join("server.url")).unwrap(),
        url
    );

    // Agents were launched with the CA's fingerprint: the pin.
    let ca_pem = std::fs::read(data.join("ca.pem")).unwrap();
    let ca = drover_server::tls::certs(&ca_pem, "ca").unwrap();
    let pin = drover_server::tls::fingerprint(&ca[0]);
    let mut pinned = 0;
    for e in std::fs::read_dir(data.with_file_name("data.instances"))
        .unwrap()
        .flatten()
    {
        let Ok(pid) = std::fs::read_to_string(e.path().join("agent.pid")) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&format!("--server-ca-sha256 {pin}")) {
            pinned += 1;
        }
        assert!(cmdline.contains(&url), "{cmdline}");
        assert!(
            !cmdline.contains("drover_agent_"),
            "no token on a command line"
        );
    }
    assert_eq!(pinned, 2);

    let token = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let remote = |extra: &[(&str, String)], args: &[&str]| {
        let mut envs = vec![
            ("DROVER_SERVER", url.clone()),
            ("DROVER_TOKEN", token.clone()),
            // Not the server's data directory: no CA found there.
            (
                "DROVER_DATA_DIR",
                dir.path().join("elsewhere").display().to_string(),
            ),
        ];
        envs.extend(extra.iter().cloned());
        cli(dir.path(), &envs, args)
    };
    // No CA given: the usual roots do not know this server.
    let (code, _, err) = remote(&[], &["status"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot verify the TLS certificate"), "{err}");
    // The right CA.
    let (code, _, err) = remote(
        &[("DROVER_CA", data.join("ca.pem").display().to_string())],
        &["status"],
    );
    assert_eq!(code, 0, "{err}");
    // Another CA (made the same way, in another directory): refused.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let other_store = drover_store::SqliteStore::open_in_memory().unwrap();
    drover_server::tls::generate(&other_store, &other, "127.0.0.1:0".parse().unwrap(), &[])
        .unwrap();
    let (code, _, err) = remote(
        &[],
        &["status", "--ca", other.join("ca.pem").to_str().unwrap()],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("UnknownIssuer") || err.contains("certificate"),
        "{err}"
    );
    // --insecure: works, with a warning.
    let (code, _, err) = remote(&[], &["status", "--insecure"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: --insecure"), "{err}");
    // Plain HTTP to the TLS port gets no answer.
    let plain = http(
        format!("127.0.0.1:{api}").parse().unwrap(),
        "GET",
        "/v1/health",
        None,
    );
    assert!(plain.is_err() || plain.unwrap().0 != 200);

    // An agent given a CA that does not match its pin refuses to start.
    let plan = std::fs::read_dir(data.with_file_name("data.instances"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("plan.json"))
        .find(|p| p.exists())
        .unwrap();
    let (code, _, err) = cli(
        dir.path(),
        &[],
        &[
            "agent",
            "--instance",
            "i-999999",
            "--group",
            "web/local",
            "--addr",
            "127.0.0.1",
            "--server",
            &url,
            "--plan-file",
            plan.to_str().unwrap(),
            "--dir",
            dir.path().join("rogue").to_str().unwrap(),
            "--server-ca",
            other.join("ca.pem").to_str().unwrap(),
            "--server-ca-sha256",
            &pin,
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not the pinned"), "{err}");
}
