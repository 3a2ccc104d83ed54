//! End to end: `drover demo-server` drains the way a server behind drover should. Real
//! process, real sockets, real signals.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Demo {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Demo {
    fn start() -> Demo {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(BIN)
            .args([
                "demo-server",
                "--listen",
                &addr.to_string(),
                "--lame-duck",
                "5s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start demo-server");
        let t0 = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "demo-server never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Demo { child, addr }
    }

    fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on the child this test started.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Sends one keep-alive request and reads its answer's head and body (`Content-Length`).
fn ask(s: &mut TcpStream) -> std::io::Result<String> {
    write!(s, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::Error::other(format!(
                "closed after {:?}",
                String::from_utf8_lossy(&buf)
            )));
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(head)
}

/// Whether the peer closed the connection within `within` (EOF or reset, not a timeout).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 1];
    match s.read(&mut byte) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn a_drain_closes_idle_kept_alive_connections_and_answers_those_not_yet_asked() {
    let demo = Demo::start();
    // Answered once and idle: closed by the drain (its client may retry elsewhere).
    let mut kept = connect(demo.addr);
    let head = ask(&mut kept).unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    // Accepted but not yet asked (as a request the balancer sent just before taking the
    // instance out may be): its request must still be answered.
    let mut fresh = connect(demo.addr);
    // One that never asks: closed after a short grace, so it cannot hold the drain.
    let mut silent = connect(demo.addr);
    std::thread::sleep(Duration::from_millis(200));

    demo.signal(libc::SIGUSR1);
    assert!(
        closed_within(&mut kept, Duration::from_secs(3)),
        "the idle kept-alive connection is closed at the drain"
    );
    std::thread::sleep(Duration::from_millis(100));
    let head = ask(&mut fresh).expect("the connection not yet asked is answered");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("connection: close"),
        "answers now close: {head}"
    );
    assert!(
        closed_within(&mut silent, Duration::from_secs(3)),
        "a connection that never asks is closed soon after the drain began"
    );
    // New connections are still served during the drain, closing after their answer.
    let mut new = connect(demo.addr);
    let head = ask(&mut new).unwrap();
    assert!(head.contains("connection: close"), "{head}");

    // SIGTERM: a lame duck (5s here) that still serves, then it stops.
    demo.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let mut late = connect(demo.addr);
    let head = ask(&mut late).unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
}
