//! Read-only views of one batch's rows for the console: a page of rows in
//! row order (all, or those in one state or with one fail code), one row by
//! number, and failed rows counted by fail code, without loading the batch.
//!
//! A row with a record is live (in the database) or ended (its last record
//! in the archive). Live wins: a retried row may still have an older final
//! record in the archive. The archive is read through an [`ArchiveIndex`]
//! per batch, kept in memory for a few batches and brought up to date by
//! reading only what was appended since. Rows never claimed have no record
//! here: the caller reads them from the manifest.
//!
//! Nothing here changes a row.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use super::archive::ArchiveIndex;
use super::{BatchSeq, RowKey, RowRecord, RowState, Store, StoreError};

/// Batches whose archive index is kept in memory at once (12 bytes a row).
const MAX_INDEXES: usize = 4;

/// Which rows a page shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowFilter {
    pub state: Option<RowState>,
    /// Only failed rows with this fail code.
    pub code: Option<String>,
}

impl RowFilter {
    fn state(&self) -> Option<RowState> {
        if self.code.is_some() {
            Some(RowState::Failed)
        } else {
            self.state
        }
    }

    fn matches(&self, state: RowState, code: Option<&str>) -> bool {
        self.state().is_none_or(|s| s == state)
            && self.code.as_deref().is_none_or(|c| code == Some(c))
    }
}

/// The archive indexes of recently viewed batches, least recently used
/// first.
#[derive(Default)]
pub(crate) struct Views {
    indexes: Mutex<Vec<(BatchSeq, ArchiveIndex)>>,
}

impl Store {
    /// Runs `f` on batch `seq`'s archive index, brought up to date first.
    fn with_index<T>(
        &self,
        seq: BatchSeq,
        f: impl FnOnce(&ArchiveIndex) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let total = self.batch(seq)?.total_rows;
        let mut indexes = self
            .views()
            .indexes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut entry = match indexes.iter().position(|(s, _)| *s == seq) {
            Some(i) => indexes.remove(i),
            None => (seq, ArchiveIndex::default()),
        };
        let refreshed = entry.1.refresh(self.archive(), seq, total);
        let result = refreshed.and_then(|()| f(&entry.1));
        if indexes.len() >= MAX_INDEXES {
            indexes.remove(0);
        }
        indexes.push(entry);
        result
    }

    /// Row `row` of batch `seq`: its live record, else its last archived
    /// one; `None` for a row never claimed.
    pub fn row_record(&self, seq: BatchSeq, row: u64) -> Result<Option<RowRecord>, StoreError> {
        let key = RowKey { batch: seq, row };
        if let Some(record) = self.live_row(key)? {
            return Ok(Some(record));
        }
        let Some(offset) = self.with_index(seq, |index| Ok(index.offset(row)))? else {
            return Ok(None);
        };
        // Queued again between the two looks: the live record is the truth.
        if let Some(record) = self.live_row(key)? {
            return Ok(Some(record));
        }
        self.archive().reader(seq)?.at(offset).map(Some)
    }

    /// Rows of batch `seq` that have a record and pass `filter`, after row
    /// `after`, in row order, at most `limit`.
    pub fn rows_page(
        &self,
        seq: BatchSeq,
        filter: &RowFilter,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, RowRecord)>, StoreError> {
        let mut live = Vec::new();
        let mut cursor = after;
        while live.len() < limit {
            let chunk = self.live_after(seq, filter.state(), cursor, 256)?;
            let Some((last, _)) = chunk.last() else { break };
            cursor = *last;
            live.extend(
                chunk
                    .into_iter()
                    .filter(|(_, r)| filter.matches(r.state, r.fail_code.as_deref())),
            );
        }
        live.truncate(limit);
        let archived = self.with_index(seq, |index| {
            let mut error = None;
            let rows = index.rows_after(after, limit, |row, tag, code| {
                let state = RowState::ALL.into_iter().find(|s| s.tag() == tag);
                let wanted = state.is_some_and(|s| filter.matches(s, code));
                match wanted.then(|| self.is_live(RowKey { batch: seq, row })) {
                    Some(Ok(live)) => !live,
                    Some(Err(e)) => {
                        error.get_or_insert(e);
                        false
                    }
                    None => false,
                }
            });
            match error {
                Some(e) => Err(e),
                None => Ok(rows),
            }
        })?;
        let mut merged: BTreeMap<u64, Option<RowRecord>> = archived
            .iter()
            .map(|(row, _)| (*row, None))
            .chain(live.into_iter().map(|(row, r)| (row, Some(r))))
            .collect();
        while merged.len() > limit {
            merged.pop_last();
        }
        let mut reader = None;
        let mut out = Vec::with_capacity(merged.len());
        for (row, record) in merged {
            let record = match record {
                Some(r) => r,
                None => {
                    let Some((_, offset)) = archived.iter().find(|(r, _)| *r == row) else {
                        continue;
                    };
                    if reader.is_none() {
                        reader = Some(self.archive().reader(seq)?);
                    }
                    match reader.as_mut() {
                        Some(reader) => reader.at(*offset)?,
                        None => continue,
                    }
                }
            };
            out.push((row, record));
        }
        Ok(out)
    }

    /// Failed rows of batch `seq` by fail code (blank for none), live and
    /// archived, each row counted once.
    pub fn fail_codes(&self, seq: BatchSeq) -> Result<BTreeMap<String, u64>, StoreError> {
        let live = self.live_after(seq, None, 0, usize::MAX)?;
        self.with_index(seq, |index| {
            let mut codes: BTreeMap<String, u64> = BTreeMap::new();
            for (tag, code, n) in index.tally() {
                if tag == RowState::Failed.tag() {
                    *codes.entry(code.unwrap_or("").to_owned()).or_default() += n;
                }
            }
            for (row, record) in &live {
                // A live row's archived record (a retried row) no longer counts.
                if let Some((tag, code)) = index.mark(*row)
                    && tag == RowState::Failed.tag()
                    && let Some(n) = codes.get_mut(code.unwrap_or(""))
                {
                    *n = n.saturating_sub(1);
                }
                if record.state == RowState::Failed {
                    *codes
                        .entry(record.fail_code.clone().unwrap_or_default())
                        .or_default() += 1;
                }
            }
            codes.retain(|_, n| *n > 0);
            Ok(codes)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::store::{Begin, Claim, Op, test_claim};

    fn claim(store: &Store, seq: BatchSeq, rows: std::ops::RangeInclusive<u64>) {
        let claims: Vec<Claim> = rows.map(|index| test_claim(seq, index)).collect();
        store.claim(&claims).expect("claim");
    }

    fn fail(store: &Store, seq: BatchSeq, row: u64, code: &str) {
        let key = RowKey { batch: seq, row };
        let task_id = format!("t{row}");
        let created = Op::TaskCreated {
            task_id: task_id.clone(),
            at_ms: 1,
        };
        store.apply(key, created).expect("task");
        let failed = Op::TaskFailed {
            task_id,
            code: code.into(),
            msg: "m".into(),
        };
        store.apply(key, failed).expect("failed");
    }

    #[test]
    fn pages_join_live_and_archived_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let Begin::Started(batch) = store
            .begin_batch("v", "sha", 20, Path::new("/in/v.csv"), &|_| true)
            .expect("begin")
        else {
            panic!("duplicate")
        };
        let seq = store.activate_batch(batch.seq, false).expect("active").seq;
        claim(&store, seq, 1..=10);
        for row in 1..=6 {
            fail(&store, seq, row, if row % 2 == 0 { "A" } else { "B" });
        }
        // Rows 1..=6 go to the archive; 7..=10 stay live (submitting).
        assert_eq!(store.retire(usize::MAX).expect("retire"), 6);
        assert_eq!(
            store.row_record(seq, 2).expect("read").expect("row").id,
            "r2"
        );
        assert!(
            store.row_record(seq, 15).expect("read").is_none(),
            "never claimed"
        );
        let codes = store.fail_codes(seq).expect("codes");
        assert_eq!(codes.get("A"), Some(&3));
        assert_eq!(codes.get("B"), Some(&3));

        // Retry the A rows: live again (queued), their archived records stale.
        store
            .requeue_failed(seq, Some(&["A".to_owned()]))
            .expect("retry");
        let codes = store.fail_codes(seq).expect("codes");
        assert_eq!(codes.get("A"), None);
        assert_eq!(codes.get("B"), Some(&3));
        let state = |s| RowFilter {
            state: Some(s),
            code: None,
        };
        let rows = |f: &RowFilter, after, limit| -> Vec<u64> {
            store
                .rows_page(seq, f, after, limit)
                .expect("page")
                .into_iter()
                .map(|(r, _)| r)
                .collect()
        };
        assert_eq!(rows(&state(RowState::Failed), 0, 50), [1, 3, 5]);
        assert_eq!(rows(&state(RowState::Queued), 0, 50), [2, 4, 6]);
        assert_eq!(rows(&state(RowState::Submitting), 7, 2), [8, 9]);
        assert_eq!(
            rows(&RowFilter::default(), 0, 50),
            (1..=10).collect::<Vec<_>>()
        );
        assert_eq!(rows(&RowFilter::default(), 4, 3), [5, 6, 7]);
        let b_only = RowFilter {
            state: None,
            code: Some("B".into()),
        };
        assert_eq!(rows(&b_only, 1, 50), [3, 5]);
        assert_eq!(
            store.row_record(seq, 2).expect("read").expect("row").state,
            RowState::Queued,
            "live wins over the archive"
        );
    }
}
