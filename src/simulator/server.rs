//! The HTTP surface: API routes, result files, admin routes.
//!
//! A hand-written accept loop serves each connection with hyper, around the
//! axum router: a handler that wants the connection dropped with no answer
//! (the `reset` and `lost_submit_answer` faults) marks its response with
//! [`DropConnection`], and the outer service turns that into an `Err`, on
//! which hyper closes the connection without writing anything.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::callback;
use super::state::{Draw, Endpoint, Shared, SubmitRefused, sleep_or_cancel};
use super::validate::{RequestType, validate_submit};
use super::{CreditsStyle, Faults};

/// How long open connections may finish their request after shutdown.
const DRAIN: Duration = Duration::from_secs(1);

/// Marks a response that must not be sent: the connection is dropped instead.
#[derive(Debug, Clone, Copy)]
struct DropConnection;

type Sim = State<Arc<Shared>>;

pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let router = routes(Arc::clone(&shared));
    let shutdown = shared.shutdown.clone();
    let tracker = shared.tracker.clone();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "simulator accept failed");
                    if !sleep_or_cancel(Duration::from_millis(50), &shutdown).await {
                        break;
                    }
                    continue;
                }
            },
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let router = router.clone();
                async move {
                    let Ok(resp) = router.oneshot(req).await;
                    if resp.extensions().get::<DropConnection>().is_some() {
                        return Err(std::io::Error::other("simulated connection reset"));
                    }
                    Ok::<_, std::io::Error>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn).await;
                }
            }
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

fn routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v1/generateTask/infinitetalk", post(submit))
        .route("/api/v1/statusTask/infinitetalk", get(status))
        .route("/files/{task_id}/{file}", get(download))
        .route("/media/{name}", get(media))
        .route("/sim/stats", get(admin_stats))
        .route("/sim/faults", get(admin_faults).put(admin_set_faults))
        .route("/sim/tasks", get(admin_tasks))
        .fallback(|| async { envelope(404, "no such endpoint") })
        .with_state(shared)
}

fn envelope(code: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        axum::Json(json!({"code": code, "message": message, "data": null})),
    )
        .into_response()
}

fn drop_connection() -> Response {
    let mut resp = Response::new(Body::empty());
    resp.extensions_mut().insert(DropConnection);
    resp
}

/// Size of a huge status body.
const HUGE_BODY_BYTES: usize = 100 * 1024 * 1024;

/// HTTP 200 with a 100 MB body that starts like the envelope, streamed in
/// chunks (never held whole).
fn huge_body() -> Response {
    use futures_util::StreamExt;
    const CHUNK: usize = 64 * 1024;
    let head = Bytes::from_static(br#"{"code":200,"message":""#);
    let filler = Bytes::from(vec![b'a'; CHUNK]);
    let chunks = HUGE_BODY_BYTES / CHUNK;
    let body = futures_util::stream::iter([Ok::<_, std::io::Error>(head)])
        .chain(futures_util::stream::iter(0..chunks).map(move |_| Ok(filler.clone())));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Body::from_stream(body),
    )
        .into_response()
}

/// HTTP 200, video content type, no length, a body that never ends (until
/// the client goes or the simulator stops).
fn endless_body(shutdown: tokio_util::sync::CancellationToken) -> Response {
    const CHUNK: usize = 64 * 1024;
    let filler = Bytes::from(vec![0_u8; CHUNK]);
    let body = futures_util::stream::unfold((filler, shutdown), |(filler, shutdown)| async move {
        if !sleep_or_cancel(Duration::from_millis(5), &shutdown).await {
            return None;
        }
        Some((Ok::<_, std::io::Error>(filler.clone()), (filler, shutdown)))
    });
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("video/mp4"))],
        Body::from_stream(body),
    )
        .into_response()
}

/// An answer cut in the middle: HTTP 200, JSON content type, invalid JSON.
fn malformed(endpoint: Endpoint) -> Response {
    let body = match endpoint {
        Endpoint::Submit => r#"{"code":200,"message":"success","data":{"taskI"#,
        _ => r#"{"code":200,"message":"success","data":{"state":"succ"#,
    };
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

impl Shared {
    fn bad_request(&self, message: &str) -> Response {
        self.record(|s| s.rejected_400 += 1);
        envelope(400, message)
    }

    fn unauthorized(&self, message: &str) -> Response {
        self.record(|s| s.rejected_401 += 1);
        envelope(401, message)
    }
}

/// Everything an API request goes through before its endpoint's own logic:
/// counting, faults, the key, the sliding window.
async fn api_gate(
    shared: &Shared,
    endpoint: Endpoint,
    headers: &HeaderMap,
) -> Result<Draw, Response> {
    let draw = shared.arrive(endpoint);
    if let Some(d) = draw.slow {
        sleep_or_cancel(d, &shared.shutdown).await;
    }
    if draw.reset {
        return Err(drop_connection());
    }
    if draw.absurd_retry_after {
        shared.record(|s| s.rejected_429 += 1);
        let mut resp = envelope(429, "Rate limit exceeded: come back in 3000 years");
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("99999999999"));
        return Err(resp);
    }
    if draw.huge_status_body {
        return Err(huge_body());
    }
    if let Some(code) = draw.error_5xx {
        let msg = if code == 503 {
            "Service temporarily unavailable"
        } else {
            "Internal server error"
        };
        return Err(envelope(code, msg));
    }
    if draw.malformed {
        return Err(malformed(endpoint));
    }
    if draw.unauthorized {
        return Err(shared.unauthorized("Invalid API key"));
    }
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        })
        .filter(|k| !k.is_empty());
    let Some(key) = key else {
        return Err(shared.unauthorized("Missing API key (Authorization: Bearer KEY)"));
    };
    if shared.args.key.as_deref().is_some_and(|want| want != key) {
        return Err(shared.unauthorized("Invalid API key"));
    }
    if draw.over_limit {
        shared.record(|s| {
            s.rejected_429 += 1;
            s.rejected_429_window += 1;
        });
        return Err(envelope(
            429,
            "Rate limit exceeded: too many requests per minute",
        ));
    }
    Ok(draw)
}

async fn submit(State(shared): Sim, headers: HeaderMap, body: Bytes) -> Response {
    let draw = match api_gate(&shared, Endpoint::Submit, &headers).await {
        Ok(d) => d,
        Err(resp) => return resp,
    };
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return shared.bad_request("Content-Type: must be application/json");
    }
    let req = match validate_submit(&body) {
        Ok(r) => r,
        Err(msg) => return shared.bad_request(&msg),
    };
    let faults = shared.faults();
    let credits_task = faults.credits_out && faults.credits_style == CreditsStyle::Task;
    if faults.credits_out && !credits_task {
        shared.record(|s| s.faults.credits_out += 1);
        return match faults.credits_style {
            CreditsStyle::Http402 => envelope(402, "Insufficient credits"),
            _ => shared.bad_request("Insufficient credits"),
        };
    }
    // Like the service, fetch the inputs a task will need (loopback hosts
    // only: others are out of a test's reach and taken as reachable).
    let input_fail = if credits_task {
        None
    } else {
        super::inputs::check(&shared, &req).await
    };
    let id = match shared.create_task(&req, credits_task, input_fail) {
        Ok(id) => id,
        Err(SubmitRefused::Concurrency) => {
            shared.record(|s| {
                s.rejected_429 += 1;
                s.rejected_429_concurrency += 1;
            });
            return envelope(429, "Too many concurrent tasks");
        }
    };
    if credits_task {
        shared.record(|s| s.faults.credits_out += 1);
    }
    if req.request_type == RequestType::Callback
        && let Some(url) = req.callback_url
    {
        shared
            .tracker
            .spawn(callback::deliver(Arc::clone(&shared), id.clone(), url));
    }
    if draw.lost_submit_answer {
        shared.record(|s| s.faults.lost_submit_answer += 1);
        return drop_connection();
    }
    if draw.garbage_submit_answer {
        shared.record(|s| s.faults.garbage_submit_answer += 1);
        return (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            "<html>502 upstream garbled</html>\u{0}\u{1}",
        )
            .into_response();
    }
    axum::Json(json!({"code": 200, "message": "success", "data": {"taskId": id}})).into_response()
}

async fn status(State(shared): Sim, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    if let Err(resp) = api_gate(&shared, Endpoint::Status, &headers).await {
        return resp;
    }
    let task_id = query.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "taskId")
            .map(|(_, v)| v.into_owned())
    });
    let Some(task_id) = task_id.filter(|t| !t.is_empty()) else {
        return shared.bad_request("taskId: required");
    };
    match shared.status_data(&task_id) {
        Some(data) => {
            axum::Json(json!({"code": 200, "message": "success", "data": data})).into_response()
        }
        None => envelope(404, "taskId: no such task"),
    }
}

async fn download(
    State(shared): Sim,
    Path((task_id, file)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let draw = shared.arrive(Endpoint::Download);
    if let Some(d) = draw.slow {
        sleep_or_cancel(d, &shared.shutdown).await;
    }
    if draw.reset {
        return drop_connection();
    }
    if let Some(code) = draw.error_5xx {
        return envelope(code, "Storage temporarily unavailable");
    }
    if draw.endless_download {
        return endless_body(shared.shutdown.clone());
    }
    let Some(index) = file
        .strip_suffix(".mp4")
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return envelope(404, "no such file");
    };
    shared.count_download(&task_id, index);
    let token = query.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    });
    let Some(token) = token else {
        return envelope(403, "token: required");
    };
    match shared.check_token(&task_id, index, &token) {
        Ok(()) => {}
        Err(410) => {
            return envelope(
                410,
                "token: expired; ask the status endpoint for fresh URLs",
            );
        }
        Err(_) => return envelope(403, "token: invalid"),
    }
    let Some(bytes) = shared.result_bytes(&task_id, index) else {
        return envelope(404, "no such file");
    };
    serve_file(bytes, headers.get(header::RANGE), draw.cut_download)
}

/// Probe-able audio for manifests that point at the simulator: a silent
/// 8 kHz 8-bit mono WAV as long as the simulator will say the task's audio is
/// (`sim_audio_seconds`, else the URL's stable 5..60 s). Not an API endpoint:
/// never counted, never faulty.
async fn media(
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if !name.to_ascii_lowercase().ends_with(".wav") {
        return envelope(404, "only .wav media is served");
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let url = match &query {
        Some(q) => format!("http://{host}/media/{name}?{q}"),
        None => format!("http://{host}/media/{name}"),
    };
    let mut resp = serve_file(
        silent_wav(super::state::audio_seconds(&url)),
        headers.get(header::RANGE),
        false,
    );
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("audio/wav"));
    resp
}

/// A silent 8 kHz, 8-bit, mono PCM WAV file of `seconds`.
pub(crate) fn silent_wav(seconds: f64) -> Vec<u8> {
    const RATE: u32 = 8000;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let samples = (seconds.clamp(0.0, 600.0) * f64::from(RATE)).round() as u32;
    let mut wav = Vec::with_capacity(44 + samples as usize);
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + samples).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&1u16.to_le_bytes()); // mono
    wav.extend_from_slice(&RATE.to_le_bytes());
    wav.extend_from_slice(&RATE.to_le_bytes()); // bytes per second
    wav.extend_from_slice(&1u16.to_le_bytes()); // block align
    wav.extend_from_slice(&8u16.to_le_bytes()); // bits per sample
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&samples.to_le_bytes());
    wav.resize(44 + samples as usize, 0x80);
    wav
}

/// Parses `bytes=N-` or `bytes=N-M`; `None` for anything else (then the whole
/// file is sent, as RFC 9110 allows).
fn parse_range(value: &HeaderValue, len: usize) -> Option<Result<(usize, usize), ()>> {
    let spec = value.to_str().ok()?.trim().strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start: usize = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => len.saturating_sub(1),
        e => e.parse::<usize>().ok()?.min(len.saturating_sub(1)),
    };
    if start >= len || end < start {
        return Some(Err(()));
    }
    Some(Ok((start, end)))
}

fn serve_file(bytes: Vec<u8>, range: Option<&HeaderValue>, cut: bool) -> Response {
    let len = bytes.len();
    let (status, start, end) = match range.and_then(|r| parse_range(r, len)) {
        None => (StatusCode::OK, 0, len.saturating_sub(1)),
        Some(Ok((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e),
        Some(Err(())) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response();
        }
    };
    // Every branch above keeps start <= end < len for a non-empty file.
    let part = if len == 0 {
        Bytes::new()
    } else {
        Bytes::from(bytes).slice(start..=end)
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("video/mp4"));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(part.len()));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}"))
    {
        headers.insert(header::CONTENT_RANGE, v);
    }
    let body = if cut {
        // The announced length stays; the stream ends half-way with an error,
        // on which hyper closes the connection.
        // The pause lets hyper flush the headers and the first half before
        // the error aborts the connection; otherwise nothing at all is sent.
        use futures_util::StreamExt;
        let half = part.slice(..part.len() / 2);
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(half)]);
        let cut = futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(std::io::Error::other("simulated cut download"))
        });
        Body::from_stream(first.chain(cut))
    } else {
        Body::from(part)
    };
    (status, headers, body).into_response()
}

async fn admin_stats(State(shared): Sim) -> Response {
    axum::Json(shared.stats()).into_response()
}

async fn admin_faults(State(shared): Sim) -> Response {
    axum::Json(shared.faults()).into_response()
}

async fn admin_set_faults(State(shared): Sim, body: Bytes) -> Response {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(f) => {
            let probabilities = [
                ("error_5xx", f.error_5xx),
                ("reset", f.reset),
                ("malformed", f.malformed),
                ("slow", f.slow),
                ("cut_download", f.cut_download),
                ("lost_submit_answer", f.lost_submit_answer),
                ("garbage_submit_answer", f.garbage_submit_answer),
                ("absurd_retry_after", f.absurd_retry_after),
                ("huge_status_body", f.huge_status_body),
                ("endless_download", f.endless_download),
            ];
            if let Some((name, _)) = probabilities.iter().find(|(_, p)| !(0.0..=1.0).contains(p)) {
                return envelope(400, &format!("{name}: must be between 0.0 and 1.0"));
            }
            shared.set_faults(f.clone());
            axum::Json(f).into_response()
        }
        // Not counted: admin routes never touch the API's counters.
        Err(e) => envelope(400, &format!("body: not a valid Faults object ({e})")),
    }
}

async fn admin_tasks(State(shared): Sim) -> Response {
    // Hashing files may take a moment; keep it off the async workers.
    match tokio::task::spawn_blocking(move || shared.tasks()).await {
        Ok(tasks) => axum::Json(tasks).into_response(),
        Err(_) => envelope(500, "listing tasks failed"),
    }
}
