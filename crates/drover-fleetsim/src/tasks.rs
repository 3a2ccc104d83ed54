//! The load tool's tasks and threads, every one owned: tasks run in a tracker until their
//! work ends or the set is shut down (cancelled, then awaited); threads are joined. Shutdown
//! is bounded: what has not ended by then is reported, not waited for.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a shutdown waits for the cancelled tasks and the threads to end.
pub const SHUTDOWN_WITHIN: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
    threads: Mutex<Vec<(&'static str, std::thread::JoinHandle<()>)>>,
}

/// What a shutdown left running (nothing, unless a task or thread ignored it past
/// [`SHUTDOWN_WITHIN`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Left {
    pub tasks: usize,
    pub threads: Vec<&'static str>,
}

impl Left {
    pub fn is_empty(&self) -> bool {
        self.tasks == 0 && self.threads.is_empty()
    }
}

impl Tasks {
    /// Runs `f` until it ends or the set shuts down.
    pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.spawn_until(self.stop.clone(), f)
    }

    /// Runs `f` until it ends or `stop` is cancelled, which a shutdown does when `stop` is
    /// [`Tasks::child`]'s. Each agent has its own: a token's waiters share one lock, taken at
    /// every wake-up of every task waiting on it.
    pub fn spawn_until(
        &self,
        stop: CancellationToken,
        f: impl Future<Output = ()> + Send + 'static,
    ) {
        self.tracker.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = f => {}
            }
        });
    }

    /// A token cancelled by the shutdown (or before, by whoever holds it).
    pub fn child(&self) -> CancellationToken {
        self.stop.child_token()
    }

    /// Runs `f` on a thread of its own; it is handed the set's token and must return once it
    /// is cancelled ([`sleep`] wakes up at once then).
    pub fn thread(
        &self,
        name: &'static str,
        f: impl FnOnce(CancellationToken) + Send + 'static,
    ) -> std::io::Result<()> {
        let stop = self.stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("fleetsim-{name}"))
            .spawn(move || f(stop))?;
        self.threads.lock().unwrap().push((name, handle));
        Ok(())
    }

    /// Tasks running now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Threads not ended yet.
    #[cfg(test)]
    pub fn threads_running(&self) -> usize {
        let threads = self.threads.lock().unwrap();
        threads.iter().filter(|(_, h)| !h.is_finished()).count()
    }

    /// Cancels every task and thread and waits (at most [`SHUTDOWN_WITHIN`]) for them to end;
    /// a task spawned after it ends at once.
    pub async fn shutdown(&self) -> Left {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_WITHIN;
        self.stop.cancel();
        self.tracker.close();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap());
        for (_, h) in &threads {
            h.thread().unpark();
        }
        let _ = tokio::time::timeout_at(deadline, self.tracker.wait()).await;
        let mut left = Left {
            tasks: self.tracker.len(),
            threads: Vec::new(),
        };
        for (name, h) in threads {
            while !h.is_finished() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                left.threads.push(name);
            }
        }
        left
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A thread's sleep: `d`, or less if `stop` is cancelled (true then). The shutdown unparks
/// the set's threads after it cancels.
pub fn sleep(stop: &CancellationToken, d: Duration) -> bool {
    let until = std::time::Instant::now() + d;
    loop {
        if stop.is_cancelled() {
            return true;
        }
        let now = std::time::Instant::now();
        if now >= until {
            return false;
        }
        std::thread::park_timeout(until - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_cancels_tasks_and_wakes_and_joins_threads() {
        let tasks = Tasks::default();
        let agent = tasks.child();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        for _ in 0..3 {
            let tx = tx.clone();
            tasks.spawn(async move {
                let _held = tx;
                std::future::pending::<()>().await;
            });
        }
        let held = tx.clone();
        tasks.spawn_until(agent.clone(), async move {
            let _held = held;
            std::future::pending::<()>().await;
        });
        tasks.spawn(async {});
        drop(tx);
        let woke = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = woke.clone();
        tasks
            .thread("sleeper", move |stop| {
                // An hour's sleep, cut short by the shutdown.
                w.store(
                    sleep(&stop, Duration::from_secs(3600)),
                    std::sync::atomic::Ordering::SeqCst,
                );
            })
            .unwrap();
        tokio::task::yield_now().await;
        assert_eq!(tasks.len(), 4, "the finished one is no longer tracked");
        assert_eq!(tasks.threads_running(), 1);
        let t = std::time::Instant::now();
        assert_eq!(tasks.shutdown().await, Left::default());
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(agent.is_cancelled());
        assert!(woke.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!((tasks.len(), tasks.threads_running()), (0, 0));
        // Every sender was dropped with its task: the channel is closed.
        assert!(rx.recv().await.is_none());
        // Closed: a task spawned now is cancelled at once.
        tasks.spawn(std::future::pending());
        tokio::task::yield_now().await;
        assert_eq!(tasks.len(), 0);
    }
}
