//! Rows as the accepted manifest has them (`OUTBOX/BATCH/manifest.csv`,
//! immutable): a page of rows from any row number, and rows found by id.
//!
//! Rows never claimed have no record in the store, so their id and line
//! come from here. To open a page deep in a large manifest without reading
//! it from the top each time, the reading position of every
//! [`STEP`]th row is remembered per batch (24 bytes per thousand rows).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use crate::manifest::{ManifestError, ManifestRow, ReadPosition, RowReader};
use crate::store::BatchSeq;

/// Rows between two remembered positions.
const STEP: u64 = 1024;
/// Batches whose positions are remembered at once.
const MAX_BATCHES: usize = 64;
/// Rows a search reads at most (the manifest's whole length is bounded by
/// what ingest accepted; this bounds one request's time).
const MAX_SEARCH_ROWS: u64 = 20_000_000;

/// Remembered reading positions: `positions[k]` is where row `k * STEP + 1`
/// starts (`None`: the top of the file).
#[derive(Default)]
pub(crate) struct Checkpoints {
    batches: Mutex<HashMap<BatchSeq, Vec<Option<ReadPosition>>>>,
}

impl Checkpoints {
    /// Up to `limit` rows after row `after`, in order.
    pub(crate) fn rows_after(
        &self,
        seq: BatchSeq,
        manifest: &Path,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ManifestRow>, ManifestError> {
        let k = after / STEP;
        let (start_k, start) = {
            let mut all = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
            if all.len() >= MAX_BATCHES && !all.contains_key(&seq) {
                all.clear();
            }
            let known = all.entry(seq).or_insert_with(|| vec![None]);
            let i = (known.len() as u64 - 1).min(k);
            (i, known[i as usize])
        };
        let mut reader = RowReader::open(manifest, start)?;
        let mut read = start_k * STEP;
        let mut found = Vec::new();
        while read < after {
            let Some((_, _, pos)) = reader.next_id()? else {
                return Ok(Vec::new());
            };
            read += 1;
            if read.is_multiple_of(STEP) {
                found.push((read / STEP, pos));
            }
        }
        self.remember(seq, &found);
        let mut out = Vec::with_capacity(limit);
        while out.len() < limit {
            match reader.next_row()? {
                Some((row, _)) => out.push(row),
                None => break,
            }
        }
        Ok(out)
    }

    fn remember(&self, seq: BatchSeq, found: &[(u64, ReadPosition)]) {
        let mut all = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        let known = all.entry(seq).or_insert_with(|| vec![None]);
        for (k, pos) in found {
            if *k == known.len() as u64 {
                known.push(Some(*pos));
            }
        }
    }

    /// The row whose id is `id`: row number `id` first when `id` is a
    /// number (default ids are row numbers), else a read of the manifest.
    pub(crate) fn find_id(
        &self,
        seq: BatchSeq,
        manifest: &Path,
        id: &str,
    ) -> Result<Option<ManifestRow>, ManifestError> {
        if let Ok(n) = id.parse::<u64>()
            && n > 0
            && let Some(row) = self.rows_after(seq, manifest, n - 1, 1)?.pop()
            && row.id == id
        {
            return Ok(Some(row));
        }
        Ok(search(manifest, id, 1)?.into_iter().find(|r| r.id == id))
    }
}

/// Rows whose id is `query` exactly, then those whose id contains it, in
/// row order within each kind, at most `limit` in all.
pub(crate) fn search(
    manifest: &Path,
    query: &str,
    limit: usize,
) -> Result<Vec<ManifestRow>, ManifestError> {
    let mut reader = RowReader::open(manifest, None)?;
    // Where each match starts, read in full afterwards.
    let mut exact: Vec<Option<ReadPosition>> = Vec::new();
    let mut partial: Vec<Option<ReadPosition>> = Vec::new();
    let mut before: Option<ReadPosition> = None;
    while let Some((index, id, next)) = reader.next_id()? {
        if id == query {
            exact.push(before);
            if exact.len() >= limit {
                break;
            }
        } else if partial.len() < limit && id.contains(query) {
            partial.push(before);
        }
        before = Some(next);
        if index >= MAX_SEARCH_ROWS {
            break;
        }
    }
    exact.extend(partial);
    exact.truncate(limit);
    let mut out = Vec::with_capacity(exact.len());
    for start in exact {
        if let Some((row, _)) = RowReader::open(manifest, start)?.next_row()? {
            out.push(row);
        }
    }
    Ok(out)
}
