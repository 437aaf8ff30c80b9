//! A faithful, strict simulator of the APIXO InfiniteTalk API.
//!
//! It is the oracle of every other test and what users try the tool against
//! without a key, so it errs on the side of strictness: bodies are validated
//! field by field, limits answer 429 exactly at the limit, and every kind of
//! trouble the real network and service can cause is available as a fault.
//!
//! - [`validate`]: the submit body, field by field.
//! - [`state`]: tasks, limits, counters, faults, behind one mutex that is never
//!   held across an `.await`.
//! - [`server`]: the HTTP surface and the hand-written accept loop (needed so a
//!   request can end with its connection dropped and no answer at all).
//! - [`callback`]: callback delivery with the service's retry schedule.
//! - [`persist`]: the task table on disk (`--tasks-file`), so that tasks
//!   outlive a crash of the process that hosts the simulator.
//! - [`video`]: the result files.
//!
//! It must never: count admin routes (`/sim/...`) toward limits, inject faults
//! into them, or leave a spawned task running after shutdown.

mod callback;
mod inputs;
mod persist;
mod server;
mod state;
mod validate;
mod video;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use video::{MAX_VIDEO_BYTES, SAMPLE_MP4, result_video, sha256_hex};

/// A silent 8 kHz mono WAV file of `seconds` (at most 600), the audio the
/// simulator serves under `/media`: for tests and examples that need real
/// audio files.
pub fn silent_wav_bytes(seconds: f64) -> Vec<u8> {
    server::silent_wav(seconds)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 250ms, 15s, 2m)"))
}

fn parse_probability(s: &str) -> Result<f64, String> {
    let p: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err("must be between 0.0 and 1.0".into())
    }
}

fn parse_time_factor(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if f.is_finite() && f >= 0.0 {
        Ok(f)
    } else {
        Err("must be a finite number >= 0".into())
    }
}

/// Options of the simulator, as flags of `simulate` (and settable in tests).
///
/// `Default` gives the documented defaults (those of the flags).
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimArgs {
    /// API key to require; without it any non-empty bearer key is accepted.
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// API requests (submits + status queries) accepted in any sliding 60 s window.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_requests_per_minute: u32,
    /// Unfinished tasks allowed at once; a submit at the cap answers 429.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_concurrent: u32,
    /// Multiplies every simulated duration (processing is audio seconds x 10..30 s).
    #[arg(long, value_name = "F", default_value_t = 0.02, value_parser = parse_time_factor)]
    pub time_factor: f64,
    /// Seed of the random generator behind durations and faults [default: random].
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Lifetime of result URLs; each status query signs fresh ones.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub result_ttl: Duration,
    /// Start answering "Insufficient credits" this long after start.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub credits_out_after: Option<Duration>,
    /// End the credits outage this long after it began [default: never].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub credits_out_for: Option<Duration>,
    /// Start answering 401 to every API request this long after start.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub unauthorized_after: Option<Duration>,
    /// End the 401 period this long after it began [default: never].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub unauthorized_for: Option<Duration>,
    /// Faults in effect at start (changeable at runtime through `PUT /sim/faults`).
    #[command(flatten)]
    pub faults: Faults,
    /// Keep the tasks in this file, so that they survive a restart (as the
    /// real service's do); the previous port is taken again if free
    /// [default: tasks live in memory only].
    #[arg(long, value_name = "FILE")]
    pub tasks_file: Option<PathBuf>,
}

impl Default for SimArgs {
    fn default() -> Self {
        Self {
            key: None,
            max_requests_per_minute: 10_000,
            max_concurrent: 1000,
            time_factor: 0.02,
            seed: None,
            result_ttl: Duration::from_secs(24 * 3600),
            credits_out_after: None,
            credits_out_for: None,
            unauthorized_after: None,
            unauthorized_for: None,
            faults: Faults::default(),
            tasks_file: None,
        }
    }
}

/// How an outage of credits shows, as the API's docs describe it three ways.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum CreditsStyle {
    /// HTTP 400, body code 400, message "Insufficient credits".
    #[default]
    #[value(name = "400")]
    #[serde(rename = "400")]
    Http400,
    /// HTTP 402, body code 402.
    #[value(name = "402")]
    #[serde(rename = "402")]
    Http402,
    /// The submit is accepted; the task fails with `INSUFFICIENT_CREDITS`.
    #[value(name = "task")]
    #[serde(rename = "task")]
    Task,
}

/// Injected trouble, settable at start (flags) and at runtime.
///
/// Probabilities are per request, 0.0 to 1.0, drawn independently. They apply
/// to the API routes and downloads, never to `/sim/...`.
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Probability of an HTTP 500 or 503 answer with an error envelope.
    #[arg(long = "error-5xx", value_name = "P", default_value_t = 0.0, value_parser = parse_probability)]
    pub error_5xx: f64,
    /// Probability that the connection is closed with no answer at all.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = parse_probability)]
    pub reset: f64,
    /// Probability of an HTTP 200 whose body is cut JSON (API routes only).
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = parse_probability)]
    pub malformed: f64,
    /// Probability that an answer is delayed by `slow_ms`.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = parse_probability)]
    pub slow: f64,
    /// Delay of a slow answer, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub slow_ms: u64,
    /// Probability that a download stops part-way (after a full Content-Length).
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = parse_probability)]
    pub cut_download: f64,
    /// Probability that a submit creates its task and then drops the connection.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = parse_probability)]
    pub lost_submit_answer: f64,
    /// Probability that a submit creates its task and then answers HTTP 200
    /// with garbage instead of the envelope.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = parse_probability)]
    pub garbage_submit_answer: f64,
    /// Probability that an API request is answered 429 with an absurd
    /// `Retry-After: 99999999999`.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = parse_probability)]
    pub absurd_retry_after: f64,
    /// Probability that a status answer is HTTP 200 with a 100 MB body
    /// (streamed, never held in memory).
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = parse_probability)]
    pub huge_status_body: f64,
    /// Probability that a download is answered with a body that never ends
    /// (no Content-Length).
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = parse_probability)]
    pub endless_download: f64,
    /// Answer every submit with "Insufficient credits", in `credits_style`.
    #[arg(long)]
    pub credits_out: bool,
    /// How "Insufficient credits" shows.
    #[arg(long, value_enum, value_name = "400|402|task", default_value = "400")]
    pub credits_style: CreditsStyle,
    /// Answer every API request 401.
    #[arg(long)]
    pub unauthorized: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            error_5xx: 0.0,
            reset: 0.0,
            malformed: 0.0,
            slow: 0.0,
            slow_ms: 1000,
            cut_download: 0.0,
            lost_submit_answer: 0.0,
            garbage_submit_answer: 0.0,
            absurd_retry_after: 0.0,
            huge_status_body: 0.0,
            endless_download: 0.0,
            credits_out: false,
            credits_style: CreditsStyle::Http400,
            unauthorized: false,
        }
    }
}

/// Injected faults, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct FaultCounts {
    pub error_5xx: u64,
    pub reset: u64,
    pub malformed: u64,
    pub slow: u64,
    pub cut_download: u64,
    pub lost_submit_answer: u64,
    pub garbage_submit_answer: u64,
    pub absurd_retry_after: u64,
    pub huge_status_body: u64,
    pub endless_download: u64,
    /// Submits answered "Insufficient credits" (any style, `task` included).
    pub credits_out: u64,
    /// API requests answered 401 because of the `unauthorized` mode.
    pub unauthorized: u64,
}

/// What the simulator has seen, for tests to check the daemon's behaviour.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SimStats {
    /// Requests that arrived at the submit endpoint, whatever the answer.
    pub submit_requests: u64,
    /// Requests that arrived at the status endpoint, whatever the answer.
    pub status_requests: u64,
    /// Requests for result files, whatever the answer.
    pub download_requests: u64,
    /// Every 429 answered.
    pub rejected_429: u64,
    /// 429s because the sliding 60 s window was full.
    pub rejected_429_window: u64,
    /// 429s because the cap on unfinished tasks was reached.
    pub rejected_429_concurrency: u64,
    /// Every 401 answered (missing/wrong key and the `unauthorized` mode).
    pub rejected_401: u64,
    /// Every 400 answered (invalid requests and credits outages in style 400).
    pub rejected_400: u64,
    /// Injected faults by kind.
    pub faults: FaultCounts,
    /// API requests in the sliding 60 s window now.
    pub requests_in_window: u64,
    /// The most API requests ever seen in one 60 s window, answered 429 or not.
    pub max_requests_in_window: u64,
    /// Tasks unfinished now.
    pub unfinished_tasks: u64,
    /// The most tasks ever unfinished at once.
    pub max_unfinished_tasks: u64,
    pub tasks_created: u64,
    /// Tasks whose processing has ended in success (counted when asked).
    pub tasks_succeeded: u64,
    /// Tasks whose processing has ended in failure (counted when asked).
    pub tasks_failed: u64,
    /// Callback POSTs attempted (retries included).
    pub callbacks_sent: u64,
    /// Callback POSTs answered HTTP 200 in time.
    pub callbacks_acknowledged: u64,
    /// Callbacks abandoned after the last retry.
    pub callbacks_given_up: u64,
    /// The most tasks created for one (image_urls, audio_url) pair.
    pub max_submissions_per_pair: u64,
    /// Pairs for which more than one task was created.
    pub pairs_submitted_more_than_once: u64,
}

/// One task as the simulator sees it, for tests.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TaskInfo {
    pub task_id: String,
    pub image_urls: Vec<String>,
    pub audio_url: String,
    /// The `callback_url` the submit gave (callback mode only).
    #[serde(default)]
    pub callback_url: Option<String>,
    /// `pending`, `processing`, `success` or `failed`, as of now.
    pub state: String,
    pub fail_code: Option<String>,
    /// The files of a successful task (empty otherwise); at most the first
    /// 16 of them (`sim_results` may ask for up to 10,000 URLs).
    pub results: Vec<ResultFile>,
}

/// One result file of a successful task.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ResultFile {
    /// Position in `resultUrls`, from 0; also the `N` of `/files/ID/N.mp4`.
    pub index: usize,
    /// Lower-case hex SHA-256 of the file's bytes.
    pub sha256: String,
    pub len: u64,
}

/// Why the simulator could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client for callbacks could not be built.
    #[error("cannot build the callback HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// The tasks file (`tasks_file`) could not be read or written.
    #[error("simulator tasks file {path}: {source}")]
    TasksFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A running simulator.
pub struct SimHandle {
    pub addr: SocketAddr,
    shared: Arc<state::Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl SimHandle {
    /// `http://ADDR`, the value for `--api-base`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> SimStats {
        self.shared.stats()
    }

    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// Replaces the faults in effect.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.set_faults(faults);
    }

    /// Every task created so far, oldest first.
    pub fn tasks(&self) -> Vec<TaskInfo> {
        self.shared.tasks()
    }

    /// Download requests of result file `index` of `task_id` so far.
    pub fn downloads_of(&self, task_id: &str, index: usize) -> u64 {
        self.shared.downloads_of(task_id, index)
    }

    /// Resolves when the server, its connections, callbacks and timers have
    /// stopped (after the shutdown token was cancelled).
    pub async fn stopped(self) {
        let _ = self.server.await;
    }
}

/// Binds `addr` (port 0 allowed) and serves until `shutdown` is cancelled.
pub async fn start(
    addr: SocketAddr,
    args: SimArgs,
    shutdown: CancellationToken,
) -> Result<SimHandle, SimError> {
    let saved = match &args.tasks_file {
        Some(path) => Some(persist::load(path).map_err(|source| SimError::TasksFile {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let listener = bind(addr, saved.as_ref().and_then(|s| s.addr)).await?;
    let local = listener
        .local_addr()
        .map_err(|source| SimError::Bind { addr, source })?;
    let shared = state::Shared::new(args, local, shutdown.clone(), saved)?;
    state::spawn_period_toggles(&shared);
    for (id, url) in shared.callbacks_owed() {
        shared
            .tracker
            .spawn(callback::deliver(Arc::clone(&shared), id, url));
    }
    let server = tokio::spawn(server::serve(listener, Arc::clone(&shared)));
    Ok(SimHandle {
        addr: local,
        shared,
        server,
    })
}

/// Binds `addr`; for "any port" on the address a previous run used, its port
/// first, so that result URLs handed out before a restart still reach us.
async fn bind(
    addr: SocketAddr,
    previous: Option<SocketAddr>,
) -> Result<tokio::net::TcpListener, SimError> {
    if let Some(prev) = previous
        && addr.port() == 0
        && prev.ip() == addr.ip()
    {
        match tokio::net::TcpListener::bind(prev).await {
            Ok(l) => return Ok(l),
            Err(e) => tracing::warn!(
                port = prev.port(),
                error = %e,
                "simulator: its previous port is taken; result URLs given out before the restart point at that port and will fail (status queries give new ones)"
            ),
        }
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| SimError::Bind { addr, source })
}

/// The simulator of `run --simulate`, on loopback, keeping its tasks in
/// `state_dir`: a crash of the daemon then looks to it like a client
/// restart, and tasks in flight at the crash finish as they would with the
/// real service.
pub async fn start_in_process(
    state_dir: &Path,
    shutdown: CancellationToken,
) -> Result<SimHandle, SimError> {
    let args = SimArgs {
        tasks_file: Some(state_dir.join(IN_PROCESS_TASKS_FILE)),
        ..SimArgs::default()
    };
    start(SocketAddr::from(([127, 0, 0, 1], 0)), args, shutdown).await
}

/// The file, in the state folder, that holds the tasks of `run --simulate`.
pub const IN_PROCESS_TASKS_FILE: &str = "simulator-tasks.jsonl";

/// Runs the `simulate` command until SIGINT/SIGTERM (prints the listening URL
/// on stderr first).
pub async fn run_standalone(listen: SocketAddr, args: SimArgs) -> anyhow::Result<()> {
    // Handlers first: a signal that arrives once the port answers is ours.
    let signal = stop_signal()?;
    let shutdown = CancellationToken::new();
    let summary = format!(
        "max {} requests/min, max {} concurrent tasks, time factor {}, result URLs valid {}{}",
        args.max_requests_per_minute,
        args.max_concurrent,
        args.time_factor,
        humantime::format_duration(args.result_ttl),
        if args.key.is_some() {
            ", key required"
        } else {
            ", any key"
        },
    );
    let handle = start(listen, args, shutdown.clone()).await?;
    eprintln!(
        "infinitetalk-batch simulator listening on {} ({summary})",
        handle.base_url()
    );
    signal.await?;
    eprintln!("infinitetalk-batch simulator stopping");
    shutdown.cancel();
    handle.stopped().await;
    Ok(())
}

/// Installs the SIGINT/SIGTERM handlers now; the future resolves on either.
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            Ok(())
        })
    }
    #[cfg(not(unix))]
    Ok(tokio::signal::ctrl_c())
}
