//! Tasks, limits, counters and faults of one simulator, behind one mutex.
//!
//! A task's state is derived from the clock when asked (created, processing
//! from, ends at), so no timer has to run for a task nobody polls; only
//! callbacks need a spawned task. The mutex is a std one and is never held
//! across an `.await`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::persist::{self, Journal, Saved, SavedTask};
use super::validate::SubmitRequest;
use super::video::{self, MAX_VIDEO_BYTES};
use super::{Faults, ResultFile, SimArgs, SimError, SimStats, TaskInfo};

/// The window of the request limit, as the service publishes it ("per minute").
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Most result URLs `sim_results` may ask for (a hostile task lists many).
const MAX_RESULTS: usize = 10_000;
/// Result files listed (and hashed) per task in [`Shared::tasks`].
const LISTED_RESULTS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Submit,
    Status,
    Download,
}

/// The faults drawn for one request, decided when it arrives.
#[derive(Debug, Default)]
pub(crate) struct Draw {
    pub slow: Option<Duration>,
    pub reset: bool,
    pub error_5xx: Option<u16>,
    pub malformed: bool,
    pub cut_download: bool,
    pub lost_submit_answer: bool,
    pub garbage_submit_answer: bool,
    pub absurd_retry_after: bool,
    pub huge_status_body: bool,
    pub endless_download: bool,
    pub unauthorized: bool,
    /// The sliding window already held the limit before this request.
    pub over_limit: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Outcome {
    Success { results: usize, pad: Option<usize> },
    Failed { code: String, msg: String },
}

struct Task {
    id: String,
    image_urls: Vec<String>,
    audio_url: String,
    callback_url: Option<String>,
    created: Instant,
    created_ms: u64,
    processing_at: Instant,
    ends_at: Instant,
    outcome: Outcome,
}

/// One reading of both clocks, to move instants to and from the wall clock.
#[derive(Clone, Copy)]
struct Clock {
    now: Instant,
    now_ms: u64,
}

impl Clock {
    fn read() -> Clock {
        Clock {
            now: Instant::now(),
            now_ms: now_ms(),
        }
    }

    fn wall_ms(self, t: Instant) -> u64 {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if t >= self.now {
            self.now_ms.saturating_add(ms(t - self.now))
        } else {
            self.now_ms.saturating_sub(ms(self.now - t))
        }
    }

    fn instant_at(self, ms: u64) -> Instant {
        if ms >= self.now_ms {
            self.now + Duration::from_millis(ms - self.now_ms)
        } else {
            let back = Duration::from_millis(self.now_ms - ms);
            // No Instant reaches back before this machine's boot; only tasks
            // long finished land there, whose exact past is moot (durations
            // between instants saturate at zero).
            self.now.checked_sub(back).unwrap_or(self.now)
        }
    }
}

impl Task {
    fn saved(&self, clock: Clock) -> SavedTask {
        SavedTask {
            id: self.id.clone(),
            image_urls: self.image_urls.clone(),
            audio_url: self.audio_url.clone(),
            callback_url: self.callback_url.clone(),
            created_ms: self.created_ms,
            processing_ms: clock.wall_ms(self.processing_at),
            ends_ms: clock.wall_ms(self.ends_at),
            outcome: self.outcome.clone(),
        }
    }

    fn from_saved(t: SavedTask, clock: Clock) -> Task {
        Task {
            created: clock.instant_at(t.created_ms),
            processing_at: clock.instant_at(t.processing_ms),
            ends_at: clock.instant_at(t.ends_ms),
            id: t.id,
            image_urls: t.image_urls,
            audio_url: t.audio_url,
            callback_url: t.callback_url,
            created_ms: t.created_ms,
            outcome: t.outcome,
        }
    }

    fn state(&self, now: Instant) -> &'static str {
        if now < self.processing_at {
            "pending"
        } else if now < self.ends_at {
            "processing"
        } else if matches!(self.outcome, Outcome::Success { .. }) {
            "success"
        } else {
            "failed"
        }
    }
}

struct Inner {
    tasks: HashMap<String, Task>,
    order: Vec<String>,
    /// Arrival instants of API requests in the last [`WINDOW`].
    window: VecDeque<Instant>,
    /// End instants of unfinished tasks, earliest first.
    unfinished: BinaryHeap<Reverse<Instant>>,
    pairs: HashMap<(Vec<String>, String), u64>,
    /// Download requests per result file (`task id`, index), so tests can
    /// tell that a stored file was never fetched again.
    downloads: HashMap<(String, usize), u64>,
    stats: SimStats,
    faults: Faults,
    rng: StdRng,
    /// The task table on disk (`tasks_file`), if any.
    journal: Option<Journal>,
}

impl Inner {
    /// Records a new task in the journal; compacts it when it has grown.
    /// A failed write is logged, and the simulator goes on in memory.
    fn journal_task(&mut self, id: &str) {
        let Some(journal) = self.journal.as_mut() else {
            return;
        };
        let clock = Clock::read();
        let Some(task) = self.tasks.get(id) else {
            return;
        };
        if let Err(e) = journal.append(&task.saved(clock)) {
            tracing::warn!(error = %e, "simulator: cannot record a task in its tasks file");
        }
        if !journal.wants_compaction(self.tasks.len()) {
            return;
        }
        let mut kept: Vec<SavedTask> = self
            .order
            .iter()
            .filter_map(|id| self.tasks.get(id))
            .map(|t| t.saved(clock))
            .collect();
        persist::prune(&mut kept, clock.now_ms);
        // Memory follows the file, so that neither grows without bound.
        let keep: std::collections::HashSet<&str> = kept.iter().map(|t| t.id.as_str()).collect();
        self.tasks.retain(|id, _| keep.contains(id.as_str()));
        self.order.retain(|id| keep.contains(id.as_str()));
        if let Err(e) = journal.rewrite(&kept) {
            tracing::warn!(error = %e, "simulator: cannot compact its tasks file");
        }
    }

    fn prune(&mut self, now: Instant) {
        while self
            .window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            self.window.pop_front();
        }
        while self.unfinished.peek().is_some_and(|Reverse(t)| *t <= now) {
            self.unfinished.pop();
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random::<f64>() < p
    }
}

/// How many result files a task has, and the size they are padded to.
type FileSpec = (usize, Option<usize>);

/// Why a submit created no task.
pub(crate) enum SubmitRefused {
    /// The cap on unfinished tasks is reached.
    Concurrency,
}

pub(crate) struct Shared {
    pub args: SimArgs,
    pub shutdown: CancellationToken,
    /// Owns every spawned task: connections, callbacks, period toggles.
    pub tracker: TaskTracker,
    pub client: reqwest::Client,
    base_url: String,
    /// Signs result URLs; random per run so old URLs die with the process.
    secret: String,
    inner: Mutex<Inner>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Shared {
    /// `saved`: what [`persist::load`] read from `args.tasks_file`.
    pub(super) fn new(
        args: SimArgs,
        addr: SocketAddr,
        shutdown: CancellationToken,
        saved: Option<Saved>,
    ) -> Result<Arc<Self>, SimError> {
        let rng = match args.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(SimError::Client)?;
        // A wildcard bind is reachable through loopback; its own address is not.
        let host = if addr.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
        } else {
            addr
        };
        let mut saved = saved.unwrap_or_default();
        // Kept across restarts with the tasks, so that result URLs signed
        // before a crash stay valid after it.
        let secret = saved
            .secret
            .take()
            .unwrap_or_else(|| video::hex(&rand::random::<[u8; 16]>()));
        let clock = Clock::read();
        persist::prune(&mut saved.tasks, clock.now_ms);
        let journal = match &args.tasks_file {
            Some(path) => Some(Journal::create(path, &secret, addr, &saved.tasks).map_err(
                |source| SimError::TasksFile {
                    path: path.clone(),
                    source,
                },
            )?),
            None => None,
        };
        let mut inner = Inner {
            tasks: HashMap::new(),
            order: Vec::new(),
            window: VecDeque::new(),
            unfinished: BinaryHeap::new(),
            pairs: HashMap::new(),
            downloads: HashMap::new(),
            stats: SimStats::default(),
            faults: args.faults.clone(),
            rng,
            journal,
        };
        for t in saved.tasks {
            let task = Task::from_saved(t, clock);
            if task.ends_at > clock.now {
                inner.unfinished.push(Reverse(task.ends_at));
            }
            // `sim_fail_once` stays "once" across a restart.
            *inner
                .pairs
                .entry((task.image_urls.clone(), task.audio_url.clone()))
                .or_insert(0) += 1;
            inner.order.push(task.id.clone());
            inner.tasks.insert(task.id.clone(), task);
        }
        Ok(Arc::new(Self {
            inner: Mutex::new(inner),
            args,
            shutdown,
            tracker: TaskTracker::new(),
            client,
            base_url: format!("http://{host}"),
            secret,
        }))
    }

    /// `http://HOST:PORT` of the simulator itself.
    pub(super) fn base_url(&self) -> &str {
        &self.base_url
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain counters behind: still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    pub(super) fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    pub(super) fn update_faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.lock().faults);
    }

    pub(super) fn record(&self, f: impl FnOnce(&mut SimStats)) {
        f(&mut self.lock().stats);
    }

    /// Counts an arriving request and draws its faults.
    ///
    /// API requests (submit, status) enter the sliding window whatever their
    /// answer will be, 429s included, as the arrival is what a server counts.
    pub(super) fn arrive(&self, endpoint: Endpoint) -> Draw {
        let now = Instant::now();
        let mut g = self.lock();
        let inner = &mut *g;
        inner.prune(now);
        let mut draw = Draw::default();
        match endpoint {
            Endpoint::Submit => inner.stats.submit_requests += 1,
            Endpoint::Status => inner.stats.status_requests += 1,
            Endpoint::Download => inner.stats.download_requests += 1,
        }
        if endpoint != Endpoint::Download {
            draw.over_limit = inner.window.len() >= self.args.max_requests_per_minute as usize;
            inner.window.push_back(now);
            let n = inner.window.len() as u64;
            inner.stats.max_requests_in_window = inner.stats.max_requests_in_window.max(n);
        }
        let f = inner.faults.clone();
        if inner.chance(f.slow) {
            inner.stats.faults.slow += 1;
            draw.slow = Some(Duration::from_millis(f.slow_ms));
        }
        if inner.chance(f.reset) {
            inner.stats.faults.reset += 1;
            draw.reset = true;
            return draw;
        }
        if inner.chance(f.error_5xx) {
            inner.stats.faults.error_5xx += 1;
            draw.error_5xx = Some(if inner.rng.random::<bool>() { 500 } else { 503 });
            return draw;
        }
        if endpoint != Endpoint::Download && inner.chance(f.absurd_retry_after) {
            inner.stats.faults.absurd_retry_after += 1;
            draw.absurd_retry_after = true;
            return draw;
        }
        match endpoint {
            Endpoint::Download => {
                if inner.chance(f.endless_download) {
                    inner.stats.faults.endless_download += 1;
                    draw.endless_download = true;
                    return draw;
                }
                if inner.chance(f.cut_download) {
                    inner.stats.faults.cut_download += 1;
                    draw.cut_download = true;
                }
            }
            Endpoint::Submit | Endpoint::Status => {
                if inner.chance(f.malformed) {
                    inner.stats.faults.malformed += 1;
                    draw.malformed = true;
                    return draw;
                }
                if f.unauthorized {
                    inner.stats.faults.unauthorized += 1;
                    draw.unauthorized = true;
                    return draw;
                }
                if endpoint == Endpoint::Submit && inner.chance(f.lost_submit_answer) {
                    // Counted when the task is really created and the answer dropped.
                    draw.lost_submit_answer = true;
                }
                if endpoint == Endpoint::Submit && inner.chance(f.garbage_submit_answer) {
                    // Counted when the task is really created.
                    draw.garbage_submit_answer = true;
                }
                if endpoint == Endpoint::Status && inner.chance(f.huge_status_body) {
                    inner.stats.faults.huge_status_body += 1;
                    draw.huge_status_body = true;
                    return draw;
                }
            }
        }
        draw
    }

    /// Creates a task, or refuses at the concurrency cap.
    ///
    /// `credits_out` makes the task fail with `INSUFFICIENT_CREDITS`.
    /// `input_fail`: the fail code of inputs that could not be fetched
    /// (see `inputs`); the task is created and fails with it.
    pub(super) fn create_task(
        &self,
        req: &SubmitRequest,
        credits_out: bool,
        input_fail: Option<(&str, String)>,
    ) -> Result<String, SubmitRefused> {
        let now = Instant::now();
        let mut g = self.lock();
        let inner = &mut *g;
        inner.prune(now);
        if inner.unfinished.len() >= self.args.max_concurrent as usize {
            return Err(SubmitRefused::Concurrency);
        }
        // Ids come from the OS generator, not the seeded one, so that they stay
        // unique across runs with the same --seed.
        let id = format!("sim-{}", video::hex(&rand::random::<[u8; 8]>()));

        let key = (req.image_urls.clone(), req.audio_url.clone());
        let count = {
            let c = inner.pairs.entry(key).or_insert(0);
            *c += 1;
            *c
        };
        if count == 2 {
            inner.stats.pairs_submitted_more_than_once += 1;
        }
        inner.stats.max_submissions_per_pair = inner.stats.max_submissions_per_pair.max(count);

        let mut urls: Vec<&str> = req.image_urls.iter().map(String::as_str).collect();
        urls.push(&req.audio_url);
        let failed_url = input_fail.as_ref().map(|(_, url)| url.clone());
        let fail_code = if credits_out {
            Some("INSUFFICIENT_CREDITS".to_string())
        } else if let Some((code, _)) = input_fail {
            Some(code.to_owned())
        } else if let Some(code) = marker(&urls, "sim_fail") {
            Some(code)
        } else if count == 1 {
            marker(&urls, "sim_fail_once")
        } else {
            None
        };

        let audio_seconds = audio_seconds(&req.audio_url);
        let tf = self.args.time_factor;
        let processing = audio_seconds * inner.rng.random_range(10.0..30.0) * tf;
        let processing = Duration::try_from_secs_f64(processing).unwrap_or(Duration::MAX / 4);
        // "Briefly" pending: a tenth of the work, at most a second.
        let pending = (processing / 10).min(Duration::from_secs(1));
        let processing_at = now + pending;
        // Running out of credits is found before any work is done.
        let ends_at = if credits_out {
            processing_at
        } else {
            processing_at + processing
        };
        let outcome = match fail_code {
            Some(code) => Outcome::Failed {
                msg: match failed_url.filter(|_| !credits_out) {
                    Some(url) => format!("{}: {url}", fail_message(&code)),
                    None => fail_message(&code),
                },
                code,
            },
            None => Outcome::Success {
                results: marker(&urls, "sim_results")
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(1)
                    .clamp(1, MAX_RESULTS),
                pad: marker(&urls, "sim_video_bytes")
                    .and_then(|v| v.parse::<usize>().ok())
                    .map(|n| n.min(MAX_VIDEO_BYTES)),
            },
        };
        inner.unfinished.push(Reverse(ends_at));
        let unfinished = inner.unfinished.len() as u64;
        inner.stats.max_unfinished_tasks = inner.stats.max_unfinished_tasks.max(unfinished);
        inner.stats.tasks_created += 1;
        inner.tasks.insert(
            id.clone(),
            Task {
                id: id.clone(),
                image_urls: req.image_urls.clone(),
                audio_url: req.audio_url.clone(),
                callback_url: req.callback_url.clone(),
                created: now,
                created_ms: now_ms(),
                processing_at,
                ends_at,
                outcome,
            },
        );
        inner.order.push(id.clone());
        inner.journal_task(&id);
        Ok(id)
    }

    /// Callback-mode tasks loaded from the tasks file that have not ended:
    /// their callbacks are owed still.
    pub(super) fn callbacks_owed(&self) -> Vec<(String, String)> {
        let now = Instant::now();
        let g = self.lock();
        g.order
            .iter()
            .filter_map(|id| g.tasks.get(id))
            .filter(|t| t.ends_at > now)
            .filter_map(|t| Some((t.id.clone(), t.callback_url.clone()?)))
            .collect()
    }

    pub(super) fn ends_at(&self, task_id: &str) -> Option<Instant> {
        self.lock().tasks.get(task_id).map(|t| t.ends_at)
    }

    /// The `data` of a status answer, with freshly signed result URLs.
    pub(super) fn status_data(&self, task_id: &str) -> Option<Value> {
        let now = Instant::now();
        let g = self.lock();
        let t = g.tasks.get(task_id)?;
        let state = t.state(now);
        let finished = matches!(state, "success" | "failed");
        let cost =
            u64::try_from(t.ends_at.duration_since(t.created).as_millis()).unwrap_or(u64::MAX);
        let mut data = json!({
            "taskId": t.id,
            "state": state,
            "resultJson": null,
            "failCode": null,
            "failMsg": null,
            "createTime": t.created_ms,
            "completeTime": if finished { json!(t.created_ms.saturating_add(cost)) } else { Value::Null },
            "costTime": if finished { json!(cost) } else { Value::Null },
        });
        match (&t.outcome, state) {
            (Outcome::Success { results, .. }, "success") => {
                let exp = now_ms().saturating_add(
                    u64::try_from(self.args.result_ttl.as_millis()).unwrap_or(u64::MAX),
                );
                let urls: Vec<String> = (0..*results)
                    .map(|i| {
                        format!(
                            "{}/files/{}/{i}.mp4?token={}",
                            self.base_url,
                            t.id,
                            self.sign(&t.id, i, exp)
                        )
                    })
                    .collect();
                data["resultJson"] = json!(json!({ "resultUrls": urls }).to_string());
            }
            (Outcome::Failed { code, msg }, "failed") => {
                data["failCode"] = json!(code);
                data["failMsg"] = json!(msg);
            }
            _ => {}
        }
        Some(data)
    }

    fn sign(&self, task_id: &str, index: usize, exp_ms: u64) -> String {
        let mut h = Sha256::new();
        h.update(self.secret.as_bytes());
        h.update(format!("|{task_id}|{index}|{exp_ms}").as_bytes());
        let sig = video::hex(&h.finalize());
        format!("{exp_ms}.{}", &sig[..32])
    }

    /// Checks a result URL's token: `Err(403)` if forged, `Err(410)` if expired.
    pub(super) fn check_token(&self, task_id: &str, index: usize, token: &str) -> Result<(), u16> {
        let exp = token
            .split_once('.')
            .and_then(|(e, _)| e.parse::<u64>().ok())
            .ok_or(403_u16)?;
        if self.sign(task_id, index, exp) != token {
            return Err(403);
        }
        if now_ms() >= exp {
            return Err(410);
        }
        Ok(())
    }

    /// The bytes of result file `index` if the task has succeeded and has it.
    /// Counts a download request of file `index` of `task_id`.
    pub(super) fn count_download(&self, task_id: &str, index: usize) {
        *self
            .lock()
            .downloads
            .entry((task_id.to_owned(), index))
            .or_insert(0) += 1;
    }

    /// Download requests of file `index` of `task_id` so far.
    pub(super) fn downloads_of(&self, task_id: &str, index: usize) -> u64 {
        self.lock()
            .downloads
            .get(&(task_id.to_owned(), index))
            .copied()
            .unwrap_or(0)
    }

    pub(super) fn result_bytes(&self, task_id: &str, index: usize) -> Option<Vec<u8>> {
        let now = Instant::now();
        let (results, pad) = {
            let g = self.lock();
            let t = g.tasks.get(task_id)?;
            match t.outcome {
                Outcome::Success { results, pad } if t.state(now) == "success" => (results, pad),
                _ => return None,
            }
        };
        (index < results).then(|| video::result_video(task_id, index, pad))
    }

    pub(super) fn stats(&self) -> SimStats {
        let now = Instant::now();
        let mut g = self.lock();
        g.prune(now);
        let mut s = g.stats.clone();
        s.requests_in_window = g.window.len() as u64;
        s.unfinished_tasks = g.unfinished.len() as u64;
        for t in g.tasks.values() {
            match t.state(now) {
                "success" => s.tasks_succeeded += 1,
                "failed" => s.tasks_failed += 1,
                _ => {}
            }
        }
        s
    }

    pub(super) fn tasks(&self) -> Vec<TaskInfo> {
        let now = Instant::now();
        let snapshot: Vec<(TaskInfo, Option<FileSpec>)> = {
            let g = self.lock();
            g.order
                .iter()
                .filter_map(|id| g.tasks.get(id))
                .map(|t| {
                    let state = t.state(now);
                    let (fail_code, files) = match &t.outcome {
                        Outcome::Failed { code, .. } if state == "failed" => {
                            (Some(code.clone()), None)
                        }
                        Outcome::Success { results, pad } if state == "success" => {
                            (None, Some((*results, *pad)))
                        }
                        _ => (None, None),
                    };
                    let info = TaskInfo {
                        task_id: t.id.clone(),
                        image_urls: t.image_urls.clone(),
                        audio_url: t.audio_url.clone(),
                        callback_url: t.callback_url.clone(),
                        state: state.to_string(),
                        fail_code,
                        results: Vec::new(),
                    };
                    (info, files)
                })
                .collect()
        };
        // Hashing happens outside the lock: files can be large.
        snapshot
            .into_iter()
            .map(|(mut info, files)| {
                if let Some((n, pad)) = files {
                    info.results = (0..n.min(LISTED_RESULTS))
                        .map(|index| {
                            let bytes = video::result_video(&info.task_id, index, pad);
                            ResultFile {
                                index,
                                sha256: video::sha256_hex(&bytes),
                                len: bytes.len() as u64,
                            }
                        })
                        .collect();
                }
                info
            })
            .collect()
    }
}

/// The value of marker `name=VALUE` in any of `urls` (path or query).
pub(crate) fn marker(urls: &[&str], name: &str) -> Option<String> {
    let needle = format!("{name}=");
    for url in urls {
        let mut from = 0;
        while let Some(pos) = url[from..].find(&needle) {
            let start = from + pos;
            let before = url[..start].chars().next_back();
            // `sim_fail=` must not match inside `xsim_fail=`.
            if before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_')) {
                let rest = &url[start + needle.len()..];
                let end = rest.find(['&', '/', '?', '#', ';']).unwrap_or(rest.len());
                return Some(rest[..end].to_string());
            }
            from = start + needle.len();
        }
    }
    None
}

/// Seconds of audio behind a URL: its `sim_audio_seconds` marker, else a
/// stable value from 5 to 60 derived from the URL.
pub(crate) fn audio_seconds(url: &str) -> f64 {
    if let Some(v) = marker(&[url], "sim_audio_seconds").and_then(|v| v.parse::<f64>().ok())
        && v.is_finite()
    {
        return v.clamp(0.0, 600.0);
    }
    let digest = Sha256::digest(url.as_bytes());
    let mut first = [0_u8; 8];
    first.copy_from_slice(&digest[..8]);
    #[allow(clippy::cast_precision_loss)]
    let secs = 5 + u64::from_be_bytes(first) % 56;
    #[allow(clippy::cast_precision_loss)]
    let secs = secs as f64;
    secs
}

fn fail_message(code: &str) -> String {
    match code {
        "CONTENT_VIOLATION" => "The input was refused by the content policy".into(),
        "INVALID_IMAGE_URL" => "The image URL could not be fetched or is not an image".into(),
        "INVALID_AUDIO_URL" => {
            "The audio URL could not be fetched or is not MP3, WAV or M4A audio".into()
        }
        "PROCESSING_TIMEOUT" => "Processing timed out".into(),
        "MODEL_UNAVAILABLE" => "The model is temporarily unavailable".into(),
        "INSUFFICIENT_CREDITS" => "Insufficient credits".into(),
        other => format!("Simulated failure {other}"),
    }
}

/// Spawns the owned tasks that switch `credits_out` and `unauthorized` on
/// and off at the times the flags give.
pub(crate) fn spawn_period_toggles(shared: &Arc<Shared>) {
    type Setter = fn(&mut Faults, bool);
    let periods: [(Option<Duration>, Option<Duration>, Setter); 2] = [
        (
            shared.args.credits_out_after,
            shared.args.credits_out_for,
            |f, on| {
                f.credits_out = on;
            },
        ),
        (
            shared.args.unauthorized_after,
            shared.args.unauthorized_for,
            |f, on| {
                f.unauthorized = on;
            },
        ),
    ];
    for (after, length, set) in periods {
        if after.is_none() && length.is_none() {
            continue;
        }
        let after = after.unwrap_or_default();
        // A period from the start is on before the first request can arrive.
        if after.is_zero() {
            shared.update_faults(|f| set(f, true));
        }
        let shared = Arc::clone(shared);
        shared.tracker.clone().spawn(async move {
            if !after.is_zero() {
                if !sleep_or_cancel(after, &shared.shutdown).await {
                    return;
                }
                shared.update_faults(|f| set(f, true));
            }
            if let Some(length) = length {
                if !sleep_or_cancel(length, &shared.shutdown).await {
                    return;
                }
                shared.update_faults(|f| set(f, false));
            }
        });
    }
}

/// Sleeps; `false` if shutdown came first.
pub(crate) async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = shutdown.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_in_path_and_query() {
        assert_eq!(
            marker(
                &["https://a.test/x.png?sim_fail=CONTENT_VIOLATION&b=1"],
                "sim_fail"
            )
            .as_deref(),
            Some("CONTENT_VIOLATION")
        );
        assert_eq!(
            marker(&["https://a.test/sim_results=3/x.png"], "sim_results").as_deref(),
            Some("3")
        );
        assert_eq!(
            marker(&["https://a.test/?sim_fail_once=X"], "sim_fail"),
            None
        );
        assert_eq!(marker(&["https://a.test/?xsim_fail=X"], "sim_fail"), None);
        assert_eq!(
            marker(
                &["https://a.test/", "https://b.test/?sim_fail_once=X"],
                "sim_fail_once"
            )
            .as_deref(),
            Some("X")
        );
    }

    #[test]
    fn audio_seconds_from_marker_or_hash() {
        assert!((audio_seconds("https://a.test/a.mp3?sim_audio_seconds=12.5") - 12.5).abs() < 1e-9);
        let h = audio_seconds("https://a.test/a.mp3");
        assert!((5.0..=60.0).contains(&h));
        assert!((h - audio_seconds("https://a.test/a.mp3")).abs() < 1e-9);
    }
}
