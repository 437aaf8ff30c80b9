//! A video bound for an object-store outbox: downloaded into a transfer file
//! under `STATE/transfers/BATCH/TASK/NAME` (resumable, length-checked, the
//! same code as a local outbox's download), then streamed to
//! `prefix/BATCH/NAME` with a multipart upload, recorded with its task, and
//! only then removed from the local disk.
//!
//! After a `kill -9` at any point: a `.part` resumes with `Range`; a
//! complete transfer file is uploaded (again, if the first upload finished
//! but was not yet recorded: the same bytes under the same key), never
//! downloaded again; an upload cut short left no object under the final key
//! (an open multipart upload is not an object). An object already under the
//! key is not taken on its length alone: one left by an earlier task of the
//! row may have the very same length.

use std::path::{Path, PathBuf};

use super::S3Outbox;
use crate::dispatch::Engine;
use crate::download::{DownloadError, fetch_one};
use crate::store::{Op, RowKey};

/// The transfer file of `name` of `task_id` in `batch`.
pub(crate) fn transfer_path(state: &Path, batch: &str, task_id: &str, name: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = crate::ingest::hex(&Sha256::digest(task_id.as_bytes()));
    super::transfers_dir(state)
        .join(batch)
        .join(&digest[..16])
        .join(name)
}

/// Puts result `name` of the row's task into the store, unless it is
/// recorded there already.
pub(crate) async fn store_one(
    engine: &Engine,
    s3: &S3Outbox,
    key: RowKey,
    batch: &str,
    task_id: &str,
    name: &str,
    url: &str,
) -> Result<(), DownloadError> {
    let local = transfer_path(&engine.settings.state, batch, task_id, name);
    let dir = local.parent().unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|source| DownloadError::Disk {
            path: dir.to_owned(),
            source,
        })?;
    let complete = tokio::fs::symlink_metadata(&local)
        .await
        .is_ok_and(|m| m.is_file());
    if !complete {
        // Transfers live in a folder of their task: no other task's part is here.
        fetch_one(engine, url, &local, task_id, &[]).await?;
    }
    let object = s3.key(batch, name);
    let bytes = s3.upload_file(&local, &object).await?;
    engine.object_store_up();
    engine.metrics.request("upload", "ok");
    tracing::debug!(batch, key = %object, bytes, "video stored");
    let op = Op::FileSaved {
        task_id: task_id.to_owned(),
        name: name.to_owned(),
    };
    engine
        .apply(key, op)
        .await
        .map_err(|e| DownloadError::Transient(format!("cannot record {name}: {e}")))?;
    // Recorded: the local copy has served its purpose.
    let _ = tokio::fs::remove_file(&local).await;
    let _ = tokio::fs::remove_dir(dir).await;
    Ok(())
}

/// Removes what transfers of `batch` left (files of tasks that ended
/// without them), once the batch is finished.
pub(crate) async fn clean_batch(state: &Path, batch: &str) {
    let dir = super::transfers_dir(state).join(batch);
    let _ = tokio::fs::remove_dir_all(&dir).await;
}
