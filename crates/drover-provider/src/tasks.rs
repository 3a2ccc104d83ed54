//! A provider's background tasks (an exit watcher per instance, a kill after a stop grace, a
//! deregistration): tracked, never detached. `close` cancels what still runs and waits for
//! it; dropping the set cancels it too.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long `close` waits for cancelled tasks to end.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub(crate) struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    /// Runs `f` until it ends or the set is closed.
    pub(crate) fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = f => {}
            }
        });
    }

    /// Cancels every task and waits for them to end.
    pub(crate) async fn close(&self) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(CLOSE_WITHIN, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tracker.len(),
                "provider tasks did not end in time"
            );
        }
    }

    /// Tasks running now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.tracker.len()
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_cancels_and_awaits_every_task() {
        let tasks = Tasks::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        for _ in 0..3 {
            let tx = tx.clone();
            tasks.spawn(async move {
                let _held = tx;
                std::future::pending::<()>().await;
            });
        }
        tasks.spawn(async {});
        drop(tx);
        tokio::task::yield_now().await;
        assert_eq!(tasks.len(), 3, "the finished one is no longer tracked");
        tasks.close().await;
        assert_eq!(tasks.len(), 0);
        // Every sender was dropped with its task: the channel is closed.
        assert!(rx.recv().await.is_none());
    }
}
