//! Managing batches and money: `retry`, `cancel`, `pause`, `resume` and
//! `priority` of a batch, through the running daemon's listener (`POST
//! /batches/{name}/retry`, `/cancel`, `/pause`, `/resume`, `/priority`) or
//! directly on the state folder when no daemon runs, and the spend gauges
//! of `/metrics`.
//!
//! A retried row gets a new task (it is paid for again); a cancelled batch's
//! queued rows end `failed` with fail code `CANCELLED`, while its tasks
//! already running finish and are downloaded.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};

use crate::dispatch::Engine;
use crate::ingest::Folders;
use crate::manifest::{ManifestError, RowReader};
use crate::store::{BatchPhase, CANCEL_MSG, Op, Priority, RowState, Store, StoreError};

/// Rows read from a manifest per store transaction when cancelling.
const CANCEL_CHUNK: usize = 1000;

/// Why a retry or cancel could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// No accepted batch has this name.
    #[error("no batch named {0:?}")]
    NoBatch(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The batch's manifest could not be read to end its unclaimed rows.
    #[error("batch {batch}: {source}")]
    Manifest {
        batch: String,
        #[source]
        source: ManifestError,
    },
    #[error("batch {batch}: cannot write results.csv: {message}")]
    Results { batch: String, message: String },
}

/// What `retry` asks for: the fail codes to retry (all failed rows if none).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RetryRequest {
    #[serde(default)]
    pub codes: Option<Vec<String>>,
}

/// What `retry` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryOutcome {
    pub batch: String,
    /// Rows queued again, each for a new task.
    pub requeued: u64,
    /// Row ids queued again.
    pub rows: Vec<String>,
}

/// What `cancel` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelOutcome {
    pub batch: String,
    /// Rows ended as `failed` (`CANCELLED`), never submitted.
    pub cancelled: u64,
    /// Tasks still running or downloading; they finish.
    pub still_running: u64,
    /// Every row has ended (results.csv is, or will be, written).
    pub ended: bool,
}

/// What `pause`, `resume` or `priority` left the batch at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlOutcome {
    pub batch: String,
    pub paused: bool,
    pub priority: Priority,
}

/// What `priority` asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PriorityRequest {
    pub priority: Priority,
}

/// Pauses (`true`) or resumes submitting batch `name`'s rows; its running
/// tasks go on either way.
pub fn set_paused(store: &Store, name: &str, paused: bool) -> Result<ControlOutcome, ManageError> {
    let batch = store
        .batch_named(name)?
        .ok_or_else(|| ManageError::NoBatch(name.to_owned()))?;
    let batch = store.set_paused(batch.seq, paused)?;
    store.flush_blocking()?;
    tracing::info!(
        batch = name,
        paused,
        "batch {}",
        if paused { "paused" } else { "resumed" }
    );
    Ok(ControlOutcome {
        batch: batch.name,
        paused: batch.paused,
        priority: batch.priority,
    })
}

/// Sets batch `name`'s share of submissions among the active batches.
pub fn set_priority(
    store: &Store,
    name: &str,
    priority: Priority,
) -> Result<ControlOutcome, ManageError> {
    let batch = store
        .batch_named(name)?
        .ok_or_else(|| ManageError::NoBatch(name.to_owned()))?;
    let batch = store.set_priority(batch.seq, priority)?;
    store.flush_blocking()?;
    tracing::info!(
        batch = name,
        priority = priority.as_str(),
        "batch priority set"
    );
    Ok(ControlOutcome {
        batch: batch.name,
        paused: batch.paused,
        priority: batch.priority,
    })
}

/// Queues the chosen failed rows of batch `name` again.
pub fn retry(store: &Store, name: &str, req: &RetryRequest) -> Result<RetryOutcome, ManageError> {
    let batch = store
        .batch_named(name)?
        .ok_or_else(|| ManageError::NoBatch(name.to_owned()))?;
    let rows = store.requeue_failed(batch.seq, req.codes.as_deref())?;
    store.flush_blocking()?;
    let ids: Vec<String> = rows.into_iter().map(|(_, r)| r.id).collect();
    tracing::warn!(
        batch = name, rows = ids.len(), codes = ?req.codes,
        "failed rows queued again on request; each gets a new task (and is paid for again)"
    );
    Ok(RetryOutcome {
        batch: name.to_owned(),
        requeued: ids.len() as u64,
        rows: ids,
    })
}

/// Stops submitting batch `name`: queued and unclaimed rows end `CANCELLED`.
pub fn cancel(store: &Store, folders: &Folders, name: &str) -> Result<CancelOutcome, ManageError> {
    let batch = store
        .batch_named(name)?
        .ok_or_else(|| ManageError::NoBatch(name.to_owned()))?;
    // From here on no fresh row of it is claimed.
    store.set_cancelled(batch.seq)?;
    store.flush_blocking()?;
    let mut cancelled = 0;
    for (key, _) in store.rows_in_state(RowState::Queued, usize::MAX)? {
        if key.batch != batch.seq {
            continue;
        }
        let op = Op::Cancel {
            msg: CANCEL_MSG.to_owned(),
        };
        match store.apply(key, op) {
            Ok(_) => cancelled += 1,
            // Claimed meanwhile: it runs to its end.
            Err(StoreError::WrongState { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    cancelled += cancel_unclaimed(store, folders, name)?;
    store.flush_blocking()?;
    let batch = store.batch(batch.seq)?;
    let still_running = batch.counts.submitting + batch.counts.running + batch.counts.downloading;
    tracing::warn!(
        batch = name,
        cancelled,
        still_running,
        "batch cancelled: its queued rows end failed (CANCELLED); running tasks finish"
    );
    Ok(CancelOutcome {
        batch: name.to_owned(),
        cancelled,
        still_running,
        ended: batch.all_rows_ended(),
    })
}

/// Ends the never-claimed rows of cancelled batch `name`, reading them from
/// its manifest in chunks (their records go straight to the archive). Safe
/// to run again after a stop part-way.
pub fn cancel_unclaimed(store: &Store, folders: &Folders, name: &str) -> Result<u64, ManageError> {
    let batch = store
        .batch_named(name)?
        .ok_or_else(|| ManageError::NoBatch(name.to_owned()))?;
    if batch.unclaimed() == 0 {
        return Ok(0);
    }
    let manifest_err = |source| ManageError::Manifest {
        batch: name.to_owned(),
        source,
    };
    let path = folders.manifest_of(&batch.name);
    let mut reader = RowReader::open(&path, batch.cursor).map_err(manifest_err)?;
    let mut cancelled = 0;
    loop {
        let mut chunk = Vec::with_capacity(CANCEL_CHUNK);
        let mut next = None;
        while chunk.len() < CANCEL_CHUNK {
            match reader.next_row().map_err(manifest_err)? {
                Some((row, pos)) => {
                    chunk.push(row);
                    next = Some(pos);
                }
                None => break,
            }
        }
        let Some(next) = next else { break };
        cancelled += store.cancel_unclaimed(batch.seq, &chunk, next, CANCEL_MSG)?;
    }
    Ok(cancelled)
}

/// With no daemon running: writes results.csv of a batch whose rows all ended.
pub fn finish_offline(store: &Store, folders: &Folders, name: &str) -> Result<(), ManageError> {
    let Some(batch) = store.batch_named(name)? else {
        return Ok(());
    };
    if batch.phase != BatchPhase::Active || !batch.all_rows_ended() {
        return Ok(());
    }
    crate::results::write_results(store, folders, &batch).map_err(|e| ManageError::Results {
        batch: name.to_owned(),
        message: e.to_string(),
    })?;
    store.finish_batch(batch.seq)?;
    store.flush_blocking()?;
    Ok(())
}

/// The routes the listener merges: `POST /batches/{name}/retry` (JSON body
/// `{"codes": [...]}`, optional) and `POST /batches/{name}/cancel`.
pub fn routes(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/batches/{name}/retry", post(retry_handler))
        .route("/batches/{name}/cancel", post(cancel_handler))
        .route("/batches/{name}/pause", post(pause_handler))
        .route("/batches/{name}/resume", post(resume_handler))
        .route("/batches/{name}/priority", post(priority_handler))
        .with_state(engine)
}

fn error_response(e: &ManageError) -> Response {
    let status = match e {
        ManageError::NoBatch(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, e.to_string()).into_response()
}

async fn retry_handler(
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let req: RetryRequest = if body.is_empty() {
        RetryRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        }
    };
    let store = engine.store.clone();
    let done = tokio::task::spawn_blocking(move || retry(&store, &name, &req)).await;
    match done {
        Ok(Ok(outcome)) => {
            engine.queue_changed();
            axum::Json(outcome).into_response()
        }
        Ok(Err(e)) => error_response(&e),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn cancel_handler(State(engine): State<Arc<Engine>>, Path(n): Path<String>) -> Response {
    let store = engine.store.clone();
    let folders = engine.folders.clone();
    let done = tokio::task::spawn_blocking(move || {
        let outcome = cancel(&store, &folders, &n)?;
        let seq = store.batch_named(&n)?.map(|b| b.seq);
        Ok::<_, ManageError>((outcome, seq))
    })
    .await;
    match done {
        Ok(Ok((outcome, seq))) => {
            if let Some(seq) = seq {
                // The finisher writes results.csv if every row has ended.
                let _ = engine.finished.send(seq);
            }
            axum::Json(outcome).into_response()
        }
        Ok(Err(e)) => error_response(&e),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn control(
    engine: Arc<Engine>,
    f: impl FnOnce(&Store) -> Result<ControlOutcome, ManageError> + Send + 'static,
) -> Response {
    let store = engine.store.clone();
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(Ok(outcome)) => {
            // A resumed or re-weighted batch may have rows to send now.
            engine.queue_changed();
            axum::Json(outcome).into_response()
        }
        Ok(Err(e)) => error_response(&e),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn pause_handler(State(engine): State<Arc<Engine>>, Path(name): Path<String>) -> Response {
    control(engine, move |s| set_paused(s, &name, true)).await
}

async fn resume_handler(State(engine): State<Arc<Engine>>, Path(name): Path<String>) -> Response {
    control(engine, move |s| set_paused(s, &name, false)).await
}

async fn priority_handler(
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let req: PriorityRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("body: {e} (expected {{\"priority\": \"high\"|\"normal\"|\"low\"}})");
            return (StatusCode::BAD_REQUEST, msg).into_response();
        }
    };
    control(engine, move |s| set_priority(s, &name, req.priority)).await
}

/// Spend gauges for `/metrics`.
pub fn spend_metrics(engine: &Engine) -> String {
    // Real money only here; a simulated run's account has a gauge of its own.
    let totals = engine.store.spend_of(false).unwrap_or_default();
    let mut out = String::from(
        "# HELP infinitetalk_spent_usd Known cost of the rows submitted (5 s minimum per row when not probed).\n# TYPE infinitetalk_spent_usd gauge\n",
    );
    out.push_str(&format!("infinitetalk_spent_usd {}\n", totals.usd));
    if engine.settings.simulate {
        let simulated = engine.store.spend_of(true).unwrap_or_default();
        out.push_str("# HELP infinitetalk_simulated_spent_usd What a --simulate run would have cost (never paid, never counted against the cap of a real run).\n# TYPE infinitetalk_simulated_spent_usd gauge\n");
        out.push_str(&format!(
            "infinitetalk_simulated_spent_usd {}\n",
            simulated.usd
        ));
    }
    out.push_str("# HELP infinitetalk_audio_seconds Seconds of probed audio submitted.\n# TYPE infinitetalk_audio_seconds gauge\n");
    out.push_str(&format!(
        "infinitetalk_audio_seconds {}\n",
        totals.audio_seconds
    ));
    if let Some(cap) = *engine.spend_cap.borrow() {
        out.push_str("# HELP infinitetalk_spend_cap_usd The spend cap (--max-spend-usd).\n# TYPE infinitetalk_spend_cap_usd gauge\n");
        out.push_str(&format!("infinitetalk_spend_cap_usd {cap}\n"));
    }
    out
}
