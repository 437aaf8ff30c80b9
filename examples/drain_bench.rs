//! Issues #4 and #14: how fast the daemon drains a batch, and what it spends
//! doing so.
//!
//! ```text
//! cargo build --release --bins --examples
//! ./target/release/examples/drain_bench SHAPE [MODE]
//! ./target/release/examples/drain_bench TASKS RATE_PER_MIN CONCURRENCY TIME_FACTOR [MODE]
//! ```
//!
//! SHAPE is one of (the simulator's task time is audio seconds (5..20) x
//! uniform(10, 30) x TIME_FACTOR):
//!
//! - `concurrency`: slots bind, requests are plentiful (1500 tasks, 100
//!   slots, 6000/min, factor 0.03: tasks of 1.5..18 s, mean 7.5 s);
//! - `requests`: requests bind (1000 tasks, 1000 slots, 600/min, factor
//!   0.015);
//! - `balanced`: both bind at once (1000 tasks, 50 slots, 1200/min, factor
//!   0.015);
//! - `realistic`: the API's real limits, 1000 slots and 10000/min, on tasks
//!   scaled to a mean of a minute (factor 0.24: 12..144 s), 10000 tasks
//!   (about 12 minutes);
//! - `all`: the first three, each in every mode, then a table.
//!
//! MODE says what the daemon knows about when a task will end (default
//! `all`: the three in turn):
//!
//! - `poll`: nothing; it polls on durations learned from finished tasks;
//! - `probe`: `--probe`: it reads each row's audio length before submitting
//!   (the manifest's audio URLs are WAV files the simulator serves), and
//!   learns durations per second of audio;
//! - `callback`: `--callback-url` pointing at its own listener: the simulator
//!   calls back when a task ends, and the daemon confirms with one status query.
//!
//! Starts the built-in simulator in this process with the same limits, runs
//! the real release binary (`target/release/infinitetalk-batch run`) against
//! it as a child, waits for `results.csv`, and prints:
//!
//! - drain time (from the batch's acceptance to its `results.csv`, as the
//!   store records them) against the lower bound max(total task time /
//!   concurrency, longest task, 2 x tasks / rate), and against the *floor*:
//!   the makespan of the same tasks, in the same order, under a schedule
//!   that sees every task end the moment it ends (an oracle for detection,
//!   not for durations), submitting at most `rate / 2` tasks a second (one
//!   submit and one status query each). No schedule that does not know
//!   durations in advance beats the floor in manifest order; the gap
//!   between the floor and the bound is the tail: the last tasks ending one
//!   by one while slots idle. With `--probe` the daemon submits long tasks
//!   first, so the floor is printed twice: in the order the daemon
//!   submitted, and in manifest order (what submitting in row order would
//!   have allowed);
//! - status polls per task, the median and 99th percentile delay between a
//!   task finishing and the daemon noticing it (from the store:
//!   seen-finished - submitted - costTime), 429s counted by the simulator;
//! - the daemon's CPU time (user + system, /proc/PID/stat) per API request,
//!   and its peak RSS.
//!
//! The daemon's poll bounds are its defaults (`--poll-min 2s`, `--poll-max
//! 30m`) scaled by the time factor, as the simulator's durations are: the
//! run is the real schedule, sped up. Extra daemon flags can be given in
//! `DRAIN_BENCH_ARGS` (space-separated).

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use infinitetalk_batch::simulator::{self, SimArgs};
use infinitetalk_batch::store::{RowState, Store};
use tokio_util::sync::CancellationToken;

mod bench_util;

use bench_util::{BoxError, Dirs, binary, cpu_seconds, peak_rss_mb, spawn_daemon, terminate};

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
    shape: String,
    mode: String,
    drain: f64,
    bound: f64,
    floor: f64,
    polls_per_task: f64,
    median_delay: f64,
    p99_delay: f64,
    rejected_429: u64,
    cpu_ms_per_request: f64,
    peak_rss_mb: f64,
}

/// What one drain is run with.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    tasks: usize,
    rate: u32,
    concurrency: u32,
    time_factor: f64,
}

const SHAPES: [Shape; 4] = [
    Shape {
        name: "concurrency",
        tasks: 1500,
        rate: 6000,
        concurrency: 100,
        time_factor: 0.03,
    },
    Shape {
        name: "requests",
        tasks: 1000,
        rate: 600,
        concurrency: 1000,
        time_factor: 0.015,
    },
    Shape {
        name: "balanced",
        tasks: 1000,
        rate: 1200,
        concurrency: 50,
        time_factor: 0.015,
    },
    Shape {
        name: "realistic",
        tasks: 10_000,
        rate: 10_000,
        concurrency: 1000,
        time_factor: 0.24,
    },
];

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), BoxError> {
    let first: String = arg(1, "all".to_owned())?;
    let (shapes, mode_arg) = if first.chars().next().is_some_and(|c| c.is_ascii_digit()) {
        let shape = Shape {
            name: "custom",
            tasks: arg(1, 1000)?,
            rate: arg(2, 1200)?,
            concurrency: arg(3, 50)?,
            time_factor: arg(4, 0.015)?,
        };
        (vec![shape], 5)
    } else if first == "all" {
        (SHAPES[..3].to_vec(), 2)
    } else {
        let shape = SHAPES
            .iter()
            .find(|s| s.name == first)
            .copied()
            .ok_or_else(|| format!("argument 1: shape {first:?}: use concurrency, requests, balanced, realistic, all or numbers"))?;
        (vec![shape], 2)
    };
    let mode: String = arg(mode_arg, "all".to_owned())?;
    let modes: Vec<&str> = match mode.as_str() {
        "all" => vec!["poll", "probe", "callback"],
        m @ ("poll" | "probe" | "callback") => vec![m],
        other => {
            return Err(format!(
                "argument {mode_arg}: mode {other:?}: use poll, probe, callback or all"
            )
            .into());
        }
    };
    let bin = binary()?;
    let mut summaries = Vec::new();
    for shape in &shapes {
        for mode in &modes {
            summaries.push(run(&bin, *shape, mode).await?);
            println!();
        }
    }
    println!("summary:");
    println!(
        "shape        mode      drain (s)  bound (s)  floor (s)  /bound  /floor  polls/task  delay p50 (s)  p99 (s)  429s  CPU-ms/req  peak RSS (MB)"
    );
    for s in &summaries {
        println!(
            "{:<12} {:<9} {:>9.1}  {:>9.1}  {:>9.1}  {:>6.3}  {:>6.3}  {:>10.2}  {:>13.2}  {:>7.2}  {:>4}  {:>10.3}  {:>13.1}",
            s.shape,
            s.mode,
            s.drain,
            s.bound,
            s.floor,
            s.drain / s.bound,
            s.drain / s.floor,
            s.polls_per_task,
            s.median_delay,
            s.p99_delay,
            s.rejected_429,
            s.cpu_ms_per_request,
            s.peak_rss_mb,
        );
    }
    Ok(())
}

/// One drain of `tasks` rows by the daemon in `mode`, printed and summed up.
async fn run(bin: &Path, shape: Shape, mode: &str) -> Result<Summary, BoxError> {
    let Shape {
        tasks,
        rate,
        concurrency,
        time_factor,
        ..
    } = shape;
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

    let dirs = Dirs::new()?;
    let mut text = String::from("id,image_url,audio_url\n");
    for i in 0..tasks {
        text.push_str(&format!(
            "d{i},https://img.example/d/{i}.png,{}/media/d{i}.wav?sim_audio_seconds={}\n",
            sim.base_url(),
            5 + i % 16
        ));
    }
    dirs.drop_manifest("drain.csv", &text)?;

    let listen = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let log_path = dirs.log(0);
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
    let mut args: Vec<String> = vec![
        "--max-concurrent".into(),
        concurrency.to_string(),
        "--max-requests-per-minute".into(),
        rate.to_string(),
    ];
    args.extend(extra.split_whitespace().map(str::to_owned));
    let mut child = spawn_daemon(bin, &dirs, &sim.base_url(), listen, &args, 0)?;
    let pid = child.id();

    let results = dirs.outbox.join("drain").join("results.csv");
    // Bounded: at most an hour.
    let deadline = started + Duration::from_secs(3600);
    while !results.exists() {
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("the batch did not drain within an hour".into());
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
    let _ = tokio::task::spawn_blocking(move || terminate(&mut child)).await;
    stop.cancel();

    // Per-row timings from the store.
    let store = Store::open(&dirs.state)?;
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
    // (submitted at, task time), for the floor.
    let mut submitted = Vec::new();
    let mut total_task_ms = 0u64;
    let mut longest_ms = 0u64;
    let mut done = 0;
    for (_, r) in store.batch_rows(batch.seq)? {
        if r.state == RowState::Done {
            done += 1;
        }
        if let (Some(s), Some(f), Some(c)) = (r.submitted_at_ms, r.finished_at_ms, r.cost_time_ms) {
            total_task_ms += c;
            longest_ms = longest_ms.max(c);
            delays.push(f.saturating_sub(s).saturating_sub(c) as f64 / 1000.0);
            submitted.push((s, c));
        }
    }
    // The floor again with the tasks in manifest order: what submitting
    // them in order would have allowed (`--probe` submits longest first).
    let in_manifest_order: Vec<f64> = submitted.iter().map(|s| s.1 as f64 / 1000.0).collect();
    submitted.sort_unstable();
    let last_submit = submitted.last().map_or(0, |s| s.0);
    let tail = batch
        .finished_at_ms
        .unwrap_or(last_submit)
        .saturating_sub(last_submit) as f64
        / 1000.0;
    let order: Vec<f64> = submitted.iter().map(|s| s.1 as f64 / 1000.0).collect();
    let per_sec = f64::from(rate) / 60.0 / 2.0;
    let floor = floor_makespan(&order, concurrency as usize, per_sec);
    let manifest_floor = floor_makespan(&in_manifest_order, concurrency as usize, per_sec);
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
    let longest = longest_ms as f64 / 1000.0;
    let bound = by_concurrency.max(by_rate).max(longest);
    let requests = stats.submit_requests + stats.status_requests;
    println!(
        "parameters: {tasks} tasks, {rate} requests/min, {concurrency} concurrent, time factor {time_factor}, mode {mode}, daemon flags [{extra}]"
    );
    println!("rows done: {done} of {}", batch.total_rows);
    println!(
        "drain time: {drain:.1} s (batch accepted -> results.csv written; {wall:.1} s from daemon start); lower bound {bound:.1} s (total task time / concurrency = {by_concurrency:.1} s, longest task {longest:.1} s, 2N / rate = {by_rate:.1} s); ratio {:.3}",
        drain / bound
    );
    println!(
        "floor (same tasks, same order, every end seen at once, rate/2 tasks a second): {floor:.1} s; drain / floor {:.3}; tail (last submit -> results.csv) {tail:.1} s = {:.1}% of the drain",
        drain / floor,
        100.0 * tail / drain
    );
    println!(
        "floor in manifest order (what submitting in row order allows): {manifest_floor:.1} s; drain / that floor {:.3}",
        drain / manifest_floor
    );
    println!(
        "status polls per task: {:.2} ({} status requests, {} submits, {} tasks created)",
        stats.status_requests as f64 / stats.tasks_created.max(1) as f64,
        stats.status_requests,
        stats.submit_requests,
        stats.tasks_created
    );
    println!(
        "detection delay: median {:.2} s, p90 {:.2} s, p99 {:.2} s, max {:.2} s over {} tasks",
        pct(0.5),
        pct(0.9),
        pct(0.99),
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
            "daemon CPU: {cpu:.2} s user+system for {requests} API requests = {:.3} CPU-ms per request (includes {done} downloads and the ingest)",
            cpu / requests.max(1) as f64 * 1000.0
        ),
        None => println!("daemon CPU: unknown (/proc/PID/stat unreadable)"),
    }
    if let Some(mb) = rss {
        println!("daemon peak RSS: {mb:.1} MB");
    }
    Ok(Summary {
        shape: shape.name.to_owned(),
        mode: mode.to_owned(),
        drain,
        bound,
        floor,
        p99_delay: pct(0.99),
        cpu_ms_per_request: cpu.map_or(f64::NAN, |c| c / requests.max(1) as f64 * 1000.0),
        peak_rss_mb: rss.unwrap_or(f64::NAN),
        polls_per_task: stats.status_requests as f64 / stats.tasks_created.max(1) as f64,
        median_delay: pct(0.5),
        rejected_429: stats.rejected_429,
    })
}

/// The makespan of tasks of `durations` (seconds), started in this order
/// on `slots` slots, at most `per_sec` starts a second, each slot free again
/// the moment its task ends: detection by an oracle, durations unknown.
fn floor_makespan(durations: &[f64], slots: usize, per_sec: f64) -> f64 {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // Slot free times, in whole microseconds (a min-heap).
    let mut free: BinaryHeap<Reverse<u64>> = (0..slots.max(1)).map(|_| Reverse(0)).collect();
    let step = 1.0 / per_sec.max(1e-9);
    let mut end = 0.0f64;
    for (i, d) in durations.iter().enumerate() {
        let Some(Reverse(slot)) = free.pop() else {
            break;
        };
        let start = (slot as f64 / 1e6).max(i as f64 * step);
        let done = start + d;
        end = end.max(done);
        free.push(Reverse((done * 1e6) as u64));
    }
    end
}
