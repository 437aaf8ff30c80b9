//! The poll worker: every task submitted is followed to its end with status
//! queries at the moments [`super::schedule`] chooses, and what the answer
//! means for the row is applied through the store's state machine.
//!
//! When it starts (or restarts after a panic) it takes up every running
//! task from the store; submitters hand it new tasks (with their slots)
//! through [`PollCmd::Track`], callbacks through [`PollCmd::Hint`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::budget::{self, Class};
use super::schedule::{Limits, PollModel};
use super::{Engine, INSUFFICIENT_CREDITS, backoff};
use crate::api::{ApiError, PauseReason, TaskState, TaskStatus};
use crate::store::{Op, RowKey, RowState, StoreError, now_ms};
use crate::supervisor::Beat;

/// Longest wait before asking again about a task whose status query failed.
const POLL_ERROR_BACKOFF_CAP: Duration = Duration::from_secs(60);
/// Status requests on the wire at once.
const POLLS_IN_FLIGHT: usize = 64;
/// "No such task" answers about one task before its row may be settled.
const LOST_ANSWERS: u32 = 5;
/// Fail code of a row whose task the API no longer knows.
pub const TASK_NOT_FOUND: &str = "TASK_NOT_FOUND";
/// The first tasks followed ("scouts") are polled at growing intervals; the
/// others wait until all of them have ended and the model has started.
const SCOUTS: usize = 8;
/// What the poll model learned is saved this often (it is small).
const SAVE_MODEL_EVERY: Duration = Duration::from_secs(10);

/// Messages to the poll worker.
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

struct Tracked {
    task_id: String,
    submitted: Instant,
    audio: Option<f64>,
    /// A callback asked for a poll now: no new ladder may postpone it.
    hinted: bool,
    polls: u32,
    errors: u32,
    last_poll: Option<Instant>,
    /// "No such task" answers in a row, and since when.
    lost: Lost,
}

/// How long the API has been saying it does not know a task.
#[derive(Debug, Clone, Copy, Default)]
struct Lost {
    answers: u32,
    since: Option<Instant>,
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
    /// The API says it has no such task (not yet long enough to settle).
    NotFound,
}

/// The poll worker's state: the tasks followed, when each is due, and the
/// model of how long tasks take.
pub struct Poller {
    engine: Arc<Engine>,
    beat: Beat,
    model: PollModel,
    tasks: HashMap<RowKey, Tracked>,
    due: BTreeSet<(Instant, RowKey)>,
    next_at: HashMap<RowKey, Instant>,
    /// The first tasks followed teach the model; it starts once all of them
    /// have ended (a partial cohort would hold only the short ones).
    scouts: HashSet<RowKey>,
    cohort_full: bool,
    callback_mode: bool,
    wire: Arc<Semaphore>,
    saved_at: Option<Instant>,
    /// Durations came in since the model was last saved.
    unsaved: bool,
}

impl Poller {
    pub fn new(engine: Arc<Engine>, beat: Beat) -> Poller {
        let settings = engine.settings.clone();
        Poller {
            model: PollModel::new(settings.poll_min, settings.poll_max),
            callback_mode: engine.callback_url.is_some(),
            engine,
            beat,
            tasks: HashMap::new(),
            due: BTreeSet::new(),
            next_at: HashMap::new(),
            scouts: HashSet::new(),
            cohort_full: false,
            wire: Arc::new(Semaphore::new(POLLS_IN_FLIGHT)),
            saved_at: None,
            unsaved: false,
        }
    }

    /// Follows every task to its end until the engine stops.
    pub async fn run(mut self, cmds: &mut mpsc::UnboundedReceiver<PollCmd>) {
        let engine = self.engine.clone();
        self.restore_model().await;
        if let Err(e) = self.take_up_running().await {
            tracing::error!(error = %e, "cannot read the running tasks; restarting the poller");
            return;
        }
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(RowKey, PollResult)>();
        // Wakes the loop when idle, so that its liveness stamp stays fresh.
        let mut alive = tokio::time::interval(Duration::from_secs(1));
        alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.beat.tick();
            engine
                .in_flight
                .store(self.tasks.len() as u64, Ordering::Relaxed);
            engine.metrics.tasks_in_flight.set(self.tasks.len() as i64);
            let next_due = self.due.first().map(|(at, _)| *at);
            tokio::select! {
                () = engine.shutdown.cancelled() => break,
                // Also follows a queue that filled or emptied since the last task ended.
                _ = alive.tick() => {
                    self.retune();
                    self.save_model(false).await;
                }
                cmd = cmds.recv() => match cmd {
                    None => break,
                    Some(cmd) => self.command(cmd),
                },
                done = done_rx.recv() => {
                    let Some((key, result)) = done else { break };
                    self.answered(key, result);
                }
                () = sleep_until_opt(next_due) => self.send_due(&done_tx),
            }
        }
        self.save_model(true).await;
    }

    /// Durations a previous run (or this worker before a restart) learned:
    /// with them the model starts at once, and the tasks taken up are
    /// polled on a trained ladder from the first second.
    async fn restore_model(&mut self) {
        match self.engine.store.call(|s| s.load_durations()).await {
            Ok(saved) if !saved.is_empty() => {
                self.model.restore(&saved, SCOUTS);
                self.retune();
                tracing::info!(
                    samples = self.model.samples(),
                    trained = self.model.is_trained(),
                    "poll model restored from the last run"
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the saved task durations; learning them afresh");
            }
        }
    }

    /// Saves what the model learned, at most every [`SAVE_MODEL_EVERY`]
    /// unless `now`; on a blocking thread, owned by the engine's tracker.
    async fn save_model(&mut self, now: bool) {
        let due = self
            .saved_at
            .is_none_or(|at| at.elapsed() >= SAVE_MODEL_EVERY);
        if !self.unsaved || !(now || due) {
            return;
        }
        self.saved_at = Some(Instant::now());
        self.unsaved = false;
        let samples = self.model.export();
        let store = self.engine.store.clone();
        let save = async move {
            if let Err(e) = store.call(move |s| s.save_durations(&samples)).await {
                tracing::warn!(error = %e, "cannot save the task durations learned");
            }
        };
        if now {
            save.await;
        } else {
            self.engine.tracker.spawn(save);
        }
    }

    /// Running rows in the store are followed again. At the daemon's start
    /// (before the submitter runs) each takes a slot; after a restart of
    /// this worker alone they still hold theirs (kept by the engine).
    async fn take_up_running(&mut self) -> Result<(), StoreError> {
        let running = self
            .engine
            .store
            .call(|s| s.rows_in_state(RowState::Running, usize::MAX))
            .await?;
        let mut without_slot = 0;
        for (key, record) in running {
            let Some(task_id) = record.task_id.clone() else {
                continue;
            };
            let slot = self.engine.slots.clone().try_acquire_owned().ok();
            if !self.follow(
                key,
                task_id,
                record.submitted_at_ms.unwrap_or_else(now_ms),
                record.audio_seconds,
                slot,
            ) {
                without_slot += 1;
            }
        }
        if without_slot > 0 {
            // --max-concurrent was lowered below what runs: those run on.
            tracing::warn!(
                tasks = without_slot,
                max_concurrent = self.engine.settings.max_concurrent,
                "more tasks running than --max-concurrent allows now; they are followed to their end"
            );
        }
        self.engine.taken_up.send_replace(true);
        Ok(())
    }

    fn command(&mut self, cmd: PollCmd) {
        match cmd {
            PollCmd::Track {
                key,
                task_id,
                submitted_at_ms,
                audio_seconds,
                slot,
            } => {
                self.follow(key, task_id, submitted_at_ms, audio_seconds, slot);
            }
            PollCmd::Hint { task_id } => {
                if let Some(key) = self.engine.tracked_task(&task_id)
                    && let Some(t) = self.tasks.get_mut(&key)
                {
                    let recent = t
                        .last_poll
                        .is_some_and(|p| p.elapsed() < Duration::from_millis(200));
                    if self.next_at.contains_key(&key) && !recent {
                        t.hinted = true;
                        self.schedule(key, Instant::now());
                    }
                }
            }
        }
    }

    /// Follows a task; returns whether it holds a concurrency slot.
    fn follow(
        &mut self,
        key: RowKey,
        task_id: String,
        submitted_at_ms: u64,
        audio: Option<f64>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> bool {
        let holds = self.engine.hold_slot(key, slot);
        if self.tasks.contains_key(&key) {
            // Taken up from the store already.
            return holds;
        }
        let age = Duration::from_millis(now_ms().saturating_sub(submitted_at_ms));
        let submitted = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let t = Tracked {
            task_id: task_id.clone(),
            submitted,
            audio,
            hinted: false,
            polls: 0,
            errors: 0,
            last_poll: None,
            lost: Lost::default(),
        };
        if !self.callback_mode
            && !self.model.is_trained()
            && !self.cohort_full
            && self.scouts.len() < SCOUTS
        {
            self.scouts.insert(key);
            self.cohort_full = self.scouts.len() == SCOUTS;
        }
        let at = self.plan(key, &t);
        self.engine.track(&task_id, Some(key));
        self.tasks.insert(key, t);
        self.schedule(key, at);
        holds
    }

    fn schedule(&mut self, key: RowKey, at: Instant) {
        if let Some(old) = self.next_at.insert(key, at) {
            self.due.remove(&(old, key));
        }
        self.due.insert((at, key));
    }

    /// When to ask about a task next, by the model.
    fn plan(&self, key: RowKey, t: &Tracked) -> Instant {
        let polled = t
            .last_poll
            .map(|p| p.saturating_duration_since(t.submitted));
        let age = if self.callback_mode {
            self.model.safety_poll(polled, t.audio)
        } else if !self.model.is_trained() && !self.scouts.contains(&key) {
            // Scouts will teach the model: until one has ended this task waits.
            self.model
                .untrained_poll(polled)
                .unwrap_or_else(|| polled.unwrap_or_default() + self.engine.settings.poll_max)
        } else {
            self.model.next_poll(polled, t.audio)
        };
        (t.submitted + age).max(Instant::now())
    }

    /// A new ladder (the first one, or one for a queue that filled or
    /// emptied): every waiting task follows it, except those backing off
    /// after errors and those a callback asked about.
    fn replan_all(&mut self) {
        let keys: Vec<RowKey> = self.next_at.keys().copied().collect();
        for k in keys {
            if let Some(t) = self.tasks.get(&k).filter(|t| t.errors == 0 && !t.hinted) {
                let at = self.plan(k, t);
                self.schedule(k, at);
            }
        }
    }

    /// Starts the model once the scouts are in, re-chooses its ladders (at
    /// most every so often) and puts every waiting task on the new ones.
    fn retune(&mut self) {
        let was_trained = self.model.is_trained();
        if !was_trained && self.cohort_ended() {
            self.model.start();
        }
        if self
            .model
            .refit(limits(&self.engine, self.tasks.len()), Instant::now())
        {
            log_ladders(&self.model);
            if let Some(mean) = self.model.mean() {
                self.engine.set_mean_task_secs(mean);
            }
            if !was_trained {
                self.scouts.clear();
            }
            self.replan_all();
        }
    }

    /// Whether the scouts have taught the model enough to start it: all of
    /// them ended, or the ones left have run for over three times the
    /// longest duration seen (a stuck task must not keep the others waiting).
    fn cohort_ended(&self) -> bool {
        if self.model.samples() == 0 {
            return false;
        }
        let longest = self.model.longest().unwrap_or(0.0);
        self.scouts.iter().all(|k| {
            self.tasks
                .get(k)
                .is_none_or(|t| t.submitted.elapsed().as_secs_f64() > 3.0 * longest)
        })
    }

    fn answered(&mut self, key: RowKey, result: PollResult) {
        match result {
            PollResult::NotFound => {
                if let Some(t) = self.tasks.get_mut(&key) {
                    t.lost.answers += 1;
                    t.lost.since.get_or_insert_with(Instant::now);
                }
                self.answered(
                    key,
                    PollResult::Again {
                        errors: true,
                        wait: None,
                    },
                );
            }
            PollResult::Again { errors, wait } => {
                let settings = self.engine.settings.clone();
                let Some(t) = self.tasks.get_mut(&key) else {
                    return;
                };
                if !errors {
                    t.lost = Lost::default();
                }
                t.errors = if errors { t.errors + 1 } else { 0 };
                let delay = match wait {
                    Some(w) => w,
                    // Capped well under `poll_max` (minutes): once the API answers
                    // again, every task should be seen soon.
                    None if t.errors > 0 => backoff(
                        t.errors,
                        settings.poll_min,
                        POLL_ERROR_BACKOFF_CAP.max(settings.poll_min),
                    ),
                    None => {
                        let at = self.plan(key, &self.tasks[&key]);
                        self.schedule(key, at);
                        return;
                    }
                };
                let now = Instant::now();
                self.schedule(key, now.checked_add(delay).unwrap_or(now));
            }
            PollResult::Ended { took } => {
                self.scouts.remove(&key);
                self.engine.release_slot(key);
                let mut audio = None;
                if let Some(t) = self.tasks.remove(&key) {
                    self.engine.track(&t.task_id, None);
                    self.engine
                        .metrics
                        .polls_per_task
                        .observe(f64::from(t.polls));
                    audio = t.audio;
                }
                let first_end = self.model.samples() == 0;
                self.model.observe(took, audio);
                self.unsaved = true;
                self.retune();
                if first_end && !self.model.is_trained() {
                    // The others waited for a first duration: now they have one.
                    self.replan_all();
                }
                self.engine.work.notify_one();
            }
            PollResult::Dropped => {
                self.scouts.remove(&key);
                self.engine.release_slot(key);
                if let Some(t) = self.tasks.remove(&key) {
                    self.engine.track(&t.task_id, None);
                }
            }
        }
    }

    /// Sends the status queries that are due, each on its own task.
    fn send_due(&mut self, done_tx: &mpsc::UnboundedSender<(RowKey, PollResult)>) {
        let now = Instant::now();
        while let Some((at, key)) = self.due.first().copied() {
            if at > now {
                break;
            }
            self.due.remove(&(at, key));
            self.next_at.remove(&key);
            let Some(t) = self.tasks.get_mut(&key) else {
                continue;
            };
            t.polls += 1;
            t.hinted = false;
            tracing::trace!(task_id = %t.task_id, poll = t.polls, age_ms = t.submitted.elapsed().as_millis() as u64, "status poll");
            t.last_poll = Some(now);
            let task_id = t.task_id.clone();
            let submitted = t.submitted;
            let lost = t.lost;
            let engine = self.engine.clone();
            let wire = self.wire.clone();
            let tx = done_tx.clone();
            self.engine.tracker.spawn(async move {
                let result = tokio::select! {
                    r = poll_task(&engine, &wire, key, &task_id, submitted, lost) => r,
                    () = engine.shutdown.cancelled() => return,
                };
                let _ = tx.send((key, result));
            });
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

/// What the poll ladder is chosen for, now.
fn limits(engine: &Engine, in_flight: usize) -> Limits {
    Limits {
        in_flight: Limits::round_in_flight(in_flight),
        requests_per_sec: engine.budget.limit() as f64 / budget::WINDOW.as_secs_f64(),
        slots: engine.settings.max_concurrent as f64,
        backlog: engine.backlog.load(Ordering::Relaxed),
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
    lost: Lost,
) -> PollResult {
    let Ok(_permit) = wire.acquire().await else {
        return PollResult::Dropped;
    };
    engine.budget.acquire(Class::Poll).await;
    let status = match engine.api.status(task_id).await {
        Ok(status) => status,
        Err(ApiError::Refused { status: 404, .. }) => {
            engine.metrics.request("status", "not_found");
            return task_not_found(engine, key, task_id, lost).await;
        }
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
            match task_ended(engine, key, task_id, &status).await {
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

/// The API says it has no such task. A task it accepted can vanish (a
/// service-side loss, or the in-process simulator's restart): after
/// [`LOST_ANSWERS`] such answers over `task-lost-after`, the row is settled
/// instead of being polled for ever: failed `TASK_NOT_FOUND`, or under
/// `--simulate` (nothing was paid) queued again for a new task.
async fn task_not_found(
    engine: &Arc<Engine>,
    key: RowKey,
    task_id: &str,
    lost: Lost,
) -> PollResult {
    let answers = lost.answers + 1;
    let waited = lost.since.map_or(Duration::ZERO, |s| s.elapsed());
    let batch = engine.batch_name(key.batch);
    if answers < LOST_ANSWERS || waited < engine.settings.task_lost_after {
        tracing::warn!(batch = %batch, task_id, answers, "the API says it has no such task; will ask again");
        return PollResult::NotFound;
    }
    let msg = format!(
        "the API answered {answers} times over {} that it has no task {task_id}",
        humantime::format_duration(Duration::from_secs(waited.as_secs()))
    );
    let op = if engine.settings.simulate {
        Op::Resubmit {
            task_id: task_id.to_owned(),
            code: TASK_NOT_FOUND.into(),
            msg: msg.clone(),
            counted: false,
        }
    } else {
        Op::TaskFailed {
            task_id: task_id.to_owned(),
            code: TASK_NOT_FOUND.into(),
            msg: msg.clone(),
        }
    };
    match engine.apply(key, op).await {
        Ok(record) => {
            tracing::warn!(batch = %batch, row = %record.id, task_id, code = TASK_NOT_FOUND, msg, state = record.state.as_str(), "task lost by the API; row settled");
            PollResult::Dropped
        }
        Err(
            StoreError::WrongState { .. } | StoreError::StaleTask { .. } | StoreError::NoRow(_),
        ) => PollResult::Dropped,
        Err(e) => {
            tracing::error!(batch = %batch, task_id, error = %e, "cannot settle a lost task; will ask again");
            PollResult::NotFound
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
/// already moved on (a duplicate or late answer): the state machine refuses
/// an answer about a task the row no longer runs.
pub(crate) async fn task_ended(
    engine: &Arc<Engine>,
    key: RowKey,
    task_id: &str,
    status: &TaskStatus,
) -> Result<bool, StoreError> {
    let batch = engine.batch_name(key.batch);
    let task = task_id.to_owned();
    let op = if status.state == TaskState::Success {
        Op::Succeeded {
            task_id: task,
            result_urls: status.result_urls.clone(),
            cost_time_ms: status.cost_time_ms,
            at_ms: now_ms(),
        }
    } else {
        let code = status.fail_code.clone().unwrap_or_else(|| "UNKNOWN".into());
        let msg = status.fail_msg.clone().unwrap_or_default();
        let settings = &engine.settings;
        let credits = code == INSUFFICIENT_CREDITS;
        if credits {
            engine.set_pause(PauseReason::InsufficientCredits);
        }
        let retryable = settings.retry_fail_codes.iter().any(|c| c == &code);
        let resubmits = engine
            .store
            .call(move |s| Ok(s.live_row(key)?.map(|r| r.resubmits)))
            .await?;
        let Some(resubmits) = resubmits else {
            return Ok(false);
        };
        // Out of credits never blames the row, whatever the settings say.
        if credits || (retryable && resubmits < settings.max_resubmits) {
            Op::Resubmit {
                task_id: task,
                code,
                msg,
                counted: !credits,
            }
        } else {
            Op::TaskFailed {
                task_id: task,
                code,
                msg,
            }
        }
    };
    let record = match engine.apply(key, op.clone()).await {
        Ok(record) => record,
        Err(
            StoreError::WrongState { .. } | StoreError::StaleTask { .. } | StoreError::NoRow(_),
        ) => {
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    match op {
        Op::Succeeded { result_urls, .. } => {
            tracing::info!(batch = %batch, row = %record.id, task_id, videos = result_urls.len(), "task succeeded; downloading");
            let _ = engine.downloads.send(key);
        }
        Op::Resubmit { code, .. } if record.state.is_final() => {
            tracing::warn!(batch = %batch, row = %record.id, task_id, code = %code, "task failed on the service's side; its batch is cancelled, so the row ends CANCELLED");
        }
        Op::Resubmit { code, .. } => {
            engine.metrics.resubmitted.inc();
            tracing::warn!(
                batch = %batch, row = %record.id, task_id, code = %code,
                resubmission = record.resubmits, of = engine.settings.max_resubmits,
                "task failed on the service's side; the row will be submitted again as a new task"
            );
        }
        Op::TaskFailed { code, msg, .. } => {
            tracing::warn!(batch = %batch, row = %record.id, task_id, code = %code, msg = %msg, "task failed");
        }
        _ => {}
    }
    Ok(true)
}
