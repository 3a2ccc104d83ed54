//! A small HTTP/1.1 server on loopback for tests that play a server's side of a few requests:
//! an answer per request from a function, every request recorded, and answers held back
//! until the client goes away (a long-poll that never answers), counted while held. Request
//! bodies need a `content-length`. Its tasks end when it is dropped (aborted), or when
//! [`FakeHttp::stop`] has ended them and waited for them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// A request as the server read it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Without the query.
    pub path: String,
    /// After the `?` (empty without one).
    pub query: String,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How the server answers a request.
#[derive(Clone, Debug)]
pub enum Answer {
    /// This status and JSON body (the connection stays open for the next request).
    Json(u16, String),
    /// This status, these headers (besides `content-length`) and this body, e.g. a text
    /// answer with a header a client reads (the connection stays open).
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// No answer at all: the request stays open until the client closes the connection.
    Hold,
}

type Handler = dyn Fn(&Request) -> Answer + Send + Sync;

struct State {
    handler: Box<Handler>,
    requests: Mutex<Vec<Request>>,
    held: AtomicUsize,
}

/// The server; see the module's doc.
pub struct FakeHttp {
    addr: SocketAddr,
    state: Arc<State>,
    /// Ends the accept task, which ends the connections' tasks and waits for them.
    stop: Option<oneshot::Sender<()>>,
    accept: Option<JoinHandle<()>>,
}

impl FakeHttp {
    /// Listens on 127.0.0.1 (a free port) and answers each request with `handler`.
    pub async fn start(handler: impl Fn(&Request) -> Answer + Send + Sync + 'static) -> FakeHttp {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(State {
            handler: Box::new(handler),
            requests: Mutex::new(Vec::new()),
            held: AtomicUsize::new(0),
        });
        let (stop, stopped) = oneshot::channel();
        let accept = tokio::spawn(accept(listener, state.clone(), stopped));
        FakeHttp {
            addr,
            state,
            stop: Some(stop),
            accept: Some(accept),
        }
    }

    /// Stops listening, ends every connection (held ones too) and waits until their tasks
    /// are gone. A panic in them is raised here.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(accept) = self.accept.take() {
            if let Err(e) = accept.await {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request so far, in the order they were answered (held ones when they came).
    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Requests so far with this method and path.
    pub fn count(&self, method: &str, path: &str) -> usize {
        let requests = self.state.requests.lock().unwrap();
        requests
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }

    /// Requests held now ([`Answer::Hold`]) whose client has not gone away.
    pub fn held(&self) -> usize {
        self.state.held.load(Ordering::SeqCst)
    }
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        // The accept task owns the connections' tasks: they are aborted with it.
        if let Some(accept) = &self.accept {
            accept.abort();
        }
    }
}

async fn accept(listener: TcpListener, state: Arc<State>, mut stop: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => {
                if let Ok((sock, _)) = r {
                    conns.spawn(serve(sock, state.clone()));
                }
            }
            Some(done) = conns.join_next() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                }
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// Counts a held request until its task ends (the client went away, or the server dropped).
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(mut sock: TcpStream, state: Arc<State>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or_default().split_whitespace();
        let method = first.next().unwrap_or_default().to_string();
        let target = first.next().unwrap_or_default();
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let req = Request {
            method,
            path: path.to_string(),
            query: query.to_string(),
            headers,
            body: buf[head_end..head_end + len].to_vec(),
        };
        buf.drain(..head_end + len);
        let answer = (state.handler)(&req);
        state.requests.lock().unwrap().push(req);
        let answer = match answer {
            Answer::Json(status, body) => {
                let json = ("content-type".to_string(), "application/json".to_string());
                Some((status, vec![json], body))
            }
            Answer::Full {
                status,
                headers,
                body,
            } => Some((status, headers, body)),
            Answer::Hold => None,
        };
        match answer {
            Some((status, headers, body)) => {
                let mut head = format!(
                    "HTTP/1.1 {status} {}\r\n",
                    if status < 400 { "OK" } else { "Error" }
                );
                for (name, value) in headers {
                    head.push_str(&format!("{name}: {value}\r\n"));
                }
                head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
                if sock.write_all(head.as_bytes()).await.is_err()
                    || sock.write_all(body.as_bytes()).await.is_err()
                {
                    return;
                }
            }
            None => {
                state.held.fetch_add(1, Ordering::SeqCst);
                let _held = Held(&state.held);
                // Until the client closes its end (it sends nothing more on this connection).
                while let Ok(n) = sock.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wait_until_async;
    use std::time::Duration;

    #[tokio::test]
    async fn answers_on_one_connection_and_counts_a_held_request_until_the_client_goes() {
        let server = FakeHttp::start(|r| match r.path.as_str() {
            "/hold" => Answer::Hold,
            _ => Answer::Json(200, format!("{{\"len\":{}}}", r.body.len())),
        })
        .await;
        let mut c = TcpStream::connect(server.addr()).await.unwrap();
        c.write_all(b"POST /a?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
            .await
            .unwrap();
        c.write_all(b"GET /hold HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"{\"len\":5}") {
            let mut b = [0u8; 256];
            let n = c.read(&mut b).await.unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&b[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
        wait_until_async(Duration::from_secs(5), "the held request", || {
            server.held() == 1
        })
        .await;
        let r = &server.requests()[0];
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.query.as_str()),
            ("POST", "/a", "x=1")
        );
        assert_eq!(
            (r.body.as_slice(), r.header("HOST")),
            (&b"hello"[..], Some("h"))
        );
        assert_eq!(
            (server.count("GET", "/hold"), server.count("GET", "/a")),
            (1, 0)
        );
        drop(c);
        wait_until_async(Duration::from_secs(5), "the client gone", || {
            server.held() == 0
        })
        .await;
    }

    #[tokio::test]
    async fn a_full_answer_has_its_headers_and_stop_ends_every_connection_and_waits() {
        let server = FakeHttp::start(|r| match r.path.as_str() {
            "/hold" => Answer::Hold,
            _ => Answer::Full {
                status: 401,
                headers: vec![("x-ttl".into(), "0".into())],
                body: "no".into(),
            },
        })
        .await;
        let addr = server.addr();
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /t HTTP/1.1\r\nHost: h\r\n\r\nGET /hold HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\nno") {
            let mut b = [0u8; 256];
            let n = c.read(&mut b).await.unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&b[..n]);
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            "HTTP/1.1 401 Error\r\nx-ttl: 0\r\ncontent-length: 2\r\n\r\nno"
        );
        wait_until_async(Duration::from_secs(5), "the held request", || {
            server.held() == 1
        })
        .await;
        let state = server.state.clone();
        server.stop().await;
        assert_eq!(
            state.held.load(Ordering::SeqCst),
            0,
            "the held request's task is gone once stop returns"
        );
        let mut b = [0u8; 16];
        let closed = c.read(&mut b).await;
        assert!(
            matches!(closed, Ok(0) | Err(_)),
            "the connection is closed: {closed:?}"
        );
        assert!(TcpStream::connect(addr).await.is_err(), "nothing listens");
    }
}
