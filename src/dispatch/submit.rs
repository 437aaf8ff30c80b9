//! The submit worker: queued rows become tasks while slots, the request
//! budget, the spend cap and the pause allow.
//!
//! Rows are read ahead ([`Feed`]) from the rows queued again and from the
//! active batches' manifests (by cursor), claimed in groups (marked
//! `submitting` and flushed: the write-ahead mark), then each is sent by its
//! own task ([`submit_row`]) that holds its slot until the poller takes it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

use super::budget::Class;
use super::poll::PollCmd;
use super::{Engine, after_failure, backoff, sleep_or_stop, spend};
use crate::api::{ApiError, PauseReason, SubmitBody};
use crate::ingest::Folders;
use crate::manifest::RowReader;
use crate::store::{
    BatchPhase, BatchRecord, BatchSeq, Claim, Op, RowKey, RowRecord, RowState, Store, now_ms,
};
use crate::supervisor::Beat;

/// Most rows claimed (and flushed) together.
const CLAIM_GROUP: usize = 32;

/// The submit worker's own state; rebuilt from the store when it restarts.
pub struct Submitter {
    engine: Arc<Engine>,
    beat: Beat,
    feed: Feed,
    failures: u32,
    /// Submission waits for downloads to catch up (logged once a spell).
    download_wait: bool,
}

impl Submitter {
    pub fn new(engine: Arc<Engine>, beat: Beat) -> Submitter {
        Submitter {
            feed: Feed::new(engine.settings.probe),
            engine,
            beat,
            failures: 0,
            download_wait: false,
        }
    }

    /// Runs until the engine stops.
    pub async fn run(mut self) {
        let engine = self.engine.clone();
        let mut cap = engine.spend_cap.subscribe();
        // The running tasks take their slots first (guarantee 3 across restarts).
        let mut taken_up = engine.taken_up.subscribe();
        if self
            .beat
            .wait(&engine.shutdown, taken_up.wait_for(|t| *t))
            .await
            .is_none()
        {
            return;
        }
        loop {
            self.beat.tick();
            if engine.shutdown.is_cancelled() {
                break;
            }
            if engine.paused() == Some(PauseReason::SpendCap) {
                // Asking the API helps nothing here: only a new cap does.
                let Some(changed) = self.beat.wait(&engine.shutdown, cap.changed()).await else {
                    break;
                };
                if changed.is_err() {
                    break;
                }
                if engine.pause.send_replace(None).is_some() {
                    tracing::info!(cap_usd = ?*cap.borrow(), "spend cap changed; submission resumes");
                }
                continue;
            }
            if engine.paused() == Some(PauseReason::ObjectStore) {
                // Only the store coming back helps (`outbox::health_worker`
                // probes it); a row submitted now would be paid for and
                // its video could not be kept.
                let mut pause = engine.pause.subscribe();
                let changed = tokio::time::timeout(Duration::from_secs(1), pause.changed());
                if self.beat.wait(&engine.shutdown, changed).await.is_none() {
                    break;
                }
                continue;
            }
            let probing = engine.paused().is_some();
            if probing {
                // Paused: try one row now and then; its answer decides.
                if !sleep_or_stop(&engine, engine.settings.pause_probe).await {
                    break;
                }
                if engine.paused().is_none() {
                    continue;
                }
            }
            let Some(Ok(slot)) = self
                .beat
                .wait(&engine.shutdown, engine.slots.clone().acquire_owned())
                .await
            else {
                break;
            };
            match self.fill().await {
                Ok(_) if self.feed.downloading >= engine.settings.max_concurrent.into() => {
                    // Downloads lag behind the tasks: more tasks would only
                    // grow the rows waiting for their files (and the live
                    // state). Wait until the downloads catch up.
                    drop(slot);
                    if !self.download_wait {
                        self.download_wait = true;
                        tracing::info!(
                            downloading = self.feed.downloading,
                            "downloads lag behind; submission waits until fewer rows are downloading"
                        );
                    }
                    if !sleep_or_stop(&engine, Duration::from_millis(250)).await {
                        break;
                    }
                    continue;
                }
                Ok(0) => {
                    drop(slot);
                    engine.backlog.store(false, Ordering::Relaxed);
                    let idle = tokio::time::timeout(Duration::from_secs(2), engine.work.notified());
                    if self.beat.wait(&engine.shutdown, idle).await.is_none() {
                        break;
                    }
                    continue;
                }
                Ok(_) => {
                    engine.backlog.store(true, Ordering::Relaxed);
                    self.failures = 0;
                    self.download_wait = false;
                }
                Err(e) => {
                    drop(slot);
                    self.feed.reset();
                    tracing::error!(error = %e, "cannot read queued rows; retrying");
                    if !after_failure(&engine, &mut self.failures).await {
                        break;
                    }
                    continue;
                }
            }
            let counted = Instant::now();
            if self
                .beat
                .wait(&engine.shutdown, engine.budget.acquire(Class::Submit))
                .await
                .is_none()
            {
                break;
            }
            let mut group = vec![(slot, self.feed.pop())];
            while !probing && group.len() < CLAIM_GROUP && !self.feed.is_empty() {
                let Ok(slot) = engine.slots.clone().try_acquire_owned() else {
                    break;
                };
                if !engine.budget.try_acquire() {
                    break;
                }
                group.push((slot, self.feed.pop()));
            }
            let (group, outcomes) = spend::plan(&engine, &mut self.feed, group).await;
            if group.is_empty() {
                continue;
            }
            let e2 = engine.clone();
            let claimed = tokio::task::spawn_blocking(move || {
                let claims: Vec<Claim> = group.iter().map(|(_, c)| c.clone()).collect();
                let claimed = e2.store.claim(&claims)?;
                let send = spend::apply(&e2, group, claimed, outcomes)?;
                // Without the write-ahead mark on disk nothing may be sent.
                e2.store.flush_blocking()?;
                Ok::<_, crate::store::StoreError>(send)
            })
            .await;
            let send = match claimed {
                Ok(Ok(send)) => {
                    // They go now, after the flush: count them from now.
                    engine.budget.restamp_since(counted);
                    // They left the queue: there is room for more.
                    engine.admit.notify_one();
                    send
                }
                Ok(Err(e)) => {
                    // Rows already marked stay `submitting`: the next start
                    // queues them again.
                    tracing::error!(error = %e, "cannot claim rows for submission; retrying");
                    self.feed.reset();
                    if !sleep_or_stop(&engine, Duration::from_secs(1)).await {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "claiming rows panicked; retrying");
                    self.feed.reset();
                    continue;
                }
            };
            for (slot, key, record) in send {
                if probing {
                    submit_row(engine.clone(), key, record, slot).await;
                } else {
                    engine
                        .tracker
                        .spawn(submit_row(engine.clone(), key, record, slot));
                }
            }
        }
    }

    /// Reads ahead up to a group of rows, on a blocking thread (sled and the
    /// manifests are read there).
    async fn fill(&mut self) -> Result<usize, FeedError> {
        // A panic below loses what was read ahead, never the mode.
        let fresh = Feed::new(self.engine.settings.probe);
        let mut feed = std::mem::replace(&mut self.feed, fresh);
        feed.not_before.extend(self.engine.take_probe_holds());
        let engine = self.engine.clone();
        let (feed, filled) = tokio::task::spawn_blocking(move || {
            let filled = feed.fill(&engine.store, &engine.folders, CLAIM_GROUP);
            (feed, filled)
        })
        .await
        .map_err(|e| FeedError::Store(e.into()))?;
        self.feed = feed;
        filled
    }
}

/// Queued rows read from the store per batch at a time (beyond those the
/// feed holds already).
const QUEUED_READ: usize = 64;

/// Rows read ahead from the store and the manifests, not yet claimed.
#[derive(Default)]
pub(super) struct Feed {
    pending: VecDeque<Claim>,
    readers: HashMap<BatchSeq, RowReader>,
    /// Queued rows read from the store, per batch, in the order they are to
    /// go ([`Store::queued_rows`]), not yet pending.
    queued: HashMap<BatchSeq, VecDeque<RowKey>>,
    /// Every queued row the feed holds, in `queued` or `pending`.
    queued_keys: HashSet<RowKey>,
    /// Rows of the active batches waiting for their files, at the last fill.
    downloading: u64,
    /// Which batch goes first in the next round.
    turn: usize,
    /// The batches that could give rows at the last fill.
    eligible: Vec<BatchSeq>,
    /// Rows queued again that are not to be claimed before a time (their
    /// audio could not be read). At most one entry a queued row; an entry
    /// goes when its time has come.
    not_before: HashMap<RowKey, Instant>,
    /// Fresh rows enter the queue through the admitter (`--probe`): the
    /// feed takes queued rows only.
    admitted: bool,
}

impl Feed {
    pub(super) fn new(admitted: bool) -> Feed {
        Feed {
            admitted,
            ..Feed::default()
        }
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Puts claims taken but not used back at the front, in order.
    pub(super) fn unpop(&mut self, claims: Vec<Claim>) {
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

    /// Keeps `key` (about to be queued again) out of the next claims for `wait`.
    pub(super) fn hold(&mut self, key: RowKey, wait: Duration) {
        self.not_before.insert(key, Instant::now() + wait);
    }

    /// Forgets read-ahead rows (after an error the store is the truth).
    fn reset(&mut self) {
        self.pending.clear();
        self.readers.clear();
        self.queued.clear();
        self.queued_keys.clear();
    }

    /// Reads ahead up to `want` rows; returns how many are pending. The
    /// active batches share them in rounds, each taking up to its
    /// priority's weight of rows a round, starting one batch further on
    /// each time, so a small batch dropped behind a large one starts at
    /// once. A batch gives its queued rows first (in the store's order:
    /// rows queued again without a known length, then the longest), then
    /// rows read from its manifest (without `--probe`).
    fn fill(&mut self, store: &Store, folders: &Folders, want: usize) -> Result<usize, FeedError> {
        let active = store.active_batches()?;
        self.downloading = active.iter().map(|b| b.counts.downloading).sum();
        let admitted = self.admitted;
        let can_give = |b: &BatchRecord| {
            b.phase == BatchPhase::Active
                && !b.cancelled
                && !b.paused
                && (b.counts.queued > 0 || (!admitted && b.unclaimed() > 0))
        };
        let eligible: Vec<&BatchRecord> = active.iter().filter(|b| can_give(b)).collect();
        let now_eligible: Vec<BatchSeq> = eligible.iter().map(|b| b.seq).collect();
        if now_eligible.iter().any(|s| !self.eligible.contains(s)) {
            // A batch just became active: rows read ahead would make it wait
            // behind them. Nothing read ahead is claimed yet, so it can be
            // read again, in rounds that include the newcomer.
            self.reset();
        }
        self.eligible = now_eligible;
        if self.pending.len() >= want {
            return Ok(self.pending.len());
        }
        let now = Instant::now();
        self.not_before.retain(|_, until| *until > now);
        self.readers
            .retain(|seq, _| eligible.iter().any(|b| b.seq == *seq));
        let gone: Vec<BatchSeq> = self
            .queued
            .keys()
            .filter(|seq| !eligible.iter().any(|b| b.seq == **seq))
            .copied()
            .collect();
        for seq in gone {
            for key in self.queued.remove(&seq).unwrap_or_default() {
                self.queued_keys.remove(&key);
            }
        }
        if eligible.is_empty() {
            return Ok(self.pending.len());
        }
        self.turn = self.turn.wrapping_add(1);
        let start = self.turn % eligible.len();
        // High before normal before low within a round; among batches of one
        // priority, a different one goes first each round.
        let mut order: Vec<usize> = (0..eligible.len()).collect();
        order.sort_by_key(|&i| {
            let rotated = (i + eligible.len() - start) % eligible.len();
            (std::cmp::Reverse(eligible[i].priority.weight()), rotated)
        });
        let mut exhausted = vec![false; eligible.len()];
        // Batches whose queued rows in the store are all held already.
        let mut drained = vec![false; eligible.len()];
        while self.pending.len() < want && exhausted.iter().any(|e| !e) {
            for &i in &order {
                if exhausted[i] || self.pending.len() >= want {
                    continue;
                }
                for _ in 0..eligible[i].priority.weight() {
                    match self.next_of(eligible[i], &mut drained[i], store, folders)? {
                        Some(claim) => self.pending.push_back(claim),
                        None => {
                            exhausted[i] = true;
                            break;
                        }
                    }
                }
            }
        }
        Ok(self.pending.len())
    }

    /// The next row batch `b` gives: a queued one, else (without the
    /// admitter) the next one of its manifest.
    fn next_of(
        &mut self,
        b: &BatchRecord,
        drained: &mut bool,
        store: &Store,
        folders: &Folders,
    ) -> Result<Option<Claim>, FeedError> {
        if !*drained
            && b.counts.queued > 0
            && self.queued.get(&b.seq).is_none_or(VecDeque::is_empty)
        {
            // Rows the feed holds or that wait out a probe are skipped.
            let skip = self.queued_keys.len() + self.not_before.len();
            let mut found = 0;
            for (row, _) in store.queued_rows(b.seq, QUEUED_READ + skip)? {
                let key = RowKey { batch: b.seq, row };
                if !self.not_before.contains_key(&key) && self.queued_keys.insert(key) {
                    self.queued.entry(b.seq).or_default().push_back(key);
                    found += 1;
                }
            }
            *drained = found == 0;
        }
        if let Some(key) = self.queued.get_mut(&b.seq).and_then(VecDeque::pop_front) {
            return Ok(Some(Claim::Again(key)));
        }
        if self.admitted {
            return Ok(None);
        }
        let reader = match self.readers.entry(b.seq) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let path = folders.manifest_of(&b.name);
                v.insert(RowReader::open(&path, b.cursor)?)
            }
        };
        Ok(reader.next_row()?.map(|(row, next)| Claim::Fresh {
            batch: b.seq,
            row,
            next,
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum FeedError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
}

/// Fail code of a row whose submits stayed ambiguous past the bound.
pub const SUBMIT_UNCONFIRMED: &str = "SUBMIT_UNCONFIRMED";

/// Submits one claimed row until the API answers for it.
///
/// A request on the wire is never cut short, not even by a stop: the service
/// may create the task anyway, so the answer (or the API timeout, which
/// makes the submit ambiguous) is awaited. A stop between attempts puts the
/// row back in the queue; the row never stays `submitting` after a graceful
/// stop.
async fn submit_row(
    engine: Arc<Engine>,
    key: RowKey,
    mut record: RowRecord,
    slot: OwnedSemaphorePermit,
) {
    let batch = engine.batch_name(key.batch);
    let callback_url = engine.callback_url.clone();
    // Local files: checked to hold the validated bytes, then published.
    // A file that changed fails the row here, before anything is paid.
    let spec = match engine.media.prepare(key, &record.spec).await {
        Ok(spec) => spec,
        Err(e) if e.is_transient() => {
            // The media store is down: nothing was sent; the row goes back
            // to the queue and submission pauses until the store is back.
            drop(slot);
            tracing::error!(batch = %batch, row = %record.id, error = %e, "cannot publish the row's local files; it stays queued and submission pauses");
            engine.object_store_down();
            unsent(&engine, key, &record, &batch).await;
            return;
        }
        Err(e) => {
            refund(&engine, &record).await;
            drop(slot);
            if let Err(se) = engine
                .fail_row(key, RowState::Submitting, e.fail_code(), &e.to_string())
                .await
            {
                tracing::error!(batch = %batch, row = %record.id, error = %se, "cannot record a row whose local media changed");
            }
            return;
        }
    };
    let body = SubmitBody::new(&spec, &engine.settings.defaults, callback_url.as_deref());
    let mut attempt = 0u32;
    loop {
        if attempt > 0 {
            tokio::select! {
                () = engine.budget.acquire(Class::Submit) => {}
                () = engine.shutdown.cancelled() => {}
            }
        }
        if engine.shutdown.is_cancelled() {
            // Not sent: back in the queue for the next start.
            unsent(&engine, key, &record, &batch).await;
            return;
        }
        attempt += 1;
        match engine.api.submit(&body).await {
            Ok(task_id) => {
                engine.metrics.request("submit", "ok");
                engine.metrics.tasks_submitted.inc();
                engine.clear_pause();
                let submitted_at_ms = now_ms();
                let op = Op::TaskCreated {
                    task_id: task_id.clone(),
                    at_ms: submitted_at_ms,
                };
                let saved = engine
                    .store
                    .call(move |s| {
                        s.apply(key, op)?;
                        s.flush_blocking()
                    })
                    .await;
                if let Err(e) = saved {
                    tracing::error!(batch = %batch, row = %record.id, task_id, error = %e, "cannot record the task id");
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
            Err(e) if e.is_ambiguous() => {
                engine.metrics.request("submit", "ambiguous");
                let Some(counted) = ambiguous(&engine, key, &record, &batch, &e).await else {
                    return;
                };
                record = counted;
                let max = engine.settings.max_ambiguous_submits;
                if record.ambiguous_submits > max {
                    // The reservation for a further attempt is not needed.
                    refund(&engine, &record).await;
                    let msg = format!(
                        "{} submits sent whose answer was lost or unreadable (each may have created a task, counted as paid); not sent again: {e}",
                        record.ambiguous_submits
                    );
                    if let Err(se) = engine
                        .fail_row(key, RowState::Submitting, SUBMIT_UNCONFIRMED, &msg)
                        .await
                    {
                        tracing::error!(batch = %batch, row = %record.id, error = %se, "cannot record an unconfirmed row");
                    }
                    return;
                }
                if over_cap(&engine).await {
                    // The possible task took the room the next attempt had.
                    unsent(&engine, key, &record, &batch).await;
                    engine.set_pause(PauseReason::SpendCap);
                    return;
                }
                let wait = backoff(attempt, Duration::from_millis(500), Duration::from_secs(60));
                if !sleep_or_stop(&engine, wait).await {
                    unsent(&engine, key, &record, &batch).await;
                    return;
                }
            }
            Err(e) => {
                if let Some(reason) = e.pause_reason() {
                    engine.metrics.request("submit", "paused");
                    engine.set_pause(reason);
                    unsent(&engine, key, &record, &batch).await;
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
                        unsent(&engine, key, &record, &batch).await;
                        return;
                    }
                    continue;
                }
                engine.metrics.request("submit", "refused");
                refund(&engine, &record).await;
                let msg = match &e {
                    ApiError::Refused { message, .. } => message.clone(),
                    other => other.to_string(),
                };
                if let Err(se) = engine
                    .fail_row(key, RowState::Submitting, &e.fail_code(), &msg)
                    .await
                {
                    tracing::error!(batch = %batch, row = %record.id, error = %se, "cannot record a refused row");
                }
                return;
            }
        }
    }
}

/// Counts an ambiguous submit: on the row, in the totals (`status`,
/// `/metrics`) and in the spend (as paid), flushed; logged. `None` when the
/// store refused (the row then stays `submitting` and is queued again with a
/// warning at the next start).
async fn ambiguous(
    engine: &Engine,
    key: RowKey,
    record: &RowRecord,
    batch: &str,
    e: &ApiError,
) -> Option<RowRecord> {
    engine.metrics.submits_ambiguous.inc();
    let usd = spend::counted_cost(engine, record);
    let seconds = record.audio_seconds.unwrap_or(0.0);
    let recorded = engine
        .store
        .call(move |s| {
            let counted = s.record_ambiguous(key, usd, seconds)?;
            s.flush_blocking()?;
            Ok(counted)
        })
        .await;
    match recorded {
        Ok((record, totals)) => {
            engine
                .metrics
                .rows_possibly_paid_twice
                .set(i64::try_from(totals.rows).unwrap_or(i64::MAX));
            tracing::warn!(
                batch, row = %record.id, ambiguous = record.ambiguous_submits,
                of = engine.settings.max_ambiguous_submits, counted_usd = format!("{usd:.2}"),
                error = %e,
                "submit sent but its answer was lost or unreadable: a task may have been created and is counted as paid"
            );
            Some(record)
        }
        Err(se) => {
            tracing::error!(batch, row = %record.id, error = %se, "cannot record an ambiguous submit; the row is queued again at the next start");
            None
        }
    }
}

/// The spend is past the cap (an ambiguous submit counted as paid may do that).
async fn over_cap(engine: &Engine) -> bool {
    let Some(cap) = *engine.spend_cap.borrow() else {
        return false;
    };
    match engine.store.call(|s| s.spend()).await {
        Ok(spent) => spent.usd > cap + 1e-9,
        Err(_) => false,
    }
}

/// A row that went back without a task costs nothing.
async fn refund(engine: &Engine, record: &RowRecord) {
    let usd = spend::counted_cost(engine, record);
    let seconds = record.audio_seconds.unwrap_or(0.0);
    if let Err(e) = engine
        .store
        .call(move |s| s.add_spend(-usd, -seconds))
        .await
    {
        tracing::error!(row = %record.id, error = %e, "cannot refund a row's cost");
    }
}

/// Puts a row that was not sent back in the queue, refunded.
async fn unsent(engine: &Engine, key: RowKey, record: &RowRecord, batch: &str) {
    refund(engine, record).await;
    if let Err(e) = engine.apply(key, Op::Unsent).await {
        tracing::error!(batch, row = %record.id, error = %e, "cannot queue a row again");
    }
}
