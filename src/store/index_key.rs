//! Keys of the store's `index` tree: where a live row is found by state.
//!
//! Every live row has one entry. A row sits under its state, in batch and
//! row order (`state|seq|row`), except a queued row whose audio length is
//! known (`--probe`): it sits apart, in its batch longest first
//! (`LONGEST|seq|!length_ms|row`). The submitter takes a batch's queued rows
//! in index order, so long tasks start first and a batch's tail (its last
//! tasks ending one by one while slots idle) is made of short ones.

use super::{RowKey, RowRecord, RowState, StoreError};

/// The tag of queued rows with a known length (after the states' tags).
pub(super) const LONGEST_FIRST: u8 = 6;

/// One entry's key: 17 bytes under a state, 25 under [`LONGEST_FIRST`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct IndexKey {
    bytes: [u8; 25],
    len: usize,
}

impl AsRef<[u8]> for IndexKey {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Milliseconds of audio, longest first when compared as bytes.
fn length_order(seconds: f64) -> [u8; 8] {
    // A float cast saturates (and NaN gives 0): no length is out of range.
    let ms = (seconds * 1000.0) as u64;
    (u64::MAX - ms).to_be_bytes()
}

/// The entry of row `key` in `state`, ordered by row (the length is not
/// used: see [`of`] for the one a record has).
pub(super) fn by_state(state: RowState, key: RowKey) -> IndexKey {
    let mut bytes = [0u8; 25];
    bytes[0] = state.tag();
    bytes[1..9].copy_from_slice(&key.batch.to_be_bytes());
    bytes[9..17].copy_from_slice(&key.row.to_be_bytes());
    IndexKey { bytes, len: 17 }
}

/// The entry a row's record has.
pub(super) fn of(key: RowKey, record: &RowRecord) -> IndexKey {
    match (record.state, record.audio_seconds) {
        (RowState::Queued, Some(seconds)) => {
            let mut bytes = [0u8; 25];
            bytes[0] = LONGEST_FIRST;
            bytes[1..9].copy_from_slice(&key.batch.to_be_bytes());
            bytes[9..17].copy_from_slice(&length_order(seconds));
            bytes[17..25].copy_from_slice(&key.row.to_be_bytes());
            IndexKey { bytes, len: 25 }
        }
        (state, _) => by_state(state, key),
    }
}

/// The first and last possible entries of batch `seq`'s longest-first rows.
pub(super) fn longest_first_range(seq: u64) -> (IndexKey, IndexKey) {
    let mut low = [0u8; 25];
    low[0] = LONGEST_FIRST;
    low[1..9].copy_from_slice(&seq.to_be_bytes());
    let mut high = [0xffu8; 25];
    high[0] = LONGEST_FIRST;
    high[1..9].copy_from_slice(&seq.to_be_bytes());
    (
        IndexKey {
            bytes: low,
            len: 25,
        },
        IndexKey {
            bytes: high,
            len: 25,
        },
    )
}

/// The row an entry is about.
pub(super) fn parse(bytes: &[u8]) -> Result<RowKey, StoreError> {
    let bad = || StoreError::Corrupt {
        what: "index key",
        message: format!("{} bytes", bytes.len()),
    };
    let part = |at: usize| -> Result<u64, StoreError> {
        bytes
            .get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(bad)
    };
    match (bytes.first(), bytes.len()) {
        (Some(&LONGEST_FIRST), 25) => Ok(RowKey {
            batch: part(1)?,
            row: part(17)?,
        }),
        (Some(_), 17) => Ok(RowKey {
            batch: part(1)?,
            row: part(9)?,
        }),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::RowSpec;

    fn queued(seconds: Option<f64>) -> RowRecord {
        let mut r = RowRecord::new("r".into(), 2, RowSpec::default());
        r.audio_seconds = seconds;
        r
    }

    #[test]
    fn queued_rows_with_a_length_sort_longest_first_within_their_batch() {
        let k = |row| RowKey { batch: 7, row };
        let long = of(k(9), &queued(Some(30.5)));
        let short = of(k(1), &queued(Some(5.0)));
        let short_later = of(k(2), &queued(Some(5.0)));
        assert!(long.as_ref() < short.as_ref(), "longest first");
        assert!(short.as_ref() < short_later.as_ref(), "then row order");
        let (low, high) = longest_first_range(7);
        for e in [long, short, short_later] {
            assert!(low.as_ref() <= e.as_ref() && e.as_ref() <= high.as_ref());
        }
        let other_batch = of(RowKey { batch: 8, row: 1 }, &queued(Some(99.0)));
        assert!(other_batch.as_ref() > high.as_ref());
        for (e, key) in [(long, k(9)), (short, k(1))] {
            assert_eq!(parse(e.as_ref()).expect("parse"), key);
        }
    }

    #[test]
    fn other_rows_sit_under_their_state_in_row_order() {
        let key = RowKey { batch: 3, row: 4 };
        let mut r = queued(Some(12.0));
        r.state = RowState::Running;
        assert_eq!(of(key, &r), by_state(RowState::Running, key));
        assert_eq!(of(key, &queued(None)), by_state(RowState::Queued, key));
        assert_eq!(
            parse(by_state(RowState::Done, key).as_ref()).expect("parse"),
            key
        );
        assert!(parse(&[1, 2, 3]).is_err());
        // Lengths beyond any real audio still order (saturated), not panic.
        let _ = of(key, &queued(Some(f64::INFINITY)));
        let _ = of(key, &queued(Some(f64::NAN)));
    }
}
