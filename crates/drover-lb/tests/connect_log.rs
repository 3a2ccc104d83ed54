//! A target that is down cannot flood the balancer's log: its failed connects are logged
//! once, then at most once per 10 s with how many were held back.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use drover_lb::{ListenerConfig, Target};
use tokio::net::TcpStream;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn failed_connects_are_logged_once_then_counted() {
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    // The test's runtime is single-threaded: the listener's tasks log here too.
    let _guard = tracing::subscriber::set_default(subscriber);

    let t1 = Target::new("d1", dead_addr().await);
    let t2 = Target::new("d2", dead_addr().await);
    let (lb, _tx) = start(ListenerConfig::default(), vec![t1, t2]).await;
    for _ in 0..25 {
        let mut conn = TcpStream::connect(lb.local_addr()).await.expect("connect");
        expect_closed(&mut conn).await;
    }
    let failures = lb.stats().connect_failures;
    lb.shutdown().await;
    assert!(
        failures >= 25,
        "every client saw failed connects: {failures}"
    );
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let lines = text
        .lines()
        .filter(|l| l.contains("connect to target"))
        .count();
    assert_eq!(lines, 1, "{failures} failed connects, logged once: {text}");
    assert!(text.contains("held_back=0"), "{text}");
}
