//! Measures what local media cost at acceptance: every file of a manifest
//! checked, measured (audio) and hashed, and its record written to the
//! batch's media table.
//!
//! ```text
//! cargo run --release --example media_bench -- [FILES] [SECONDS]
//! ```
//!
//! FILES (default 1000) WAV files of SECONDS of 8 kHz audio each (default
//! 125: about 1 MB) and one PNG portrait shared by every row. Times
//! `ingest::ingest_file` of a manifest naming them (cold state folder, files
//! in the page cache, as just written), then the same bytes through a bare
//! SHA-256 loop for comparison, then a manifest naming one file in every
//! row (the per-manifest cache hashes it once). Prints files per second,
//! MB per second and the peak resident memory.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use infinitetalk_batch::ingest::{self, Folders, Outcome};
use infinitetalk_batch::media::{MediaSettings, Publishing};
use infinitetalk_batch::store::Store;
use sha2::{Digest, Sha256};

const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let files: usize = match args.next() {
        Some(a) => a.replace('_', "").parse()?,
        None => 1000,
    };
    let seconds: f64 = match args.next() {
        Some(a) => a.parse()?,
        None => 125.0,
    };
    let dir = tempfile::tempdir()?;
    let media = dir.path().join("media");
    std::fs::create_dir_all(&media)?;
    std::fs::write(media.join("portrait.png"), PNG)?;
    let wav = infinitetalk_batch::simulator::silent_wav_bytes(seconds);
    for i in 0..files {
        // Each file differs (its last byte), so nothing is hashed twice.
        let mut bytes = wav.clone();
        if let Some(last) = bytes.last_mut() {
            *last = (i % 251) as u8;
        }
        std::fs::write(media.join(format!("{i}.wav")), &bytes)?;
    }
    let total_bytes = (wav.len() * files) as f64;
    println!(
        "generate: {files} WAV files of {:.2} MB ({seconds} s of audio each), {:.1} MB in all",
        wav.len() as f64 / 1e6,
        total_bytes / 1e6
    );

    let folders = folders(dir.path(), &media);
    std::fs::create_dir_all(&folders.inbox)?;
    let store = Store::open(&dir.path().join("state"))?;

    let manifest = folders.inbox.join("distinct.csv");
    write_manifest(&manifest, files, |i| format!("{i}.wav"))?;
    let started = Instant::now();
    accept(&store, &folders, &manifest)?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "accept, {files} distinct files: {secs:.2} s = {:.0} files/s, {:.0} MB/s (checked, measured, hashed, recorded)",
        files as f64 / secs,
        total_bytes / 1e6 / secs
    );

    let started = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    for i in 0..files {
        let mut f = std::fs::File::open(media.join(format!("{i}.wav")))?;
        let mut h = Sha256::new();
        loop {
            let n = std::io::Read::read(&mut f, &mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        std::hint::black_box(h.finalize());
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "bare SHA-256 of the same files: {secs:.2} s = {:.0} files/s, {:.0} MB/s",
        files as f64 / secs,
        total_bytes / 1e6 / secs
    );

    let manifest = folders.inbox.join("shared.csv");
    write_manifest(&manifest, files, |_| "0.wav".to_owned())?;
    let started = Instant::now();
    accept(&store, &folders, &manifest)?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "accept, {files} rows naming one file: {secs:.2} s = {:.0} rows/s",
        files as f64 / secs
    );

    match peak_rss_kib() {
        Some(kib) => println!("peak RSS: {:.1} MB", kib as f64 * 1024.0 / 1e6),
        None => println!("peak RSS: unknown (no VmHWM in /proc/self/status)"),
    }
    Ok(())
}

fn folders(root: &Path, media: &Path) -> Folders {
    let mut folders = Folders::new(root.join("inbox"), root.join("outbox"));
    folders.media = MediaSettings {
        root: media.to_owned(),
        publishing: Publishing::Url(url::Url::parse("https://media.example/").expect("url")),
    };
    folders
}

fn write_manifest(
    path: &Path,
    rows: usize,
    audio: impl Fn(usize) -> String,
) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "id,image_url,audio_url")?;
    for i in 0..rows {
        writeln!(out, "r{i},portrait.png,{}", audio(i))?;
    }
    out.flush()
}

fn accept(
    store: &Store,
    folders: &Folders,
    manifest: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    match ingest::ingest_file(store, folders, manifest, true)? {
        Outcome::Accepted(_) => Ok(()),
        other => Err(format!("not accepted: {other:?}").into()),
    }
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
