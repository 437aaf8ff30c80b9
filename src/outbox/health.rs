//! Whether the object store takes writes. Submission pauses while it does
//! not (a video paid for must have somewhere to go); this worker probes the
//! store with backoff during such a pause and ends it when a probe passes.

use std::sync::Arc;
use std::time::Duration;

use crate::api::PauseReason;
use crate::dispatch::{Engine, backoff};

/// Longest wait between two probes of a store that is down.
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(60);

/// Probes once; pauses submission (with one error line naming the bucket)
/// on failure. Used at start, before any row is submitted.
pub(crate) async fn check(engine: &Engine) -> bool {
    let Some(s3) = engine.outbox.store() else {
        return true;
    };
    let probed = tokio::time::timeout(Duration::from_secs(30), s3.probe()).await;
    match probed {
        Ok(Ok(())) => {
            engine.object_store_up();
            true
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the outbox's object store refuses writes; submission pauses until it takes them");
            engine.object_store_down();
            false
        }
        Err(_) => {
            tracing::error!(store = %s3.target, "the outbox's object store did not answer a probe within 30s; submission pauses until it does");
            engine.object_store_down();
            false
        }
    }
}

/// While submission is paused for the store, probes it with backoff.
pub(crate) async fn health_worker(engine: Arc<Engine>) {
    if engine.outbox.store().is_none() {
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
