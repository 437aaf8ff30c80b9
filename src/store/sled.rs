//! The store on sled 0.34. The only file that imports sled.
//!
//! Trees: `meta` (schema version, request ledger), `batches` (seq ->
//! BatchRecord), `hashes` (manifest sha256 -> seq), `rows` (seq|row ->
//! RowRecord, only rows that left the queue), `index` (state|seq|row -> ()).
//! Row changes and the batch counters they move are one transaction.

use std::path::{Path, PathBuf};

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use super::{
    BatchPhase, BatchRecord, BatchSeq, Begin, Claim, Counts, LedgerEntry, RowKey, RowRecord,
    RowState, SCHEMA_VERSION, SpendTotals, StoreError, now_ms,
};

const FORMAT_FILE: &str = "FORMAT";
const DB_DIR: &str = "db-v1";
const KEY_SCHEMA: &[u8] = b"schema_version";
const KEY_NEXT_SEQ: &[u8] = b"next_batch_seq";
const KEY_LEDGER: &[u8] = b"request_ledger";
const KEY_SECRET: &[u8] = b"callback_secret";
const KEY_SPEND: &[u8] = b"spend";

/// The durable state of one daemon. Cloning shares the database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    path: PathBuf,
    meta: sled::Tree,
    batches: sled::Tree,
    hashes: sled::Tree,
    rows: sled::Tree,
    index: sled::Tree,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn db_err(e: sled::Error) -> StoreError {
    StoreError::Db(e.to_string())
}

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => db_err(e),
    }
}

fn row_key(key: RowKey) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&key.batch.to_be_bytes());
    k[8..].copy_from_slice(&key.row.to_be_bytes());
    k
}

fn parse_row_key(bytes: &[u8]) -> Result<RowKey, StoreError> {
    let bad = || StoreError::Corrupt {
        what: "row key",
        message: format!("{} bytes", bytes.len()),
    };
    let batch: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    let row: [u8; 8] = bytes
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    Ok(RowKey {
        batch: u64::from_be_bytes(batch),
        row: u64::from_be_bytes(row),
    })
}

fn index_key(state: RowState, key: RowKey) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = state.tag();
    k[1..].copy_from_slice(&row_key(key));
    k
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Db(format!("encode: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what,
        message: e.to_string(),
    })
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn tx_batch(batches: &TransactionalTree, seq: BatchSeq) -> TxResult<BatchRecord> {
    let bytes = batches
        .get(seq.to_be_bytes())?
        .ok_or_else(|| abort(StoreError::NoBatch(seq)))?;
    decode("batch", &bytes).map_err(abort)
}

fn tx_put_batch(batches: &TransactionalTree, batch: &BatchRecord) -> TxResult<()> {
    batches.insert(&batch.seq.to_be_bytes(), encode(batch).map_err(abort)?)?;
    Ok(())
}

fn tx_put_row(
    rows: &TransactionalTree,
    index: &TransactionalTree,
    key: RowKey,
    old: Option<RowState>,
    record: &RowRecord,
) -> TxResult<()> {
    if let Some(old) = old {
        index.remove(&index_key(old, key))?;
    }
    index.insert(&index_key(record.state, key), &[])?;
    rows.insert(&row_key(key), encode(record).map_err(abort)?)?;
    Ok(())
}

impl Store {
    /// Opens (or creates) the state folder `dir`. Refuses a folder written by
    /// another layout version, and one another process holds.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(open_err)?;
        let format_path = dir.join(FORMAT_FILE);
        let expected = format!("infinitetalk-batch state {SCHEMA_VERSION}\n");
        match std::fs::read_to_string(&format_path) {
            Ok(found) if found == expected => {}
            Ok(found) => {
                return Err(StoreError::Version {
                    path: dir.to_owned(),
                    found: found.trim().to_owned(),
                    supported: SCHEMA_VERSION,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if has_foreign_entries(dir).map_err(open_err)? {
                    return Err(StoreError::Version {
                        path: dir.to_owned(),
                        found: "unknown (no FORMAT file, but other files)".into(),
                        supported: SCHEMA_VERSION,
                    });
                }
                crate::fsutil::write_atomic(&format_path, expected.as_bytes()).map_err(open_err)?;
            }
            Err(e) => return Err(open_err(e)),
        }
        let db = sled::Config::new()
            .path(dir.join(DB_DIR))
            .cache_capacity(64 * 1024 * 1024)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) => open_err(io),
                other => open_err(std::io::Error::other(other.to_string())),
            })?;
        let tree = |name: &str| db.open_tree(name).map_err(db_err);
        let store = Store {
            meta: tree("meta")?,
            batches: tree("batches")?,
            hashes: tree("hashes")?,
            rows: tree("rows")?,
            index: tree("index")?,
            path: dir.to_owned(),
            db,
        };
        match store.meta.get(KEY_SCHEMA).map_err(db_err)? {
            Some(v) => {
                let found: u32 = decode("schema version", &v)?;
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Version {
                        path: dir.to_owned(),
                        found: found.to_string(),
                        supported: SCHEMA_VERSION,
                    });
                }
            }
            None => {
                store
                    .meta
                    .insert(KEY_SCHEMA, encode(&SCHEMA_VERSION)?)
                    .map_err(db_err)?;
            }
        }
        Ok(store)
    }

    /// The state folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes every write so far durable (as durable as sled's flush: see README).
    ///
    /// Runs sled's blocking flush on a blocking thread: sled 0.34's
    /// `flush_async` was seen here never to complete when several tasks
    /// flush at once, wedging every caller.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || db.flush()).await {
            Ok(result) => result.map(|_| ()).map_err(db_err),
            Err(e) => Err(StoreError::Db(format!("flush task: {e}"))),
        }
    }

    /// Blocking flush, for code outside the runtime.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(db_err)
    }

    // ---- batches ----

    /// Starts ingesting a manifest: refuses bytes accepted before, otherwise
    /// picks a unique batch name from `stem` (one `name_free` accepts) and records the batch as
    /// `Ingesting`. The caller flushes before moving any file.
    pub fn begin_batch(
        &self,
        stem: &str,
        sha256: &str,
        total_rows: u64,
        source: &Path,
        name_free: &dyn Fn(&str) -> bool,
    ) -> Result<Begin, StoreError> {
        let taken: Vec<String> = self.batches()?.into_iter().map(|b| b.name).collect();
        let free = |name: &str| !taken.iter().any(|t| t == name) && name_free(name);
        let result =
            (&self.meta, &self.batches, &self.hashes).transaction(|(meta, batches, hashes)| {
                if let Some(seq) = hashes.get(sha256.as_bytes())? {
                    let seq: [u8; 8] = seq.as_ref().try_into().map_err(|_| {
                        abort(StoreError::Corrupt {
                            what: "hash index",
                            message: "bad batch number".into(),
                        })
                    })?;
                    let earlier = tx_batch(batches, u64::from_be_bytes(seq))?;
                    return Ok(Begin::Duplicate {
                        earlier: earlier.name,
                    });
                }
                let seq = match meta.get(KEY_NEXT_SEQ)? {
                    Some(v) => decode::<u64>("batch counter", &v).map_err(abort)?,
                    None => 1,
                };
                meta.insert(KEY_NEXT_SEQ, encode(&(seq + 1)).map_err(abort)?)?;
                let name = unique_name(stem, &free);
                let record = BatchRecord {
                    seq,
                    name,
                    sha256: sha256.to_owned(),
                    source: source.to_owned(),
                    source_removed: false,
                    phase: BatchPhase::Ingesting,
                    total_rows,
                    cursor: None,
                    counts: Counts::default(),
                    created_at_ms: now_ms(),
                    finished_at_ms: None,
                    simulated: false,
                    cancelled: false,
                };
                tx_put_batch(batches, &record)?;
                hashes.insert(sha256.as_bytes(), &seq.to_be_bytes())?;
                Ok(Begin::Started(record))
            });
        result.map_err(tx_err)
    }

    /// Forgets a batch whose ingest did not complete, so its file can be
    /// ingested again.
    pub fn abandon_batch(&self, seq: BatchSeq) -> Result<(), StoreError> {
        let result = (&self.batches, &self.hashes).transaction(|(batches, hashes)| {
            let batch = tx_batch(batches, seq)?;
            if batch.phase != BatchPhase::Ingesting {
                return Err(abort(StoreError::Db(format!(
                    "batch {} is accepted, not abandoned",
                    batch.name
                ))));
            }
            batches.remove(&seq.to_be_bytes())?;
            hashes.remove(batch.sha256.as_bytes())?;
            Ok(())
        });
        result.map_err(tx_err)
    }

    fn update_batch(
        &self,
        seq: BatchSeq,
        f: impl Fn(&mut BatchRecord),
    ) -> Result<BatchRecord, StoreError> {
        let result = self.batches.transaction(|batches| {
            let mut batch = tx_batch(batches, seq)?;
            f(&mut batch);
            tx_put_batch(batches, &batch)?;
            Ok(batch)
        });
        result.map_err(tx_err)
    }

    /// The manifest is in the outbox: the batch is accepted.
    pub fn activate_batch(
        &self,
        seq: BatchSeq,
        simulated: bool,
    ) -> Result<BatchRecord, StoreError> {
        self.update_batch(seq, |b| {
            if b.phase == BatchPhase::Ingesting {
                b.phase = BatchPhase::Active;
            }
            b.simulated = simulated;
        })
    }

    /// The batch's inbox file is gone.
    pub fn mark_source_removed(&self, seq: BatchSeq) -> Result<(), StoreError> {
        self.update_batch(seq, |b| b.source_removed = true)
            .map(|_| ())
    }

    /// `results.csv` is written.
    pub fn finish_batch(&self, seq: BatchSeq) -> Result<BatchRecord, StoreError> {
        self.update_batch(seq, |b| {
            b.phase = BatchPhase::Finished;
            b.finished_at_ms.get_or_insert_with(now_ms);
        })
    }

    /// A finished batch got rows back (a deliberate retry).
    pub fn reopen_batch(&self, seq: BatchSeq) -> Result<BatchRecord, StoreError> {
        self.update_batch(seq, |b| {
            if b.phase == BatchPhase::Finished {
                b.phase = BatchPhase::Active;
                b.finished_at_ms = None;
            }
        })
    }

    /// The accepted batch named `name`, if any.
    pub fn batch_named(&self, name: &str) -> Result<Option<BatchRecord>, StoreError> {
        Ok(self
            .batches()?
            .into_iter()
            .find(|b| b.name == name && b.phase != BatchPhase::Ingesting))
    }

    /// Queues failed rows of a batch again (all, or those whose fail code is
    /// in `codes`), each for a new task; the batch becomes active again.
    pub fn requeue_failed(
        &self,
        seq: BatchSeq,
        codes: Option<&[String]>,
    ) -> Result<Vec<(RowKey, RowRecord)>, StoreError> {
        let mut chosen = Vec::new();
        self.for_each_row(seq, |key, r| {
            let code = r.fail_code.as_deref().unwrap_or("");
            if r.state == RowState::Failed && codes.is_none_or(|c| c.iter().any(|c| c == code)) {
                chosen.push(key);
            }
            Ok(())
        })?;
        let mut out = Vec::with_capacity(chosen.len());
        for key in chosen {
            let record = self.transition(key, |r| {
                if r.state != RowState::Failed {
                    return Err(StoreError::WrongState {
                        key,
                        found: r.state.as_str(),
                        action: "retry it",
                    });
                }
                if let Some(old) = r.task_id.take() {
                    r.previous_tasks.push(old);
                }
                r.state = RowState::Queued;
                r.resubmits = 0;
                r.submitted_at_ms = None;
                r.finished_at_ms = None;
                r.cost_time_ms = None;
                r.result_urls.clear();
                r.outputs.clear();
                r.fail_code = None;
                r.fail_msg = None;
                Ok(())
            })?;
            out.push((key, record));
        }
        self.update_batch(seq, |b| {
            b.cancelled = false;
            if b.phase == BatchPhase::Finished && !out.is_empty() {
                b.phase = BatchPhase::Active;
                b.finished_at_ms = None;
            }
        })?;
        Ok(out)
    }

    /// Marks a batch cancelled and ends its queued rows as `failed`
    /// (`CANCELLED`). Returns how many rows it ended. Rows never claimed are
    /// ended by [`Store::cancel_unclaimed`].
    pub fn cancel_batch(&self, seq: BatchSeq, msg: &str) -> Result<u64, StoreError> {
        self.update_batch(seq, |b| b.cancelled = true)?;
        let mut queued = Vec::new();
        self.for_each_row(seq, |key, r| {
            if r.state == RowState::Queued {
                queued.push(key);
            }
            Ok(())
        })?;
        let mut n = 0;
        for key in queued {
            let ended = self.transition(key, |r| {
                if r.state == RowState::Queued {
                    r.state = RowState::Failed;
                    r.fail_code = Some(super::CANCELLED.into());
                    r.fail_msg = Some(msg.to_owned());
                }
                Ok(())
            })?;
            if ended.state == RowState::Failed {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Ends never-claimed rows of a cancelled batch as `failed` (`CANCELLED`)
    /// and moves its cursor to `next`. Rows claimed meanwhile are left alone.
    pub fn cancel_unclaimed(
        &self,
        seq: BatchSeq,
        rows: &[crate::manifest::ManifestRow],
        next: crate::manifest::ReadPosition,
        msg: &str,
    ) -> Result<u64, StoreError> {
        let result =
            (&self.batches, &self.rows, &self.index).transaction(|(batches, rows_t, index)| {
                let mut batch = tx_batch(batches, seq)?;
                let mut n = 0;
                for row in rows {
                    let key = RowKey {
                        batch: seq,
                        row: row.index,
                    };
                    if rows_t.get(row_key(key))?.is_some() {
                        continue;
                    }
                    let mut record = RowRecord::new(row.id.clone(), row.line, row.spec.clone());
                    record.state = RowState::Failed;
                    record.fail_code = Some(super::CANCELLED.into());
                    record.fail_msg = Some(msg.to_owned());
                    batch.counts.moved(None, RowState::Failed);
                    tx_put_row(rows_t, index, key, None, &record)?;
                    n += 1;
                }
                if batch.cursor.is_none_or(|c| c.rows_read < next.rows_read) {
                    batch.cursor = Some(next);
                }
                tx_put_batch(batches, &batch)?;
                Ok(n)
            });
        result.map_err(tx_err)
    }

    pub fn batch(&self, seq: BatchSeq) -> Result<BatchRecord, StoreError> {
        let bytes = self
            .batches
            .get(seq.to_be_bytes())
            .map_err(db_err)?
            .ok_or(StoreError::NoBatch(seq))?;
        decode("batch", &bytes)
    }

    /// Every batch, oldest first.
    pub fn batches(&self) -> Result<Vec<BatchRecord>, StoreError> {
        self.batches
            .iter()
            .map(|item| {
                let (_, v) = item.map_err(db_err)?;
                decode("batch", &v)
            })
            .collect()
    }

    // ---- rows ----

    /// Marks the claimed rows `submitting` in one transaction: fresh rows get
    /// their record and move their batch's cursor. The caller flushes before
    /// sending any of them.
    pub fn mark_submitting(
        &self,
        claims: &[Claim],
    ) -> Result<Vec<(RowKey, RowRecord)>, StoreError> {
        let result =
            (&self.batches, &self.rows, &self.index).transaction(|(batches, rows, index)| {
                let mut out = Vec::with_capacity(claims.len());
                let mut touched: Vec<BatchRecord> = Vec::new();
                for claim in claims {
                    let (key, old, record) = match claim {
                        Claim::Fresh { batch, row, next } => {
                            let key = RowKey {
                                batch: *batch,
                                row: row.index,
                            };
                            if rows.get(row_key(key))?.is_some() {
                                return Err(abort(StoreError::WrongState {
                                    key,
                                    found: "already claimed",
                                    action: "claim it fresh",
                                }));
                            }
                            let mut record =
                                RowRecord::new(row.id.clone(), row.line, row.spec.clone());
                            record.state = RowState::Submitting;
                            let b = batch_in(&mut touched, batches, *batch)?;
                            b.cursor = Some(*next);
                            (key, None, record)
                        }
                        Claim::Again(key) => {
                            let mut record = tx_row(rows, *key)?;
                            if record.state != RowState::Queued {
                                return Err(abort(StoreError::WrongState {
                                    key: *key,
                                    found: record.state.as_str(),
                                    action: "submit it",
                                }));
                            }
                            record.state = RowState::Submitting;
                            (*key, Some(RowState::Queued), record)
                        }
                    };
                    batch_in(&mut touched, batches, key.batch)?
                        .counts
                        .moved(old, RowState::Submitting);
                    tx_put_row(rows, index, key, old, &record)?;
                    out.push((key, record));
                }
                for b in &touched {
                    tx_put_batch(batches, b)?;
                }
                Ok(out)
            });
        result.map_err(tx_err)
    }

    /// Applies `f` to a row's record in one transaction with its batch's
    /// counters. `f` may refuse the transition.
    pub fn transition(
        &self,
        key: RowKey,
        f: impl Fn(&mut RowRecord) -> Result<(), StoreError>,
    ) -> Result<RowRecord, StoreError> {
        let result =
            (&self.batches, &self.rows, &self.index).transaction(|(batches, rows, index)| {
                let mut record = tx_row(rows, key)?;
                let old = record.state;
                f(&mut record).map_err(abort)?;
                if old != record.state {
                    let mut batch = tx_batch(batches, key.batch)?;
                    batch.counts.moved(Some(old), record.state);
                    tx_put_batch(batches, &batch)?;
                }
                tx_put_row(rows, index, key, Some(old), &record)?;
                Ok(record)
            });
        result.map_err(tx_err)
    }

    pub fn row(&self, key: RowKey) -> Result<Option<RowRecord>, StoreError> {
        match self.rows.get(row_key(key)).map_err(db_err)? {
            Some(v) => decode("row", &v).map(Some),
            None => Ok(None),
        }
    }

    /// Rows in `state`, in batch and row order, at most `limit`.
    pub fn rows_in_state(
        &self,
        state: RowState,
        limit: usize,
    ) -> Result<Vec<(RowKey, RowRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self.index.scan_prefix([state.tag()]) {
            if out.len() >= limit {
                break;
            }
            let (k, _) = item.map_err(db_err)?;
            let key = parse_row_key(k.get(1..).unwrap_or_default())?;
            match self.row(key)? {
                Some(record) => out.push((key, record)),
                None => return Err(StoreError::NoRow(key)),
            }
        }
        Ok(out)
    }

    /// Visits the records of a batch's claimed rows in row order.
    pub fn for_each_row(
        &self,
        seq: BatchSeq,
        mut f: impl FnMut(RowKey, RowRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for item in self.rows.scan_prefix(seq.to_be_bytes()) {
            let (k, v) = item.map_err(db_err)?;
            f(parse_row_key(&k)?, decode("row", &v)?)?;
        }
        Ok(())
    }

    /// The secret in this daemon's callback URLs, made once and kept so that
    /// callbacks for tasks submitted before a restart are still accepted.
    pub fn callback_secret(&self, make: impl FnOnce() -> String) -> Result<String, StoreError> {
        if let Some(v) = self.meta.get(KEY_SECRET).map_err(db_err)? {
            return decode("callback secret", &v);
        }
        let secret = make();
        self.meta
            .insert(KEY_SECRET, encode(&secret)?)
            .map_err(db_err)?;
        self.flush_blocking()?;
        Ok(secret)
    }

    // ---- spend ----

    /// What has been spent so far.
    pub fn spend(&self) -> Result<SpendTotals, StoreError> {
        match self.meta.get(KEY_SPEND).map_err(db_err)? {
            Some(v) => decode("spend", &v),
            None => Ok(SpendTotals::default()),
        }
    }

    /// Adds to (or, negative, refunds from) the spend; returns the new totals.
    /// The caller flushes before the submission it pays for.
    pub fn add_spend(&self, usd: f64, audio_seconds: f64) -> Result<SpendTotals, StoreError> {
        let result = self.meta.transaction(|meta| {
            let mut totals: SpendTotals = match meta.get(KEY_SPEND)? {
                Some(v) => decode("spend", &v).map_err(abort)?,
                None => SpendTotals::default(),
            };
            totals.usd = (totals.usd + usd).max(0.0);
            totals.audio_seconds = (totals.audio_seconds + audio_seconds).max(0.0);
            meta.insert(KEY_SPEND, encode(&totals).map_err(abort)?)?;
            Ok(totals)
        });
        result.map_err(tx_err)
    }

    // ---- request ledger ----

    pub fn load_ledger(&self) -> Result<Vec<LedgerEntry>, StoreError> {
        match self.meta.get(KEY_LEDGER).map_err(db_err)? {
            Some(v) => decode("request ledger", &v),
            None => Ok(Vec::new()),
        }
    }

    pub fn save_ledger(&self, entries: &[LedgerEntry]) -> Result<(), StoreError> {
        self.meta
            .insert(KEY_LEDGER, encode(&entries)?)
            .map(|_| ())
            .map_err(db_err)
    }
}

fn tx_row(rows: &TransactionalTree, key: RowKey) -> TxResult<RowRecord> {
    let bytes = rows
        .get(row_key(key))?
        .ok_or_else(|| abort(StoreError::NoRow(key)))?;
    decode("row", &bytes).map_err(abort)
}

fn batch_in<'a>(
    touched: &'a mut Vec<BatchRecord>,
    batches: &TransactionalTree,
    seq: BatchSeq,
) -> TxResult<&'a mut BatchRecord> {
    let pos = match touched.iter().position(|b| b.seq == seq) {
        Some(pos) => pos,
        None => {
            touched.push(tx_batch(batches, seq)?);
            touched.len() - 1
        }
    };
    Ok(&mut touched[pos])
}

fn unique_name(stem: &str, free: &dyn Fn(&str) -> bool) -> String {
    if free(stem) {
        return stem.to_owned();
    }
    (2u64..)
        .map(|n| format!("{stem}-{n}"))
        .find(|candidate| free(candidate))
        .unwrap_or_else(|| format!("{stem}-{}", now_ms()))
}

fn has_foreign_entries(dir: &Path) -> std::io::Result<bool> {
    Ok(std::fs::read_dir(dir)?.next().is_some())
}
