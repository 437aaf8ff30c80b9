//! A state folder written by the previous release (layout 1: every row ever
//! claimed kept in the database) is migrated at open: ended rows move to the
//! archive, live rows stay, nothing is lost or counted twice. A folder of an
//! unknown layout is refused with a message that says what to do.
//!
//! The fixture `tests/fixtures/state-v1.tar.gz` was written by the release
//! before this layout (commit cd6d6d5) running `run --simulate`: batch
//! `first` (12 rows, 3 failed with CONTENT_VIOLATION) finished, then batch
//! `second` (30 rows) SIGKILLed with every row running.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use infinitetalk_batch::store::{RowState, Store, StoreError};

mod common;

fn unpack(dir: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-v1.tar.gz");
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(dir)
        .status()
        .expect("run tar");
    assert!(status.success(), "unpack {}", fixture.display());
}

#[test]
fn a_layout_1_folder_is_migrated_and_keeps_every_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    unpack(dir.path());
    let state = dir.path().join("state");
    assert_eq!(
        std::fs::read_to_string(state.join("FORMAT")).expect("format"),
        "infinitetalk-batch state 1\n"
    );
    let before = common::read_results(&dir.path().join("outbox/first/results.csv"));

    let store = Store::open(&state).expect("migrates");
    assert_eq!(
        std::fs::read_to_string(state.join("FORMAT")).expect("format"),
        "infinitetalk-batch state 3\n"
    );
    let batches: HashMap<String, _> = store
        .batches()
        .expect("batches")
        .into_iter()
        .map(|b| (b.name.clone(), b))
        .collect();
    let first = &batches["first"];
    let second = &batches["second"];
    assert_eq!((first.counts.done, first.counts.failed), (9, 3));
    assert_eq!(second.counts.running, 30);
    // Only the running rows stay in the database.
    assert_eq!(store.live_rows(), 30);

    let rows = store.batch_rows(first.seq).expect("rows of first");
    assert_eq!(rows.len(), 12);
    for ((row, record), result) in rows.iter().zip(&before) {
        assert_eq!(record.id, result["id"], "row {row}");
        assert_eq!(record.state.as_str(), result["state"]);
        assert_eq!(record.task_id.as_deref(), Some(result["task_id"].as_str()));
        assert_eq!(
            record.fail_code.as_deref().unwrap_or(""),
            result["fail_code"]
        );
    }
    drop(store);

    // Opening again changes nothing.
    let store = Store::open(&state).expect("reopens");
    assert_eq!(store.live_rows(), 30);
    assert_eq!(store.batch_rows(first.seq).expect("rows").len(), 12);

    // The archived failures can be retried.
    let codes = vec!["CONTENT_VIOLATION".to_owned()];
    let requeued = store
        .requeue_failed(first.seq, Some(&codes))
        .expect("retry");
    assert_eq!(requeued.len(), 3);
    assert!(requeued.iter().all(|(_, r)| r.state == RowState::Queued));
    let first = store.batch(first.seq).expect("first");
    assert_eq!((first.counts.queued, first.counts.failed), (3, 0));
}

#[test]
fn an_unknown_layout_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("FORMAT"), "infinitetalk-batch state 9\n").expect("format");
    let err = Store::open(dir.path()).expect_err("refused");
    assert!(matches!(err, StoreError::Version { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("version 3"), "{text}");
    assert!(text.contains("--state"), "{text}");
}
