//! Shared pieces of the integration tests: temp folders, the real binary as a
//! child process, the built-in simulator on 127.0.0.1:0, bounded waits.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod s3;

use infinitetalk_batch::simulator::{self, SimArgs, SimHandle};
use tokio_util::sync::CancellationToken;

pub const BIN: &str = env!("CARGO_BIN_EXE_infinitetalk-batch");
pub const KEY: &str = "test-key-do-not-log-4f1c9a";

/// The three folders of one daemon, in a temp folder of their own.
pub struct Dirs {
    pub root: tempfile::TempDir,
    pub inbox: PathBuf,
    pub outbox: PathBuf,
    pub state: PathBuf,
}

impl Dirs {
    pub fn new() -> Dirs {
        let root = tempfile::tempdir().expect("tempdir");
        let inbox = root.path().join("inbox");
        let outbox = root.path().join("outbox");
        let state = root.path().join("state");
        fs::create_dir_all(&inbox).expect("inbox");
        Dirs {
            root,
            inbox,
            outbox,
            state,
        }
    }

    pub fn log_path(&self, n: usize) -> PathBuf {
        self.root.path().join(format!("daemon-{n}.log"))
    }

    pub fn batch_dir(&self, batch: &str) -> PathBuf {
        self.outbox.join(batch)
    }
}

/// A free port on loopback (bound then released).
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A simulator in this process.
pub struct Sim {
    pub handle: SimHandle,
    stop: CancellationToken,
}

impl Sim {
    pub async fn start(args: SimArgs) -> Sim {
        let stop = CancellationToken::new();
        let handle = simulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), args, stop.clone())
            .await
            .expect("simulator starts");
        Sim { handle, stop }
    }

    pub fn url(&self) -> String {
        self.handle.base_url()
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.handle.stopped()).await;
    }
}

/// A running daemon: killed and reaped when dropped, so a test that fails
/// before it stops its daemon leaves no process behind. Derefs to the
/// [`Child`], so [`terminate`] and [`kill9`] take it as they take a `Child`.
pub struct Daemon(Child);

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        kill9(&mut self.0);
    }
}

/// Starts the real daemon on `dirs` against `api_base`.
pub fn spawn_daemon(
    dirs: &Dirs,
    api_base: &str,
    listen: SocketAddr,
    extra: &[&str],
    log_n: usize,
) -> Daemon {
    spawn_with_env(dirs, api_base, listen, extra, log_n, &[])
}

/// [`spawn_daemon`] with extra environment (and NOTIFY_SOCKET
/// left alone when `env` sets it).
pub fn spawn_with_env(
    dirs: &Dirs,
    api_base: &str,
    listen: SocketAddr,
    extra: &[&str],
    log_n: usize,
    env: &[(&str, &str)],
) -> Daemon {
    let mut cmd = daemon_command(
        dirs,
        dirs.outbox.as_os_str(),
        api_base,
        listen,
        extra,
        log_n,
    );
    cmd.envs(env.iter().copied());
    Daemon(cmd.spawn().expect("daemon starts"))
}

/// `infinitetalk-batch run` on the folders of `dirs` (outbox `outbox`),
/// with none of the caller's API or systemd environment, logging to
/// `dirs.log_path(log_n)`.
fn daemon_command(
    dirs: &Dirs,
    outbox: &std::ffi::OsStr,
    api_base: &str,
    listen: SocketAddr,
    extra: &[&str],
    log_n: usize,
) -> Command {
    let log = fs::File::create(dirs.log_path(log_n)).expect("log file");
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .arg("--inbox")
        .arg(&dirs.inbox)
        .arg("--outbox")
        .arg(outbox)
        .arg("--state")
        .arg(&dirs.state)
        .arg("--api-base")
        .arg(api_base)
        .arg("--listen")
        .arg(listen.to_string())
        .args(extra)
        .env("APIXO_API_KEY", KEY)
        .env_remove("APIXO_API_BASE")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    cmd
}

/// Sends SIGTERM and waits up to `limit` for the exit status. A daemon
/// just started is first given until it catches SIGTERM (its handler is
/// installed within milliseconds; before that, the signal would kill it).
pub fn terminate(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let starting = Instant::now() + limit.min(Duration::from_secs(2));
    while !catches_sigterm(child.id()) && Instant::now() < starting {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Whether process `pid` has a handler for SIGTERM (the `SigCgt` mask of
/// `/proc/PID/status`).
fn catches_sigterm(pid: u32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
}

/// SIGKILL, then reap.
pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A manifest row: `(id, image_url, audio_url)`.
pub fn write_manifest(dir: &Path, name: &str, rows: &[(String, String, String)]) -> PathBuf {
    let mut text = String::from("id,image_url,audio_url,note\n");
    for (id, image, audio) in rows {
        text.push_str(&format!("{id},{image},{audio},\"note, for {id}\"\n"));
    }
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text).expect("write manifest");
    let path = dir.join(name);
    fs::rename(&tmp, &path).expect("rename manifest in");
    path
}

/// `n` rows with distinct (image, audio) pairs; `marker(i)` is appended to the audio URL's query.
pub fn rows(
    prefix: &str,
    n: usize,
    marker: impl Fn(usize) -> String,
) -> Vec<(String, String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("{prefix}{i}"),
                format!("https://img.example/{prefix}/{i}.png"),
                format!("https://audio.example/{prefix}/{i}.mp3?{}", marker(i)),
            )
        })
        .collect()
}

/// Polls `check` every 100 ms until it returns Some or `limit` passes.
pub async fn wait_for<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The rows of `results.csv`, as header name → value.
pub fn read_results(path: &Path) -> Vec<HashMap<String, String>> {
    let mut reader = csv::Reader::from_path(path).expect("results.csv readable");
    let header = reader.headers().expect("header").clone();
    reader
        .records()
        .map(|r| {
            let r = r.expect("record");
            header
                .iter()
                .map(String::from)
                .zip(r.iter().map(String::from))
                .collect()
        })
        .collect()
}

pub fn results_header(path: &Path) -> Vec<String> {
    let mut reader = csv::Reader::from_path(path).expect("results.csv readable");
    reader
        .headers()
        .expect("header")
        .iter()
        .map(String::from)
        .collect()
}

pub fn sha256_file(path: &Path) -> String {
    simulator::sha256_hex(&fs::read(path).expect("read output"))
}

/// Shows a daemon's log when a test fails.
pub fn log_text(dirs: &Dirs, n: usize) -> String {
    fs::read_to_string(dirs.log_path(n)).unwrap_or_default()
}

/// Asserts every row of `results` is as the simulator decided, and every
/// output file holds exactly the bytes the simulator served.
pub fn check_results_against_sim(
    dirs: &Dirs,
    batch: &str,
    sim: &SimHandle,
) -> Vec<HashMap<String, String>> {
    let results = read_results(&dirs.batch_dir(batch).join("results.csv"));
    let tasks: HashMap<String, simulator::TaskInfo> = sim
        .tasks()
        .into_iter()
        .map(|t| (t.task_id.clone(), t))
        .collect();
    for row in &results {
        let id = &row["id"];
        let task_id = &row["task_id"];
        let task = tasks
            .get(task_id)
            .unwrap_or_else(|| panic!("row {id}: task {task_id:?} unknown to the simulator"));
        match row["state"].as_str() {
            "done" => {
                assert_eq!(task.state, "success", "row {id}");
                let outputs: Vec<&str> = row["output"].split(';').collect();
                assert_eq!(
                    outputs.len(),
                    task.results.len(),
                    "row {id}: one file per result URL"
                );
                for (file, expected) in outputs.iter().zip(&task.results) {
                    let path = dirs.batch_dir(batch).join(file);
                    assert_eq!(
                        sha256_file(&path),
                        expected.sha256,
                        "row {id}: {file} differs from what was served"
                    );
                }
            }
            "failed" => {
                assert_eq!(task.state, "failed", "row {id}");
                assert_eq!(Some(&row["fail_code"]), task.fail_code.as_ref(), "row {id}");
            }
            other => panic!("row {id}: state {other:?}"),
        }
    }
    results
}

/// A simulator whose tasks take well under a few seconds.
pub fn fast_sim() -> SimArgs {
    SimArgs {
        time_factor: 0.002,
        ..SimArgs::default()
    }
}

/// The simulator with tasks `time_factor` times as long as the service's
/// (`fast_sim` is 0.002).
pub fn sim_at(time_factor: f64) -> SimArgs {
    SimArgs {
        time_factor,
        ..SimArgs::default()
    }
}

/// Poll bounds that suit the fast simulator.
pub const POLL: [&str; 4] = ["--poll-min", "100ms", "--poll-max", "2s"];

/// [`POLL`] followed by `extra`.
pub fn with_poll<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = POLL.to_vec();
    v.extend_from_slice(extra);
    v
}

/// Waits for the batch's `results.csv`; false if it did not appear in time.
pub async fn wait_results(dirs: &Dirs, batch: &str, limit: Duration) -> bool {
    let path = dirs.batch_dir(batch).join("results.csv");
    wait_for(limit, || path.exists().then_some(()))
        .await
        .is_some()
}

/// Starts the real daemon with `--outbox URL` (an object store) and `env`
/// (the `AWS_*` variables), the inbox and state of `dirs`.
pub fn spawn_s3_daemon(
    dirs: &Dirs,
    api_base: &str,
    listen: SocketAddr,
    outbox: &str,
    extra: &[&str],
    log_n: usize,
    env: &[(&'static str, String)],
) -> Daemon {
    let mut cmd = daemon_command(
        dirs,
        std::ffi::OsStr::new(outbox),
        api_base,
        listen,
        extra,
        log_n,
    );
    // Only what the test gives: no AWS_* of the machine running the tests.
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    Daemon(cmd.spawn().expect("daemon starts"))
}
