//! Bad input: the manifest reader under arbitrary and mutated bytes (a
//! seeded random mutator, no extra crate), hostile ids and paths, an
//! over-long line, and odd file names, with nothing written outside the
//! three folders.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use infinitetalk_batch::ingest::{self, Folders, Outcome};
use infinitetalk_batch::manifest::{self, MAX_ID_LEN, ManifestError, RowReader};
use infinitetalk_batch::simulator::SimArgs;
use infinitetalk_batch::store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const VALID: &str = "\u{feff}id,image_url,audio_url,mask_url,prompt,resolution,seed,provider,note\r\n\
a1,https://i.example/1.png,https://a.example/1.mp3,,\"hello, world\",480p,-1,auto,x\r\n\
a2,http://i.example/2.png,https://a.example/2.wav,https://m.example/2.png,,720p,42,value,\"multi\nline\"\r\n\
,https://i.example/3.png,https://a.example/3.m4a,,plain,,,official,\r\n";

/// Checks what the reader said about `bytes`: accepted with ids safe as file
/// names, or rejected with `line N: column C: ...` lines.
fn check(path: &Path, bytes: &[u8]) -> bool {
    std::fs::write(path, bytes).expect("write case");
    // As an editor counts: LF, CRLF and a lone CR each end a line.
    let lone_cr = bytes
        .windows(2)
        .filter(|w| w[0] == b'\r' && w[1] != b'\n')
        .count()
        + usize::from(bytes.last() == Some(&b'\r'));
    let lines = (bytes.iter().filter(|b| **b == b'\n').count() + lone_cr) as u64 + 1;
    match manifest::validate_path(path) {
        Ok(summary) => {
            let mut reader = RowReader::open(path, None).expect("an accepted file reads");
            let mut n = 0;
            while let Some((row, _)) = reader.next_row().expect("an accepted file reads") {
                n += 1;
                let id = &row.id;
                assert!(
                    !id.is_empty()
                        && id.len() <= MAX_ID_LEN
                        && !id.starts_with('.')
                        && id
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
                    "accepted an unsafe id {id:?} from {bytes:?}"
                );
                assert!(n <= summary.rows, "more rows read than validated");
            }
            assert_eq!(n, summary.rows);
            true
        }
        Err(ManifestError::Invalid { problems, .. }) => {
            assert!(!problems.is_empty(), "rejected without a reason");
            for p in &problems {
                let text = p.to_string();
                assert!(
                    text.starts_with(&format!("line {}: column {}: ", p.line, p.column)),
                    "{text}"
                );
                assert!(!p.message.is_empty() && !p.column.is_empty(), "{text}");
                assert!(
                    p.line >= 1 && p.line <= lines,
                    "line {} of a {lines}-line file: {text}",
                    p.line
                );
                assert!(!text.contains('\n'), "one problem, one line: {text:?}");
            }
            false
        }
        Err(ManifestError::Io { source, .. }) => panic!("I/O error on a regular file: {source}"),
    }
}

fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    const INTERESTING: &[u8] = b",\"\r\n\0\x01\x7f\xff\xfe\xc3.-/ ";
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..6) {
        let at = if out.is_empty() {
            0
        } else {
            rng.random_range(0..out.len())
        };
        match rng.random_range(0..8) {
            0 if !out.is_empty() => {
                out.remove(at);
            }
            1 => out.insert(at, INTERESTING[rng.random_range(0..INTERESTING.len())]),
            2 => out.insert(at, rng.random()),
            3 if !out.is_empty() => out[at] = rng.random(),
            4 => out.truncate(at),
            5 => {
                // Duplicate a slice (duplicate ids, repeated lines).
                let end = (at + rng.random_range(1..80)).min(out.len());
                let piece = out[at..end].to_vec();
                let to = rng.random_range(0..=out.len());
                out.splice(to..to, piece);
            }
            6 => {
                let hostile: &[&[u8]] = &[
                    b"../x",
                    b"/etc/passwd",
                    b"..",
                    b".hidden",
                    b"a/b",
                    b"a\\b",
                    b"\xe2\x80\xae",
                    b"CON",
                    b"\"\"\"",
                ];
                let h = hostile[rng.random_range(0..hostile.len())];
                out.splice(at..at, h.iter().copied());
            }
            _ => {
                let end = (at + rng.random_range(1..20)).min(out.len());
                out.drain(at..end);
            }
        }
    }
    out
}

#[test]
fn arbitrary_and_mutated_manifests_never_panic_and_always_explain() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("case.csv");
    let mut rng = StdRng::seed_from_u64(0x0bad_1dea);
    let (mut accepted, mut rejected) = (0, 0);
    assert!(check(&path, VALID.as_bytes()), "the seed manifest is valid");
    for case in 0..3000 {
        let bytes = if case % 4 == 0 {
            let len = rng.random_range(0..400);
            (0..len).map(|_| rng.random::<u8>()).collect()
        } else {
            mutate(&mut rng, VALID.as_bytes())
        };
        let outcome = std::panic::catch_unwind(|| check(&path, &bytes));
        match outcome {
            Ok(true) => accepted += 1,
            Ok(false) => rejected += 1,
            Err(_) => panic!("case {case} failed on input {bytes:?}"),
        }
    }
    println!("fuzz: 3000 cases, {accepted} accepted, {rejected} rejected");
    assert!(
        accepted > 50 && rejected > 500,
        "{accepted} / {rejected}: the mutator must exercise both sides"
    );
}

/// Tests that use much memory (sled, the simulator) run apart from the one
/// that measures the peak, since the peak is the whole process's.
static MEMORY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn memory_lock() -> std::sync::MutexGuard<'static, ()> {
    MEMORY.lock().unwrap_or_else(|p| p.into_inner())
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn a_line_longer_than_a_mebibyte_is_rejected_in_bounded_memory() {
    use std::io::Write;
    let _alone = memory_lock();
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("long.csv");
    // 48 MiB: an open quote that never closes, then more rows.
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("file"));
        f.write_all(b"id,image_url,audio_url\nok,https://i/1.png,https://a/1.mp3\nx,\"")
            .expect("w");
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..48 {
            f.write_all(&chunk).expect("w");
        }
        f.write_all(b"\nz,https://i/2.png,https://a/2.mp3\n")
            .expect("w");
    }
    // Reset the high-water mark to the current RSS (Linux: clear_refs 5), so
    // that what an earlier test used cannot hide growth here.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = peak_rss_kib();
    let result = manifest::validate_path(&path);
    let grew_mib = peak_rss_kib().saturating_sub(before) / 1024;
    let Err(ManifestError::Invalid { problems, .. }) = result else {
        panic!("a 48 MiB line must be rejected: {result:?}");
    };
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert!(
        text.iter().any(|t| t.starts_with("line 3: ")),
        "the long row is named by its first line: {text:?}"
    );
    println!(
        "48 MiB line: {text:?}; peak RSS grew by {grew_mib} MiB (high-water mark reset: {reset})"
    );
    assert!(
        grew_mib < 16,
        "memory must stay bounded: grew {grew_mib} MiB"
    );
}

#[test]
fn hostile_ids_are_rejected_and_nothing_lands_outside_the_folders() {
    let _alone = memory_lock();
    let root = tempfile::tempdir().expect("tmp");
    let folders = Folders::new(root.path().join("inbox"), root.path().join("outbox"));
    let state = root.path().join("state");
    std::fs::create_dir_all(&folders.inbox).expect("inbox");
    let store = Store::open(&state).expect("store");
    let long = "a".repeat(MAX_ID_LEN + 1);
    let huge = "h".repeat(200_000);
    let ids = [
        "../x",
        "/etc/passwd",
        "..",
        ".",
        ".hidden",
        "a/b",
        "a\\b",
        long.as_str(),
        "tab\there",
        "nul\u{0}x",
        "bell\u{7}",
        "ünï",
        huge.as_str(),
    ];
    let mut text = String::from("id,image_url,audio_url\n");
    for (i, id) in ids.iter().enumerate() {
        text.push_str(&format!(
            "\"{id}\",https://i.example/{i}.png,https://a.example/{i}.mp3\n"
        ));
    }
    let file = folders.inbox.join("hostile.csv");
    std::fs::write(&file, &text).expect("write");
    let outcome = ingest::ingest_file(&store, &folders, &file, false).expect("ingest runs");
    let Outcome::Rejected { problems } = outcome else {
        panic!("hostile ids must be rejected: {outcome:?}");
    };
    let id_lines: std::collections::BTreeSet<u64> = problems
        .iter()
        .filter(|p| p.column == "id")
        .map(|p| p.line)
        .collect();
    assert_eq!(
        id_lines,
        (2..2 + ids.len() as u64).collect(),
        "every hostile id named on its line: {problems:?}"
    );
    let errors = std::fs::read_to_string(folders.rejected_dir().join("hostile.errors.txt"))
        .expect("errors file");
    for line in errors.lines() {
        assert!(
            line.starts_with("line ") && line.contains(": column "),
            "{line}"
        );
    }
    assert!(folders.rejected_dir().join("hostile.csv").exists());

    // A path that escapes: nothing may exist but the three folders.
    assert_only_three_folders(root.path(), &[]);
}

/// Every entry of `root` is `inbox`, `outbox`, `state` or one of `allowed`.
fn assert_only_three_folders(root: &Path, allowed: &[&str]) {
    for e in std::fs::read_dir(root).expect("root") {
        let name = e.expect("entry").file_name().to_string_lossy().into_owned();
        assert!(
            ["inbox", "outbox", "state"].contains(&name.as_str())
                || allowed.iter().any(|a| name.starts_with(a)),
            "unexpected {name} in the temp root"
        );
    }
}

/// Every file under `dir`, relative.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).expect("under").to_path_buf());
        }
    }
    out.sort();
    out
}

// The guard only keeps the memory test apart; no other task takes it.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_file_names_become_batches_inside_the_outbox() {
    let _alone = memory_lock();
    let sim = Sim::start(SimArgs {
        time_factor: 0.002,
        ..SimArgs::default()
    })
    .await;
    let dirs = Dirs::new();
    let names = [
        " spaced name",
        "ünïcødé ✓",
        "-leading-dash",
        "semi;colon,comma",
        "tab\tname",
        "--help",
    ];
    for (b, name) in names.iter().enumerate() {
        write_manifest(
            &dirs.inbox,
            &format!("{name}.csv"),
            &rows(&format!("n{b}_"), 2, |_| "sim_audio_seconds=5".into()),
        );
    }
    // Hidden files are not manifests: left alone, whatever their stem.
    for hidden in ["..csv", "...csv", ".x.csv"] {
        std::fs::write(dirs.inbox.join(hidden), VALID).expect("hidden");
    }
    let listen = free_addr();
    let mut daemon = spawn_daemon(
        &dirs,
        &sim.url(),
        listen,
        &["--poll-min", "100ms", "--poll-max", "1s"],
        0,
    );
    let all_done = wait_for(Duration::from_secs(60), || {
        names
            .iter()
            .all(|n| dirs.batch_dir(n).join("results.csv").exists())
            .then_some(())
    })
    .await;
    terminate(&mut daemon, Duration::from_secs(25));
    assert!(
        all_done.is_some(),
        "outbox {:?}; log:\n{}",
        tree(&dirs.outbox),
        log_text(&dirs, 0)
    );
    for name in names {
        let results = check_results_against_sim(&dirs, name, &sim.handle);
        assert!(results.iter().all(|r| r["state"] == "done"), "{name}");
    }
    // Exactly one folder per manifest, all directly in the outbox.
    let mut batches: Vec<String> = std::fs::read_dir(&dirs.outbox)
        .expect("outbox")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    batches.sort();
    let mut expected: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    expected.sort();
    assert_eq!(batches, expected);
    for hidden in ["..csv", "...csv", ".x.csv"] {
        assert!(dirs.inbox.join(hidden).exists(), "{hidden} left alone");
    }
    assert_only_three_folders(dirs.root.path(), &["daemon-"]);
    sim.stop().await;
}
