//! The HTTP listener: `GET /status`, `GET /metrics`, and the callback route
//! (on the main listener, or alone on `--callback-listen`). Who may use
//! which route is [`crate::admin`]'s call, never a handler's.
//!
//! A callback is only a hint (guarantee 7): it makes the poller ask the
//! status endpoint about that task at once, and the status answer decides.
//! A callback with a wrong secret, for a task we do not follow, too large or
//! not the documented envelope changes nothing.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::registry::Registry;

use crate::admin::{Gate, constant_time_eq};
use crate::dispatch::{Engine, PollCmd, progress};
use crate::metrics::CallbackLabels;
use crate::status::{self, Limits, Report};

/// Largest callback body accepted.
pub(crate) const MAX_CALLBACK_BYTES: usize = 64 * 1024;

#[derive(Clone)]
struct App {
    engine: Arc<Engine>,
    registry: Arc<Registry>,
    secret: Arc<str>,
}

/// The main listener's router. Every route sits behind one of `gate`'s
/// guards (see [`crate::admin`]): changing routes (`manage`, the console
/// link) need the admin token and refuse cross-site requests; reading routes
/// (`/status`) need it unless the listener is on loopback; `/metrics`,
/// `/login` and the callback route are open; every `Host` is checked.
/// With `callback_here` false (`--callback-listen`), the callback route is
/// served only by [`callback_router`].
pub(crate) fn router(
    engine: Arc<Engine>,
    registry: Registry,
    secret: String,
    gate: &Gate,
    callback_here: bool,
    monitor: Arc<crate::console::Monitor>,
) -> Router {
    let changing = gate.changing(crate::manage::routes(engine.clone()));
    let console = crate::console::routes(engine.clone(), monitor, gate);
    let app = App {
        engine,
        registry: Arc::new(registry),
        secret: secret.into(),
    };
    let reading = gate.reading(
        Router::new()
            .route("/status", get(status_handler))
            .with_state(app.clone()),
    );
    let mut open = Router::new().route("/metrics", get(metrics_handler));
    if callback_here {
        open = open
            .route("/callback/{secret}", post(callback_handler))
            .layer(DefaultBodyLimit::max(MAX_CALLBACK_BYTES));
    }
    // `/media/{token}`: the token is the credential, as the callback's
    // secret path is (the API fetches from off this machine).
    let media = crate::media::serve::routes(app.engine.clone());
    let router = Router::new()
        .merge(changing)
        .merge(console)
        .merge(reading)
        .merge(media)
        .merge(open.with_state(app))
        .merge(gate.routes());
    gate.check_host(router)
}

/// The callback route alone, for `--callback-listen`: no other route, no
/// token, no `Host` check (a reverse proxy may rename the host); the secret
/// path is its only credential.
pub(crate) fn callback_router(engine: Arc<Engine>, secret: String) -> Router {
    let app = App {
        engine,
        registry: Arc::new(Registry::default()),
        secret: secret.into(),
    };
    Router::new()
        .route("/callback/{secret}", post(callback_handler))
        .layer(DefaultBodyLimit::max(MAX_CALLBACK_BYTES))
        .with_state(app)
}

/// The live report of a running daemon.
pub(crate) fn live_report(engine: &Engine) -> Report {
    let mut batches = match status::batches(&engine.store) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot read batches for /status");
            Vec::new()
        }
    };
    let eta_seconds = estimate(engine, &mut batches);
    Report {
        live: true,
        eta_seconds,
        batches,
        paused: engine.paused().map(|r| r.as_str().to_owned()),
        limits: Some(Limits {
            max_concurrent: engine.settings.max_concurrent,
            max_requests_per_minute: engine.settings.max_requests_per_minute,
        }),
        tasks_in_flight: Some(engine.tasks_in_flight()),
        requests_last_minute: Some(engine.budget.sent_in_window() as u64),
        simulated: engine.settings.simulate,
        spend: status::Spend::from_store(&engine.store)
            .map(|s| status::Spend {
                cap_usd: *engine.spend_cap.borrow(),
                probing: engine.settings.probe,
                ..s
            })
            .ok(),
    }
}

/// Fills in each active batch's estimated time to finish, and returns the
/// estimate for all of them: at the rate rows end lately, else from the mean
/// task time and the batch's share of the slots (its priority's weight).
fn estimate(engine: &Engine, batches: &mut [status::BatchStatus]) -> Option<u64> {
    let running = |b: &status::BatchStatus| {
        b.phase != crate::store::BatchPhase::Finished && !b.paused && b.remaining() > 0
    };
    let weights: usize = batches
        .iter()
        .filter(|b| running(b))
        .map(|b| b.priority.weight())
        .sum();
    let slots = f64::from(engine.settings.max_concurrent);
    let mean = engine.mean_task_secs();
    let (mut remaining, mut rate, mut all_rated) = (0u64, 0.0, true);
    for b in batches.iter_mut() {
        if b.phase == crate::store::BatchPhase::Finished || b.remaining() == 0 {
            b.eta_seconds = None;
            continue;
        }
        if b.paused {
            continue;
        }
        let share = slots * b.priority.weight() as f64 / weights.max(1) as f64;
        let r = engine.progress.rate(b.seq);
        b.eta_seconds = progress::eta_seconds(b.remaining(), r, mean, share);
        remaining += b.remaining();
        match r {
            Some(r) => rate += r,
            None => all_rated = false,
        }
    }
    let rate = (all_rated && rate > 0.0).then_some(rate);
    progress::eta_seconds(remaining, rate, mean, slots)
}

async fn status_handler(State(app): State<App>) -> Response {
    let engine = app.engine.clone();
    match tokio::task::spawn_blocking(move || live_report(&engine)).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn metrics_handler(State(app): State<App>) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode_registry(&mut text, &app.registry) {
        tracing::error!(error = %e, "cannot encode metrics");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let engine = app.engine.clone();
    match tokio::task::spawn_blocking(move || store_metrics(&engine)).await {
        Ok(more) => text.push_str(&more),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
    text.push_str("# EOF\n");
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Rows by state and batches, read from the store at scrape time.
fn store_metrics(engine: &Engine) -> String {
    let Ok(batches) = engine.store.batches() else {
        return String::new();
    };
    let mut by_state = [0u64; 6];
    let mut active = 0u64;
    let mut finished = 0u64;
    for b in &batches {
        match b.phase {
            crate::store::BatchPhase::Active => active += 1,
            crate::store::BatchPhase::Finished => finished += 1,
            crate::store::BatchPhase::Ingesting => continue,
        }
        by_state[0] += b.queued();
        by_state[1] += b.counts.submitting;
        by_state[2] += b.counts.running;
        by_state[3] += b.counts.downloading;
        by_state[4] += b.counts.done;
        by_state[5] += b.counts.failed;
    }
    let mut out =
        String::from("# HELP infinitetalk_rows Rows by state.\n# TYPE infinitetalk_rows gauge\n");
    for (state, n) in crate::store::RowState::ALL.iter().zip(by_state) {
        out.push_str(&format!(
            "infinitetalk_rows{{state=\"{}\"}} {n}\n",
            state.as_str()
        ));
    }
    out.push_str(
        "# HELP infinitetalk_batches Batches by phase.\n# TYPE infinitetalk_batches gauge\n",
    );
    out.push_str(&format!(
        "infinitetalk_batches{{phase=\"active\"}} {active}\n"
    ));
    out.push_str(&format!(
        "infinitetalk_batches{{phase=\"finished\"}} {finished}\n"
    ));
    out.push_str("# HELP infinitetalk_submission_paused 1 while submission is paused.\n# TYPE infinitetalk_submission_paused gauge\n");
    out.push_str(&format!(
        "infinitetalk_submission_paused {}\n",
        u8::from(engine.paused().is_some())
    ));
    out.push_str(&crate::manage::spend_metrics(engine));
    out.push_str("# HELP infinitetalk_requests_in_window API requests sent in the last window.\n# TYPE infinitetalk_requests_in_window gauge\n");
    out.push_str(&format!(
        "infinitetalk_requests_in_window {}\n",
        engine.budget.sent_in_window()
    ));
    out.push_str("# HELP infinitetalk_live_rows Rows held in the state database (claimed, not yet archived).\n# TYPE infinitetalk_live_rows gauge\n");
    out.push_str(&format!(
        "infinitetalk_live_rows {}\n",
        engine.store.live_rows()
    ));
    out
}

async fn callback_handler(
    State(app): State<App>,
    Path(secret): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let engine = &app.engine;
    let count = |outcome: &'static str| {
        engine
            .metrics
            .callbacks
            .get_or_create(&CallbackLabels { outcome })
            .inc()
    };
    if !constant_time_eq(secret.as_bytes(), app.secret.as_bytes()) {
        count("bad_secret");
        tracing::warn!("callback refused: wrong secret in its URL");
        return (StatusCode::FORBIDDEN, "wrong callback secret").into_response();
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            count("too_large");
            tracing::warn!(
                limit_bytes = MAX_CALLBACK_BYTES,
                "callback refused: body larger than the limit"
            );
            return (StatusCode::PAYLOAD_TOO_LARGE, "callback body too large").into_response();
        }
        Err(rejection) => {
            count("malformed");
            tracing::warn!(error = %rejection.body_text(), "callback refused: unreadable body");
            return (StatusCode::BAD_REQUEST, "unreadable body").into_response();
        }
    };
    let status = match crate::api::parse_status_envelope(&body) {
        Ok(s) => s,
        Err(e) => {
            count("malformed");
            tracing::warn!(error = %e, "callback refused: not the status envelope");
            return (StatusCode::BAD_REQUEST, "not a task status envelope").into_response();
        }
    };
    let Some(key) = engine.tracked_task(&status.task_id) else {
        count("unknown_task");
        tracing::warn!(task_id = %status.task_id, "callback refused: no such task in flight here");
        return (StatusCode::NOT_FOUND, "unknown task").into_response();
    };
    count("accepted");
    tracing::info!(batch = %engine.batch_name(key.batch), task_id = %status.task_id, "callback received; confirming with a status query");
    let _ = engine.poller.send(PollCmd::Hint {
        task_id: status.task_id,
    });
    (StatusCode::OK, "ok").into_response()
}
