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

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
        let manifest = batch_dir.join(crate::ingest::MANIFEST_NAME);
        s3.upload_file(&manifest, &s3.key(batch, crate::ingest::MANIFEST_NAME))
            .await?;
        let name = results
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        s3.upload_file(results, &s3.key(batch, &name)).await?;
        Ok(())
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
