//! Issue #14: full pace after `kill -9`.
//!
//! ```text
//! cargo build --release --bins --examples
//! ./target/release/examples/restart_bench [ROWS]
//! ```
//!
//! The built-in simulator runs in this process with the API's real limits
//! (1000 slots, 10,000 requests/min) and tasks of 5..60 s (time factor 0.1).
//! The release daemon drains a batch (default 20,000 rows) until its 1000
//! slots have filled and it has run for 40 s (its poll model learned and saved),
//! then is killed with SIGKILL and started again at once. Printed, as the
//! simulator saw it (sampled every 5 ms):
//!
//! - submits a second over the 5 s before the kill;
//! - from the new start: the first status query, the first submit, and the
//!   first 1-second window with at least 90% of the submits a second of
//!   before the kill ("full submission rate").

mod bench_util;

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use bench_util::{BoxError, Dirs, binary, daemon_args, spawn_daemon, start_sim, terminate};
use infinitetalk_batch::simulator::SimHandle;
use tokio_util::sync::CancellationToken;

const SLOTS: u32 = 1000;
const RATE: u32 = 10_000;
const TIME_FACTOR: f64 = 0.1;

/// (when, submits so far, status queries so far).
type Sample = (Instant, u64, u64);

fn sample(sim: &SimHandle) -> Sample {
    let s = sim.stats();
    (Instant::now(), s.submit_requests, s.status_requests)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), BoxError> {
    let rows: usize = match std::env::args().nth(1) {
        Some(a) => a
            .replace('_', "")
            .parse()
            .map_err(|e| format!("argument 1: {e}"))?,
        None => 20_000,
    };
    let bin = binary()?;
    let stop = CancellationToken::new();
    let sim = start_sim(SLOTS, RATE, TIME_FACTOR, stop.clone()).await?;
    let base = sim.base_url();
    let dirs = Dirs::new()?;
    let listen: SocketAddr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let args = daemon_args(SLOTS, RATE, TIME_FACTOR);
    let mut text = String::from("id,image_url,audio_url\n");
    for i in 0..rows {
        text.push_str(&format!(
            "r{i},https://img.example/r/{i}.png,{base}/media/r/{i}.wav?sim_audio_seconds={}\n",
            5 + i % 16
        ));
    }
    let mut child = spawn_daemon(&bin, &dirs, &base, listen, &args, 0)?;
    let started = Instant::now();
    dirs.drop_manifest("restart.csv", &text)?;

    // Run until 1000 in flight after 40 s, remembering the last 5 s.
    let mut recent: VecDeque<Sample> = VecDeque::new();
    loop {
        let s = sample(&sim);
        recent.push_back(s);
        while recent
            .front()
            .is_some_and(|f| s.0.duration_since(f.0) > Duration::from_secs(5))
        {
            recent.pop_front();
        }
        // The slots filled (the simulator counts a task unfinished until its
        // time is up; the daemon holds its slot until it has seen it ended).
        let filled = sim.stats().max_unfinished_tasks >= u64::from(SLOTS) - 10;
        if started.elapsed() > Duration::from_secs(40) && filled {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            return Err("never reached 1000 tasks in flight within 5 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (first, last) = (recent.front().copied(), recent.back().copied());
    let (Some(first), Some(last)) = (first, last) else {
        return Err("no samples".into());
    };
    let before_rate = (last.1 - first.1) as f64 / last.0.duration_since(first.0).as_secs_f64();
    child.kill()?;
    let _ = child.wait();
    let in_flight = sim.stats().unfinished_tasks;

    let killed = sample(&sim);
    let restart = Instant::now();
    let mut child = spawn_daemon(&bin, &dirs, &base, listen, &args, 1)?;
    let (mut first_poll, mut first_submit, mut full_rate) = (None, None, None);
    let mut window: VecDeque<Sample> = VecDeque::new();
    while restart.elapsed() < Duration::from_secs(60) && full_rate.is_none() {
        let s = sample(&sim);
        let at = s.0.duration_since(restart).as_secs_f64();
        if first_poll.is_none() && s.2 > killed.2 {
            first_poll = Some(at);
        }
        if first_submit.is_none() && s.1 > killed.1 {
            first_submit = Some(at);
        }
        window.push_back(s);
        while window
            .front()
            .is_some_and(|f| s.0.duration_since(f.0) > Duration::from_secs(1))
        {
            window.pop_front();
        }
        if let Some(f) = window.front()
            && s.0.duration_since(f.0) >= Duration::from_millis(950)
            && (s.1 - f.1) as f64 >= 0.9 * before_rate
        {
            full_rate = Some(at);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = tokio::task::spawn_blocking(move || terminate(&mut child)).await;
    stop.cancel();
    let show = |v: Option<f64>| v.map_or("never (60 s)".to_owned(), |s| format!("{s:.2} s"));
    println!(
        "parameters: {rows} rows, {SLOTS} slots, {RATE} requests/min, tasks of 5..60 s (time factor {TIME_FACTOR})"
    );
    println!(
        "before the kill: {before_rate:.1} submits/s over 5 s; {in_flight} tasks in flight at the kill"
    );
    println!(
        "after the start: first status query {}, first submit {}, full submission rate (>= 90% of before over 1 s) {}",
        show(first_poll),
        show(first_submit),
        show(full_rate)
    );
    Ok(())
}
