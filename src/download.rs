//! Downloads of finished tasks' videos into the batch folder.
//!
//! Each file streams into a hidden `.NAME.TASK.part` beside its final name
//! (TASK: a digest of the task id, so a part file is only ever resumed by
//! the task that began it), opened without following symlinks; it resumes
//! with `Range` after a cut, is checked against the announced length and
//! `max-video-bytes`, is bounded in time by `download-attempt-timeout`,
//! fsynced and only then renamed into place. Each finished file is recorded
//! with its task; a file at the final name not recorded as this task's
//! output (one left by an earlier task) is downloaded over, never taken. A result URL that
//! answers 403/404/410 has expired: the status endpoint is asked for fresh
//! URLs before anything else. Failures never resubmit the task; a row fails
//! only when its files stay out of reach for `download_give_up` after the
//! task finished.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, mpsc};

use crate::dispatch::budget::Class;
use crate::dispatch::{Engine, backoff};
use crate::fsutil;
use crate::store::{Op, RowKey, RowRecord, RowState, now_ms};
use crate::supervisor::Beat;

/// Why one download attempt did not finish.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DownloadError {
    /// The URL is no longer valid: ask for fresh ones.
    #[error("result URL answered {0}")]
    Expired(u16),
    /// Network trouble, a 5xx, a body shorter than announced.
    #[error("{0}")]
    Transient(String),
    /// The body was cut after some new bytes arrived: resume at once, the
    /// server is working.
    #[error("cut after {written} bytes: {reason}")]
    Cut { written: u64, reason: String },
    /// The server announces a video larger than `max-video-bytes`.
    #[error("the video is {announced} bytes, over max-video-bytes ({max})")]
    TooLarge { announced: u64, max: u64 },
    /// The object-store outbox refused the file or could not be reached:
    /// never a reason to fail the row (it waits; submission pauses).
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
    /// Writing the file failed (disk full, permissions).
    #[error("writing {path}: {source}")]
    Disk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The file name of result `index` (0-based) of row `id`: `ID.mp4`, then
/// `ID~2.mp4`, ... (`~` is outside the id alphabet, so no two rows can
/// claim the same name).
pub(crate) fn output_name(id: &str, index: usize) -> String {
    if index == 0 {
        format!("{id}.mp4")
    } else {
        format!("{id}~{}.mp4", index + 1)
    }
}

/// The part file of `dest` for `task_id`: hidden, and named for the task so
/// that another task never resumes it.
fn part_path(dest: &Path, task_id: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = crate::ingest::hex(&Sha256::digest(task_id.as_bytes()));
    fsutil::temp_path(dest, &format!("{}.part", &digest[..16]))
}

/// Removes part files of `dest` left by the row's earlier tasks (best
/// effort). Their names are known (a part is named for its task, and every
/// task a row had is recorded), so nothing lists the batch's folder: a
/// listing per download would cost time growing with the batch.
async fn remove_other_parts(dest: &Path, previous: &[String]) {
    for task_id in previous {
        let _ = tokio::fs::remove_file(part_path(dest, task_id)).await;
    }
}

/// Runs downloads as rows reach `downloading`, at most `max_downloads` at
/// once. When it starts (or restarts) it takes up every row the store has
/// in `downloading`; a row whose download already runs is not started twice.
pub(crate) async fn download_worker(
    engine: Arc<Engine>,
    rx: &mut mpsc::UnboundedReceiver<RowKey>,
    beat: Beat,
) {
    let slots = Arc::new(Semaphore::new(engine.settings.max_downloads as usize));
    let waiting = engine
        .store
        .call(|s| s.rows_in_state(RowState::Downloading, usize::MAX))
        .await;
    match waiting {
        Ok(rows) => {
            for (key, _) in rows {
                start(&engine, &slots, key);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the rows to download; restarting the downloader");
            return;
        }
    }
    loop {
        let Some(key) = beat.wait(&engine.shutdown, rx.recv()).await else {
            break;
        };
        let Some(key) = key else { break };
        start(&engine, &slots, key);
    }
}

fn start(engine: &Arc<Engine>, slots: &Arc<Semaphore>, key: RowKey) {
    let Some(guard) = engine.claim_download(key) else {
        return;
    };
    let engine2 = engine.clone();
    let slots = slots.clone();
    engine.tracker.spawn(async move {
        let _guard = guard;
        let Ok(_slot) = slots.acquire_owned().await else {
            return;
        };
        tokio::select! {
            () = download_row(&engine2, key) => {}
            () = engine2.shutdown.cancelled() => {}
        }
    });
}

async fn download_row(engine: &Arc<Engine>, key: RowKey) {
    let batch = engine.batch_name(key.batch);
    let mut attempt = 0u32;
    let mut store_attempt = 0u32;
    let mut just_refreshed = false;
    loop {
        let record = match engine.store.call(move |s| s.live_row(key)).await {
            Ok(Some(r)) if r.state == RowState::Downloading => r,
            Ok(_) => return,
            Err(e) => {
                tracing::error!(batch = %batch, row = %key.row, error = %e, "cannot read the row to download");
                return;
            }
        };
        match fetch_all(engine, key, &batch, &record).await {
            Ok(outputs) => {
                let files = outputs.len();
                match engine.apply(key, Op::Downloaded { outputs }).await {
                    Ok(_) => {
                        tracing::info!(batch = %batch, row = %record.id, files, "done");
                    }
                    Err(e) => {
                        tracing::error!(batch = %batch, row = %record.id, error = %e, "cannot record a finished download")
                    }
                }
                return;
            }
            Err(e @ DownloadError::TooLarge { .. }) => {
                let msg = e.to_string();
                if let Err(se) = engine
                    .fail_row(key, RowState::Downloading, "VIDEO_TOO_LARGE", &msg)
                    .await
                {
                    tracing::error!(batch = %batch, row = %record.id, error = %se, "cannot record a failed download");
                }
                return;
            }
            Err(DownloadError::Outbox(e)) => {
                // The video is safe (on the API's side, or in the transfer
                // file); only the store is missing. Not counted against
                // `download_give_up`: the row waits for the store.
                store_attempt += 1;
                engine.object_store_down();
                engine.metrics.request("upload", "failed");
                let wait = backoff(
                    store_attempt,
                    Duration::from_secs(1),
                    Duration::from_secs(60),
                );
                tracing::error!(batch = %batch, row = %record.id, error = %e, retry_in = ?wait, "cannot store the video; the row waits and submission pauses");
                tokio::time::sleep(wait).await;
            }
            Err(DownloadError::Cut { written, reason }) => {
                // Progress was made: resume from the `.part` file soon, and
                // do not let cuts grow the backoff meant for dead servers.
                attempt = 0;
                tracing::debug!(batch = %batch, row = %record.id, written, reason, "download cut; resuming");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                attempt += 1;
                let finished = record.finished_at_ms.unwrap_or_else(now_ms);
                let give_up_at =
                    finished.saturating_add(engine.settings.download_give_up.as_millis() as u64);
                if now_ms() >= give_up_at {
                    let msg = format!(
                        "videos could not be downloaded within {} of the task finishing: {e}",
                        humantime::format_duration(engine.settings.download_give_up)
                    );
                    if let Err(se) = engine
                        .fail_row(key, RowState::Downloading, "DOWNLOAD_FAILED", &msg)
                        .await
                    {
                        tracing::error!(batch = %batch, row = %record.id, error = %se, "cannot record a failed download");
                    }
                    return;
                }
                if let DownloadError::Expired(code) = e {
                    if just_refreshed {
                        // Even a fresh URL is refused: back off before asking
                        // again. (Backing off after asking instead would let
                        // a short-lived URL expire before it is used.)
                        let wait = backoff(
                            attempt,
                            Duration::from_millis(500),
                            Duration::from_secs(300),
                        );
                        tracing::warn!(batch = %batch, row = %record.id, code, retry_in = ?wait, "a fresh result URL was refused too; will ask again");
                        tokio::time::sleep(wait).await;
                    }
                    tracing::info!(batch = %batch, row = %record.id, code, "result URL expired; asking for fresh URLs");
                    refresh_urls(engine, key, &record).await;
                    just_refreshed = true;
                    // A fresh URL deserves an immediate try.
                    continue;
                }
                just_refreshed = false;
                let wait = backoff(
                    attempt,
                    Duration::from_millis(500),
                    Duration::from_secs(300),
                );
                tracing::warn!(batch = %batch, row = %record.id, error = %e, retry_in = ?wait, "download failed; will retry");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Asks the status endpoint for the task's current result URLs.
async fn refresh_urls(engine: &Arc<Engine>, key: RowKey, record: &RowRecord) {
    let Some(task_id) = record.task_id.as_deref() else {
        return;
    };
    engine.budget.acquire(Class::Poll).await;
    match engine.api.status(task_id).await {
        Ok(status) if !status.result_urls.is_empty() => {
            engine.metrics.request("status", "ok");
            let op = Op::FreshUrls {
                result_urls: status.result_urls,
            };
            if let Err(e) = engine.apply(key, op).await {
                tracing::error!(row = %record.id, error = %e, "cannot save fresh result URLs");
            }
        }
        Ok(_) => engine.metrics.request("status", "ok"),
        Err(e) => {
            engine.metrics.request(
                "status",
                if e.is_rate_limit() {
                    "rate_limited"
                } else {
                    "transient"
                },
            );
            if e.is_rate_limit() {
                engine
                    .budget
                    .hold(e.retry_after().unwrap_or(Duration::from_secs(2)));
            }
            tracing::warn!(row = %record.id, task_id, error = %e, "could not refresh result URLs");
        }
    }
}

async fn fetch_all(
    engine: &Engine,
    key: RowKey,
    batch: &str,
    record: &RowRecord,
) -> Result<Vec<String>, DownloadError> {
    let dir = engine.folders.batch_dir(batch);
    let task_id = record.task_id.clone().unwrap_or_default();
    let mut outputs = Vec::with_capacity(record.result_urls.len());
    for (i, url) in record.result_urls.iter().enumerate() {
        let name = output_name(&record.id, i);
        if let Some(s3) = engine.outbox.store() {
            if !record.owns_file(&name, &task_id) {
                crate::outbox::transfer::store_one(engine, s3, key, batch, &task_id, &name, url)
                    .await?;
            }
            outputs.push(name);
            continue;
        }
        let dest = dir.join(&name);
        // Only a file recorded as this task's output is taken as done.
        let present = tokio::fs::symlink_metadata(&dest)
            .await
            .is_ok_and(|m| m.is_file());
        if !(present && record.owns_file(&name, &task_id)) {
            fetch_one(engine, url, &dest, &task_id, &record.previous_tasks).await?;
            let op = Op::FileSaved {
                task_id: task_id.clone(),
                name: name.clone(),
            };
            engine
                .apply(key, op)
                .await
                .map_err(|e| DownloadError::Transient(format!("cannot record {name}: {e}")))?;
        }
        outputs.push(name);
    }
    Ok(outputs)
}

/// Opens (creating) a part file without following a symlink and without
/// blocking on a FIFO, and checks that the handle is a regular file.
/// Anything else found at the name is removed (it is ours: a hidden name in
/// the batch folder), and the attempt fails so that the next one starts clean.
async fn open_part(part: &Path, append: bool) -> Result<tokio::fs::File, DownloadError> {
    let disk = |source| DownloadError::Disk {
        path: part.to_owned(),
        source,
    };
    let opened = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(part)
        .await;
    let file = match opened {
        Ok(f) => f,
        Err(e)
            if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENXIO) =>
        {
            let _ = tokio::fs::remove_file(part).await;
            return Err(DownloadError::Transient(format!(
                "{} was not a regular file ({e}); removed it",
                part.display()
            )));
        }
        Err(e) => return Err(disk(e)),
    };
    let meta = file.metadata().await.map_err(disk)?;
    if !meta.is_file() {
        drop(file);
        let _ = tokio::fs::remove_file(part).await;
        return Err(DownloadError::Transient(format!(
            "{} was not a regular file; removed it",
            part.display()
        )));
    }
    Ok(file)
}

/// Downloads `url` to `dest` for `task_id`, resuming the task's `.part`
/// file left by an earlier try.
pub(crate) async fn fetch_one(
    engine: &Engine,
    url: &str,
    dest: &Path,
    task_id: &str,
    previous_tasks: &[String],
) -> Result<(), DownloadError> {
    let part = part_path(dest, task_id);
    remove_other_parts(dest, previous_tasks).await;
    let deadline = tokio::time::Instant::now()
        .checked_add(engine.settings.download_attempt_timeout)
        .unwrap_or_else(tokio::time::Instant::now);
    let result = fetch_into(engine, url, dest, &part, deadline).await;
    if let Err(e) = &result {
        tracing::debug!(part = %part.display(), error = %e, "download attempt ended");
    }
    result
}

async fn fetch_into(
    engine: &Engine,
    url: &str,
    dest: &Path,
    part: &Path,
    deadline: tokio::time::Instant,
) -> Result<(), DownloadError> {
    let max = engine.settings.max_video_bytes;
    let disk = |source| DownloadError::Disk {
        path: part.to_owned(),
        source,
    };
    let have = match tokio::fs::symlink_metadata(part).await {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => {
            // Not ours to follow: a planted link or FIFO goes.
            let _ = tokio::fs::remove_file(part).await;
            0
        }
        Err(_) => 0,
    };
    let mut req = engine.http.get(url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let resp = match tokio::time::timeout_at(deadline, req.send()).await {
        Ok(sent) => sent.map_err(|e| DownloadError::Transient(crate::api::error_chain(&e)))?,
        Err(_) => {
            return Err(DownloadError::Transient(
                "no answer within download-attempt-timeout".into(),
            ));
        }
    };
    let status = resp.status().as_u16();
    match status {
        403 | 404 | 410 => {
            engine.metrics.request("download", "expired");
            return Err(DownloadError::Expired(status));
        }
        416 => {
            // The part file may already hold the whole file (a stop came
            // between its last byte and its rename): the server says how
            // long the file is (`bytes */TOTAL`), and then it is taken
            // rather than downloaded a second time.
            let total = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().strip_prefix("bytes */"))
                .and_then(|t| t.trim().parse::<u64>().ok());
            if have > 0 && total == Some(have) && have <= max {
                take_part(part, dest).await?;
                engine.metrics.request("download", "ok");
                return Ok(());
            }
            // Our partial file is not a prefix of this one: start over.
            let _ = tokio::fs::remove_file(part).await;
            return Err(DownloadError::Transient(
                "range not satisfiable; restarting".into(),
            ));
        }
        200 | 206 => {}
        other => {
            engine.metrics.request("download", "transient");
            return Err(DownloadError::Transient(format!("HTTP {other}")));
        }
    }
    let (start, total) = if status == 206 {
        let range = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_content_range);
        match range {
            Some((start, total)) if start == have => (start, total),
            _ => {
                let _ = tokio::fs::remove_file(part).await;
                return Err(DownloadError::Transient(
                    "unexpected Content-Range; restarting".into(),
                ));
            }
        }
    } else {
        (0, resp.content_length())
    };
    if let Some(announced) = total.filter(|t| *t > max) {
        let _ = tokio::fs::remove_file(part).await;
        return Err(DownloadError::TooLarge { announced, max });
    }
    // The most this answer may bring: the announced length, or the cap.
    let limit = total.unwrap_or(max);
    let mut file = open_part(part, start > 0).await?;
    let mut written = start;
    let mut body = resp.bytes_stream();
    let mut cut = None;
    let mut over = None;
    loop {
        let next = match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(next) => next,
            Err(_) => {
                cut = Some("download-attempt-timeout reached".to_owned());
                break;
            }
        };
        let Some(chunk) = next else { break };
        match chunk {
            Ok(bytes) => {
                let len = bytes.len() as u64;
                if written.saturating_add(len) > limit {
                    over = Some(written.saturating_add(len));
                    break;
                }
                file.write_all(&bytes).await.map_err(disk)?;
                written += len;
                engine.metrics.download_bytes.inc_by(len);
            }
            Err(e) => {
                cut = Some(crate::api::error_chain(&e));
                break;
            }
        }
    }
    drop(body);
    if let Some(got) = over {
        // More than announced (or than the cap): nothing of it is trusted.
        drop(file);
        let _ = tokio::fs::remove_file(part).await;
        engine.metrics.request("download", "transient");
        return Err(DownloadError::Transient(format!(
            "the server sent at least {got} bytes, more than {} ({}); discarded",
            limit,
            if total.is_some() {
                "the announced length"
            } else {
                "max-video-bytes"
            }
        )));
    }
    file.flush().await.map_err(disk)?;
    file.sync_all().await.map_err(disk)?;
    drop(file);
    if let Some(reason) = cut {
        engine.metrics.request("download", "transient");
        if total.is_none() {
            // Without an announced length a resume cannot be checked.
            let _ = tokio::fs::remove_file(part).await;
            return Err(DownloadError::Transient(format!(
                "cut after {written} bytes of unannounced length: {reason}"
            )));
        }
        if written > start {
            return Err(DownloadError::Cut { written, reason });
        }
        return Err(DownloadError::Transient(format!(
            "cut after {written} bytes: {reason}"
        )));
    }

    if let Some(total) = total.filter(|t| written != *t) {
        engine.metrics.request("download", "transient");
        return Err(DownloadError::Transient(format!(
            "got {written} of {total} bytes"
        )));
    }
    rename_part(part, dest)?;
    engine.metrics.request("download", "ok");
    Ok(())
}

/// A part file found whole: made durable, then renamed into place.
async fn take_part(part: &Path, dest: &Path) -> Result<(), DownloadError> {
    let file = open_part(part, true).await?;
    file.sync_all()
        .await
        .map_err(|source| DownloadError::Disk {
            path: part.to_owned(),
            source,
        })?;
    drop(file);
    rename_part(part, dest)
}

fn rename_part(part: &Path, dest: &Path) -> Result<(), DownloadError> {
    std::fs::rename(part, dest).map_err(|source| DownloadError::Disk {
        path: dest.to_owned(),
        source,
    })?;
    if let Some(dir) = dest.parent() {
        fsutil::sync_dir(dir).map_err(|source| DownloadError::Disk {
            path: dir.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// `bytes START-END/TOTAL` → (START, Some(TOTAL)).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total.trim() == "*" {
        None
    } else {
        Some(total.trim().parse().ok()?)
    };
    Some((start.trim().parse().ok()?, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(output_name("r1", 0), "r1.mp4");
        assert_eq!(output_name("r1", 1), "r1~2.mp4");
        assert_eq!(output_name("r1", 2), "r1~3.mp4");
        // Row `clip`'s second video never takes row `clip-2`'s name.
        assert_ne!(output_name("clip", 1), output_name("clip-2", 0));
    }

    #[tokio::test]
    async fn part_files_never_follow_links_nor_block_on_fifos() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target.txt");
        std::fs::write(&target, b"keep").expect("target");
        let part = dir.path().join(".v.mp4.abc.part");
        std::os::unix::fs::symlink(&target, &part).expect("link");
        assert!(open_part(&part, false).await.is_err());
        assert_eq!(std::fs::read(&target).expect("target"), b"keep");
        assert!(std::fs::symlink_metadata(&part).is_err(), "the link went");

        let status = std::process::Command::new("mkfifo")
            .arg(&part)
            .status()
            .expect("mkfifo");
        assert!(status.success());
        let opened = tokio::time::timeout(Duration::from_secs(5), open_part(&part, true))
            .await
            .expect("a FIFO does not block the open");
        assert!(opened.is_err());
        assert!(std::fs::symlink_metadata(&part).is_err(), "the FIFO went");

        // A plain part file opens and appends.
        std::fs::write(&part, b"ab").expect("part");
        let mut f = open_part(&part, true).await.expect("regular file");
        f.write_all(b"c").await.expect("write");
        f.flush().await.expect("flush");
        assert_eq!(std::fs::read(&part).expect("part"), b"abc");
    }

    #[test]
    fn part_names_differ_by_task() {
        let dest = Path::new("/o/b/r.mp4");
        assert_ne!(part_path(dest, "t1"), part_path(dest, "t2"));
        assert!(
            part_path(dest, "t1")
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".r.mp4."))
        );
    }

    #[test]
    fn parses_content_range() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }
}
