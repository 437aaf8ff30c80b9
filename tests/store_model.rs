//! Random sequences of store operations, four threads at once, on a real
//! sled in a temp folder. After each round (every thread one step) the
//! store must hold: every row in a consistent state, the batch's counters
//! equal to its rows (live and archived), the cursor equal to the rows ever
//! claimed, and no final row changed by anything but a retry.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Barrier};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use infinitetalk_batch::manifest::{ManifestRow, ReadPosition};
use infinitetalk_batch::spec::RowSpec;
use infinitetalk_batch::store::{
    Admission, AdmittedAudio, Begin, Claim, Op, RowKey, RowRecord, RowState, Store, StoreError,
};

const THREADS: usize = 4;
const ROUNDS: usize = 250;
const ROWS: u64 = 80;

fn manifest_row(index: u64) -> ManifestRow {
    ManifestRow {
        index,
        line: index + 1,
        id: format!("r{index}"),
        spec: RowSpec {
            image_url: format!("https://example.com/{index}.png"),
            audio_url: format!("https://example.com/{index}.mp3"),
            ..RowSpec::default()
        },
        extra: Vec::new(),
    }
}

fn position(rows_read: u64) -> ReadPosition {
    ReadPosition {
        byte: rows_read * 100,
        line: rows_read + 2,
        rows_read,
    }
}

/// The next one to three rows of the manifest, if any are left.
fn next_fresh(store: &Store, seq: u64, rng: &mut StdRng) -> Option<std::ops::RangeInclusive<u64>> {
    let read = store
        .batch(seq)
        .expect("batch")
        .cursor
        .map_or(0, |c| c.rows_read);
    if read >= ROWS {
        return None;
    }
    let n = rng.random_range(1..=3).min(ROWS - read);
    Some(read + 1..=read + n)
}

/// One random step; returns whether it was a retry (which may change final rows).
fn step(store: &Store, seq: u64, rng: &mut StdRng) -> bool {
    let pick = |rng: &mut StdRng, state: RowState| -> Option<(RowKey, RowRecord)> {
        let rows = store.rows_in_state(state, usize::MAX).expect("rows");
        if rows.is_empty() {
            None
        } else {
            let i = rng.random_range(0..rows.len());
            Some(rows[i].clone())
        }
    };
    let task = |rng: &mut StdRng, r: &RowRecord| -> String {
        // Mostly the row's own task, sometimes a stale or foreign one.
        match (rng.random_range(0..5), &r.task_id) {
            (0, _) | (_, None) => format!("other-{}", rng.random_range(0..3)),
            (_, Some(t)) => t.clone(),
        }
    };
    let code = |rng: &mut StdRng| {
        ["PROCESSING_TIMEOUT", "CONTENT_VIOLATION"][rng.random_range(0..2)].to_owned()
    };
    let result: Result<(), StoreError> = match rng.random_range(0..14) {
        12 => {
            // Admission (`--probe`): fresh rows let into the queue with
            // what their audio's probe found.
            let Some(fresh) = next_fresh(store, seq, rng) else {
                return false;
            };
            let admissions: Vec<Admission> = fresh
                .map(|i| Admission {
                    batch: seq,
                    row: manifest_row(i),
                    next: position(i),
                    audio: match rng.random_range(0..6) {
                        0 => AdmittedAudio::NotYet,
                        1 => AdmittedAudio::Bad {
                            code: "AUDIO_UNSUPPORTED".into(),
                            msg: "m".into(),
                        },
                        _ => AdmittedAudio::Seconds(f64::from(rng.random_range(5..60u32))),
                    },
                })
                .collect();
            store.admit(&admissions).map(|_| ())
        }
        13 => match pick(rng, RowState::Submitting) {
            Some((key, _)) => store
                .apply(
                    key,
                    Op::Costed {
                        audio_seconds: f64::from(rng.random_range(5..60u32)),
                        cost_usd: 0.3,
                    },
                )
                .map(|_| ()),
            None => Ok(()),
        },
        0 | 1 => {
            let Some(fresh) = next_fresh(store, seq, rng) else {
                return false;
            };
            let claims: Vec<Claim> = fresh
                .map(|i| Claim::Fresh {
                    batch: seq,
                    row: manifest_row(i),
                    next: position(i),
                })
                .collect();
            store.claim(&claims).map(|_| ())
        }
        2 => match pick(rng, RowState::Queued) {
            Some((key, _)) => store.claim(&[Claim::Again(key)]).map(|_| ()),
            None => Ok(()),
        },
        3 => match pick(rng, RowState::Submitting) {
            Some((key, _)) => {
                let t = format!("t{}-{}", key.row, rng.random::<u32>());
                store
                    .apply(
                        key,
                        Op::TaskCreated {
                            task_id: t,
                            at_ms: 1,
                        },
                    )
                    .map(|_| ())
            }
            None => Ok(()),
        },
        4 => match pick(rng, RowState::Submitting) {
            Some((key, _)) if rng.random_bool(0.5) => store.apply(key, Op::Unsent).map(|_| ()),
            Some((key, _)) => store
                .apply(
                    key,
                    Op::SubmitFailed {
                        code: code(rng),
                        msg: "m".into(),
                    },
                )
                .map(|_| ()),
            None => Ok(()),
        },
        5 | 6 => match pick(rng, RowState::Running) {
            Some((key, r)) => {
                let task_id = task(rng, &r);
                let op = match rng.random_range(0..3) {
                    0 => Op::Succeeded {
                        task_id,
                        result_urls: vec!["u".into()],
                        cost_time_ms: Some(5),
                        at_ms: 2,
                    },
                    1 => Op::TaskFailed {
                        task_id,
                        code: code(rng),
                        msg: "m".into(),
                    },
                    _ => Op::Resubmit {
                        task_id,
                        code: code(rng),
                        msg: "m".into(),
                        counted: true,
                    },
                };
                store.apply(key, op).map(|_| ())
            }
            None => Ok(()),
        },
        7 => match pick(rng, RowState::Downloading) {
            Some((key, r)) if rng.random_bool(0.8) => store
                .apply(
                    key,
                    Op::Downloaded {
                        outputs: vec![format!("{}.mp4", r.id)],
                    },
                )
                .map(|_| ()),
            Some((key, _)) => store
                .apply(
                    key,
                    Op::DownloadFailed {
                        code: "DOWNLOAD_FAILED".into(),
                        msg: "m".into(),
                    },
                )
                .map(|_| ()),
            None => Ok(()),
        },
        8 => match pick(rng, RowState::Queued) {
            Some((key, _)) => store.apply(key, Op::Cancel { msg: "m".into() }).map(|_| ()),
            None => Ok(()),
        },
        9 => store.retire(rng.random_range(1..20)).map(|_| ()),
        10 => {
            // Anything on a final row must be refused.
            let state = if rng.random_bool(0.5) {
                RowState::Done
            } else {
                RowState::Failed
            };
            if let Some((key, r)) = pick(rng, state) {
                let op = Op::Downloaded { outputs: vec![] };
                let t = r.task_id.clone().unwrap_or_default();
                for op in [
                    op,
                    Op::Unsent,
                    Op::TaskFailed {
                        task_id: t,
                        code: "X".into(),
                        msg: "m".into(),
                    },
                ] {
                    assert!(store.apply(key, op).is_err(), "a final row was changed");
                }
            }
            Ok(())
        }
        _ => {
            if rng.random_bool(0.3) {
                let codes = vec!["PROCESSING_TIMEOUT".to_owned()];
                store
                    .requeue_failed(seq, Some(&codes))
                    .map(|_| ())
                    .expect("retry");
                return true;
            }
            Ok(())
        }
    };
    match result {
        Ok(())
        | Err(
            StoreError::WrongState { .. } | StoreError::StaleTask { .. } | StoreError::NoRow(_),
        ) => false,
        Err(e) => panic!("unexpected store error: {e}"),
    }
}

fn check(
    store: &Store,
    seq: u64,
    finals: &mut HashMap<u64, RowRecord>,
    retried: bool,
    round: usize,
) {
    let batch = store.batch(seq).expect("batch");
    let rows = store.batch_rows(seq).expect("rows");
    let mut tally: HashMap<RowState, u64> = HashMap::new();
    for (row, r) in &rows {
        *tally.entry(r.state).or_default() += 1;
        match r.state {
            RowState::Running | RowState::Downloading | RowState::Done => {
                assert!(
                    r.task_id.is_some(),
                    "round {round}: row {row} {:?} without a task",
                    r.state
                )
            }
            RowState::Failed => assert!(
                r.fail_code.is_some(),
                "round {round}: row {row} failed without a code"
            ),
            RowState::Queued | RowState::Submitting => {}
        }
        if r.state == RowState::Done {
            assert_eq!(
                r.outputs,
                [format!("{}.mp4", r.id)],
                "round {round}: row {row}"
            );
        }
        if let Some(before) = finals.get(row)
            && !retried
        {
            assert_eq!(before, r, "round {round}: final row {row} changed");
        }
    }
    let n = |s| tally.get(&s).copied().unwrap_or(0);
    let c = batch.counts;
    assert_eq!(
        [
            c.queued,
            c.submitting,
            c.running,
            c.downloading,
            c.done,
            c.failed
        ],
        [
            n(RowState::Queued),
            n(RowState::Submitting),
            n(RowState::Running),
            n(RowState::Downloading),
            n(RowState::Done),
            n(RowState::Failed)
        ],
        "round {round}: counters and rows disagree"
    );
    assert_eq!(
        batch.cursor.map_or(0, |c| c.rows_read),
        rows.len() as u64,
        "round {round}"
    );
    // The index finds every live row under its state, and only there.
    for state in RowState::ALL {
        let mut indexed: Vec<u64> = store
            .rows_in_state(state, usize::MAX)
            .expect("indexed")
            .into_iter()
            .map(|(k, _)| k.row)
            .collect();
        indexed.sort_unstable();
        let live: Vec<u64> = rows
            .iter()
            .filter(|(row, r)| {
                r.state == state
                    && store
                        .live_row(RowKey {
                            batch: seq,
                            row: *row,
                        })
                        .expect("live")
                        .is_some()
            })
            .map(|(row, _)| *row)
            .collect();
        assert_eq!(indexed, live, "round {round}: {state:?} rows in the index");
    }
    // Queued rows go in submission order: unknown length in row order,
    // then longest first.
    let queued = store.queued_rows(seq, usize::MAX).expect("queued");
    assert_eq!(queued.len() as u64, c.queued, "round {round}");
    let order: Vec<(bool, std::cmp::Reverse<i64>, u64)> = queued
        .iter()
        .map(|(row, r)| {
            let ms = r.audio_seconds.map_or(0, |s| (s * 1000.0) as i64);
            (r.audio_seconds.is_some(), std::cmp::Reverse(ms), *row)
        })
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "round {round}: queued rows out of order");
    finals.clear();
    finals.extend(rows.into_iter().filter(|(_, r)| r.state.is_final()));
}

#[test]
fn random_concurrent_operations_keep_the_store_consistent() {
    for seed in [1u64, 2, 3] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let Begin::Started(batch) = store
            .begin_batch("model", "sha", ROWS, Path::new("/in/model.csv"), &|_| true)
            .expect("begin")
        else {
            panic!("duplicate")
        };
        store.activate_batch(batch.seq, false).expect("activate");
        let seq = batch.seq;
        let barrier = Arc::new(Barrier::new(THREADS + 1));
        let retried = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A worker's failure is reported by the main thread: a worker that
        // panicked would leave the others waiting at the barrier for ever.
        let failure: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (store, barrier, retried, failure) = (
                    store.clone(),
                    barrier.clone(),
                    retried.clone(),
                    failure.clone(),
                );
                std::thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed * 100 + t as u64);
                    for _ in 0..ROUNDS {
                        barrier.wait();
                        let stepped =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                step(&store, seq, &mut rng)
                            }));
                        match stepped {
                            Ok(true) => retried.store(true, std::sync::atomic::Ordering::SeqCst),
                            Ok(false) => {}
                            Err(panic) => {
                                let msg = panic
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_default();
                                let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                                slot.get_or_insert(msg);
                            }
                        }
                        barrier.wait();
                    }
                })
            })
            .collect();
        let mut finals = HashMap::new();
        for round in 0..ROUNDS {
            barrier.wait();
            barrier.wait();
            if let Some(msg) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
                panic!("seed {seed}, round {round}: a worker failed: {msg}");
            }
            let was_retried = retried.swap(false, std::sync::atomic::Ordering::SeqCst);
            check(&store, seq, &mut finals, was_retried, round);
        }
        for w in workers {
            w.join().expect("worker");
        }
        // Everything ended can leave the database; the counters still hold.
        store.retire(usize::MAX).expect("retire all");
        check(&store, seq, &mut finals, false, ROUNDS);
        let rows = store.batch_rows(seq).expect("rows");
        let live = rows.iter().filter(|(_, r)| !r.state.is_final()).count();
        assert_eq!(
            store.live_rows(),
            live,
            "only live rows stay in the database"
        );
        // The walk went through the states, not around them.
        let ended = |s| rows.iter().filter(|(_, r)| r.state == s).count();
        assert!(
            rows.len() as u64 > ROWS / 2,
            "seed {seed}: {} rows claimed",
            rows.len()
        );
        assert!(
            ended(RowState::Done) > 0 && ended(RowState::Failed) > 0,
            "seed {seed}"
        );
        assert!(
            rows.iter().any(|(_, r)| !r.previous_tasks.is_empty()),
            "seed {seed}: no row got a second task"
        );
    }
}
