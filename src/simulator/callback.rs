//! Callback delivery, on the service's published schedule.
//!
//! When a callback-mode task ends, its status envelope is POSTed to the
//! callback URL. An answer other than HTTP 200 within 30 s is a failure; the
//! service then retries after 30 s, 2 min and 10 min, and gives up. Every
//! duration is scaled by the time factor (the answer deadline is at least 1 s,
//! so that a slow test machine is not read as a failing receiver).

use std::sync::Arc;
use std::time::Duration;

use super::state::{Shared, sleep_or_cancel};

const ANSWER_WITHIN: Duration = Duration::from_secs(30);
const RETRY_AFTER: [Duration; 3] = [
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
];

fn scaled(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(d)
}

/// Delivers the callback of `task_id` once it ends; returns at shutdown.
pub(crate) async fn deliver(shared: Arc<Shared>, task_id: String, url: String) {
    let Some(ends_at) = shared.ends_at(&task_id) else {
        return;
    };
    tokio::select! {
        () = tokio::time::sleep_until(ends_at) => {}
        () = shared.shutdown.cancelled() => return,
    }
    let factor = shared.args.time_factor;
    let deadline = scaled(ANSWER_WITHIN, factor).max(Duration::from_secs(1));
    for attempt in 0..=RETRY_AFTER.len() {
        if attempt > 0
            && !sleep_or_cancel(scaled(RETRY_AFTER[attempt - 1], factor), &shared.shutdown).await
        {
            return;
        }
        let Some(data) = shared.status_data(&task_id) else {
            return;
        };
        let body = serde_json::json!({"code": 200, "message": "success", "data": data});
        shared.record(|s| s.callbacks_sent += 1);
        let send = shared
            .client
            .post(&url)
            .json(&body)
            .timeout(deadline)
            .send();
        let answered_ok = tokio::select! {
            r = send => r.is_ok_and(|resp| resp.status() == reqwest::StatusCode::OK),
            () = shared.shutdown.cancelled() => return,
        };
        if answered_ok {
            shared.record(|s| s.callbacks_acknowledged += 1);
            return;
        }
        tracing::debug!(task_id, attempt, "simulated callback not acknowledged");
    }
    shared.record(|s| s.callbacks_given_up += 1);
}
