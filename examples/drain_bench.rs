//! Issue #4: how fast the daemon drains a batch, and what it spends doing so.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example drain_bench -- [TASKS] [RATE_PER_MIN] [CONCURRENCY] [TIME_FACTOR] [MODE]
//! ```
//!
//! Defaults: 1000 tasks, 1200 requests/min, 50 concurrent, time factor 0.015
//! (tasks of 5..20 s of audio then take about 0.75..9 s), mode `all` (the
//! three below, one after the other, then a table of the three).
//! MODE says what the daemon knows about when a task will end:
//!
//! - `poll`: nothing; it polls on durations learned from finished tasks;
//! - `probe`: `--probe`: it reads each row's audio length before submitting
//!   (the manifest's audio URLs are WAV files the simulator serves), and
//!   learns durations per second of audio;
//! - `callback`: `--callback-url` pointing at its own listener: the simulator
//!   calls back when a task ends, and the daemon confirms with one status query.
//!
//! Starts the built-in
//! simulator in this process with the same limits, runs the real release
//! binary (`target/release/infinitetalk-batch run`) against it as a child,
//! waits for `results.csv`, and prints:
//!
//! - drain time (from the batch's acceptance to its `results.csv`, as the
//!   store records them; the wall time from the daemon's start, which adds
//!   its start-up and the inbox's settle time, is printed beside it) against
//!   the lower bound
//!   max(total task time / concurrency, 2 x tasks / rate);
//! - status polls per task (simulator's `status_requests` / tasks);
//! - the median and 90th percentile delay between a task finishing and the
//!   daemon noticing it (from the store: seen-finished − submitted − costTime);
//! - 429s counted by the simulator;
//! - the polling floor: the least mean detection delay a ladder within the
//!   daemon's cap of polls a task (`schedule::MAX_POLLS`) could reach on
//!   these very durations (the daemon's own chooser, told every duration
//!   afterwards);
//! - the daemon's CPU time (user + system, /proc/PID/stat) per 1000 API
//!   requests, and its peak RSS.
//!
//! The daemon's poll bounds are its defaults (`--poll-min 2s`,
//! `--poll-max 30m`) scaled by the time factor, as the simulator's durations
//! are: the run is the real schedule, sped up. Extra daemon flags can be given
//! in `DRAIN_BENCH_ARGS` (space-separated), e.g.
//! `DRAIN_BENCH_ARGS="--poll-min 2s"` for the unscaled lower bound.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use infinitetalk_batch::dispatch::schedule::{self, Ladder, Limits, PollModel};
use infinitetalk_batch::simulator::{self, SimArgs};
use infinitetalk_batch::store::{RowState, Store};
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error>;

fn arg<T: std::str::FromStr>(n: usize, default: T) -> Result<T, BoxError>
where
    T::Err: std::fmt::Display,
{
    match std::env::args().nth(n) {
        Some(a) => a
            .replace('_', "")
            .parse()
            .map_err(|e| format!("argument {n}: {e}").into()),
        None => Ok(default),
    }
}

/// The headline figures of one run.
struct Summary {
    mode: String,
    drain: f64,
    bound: f64,
    polls_per_task: f64,
    median_delay: f64,
    rejected_429: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), BoxError> {
    let tasks: usize = arg(1, 1000)?;
    let rate: u32 = arg(2, 1200)?;
    let concurrency: u32 = arg(3, 50)?;
    let time_factor: f64 = arg(4, 0.015)?;
    let mode: String = arg(5, "all".to_owned())?;
    let modes: Vec<&str> = match mode.as_str() {
        "all" => vec!["poll", "probe", "callback"],
        m @ ("poll" | "probe" | "callback") => vec![m],
        other => {
            return Err(
                format!("argument 5: mode {other:?}: use poll, probe, callback or all").into(),
            );
        }
    };
    let bin = binary()?;
    let mut summaries = Vec::new();
    for mode in modes {
        summaries.push(run(&bin, tasks, rate, concurrency, time_factor, mode).await?);
        println!();
    }
    if summaries.len() > 1 {
        println!(
            "summary ({tasks} tasks, {rate} requests/min, {concurrency} concurrent, time factor {time_factor}):"
        );
        println!("mode      drain (s)  bound (s)  ratio  polls/task  median delay (s)  429s");
        for s in &summaries {
            println!(
                "{:<9} {:>9.1}  {:>9.1}  {:>5.3}  {:>10.2}  {:>16.2}  {:>4}",
                s.mode,
                s.drain,
                s.bound,
                s.drain / s.bound,
                s.polls_per_task,
                s.median_delay,
                s.rejected_429
            );
        }
    }
    Ok(())
}

/// One drain of `tasks` rows by the daemon in `mode`, printed and summed up.
async fn run(
    bin: &Path,
    tasks: usize,
    rate: u32,
    concurrency: u32,
    time_factor: f64,
    mode: &str,
) -> Result<Summary, BoxError> {
    let stop = CancellationToken::new();
    let sim = simulator::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimArgs {
            time_factor,
            seed: Some(4),
            max_requests_per_minute: rate,
            max_concurrent: concurrency,
            ..SimArgs::default()
        },
        stop.clone(),
    )
    .await?;

    let root = tempfile::tempdir()?;
    let inbox = root.path().join("inbox");
    let outbox = root.path().join("outbox");
    let state = root.path().join("state");
    fs::create_dir_all(&inbox)?;
    let mut text = String::from("id,image_url,audio_url\n");
    for i in 0..tasks {
        text.push_str(&format!(
            "d{i},https://img.example/d/{i}.png,{}/media/d{i}.wav?sim_audio_seconds={}\n",
            sim.base_url(),
            5 + i % 16
        ));
    }
    fs::write(inbox.join(".drain.tmp"), text)?;
    fs::rename(inbox.join(".drain.tmp"), inbox.join("drain.csv"))?;

    let listen = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let log_path = root.path().join("daemon.log");
    let mut extra = std::env::var("DRAIN_BENCH_ARGS").unwrap_or_default();
    // The simulator runs time sped up by the factor: so does the daemon's
    // schedule, or its real-time poll bounds would distort it.
    if !extra.contains("--poll-min") {
        let ms = (2000.0 * time_factor).max(10.0);
        extra.push_str(&format!(" --poll-min {ms:.0}ms"));
    }
    if !extra.contains("--poll-max") {
        let ms = (30.0 * 60_000.0 * time_factor).max(1000.0);
        extra.push_str(&format!(" --poll-max {ms:.0}ms"));
    }
    match mode {
        "probe" => extra.push_str(" --probe"),
        "callback" => extra.push_str(&format!(" --callback-url http://{listen}")),
        _ => {}
    }
    let extra = extra.trim().to_owned();
    let started = Instant::now();
    let mut child = Command::new(bin)
        .arg("run")
        .arg("--inbox")
        .arg(&inbox)
        .arg("--outbox")
        .arg(&outbox)
        .arg("--state")
        .arg(&state)
        .arg("--api-base")
        .arg(sim.base_url())
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--max-concurrent")
        .arg(concurrency.to_string())
        .arg("--max-requests-per-minute")
        .arg(rate.to_string())
        .args(extra.split_whitespace())
        .env("APIXO_API_KEY", "bench-key")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(fs::File::create(&log_path)?))
        .spawn()?;
    let pid = child.id();

    let results = outbox.join("drain").join("results.csv");
    // Bounded: at most 30 minutes.
    let deadline = started + Duration::from_secs(1800);
    while !results.exists() {
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("the batch did not drain within 30 minutes".into());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the daemon exited early ({status}); log:\n{}",
                fs::read_to_string(&log_path).unwrap_or_default()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid);
    let rss = peak_rss_mb(pid);
    let stats = sim.stats();
    // Graceful stop.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    stop.cancel();

    // Per-row timings from the store.
    let store = Store::open(&state)?;
    let batch = store
        .batches()?
        .into_iter()
        .find(|b| b.name == "drain")
        .ok_or("no batch")?;
    let drain = batch
        .finished_at_ms
        .ok_or("the batch has no end time")?
        .saturating_sub(batch.created_at_ms) as f64
        / 1000.0;
    let mut delays = Vec::new();
    let mut durations = Vec::new();
    let mut total_task_ms = 0u64;
    let mut done = 0;
    for (row, r) in store.batch_rows(batch.seq)? {
        if r.state == RowState::Done {
            done += 1;
        }
        if let (Some(s), Some(f), Some(c)) = (r.submitted_at_ms, r.finished_at_ms, r.cost_time_ms) {
            total_task_ms += c;
            delays.push(f.saturating_sub(s).saturating_sub(c) as f64 / 1000.0);
            // Row n of the manifest is d{n-1}, on 5 + (n-1) % 16 s of audio.
            durations.push((c, 5.0 + ((row - 1) % 16) as f64));
        }
    }
    delays.sort_by(f64::total_cmp);
    let pct = |q: f64| -> f64 {
        if delays.is_empty() {
            return f64::NAN;
        }
        delays[((q * (delays.len() - 1) as f64).round() as usize).min(delays.len() - 1)]
    };

    let n = tasks as f64;
    let by_concurrency = total_task_ms as f64 / 1000.0 / f64::from(concurrency);
    let by_rate = 2.0 * n / (f64::from(rate) / 60.0);
    let bound = by_concurrency.max(by_rate);
    let requests = stats.submit_requests + stats.status_requests;
    println!(
        "parameters: {tasks} tasks, {rate} requests/min, {concurrency} concurrent, time factor {time_factor}, mode {mode}, daemon flags [{extra}]"
    );
    println!("rows done: {done} of {}", batch.total_rows);
    println!(
        "drain time: {drain:.1} s (batch accepted -> results.csv written; {wall:.1} s from daemon start); lower bound {bound:.1} s (total task time / concurrency = {by_concurrency:.1} s, 2N / rate = {by_rate:.1} s); ratio {:.3} (target <= 1.10)",
        drain / bound
    );
    println!(
        "status polls per task: {:.2} ({} status requests, {} submits, {} tasks created; target <= 3)",
        stats.status_requests as f64 / stats.tasks_created.max(1) as f64,
        stats.status_requests,
        stats.submit_requests,
        stats.tasks_created
    );
    println!(
        "detection delay: median {:.2} s, p90 {:.2} s, max {:.2} s over {} tasks",
        pct(0.5),
        pct(0.9),
        pct(1.0),
        delays.len()
    );
    println!(
        "429 answers: {} (window {}, concurrency {}); most requests in a 60 s window: {}; most unfinished tasks: {}",
        stats.rejected_429,
        stats.rejected_429_window,
        stats.rejected_429_concurrency,
        stats.max_requests_in_window,
        stats.max_unfinished_tasks
    );
    if mode == "callback" {
        println!(
            "callbacks: {} sent, {} acknowledged, {} given up",
            stats.callbacks_sent, stats.callbacks_acknowledged, stats.callbacks_given_up
        );
    }
    match cpu {
        Some(cpu) => println!(
            "daemon CPU: {cpu:.2} s user+system for {requests} API requests = {:.3} CPU-s per 1000 requests (includes {done} downloads and the ingest)",
            cpu / requests.max(1) as f64 * 1000.0
        ),
        None => println!("daemon CPU: unknown (/proc/PID/stat unreadable)"),
    }
    if let Some(mb) = rss {
        println!("daemon peak RSS: {mb:.1} MB");
    }
    polling_floor(&durations, concurrency);
    Ok(Summary {
        mode: mode.to_owned(),
        drain,
        bound,
        polls_per_task: stats.status_requests as f64 / stats.tasks_created.max(1) as f64,
        median_delay: pct(0.5),
        rejected_429: stats.rejected_429,
    })
}

/// What polling alone could do for these very durations: the daemon's own
/// ladder chooser, told every duration afterwards and asked for the least
/// delay within its polls-per-task cap. Where concurrency is the bound, the
/// drain ratio cannot beat 1 + delay / mean task time by polling.
fn polling_floor(durations: &[(u64, f64)], concurrency: u32) {
    if durations.is_empty() {
        return;
    }
    let mut model = PollModel::new(Duration::from_millis(1), Duration::from_secs(3600));
    for &(ms, audio) in durations {
        model.observe(Duration::from_millis(ms), Some(audio));
    }
    model.start();
    let limits = Limits {
        requests_per_sec: f64::MAX,
        slots: f64::from(concurrency),
        backlog: false,
    };
    model.refit(limits, std::time::Instant::now());
    let mean = durations.iter().map(|d| d.0 as f64).sum::<f64>() / durations.len() as f64 / 1000.0;
    let show = |l: Option<&Ladder>| match l {
        Some(l) => format!(
            "{:.2} s ({:.1}% of the mean task time {mean:.2} s) at {:.2} polls",
            l.delay,
            100.0 * l.delay / mean,
            l.polls
        ),
        None => "unknown".into(),
    };
    println!(
        "polling floor for these durations (best ladder within {} polls a task, knowing every duration afterwards): mean detection delay {} without audio lengths, {} with them",
        schedule::MAX_POLLS,
        show(model.ladder()),
        show(model.per_audio_ladder())
    );
}

fn binary() -> Result<PathBuf, BoxError> {
    let exe = std::env::current_exe()?;
    // target/release/examples/drain_bench -> target/release/infinitetalk-batch
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate the target folder")?;
    let bin = dir.join("infinitetalk-batch");
    if !bin.exists() {
        return Err(format!(
            "{} missing: run `cargo build --release` first",
            bin.display()
        )
        .into());
    }
    Ok(bin)
}

/// User + system CPU seconds of a live process.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after ") ".
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0 / 1e6)
}
