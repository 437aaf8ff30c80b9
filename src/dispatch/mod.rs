//! Pacing, submitting and polling: rows from the store become tasks at the
//! API's limits, and tasks are followed to their end.
//!
//! Two limits hold at once: a concurrency cap ([`Semaphore`] of
//! `--max-concurrent` slots, one held by every task submitted and not yet
//! seen finished) and the request budget ([`budget::RequestBudget`]) shared
//! by submits and polls. Both live here and nowhere else.
//!
//! - [`Engine`] (this file): what the workers share, and the helpers that
//!   change a row through the store's state machine.
//! - [`submit`]: the submit worker: queued rows to tasks.
//! - [`poll`]: the poll worker: tasks followed to their end.
//!
//! Write-ahead: a row is marked `submitting` and flushed before its POST; its
//! task id is flushed the moment it is known. A row left `submitting` by a
//! crash is the only row submitted again without a failure (guarantee 2).
//!
//! Every worker derives its work from the store when it starts, so that the
//! supervisor can restart it after a panic; channels carry only wake-ups.

pub mod admit;
pub mod budget;
pub mod poll;
pub mod progress;
pub mod schedule;
mod spend;
pub mod submit;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{ApiClient, PauseReason};
use crate::config::Settings;
use crate::ingest::Folders;
use crate::metrics::Metrics;
use crate::store::{BatchSeq, Op, RowKey, RowRecord, RowState, Store, StoreError};

use self::budget::RequestBudget;
pub use self::poll::PollCmd;

/// Fail code the API uses when the account ran dry.
pub const INSUFFICIENT_CREDITS: &str = "INSUFFICIENT_CREDITS";

/// What the engine's workers share.
pub struct Engine {
    pub store: Store,
    pub api: ApiClient,
    pub http: reqwest::Client,
    pub budget: Arc<RequestBudget>,
    pub slots: Arc<Semaphore>,
    pub settings: Arc<Settings>,
    pub folders: Folders,
    /// Where finished files are published (a local folder or an object store).
    pub outbox: crate::outbox::Outbox,
    pub metrics: Arc<Metrics>,
    /// Why submission is paused, if it is.
    pub pause: watch::Sender<Option<PauseReason>>,
    /// New rows may be queued (a batch accepted, a row requeued).
    pub work: Notify,
    /// Rows left the queue or a batch can give rows again: the admitter
    /// (`--probe`) may let more in.
    pub admit: Notify,
    /// Rows admitted whose audio could not be read: the submitter keeps
    /// them out of its claims until their time (it takes them up at its
    /// next fill).
    probe_holds: Mutex<Vec<(RowKey, std::time::Instant)>>,
    /// Rows ended: the retirer may move them to the archive.
    pub ended: Notify,
    pub poller: mpsc::UnboundedSender<PollCmd>,
    pub downloads: mpsc::UnboundedSender<RowKey>,
    pub finished: mpsc::UnboundedSender<BatchSeq>,
    /// `URL/callback/SECRET` when callback mode is on.
    pub callback_url: Option<String>,
    /// Submits, polls and downloads in flight: awaited on stop.
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    names: Mutex<HashMap<BatchSeq, String>>,
    /// Task ids being followed, for callbacks (maintained by the poller).
    tracked: Mutex<HashMap<String, RowKey>>,
    /// Rows whose download runs, so that a restarted download worker does
    /// not start a second writer on the same files.
    downloading: Mutex<HashSet<RowKey>>,
    /// The concurrency slot of every task followed, held here rather than by
    /// the poll worker so that a restart of it gives none away.
    held: Mutex<HashMap<RowKey, OwnedSemaphorePermit>>,
    /// Set once the poll worker has taken up the running tasks (and their
    /// slots) at start: the submitter waits for it, so that it cannot take
    /// the slots of tasks already running (guarantee 3 across restarts).
    pub taken_up: watch::Sender<bool>,
    /// Tasks in flight (for status): maintained by the poller.
    in_flight: AtomicU64,
    /// Rows are waiting for a slot or the budget (set by the submitter).
    pub backlog: AtomicBool,
    /// Reads audio lengths before submission (`--probe`).
    pub prober: crate::probe::Prober,
    /// `--max-spend-usd`; a new value (a reload) wakes a paused submitter.
    pub spend_cap: watch::Sender<Option<f64>>,
    /// Turns rows' local files into URLs at submit (`--media-url`).
    pub media: Arc<crate::media::Publisher>,
    /// Rows ended lately, per batch and per minute.
    pub progress: progress::Progress,
    /// Mean task time the poll model has learned, in seconds (f64 bits; 0:
    /// not known yet).
    mean_task_bits: AtomicU64,
}

/// The receiving ends of the engine's wake-up channels. Each sits behind a
/// lock that its worker holds while it runs, so that a restarted worker
/// takes the same channel up again.
pub struct Inboxes {
    pub poller: tokio::sync::Mutex<mpsc::UnboundedReceiver<PollCmd>>,
    pub downloads: tokio::sync::Mutex<mpsc::UnboundedReceiver<RowKey>>,
    pub finished: tokio::sync::Mutex<mpsc::UnboundedReceiver<BatchSeq>>,
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        api: ApiClient,
        http: reqwest::Client,
        settings: Arc<Settings>,
        folders: Folders,
        outbox: crate::outbox::Outbox,
        metrics: Arc<Metrics>,
        callback_url: Option<String>,
        media: Arc<crate::media::Publisher>,
        shutdown: CancellationToken,
    ) -> Result<(Arc<Engine>, Arc<Inboxes>), StoreError> {
        let ledger = store.load_ledger()?;
        metrics
            .rows_possibly_paid_twice
            .set(i64::try_from(store.ambiguous()?.rows).unwrap_or(i64::MAX));
        let (poll_tx, poll_rx) = mpsc::unbounded_channel();
        let (dl_tx, dl_rx) = mpsc::unbounded_channel();
        let (fin_tx, fin_rx) = mpsc::unbounded_channel();
        let engine = Engine {
            budget: Arc::new(RequestBudget::new(
                settings.max_requests_per_minute,
                &ledger,
            )),
            slots: Arc::new(Semaphore::new(settings.max_concurrent as usize)),
            store,
            api,
            http: http.clone(),
            folders,
            outbox,
            metrics,
            pause: watch::channel(None).0,
            work: Notify::new(),
            admit: Notify::new(),
            probe_holds: Mutex::new(Vec::new()),
            ended: Notify::new(),
            poller: poll_tx,
            downloads: dl_tx,
            finished: fin_tx,
            callback_url,
            tracker: TaskTracker::new(),
            shutdown,
            names: Mutex::new(HashMap::new()),
            tracked: Mutex::new(HashMap::new()),
            downloading: Mutex::new(HashSet::new()),
            held: Mutex::new(HashMap::new()),
            taken_up: watch::channel(false).0,
            in_flight: AtomicU64::new(0),
            backlog: AtomicBool::new(false),
            prober: crate::probe::Prober::new(
                http.clone(),
                settings.api_timeout.max(Duration::from_secs(10)),
                crate::probe::DEFAULT_PROBES_IN_FLIGHT,
            ),
            spend_cap: watch::channel(settings.max_spend_usd).0,
            media,
            progress: progress::Progress::default(),
            mean_task_bits: AtomicU64::new(0),
            settings,
        };
        let inboxes = Inboxes {
            poller: tokio::sync::Mutex::new(poll_rx),
            downloads: tokio::sync::Mutex::new(dl_rx),
            finished: tokio::sync::Mutex::new(fin_rx),
        };
        Ok((Arc::new(engine), Arc::new(inboxes)))
    }

    /// The batch's name, for logs.
    pub fn batch_name(&self, seq: BatchSeq) -> String {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(name) = names.get(&seq) {
            return name.clone();
        }
        match self.store.batch(seq) {
            Ok(b) => {
                names.insert(seq, b.name.clone());
                b.name
            }
            Err(_) => seq.to_string(),
        }
    }

    /// Rows may be queued (a batch accepted, resumed or retried): the
    /// submitter and the admitter look again.
    pub fn queue_changed(&self) {
        self.work.notify_one();
        self.admit.notify_one();
    }

    /// Keeps admitted row `key` out of claims for `wait`.
    fn hold_probe(&self, key: RowKey, wait: Duration) {
        let until = std::time::Instant::now() + wait;
        self.probe_holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((key, until));
    }

    /// The holds added since the last call.
    fn take_probe_holds(&self) -> Vec<(RowKey, std::time::Instant)> {
        std::mem::take(&mut *self.probe_holds.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The row whose task this is, if the task is being followed.
    pub fn tracked_task(&self, task_id: &str) -> Option<RowKey> {
        self.tracked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(task_id)
            .copied()
    }

    fn track(&self, task_id: &str, key: Option<RowKey>) {
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        match key {
            Some(key) => tracked.insert(task_id.to_owned(), key),
            None => tracked.remove(task_id),
        };
    }

    /// Keeps `slot` for the task of `key` (one slot a task: a second is
    /// given back). Returns whether the task holds a slot now.
    fn hold_slot(&self, key: RowKey, slot: Option<OwnedSemaphorePermit>) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if !held.contains_key(&key)
            && let Some(slot) = slot
        {
            held.insert(key, slot);
        }
        held.contains_key(&key)
    }

    /// The task of `key` ended (or is no longer ours): its slot is free.
    fn release_slot(&self, key: RowKey) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    /// Claims the right to download `key`'s files; `None` while another
    /// download of it runs. Dropping the guard gives it back.
    pub fn claim_download(self: &Arc<Self>, key: RowKey) -> Option<DownloadGuard> {
        let mut running = self.downloading.lock().unwrap_or_else(|p| p.into_inner());
        running.insert(key).then(|| DownloadGuard {
            engine: self.clone(),
            key,
        })
    }

    pub fn paused(&self) -> Option<PauseReason> {
        *self.pause.borrow()
    }

    pub fn tasks_in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Mean task time learned by the poll model, once it knows one.
    pub fn mean_task_secs(&self) -> Option<f64> {
        let m = f64::from_bits(self.mean_task_bits.load(Ordering::Relaxed));
        (m > 0.0 && m.is_finite()).then_some(m)
    }

    fn set_mean_task_secs(&self, secs: f64) {
        self.mean_task_bits.store(secs.to_bits(), Ordering::Relaxed);
    }

    /// Sets a new spend cap (a config reload); a higher one resumes submission.
    pub fn set_spend_cap(&self, cap: Option<f64>) {
        self.spend_cap.send_replace(cap);
    }

    fn set_pause(&self, reason: PauseReason) {
        let changed = self.pause.send_if_modified(|p| {
            // The store being down outranks what the API says: only the
            // store coming back ends that pause (a probe by submitting a
            // row would pay for a video that cannot be kept).
            if *p == Some(PauseReason::ObjectStore) && reason != PauseReason::SpendCap {
                return false;
            }
            let changed = *p != Some(reason);
            *p = Some(reason);
            changed
        });
        if changed {
            tracing::warn!(
                reason = reason.as_str(),
                "submission paused; rows stay queued and running tasks are still followed"
            );
        }
    }

    /// The API accepts again. A spend-cap pause stays: only a new cap ends it.
    fn clear_pause(&self) {
        let mut was = None;
        self.pause.send_if_modified(|p| {
            if p.is_some() && !matches!(p, Some(PauseReason::SpendCap | PauseReason::ObjectStore)) {
                was = p.take();
                true
            } else {
                false
            }
        });
        if let Some(reason) = was {
            tracing::info!(
                was = reason.as_str(),
                "submission resumed: the API accepts again"
            );
        }
    }

    /// The object store refused or could not be reached: submission
    /// pauses until it takes writes again (see `outbox::health_worker`).
    pub fn object_store_down(&self) {
        let changed = self.pause.send_if_modified(|p| {
            let changed = *p != Some(PauseReason::ObjectStore);
            *p = Some(PauseReason::ObjectStore);
            changed
        });
        if changed {
            tracing::warn!(
                reason = PauseReason::ObjectStore.as_str(),
                "submission paused; rows stay queued, finished videos wait to be stored"
            );
        }
    }

    /// The object store took a write: a pause for it ends.
    pub fn object_store_up(&self) {
        let cleared = self.pause.send_if_modified(|p| {
            if *p == Some(PauseReason::ObjectStore) {
                *p = None;
                true
            } else {
                false
            }
        });
        if cleared {
            tracing::info!("submission resumed: the object store takes writes again");
        }
    }

    /// Applies `op` to a row on a blocking thread, and tells the workers that
    /// care: a row that ended wakes the retirer and the finisher, a row back
    /// in the queue wakes the submitter.
    pub async fn apply(&self, key: RowKey, op: Op) -> Result<RowRecord, StoreError> {
        let record = self.store.call(move |s| s.apply(key, op)).await?;
        self.after(key, &record);
        Ok(record)
    }

    /// [`Engine::apply`] for code already on a blocking thread.
    fn apply_blocking(&self, key: RowKey, op: Op) -> Result<RowRecord, StoreError> {
        let record = self.store.apply(key, op)?;
        self.after(key, &record);
        Ok(record)
    }

    fn after(&self, key: RowKey, record: &RowRecord) {
        if record.state.is_final() {
            self.progress.ended(key.batch);
            self.ended.notify_one();
            let _ = self.finished.send(key.batch);
        } else if record.state == RowState::Queued {
            self.work.notify_one();
        }
    }

    /// Ends a row as failed (from `submitting` or `downloading`), logged.
    pub async fn fail_row(
        &self,
        key: RowKey,
        from: RowState,
        code: &str,
        msg: &str,
    ) -> Result<RowRecord, StoreError> {
        let (code, msg) = (code.to_owned(), msg.to_owned());
        let op = match from {
            RowState::Downloading => Op::DownloadFailed {
                code: code.clone(),
                msg: msg.clone(),
            },
            _ => Op::SubmitFailed {
                code: code.clone(),
                msg: msg.clone(),
            },
        };
        let record = self.apply(key, op).await?;
        tracing::warn!(batch = %self.batch_name(key.batch), row = %record.id, code, msg, "row failed");
        Ok(record)
    }
}

/// The right to download one row's files (see [`Engine::claim_download`]).
pub struct DownloadGuard {
    engine: Arc<Engine>,
    key: RowKey,
}

impl Drop for DownloadGuard {
    fn drop(&mut self) {
        self.engine
            .downloading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// Exponential backoff with full jitter: up to `base * 2^attempt`, capped.
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    let top = exp.min(cap);
    let low = top / 2;
    let jitter = rand::rng().random_range(0.0..=1.0);
    low + (top - low).mul_f64(jitter)
}

/// Counts one more failure in a row of a worker's round and waits the
/// backoff for it (500 ms doubling to 30 s); false when stopping.
async fn after_failure(engine: &Engine, failures: &mut u32) -> bool {
    *failures += 1;
    let wait = backoff(
        *failures,
        Duration::from_millis(500),
        Duration::from_secs(30),
    );
    sleep_or_stop(engine, wait).await
}

/// Sleeps `d` unless the engine is stopping; false when stopping.
async fn sleep_or_stop(engine: &Engine, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = engine.shutdown.cancelled() => false,
    }
}

/// At start, before any worker: rows left `submitting` by a stop are queued
/// again with a warning (the one case of guarantee 2 where a row may get a
/// second task). Returns how many.
pub fn requeue_interrupted_submits(engine: &Engine) -> Result<usize, StoreError> {
    let mut requeued = 0;
    for (key, _) in engine
        .store
        .rows_in_state(RowState::Submitting, usize::MAX)?
    {
        let record = engine.apply_blocking(key, Op::Unsent)?;
        if record.state.is_final() {
            // Its batch was cancelled meanwhile: it ends CANCELLED.
            tracing::warn!(batch = %engine.batch_name(key.batch), row = %record.id, "row was being submitted when the daemon stopped; its batch is cancelled, so it ends CANCELLED (a task may have been created)");
            continue;
        }
        tracing::warn!(
            batch = %engine.batch_name(key.batch), row = %record.id,
            "row was being submitted when the daemon stopped; submitting it again (a task may have been created and be charged twice)"
        );
        engine.metrics.resubmitted.inc();
        requeued += 1;
    }
    Ok(requeued)
}
