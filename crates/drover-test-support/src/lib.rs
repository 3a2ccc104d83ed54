//! What drover's tests share (and the load tool, drover-fleetsim): waiting for a condition,
//! with a deadline and a failure that says what was awaited; a small fake HTTP server
//! ([`fake_http`]); fleet files for unit tests ([`fleets`]); a simulated agent's requests of
//! the agent API (`agent`, feature `agent`).

#[cfg(feature = "agent")]
pub mod agent;
pub mod fake_http;
pub mod fleets;

use std::fmt::Display;
use std::time::{Duration, Instant};

/// How often a condition is checked.
const EVERY: Duration = Duration::from_millis(20);

/// What a wait ends on: `true`, or `Some(value)` (the value is returned).
pub trait Done {
    type Out;
    fn done(self) -> Option<Self::Out>;
}

impl Done for bool {
    type Out = ();
    fn done(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Done for Option<T> {
    type Out = T;
    fn done(self) -> Option<T> {
        self
    }
}

/// Checks `f` until it is done; panics with `what` once `within` has passed.
pub fn wait_until<D: Done>(within: Duration, what: impl Display, f: impl FnMut() -> D) -> D::Out {
    wait_until_or(within, what, f, String::new)
}

/// [`wait_until`], whose panic also prints `diag()` (the state that did not come about).
pub fn wait_until_or<D: Done>(
    within: Duration,
    what: impl Display,
    mut f: impl FnMut() -> D,
    diag: impl FnOnce() -> String,
) -> D::Out {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().done() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out ({within:?}) waiting for {what}\n{}", diag());
        }
        std::thread::sleep(EVERY);
    }
}

/// [`wait_until`] on a tokio runtime: sleeps without blocking it.
pub async fn wait_until_async<D: Done>(
    within: Duration,
    what: impl Display,
    mut f: impl FnMut() -> D,
) -> D::Out {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().done() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out ({within:?}) waiting for {what}"
        );
        tokio::time::sleep(EVERY.min(Duration::from_millis(5))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_done_and_panics_with_what_at_the_deadline() {
        let mut n = 0;
        let got = wait_until(Duration::from_secs(5), "three tries", || {
            n += 1;
            (n == 3).then_some(n)
        });
        assert_eq!(got, 3);
        wait_until(Duration::from_secs(5), "true", || true);
        let err = std::panic::catch_unwind(|| {
            wait_until_or(
                Duration::from_millis(50),
                "never",
                || false,
                || "state".into(),
            )
        })
        .unwrap_err();
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(
            msg.contains("waiting for never") && msg.contains("state"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn the_async_wait_yields_to_the_runtime() {
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f2 = flag.clone();
        let t = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            f2.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        wait_until_async(Duration::from_secs(5), "the flag", || {
            flag.load(std::sync::atomic::Ordering::SeqCst)
        })
        .await;
        t.await.unwrap();
    }
}
