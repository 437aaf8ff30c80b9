//! The store keeps every flushed transition across a SIGKILL.
//!
//! The test re-runs its own binary as a child that walks rows through their
//! states, flushing after each step and printing what it flushed, and moves
//! ended rows to the archive as the daemon does; the parent kills it with
//! SIGKILL part-way (or the child dies at a named failpoint, between an
//! archive write and the rows leaving the database), reopens the store and
//! checks that every row is at least where the child last said it was, once,
//! and that the counters agree with the rows.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use infinitetalk_batch::failpoint;
use infinitetalk_batch::manifest::{ManifestRow, ReadPosition};
use infinitetalk_batch::spec::RowSpec;
use infinitetalk_batch::store::{Begin, Claim, Op, RowKey, RowState, Store};

const ROWS: u64 = 300;
const CHILD_ENV: &str = "STORE_CRASH_CHILD_DIR";

fn row(index: u64) -> ManifestRow {
    ManifestRow {
        index,
        line: index + 1,
        id: format!("r{index}"),
        spec: RowSpec {
            image_url: format!("https://example.com/{index}.png"),
            mask_url: None,
            audio_url: format!("https://example.com/{index}.mp3"),
            prompt: None,
            resolution: None,
            seed: None,
            provider: None,
        },
        extra: Vec::new(),
    }
}

fn rank(state: RowState) -> u8 {
    match state {
        RowState::Queued => 0,
        RowState::Submitting => 1,
        RowState::Running => 2,
        RowState::Downloading => 3,
        RowState::Done | RowState::Failed => 4,
    }
}

/// The child's work: runs only when the parent starts this binary with CHILD_ENV.
#[test]
fn child_walks_rows_through_their_states() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = Store::open(Path::new(&dir)).expect("open store");
    let begin = store
        .begin_batch(
            "crash",
            "0123",
            ROWS,
            Path::new("/nonexistent/crash.csv"),
            &|_| true,
        )
        .expect("begin");
    let Begin::Started(batch) = begin else {
        panic!("unexpected duplicate")
    };
    store.activate_batch(batch.seq, false).expect("activate");
    store.flush_blocking().expect("flush");
    println!("ready {}", batch.seq);
    for i in 1..=ROWS {
        let key = RowKey {
            batch: batch.seq,
            row: i,
        };
        let next = ReadPosition {
            byte: i * 10,
            line: i + 2,
            rows_read: i,
        };
        store
            .claim(&[Claim::Fresh {
                batch: batch.seq,
                row: row(i),
                next,
            }])
            .expect("claim");
        store.flush_blocking().expect("flush");
        println!("{i} submitting");
        let task_id = format!("task-{i}");
        store
            .apply(
                key,
                Op::TaskCreated {
                    task_id: task_id.clone(),
                    at_ms: 1,
                },
            )
            .expect("run");
        store.flush_blocking().expect("flush");
        println!("{i} running");
        let end = if i % 7 == 0 {
            Op::TaskFailed {
                task_id,
                code: "CONTENT_VIOLATION".into(),
                msg: "no".into(),
            }
        } else {
            Op::Succeeded {
                task_id,
                result_urls: vec![format!("https://example.com/{i}.mp4")],
                cost_time_ms: Some(10),
                at_ms: 2,
            }
        };
        store.apply(key, end).expect("end");
        if i % 7 != 0 {
            store
                .apply(
                    key,
                    Op::Downloaded {
                        outputs: vec![format!("r{i}.mp4")],
                    },
                )
                .expect("downloaded");
        }
        store.flush_blocking().expect("flush");
        println!("{i} ended");
        if i % 5 == 0 {
            store.retire(usize::MAX).expect("retire");
            store.flush_blocking().expect("flush");
        }
    }
    println!("finished");
}

#[test]
fn every_flushed_transition_survives_sigkill() {
    // Round 3 dies inside the first retirement, after the archive write and
    // before the rows leave the database.
    for round in 0..4u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = std::env::current_exe().expect("test binary");
        let point = if round == 3 {
            "archive-before-remove"
        } else {
            ""
        };
        let mut child = Command::new(exe)
            .env(failpoint::VAR, point)
            .args([
                "--exact",
                "child_walks_rows_through_their_states",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut lines = BufReader::new(stdout).lines();
        let kill_after = if round == 3 {
            u64::MAX
        } else {
            40 + round * 170
        };
        let mut last: Vec<u8> = vec![0; ROWS as usize + 1];
        let mut seen = 0u64;
        let mut batch_seq = 0u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let Some(Ok(line)) = lines.next() else { break };
            // libtest may print "test NAME ... " on the same line first.
            if let Some((_, seq)) = line.split_once("ready ") {
                batch_seq = seq.trim().parse().expect("seq");
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(i), Some(state)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(i) = i.parse::<usize>() else { continue };
            last[i] = match state {
                "submitting" => 1,
                "running" => 2,
                _ => 4,
            };
            seen += 1;
            if seen == kill_after {
                child.kill().expect("SIGKILL");
                break;
            }
        }
        let status = child.wait().expect("child ends");
        assert!(batch_seq > 0, "child never got ready");
        if round == 3 {
            assert!(!status.success(), "the failpoint aborted the child");
            assert!(
                seen >= 15,
                "died at the first retirement, after row 5: {seen}"
            );
        } else {
            assert!(seen >= kill_after, "child stopped early after {seen} steps");
        }

        let store = Store::open(dir.path()).expect("reopen after SIGKILL");
        let batch = store.batch(batch_seq).expect("batch survives");
        let rows: std::collections::HashMap<u64, _> = store
            .batch_rows(batch_seq)
            .expect("rows")
            .into_iter()
            .collect();
        for i in 1..=ROWS {
            let record = rows.get(&i);
            let flushed = last[i as usize];
            let found = record.map_or(0, |r| rank(r.state));
            assert!(
                found >= flushed,
                "round {round}: row {i} was flushed at rank {flushed}, found {found}"
            );
            if found >= 2 {
                let task = record.and_then(|r| r.task_id.clone());
                assert_eq!(task, Some(format!("task-{i}")), "row {i} lost its task id");
            }
        }
        // Counters moved in the same transactions as the rows, and an ended
        // row is counted once whether it is in the archive, the database, or
        // (after a kill mid-retirement) both.
        let mut by_state = std::collections::HashMap::new();
        for r in rows.values() {
            *by_state.entry(r.state).or_insert(0u64) += 1;
        }
        let tally = |s| by_state.get(&s).copied().unwrap_or(0);
        assert_eq!(
            batch.counts.submitting,
            tally(RowState::Submitting),
            "round {round}"
        );
        assert_eq!(
            batch.counts.running,
            tally(RowState::Running),
            "round {round}"
        );
        assert_eq!(
            batch.counts.downloading,
            tally(RowState::Downloading),
            "round {round}"
        );
        assert_eq!(batch.counts.done, tally(RowState::Done), "round {round}");
        assert_eq!(
            batch.counts.failed,
            tally(RowState::Failed),
            "round {round}"
        );
        let records = rows.len() as u64;
        assert_eq!(
            batch.cursor.map_or(0, |c| c.rows_read),
            records,
            "cursor matches claimed rows"
        );
    }
}
