//! The APIXO InfiniteTalk client: wire types, the two endpoints, and how
//! each answer is classified.
//!
//! Classification lives on [`ApiError`]: the dispatcher asks an error
//! whether to retry, wait, pause submission or fail the row, and never
//! inspects status codes itself.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::ApiKey;
use crate::spec::{RowDefaults, RowSpec};

pub(crate) const SUBMIT_PATH: &str = "/api/v1/generateTask/infinitetalk";
pub(crate) const STATUS_PATH: &str = "/api/v1/statusTask/infinitetalk";
/// Largest API answer body that any number of requests read at once (the
/// envelope is a few hundred bytes).
pub(crate) const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest answer body read at all; one over [`MAX_BODY_BYTES`] (a task that
/// lists thousands of result URLs) is read by one request at a time, so that
/// such answers cost at most this much memory together. A longer one is cut
/// off and counts as unreadable.
pub(crate) const MAX_LARGE_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Most result URLs taken from one task; further ones are dropped with a
/// warning (the model returns one video).
pub(crate) const MAX_RESULT_URLS: usize = 16;
/// Longest `Retry-After` honoured, unless configured lower; a larger value is
/// clamped to this.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Why submission is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseReason {
    InsufficientCredits,
    Unauthorized,
    /// `--max-spend-usd` would be crossed by the next row: only a higher cap resumes.
    SpendCap,
    /// The object-store outbox refuses writes or cannot be reached: no
    /// video is paid for that could not be stored.
    ObjectStore,
}

impl PauseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::InsufficientCredits => "insufficient credits",
            PauseReason::Unauthorized => "API key refused (401)",
            PauseReason::SpendCap => "spend cap reached (raise --max-spend-usd to go on)",
            PauseReason::ObjectStore => {
                "the object store of the outbox refuses writes or cannot be reached (see the error lines naming the bucket)"
            }
        }
    }
}

/// What a failed API request means.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No answer: connection refused or reset, timeout, cut body.
    #[error("network: {0}")]
    Network(String),
    /// A submit was sent but its answer was lost or unreadable (timeout
    /// after sending, reset, cut or malformed 2xx body): the task may or may
    /// not exist. Never produced for a submit known not to have left
    /// (connection refused, DNS): that is [`ApiError::Network`].
    #[error("submit answer lost or unreadable (a task may have been created): {0}")]
    Ambiguous(String),
    /// HTTP or body code 5xx.
    #[error("server error {status}: {message}")]
    Server { status: u16, message: String },
    /// HTTP or body code 429.
    #[error("rate limited (429): {message}")]
    RateLimited {
        message: String,
        retry_after: Option<Duration>,
    },
    /// HTTP or body code 401.
    #[error("unauthorized (401): {message}")]
    Unauthorized { message: String },
    /// 402, or 400 "Insufficient credits".
    #[error("insufficient credits ({status}): {message}")]
    InsufficientCredits { status: u16, message: String },
    /// An answer that is not the documented envelope.
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// The API refused this request for what it asks (400, 403, 404, ...).
    #[error("refused ({status}): {message}")]
    Refused { status: u16, message: String },
}

impl ApiError {
    /// The request was sent and its answer lost or unreadable: a submit
    /// may have created a task (see guarantee 2).
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, ApiError::Ambiguous(_))
    }

    /// Transient: retry the same request after a backoff; never a row
    /// failure. An ambiguous submit is not transient: its retries are
    /// bounded and paid.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::Network(_) | ApiError::Server { .. } | ApiError::Malformed(_)
        )
    }

    /// The service asks us to slow down.
    pub fn is_rate_limit(&self) -> bool {
        matches!(self, ApiError::RateLimited { .. })
    }

    /// Submission must pause until the API accepts again.
    pub fn pause_reason(&self) -> Option<PauseReason> {
        match self {
            ApiError::Unauthorized { .. } => Some(PauseReason::Unauthorized),
            ApiError::InsufficientCredits { .. } => Some(PauseReason::InsufficientCredits),
            _ => None,
        }
    }

    /// The code recorded on a row the API refused at submit.
    pub fn fail_code(&self) -> String {
        match self {
            ApiError::Refused { status, .. } => format!("HTTP_{status}"),
            _ => "SUBMIT_ERROR".into(),
        }
    }

    /// Seconds the server asked us to wait, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Classifies an HTTP status and the envelope's code and message.
    fn from_codes(
        http: u16,
        body_code: Option<i64>,
        message: String,
        retry_after: Option<Duration>,
    ) -> ApiError {
        // An API may quote what it was sent: our presigned media URLs.
        let message = crate::redact::presigned(&message).into_owned();
        // The body code wins when the HTTP status is a plain 200.
        let code = match body_code {
            Some(c) if http == 200 => u16::try_from(c).unwrap_or(500),
            _ => http,
        };
        let credits = message.to_ascii_lowercase().contains("insufficient credit");
        match code {
            429 => ApiError::RateLimited {
                message,
                retry_after,
            },
            401 => ApiError::Unauthorized { message },
            402 => ApiError::InsufficientCredits {
                status: 402,
                message,
            },
            _ if credits => ApiError::InsufficientCredits {
                status: code,
                message,
            },
            500..=599 => ApiError::Server {
                status: code,
                message,
            },
            400..=499 => ApiError::Refused {
                status: code,
                message,
            },
            _ => ApiError::Malformed(format!("unexpected code {code}: {message}")),
        }
    }
}

/// The request body of a submit.
#[derive(Debug, Serialize)]
pub struct SubmitBody<'a> {
    pub request_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<&'a str>,
    pub provider: &'static str,
    pub input: SubmitInput<'a>,
}

#[derive(Debug, Serialize)]
pub struct SubmitInput<'a> {
    pub mode: &'static str,
    pub image_urls: Vec<&'a str>,
    pub audio_urls: [&'a str; 1],
    pub prompt: &'a str,
    pub resolution: &'static str,
    pub seed: i64,
}

impl<'a> SubmitBody<'a> {
    /// The body for `spec`, with blanks filled from `defaults`.
    pub fn new(
        spec: &'a RowSpec,
        defaults: &'a RowDefaults,
        callback_url: Option<&'a str>,
    ) -> Self {
        let mut image_urls = vec![spec.image_url.as_str()];
        if let Some(mask) = &spec.mask_url {
            image_urls.push(mask.as_str());
        }
        SubmitBody {
            request_type: if callback_url.is_some() {
                "callback"
            } else {
                "async"
            },
            callback_url,
            provider: spec.provider.unwrap_or(defaults.provider).as_str(),
            input: SubmitInput {
                mode: "image-to-video",
                image_urls,
                audio_urls: [spec.audio_url.as_str()],
                prompt: spec.prompt.as_deref().unwrap_or(&defaults.prompt),
                resolution: spec.resolution.unwrap_or(defaults.resolution).as_str(),
                seed: spec.seed.unwrap_or(-1),
            },
        }
    }
}

#[derive(Debug, Deserialize)]
struct Envelope {
    code: Option<i64>,
    #[serde(default, alias = "msg")]
    message: Option<String>,
    #[serde(default)]
    data: Option<serde_json::Value>,
}

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Pending,
    Processing,
    Success,
    Failed,
}

/// The `data` of a status answer (and of a callback).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskStatus {
    pub task_id: String,
    pub state: TaskState,
    pub result_urls: Vec<String>,
    pub fail_code: Option<String>,
    pub fail_msg: Option<String>,
    pub cost_time_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusData {
    #[serde(default)]
    task_id: Option<String>,
    state: String,
    #[serde(default)]
    result_json: Option<serde_json::Value>,
    #[serde(default)]
    fail_code: Option<String>,
    #[serde(default)]
    fail_msg: Option<String>,
    #[serde(default)]
    cost_time: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResultJson {
    #[serde(default)]
    result_urls: Vec<String>,
}

impl TaskStatus {
    /// Parses the `data` object of a status answer or callback.
    pub fn from_data(
        data: serde_json::Value,
        asked_for: Option<&str>,
    ) -> Result<TaskStatus, ApiError> {
        let data: StatusData = serde_json::from_value(data)
            .map_err(|e| ApiError::Malformed(format!("status data: {e}")))?;
        let task_id = match (data.task_id, asked_for) {
            (Some(id), Some(asked)) if id != asked => {
                return Err(ApiError::Malformed(format!(
                    "asked for task {asked}, got {id}"
                )));
            }
            (Some(id), _) => id,
            (None, Some(asked)) => asked.to_owned(),
            (None, None) => return Err(ApiError::Malformed("no taskId".into())),
        };
        let state = match data.state.to_ascii_lowercase().as_str() {
            "pending" | "queued" | "waiting" => TaskState::Pending,
            "processing" | "running" | "generating" => TaskState::Processing,
            "success" | "succeeded" | "completed" => TaskState::Success,
            "failed" | "fail" | "error" => TaskState::Failed,
            other => return Err(ApiError::Malformed(format!("unknown task state {other:?}"))),
        };
        let result_urls = match data.result_json {
            None | Some(serde_json::Value::Null) => Vec::new(),
            // Documented as a JSON string holding an object; accept the object too.
            Some(serde_json::Value::String(s)) if s.trim().is_empty() => Vec::new(),
            Some(serde_json::Value::String(s)) => {
                serde_json::from_str::<ResultJson>(&s)
                    .map_err(|e| ApiError::Malformed(format!("resultJson: {e}")))?
                    .result_urls
            }
            Some(v) => {
                serde_json::from_value::<ResultJson>(v)
                    .map_err(|e| ApiError::Malformed(format!("resultJson: {e}")))?
                    .result_urls
            }
        };
        let mut result_urls = result_urls;
        if result_urls.len() > MAX_RESULT_URLS {
            tracing::warn!(
                task_id,
                urls = result_urls.len(),
                kept = MAX_RESULT_URLS,
                "the task lists more result URLs than the daemon takes; keeping the first ones"
            );
            result_urls.truncate(MAX_RESULT_URLS);
        }
        if state == TaskState::Success && result_urls.is_empty() {
            return Err(ApiError::Malformed("success without result URLs".into()));
        }
        let cost_time_ms = match data.cost_time {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().or_else(|| n.as_f64().map(|f| f as u64))
            }
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            _ => None,
        };
        Ok(TaskStatus {
            task_id,
            state,
            result_urls,
            fail_code: data.fail_code.filter(|s| !s.is_empty()),
            fail_msg: data
                .fail_msg
                .filter(|s| !s.is_empty())
                .map(|s| crate::redact::presigned(&s).into_owned()),
            cost_time_ms,
        })
    }
}

/// Parses a whole status envelope (as a callback body carries it).
pub(crate) fn parse_status_envelope(bytes: &[u8]) -> Result<TaskStatus, ApiError> {
    let env: Envelope = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::Malformed(format!("not the envelope: {e}")))?;
    let data = env
        .data
        .ok_or_else(|| ApiError::Malformed("no data".into()))?;
    TaskStatus::from_data(data, None)
}

/// The client of one API root with one key.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    auth: String,
    timeout: Duration,
    max_retry_after: Duration,
    /// Held while an answer over [`MAX_BODY_BYTES`] is read and parsed.
    large: Arc<Semaphore>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    pub fn new(http: reqwest::Client, base: &str, key: &ApiKey, timeout: Duration) -> Self {
        ApiClient {
            http,
            base: base.trim_end_matches('/').to_owned(),
            auth: format!("Bearer {}", key.expose()),
            timeout,
            max_retry_after: MAX_RETRY_AFTER,
            large: Arc::new(Semaphore::new(1)),
        }
    }

    /// Sets the longest `Retry-After` honoured (at most [`MAX_RETRY_AFTER`]).
    pub fn with_max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max.min(MAX_RETRY_AFTER);
        self
    }

    /// Submits one row; returns the task id.
    ///
    /// An answer that was lost or unreadable after the request left is
    /// [`ApiError::Ambiguous`]: the service may have created the task.
    pub async fn submit(&self, body: &SubmitBody<'_>) -> Result<String, ApiError> {
        let req = self
            .http
            .post(format!("{}{SUBMIT_PATH}", self.base))
            .header(reqwest::header::AUTHORIZATION, &self.auth)
            .timeout(self.timeout)
            .json(body);
        let answer = self.send(req).await.map_err(Failure::ambiguous)?;
        answer
            .data
            .get("taskId")
            .and_then(|v| match v {
                serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .ok_or_else(|| ApiError::Ambiguous("submit answer has no data.taskId".into()))
    }

    /// Asks where a task is.
    pub async fn status(&self, task_id: &str) -> Result<TaskStatus, ApiError> {
        let req = self
            .http
            .get(format!("{}{STATUS_PATH}", self.base))
            .query(&[("taskId", task_id)])
            .header(reqwest::header::AUTHORIZATION, &self.auth)
            .timeout(self.timeout);
        let answer = self.send(req).await.map_err(|f| f.error)?;
        TaskStatus::from_data(answer.data, Some(task_id))
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Answer<'_>, Failure> {
        let mut resp = req.send().await.map_err(|e| Failure {
            lost_after_sending: sent(&e),
            error: network(e),
        })?;
        let http = resp.status().as_u16();
        let ok = resp.status().is_success();
        let retry_after = retry_after(resp.headers(), self.max_retry_after);
        let (bytes, large) = match read_capped(&mut resp, &self.large).await {
            Ok(read) => read,
            Err(error) => {
                return Err(Failure {
                    lost_after_sending: ok,
                    error,
                });
            }
        };
        let env: Option<Envelope> = serde_json::from_slice(&bytes).ok();
        // A 2xx whose body cannot be read as the envelope: the service did
        // something with the request and we cannot tell what.
        let unreadable = |error| Failure {
            lost_after_sending: ok,
            error,
        };
        match env {
            Some(env) if http == 200 && env.code == Some(200) => match env.data {
                Some(data) => Ok(Answer {
                    data,
                    _large: large,
                }),
                None => Err(unreadable(ApiError::Malformed(
                    "success without data".into(),
                ))),
            },
            Some(env) if ok && env.code.is_none() => Err(unreadable(ApiError::Malformed(
                "answer without a code".into(),
            ))),
            Some(env) => {
                let message = env.message.unwrap_or_default();
                Err(Failure::refused(ApiError::from_codes(
                    http,
                    env.code,
                    message,
                    retry_after,
                )))
            }
            None if ok => Err(unreadable(ApiError::Malformed(format!(
                "body is not JSON: {:?}",
                crate::redact::presigned(&String::from_utf8_lossy(&bytes[..bytes.len().min(120)]))
            )))),
            None => {
                let message = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
                Err(Failure::refused(ApiError::from_codes(
                    http,
                    None,
                    message,
                    retry_after,
                )))
            }
        }
    }
}

/// The `data` of an accepted answer, with the permit of a large one (kept
/// until its caller has parsed it).
struct Answer<'a> {
    data: serde_json::Value,
    _large: Option<SemaphorePermit<'a>>,
}

/// A failed request, and whether it left and its answer was lost (what
/// makes a submit ambiguous).
struct Failure {
    error: ApiError,
    lost_after_sending: bool,
}

impl Failure {
    /// The service answered, readably, and did not accept the request.
    fn refused(error: ApiError) -> Failure {
        Failure {
            error,
            lost_after_sending: false,
        }
    }

    /// A submit's failure: lost after sending means ambiguous.
    fn ambiguous(self) -> ApiError {
        if self.lost_after_sending {
            ApiError::Ambiguous(self.error.to_string())
        } else {
            self.error
        }
    }
}

/// Whether a request that failed with `e` may have reached the service.
/// Only a failure to connect (refused, DNS, connect timeout) or to build the
/// request proves it never left.
fn sent(e: &reqwest::Error) -> bool {
    !(e.is_connect() || e.is_builder())
}

/// `Retry-After` in seconds, clamped to `max` (an HTTP date, or anything
/// else, is ignored).
fn retry_after(headers: &reqwest::header::HeaderMap, max: Duration) -> Option<Duration> {
    let secs = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()?;
    let asked = Duration::from_secs(secs);
    if asked > max {
        tracing::warn!(
            asked_secs = secs,
            clamped_to = ?max,
            "the API asked to wait longer than the daemon ever waits; clamped"
        );
    }
    Some(asked.min(max))
}

/// Reads a body chunk by chunk: up to [`MAX_BODY_BYTES`] freely, up to
/// [`MAX_LARGE_BODY_BYTES`] while holding `large`'s one permit (returned, to
/// be held while the body is parsed). A longer body is dropped (and its
/// connection with it) as malformed.
async fn read_capped<'a>(
    resp: &mut reqwest::Response,
    large: &'a Semaphore,
) -> Result<(Vec<u8>, Option<SemaphorePermit<'a>>), ApiError> {
    let over = |len: u64| {
        ApiError::Malformed(format!(
            "answer body of {len} bytes is over the {MAX_LARGE_BODY_BYTES}-byte limit"
        ))
    };
    let announced = resp.content_length().unwrap_or(0);
    if announced > MAX_LARGE_BODY_BYTES as u64 {
        return Err(over(announced));
    }
    // The semaphore is never closed, so a permit always comes; the wait is
    // bounded by the holder's request timeout (body included).
    let mut permit = None;
    if announced > MAX_BODY_BYTES as u64 {
        permit = large.acquire().await.ok();
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(network)? {
        let len = out.len() + chunk.len();
        if len > MAX_LARGE_BODY_BYTES {
            return Err(over(len as u64));
        }
        if len > MAX_BODY_BYTES && permit.is_none() {
            permit = large.acquire().await.ok();
        }
        out.extend_from_slice(&chunk);
    }
    Ok((out, permit))
}

fn network(e: reqwest::Error) -> ApiError {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    };
    ApiError::Network(format!("{kind}: {}", error_chain(&e)))
}

/// An error with its sources, on one line, without the query of a signed
/// URL (an HTTP client's errors name the URL).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    crate::redact::presigned(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_answers() {
        let c = |http, code, msg: &str| ApiError::from_codes(http, code, msg.into(), None);
        assert!(c(503, None, "x").is_transient());
        assert!(c(200, Some(500), "x").is_transient());
        assert!(c(429, None, "slow down").is_rate_limit());
        assert_eq!(
            c(400, Some(400), "Insufficient credits").pause_reason(),
            Some(PauseReason::InsufficientCredits)
        );
        assert_eq!(
            c(402, None, "").pause_reason(),
            Some(PauseReason::InsufficientCredits)
        );
        assert_eq!(
            c(200, Some(401), "").pause_reason(),
            Some(PauseReason::Unauthorized)
        );
        let refused = c(400, Some(400), "input.seed: bad");
        assert!(!refused.is_transient() && refused.pause_reason().is_none());
        assert_eq!(refused.fail_code(), "HTTP_400");
    }

    /// A server that answers every connection with `answer` (raw HTTP), or
    /// closes it at once when `answer` is empty.
    async fn raw_server(answer: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = s.read(&mut buf).await;
                if !answer.is_empty() {
                    let _ = s.write_all(answer.as_bytes()).await;
                }
            }
        });
        format!("http://{addr}")
    }

    async fn submit_to(base: &str) -> Result<String, ApiError> {
        let client = ApiClient::new(
            reqwest::Client::new(),
            base,
            &ApiKey::new("k"),
            Duration::from_secs(5),
        );
        let spec = RowSpec {
            image_url: "https://x/i.png".into(),
            mask_url: None,
            audio_url: "https://x/a.mp3".into(),
            prompt: None,
            resolution: None,
            seed: None,
            provider: None,
        };
        let defaults = RowDefaults::default();
        client
            .submit(&SubmitBody::new(&spec, &defaults, None))
            .await
    }

    #[tokio::test]
    async fn a_submit_never_sent_is_not_ambiguous_one_sent_and_lost_is() {
        // Nothing listens: never sent, safe to retry.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let e = submit_to(&format!("http://{closed}"))
            .await
            .expect_err("refused");
        assert!(e.is_transient() && !e.is_ambiguous(), "{e}");
        // Sent, then the connection closed without an answer.
        let e = submit_to(&raw_server("").await).await.expect_err("lost");
        assert!(e.is_ambiguous() && !e.is_transient(), "{e}");
        // Sent, answered 200 with garbage.
        let garbage = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n<html";
        let e = submit_to(&raw_server(garbage).await)
            .await
            .expect_err("garbage");
        assert!(e.is_ambiguous(), "{e}");
        // The service refused it: transient, not ambiguous.
        let busy = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbusy";
        let e = submit_to(&raw_server(busy).await).await.expect_err("503");
        assert!(e.is_transient() && !e.is_ambiguous(), "{e}");
        // An absurd Retry-After is clamped.
        let slow = "HTTP/1.1 429 Too Many Requests\r\nretry-after: 99999999999\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
        let e = submit_to(&raw_server(slow).await).await.expect_err("429");
        assert_eq!(e.retry_after(), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn result_urls_are_capped() {
        let urls: Vec<String> = (0..10_000).map(|i| format!("http://x/{i}.mp4")).collect();
        let data = serde_json::json!({
            "taskId": "t1", "state": "success",
            "resultJson": serde_json::json!({"resultUrls": urls}).to_string(),
        });
        let s = TaskStatus::from_data(data, Some("t1")).expect("valid");
        assert_eq!(s.result_urls.len(), MAX_RESULT_URLS);
        assert_eq!(s.result_urls[0], "http://x/0.mp4");
    }

    #[test]
    fn parses_status_with_result_json_string() {
        let data = serde_json::json!({
            "taskId": "t1", "state": "success",
            "resultJson": "{\"resultUrls\":[\"http://x/a.mp4\"]}",
            "costTime": 1234
        });
        let s = TaskStatus::from_data(data, Some("t1")).expect("valid");
        assert_eq!(s.state, TaskState::Success);
        assert_eq!(s.result_urls, vec!["http://x/a.mp4"]);
        assert_eq!(s.cost_time_ms, Some(1234));
    }

    #[test]
    fn success_without_urls_is_malformed() {
        let data = serde_json::json!({"taskId": "t1", "state": "success"});
        assert!(TaskStatus::from_data(data, Some("t1")).is_err());
    }

    #[test]
    fn body_matches_contract() {
        let spec = RowSpec {
            image_url: "https://x/i.png".into(),
            mask_url: Some("https://x/m.png".into()),
            audio_url: "https://x/a.mp3".into(),
            prompt: None,
            resolution: None,
            seed: Some(7),
            provider: None,
        };
        let defaults = RowDefaults::default();
        let body = serde_json::to_value(SubmitBody::new(&spec, &defaults, None)).expect("json");
        assert_eq!(
            body,
            serde_json::json!({
                "request_type": "async", "provider": "auto",
                "input": {"mode": "image-to-video", "image_urls": ["https://x/i.png", "https://x/m.png"],
                          "audio_urls": ["https://x/a.mp3"], "prompt": "", "resolution": "480p", "seed": 7}
            })
        );
    }
}
