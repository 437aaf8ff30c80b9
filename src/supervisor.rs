//! Every long-lived worker (inbox, submit, poll, download, results,
//! archive, listener, ...) is started, watched and restarted here, the same
//! way: a panic or an unexpected exit is logged, counted in `/metrics`
//! (`infinitetalk_worker_restarts`) and the worker restarted with backoff.
//! A worker that keeps failing makes the daemon exit non-zero, so that
//! systemd restarts the whole process.
//!
//! Each worker takes its work up from the store when it starts (channels
//! carry only wake-ups), so a restart loses nothing.
//!
//! Liveness: a worker that can wedge stamps its [`Beat`] at least every
//! second while it goes round or waits for work; the systemd watchdog is fed
//! only while every such stamp is fresh ([`Health::stalled`]).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

/// Failures of one worker within [`FAILURE_WINDOW`] that end the daemon.
const MAX_FAILURES: usize = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(300);

/// When each worker last showed it goes round.
#[derive(Debug)]
pub(crate) struct Health {
    born: Instant,
    workers: Mutex<Vec<(&'static str, Arc<AtomicU64>)>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            born: Instant::now(),
            workers: Mutex::new(Vec::new()),
        }
    }
}

impl Health {
    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn register(self: &Arc<Self>, name: &'static str) -> Beat {
        let stamp = Arc::new(AtomicU64::new(self.now_ms()));
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, stamp.clone()));
        Beat {
            health: self.clone(),
            stamp: Some(stamp),
        }
    }

    /// The worker whose stamp is oldest, if older than `fresh`.
    pub(crate) fn stalled(&self, fresh: Duration) -> Option<(&'static str, Duration)> {
        let now = self.now_ms();
        let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers
            .iter()
            .map(|(name, stamp)| {
                let age = now.saturating_sub(stamp.load(Ordering::Relaxed));
                (*name, Duration::from_millis(age))
            })
            .filter(|(_, age)| *age > fresh)
            .max_by_key(|(_, age)| *age)
    }
}

/// A worker's liveness stamp.
#[derive(Debug, Clone)]
pub struct Beat {
    health: Arc<Health>,
    /// `None` for a worker that is not watched (it cannot wedge the engine).
    stamp: Option<Arc<AtomicU64>>,
}

impl Beat {
    /// A beat nobody watches (for workers run outside a supervisor).
    pub fn unwatched() -> Beat {
        Beat {
            health: Arc::default(),
            stamp: None,
        }
    }

    /// The worker is going round.
    pub fn tick(&self) {
        if let Some(stamp) = &self.stamp {
            stamp.store(self.health.now_ms(), Ordering::Relaxed);
        }
    }

    /// Waits for `fut` (work to arrive) while stamping every second; `None`
    /// when `stop` fires first. Only for waits on work: a wait on the disk
    /// or the database is left unstamped, so that a hang there shows.
    pub async fn wait<F: Future>(&self, stop: &CancellationToken, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        loop {
            self.tick();
            tokio::select! {
                out = &mut fut => return Some(out),
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// Why the supervisor gave up on the daemon.
#[derive(Debug, Clone, thiserror::Error)]
#[error("worker {worker} failed {failures} times within {window:?}; last: {last}")]
pub struct GaveUp {
    pub worker: &'static str,
    pub failures: usize,
    pub window: Duration,
    pub last: String,
}

/// Owns the workers: starts them, restarts them, stops them.
pub(crate) struct Supervisor {
    tracker: TaskTracker,
    stop: CancellationToken,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    gave_up: Arc<Mutex<Option<GaveUp>>>,
    /// Fires when a worker cannot come back.
    fatal: CancellationToken,
}

impl Supervisor {
    /// Workers stop when `stop` fires (they watch it themselves).
    pub(crate) fn new(stop: CancellationToken, metrics: Arc<Metrics>) -> Supervisor {
        Supervisor {
            tracker: TaskTracker::new(),
            stop,
            health: Arc::default(),
            metrics,
            gave_up: Arc::default(),
            fatal: CancellationToken::new(),
        }
    }

    pub(crate) fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Fires when a worker failed too often to go on.
    pub(crate) fn fatal(&self) -> CancellationToken {
        self.fatal.clone()
    }

    /// Why, once [`Supervisor::fatal`] fired.
    pub(crate) fn gave_up(&self) -> Option<GaveUp> {
        self.gave_up
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs a watched worker: `make` builds one run of it from its beat. A run
    /// ends normally only once `stop` fired; anything else is a failure.
    pub(crate) fn spawn<F, Fut>(&self, name: &'static str, make: F)
    where
        F: FnMut(Beat) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let beat = self.health.register(name);
        self.run(name, beat, make);
    }

    /// Runs a worker whose liveness is not watched (one that only waits on
    /// the network or the filesystem, like the listener).
    pub(crate) fn spawn_unwatched<F, Fut>(&self, name: &'static str, make: F)
    where
        F: FnMut(Beat) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let beat = Beat {
            health: self.health.clone(),
            stamp: None,
        };
        self.run(name, beat, make);
    }

    fn run<F, Fut>(&self, name: &'static str, beat: Beat, mut make: F)
    where
        F: FnMut(Beat) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        let metrics = self.metrics.clone();
        let gave_up = self.gave_up.clone();
        let fatal = self.fatal.clone();
        self.tracker.spawn(async move {
            let mut failures: Vec<Instant> = Vec::new();
            loop {
                beat.tick();
                let ended = tokio::spawn(make(beat.clone())).await;
                if stop.is_cancelled() {
                    break;
                }
                let why = match ended {
                    Ok(()) => "exited unexpectedly".to_owned(),
                    Err(e) if e.is_panic() => format!("panicked: {}", panic_text(e.into_panic())),
                    Err(e) => format!("was cancelled: {e}"),
                };
                metrics.worker_restarted(name);
                let now = Instant::now();
                failures.retain(|t| now.duration_since(*t) < FAILURE_WINDOW);
                failures.push(now);
                if failures.len() >= MAX_FAILURES {
                    let gave = GaveUp {
                        worker: name,
                        failures: failures.len(),
                        window: FAILURE_WINDOW,
                        last: why,
                    };
                    tracing::error!(worker = name, error = %gave, "worker cannot come back; stopping the daemon");
                    *gave_up.lock().unwrap_or_else(|p| p.into_inner()) = Some(gave);
                    fatal.cancel();
                    break;
                }
                let wait = crate::dispatch::backoff(
                    failures.len() as u32,
                    Duration::from_millis(200),
                    Duration::from_secs(30),
                );
                tracing::error!(worker = name, why, restart_in = ?wait, "worker failed; restarting it");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => break,
                }
            }
        });
    }

    /// Waits for every worker to end (after `stop` fired).
    pub(crate) async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_worker_is_restarted_then_given_up_on() {
        let stop = CancellationToken::new();
        let metrics = Arc::new(Metrics::default());
        let sup = Supervisor::new(stop.clone(), metrics.clone());
        let runs = Arc::new(AtomicU64::new(0));
        let (r, s) = (runs.clone(), stop.clone());
        sup.spawn("flaky", move |_beat| {
            let (r, s) = (r.clone(), s.clone());
            async move {
                if r.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
                s.cancelled().await;
            }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3, "restarted twice, then runs");
        assert_eq!(metrics.worker_restarts_of("flaky"), 2);
        assert!(!sup.fatal().is_cancelled());

        let always = Supervisor::new(stop.clone(), metrics.clone());
        always.spawn("broken", |_beat| async { panic!("always") });
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert!(always.fatal().is_cancelled());
        let gave = always.gave_up().expect("gave up");
        assert_eq!(gave.worker, "broken");
        assert!(gave.last.contains("always"), "{gave}");
        stop.cancel();
        sup.wait().await;
        always.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_stops_beating_shows_as_stalled() {
        let stop = CancellationToken::new();
        let sup = Supervisor::new(stop.clone(), Arc::new(Metrics::default()));
        let health = sup.health();
        sup.spawn("waits", {
            let stop = stop.clone();
            move |beat| {
                let stop = stop.clone();
                async move {
                    beat.wait(&stop, std::future::pending::<()>()).await;
                }
            }
        });
        sup.spawn("wedged", |beat| async move {
            beat.tick();
            std::future::pending::<()>().await;
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (name, age) = health.stalled(Duration::from_secs(3)).expect("stalled");
        assert_eq!(name, "wedged");
        assert!(age >= Duration::from_secs(4));
        stop.cancel();
    }
}
