//! Layout 2 to 3: queued rows of known length move to the longest-first
//! order, and a migration stopped before `FORMAT` was rewritten is finished
//! at the next open.

use std::path::Path;

use super::*;
use crate::store::test_claim;

fn write_format(dir: &Path, version: u32) {
    std::fs::write(
        dir.join(FORMAT_FILE),
        format!("infinitetalk-batch state {version}\n"),
    )
    .expect("format");
}

#[test]
fn a_layout_2_folder_gets_its_queued_rows_longest_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = {
        let store = Store::open(dir.path()).expect("open");
        let Begin::Started(b) = store
            .begin_batch("b", "sha", 3, Path::new("/in/b.csv"), &|_| true)
            .expect("begin")
        else {
            panic!("duplicate")
        };
        store.activate_batch(b.seq, false).expect("activate");
        let claimed = store
            .claim(&[test_claim(1, 1), test_claim(1, 2), test_claim(1, 3)])
            .expect("claim");
        let keys: Vec<RowKey> = claimed.iter().map(|(k, _)| *k).collect();
        for (key, seconds) in [
            (keys[0], Some(10.0)),
            (keys[1], Some(30.0)),
            (keys[2], None),
        ] {
            if let Some(audio_seconds) = seconds {
                let op = Op::Costed {
                    audio_seconds,
                    cost_usd: 0.3,
                };
                store.apply(key, op).expect("costed");
            }
            store.apply(key, Op::Unsent).expect("unsent");
        }
        // Layout 2 indexed every queued row under its state, in row order.
        for key in &keys[..2] {
            let record = store.live_row(*key).expect("read").expect("live");
            store
                .index
                .remove(index_key::of(*key, &record).as_ref())
                .expect("remove");
            store
                .index
                .insert(index_key::by_state(RowState::Queued, *key).as_ref(), &[])
                .expect("insert");
        }
        store
            .meta
            .insert(KEY_SCHEMA, encode(&2u32).expect("encode"))
            .expect("schema");
        store.flush_blocking().expect("flush");
        keys
    };
    write_format(dir.path(), 2);

    let store = Store::open(dir.path()).expect("migrates");
    let order: Vec<u64> = store
        .queued_rows(1, 10)
        .expect("queued")
        .into_iter()
        .map(|(row, _)| row)
        .collect();
    assert_eq!(order, [keys[2].row, keys[1].row, keys[0].row]);
    assert_eq!(
        store
            .rows_in_state(RowState::Queued, 10)
            .expect("all")
            .len(),
        3
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join(FORMAT_FILE)).expect("format"),
        format!("infinitetalk-batch state {SCHEMA_VERSION}\n")
    );
    drop(store);

    // Stopped after the database was migrated, before FORMAT was rewritten.
    write_format(dir.path(), 2);
    let store = Store::open(dir.path()).expect("finishes the migration");
    assert_eq!(store.queued_rows(1, 10).expect("queued").len(), 3);
    assert_eq!(
        std::fs::read_to_string(dir.path().join(FORMAT_FILE)).expect("format"),
        format!("infinitetalk-batch state {SCHEMA_VERSION}\n")
    );
}
