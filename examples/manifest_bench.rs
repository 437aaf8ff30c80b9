//! Measures manifest validation and reading on a generated manifest.
//!
//! ```text
//! cargo run --release --example manifest_bench -- [ROWS]
//! ```
//!
//! ROWS defaults to 1,000,000. Prints rows per second for `validate_path`
//! and for `RowReader`, and the process's peak resident memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use infinitetalk_batch::manifest::{RowReader, validate_path};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.replace('_', "").parse()?,
        None => 1_000_000,
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.csv");

    let started = Instant::now();
    generate(&path, rows)?;
    let size = std::fs::metadata(&path)?.len();
    println!(
        "generate: {rows} rows, {:.1} MB in {:.2} s",
        size as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let summary = validate_path(&path)?;
    report("validate", summary.rows, started);
    assert_eq!(summary.rows, rows);

    let started = Instant::now();
    let mut reader = RowReader::open(&path, None)?;
    let mut read = 0u64;
    while let Some((_row, _next)) = reader.next_row()? {
        read += 1;
    }
    report("read", read, started);
    assert_eq!(read, rows);

    match peak_rss_kib() {
        Some(kib) => println!("peak RSS: {:.1} MB", kib as f64 * 1024.0 / 1e6),
        None => println!("peak RSS: unknown (no VmHWM in /proc/self/status)"),
    }
    Ok(())
}

fn report(what: &str, rows: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 {
        rows as f64 / secs
    } else {
        f64::INFINITY
    };
    println!("{what}: {rows} rows in {secs:.2} s = {rate:.0} rows/s");
}

/// A manifest as users write them: every column, some quoting, CRLF.
fn generate(path: &Path, rows: u64) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    out.write_all(
        b"\xef\xbb\xbfid,image_url,audio_url,mask_url,prompt,resolution,seed,provider,customer\r\n",
    )?;
    for i in 1..=rows {
        // Every third row leaves its id blank, so defaults are checked too;
        // explicit ids never look like row numbers.
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

/// Peak resident set size in KiB, from /proc/self/status.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
