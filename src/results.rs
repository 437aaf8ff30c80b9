//! `OUTBOX/BATCH/results.csv`: written once, atomically, when every row of
//! the batch has ended.
//!
//! The manifest's own cells are copied from the accepted `manifest.csv`
//! unchanged, and joined in row order with the store's records.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::dispatch::Engine;
use crate::fsutil;
use crate::ingest::Folders;
use crate::outbox::EarlyManifests;
use crate::store::{BatchPhase, BatchRecord, BatchSeq, RowRecord, Store, StoreError};
use crate::supervisor::Beat;

pub(crate) const RESULTS_NAME: &str = "results.csv";
/// Wait before publishing a finished batch's files again after the object
/// store refused them.
const PUBLISH_RETRY: std::time::Duration = std::time::Duration::from_secs(5);
/// Columns added after the manifest's, in this order.
pub(crate) const RESULT_COLUMNS: [&str; 7] = [
    "state",
    "task_id",
    "output",
    "fail_code",
    "fail_msg",
    "audio_seconds",
    "cost_usd",
];
/// Added after the others for batches run against the built-in simulator.
pub(crate) const SIMULATED_COLUMN: &str = "simulated";

#[derive(Debug, thiserror::Error)]
pub(crate) enum ResultsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Csv {
        path: PathBuf,
        #[source]
        source: csv::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("row {row} of batch {batch} has no record although the batch ended")]
    MissingRow { batch: String, row: u64 },
}

/// Writes `results.csv` of `batch` (whose rows have all ended).
pub(crate) fn write_results(
    store: &Store,
    folders: &Folders,
    batch: &BatchRecord,
) -> Result<PathBuf, ResultsError> {
    let manifest = folders.manifest_of(&batch.name);
    let out = folders.batch_dir(&batch.name).join(RESULTS_NAME);
    let csv_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ResultsError::Csv { path, source }
    };
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(&manifest)
        .map_err(csv_err(&manifest))?;
    let header = reader.byte_headers().map_err(csv_err(&manifest))?.clone();
    // What a write killed part-way left behind.
    let _ = fsutil::remove_temps(&out);
    let mut failure: Option<ResultsError> = None;
    let written = fsutil::write_atomic_with(&out, |w| {
        let mut writer = csv::Writer::from_writer(w);
        let mut head: Vec<&[u8]> = header.iter().collect();
        head.extend(RESULT_COLUMNS.iter().map(|c| c.as_bytes()));
        if batch.simulated {
            head.push(SIMULATED_COLUMN.as_bytes());
        }
        writer.write_record(&head).map_err(std::io::Error::other)?;
        let mut rows = reader.byte_records();
        let mut index = 0u64;
        // The next manifest row that is not blank (as the manifest reader counts).
        let mut next_row = || -> std::io::Result<Option<csv::ByteRecord>> {
            for raw in rows.by_ref() {
                let raw = raw.map_err(std::io::Error::other)?;
                if !is_blank_record(&raw) {
                    return Ok(Some(raw));
                }
            }
            Ok(None)
        };
        let missing = |row| ResultsError::MissingRow {
            batch: batch.name.clone(),
            row,
        };
        let visited = store.for_each_final_row(batch.seq, |row, record| {
            let raw = next_row().map_err(|e| io_store(&manifest, e))?;
            index += 1;
            let Some(raw) = raw.filter(|_| index == row) else {
                failure = Some(missing(index));
                return Err(io_store(
                    &manifest,
                    std::io::Error::other("missing row record"),
                ));
            };
            let mut fields: Vec<Vec<u8>> = raw.iter().map(<[u8]>::to_vec).collect();
            fields.resize(header.len(), Vec::new());
            fields.extend(
                result_cells(&record, batch.simulated)
                    .into_iter()
                    .map(String::into_bytes),
            );
            writer
                .write_record(&fields)
                .map_err(|e| io_store(&out, std::io::Error::other(e)))?;
            if index == 1 {
                crate::failpoint::hit("results-mid-write");
            }
            Ok(())
        });
        if let Err(e) = visited {
            if failure.is_none() {
                failure = Some(e.into());
            }
            return Err(std::io::Error::other("results not written"));
        }
        if next_row()?.is_some() {
            failure = Some(missing(index + 1));
            return Err(std::io::Error::other("missing row record"));
        }
        writer.flush()
    });
    if let Some(e) = failure {
        return Err(e);
    }
    written.map_err(|source| ResultsError::Io {
        path: out.clone(),
        source,
    })?;
    Ok(out)
}

fn io_store(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Archive {
        path: path.to_owned(),
        source,
    }
}

fn is_blank_record(raw: &csv::ByteRecord) -> bool {
    raw.iter()
        .all(|f| f.iter().all(|b| matches!(b, b' ' | b'\t')))
}

fn result_cells(record: &RowRecord, simulated: bool) -> Vec<String> {
    let num =
        |v: Option<f64>, digits: usize| v.map(|x| format!("{x:.digits$}")).unwrap_or_default();
    let mut cells = vec![
        record.state.as_str().to_owned(),
        record.task_id.clone().unwrap_or_default(),
        record.outputs.join(";"),
        record
            .fail_code
            .clone()
            .filter(|_| record.state.as_str() == "failed")
            .unwrap_or_default(),
        record
            .fail_msg
            .clone()
            .filter(|_| record.state.as_str() == "failed")
            .unwrap_or_default(),
        num(record.audio_seconds, 2),
        num(record.paid_cost_usd(), 4),
    ];
    if simulated {
        cells.push("true".into());
    }
    cells
}

/// Writes `results.csv` for batches whose last row ended. When it starts
/// (or restarts) it looks at every active batch: one whose rows all ended
/// is finished, one cancelled with rows never claimed has them ended.
pub(crate) async fn finish_worker(
    engine: Arc<Engine>,
    rx: &mut mpsc::UnboundedReceiver<BatchSeq>,
    beat: Beat,
) {
    let early = EarlyManifests::default();
    let active = match engine.store.call(|s| s.active_batches()).await {
        Ok(active) => active,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the active batches; restarting the finisher");
            return;
        }
    };
    for batch in active {
        if batch.cancelled && batch.unclaimed() > 0 {
            let (store, folders, name) = (
                engine.store.clone(),
                engine.folders.clone(),
                batch.name.clone(),
            );
            let ended = tokio::task::spawn_blocking(move || {
                crate::manage::cancel_unclaimed(&store, &folders, &name)
            })
            .await;
            if let Ok(Err(e)) = ended {
                tracing::error!(batch = %batch.name, error = %e, "cannot end the unclaimed rows of a cancelled batch");
            }
        }
        finish(&engine, batch.seq, &early).await;
    }
    loop {
        let Some(seq) = beat.wait(&engine.shutdown, rx.recv()).await else {
            break;
        };
        let Some(seq) = seq else { break };
        finish(&engine, seq, &early).await;
    }
}

/// Writes `results.csv` of batch `seq` if every row of it has ended; before
/// that, puts its manifest in an object-store outbox.
async fn finish(engine: &Engine, seq: BatchSeq, early: &EarlyManifests) {
    let batch = match engine.store.call(move |s| s.batch(seq)).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(batch = seq, error = %e, "cannot read batch");
            return;
        }
    };
    if batch.phase != BatchPhase::Active {
        return;
    }
    if !batch.all_rows_ended() {
        let dir = engine.folders.batch_dir(&batch.name);
        early.publish(
            &engine.outbox,
            &engine.tracker,
            &engine.shutdown,
            seq,
            &batch.name,
            &dir,
        );
        return;
    }
    let store = engine.store.clone();
    let folders = engine.folders.clone();
    let b = batch.clone();
    let written = tokio::task::spawn_blocking(move || {
        // Once, at the end, rather than a listing of the folder per download.
        if let Err(e) = crate::fsutil::remove_parts(&folders.batch_dir(&b.name)) {
            tracing::warn!(batch = %b.name, error = %e, "cannot remove leftover .part files");
        }
        write_results(&store, &folders, &b)
    })
    .await;
    let path = match written {
        Ok(Ok(path)) => path,
        Ok(Err(e)) => {
            tracing::error!(batch = %batch.name, error = %e, "cannot write results.csv; will retry when a row changes or at the next start");
            return;
        }
        Err(e) => {
            tracing::error!(batch = %batch.name, error = %e, "results writer panicked");
            return;
        }
    };
    // An object-store outbox gets manifest.csv, then results.csv, before
    // the batch counts as finished: a crash before then publishes again.
    let dir = engine.folders.batch_dir(&batch.name);
    if let Err(e) = engine
        .outbox
        .publish_batch_files(&batch.name, &dir, &path)
        .await
    {
        engine.object_store_down();
        tracing::error!(batch = %batch.name, error = %e, retry_in = ?PUBLISH_RETRY, "cannot publish results.csv; will retry");
        let (tx, stop) = (engine.finished.clone(), engine.shutdown.clone());
        engine.tracker.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(PUBLISH_RETRY) => { let _ = tx.send(seq); }
            }
        });
        return;
    }
    let published = engine.outbox.store().map(|s3| {
        engine.object_store_up();
        s3.key(&batch.name, RESULTS_NAME)
    });
    if published.is_some() {
        // Published: the staging copy of results.csv and any transfer left
        // by a task that ended without its files have served.
        crate::outbox::transfer::clean_batch(&engine.settings.state, &batch.name).await;
        let _ = tokio::fs::remove_file(&path).await;
    }
    let store = engine.store.clone();
    let finished = tokio::task::spawn_blocking(move || {
        store.finish_batch(seq)?;
        store.flush_blocking()?;
        Ok::<_, ResultsError>(())
    })
    .await;
    match finished {
        Ok(Ok(())) => {
            engine.progress.forget(batch.seq);
            early.forget(batch.seq);
            let results = match (&published, engine.outbox.store()) {
                (Some(key), Some(s3)) => format!("s3://{}/{key}", s3.target.bucket),
                _ => path.display().to_string(),
            };
            tracing::info!(
                batch = %batch.name, done = batch.counts.done, failed = batch.counts.failed,
                results = %results, "batch finished"
            );
        }
        Ok(Err(e)) => {
            tracing::error!(batch = %batch.name, error = %e, "cannot record the batch as finished; will retry when a row changes or at the next start")
        }
        Err(e) => tracing::error!(batch = %batch.name, error = %e, "results writer panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::RowReader;
    use crate::store::{Begin, Claim, Op, RowKey};

    #[test]
    fn results_follow_the_manifest_rows_and_skip_blank_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let folders = Folders::new(dir.path().join("inbox"), dir.path().join("outbox"));
        let store = Store::open(&dir.path().join("state")).expect("store");
        let text = "\u{feff}id,image_url,audio_url,Note\r\na,https://x/a.png,https://x/a.mp3, keep  \r\n,,,\r\n\r\nb,https://x/b.png,https://x/b.mp3,\"two\nlines\"\r\n";
        let Begin::Started(batch) = store
            .begin_batch("t", "sha", 2, Path::new("/in/t.csv"), &|_| true)
            .expect("begin")
        else {
            panic!("duplicate")
        };
        std::fs::create_dir_all(folders.batch_dir("t")).expect("dir");
        std::fs::write(folders.manifest_of("t"), text).expect("manifest");
        let batch = store.activate_batch(batch.seq, false).expect("activate");
        let mut reader = RowReader::open(&folders.manifest_of("t"), None).expect("reader");
        let mut claims = Vec::new();
        while let Some((row, next)) = reader.next_row().expect("row") {
            claims.push(Claim::Fresh {
                batch: batch.seq,
                row,
                next,
            });
        }
        assert_eq!(claims.len(), 2);
        store.claim(&claims).expect("claim");
        for row in 1..=2 {
            let key = RowKey {
                batch: batch.seq,
                row,
            };
            let task_id = format!("t{row}");
            let id = if row == 1 { "a" } else { "b" };
            for op in [
                Op::TaskCreated {
                    task_id: task_id.clone(),
                    at_ms: 1,
                },
                Op::Succeeded {
                    task_id,
                    result_urls: vec!["u".into()],
                    cost_time_ms: None,
                    at_ms: 2,
                },
                Op::Downloaded {
                    outputs: vec![format!("{id}.mp4")],
                },
            ] {
                store.apply(key, op).expect("apply");
            }
        }
        // Row 1 leaves for the archive now, row 2 when the results are written.
        assert_eq!(store.retire(1).expect("retire"), 1);
        let batch = store.batch(batch.seq).expect("batch");
        let path = write_results(&store, &folders, &batch).expect("results");
        let mut out = csv::Reader::from_path(&path).expect("read");
        let header: Vec<String> = out
            .headers()
            .expect("header")
            .iter()
            .map(String::from)
            .collect();
        assert_eq!(
            header,
            [
                "id",
                "image_url",
                "audio_url",
                "Note",
                "state",
                "task_id",
                "output",
                "fail_code",
                "fail_msg",
                "audio_seconds",
                "cost_usd"
            ]
        );
        let rows: Vec<Vec<String>> = out
            .records()
            .map(|r| r.expect("record").iter().map(String::from).collect())
            .collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0][0], "a");
        assert_eq!(rows[0][3], " keep  ", "extra cells carried unchanged");
        assert_eq!(rows[0][5], "t1");
        assert_eq!(rows[1][0], "b");
        assert_eq!(rows[1][3], "two\nlines");
        assert_eq!(rows[1][6], "b.mp4");
    }
}
