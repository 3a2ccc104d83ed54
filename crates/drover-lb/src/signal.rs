//! A one-shot broadcast signal ("stop accepting", "abort connections") that a busy task can
//! wait on without taking a lock each time it is polled.
//!
//! `CancellationToken::cancelled()` and a bare `Notify::notified()` lock a mutex shared by
//! all waiters on *every* poll, and a proxied connection is polled on every read. Here the
//! waiter registers its task's waker once (one lock, on a shard of [`Signal::SHARDS`]
//! notifiers) and afterwards only loads an atomic flag.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::task::{Context, Poll, Waker};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) struct Signal {
    fired: AtomicBool,
    shards: [Notify; Signal::SHARDS],
}

impl Signal {
    /// Waiters are spread over this many notifiers, so that registering one contends
    /// little with registering another.
    pub(crate) const SHARDS: usize = 16;

    pub(crate) fn new() -> Self {
        Signal {
            fired: AtomicBool::new(false),
            shards: std::array::from_fn(|_| Notify::new()),
        }
    }

    /// Fires the signal: every waiter, present or future, completes.
    pub(crate) fn fire(&self) {
        self.fired.store(true, SeqCst);
        for n in &self.shards {
            n.notify_waiters();
        }
    }

    pub(crate) fn is_fired(&self) -> bool {
        self.fired.load(SeqCst)
    }

    /// The notification to wait on; create it *before* the first [`Armed::poll`] check,
    /// and keep it pinned for as long as the waiter lives.
    pub(crate) fn notified(&self, shard: usize) -> Notified<'_> {
        self.shards[shard % Self::SHARDS].notified()
    }
}

/// The waiting side, for a task that polls the signal beside its real work.
#[derive(Debug, Default)]
pub(crate) struct Armed {
    /// The waker registered with the notifier, once armed.
    waker: Option<Waker>,
}

impl Armed {
    /// Ready once `signal` has fired. Polls `notified` (taking its notifier's lock) only
    /// to register this task's waker, i.e. at the first poll or if the waker changed.
    pub(crate) fn poll(
        &mut self,
        signal: &Signal,
        notified: Pin<&mut Notified<'_>>,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        if signal.is_fired() {
            return Poll::Ready(());
        }
        if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        if notified.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::sync::Arc;
    use std::time::Duration;

    async fn wait(signal: &Signal, shard: usize) {
        let notified = signal.notified(shard);
        tokio::pin!(notified);
        let mut armed = Armed::default();
        poll_fn(|cx| armed.poll(signal, notified.as_mut(), cx)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_waiter_completes_when_fired() {
        let signal = Arc::new(Signal::new());
        let waiters: Vec<_> = (0..40)
            .map(|i| {
                let s = signal.clone();
                tokio::spawn(async move { wait(&s, i).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        signal.fire();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(2), w)
                .await
                .expect("woken")
                .expect("task");
        }
        // A waiter created after the fact completes at once.
        tokio::time::timeout(Duration::from_secs(2), wait(&signal, 3))
            .await
            .expect("already fired");
    }

    #[tokio::test]
    async fn fired_between_creation_and_first_poll_is_seen() {
        let signal = Signal::new();
        let notified = signal.notified(0);
        tokio::pin!(notified);
        signal.fire();
        let mut armed = Armed::default();
        poll_fn(|cx| armed.poll(&signal, notified.as_mut(), cx)).await;
    }
}
