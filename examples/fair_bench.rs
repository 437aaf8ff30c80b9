//! Issue #14: a small batch dropped behind a large one.
//!
//! ```text
//! cargo build --release --bins --examples
//! ./target/release/examples/fair_bench [BIG_ROWS] [SMALL_ROWS]
//! ```
//!
//! Defaults: a 100,000-row batch, then a 20-row one. The built-in simulator
//! runs in this process (100 slots, 10,000 requests/min, tasks of
//! 0.5..6 s: time factor 0.01). The release daemon drains the big batch for
//! 20 s; then the small one is dropped. Printed, from the daemon's store:
//!
//! - how long after its acceptance the small batch's first row was
//!   submitted (target: within 2 s);
//! - how long the small batch took to finish, against what it takes alone
//!   with half the slots (a second daemon, `--max-concurrent 50`, nothing
//!   else to do; target: at most 1.2 times that).

mod bench_util;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use bench_util::{BoxError, Dirs, binary, daemon_args, spawn_daemon, start_sim, terminate};
use infinitetalk_batch::store::Store;
use tokio_util::sync::CancellationToken;

const SLOTS: u32 = 100;
const RATE: u32 = 10_000;
const TIME_FACTOR: f64 = 0.01;

fn manifest(name: &str, rows: usize, base: &str) -> String {
    let mut text = String::from("id,image_url,audio_url\n");
    for i in 0..rows {
        text.push_str(&format!(
            "{name}{i},https://img.example/{name}/{i}.png,{base}/media/{name}/{i}.wav?sim_audio_seconds={}\n",
            5 + i % 16
        ));
    }
    text
}

/// (first submit after acceptance, acceptance to finish) of `batch`, in seconds.
fn timings(state: &Path, batch: &str) -> Result<(f64, f64), BoxError> {
    let store = Store::open(state)?;
    let b = store
        .batches()?
        .into_iter()
        .find(|b| b.name == batch)
        .ok_or("no such batch")?;
    let first = store
        .batch_rows(b.seq)?
        .into_iter()
        .filter_map(|(_, r)| r.submitted_at_ms)
        .min()
        .ok_or("no row submitted")?;
    let finished = b.finished_at_ms.ok_or("not finished")?;
    Ok((
        first.saturating_sub(b.created_at_ms) as f64 / 1000.0,
        finished.saturating_sub(b.created_at_ms) as f64 / 1000.0,
    ))
}

/// Runs a daemon with `slots` until `small` has its results.csv; `big`
/// rows are dropped first (and drained for 20 s) when non-zero.
async fn run(
    bin: &Path,
    base: &str,
    slots: u32,
    big: usize,
    small: usize,
) -> Result<(f64, f64), BoxError> {
    let dirs = Dirs::new()?;
    let listen: SocketAddr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let args = daemon_args(slots, RATE, TIME_FACTOR);
    let mut child = spawn_daemon(bin, &dirs, base, listen, &args, 0)?;
    if big > 0 {
        dirs.drop_manifest("big.csv", &manifest("big", big, base))?;
        tokio::time::sleep(Duration::from_secs(20)).await;
    }
    dirs.drop_manifest("small.csv", &manifest("small", small, base))?;
    let results = dirs.outbox.join("small").join("results.csv");
    let deadline = Instant::now() + Duration::from_secs(600);
    while !results.exists() {
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("the small batch did not finish within 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = tokio::task::spawn_blocking(move || terminate(&mut child)).await;
    timings(&dirs.state, "small")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), BoxError> {
    let arg = |n: usize, default: usize| -> Result<usize, BoxError> {
        std::env::args().nth(n).map_or(Ok(default), |a| {
            a.replace('_', "")
                .parse()
                .map_err(|e| format!("argument {n}: {e}").into())
        })
    };
    let big = arg(1, 100_000)?;
    let small = arg(2, 20)?;
    let bin = binary()?;
    let stop = CancellationToken::new();
    let sim = start_sim(SLOTS, RATE, TIME_FACTOR, stop.clone()).await?;
    let base = sim.base_url();
    let (alone_start, alone) = run(&bin, &base, SLOTS / 2, 0, small).await?;
    let (start, shared) = run(&bin, &base, SLOTS, big, small).await?;
    stop.cancel();
    println!(
        "parameters: {big}-row batch draining, then a {small}-row batch; {SLOTS} slots, {RATE} requests/min, time factor {TIME_FACTOR} (tasks 0.5..6 s)"
    );
    println!(
        "small batch behind the big one: first row submitted {start:.2} s after acceptance (target <= 2 s); finished in {shared:.2} s"
    );
    println!(
        "small batch alone with half the slots ({}): first row submitted after {alone_start:.2} s; finished in {alone:.2} s",
        SLOTS / 2
    );
    println!("ratio: {:.3} (target <= 1.2)", shared / alone.max(1e-9));
    Ok(())
}
