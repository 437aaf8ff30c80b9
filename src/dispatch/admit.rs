//! The admitter (`--probe` only): fresh rows of the active batches are read
//! from their manifests, their audio probed, and let into the queue with
//! their length ([`Store::admit`](crate::store::Store::admit)), a window
//! ahead of submission and without holding a slot. The store keeps a
//! batch's queued rows of known length longest first, and the submitter
//! takes them in that order: the long tasks start early, and the batch's
//! tail (its last tasks ending one by one while slots idle) is made of short
//! ones.
//!
//! The window is a few rows per slot of each batch's share of the slots
//! (by priority weight, as in the submitter's rounds; at least
//! [`MIN_WINDOW`], at most [`MAX_WINDOW`] rows), so the rows waiting in the
//! database stay bounded by the slots, not the batch. A row whose audio
//! cannot be read is admitted to be probed again later (one round counted);
//! one whose audio is bad ends `failed`, never sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::spend::{self, PROBE_ROUNDS};
use super::{Engine, after_failure};
use crate::manifest::RowReader;
use crate::store::{
    Admission, AdmittedAudio, BatchPhase, BatchRecord, BatchSeq, RowKey, RowState, StoreError,
};
use crate::supervisor::Beat;

/// Rows of one batch probed and admitted together.
const GROUP: usize = 32;
/// Queued rows a batch may have per slot of its share. Longest first
/// shortens the tail only if, when the manifest runs out, the rows still
/// waiting are enough short work to keep every slot busy while the last
/// long tasks run: about the slots times the longest task over a short one.
const WINDOW_PER_SLOT: u64 = 4;
/// Fewest rows a batch may have waiting in the queue.
const MIN_WINDOW: u64 = 64;
/// Most rows a batch may have waiting in the queue.
const MAX_WINDOW: u64 = 4096;

/// How many queued rows a batch of priority weight `weight` may have, of
/// `weights` (the sum over the batches that share `slots` slots): its share
/// of the slots follows its weight, as in the submitter's rounds.
pub fn window(slots: u32, weight: usize, weights: usize) -> u64 {
    let per_slot = u64::from(slots) * WINDOW_PER_SLOT;
    let share = per_slot * weight as u64 / weights.max(1) as u64;
    share.clamp(MIN_WINDOW, MAX_WINDOW)
}

/// The admitter's own state; rebuilt from the store when it restarts.
pub struct Admitter {
    engine: Arc<Engine>,
    beat: Beat,
    /// Each batch's manifest, open at the row after its cursor.
    readers: HashMap<BatchSeq, RowReader>,
    failures: u32,
}

impl Admitter {
    pub fn new(engine: Arc<Engine>, beat: Beat) -> Admitter {
        Admitter {
            engine,
            beat,
            readers: HashMap::new(),
            failures: 0,
        }
    }

    /// Runs until the engine stops; returns at once without `--probe`.
    pub async fn run(mut self) {
        let engine = self.engine.clone();
        if !engine.settings.probe {
            return;
        }
        loop {
            self.beat.tick();
            if engine.shutdown.is_cancelled() {
                break;
            }
            match self.round().await {
                Ok(0) => {
                    self.failures = 0;
                    // Claims, new batches and resumes wake it; the timeout
                    // covers anything else that frees room.
                    let idle =
                        tokio::time::timeout(Duration::from_secs(1), engine.admit.notified());
                    if self.beat.wait(&engine.shutdown, idle).await.is_none() {
                        break;
                    }
                }
                Ok(_) => self.failures = 0,
                Err(e) => {
                    self.readers.clear();
                    tracing::error!(error = %e, "cannot admit rows; retrying");
                    if !after_failure(&engine, &mut self.failures).await {
                        break;
                    }
                }
            }
        }
    }

    /// Tops up every batch's window by up to a group; returns how many rows
    /// it admitted.
    async fn round(&mut self) -> Result<usize, AdmitError> {
        let engine = self.engine.clone();
        let mut readers = std::mem::take(&mut self.readers);
        let read = tokio::task::spawn_blocking(move || {
            let groups = read_groups(&engine, &mut readers);
            (readers, groups)
        })
        .await;
        let (readers, groups) = read.map_err(|e| AdmitError::Store(e.into()))?;
        self.readers = readers;
        let groups = groups?;
        if groups.is_empty() {
            return Ok(0);
        }
        let engine = &self.engine;
        let probed = futures_util::future::join_all(groups.into_iter().map(|a| async move {
            let key = RowKey::at(a.batch, a.row.index);
            let audio = match spend::audio_length(engine, key, &a.row.spec).await {
                Ok(seconds) => AdmittedAudio::Seconds(seconds),
                Err(e) if e.is_transient() && PROBE_ROUNDS > 1 => AdmittedAudio::NotYet,
                Err(e) => AdmittedAudio::Bad {
                    code: e.fail_code().to_owned(),
                    msg: spend::probe_failure_msg(&e),
                },
            };
            Admission { audio, ..a }
        }));
        let Some(admissions) = self.beat.wait(&engine.shutdown, probed).await else {
            return Ok(0);
        };
        let mut n = 0;
        // One transaction a batch: a batch paused or cancelled meanwhile
        // refuses its own rows, not the others'.
        for rows in admissions.chunk_by(|a, b| a.batch == b.batch) {
            let seq = rows[0].batch;
            // Held before they are in the queue, so that no claim comes first.
            let wait = spend::probe_wait(0);
            for a in rows.iter().filter(|a| a.audio == AdmittedAudio::NotYet) {
                engine.hold_probe(RowKey::at(a.batch, a.row.index), wait);
            }
            let rows = rows.to_vec();
            let admitted = match engine.store.call(move |s| s.admit(&rows)).await {
                Ok(admitted) => admitted,
                Err(StoreError::WrongState { key, found, .. }) => {
                    // Nothing of it was admitted; its cursor is the truth.
                    self.readers.remove(&seq);
                    tracing::debug!(%key, found, "admission refused; reading again");
                    continue;
                }
                Err(e) => {
                    self.readers.clear();
                    return Err(e.into());
                }
            };
            n += admitted.len();
            for (key, record) in &admitted {
                let batch = engine.batch_name(key.batch);
                match (&record.state, record.audio_seconds) {
                    (RowState::Failed, _) => {
                        let code = record.fail_code.as_deref().unwrap_or_default();
                        let msg = record.fail_msg.as_deref().unwrap_or_default();
                        tracing::warn!(batch = %batch, row = %record.id, code, msg, "row failed");
                    }
                    (_, None) => {
                        tracing::warn!(batch = %batch, row = %record.id, wait = ?wait, "cannot read the audio's length; the row waits in the queue");
                    }
                    _ => {}
                }
                engine.after(*key, record);
            }
        }
        Ok(n)
    }
}

/// The next rows of every batch whose window has room, read from the
/// manifests (on a blocking thread); `audio` is filled in by the probes.
fn read_groups(
    engine: &Engine,
    readers: &mut HashMap<BatchSeq, RowReader>,
) -> Result<Vec<Admission>, AdmitError> {
    let active = engine.store.active_batches()?;
    let open = |b: &&BatchRecord| {
        b.phase == BatchPhase::Active && !b.cancelled && !b.paused && b.unclaimed() > 0
    };
    let open: Vec<&BatchRecord> = active.iter().filter(open).collect();
    readers.retain(|seq, _| open.iter().any(|b| b.seq == *seq));
    let weights: usize = open.iter().map(|b| b.priority.weight()).sum();
    let mut out = Vec::new();
    for b in open {
        let window = window(engine.settings.max_concurrent, b.priority.weight(), weights);
        let room = window.saturating_sub(b.counts.queued).min(GROUP as u64);
        if room == 0 {
            continue;
        }
        let read = b.cursor.map_or(0, |c| c.rows_read);
        let reader = match readers.entry(b.seq) {
            std::collections::hash_map::Entry::Occupied(e) if e.get().rows_read() == read => {
                e.into_mut()
            }
            entry => {
                // New, or the cursor moved by another hand (a cancel).
                let reader = RowReader::open(&engine.folders.manifest_of(&b.name), b.cursor)?;
                match entry {
                    std::collections::hash_map::Entry::Occupied(mut e) => {
                        e.insert(reader);
                        e.into_mut()
                    }
                    std::collections::hash_map::Entry::Vacant(v) => v.insert(reader),
                }
            }
        };
        for _ in 0..room {
            let Some((row, next)) = reader.next_row()? else {
                break;
            };
            out.push(Admission {
                batch: b.seq,
                row,
                next,
                audio: AdmittedAudio::NotYet,
            });
        }
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
enum AdmitError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_a_share_of_the_slots_within_bounds() {
        // Alone, four rows a slot.
        assert_eq!(window(100, 2, 2), 400);
        assert_eq!(window(1000, 2, 2), 4000);
        // Shared by weight: high (4) beside normal (2) beside low (1).
        assert_eq!(window(700, 4, 7), 1600);
        assert_eq!(window(700, 2, 7), 800);
        assert_eq!(window(700, 1, 7), 400);
        // Within bounds.
        assert_eq!(window(1000, 1, 200), MIN_WINDOW);
        assert_eq!(window(2000, 2, 2), MAX_WINDOW);
        assert_eq!(window(100, 2, 0), 800);
    }
}
