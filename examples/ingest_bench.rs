//! Issue #2: accepting a 1,000,000-row manifest durably.
//!
//! ```text
//! cargo run --release --example ingest_bench -- [ROWS]
//! ```
//!
//! Writes a manifest of ROWS rows (default 1,000,000) into a fresh inbox,
//! runs `ingest::ingest_file` into a fresh `Store` (validation, the durable
//! batch record, the copy into the outbox, the flushes), and prints rows
//! accepted per second, peak RSS (VmHWM) and the size of the state folder.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use infinitetalk_batch::ingest::{self, Folders, Outcome};
use infinitetalk_batch::store::Store;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.replace('_', "").parse()?,
        None => 1_000_000,
    };
    let root = tempfile::tempdir()?;
    let folders = Folders::new(root.path().join("inbox"), root.path().join("outbox"));
    let state = root.path().join("state");
    std::fs::create_dir_all(&folders.inbox)?;
    let file = folders.inbox.join("million.csv");

    let started = Instant::now();
    generate(&file, rows)?;
    let size = std::fs::metadata(&file)?.len();
    println!(
        "generate: {rows} rows, {:.1} MB in {:.2} s",
        size as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    let rss_before = peak_rss_kib();

    let store = Store::open(&state)?;
    let started = Instant::now();
    let outcome = ingest::ingest_file(&store, &folders, &file, false)?;
    let secs = started.elapsed().as_secs_f64();
    let batch = match outcome {
        Outcome::Accepted(batch) => batch,
        other => return Err(format!("the manifest was not accepted: {other:?}").into()),
    };
    if batch.total_rows != rows {
        return Err(format!("accepted {} rows, expected {rows}", batch.total_rows).into());
    }
    println!(
        "ingest: {rows} rows accepted durably in {secs:.2} s = {:.0} rows/s (target >= 200000)",
        rows as f64 / secs
    );
    drop(store);

    if let Some(kib) = rss_before {
        println!(
            "peak RSS before ingest (generator): {:.1} MB",
            kib as f64 * 1024.0 / 1e6
        );
    }
    match peak_rss_kib() {
        Some(kib) => println!(
            "peak RSS: {:.1} MB (target < 100 MB)",
            kib as f64 * 1024.0 / 1e6
        ),
        None => println!("peak RSS: unknown (no VmHWM in /proc/self/status)"),
    }
    println!(
        "state folder after ingest: {:.2} MB",
        dir_size(&state) as f64 / 1e6
    );
    println!(
        "outbox after ingest (the accepted manifest.csv): {:.1} MB",
        dir_size(&folders.outbox) as f64 / 1e6
    );
    Ok(())
}

/// A manifest as users write them: every column, some quoting, CRLF.
fn generate(path: &Path, rows: u64) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    out.write_all(
        b"\xef\xbb\xbfid,image_url,audio_url,mask_url,prompt,resolution,seed,provider,customer\r\n",
    )?;
    for i in 1..=rows {
        let id = if i % 3 == 0 {
            String::new()
        } else {
            format!("clip-{i}")
        };
        let mask = if i % 5 == 0 {
            format!("https://cdn.example.com/masks/{i}.png")
        } else {
            String::new()
        };
        let resolution = if i % 2 == 0 { "720p" } else { "480p" };
        write!(
            out,
            "{id},https://cdn.example.com/portraits/{i}.png,https://cdn.example.com/audio/{i}.mp3,\
             {mask},\"A calm, friendly voice; take {i}\",{resolution},{},auto,customer {}\r\n",
            i % 1000,
            i % 17
        )?;
    }
    out.flush()
}

/// Bytes of every file under `dir`, recursively (bounded by the tree).
fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Peak resident set size in KiB, from /proc/self/status.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
