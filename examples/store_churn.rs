//! Issue #12: does the store (sled underneath) stay flat when rows come and
//! go by the million?
//!
//! ```text
//! cargo build --release --examples
//! ./target/release/examples/store_churn [ROWS] [LIVE] [EVERY]
//! ```
//!
//! Defaults: 2,000,000 rows, 1000 live at a time, a line every 200,000.
//! Each row goes the daemon's way through the store: claimed (fresh, the
//! cursor moves), task created, succeeded, downloaded, then archived (its
//! final record appended and synced, the row removed from sled), with a
//! flush every 32 rows as the submit worker does. Prints rows, RSS and peak
//! RSS of this process, live rows, the database's and the archive's size.

use std::path::Path;
use std::time::Instant;

use infinitetalk_batch::manifest::{ManifestRow, ReadPosition};
use infinitetalk_batch::spec::RowSpec;
use infinitetalk_batch::store::{Begin, Claim, Op, RowKey, Store};

type BoxError = Box<dyn std::error::Error>;

fn arg(n: usize, default: u64) -> Result<u64, BoxError> {
    match std::env::args().nth(n) {
        Some(a) => Ok(a.replace('_', "").parse()?),
        None => Ok(default),
    }
}

fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(field))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn dir_mb(dir: &Path) -> f64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0.0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_mb(&e.path()),
            Ok(m) => m.len() as f64 / 1e6,
            Err(_) => 0.0,
        })
        .sum()
}

fn main() -> Result<(), BoxError> {
    let rows = arg(1, 2_000_000)?;
    let live = arg(2, 1000)?.max(1);
    let every = arg(3, 200_000)?.max(1);
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let Begin::Started(batch) =
        store.begin_batch("churn", "sha", rows, Path::new("/in/churn.csv"), &|_| true)?
    else {
        return Err("duplicate".into());
    };
    store.activate_batch(batch.seq, false)?;
    let seq = batch.seq;
    println!(
        "{:>9} {:>7} {:>8} {:>8} {:>9} {:>7} {:>10}",
        "rows", "secs", "rss_MB", "peak_MB", "live", "db_MB", "archive_MB"
    );
    let started = Instant::now();
    let mut samples = Vec::new();
    for i in 1..=rows {
        let key = RowKey { batch: seq, row: i };
        let row = ManifestRow {
            index: i,
            line: i + 1,
            id: format!("r{i}"),
            spec: RowSpec {
                image_url: format!("https://example.com/p/{i}.png"),
                audio_url: format!("https://example.com/a/{i}.mp3"),
                ..RowSpec::default()
            },
            extra: Vec::new(),
        };
        let next = ReadPosition {
            byte: i * 80,
            line: i + 1,
            rows_read: i,
        };
        store.claim(&[Claim::Fresh {
            batch: seq,
            row,
            next,
        }])?;
        let task_id = format!("task-{i:016x}");
        store.apply(
            key,
            Op::TaskCreated {
                task_id: task_id.clone(),
                at_ms: i,
            },
        )?;
        if i % 32 == 0 {
            store.flush_blocking()?;
        }
        // The row `live` places back ends now: `live` rows stay in flight.
        if i > live {
            let old = RowKey {
                batch: seq,
                row: i - live,
            };
            store.apply(
                old,
                Op::Succeeded {
                    task_id: format!("task-{:016x}", i - live),
                    result_urls: vec![format!("https://files.example/{}.mp4", i - live)],
                    cost_time_ms: Some(60_000),
                    at_ms: i,
                },
            )?;
            store.apply(
                old,
                Op::Downloaded {
                    outputs: vec![format!("r{}.mp4", i - live)],
                },
            )?;
        }
        if i % 256 == 0 {
            store.retire(usize::MAX)?;
        }
        if i % every == 0 || i == rows {
            let rss = status_mb("VmRSS:");
            samples.push((i as f64, rss));
            println!(
                "{i:>9} {:>7.0} {rss:>8.1} {:>8.1} {:>9} {:>7.1} {:>10.1}",
                started.elapsed().as_secs_f64(),
                status_mb("VmHWM:"),
                store.live_rows(),
                dir_mb(&dir.path().join("db-v1")),
                dir_mb(&dir.path().join("archive")),
            );
        }
    }
    let tail: Vec<_> = samples
        .iter()
        .filter(|(x, _)| *x >= rows as f64 / 4.0)
        .collect();
    if let (Some(first), Some(last)) = (tail.first(), tail.last())
        && last.0 > first.0
    {
        println!(
            "RSS change after the first quarter: {:+.2} MB per 100,000 rows",
            (last.1 - first.1) / (last.0 - first.0) * 100_000.0
        );
    }
    println!(
        "{:.0} rows/s through the store",
        rows as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}
