//! Whether the object store takes writes. Submission pauses while it does
//! not (a video paid for must have somewhere to go); this worker probes the
//! store with backoff during such a pause and ends it when a probe passes.

use std::sync::Arc;
use std::time::Duration;

use super::S3Outbox;
use crate::api::PauseReason;
use crate::dispatch::{Engine, backoff};

/// Longest wait between two probes of a store that is down.
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(60);

/// The object stores the daemon writes to: the outbox's, the media store.
fn stores(engine: &Engine) -> Vec<(&'static str, Arc<S3Outbox>)> {
    let mut out = Vec::new();
    if let Some(s3) = engine.outbox.store() {
        out.push(("outbox", s3.clone()));
    }
    if let Some(s3) = engine.media.store() {
        out.push(("media store", s3.clone()));
    }
    out
}

/// Probes each store once; pauses submission (with one error line naming
/// the bucket and the operation) if one refuses. Used at start, before any
/// row is submitted, and by [`health_worker`].
pub(crate) async fn check(engine: &Engine) -> bool {
    for (role, s3) in stores(engine) {
        let probed = tokio::time::timeout(Duration::from_secs(30), s3.probe()).await;
        let failed = match probed {
            Ok(Ok(())) => {
                tracing::info!(role, store = %s3.target, "the object store takes writes");
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "object store {}: no answer to a probe within 30s",
                s3.target
            ),
        };
        tracing::error!(role, error = %failed, "an object store refuses writes; submission pauses until it takes them");
        engine.object_store_down();
        return false;
    }
    engine.object_store_up();
    true
}

/// While submission is paused for the store, probes it with backoff.
pub(crate) async fn health_worker(engine: Arc<Engine>) {
    if stores(&engine).is_empty() {
        return;
    }
    let mut pause = engine.pause.subscribe();
    loop {
        let down = tokio::select! {
            () = engine.shutdown.cancelled() => return,
            down = pause.wait_for(|p| *p == Some(PauseReason::ObjectStore)) => down.is_ok(),
        };
        if !down {
            return;
        }
        let mut attempt = 0u32;
        while engine.paused() == Some(PauseReason::ObjectStore) {
            attempt += 1;
            let wait = backoff(attempt, Duration::from_secs(1), MAX_PROBE_INTERVAL);
            tokio::select! {
                () = engine.shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            check(&engine).await;
        }
    }
}
