//! Helpers shared by the end-to-end tests: backends, clients and waiting.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use drover_lb::{Listener, ListenerConfig, Target};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

pub const WAIT: Duration = Duration::from_secs(3);

/// A backend that greets each connection with `name\n`, then echoes until EOF and closes.
pub struct Backend {
    pub target: Target,
    pub task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Stops accepting: once this returns the port refuses connections. Connections it
    /// already accepted go on. Returns the address, to start a backend there again.
    pub async fn kill(mut self) -> SocketAddr {
        self.task.abort();
        let _ = (&mut self.task).await;
        self.target.addr
    }
}

pub async fn backend(name: &str) -> Backend {
    backend_at(name, "127.0.0.1:0".parse().expect("addr")).await
}

pub async fn backend_at(name: &str, addr: SocketAddr) -> Backend {
    let socket = TcpListener::bind(addr).await.expect("bind backend");
    let addr = socket.local_addr().expect("backend addr");
    let greeting = format!("{name}\n");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = socket.accept().await else {
                return;
            };
            let greeting = greeting.clone();
            tokio::spawn(async move {
                if conn.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Backend {
        target: Target::new(name, addr),
        task,
    }
}

/// An address nothing listens on: connecting to it is refused.
pub async fn dead_addr() -> SocketAddr {
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    socket.local_addr().expect("addr")
}

pub type Conn = BufReader<TcpStream>;

/// Connects through the listener and returns the stream and the backend's name.
pub async fn open(lb: SocketAddr) -> (Conn, String) {
    let stream = TcpStream::connect(lb).await.expect("connect to listener");
    let mut conn = BufReader::new(stream);
    let mut line = String::new();
    timeout(WAIT, conn.read_line(&mut line))
        .await
        .expect("greeting in time")
        .expect("read greeting");
    assert!(line.ends_with('\n'), "no greeting, got {line:?}");
    line.pop();
    (conn, line)
}

/// Sends `msg` and expects it echoed back.
pub async fn echo(conn: &mut Conn, msg: &[u8]) {
    conn.get_mut().write_all(msg).await.expect("write");
    let mut got = vec![0; msg.len()];
    timeout(WAIT, conn.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("read echo");
    assert_eq!(got, msg);
}

/// Expects the peer to close `stream` soon (EOF or reset); returns how long it took.
pub async fn expect_closed<S: AsyncReadExt + Unpin>(stream: &mut S) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 64];
    match timeout(WAIT, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => start.elapsed(),
        Ok(Ok(n)) => panic!("expected close, got {n} bytes: {:?}", &buf[..n]),
        Err(_) => panic!("connection not closed within {WAIT:?}"),
    }
}

pub async fn start(
    cfg: ListenerConfig,
    targets: Vec<Target>,
) -> (Listener, watch::Sender<Vec<Target>>) {
    let (tx, rx) = watch::channel(targets);
    let lb = Listener::bind(cfg, rx).await.expect("bind listener");
    (lb, tx)
}

pub fn targets(backends: &[&Backend]) -> Vec<Target> {
    backends.iter().map(|b| b.target.clone()).collect()
}

/// A listener whose accept queue is full: further SYNs are dropped, so connects hang.
pub async fn black_hole() -> (SocketAddr, Vec<TcpStream>) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    let listener = socket.listen(1).expect("listen");
    std::mem::forget(listener); // keep it listening, never accepting
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match timeout(Duration::from_millis(100), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => panic!("unexpected connect error {e}"),
            Err(_) => return (addr, fillers),
        }
    }
    panic!("accept queue never filled");
}

/// An HTTP/1.x backend: `GET /healthz` is answered with `status` (changeable) and counted
/// in `checks`; any other request with 200 and the backend's name as the body. Each
/// connection carries one request.
pub struct HttpBackend {
    pub target: Target,
    pub status: Arc<AtomicU16>,
    pub checks: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn http_backend(name: &str, status: u16) -> HttpBackend {
    let socket = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = socket.local_addr().expect("backend addr");
    let status = Arc::new(AtomicU16::new(status));
    let checks = Arc::new(AtomicUsize::new(0));
    let (st, ch, body) = (status.clone(), checks.clone(), name.to_string());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = socket.accept().await else {
                return;
            };
            let (st, ch, body) = (st.clone(), ch.clone(), body.clone());
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let (code, body) = if req.starts_with(b"GET /healthz ") {
                    ch.fetch_add(1, SeqCst);
                    (st.load(SeqCst), String::new())
                } else {
                    (200, body)
                };
                let answer = format!(
                    "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    HttpBackend {
        target: Target::new(name, addr),
        status,
        checks,
        task,
    }
}

/// One `GET /` through `lb`; returns the body (the name of the backend that answered).
pub async fn http_get(lb: SocketAddr) -> String {
    let mut conn = TcpStream::connect(lb).await.expect("connect to listener");
    conn.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .await
        .expect("write request");
    let mut answer = String::new();
    timeout(WAIT, conn.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .expect("read answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("complete answer");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    body.to_string()
}
