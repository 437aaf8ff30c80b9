//! Where results land: a local folder (`--outbox DIR`) or an object store
//! (`--outbox s3://bucket/prefix`).
//!
//! The rest of the daemon writes every file it produces into a local batch
//! folder first (videos through their `.part` files, `manifest.csv`,
//! `results.csv`); with a local outbox that folder *is* the outbox and
//! publishing is nothing. With an object store the local folder lives under
//! the state folder (`STATE/outbox/`: only what is being transferred, and the
//! working copy of each manifest the submitter reads rows from), and each
//! finished file is streamed to the store with a multipart upload, so no
//! object appears under its final key before it is complete; its length is
//! checked after.
//!
//! Must never: log or show a credential or a presigned URL; fail a row
//! because the store is down (the row waits, and submission pauses: videos
//! that cannot be stored are not paid for).

pub(crate) mod health;
mod s3;
pub(crate) mod transfer;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::BatchSeq;

pub use self::s3::{S3Outbox, StoreTarget};

/// Why publishing to the outbox failed. Always transient for the row: the
/// row waits and the operation is retried.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The object store refused or could not be reached.
    #[error("object store s3://{bucket}: {op} {key} failed: {message}")]
    Store {
        bucket: String,
        op: &'static str,
        key: String,
        message: String,
    },
    /// An upload finished but the object does not hold what was sent.
    #[error("object store s3://{bucket}: {key} holds {got} bytes after upload, expected {want}")]
    Length {
        bucket: String,
        key: String,
        got: u64,
        want: u64,
    },
    /// Reading the local file to upload failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The outbox of a running daemon.
#[derive(Debug, Clone)]
pub enum Outbox {
    /// Files are final where the daemon writes them.
    Local,
    /// Files are uploaded from the local staging folder.
    S3(Arc<S3Outbox>),
}

impl Outbox {
    pub fn store(&self) -> Option<&Arc<S3Outbox>> {
        match self {
            Outbox::Local => None,
            Outbox::S3(s3) => Some(s3),
        }
    }

    /// Publishes the finished batch files (`manifest.csv`, then
    /// `results.csv`, which must come last) from `batch_dir`.
    pub async fn publish_batch_files(
        &self,
        batch: &str,
        batch_dir: &Path,
        results: &Path,
    ) -> Result<(), OutboxError> {
        let Outbox::S3(s3) = self else {
            return Ok(());
        };
        s3.put_manifest(batch, batch_dir).await?;
        let name = results
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        s3.upload_file(results, &s3.key(batch, &name)).await?;
        Ok(())
    }
}

/// `manifest.csv` of batches still running, put in the object store soon
/// after acceptance (it is put again, with `results.csv`, at the end): what
/// an operator looking at the bucket expects to find beside the first
/// videos. One upload at a time, in a task of its own, so that a store
/// that hangs never holds up the finisher; in memory, so after a restart
/// each is put once more.
#[derive(Debug, Default, Clone)]
pub struct EarlyManifests(Arc<Mutex<Early>>);

#[derive(Debug, Default)]
struct Early {
    /// Batches whose manifest is in the store.
    done: HashSet<BatchSeq>,
    /// Batches whose upload failed, and when to try again.
    retry_at: HashMap<BatchSeq, Instant>,
    /// The batch whose manifest is being put, and whether it finished
    /// meanwhile (then nothing is to be remembered of it).
    busy: Option<(BatchSeq, bool)>,
}

/// Wait before putting a manifest again after a failure (the store down).
const EARLY_RETRY: Duration = Duration::from_secs(60);

impl EarlyManifests {
    fn lock(&self) -> MutexGuard<'_, Early> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts putting batch `seq`'s manifest from `batch_dir`, unless it is
    /// in the store, waiting after a failure, or another upload runs. The
    /// upload is a task of `tracker` that `stop` ends; a failure is logged,
    /// never fatal (the end puts the manifest anyway).
    pub fn publish(
        &self,
        outbox: &Outbox,
        tracker: &TaskTracker,
        stop: &CancellationToken,
        seq: BatchSeq,
        batch: &str,
        batch_dir: &Path,
    ) {
        let Outbox::S3(s3) = outbox else { return };
        {
            let mut early = self.lock();
            let waiting = early
                .retry_at
                .get(&seq)
                .is_some_and(|t| *t > Instant::now());
            if early.busy.is_some() || early.done.contains(&seq) || waiting {
                return;
            }
            early.busy = Some((seq, false));
        }
        let (this, s3, stop) = (self.clone(), s3.clone(), stop.clone());
        let (batch, batch_dir) = (batch.to_owned(), batch_dir.to_owned());
        tracker.spawn(async move {
            let put = tokio::select! {
                () = stop.cancelled() => None,
                put = s3.put_manifest(&batch, &batch_dir) => Some(put),
            };
            let mut early = this.lock();
            let finished = early.busy.take().is_some_and(|(_, finished)| finished);
            match put {
                Some(Ok(_)) if !finished => {
                    early.retry_at.remove(&seq);
                    early.done.insert(seq);
                }
                Some(Err(e)) if !finished => {
                    tracing::warn!(batch, error = %e, retry_in = ?EARLY_RETRY, "cannot put manifest.csv in the object store yet; it goes with results.csv at the end if not before");
                    early
                        .retry_at
                        .insert(seq, Instant::now() + EARLY_RETRY);
                }
                _ => {}
            }
        });
    }

    /// Forgets a finished batch.
    pub fn forget(&self, seq: BatchSeq) {
        let mut early = self.lock();
        early.done.remove(&seq);
        early.retry_at.remove(&seq);
        if let Some((busy, finished)) = early.busy.as_mut()
            && *busy == seq
        {
            *finished = true;
        }
    }
}

/// Where the local working files of an object-store outbox live.
pub fn staging_dir(state: &Path) -> PathBuf {
    state.join("outbox")
}

/// Where downloads bound for an object store are kept while they transfer.
pub fn transfers_dir(state: &Path) -> PathBuf {
    state.join("transfers")
}
