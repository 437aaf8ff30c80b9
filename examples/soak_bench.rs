//! Issue #12: the daemon's memory and state folder over a long run.
//!
//! ```text
//! cargo build --release --bins --examples
//! ./target/release/examples/soak_bench [ROWS] [EVERY] [BATCHES]
//! ```
//!
//! Defaults: 200,000 rows in 4 manifests, a line every 20,000 rows.
//! Starts the simulator in its own process (`infinitetalk-batch simulate`:
//! tasks of 0.1–0.3 s, limits far above what two cores can drive) so that the
//! daemon's RSS is its own, then the real release daemon against it
//! (`--max-concurrent 1000`, `--poll-min 100ms`), drops the manifests into
//! the inbox, and every EVERY rows ended prints: rows ended, the daemon's
//! RSS and peak RSS (/proc/PID/status), the live rows it holds in its
//! database (`infinitetalk_live_rows`), the database's and the archive's
//! size on disk. At the end: peak RSS, the RSS slope per 100,000 rows after
//! the first quarter (least squares), and the state folder's bytes per row.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error>;

fn arg(n: usize, default: u64) -> Result<u64, BoxError> {
    match std::env::args().nth(n) {
        Some(a) => Ok(a.replace('_', "").parse()?),
        None => Ok(default),
    }
}

fn free_port() -> Result<u16, BoxError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Kills the child when dropped, so that a failed run leaves nothing behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn write_manifest(path: &Path, batch: u64, rows: u64) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(fs::File::create(path)?);
    writeln!(w, "id,image_url,audio_url")?;
    for i in 1..=rows {
        writeln!(
            w,
            "s{batch}-{i},https://example.com/p/{batch}/{i}.png,https://example.com/a/{batch}/{i}.mp3?sim_audio_seconds=5"
        )?;
    }
    w.flush()
}

/// Rows ended and live rows, from the daemon's `/metrics`.
async fn progress(http: &reqwest::Client, base: &str) -> Option<(u64, u64)> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |prefix: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    let ended =
        value("infinitetalk_rows{state=\"done\"}") + value("infinitetalk_rows{state=\"failed\"}");
    Some((ended, value("infinitetalk_live_rows")))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let rows = arg(1, 200_000)?;
    let every = arg(2, 20_000)?;
    let batches = arg(3, 4)?.max(1);
    let bin = PathBuf::from("target/release/infinitetalk-batch");
    if !bin.exists() {
        return Err("build first: cargo build --release --bins --examples".into());
    }
    let work = tempfile::tempdir()?;
    let (inbox, outbox, state) = (
        work.path().join("inbox"),
        work.path().join("outbox"),
        work.path().join("state"),
    );
    fs::create_dir_all(&inbox)?;
    let key = work.path().join("key");
    fs::write(&key, "soak-key")?;

    let sim_port = free_port()?;
    let _sim = Reaped(
        Command::new(&bin)
            .args(["simulate", "--listen", &format!("127.0.0.1:{sim_port}")])
            .args([
                "--max-requests-per-minute",
                "100000000",
                "--max-concurrent",
                "100000",
            ])
            .args(["--time-factor", "0.002", "--seed", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let daemon = Reaped(
        Command::new(&bin)
            .args(["run", "--inbox"])
            .arg(&inbox)
            .arg("--outbox")
            .arg(&outbox)
            .arg("--state")
            .arg(&state)
            .args(["--api-base", &format!("http://127.0.0.1:{sim_port}")])
            .arg("--api-key-file")
            .arg(&key)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--max-concurrent",
                "1000",
                "--max-requests-per-minute",
                "1000000",
            ])
            .args(["--poll-min", "100ms", "--poll-max", "2s"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let pid = daemon.0.id();
    let per_batch = rows / batches;
    for b in 1..=batches {
        let n = if b == batches {
            rows - per_batch * (batches - 1)
        } else {
            per_batch
        };
        let tmp = work.path().join(format!("soak{b}.csv"));
        write_manifest(&tmp, b, n)?;
        fs::rename(&tmp, inbox.join(format!("soak{b}.csv")))?;
    }
    println!(
        "soak: {rows} rows in {batches} manifests, daemon pid {pid}, simulator on port {sim_port}"
    );
    println!(
        "{:>9} {:>8} {:>9} {:>9} {:>10} {:>10} {:>11} {:>8}",
        "ended", "secs", "rss_MB", "peak_MB", "live_rows", "db_MB", "archive_MB", "rows/s"
    );
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut next_line = every;
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut last_change = Instant::now();
    let mut last_ended = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some((ended, live)) = progress(&http, &base).await else {
            if started.elapsed() > Duration::from_secs(30) && last_ended == 0 {
                return Err("the daemon does not answer on its listener".into());
            }
            continue;
        };
        if ended != last_ended {
            last_ended = ended;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(120) {
            return Err(format!("no progress for 2 minutes at {ended} rows").into());
        }
        let rss = status_kib(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0;
        samples.push((ended as f64, rss));
        if ended >= next_line || ended >= rows {
            let peak = status_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
            let db = dir_bytes(&state.join("db-v1")) as f64 / 1e6;
            let archive = dir_bytes(&state.join("archive")) as f64 / 1e6;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{ended:>9} {secs:>8.0} {rss:>9.1} {peak:>9.1} {live:>10} {db:>10.1} {archive:>11.1} {:>8.0}",
                ended as f64 / secs
            );
            while next_line <= ended {
                next_line += every;
            }
        }
        if ended >= rows {
            break;
        }
    }
    let peak = status_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    // RSS against rows ended, after the first quarter (warm-up).
    let tail: Vec<(f64, f64)> = samples
        .iter()
        .copied()
        .filter(|(x, _)| *x >= rows as f64 / 4.0)
        .collect();
    let n = tail.len() as f64;
    let (sx, sy) = tail
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = tail.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    let slope = if den > 0.0 {
        num / den * 100_000.0
    } else {
        0.0
    };
    let db = dir_bytes(&state.join("db-v1"));
    let archive = dir_bytes(&state.join("archive"));
    println!("peak RSS: {peak:.1} MB (target <= 64 MB)");
    println!("RSS slope after warm-up: {slope:+.2} MB per 100,000 rows (mean {my:.1} MB)");
    println!(
        "state folder at the end: database {:.1} MB, archive {:.1} MB ({:.0} bytes a row ended)",
        db as f64 / 1e6,
        archive as f64 / 1e6,
        archive as f64 / rows as f64
    );
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
