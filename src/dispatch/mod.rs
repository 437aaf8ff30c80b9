//! Pacing, submitting and polling: rows from the store become tasks at the
//! API's limits, and tasks are followed to their end.
//!
//! Two limits hold at once: a concurrency cap ([`Semaphore`] of
//! `--max-concurrent` slots, one held by every task submitted and not yet
//! seen finished) and the request budget ([`budget::RequestBudget`]) shared
//! by submits and polls. Both live here and nowhere else.
//!
//! Write-ahead: a row is marked `submitting` and flushed before its POST; its
//! task id is flushed the moment it is known. A row left `submitting` by a
//! crash is the only row submitted again without a failure (guarantee 2).

pub mod budget;
pub mod schedule;
mod spend;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{ApiClient, ApiError, PauseReason, SubmitBody, TaskState, TaskStatus};
use crate::config::Settings;
use crate::ingest::Folders;
use crate::manifest::RowReader;
use crate::metrics::Metrics;
use crate::store::{
    BatchPhase, BatchSeq, Claim, RowKey, RowRecord, RowState, Store, StoreError, now_ms,
};

use self::budget::{Class, RequestBudget};
use self::schedule::{Limits, PollModel};

/// Fail code the API uses when the account ran dry.
pub const INSUFFICIENT_CREDITS: &str = "INSUFFICIENT_CREDITS";
/// Most rows claimed (and flushed) together.
const CLAIM_GROUP: usize = 32;
/// Longest wait before asking again about a task whose status query failed.
const POLL_ERROR_BACKOFF_CAP: Duration = Duration::from_secs(60);
/// Status requests on the wire at once.
const POLLS_IN_FLIGHT: usize = 64;
/// The first tasks followed ("scouts") are polled at growing intervals; the
/// others wait until all of them have ended and the model has started.
const SCOUTS: usize = 8;

/// What the engine shares between its loops.
pub struct Engine {
    pub store: Store,
    pub api: ApiClient,
    pub http: reqwest::Client,
    pub budget: Arc<RequestBudget>,
    pub slots: Arc<Semaphore>,
    pub settings: Arc<Settings>,
    pub folders: Folders,
    pub metrics: Arc<Metrics>,
    /// Why submission is paused, if it is.
    pub pause: watch::Sender<Option<PauseReason>>,
    /// New rows may be queued (a batch accepted, a row requeued).
    pub work: tokio::sync::Notify,
    pub poller: mpsc::UnboundedSender<PollCmd>,
    pub downloads: mpsc::UnboundedSender<RowKey>,
    pub finished: mpsc::UnboundedSender<BatchSeq>,
    /// `URL/callback/SECRET` when callback mode is on.
    pub callback_url: Option<String>,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    names: Mutex<HashMap<BatchSeq, String>>,
    /// Task ids being followed, for callbacks (maintained by the poller).
    tracked: Mutex<HashMap<String, RowKey>>,
    /// Tasks in flight (for status): maintained by the poller.
    in_flight: std::sync::atomic::AtomicU64,
    /// Liveness of the poll loop for the systemd watchdog: milliseconds since
    /// `born` at its last iteration (it wakes at least every second).
    poll_tick_ms: std::sync::atomic::AtomicU64,
    born: Instant,
    /// Rows are waiting for a slot or the budget (set by the submitter).
    pub backlog: std::sync::atomic::AtomicBool,
    /// Reads audio lengths before submission (`--probe`).
    pub prober: crate::probe::Prober,
    /// `--max-spend-usd`; a new value (a reload) wakes a paused submitter.
    pub spend_cap: watch::Sender<Option<f64>>,
}

/// The receiving ends the engine's loops own.
pub struct Inboxes {
    pub poller: mpsc::UnboundedReceiver<PollCmd>,
    pub downloads: mpsc::UnboundedReceiver<RowKey>,
    pub finished: mpsc::UnboundedReceiver<BatchSeq>,
}

/// Messages to the poll scheduler.
#[derive(Debug)]
pub enum PollCmd {
    /// Follow this task; it holds a concurrency slot until seen finished.
    Track {
        key: RowKey,
        task_id: String,
        submitted_at_ms: u64,
        /// Seconds of audio, when probed: the poll schedule scales with it.
        audio_seconds: Option<f64>,
        slot: Option<OwnedSemaphorePermit>,
    },
    /// A callback said this task ended: confirm with a status query now.
    Hint { task_id: String },
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        api: ApiClient,
        http: reqwest::Client,
        settings: Arc<Settings>,
        folders: Folders,
        metrics: Arc<Metrics>,
        callback_url: Option<String>,
        shutdown: CancellationToken,
    ) -> Result<(Arc<Engine>, Inboxes), StoreError> {
        let ledger = store.load_ledger()?;
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
            metrics,
            pause: watch::channel(None).0,
            work: tokio::sync::Notify::new(),
            poller: poll_tx,
            downloads: dl_tx,
            finished: fin_tx,
            callback_url,
            tracker: TaskTracker::new(),
            shutdown,
            names: Mutex::new(HashMap::new()),
            tracked: Mutex::new(HashMap::new()),
            in_flight: std::sync::atomic::AtomicU64::new(0),
            poll_tick_ms: std::sync::atomic::AtomicU64::new(0),
            backlog: std::sync::atomic::AtomicBool::new(false),
            born: Instant::now(),
            prober: crate::probe::Prober::new(
                http.clone(),
                settings.api_timeout.max(Duration::from_secs(10)),
                crate::probe::DEFAULT_PROBES_IN_FLIGHT,
            ),
            spend_cap: watch::channel(settings.max_spend_usd).0,
            settings,
        };
        Ok((
            Arc::new(engine),
            Inboxes {
                poller: poll_rx,
                downloads: dl_rx,
                finished: fin_rx,
            },
        ))
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

    pub fn paused(&self) -> Option<PauseReason> {
        *self.pause.borrow()
    }

    pub fn tasks_in_flight(&self) -> u64 {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How long ago the poll loop last went round (it does at least every
    /// second while it runs); the systemd watchdog is fed only while short.
    pub fn poll_loop_age(&self) -> Duration {
        let now = self.born.elapsed().as_millis() as u64;
        let tick = self.poll_tick_ms.load(std::sync::atomic::Ordering::Relaxed);
        Duration::from_millis(now.saturating_sub(tick))
    }

    fn poll_loop_tick(&self) {
        let now = self.born.elapsed().as_millis() as u64;
        self.poll_tick_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets a new spend cap (a config reload); a higher one resumes submission.
    pub fn set_spend_cap(&self, cap: Option<f64>) {
        self.spend_cap.send_replace(cap);
    }

    fn set_pause(&self, reason: PauseReason) {
        let changed = self.pause.send_if_modified(|p| {
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
            if p.is_some() && *p != Some(PauseReason::SpendCap) {
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

    /// Tells the finisher a row of `batch` ended.
    fn row_ended(&self, batch: BatchSeq) {
        let _ = self.finished.send(batch);
    }

    /// Records a row as failed and tells the finisher.
    pub fn fail_row(&self, key: RowKey, code: &str, msg: &str) -> Result<RowRecord, StoreError> {
        let record = self.store.transition(key, |r| {
            r.state = RowState::Failed;
            r.fail_code = Some(code.to_owned());
            r.fail_msg = Some(msg.to_owned());
            Ok(())
        })?;
        tracing::warn!(batch = %self.batch_name(key.batch), row = %record.id, code, msg, "row failed");
        self.row_ended(key.batch);
        Ok(record)
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

/// Sleeps `d` unless the engine is stopping; false when stopping.
async fn sleep_or_stop(engine: &Engine, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = engine.shutdown.cancelled() => false,
    }
}

// ---------------------------------------------------------------------------
// Start-up

/// Puts the store's rows back to work after a start: running tasks are
/// followed again (holding their slots), rows left `submitting` are queued
/// again with a warning, downloads resume. Returns how many rows were
/// requeued because their submit may have been in flight.
pub fn resume(engine: &Arc<Engine>) -> Result<usize, StoreError> {
    let store = &engine.store;
    let mut requeued = 0;
    for (key, record) in store.rows_in_state(RowState::Submitting, usize::MAX)? {
        tracing::warn!(
            batch = %engine.batch_name(key.batch), row = %record.id,
            "row was being submitted when the daemon stopped; submitting it again (a task may have been created and be charged twice)"
        );
        store.transition(key, |r| {
            r.state = RowState::Queued;
            Ok(())
        })?;
        engine.metrics.resubmitted.inc();
        requeued += 1;
    }
    for (key, record) in store.rows_in_state(RowState::Running, usize::MAX)? {
        let Some(task_id) = record.task_id.clone() else {
            continue;
        };
        let slot = engine.slots.clone().try_acquire_owned().ok();
        let _ = engine.poller.send(PollCmd::Track {
            key,
            task_id,
            submitted_at_ms: record.submitted_at_ms.unwrap_or_else(now_ms),
            audio_seconds: record.audio_seconds,
            slot,
        });
    }
    for (key, _) in store.rows_in_state(RowState::Downloading, usize::MAX)? {
        let _ = engine.downloads.send(key);
    }
    for batch in store.batches()? {
        if batch.phase == BatchPhase::Active && batch.all_rows_ended() {
            engine.row_ended(batch.seq);
        }
    }
    Ok(requeued)
}

// ---------------------------------------------------------------------------
// Submitting

/// Takes queued rows and submits them while slots, budget and the pause allow.
pub async fn submit_loop(engine: Arc<Engine>) {
    let mut feed = Feed::default();
    let mut failures = 0u32;
    let mut cap = engine.spend_cap.subscribe();
    loop {
        if engine.shutdown.is_cancelled() {
            break;
        }
        if engine.paused() == Some(PauseReason::SpendCap) {
            // Asking the API helps nothing here: only a new cap does.
            tokio::select! {
                changed = cap.changed() => if changed.is_err() { break },
                () = engine.shutdown.cancelled() => break,
            }
            if engine.pause.send_replace(None).is_some() {
                tracing::info!(cap_usd = ?*cap.borrow(), "spend cap changed; submission resumes");
            }
            continue;
        }
        let probing = engine.paused().is_some();
        if probing {
            // Paused: try one row now and then; its answer decides.
            let wait = engine.settings.pause_probe;
            if !sleep_or_stop(&engine, wait).await {
                break;
            }
            if engine.paused().is_none() {
                continue;
            }
        }
        let slot = tokio::select! {
            slot = engine.slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = engine.shutdown.cancelled() => break,
        };
        let filled = feed.fill(&engine, CLAIM_GROUP);
        engine.backlog.store(
            matches!(filled, Ok(n) if n > 0),
            std::sync::atomic::Ordering::Relaxed,
        );
        match filled {
            Ok(0) => {
                drop(slot);
                tokio::select! {
                    () = engine.work.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                    () = engine.shutdown.cancelled() => break,
                }
                continue;
            }
            Ok(_) => failures = 0,
            Err(e) => {
                drop(slot);
                feed.reset();
                failures += 1;
                tracing::error!(error = %e, "cannot read queued rows; retrying");
                if !sleep_or_stop(
                    &engine,
                    backoff(
                        failures,
                        Duration::from_millis(500),
                        Duration::from_secs(30),
                    ),
                )
                .await
                {
                    break;
                }
                continue;
            }
        }
        tokio::select! {
            () = engine.budget.acquire(Class::Submit) => {}
            () = engine.shutdown.cancelled() => break,
        }
        let mut group = vec![(slot, feed.pop())];
        while !probing && group.len() < CLAIM_GROUP && !feed.is_empty() {
            let Ok(slot) = engine.slots.clone().try_acquire_owned() else {
                break;
            };
            if !engine.budget.try_acquire() {
                break;
            }
            group.push((slot, feed.pop()));
        }
        let (group, outcomes) = spend::plan(&engine, &mut feed, group).await;
        if group.is_empty() {
            continue;
        }
        let claims: Vec<Claim> = group.iter().map(|(_, c)| c.clone()).collect();
        let claimed = match engine.store.mark_submitting(&claims) {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::error!(error = %e, "cannot mark rows as submitting; retrying");
                feed.reset();
                continue;
            }
        };
        let send = match spend::apply(&engine, group, claimed, outcomes) {
            Ok(send) => send,
            Err(e) => {
                // The rows stay `submitting`: the next start queues them again.
                tracing::error!(error = %e, "cannot record the rows' costs; retrying");
                feed.reset();
                continue;
            }
        };
        if let Err(e) = engine.store.flush().await {
            // Without the write-ahead mark on disk nothing may be sent.
            tracing::error!(error = %e, "cannot flush the state database; nothing submitted");
            feed.reset();
            if !sleep_or_stop(&engine, Duration::from_secs(1)).await {
                break;
            }
            continue;
        }
        for (slot, key, record) in send {
            let engine2 = engine.clone();
            if probing {
                submit_row(engine2, key, record, slot).await;
            } else {
                engine.tracker.spawn(submit_row(engine2, key, record, slot));
            }
        }
    }
}

/// Rows read ahead from the store and the manifests, not yet claimed.
#[derive(Default)]
struct Feed {
    pending: VecDeque<Claim>,
    readers: HashMap<BatchSeq, RowReader>,
    queued_keys: HashSet<RowKey>,
}

impl Feed {
    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Puts claims taken but not used back at the front, in order.
    fn unpop(&mut self, claims: Vec<Claim>) {
        for claim in claims.into_iter().rev() {
            if let Claim::Again(key) = &claim {
                self.queued_keys.insert(*key);
            }
            self.pending.push_front(claim);
        }
    }

    fn pop(&mut self) -> Option<Claim> {
        let claim = self.pending.pop_front();
        if let Some(Claim::Again(key)) = &claim {
            self.queued_keys.remove(key);
        }
        claim
    }

    /// Forgets read-ahead rows (after an error the cursors in the store are the truth).
    fn reset(&mut self) {
        self.pending.clear();
        self.readers.clear();
        self.queued_keys.clear();
    }

    /// Reads ahead up to `want` rows; returns how many are pending.
    fn fill(&mut self, engine: &Engine, want: usize) -> Result<usize, FeedError> {
        if self.pending.len() >= want {
            return Ok(self.pending.len());
        }
        // Rows queued again come first: they have waited longest.
        for (key, _) in engine.store.rows_in_state(RowState::Queued, want)? {
            if self.queued_keys.insert(key) {
                self.pending.push_back(Claim::Again(key));
            }
        }
        if self.pending.len() >= want {
            return Ok(self.pending.len());
        }
        for batch in engine.store.batches()? {
            if batch.phase != BatchPhase::Active || batch.unclaimed() == 0 || batch.cancelled {
                self.readers.remove(&batch.seq);
                continue;
            }
            let reader = match self.readers.entry(batch.seq) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let path = engine.folders.manifest_of(&batch.name);
                    v.insert(RowReader::open(&path, batch.cursor)?)
                }
            };
            while self.pending.len() < want {
                match reader.next_row()? {
                    Some((row, next)) => self.pending.push_back(Claim::Fresh {
                        batch: batch.seq,
                        row,
                        next,
                    }),
                    None => break,
                }
            }
            if self.pending.len() >= want {
                break;
            }
        }
        Ok(self.pending.len())
    }
}

#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
}

/// Submits one claimed row until the API answers for it.
async fn submit_row(
    engine: Arc<Engine>,
    key: RowKey,
    record: RowRecord,
    slot: OwnedSemaphorePermit,
) {
    let batch = engine.batch_name(key.batch);
    let body = SubmitBody::new(
        &record.spec,
        &engine.settings.defaults,
        engine.callback_url.as_deref(),
    );
    let mut attempt = 0u32;
    loop {
        if attempt > 0 {
            tokio::select! {
                () = engine.budget.acquire(Class::Submit) => {}
                // The row stays `submitting`; the next start resubmits it.
                () = engine.shutdown.cancelled() => return,
            }
        }
        attempt += 1;
        match engine.api.submit(&body).await {
            Ok(task_id) => {
                engine.metrics.request("submit", "ok");
                engine.metrics.tasks_submitted.inc();
                engine.clear_pause();
                let submitted_at_ms = now_ms();
                let saved = engine.store.transition(key, |r| {
                    r.state = RowState::Running;
                    r.task_id = Some(task_id.clone());
                    r.submitted_at_ms = Some(submitted_at_ms);
                    Ok(())
                });
                if let Err(e) = saved {
                    tracing::error!(batch = %batch, row = %record.id, task_id, error = %e, "cannot record the task id");
                }
                if let Err(e) = engine.store.flush().await {
                    tracing::error!(batch = %batch, row = %record.id, task_id, error = %e, "cannot flush the task id");
                }
                tracing::info!(batch = %batch, row = %record.id, task_id, "submitted");
                let _ = engine.poller.send(PollCmd::Track {
                    key,
                    task_id,
                    submitted_at_ms,
                    audio_seconds: record.audio_seconds,
                    slot: Some(slot),
                });
                return;
            }
            Err(e) => {
                if let Some(reason) = e.pause_reason() {
                    engine.metrics.request("submit", "paused");
                    engine.set_pause(reason);
                    requeue(&engine, key, &record.id, &batch);
                    return;
                }
                if e.is_rate_limit() {
                    engine.metrics.request("submit", "rate_limited");
                    engine.metrics.rate_limited.inc();
                    let wait = e.retry_after().unwrap_or(Duration::from_secs(2));
                    engine.budget.hold(wait);
                    tracing::warn!(batch = %batch, row = %record.id, wait = ?wait, "rate limited (429) on submit; waiting");
                    continue;
                }
                if e.is_transient() {
                    engine.metrics.request("submit", "transient");
                    let wait =
                        backoff(attempt, Duration::from_millis(500), Duration::from_secs(60));
                    tracing::warn!(batch = %batch, row = %record.id, error = %e, retry_in = ?wait, "submit failed; retrying");
                    if !sleep_or_stop(&engine, wait).await {
                        return;
                    }
                    continue;
                }
                engine.metrics.request("submit", "refused");
                refund(&engine, &record);
                let msg = match &e {
                    ApiError::Refused { message, .. } => message.clone(),
                    other => other.to_string(),
                };
                if let Err(se) = engine.fail_row(key, &e.fail_code(), &msg) {
                    tracing::error!(batch = %batch, row = %record.id, error = %se, "cannot record a refused row");
                }
                return;
            }
        }
    }
}

/// A row that went back without a task costs nothing.
fn refund(engine: &Engine, record: &RowRecord) {
    let usd = spend::counted_cost(engine, record);
    if let Err(e) = engine
        .store
        .add_spend(-usd, -record.audio_seconds.unwrap_or(0.0))
    {
        tracing::error!(row = %record.id, error = %e, "cannot refund a row's cost");
    }
}

fn requeue(engine: &Engine, key: RowKey, id: &str, batch: &str) {
    if let Ok(Some(record)) = engine.store.row(key) {
        refund(engine, &record);
    }
    let result = engine.store.transition(key, |r| {
        r.state = RowState::Queued;
        Ok(())
    });
    if let Err(e) = result {
        tracing::error!(batch, row = id, error = %e, "cannot queue a row again");
    }
    engine.work.notify_one();
}

// ---------------------------------------------------------------------------
// Polling

struct Tracked {
    task_id: String,
    submitted: Instant,
    audio: Option<f64>,
    /// A callback asked for a poll now: no new ladder may postpone it.
    hinted: bool,
    polls: u32,
    errors: u32,
    last_poll: Option<Instant>,
    _slot: Option<OwnedSemaphorePermit>,
}

enum PollResult {
    /// Still running (or the answer was not usable): poll again after the delay.
    Again {
        errors: bool,
        wait: Option<Duration>,
    },
    /// Seen finished: success or failure recorded.
    Ended { took: Duration },
    /// The row is no longer ours to poll (state changed elsewhere).
    Dropped,
}

/// Follows every task to its end at the pace the model suggests.
pub async fn poll_loop(engine: Arc<Engine>, mut cmds: mpsc::UnboundedReceiver<PollCmd>) {
    let settings = engine.settings.clone();
    let mut model = PollModel::new(settings.poll_min, settings.poll_max);
    let mut tasks: HashMap<RowKey, Tracked> = HashMap::new();
    let mut due: BTreeSet<(Instant, RowKey)> = BTreeSet::new();
    let mut next_at: HashMap<RowKey, Instant> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(RowKey, PollResult)>();
    let wire = Arc::new(Semaphore::new(POLLS_IN_FLIGHT));
    let callback_mode = engine.callback_url.is_some();
    // Wakes the loop when idle, so that its liveness stamp stays fresh.
    let mut alive = tokio::time::interval(Duration::from_secs(1));
    alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let schedule = |due: &mut BTreeSet<(Instant, RowKey)>,
                    next_at: &mut HashMap<RowKey, Instant>,
                    key: RowKey,
                    at: Instant| {
        if let Some(old) = next_at.insert(key, at) {
            due.remove(&(old, key));
        }
        due.insert((at, key));
    };
    // The first tasks followed teach the model; it starts once all of them
    // have ended (a partial cohort would hold only the short ones).
    let mut scouts: HashSet<RowKey> = HashSet::new();
    let mut cohort_full = false;
    let plan = |model: &PollModel, scouts: &HashSet<RowKey>, key: RowKey, t: &Tracked| -> Instant {
        let polled = t
            .last_poll
            .map(|p| p.saturating_duration_since(t.submitted));
        let age = if callback_mode {
            model.safety_poll(polled, t.audio)
        } else if !model.is_trained() && !scouts.contains(&key) {
            // Scouts will teach the model: until then this task waits.
            polled.unwrap_or_default() + settings.poll_max
        } else {
            model.next_poll(polled, t.audio)
        };
        (t.submitted + age).max(Instant::now())
    };
    // A new ladder (the first one, or one for a queue that filled or
    // emptied): every waiting task follows it, except those backing off
    // after errors and those a callback asked about.
    let replan_all = |model: &PollModel,
                      scouts: &HashSet<RowKey>,
                      tasks: &HashMap<RowKey, Tracked>,
                      due: &mut BTreeSet<(Instant, RowKey)>,
                      next_at: &mut HashMap<RowKey, Instant>| {
        let keys: Vec<RowKey> = next_at.keys().copied().collect();
        for k in keys {
            if let Some(t) = tasks.get(&k).filter(|t| t.errors == 0 && !t.hinted) {
                schedule(due, next_at, k, plan(model, scouts, k, t));
            }
        }
    };
    // Starts the model once the scouts are in, re-chooses its ladders (at
    // most every so often) and puts every waiting task on the new ones.
    let retune = |model: &mut PollModel,
                  scouts: &mut HashSet<RowKey>,
                  tasks: &HashMap<RowKey, Tracked>,
                  due: &mut BTreeSet<(Instant, RowKey)>,
                  next_at: &mut HashMap<RowKey, Instant>| {
        let was_trained = model.is_trained();
        if !was_trained && cohort_ended(model, scouts, tasks) {
            model.start();
        }
        if model.refit(limits(&engine), Instant::now()) {
            log_ladders(model);
            if !was_trained {
                scouts.clear();
            }
            replan_all(model, scouts, tasks, due, next_at);
        }
    };

    loop {
        engine.poll_loop_tick();
        engine
            .in_flight
            .store(tasks.len() as u64, std::sync::atomic::Ordering::Relaxed);
        engine.metrics.tasks_in_flight.set(tasks.len() as i64);
        let next_due = due.first().map(|(at, _)| *at);
        tokio::select! {
            () = engine.shutdown.cancelled() => break,
            _ = alive.tick() => {
                // Also follows a queue that filled or emptied since the last task ended.
                retune(&mut model, &mut scouts, &tasks, &mut due, &mut next_at);
            }
            cmd = cmds.recv() => match cmd {
                None => break,
                Some(PollCmd::Track { key, task_id, submitted_at_ms, audio_seconds, slot }) => {
                    let age = Duration::from_millis(now_ms().saturating_sub(submitted_at_ms));
                    let submitted = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                    let t = Tracked { task_id: task_id.clone(), submitted, audio: audio_seconds, hinted: false, polls: 0, errors: 0, last_poll: None, _slot: slot };
                    if !callback_mode && !model.is_trained() && !cohort_full && scouts.len() < SCOUTS {
                        scouts.insert(key);
                        cohort_full = scouts.len() == SCOUTS;
                    }
                    let at = plan(&model, &scouts, key, &t);
                    engine.track(&task_id, Some(key));
                    tasks.insert(key, t);
                    schedule(&mut due, &mut next_at, key, at);
                }
                Some(PollCmd::Hint { task_id }) => {
                    if let Some(key) = engine.tracked_task(&task_id)
                        && let Some(t) = tasks.get_mut(&key)
                    {
                        let recent = t.last_poll.is_some_and(|p| p.elapsed() < Duration::from_millis(200));
                        if next_at.contains_key(&key) && !recent {
                            t.hinted = true;
                            schedule(&mut due, &mut next_at, key, Instant::now());
                        }
                    }
                }
            },
            done = done_rx.recv() => {
                let Some((key, result)) = done else { break };
                match result {
                    PollResult::Again { errors, wait } => {
                        if let Some(t) = tasks.get_mut(&key) {
                            t.errors = if errors { t.errors + 1 } else { 0 };
                            let delay = match wait {
                                Some(w) => w,
                                // Capped well under `poll_max` (minutes): once the API answers
                                // again, every task should be seen soon.
                                None if t.errors > 0 => backoff(t.errors, settings.poll_min, POLL_ERROR_BACKOFF_CAP.max(settings.poll_min)),
                                None => {
                                    let at = plan(&model, &scouts, key, t);
                                    schedule(&mut due, &mut next_at, key, at);
                                    continue;
                                }
                            };
                            schedule(&mut due, &mut next_at, key, Instant::now() + delay);
                        }
                    }
                    PollResult::Ended { took } => {
                        scouts.remove(&key);
                        let mut audio = None;
                        if let Some(t) = tasks.remove(&key) {
                            engine.track(&t.task_id, None);
                            engine.metrics.polls_per_task.observe(f64::from(t.polls));
                            audio = t.audio;
                        }
                        model.observe(took, audio);
                        retune(&mut model, &mut scouts, &tasks, &mut due, &mut next_at);
                        engine.work.notify_one();
                    }
                    PollResult::Dropped => {
                        scouts.remove(&key);
                        if let Some(t) = tasks.remove(&key) {
                            engine.track(&t.task_id, None);
                        }
                    }
                }
            },
            () = sleep_until_opt(next_due) => {
                let now = Instant::now();
                while let Some((at, key)) = due.first().copied() {
                    if at > now {
                        break;
                    }
                    due.remove(&(at, key));
                    next_at.remove(&key);
                    let Some(t) = tasks.get_mut(&key) else { continue };
                    t.polls += 1;
                    t.hinted = false;
                    tracing::trace!(task_id = %t.task_id, poll = t.polls, age_ms = t.submitted.elapsed().as_millis() as u64, "status poll");
                    t.last_poll = Some(now);
                    let task_id = t.task_id.clone();
                    let submitted = t.submitted;
                    let engine2 = engine.clone();
                    let wire2 = wire.clone();
                    let tx = done_tx.clone();
                    engine.tracker.spawn(async move {
                        let result = tokio::select! {
                            r = poll_task(&engine2, &wire2, key, &task_id, submitted) => r,
                            () = engine2.shutdown.cancelled() => return,
                        };
                        let _ = tx.send((key, result));
                    });
                }
            }
        }
    }
}

fn log_ladders(model: &PollModel) {
    for (kind, ladder) in [
        ("plain", model.ladder()),
        ("per_audio_second", model.per_audio_ladder()),
    ] {
        if let Some(l) = ladder {
            tracing::debug!(kind, rungs = ?l.times, expected_polls = l.polls, expected_delay_s = l.delay, samples = model.samples(), "poll ladder");
        }
    }
}

/// Whether the scouts have taught the model enough to start it: all of them
/// ended, or the ones left have run for over three times the longest
/// duration seen (a stuck task must not keep every other task waiting).
fn cohort_ended(
    model: &PollModel,
    scouts: &HashSet<RowKey>,
    tasks: &HashMap<RowKey, Tracked>,
) -> bool {
    if model.samples() == 0 {
        return false;
    }
    let longest = model.longest().unwrap_or(0.0);
    scouts.iter().all(|k| {
        tasks
            .get(k)
            .is_none_or(|t| t.submitted.elapsed().as_secs_f64() > 3.0 * longest)
    })
}

/// What the poll ladder is chosen for, now.
fn limits(engine: &Engine) -> Limits {
    Limits {
        requests_per_sec: engine.budget.limit() as f64 / budget::WINDOW.as_secs_f64(),
        slots: engine.settings.max_concurrent as f64,
        backlog: engine.backlog.load(std::sync::atomic::Ordering::Relaxed),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// One status query and what follows from its answer.
async fn poll_task(
    engine: &Arc<Engine>,
    wire: &Semaphore,
    key: RowKey,
    task_id: &str,
    submitted: Instant,
) -> PollResult {
    let Ok(_permit) = wire.acquire().await else {
        return PollResult::Dropped;
    };
    engine.budget.acquire(Class::Poll).await;
    let status = match engine.api.status(task_id).await {
        Ok(status) => status,
        Err(e) => return poll_error(engine, key, task_id, &e),
    };
    engine.metrics.request("status", "ok");
    if engine.paused() == Some(PauseReason::Unauthorized) {
        // The key works again for reads: let submission try again.
        engine.clear_pause();
    }
    match status.state {
        TaskState::Pending | TaskState::Processing => PollResult::Again {
            errors: false,
            wait: None,
        },
        TaskState::Success | TaskState::Failed => {
            let seen = submitted.elapsed();
            engine.metrics.task_duration.observe(seen.as_secs_f64());
            // What the poll model learns is how long the task ran, not when
            // it happened to be seen: the API's own measure where it gives one.
            let mut took = seen;
            if let Some(cost) = status.cost_time_ms {
                let finished_about = Duration::from_millis(cost);
                engine
                    .metrics
                    .detection_delay
                    .observe(seen.saturating_sub(finished_about).as_secs_f64());
                took = finished_about.min(seen);
            }
            match task_ended(engine, key, task_id, &status) {
                Ok(true) => PollResult::Ended { took },
                Ok(false) => PollResult::Dropped,
                Err(e) => {
                    tracing::error!(task_id, error = %e, "cannot record a finished task; will poll again");
                    PollResult::Again {
                        errors: true,
                        wait: None,
                    }
                }
            }
        }
    }
}

fn poll_error(engine: &Engine, key: RowKey, task_id: &str, e: &ApiError) -> PollResult {
    let batch = engine.batch_name(key.batch);
    if let Some(reason) = e.pause_reason() {
        engine.metrics.request("status", "paused");
        engine.set_pause(reason);
        return PollResult::Again {
            errors: true,
            wait: None,
        };
    }
    if e.is_rate_limit() {
        engine.metrics.request("status", "rate_limited");
        engine.metrics.rate_limited.inc();
        let wait = e.retry_after().unwrap_or(Duration::from_secs(2));
        engine.budget.hold(wait);
        tracing::warn!(batch = %batch, task_id, "rate limited (429) on status; waiting");
        return PollResult::Again {
            errors: false,
            wait: Some(wait),
        };
    }
    engine.metrics.request(
        "status",
        if e.is_transient() {
            "transient"
        } else {
            "refused"
        },
    );
    tracing::warn!(batch = %batch, task_id, error = %e, "status query failed; will ask again");
    PollResult::Again {
        errors: true,
        wait: None,
    }
}

/// Records what a finished task means for its row. False when the row had
/// already moved on (a duplicate answer).
pub fn task_ended(
    engine: &Arc<Engine>,
    key: RowKey,
    task_id: &str,
    status: &TaskStatus,
) -> Result<bool, StoreError> {
    let Some(record) = engine.store.row(key)? else {
        return Ok(false);
    };
    if record.state != RowState::Running || record.task_id.as_deref() != Some(task_id) {
        return Ok(false);
    }
    let batch = engine.batch_name(key.batch);
    if status.state == TaskState::Success {
        let urls = status.result_urls.clone();
        engine.store.transition(key, |r| {
            r.state = RowState::Downloading;
            r.result_urls = urls.clone();
            r.finished_at_ms = Some(now_ms());
            r.cost_time_ms = status.cost_time_ms;
            Ok(())
        })?;
        tracing::info!(batch = %batch, row = %record.id, task_id, videos = urls.len(), "task succeeded; downloading");
        let _ = engine.downloads.send(key);
        return Ok(true);
    }
    let code = status.fail_code.clone().unwrap_or_else(|| "UNKNOWN".into());
    let msg = status.fail_msg.clone().unwrap_or_default();
    let settings = &engine.settings;
    let credits = code == INSUFFICIENT_CREDITS;
    if credits {
        engine.set_pause(PauseReason::InsufficientCredits);
    }
    let retryable = settings.retry_fail_codes.iter().any(|c| c == &code);
    // Out of credits never blames the row, whatever the settings say.
    if credits || (retryable && record.resubmits < settings.max_resubmits) {
        let requeued = engine.store.transition(key, |r| {
            if let Some(old) = r.task_id.take() {
                r.previous_tasks.push(old);
            }
            if !credits {
                r.resubmits += 1;
            }
            r.state = RowState::Queued;
            r.submitted_at_ms = None;
            r.fail_code = Some(code.clone());
            r.fail_msg = Some(msg.clone());
            Ok(())
        })?;
        engine.metrics.resubmitted.inc();
        tracing::warn!(
            batch = %batch, row = %record.id, task_id, code = %code,
            resubmission = requeued.resubmits, of = settings.max_resubmits,
            "task failed on the service's side; the row will be submitted again as a new task"
        );
        engine.work.notify_one();
        return Ok(true);
    }
    let failed = engine.store.transition(key, |r| {
        r.state = RowState::Failed;
        r.fail_code = Some(code.clone());
        r.fail_msg = Some(msg.clone());
        Ok(())
    })?;
    tracing::warn!(batch = %batch, row = %failed.id, task_id, code = %code, msg = %msg, "task failed");
    engine.row_ended(key.batch);
    Ok(true)
}
