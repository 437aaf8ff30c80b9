//! The store on sled 0.34. The only file that imports sled.
//!
//! Trees: `meta` (schema version, request ledger, secrets, spend), `batches`
//! (seq -> BatchRecord), `hashes` (manifest sha256 -> seq), `rows` (seq|row
//! -> RowRecord, live rows only), `index` (state|seq|row -> ()). A row change
//! and the batch counters it moves are one transaction. Ended rows leave for
//! the archive ([`super::archive`]) once their final record is synced there.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use super::archive::Archive;
use super::index_key::{self, IndexKey};
use super::machine::Op;
use super::{
    Admission, AdmittedAudio, AmbiguousTotals, BatchPhase, BatchRecord, BatchSeq, Begin, Claim,
    Counts, DurationSample, LedgerEntry, RowKey, RowRecord, RowState, SCHEMA_VERSION, SpendTotals,
    StoreError, now_ms,
};
use crate::manifest::{ManifestRow, ReadPosition};

const FORMAT_FILE: &str = "FORMAT";
const DB_DIR: &str = "db-v1";
const KEY_SCHEMA: &[u8] = b"schema_version";
const KEY_NEXT_SEQ: &[u8] = b"next_batch_seq";
const KEY_LEDGER: &[u8] = b"request_ledger";
const KEY_DURATIONS: &[u8] = b"task_durations";
const KEY_SECRET: &[u8] = b"callback_secret";
const KEY_SPEND: &[u8] = b"spend";
/// Spend of runs against the built-in simulator: never counted as real.
const KEY_SPEND_SIMULATED: &[u8] = b"spend_simulated";
const KEY_AMBIGUOUS: &[u8] = b"ambiguous_submits";
/// Final rows moved to the archive per transaction.
const RETIRE_CHUNK: usize = 4096;

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
    archive: Archive,
    /// Batches accepted and not finished: what the submitter chooses from.
    active: Arc<Mutex<BTreeSet<BatchSeq>>>,
    /// One retirement at a time (the retirer, a retry, a results writer).
    retiring: Arc<Mutex<()>>,
    /// Spend goes to the simulated account (`run --simulate`).
    simulated_spend: Arc<std::sync::atomic::AtomicBool>,
    /// The console's indexes of archived rows (memory only).
    views: Arc<super::view::Views>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn db_err(e: sled::Error) -> StoreError {
    StoreError::Db(Box::new(e))
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

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(StoreError::Encode)
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

fn tx_row(rows: &TransactionalTree, key: RowKey) -> TxResult<Option<RowRecord>> {
    match rows.get(row_key(key))? {
        Some(bytes) => decode("row", &bytes).map(Some).map_err(abort),
        None => Ok(None),
    }
}

fn tx_put_row(
    rows: &TransactionalTree,
    index: &TransactionalTree,
    key: RowKey,
    old: Option<IndexKey>,
    record: &RowRecord,
) -> TxResult<()> {
    if let Some(old) = old {
        index.remove(old.as_ref())?;
    }
    index.insert(index_key::of(key, record).as_ref(), &[])?;
    rows.insert(&row_key(key), encode(record).map_err(abort)?)?;
    Ok(())
}

impl Store {
    /// Opens (or creates) the state folder `dir`. Refuses a folder written by
    /// another layout version, and one another process holds. A folder of
    /// layout 1 is migrated (its ended rows move to the archive).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(open_err)?;
        let format_path = dir.join(FORMAT_FILE);
        let format_line = |v: u32| format!("infinitetalk-batch state {v}\n");
        let mut migrate_from = None;
        match std::fs::read_to_string(&format_path) {
            Ok(found) if found == format_line(SCHEMA_VERSION) => {}
            Ok(found) if found == format_line(1) => migrate_from = Some(1),
            Ok(found) if found == format_line(2) => migrate_from = Some(2),
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
                crate::fsutil::write_atomic(&format_path, format_line(SCHEMA_VERSION).as_bytes())
                    .map_err(open_err)?;
            }
            Err(e) => return Err(open_err(e)),
        }
        let db = sled::Config::new()
            .path(dir.join(DB_DIR))
            .cache_capacity(16 * 1024 * 1024)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) => open_err(io),
                other => open_err(std::io::Error::other(other)),
            })?;
        let tree = |name: &str| db.open_tree(name).map_err(db_err);
        let store = Store {
            meta: tree("meta")?,
            batches: tree("batches")?,
            hashes: tree("hashes")?,
            rows: tree("rows")?,
            index: tree("index")?,
            archive: Archive::open(dir)?,
            path: dir.to_owned(),
            active: Arc::default(),
            retiring: Arc::default(),
            simulated_spend: Arc::default(),
            views: Arc::default(),
            db,
        };
        let expected = migrate_from.unwrap_or(SCHEMA_VERSION);
        let mut format_behind = false;
        match store.meta.get(KEY_SCHEMA).map_err(db_err)? {
            Some(v) => {
                let found: u32 = decode("schema version", &v)?;
                if migrate_from.is_some() && found == SCHEMA_VERSION {
                    // Migrated, and stopped before FORMAT was rewritten.
                    migrate_from = None;
                    format_behind = true;
                } else if found != expected {
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
                    .insert(KEY_SCHEMA, encode(&expected)?)
                    .map_err(db_err)?;
            }
        }
        if let Some(from) = migrate_from {
            store.migrate(from)?;
            format_behind = true;
        }
        if format_behind {
            crate::fsutil::write_atomic(&format_path, format_line(SCHEMA_VERSION).as_bytes())
                .map_err(open_err)?;
        }
        let active = store
            .batches()?
            .into_iter()
            .filter(|b| b.phase == BatchPhase::Active)
            .map(|b| b.seq);
        store.active_set().extend(active);
        Ok(store)
    }

    /// Brings a folder of an older layout up to date: layout 1 kept every
    /// ended row in the database (they move to the archive); layouts 1 and 2
    /// indexed queued rows of known length in row order (they move to the
    /// longest-first order).
    fn migrate(&self, from: u32) -> Result<(), StoreError> {
        let moved = if from < 2 {
            self.retire(usize::MAX)?
        } else {
            0
        };
        let mut reindexed = 0;
        for item in self.index.scan_prefix([RowState::Queued.tag()]) {
            let (k, _) = item.map_err(db_err)?;
            let key = index_key::parse(&k)?;
            if let Some(record) = self.live_row(key)?
                && record.state == RowState::Queued
                && record.audio_seconds.is_some()
            {
                // The new entry first: a crash between the two leaves the
                // row found twice (harmless, the row is read once), never
                // not at all; the next open migrates again.
                self.index
                    .insert(index_key::of(key, &record).as_ref(), &[])
                    .map_err(db_err)?;
                self.index.remove(&k).map_err(db_err)?;
                reindexed += 1;
            }
        }
        self.meta
            .insert(KEY_SCHEMA, encode(&SCHEMA_VERSION)?)
            .map_err(db_err)?;
        self.flush_blocking()?;
        tracing::info!(
            from,
            to = SCHEMA_VERSION,
            rows_archived = moved,
            queued_rows_reordered = reindexed,
            "state folder migrated"
        );
        Ok(())
    }

    fn active_set(&self) -> std::sync::MutexGuard<'_, BTreeSet<BatchSeq>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a blocking thread: sled calls block, and the async
    /// workers must not.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store)).await?
    }

    /// Makes every write so far durable (as durable as sled's flush: see README).
    ///
    /// Runs sled's blocking flush on a blocking thread: sled 0.34's
    /// `flush_async` was seen here never to complete when several tasks
    /// flush at once, wedging every caller.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(Store::flush_blocking).await
    }

    /// Blocking flush, for code outside the runtime.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(db_err)
    }

    /// Bytes the state folder takes on disk (database and archive).
    pub fn disk_bytes(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0) + self.archive.bytes()
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
                let record = BatchRecord {
                    seq,
                    name: unique_name(stem, &free),
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
                    paused: false,
                    priority: super::Priority::default(),
                };
                tx_put_batch(batches, &record)?;
                hashes.insert(sha256.as_bytes(), &seq.to_be_bytes())?;
                Ok(Begin::Started(record))
            });
        result.map_err(tx_err)
    }

    /// The batch that was accepted with these bytes (its manifest's SHA-256),
    /// if any: a manifest identical to it would be refused.
    pub fn batch_with_hash(&self, sha256: &str) -> Result<Option<String>, StoreError> {
        let Some(seq) = self.hashes.get(sha256.as_bytes()).map_err(db_err)? else {
            return Ok(None);
        };
        let seq: [u8; 8] = seq.as_ref().try_into().map_err(|_| StoreError::Corrupt {
            what: "hash index",
            message: "bad batch number".into(),
        })?;
        Ok(Some(self.batch(u64::from_be_bytes(seq))?.name))
    }

    /// Forgets a batch whose ingest did not complete, so its file can be
    /// ingested again.
    pub fn abandon_batch(&self, seq: BatchSeq) -> Result<(), StoreError> {
        let result = (&self.batches, &self.hashes).transaction(|(batches, hashes)| {
            let batch = tx_batch(batches, seq)?;
            if batch.phase != BatchPhase::Ingesting {
                return Err(abort(StoreError::BatchAccepted(batch.name)));
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
        let batch = result.map_err(tx_err)?;
        let mut active = self.active_set();
        if batch.phase == BatchPhase::Active {
            active.insert(seq);
        } else {
            active.remove(&seq);
        }
        Ok(batch)
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

    /// Marks a batch cancelled: no fresh row of it is claimed from now on.
    pub fn set_cancelled(&self, seq: BatchSeq) -> Result<BatchRecord, StoreError> {
        self.update_batch(seq, |b| b.cancelled = true)
    }

    /// Pauses (or resumes) submitting a batch's rows.
    pub fn set_paused(&self, seq: BatchSeq, paused: bool) -> Result<BatchRecord, StoreError> {
        self.update_batch(seq, |b| b.paused = paused)
    }

    /// Sets a batch's share of submissions.
    pub fn set_priority(
        &self,
        seq: BatchSeq,
        priority: super::Priority,
    ) -> Result<BatchRecord, StoreError> {
        self.update_batch(seq, |b| b.priority = priority)
    }

    /// The accepted batch named `name`, if any.
    pub fn batch_named(&self, name: &str) -> Result<Option<BatchRecord>, StoreError> {
        Ok(self
            .batches()?
            .into_iter()
            .find(|b| b.name == name && b.phase != BatchPhase::Ingesting))
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

    /// Batches accepted and not finished, oldest first: O(active batches).
    pub fn active_batches(&self) -> Result<Vec<BatchRecord>, StoreError> {
        let seqs: Vec<BatchSeq> = self.active_set().iter().copied().collect();
        seqs.into_iter().map(|seq| self.batch(seq)).collect()
    }

    // ---- rows: the state machine ----

    /// Claims rows for submission in one transaction: each becomes
    /// `submitting`; a fresh row gets its record and moves its batch's
    /// cursor. A fresh row of a cancelled batch, or one at or behind the
    /// cursor (claimed before), is refused. The caller flushes before
    /// sending any of them.
    pub fn claim(&self, claims: &[Claim]) -> Result<Vec<(RowKey, RowRecord)>, StoreError> {
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
                            let b = batch_in(&mut touched, batches, *batch)?;
                            take_fresh(b, key, *next, "claim")?;
                            let mut record =
                                RowRecord::new(row.id.clone(), row.line, row.spec.clone());
                            record.state = RowState::Submitting;
                            (key, None, record)
                        }
                        Claim::Again(key) => {
                            let mut record = tx_row(rows, *key)?
                                .ok_or_else(|| abort(StoreError::NoRow(*key)))?;
                            if record.state != RowState::Queued {
                                return Err(abort(StoreError::WrongState {
                                    key: *key,
                                    found: record.state.as_str(),
                                    action: "claim",
                                }));
                            }
                            let b = batch_in(&mut touched, batches, key.batch)?;
                            let held = if b.cancelled {
                                Some("in a cancelled batch")
                            } else if b.paused {
                                Some("in a paused batch")
                            } else {
                                None
                            };
                            if let Some(found) = held {
                                return Err(abort(StoreError::WrongState {
                                    key: *key,
                                    found,
                                    action: "claim",
                                }));
                            }
                            let old = index_key::of(*key, &record);
                            record.state = RowState::Submitting;
                            (*key, Some((RowState::Queued, old)), record)
                        }
                    };
                    batch_in(&mut touched, batches, key.batch)?
                        .counts
                        .moved(old.map(|(state, _)| state), RowState::Submitting);
                    tx_put_row(rows, index, key, old.map(|(_, k)| k), &record)?;
                    out.push((key, record));
                }
                for b in &touched {
                    tx_put_batch(batches, b)?;
                }
                Ok(out)
            });
        result.map_err(tx_err)
    }

    /// Lets fresh rows into the queue without a slot, in one transaction:
    /// each gets its record (`queued` with its audio's length, `queued` to
    /// be probed again, or `failed` when its audio is bad) and moves its
    /// batch's cursor. Refused like a fresh claim. Nothing is sent, so
    /// nothing needs a flush (rows lost in a crash are read again), except
    /// for a row that ends here: it must be on disk before the retirer can
    /// put it in the archive, or a crash would leave it archived behind its
    /// batch's cursor.
    pub fn admit(&self, rows: &[Admission]) -> Result<Vec<(RowKey, RowRecord)>, StoreError> {
        let ends = rows
            .iter()
            .any(|a| matches!(a.audio, AdmittedAudio::Bad { .. }));
        let _no_retirement = ends.then(|| self.retiring.lock().unwrap_or_else(|p| p.into_inner()));
        let result =
            (&self.batches, &self.rows, &self.index).transaction(|(batches, rows_tree, index)| {
                let mut out = Vec::with_capacity(rows.len());
                let mut touched: Vec<BatchRecord> = Vec::new();
                for a in rows {
                    let key = RowKey::at(a.batch, a.row.index);
                    let b = batch_in(&mut touched, batches, a.batch)?;
                    take_fresh(b, key, a.next, "admit")?;
                    let mut record =
                        RowRecord::new(a.row.id.clone(), a.row.line, a.row.spec.clone());
                    match &a.audio {
                        AdmittedAudio::Seconds(s) => record.audio_seconds = Some(*s),
                        AdmittedAudio::NotYet => record.probe_deferrals = 1,
                        AdmittedAudio::Bad { code, msg } => {
                            record.state = RowState::Failed;
                            record.fail_code = Some(code.clone());
                            record.fail_msg = Some(msg.clone());
                        }
                    }
                    b.counts.moved(None, record.state);
                    tx_put_row(rows_tree, index, key, None, &record)?;
                    out.push((key, record));
                }
                for b in &touched {
                    tx_put_batch(batches, b)?;
                }
                Ok(out)
            });
        let admitted = result.map_err(tx_err)?;
        if ends {
            self.flush_blocking()?;
        }
        Ok(admitted)
    }

    /// Applies one operation of the state machine to a live row, with its
    /// batch's counters, in one transaction. Refused (nothing changes) when
    /// the row is not in the operation's starting state.
    pub fn apply(&self, key: RowKey, op: Op) -> Result<RowRecord, StoreError> {
        let result =
            (&self.batches, &self.rows, &self.index).transaction(|(batches, rows, index)| {
                let mut record = tx_row(rows, key)?.ok_or_else(|| abort(StoreError::NoRow(key)))?;
                let old = record.state;
                let old_entry = index_key::of(key, &record);
                op.clone().apply(key, &mut record).map_err(abort)?;
                if old != record.state {
                    let mut batch = tx_batch(batches, key.batch)?;
                    // A cancel stops a batch's submissions for good: a row
                    // that would go back to the queue (a service-side
                    // failure, a submit put back) ends CANCELLED instead,
                    // and the batch can end.
                    if record.state == RowState::Queued && batch.cancelled {
                        Op::cancel_of(&record)
                            .apply(key, &mut record)
                            .map_err(abort)?;
                    }
                    batch.counts.moved(Some(old), record.state);
                    tx_put_batch(batches, &batch)?;
                }
                tx_put_row(rows, index, key, Some(old_entry), &record)?;
                Ok(record)
            });
        result.map_err(tx_err)
    }

    /// A live row's record (`None` once it ended and left for the archive).
    pub fn live_row(&self, key: RowKey) -> Result<Option<RowRecord>, StoreError> {
        match self.rows.get(row_key(key)).map_err(db_err)? {
            Some(v) => decode("row", &v).map(Some),
            None => Ok(None),
        }
    }

    /// Live rows in `state`, in batch and row order, at most `limit`.
    pub fn rows_in_state(
        &self,
        state: RowState,
        limit: usize,
    ) -> Result<Vec<(RowKey, RowRecord)>, StoreError> {
        let mut out = Vec::new();
        let mut tags = vec![state.tag()];
        if state == RowState::Queued {
            tags.push(index_key::LONGEST_FIRST);
        }
        for tag in tags {
            for item in self.index.scan_prefix([tag]) {
                if out.len() >= limit {
                    break;
                }
                if let Some(found) = self.indexed_row(item, state)? {
                    out.push(found);
                }
            }
        }
        Ok(out)
    }

    /// The first `limit` queued rows of batch `seq` in the order they are
    /// to be submitted: those of unknown length in row order (rows queued
    /// again without a probed length have waited longest), then the rest
    /// longest first.
    pub fn queued_rows(
        &self,
        seq: BatchSeq,
        limit: usize,
    ) -> Result<Vec<(u64, RowRecord)>, StoreError> {
        let mut out = self.indexed_after(seq, RowState::Queued, 0, limit)?;
        let (low, high) = index_key::longest_first_range(seq);
        for item in self.index.range(low.as_ref()..=high.as_ref()) {
            if out.len() >= limit {
                break;
            }
            if let Some((key, record)) = self.indexed_row(item, RowState::Queued)? {
                out.push((key.row, record));
            }
        }
        Ok(out)
    }

    /// Live rows of batch `seq` after row `after` (in `state` when given), in
    /// row order, at most `limit`: a range scan, never the whole batch.
    pub(super) fn live_after(
        &self,
        seq: BatchSeq,
        state: Option<RowState>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, RowRecord)>, StoreError> {
        match state {
            // Queued rows of known length are not in row order in the
            // index; a batch's live rows are few (its tasks in flight and
            // its admitted rows), so they are read and picked.
            None | Some(RowState::Queued) => {
                let from = row_key(RowKey::at(seq, after.saturating_add(1)));
                let to = row_key(RowKey::at(seq, u64::MAX));
                let mut out = Vec::new();
                for item in self.rows.range(from..=to) {
                    if out.len() >= limit {
                        break;
                    }
                    let (k, v) = item.map_err(db_err)?;
                    let record: RowRecord = decode("row", &v)?;
                    if state.is_none_or(|s| s == record.state) {
                        out.push((parse_row_key(&k)?.row, record));
                    }
                }
                Ok(out)
            }
            Some(state) => self.indexed_after(seq, state, after, limit),
        }
    }

    /// Rows of batch `seq` after row `after` indexed under `state` (for
    /// `Queued`: those of unknown length), in row order, at most `limit`.
    fn indexed_after(
        &self,
        seq: BatchSeq,
        state: RowState,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, RowRecord)>, StoreError> {
        let from = index_key::by_state(state, RowKey::at(seq, after.saturating_add(1)));
        let to = index_key::by_state(state, RowKey::at(seq, u64::MAX));
        let mut out = Vec::new();
        for item in self.index.range(from.as_ref()..=to.as_ref()) {
            if out.len() >= limit {
                break;
            }
            if let Some((key, record)) = self.indexed_row(item, state)? {
                out.push((key.row, record));
            }
        }
        Ok(out)
    }

    /// The row of an entry of the `state` index, if it is still live and in
    /// `state` (it may have changed, or been archived, since the index was
    /// read: then it shows elsewhere).
    fn indexed_row(
        &self,
        item: sled::Result<(sled::IVec, sled::IVec)>,
        state: RowState,
    ) -> Result<Option<(RowKey, RowRecord)>, StoreError> {
        let (k, _) = item.map_err(db_err)?;
        let key = index_key::parse(&k)?;
        Ok(self
            .live_row(key)?
            .filter(|r| r.state == state)
            .map(|r| (key, r)))
    }

    /// Whether row `key` is live in the database.
    pub(super) fn is_live(&self, key: RowKey) -> Result<bool, StoreError> {
        self.rows.contains_key(row_key(key)).map_err(db_err)
    }

    pub(super) fn archive(&self) -> &Archive {
        &self.archive
    }

    pub(super) fn views(&self) -> &super::view::Views {
        &self.views
    }

    /// How many rows are live in the database (claimed and not yet archived).
    pub fn live_rows(&self) -> usize {
        self.rows.len()
    }

    // ---- the archive ----

    /// Moves up to `limit` ended rows from the database to the archive:
    /// their final records are appended and synced first, then they leave
    /// the database. Returns how many moved.
    pub fn retire(&self, limit: usize) -> Result<usize, StoreError> {
        let _one = self.retiring.lock().unwrap_or_else(|p| p.into_inner());
        let mut moved = 0;
        while moved < limit {
            let mut ended: Vec<(RowKey, RowRecord)> = Vec::new();
            for state in [RowState::Done, RowState::Failed] {
                let room = RETIRE_CHUNK.min(limit - moved).saturating_sub(ended.len());
                ended.extend(self.rows_in_state(state, room)?);
            }
            if ended.is_empty() {
                break;
            }
            moved += self.retire_rows(&ended)?;
        }
        Ok(moved)
    }

    /// Retires every ended row of one batch still in the database.
    fn retire_batch(&self, seq: BatchSeq) -> Result<(), StoreError> {
        let mut ended = Vec::new();
        for item in self.rows.scan_prefix(seq.to_be_bytes()) {
            let (k, v) = item.map_err(db_err)?;
            let record: RowRecord = decode("row", &v)?;
            if record.state.is_final() {
                ended.push((parse_row_key(&k)?, record));
            }
        }
        self.retire_rows(&ended).map(|_| ())
    }

    fn retire_rows(&self, ended: &[(RowKey, RowRecord)]) -> Result<usize, StoreError> {
        let mut by_batch: BTreeMap<BatchSeq, Vec<(u64, &RowRecord)>> = BTreeMap::new();
        for (key, record) in ended {
            by_batch
                .entry(key.batch)
                .or_default()
                .push((key.row, record));
        }
        for (seq, records) in by_batch {
            crate::failpoint::hit("archive-before-append");
            self.archive.append(seq, records)?;
        }
        crate::failpoint::hit("archive-before-remove");
        let result = (&self.rows, &self.index).transaction(|(rows, index)| {
            for (key, _) in ended {
                // Only a final row leaves; anything else was changed since.
                if let Some(record) = tx_row(rows, *key)?
                    && record.state.is_final()
                {
                    rows.remove(&row_key(*key))?;
                    index.remove(index_key::of(*key, &record).as_ref())?;
                }
            }
            Ok(())
        });
        result.map_err(tx_err)?;
        Ok(ended.len())
    }

    /// Visits the final record of every ended row of batch `seq`, in row
    /// order, after moving any still in the database to the archive. Rows
    /// without one (never claimed, or live) are skipped.
    pub fn for_each_final_row(
        &self,
        seq: BatchSeq,
        f: impl FnMut(u64, RowRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let offsets = {
            let one = self.retiring.lock().unwrap_or_else(|p| p.into_inner());
            self.archived_offsets(seq, &one)?
        };
        self.visit_archived(seq, offsets, f)
    }

    /// Where each row's last archived record is, after moving the batch's
    /// ended rows still in the database to the archive. Called holding the
    /// archive's lock (`_held`).
    fn archived_offsets(
        &self,
        seq: BatchSeq,
        _held: &std::sync::MutexGuard<'_, ()>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        let batch = self.batch(seq)?;
        self.retire_batch(seq)?;
        self.archive.index(seq, batch.total_rows)
    }

    fn visit_archived(
        &self,
        seq: BatchSeq,
        offsets: Vec<Option<u64>>,
        mut f: impl FnMut(u64, RowRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        if offsets.iter().all(Option::is_none) {
            return Ok(());
        }
        let mut reader = self.archive.reader(seq)?;
        for (i, offset) in offsets.into_iter().enumerate() {
            if let Some(offset) = offset {
                f(i as u64 + 1, reader.at(offset)?)?;
            }
        }
        Ok(())
    }

    /// Every row of batch `seq` that has a record, live or ended, in row
    /// order. Loads them all: for tests, tools and small batches.
    pub fn batch_rows(&self, seq: BatchSeq) -> Result<Vec<(u64, RowRecord)>, StoreError> {
        let mut rows: BTreeMap<u64, RowRecord> = BTreeMap::new();
        self.for_each_final_row(seq, |row, r| {
            rows.insert(row, r);
            Ok(())
        })?;
        for item in self.rows.scan_prefix(seq.to_be_bytes()) {
            let (k, v) = item.map_err(db_err)?;
            rows.insert(parse_row_key(&k)?.row, decode("row", &v)?);
        }
        Ok(rows.into_iter().collect())
    }

    /// Queues failed rows of a batch again (all, or those whose fail code is
    /// in `codes`), each for a new task; the batch becomes active again.
    pub fn requeue_failed(
        &self,
        seq: BatchSeq,
        codes: Option<&[String]>,
    ) -> Result<Vec<(RowKey, RowRecord)>, StoreError> {
        // Held to the end: a row whose archived record says failed must not
        // go live, end and be archived again (done) between this read and
        // the transaction below, or a stale failure would be retried (a
        // done row paid twice).
        let one = self.retiring.lock().unwrap_or_else(|p| p.into_inner());
        let offsets = self.archived_offsets(seq, &one)?;
        let mut chosen = Vec::new();
        self.visit_archived(seq, offsets, |row, r| {
            let code = r.fail_code.as_deref().unwrap_or("");
            if r.state == RowState::Failed && codes.is_none_or(|c| c.iter().any(|c| c == code)) {
                chosen.push((RowKey { batch: seq, row }, r));
            }
            Ok(())
        })?;
        let mut out = Vec::with_capacity(chosen.len());
        for part in chosen.chunks(RETIRE_CHUNK) {
            let result =
                (&self.batches, &self.rows, &self.index).transaction(|(batches, rows, index)| {
                    let mut batch = tx_batch(batches, seq)?;
                    let mut done = Vec::with_capacity(part.len());
                    for (key, archived) in part {
                        if tx_row(rows, *key)?.is_some() {
                            // Live again already (a retry raced this one).
                            continue;
                        }
                        let mut record = archived.clone();
                        Op::Retry.apply(*key, &mut record).map_err(abort)?;
                        batch.counts.moved(Some(RowState::Failed), RowState::Queued);
                        tx_put_row(rows, index, *key, None, &record)?;
                        done.push((*key, record));
                    }
                    batch.cancelled = false;
                    if !done.is_empty() {
                        batch.phase = BatchPhase::Active;
                        batch.finished_at_ms = None;
                    }
                    tx_put_batch(batches, &batch)?;
                    Ok(done)
                });
            out.extend(result.map_err(tx_err)?);
        }
        if !out.is_empty() {
            self.active_set().insert(seq);
        }
        Ok(out)
    }

    /// Ends never-claimed rows of a cancelled batch as `failed` (`CANCELLED`)
    /// and moves its cursor to `next`: their records go straight to the
    /// archive. Returns how many rows it ended.
    pub fn cancel_unclaimed(
        &self,
        seq: BatchSeq,
        rows: &[ManifestRow],
        next: ReadPosition,
        msg: &str,
    ) -> Result<u64, StoreError> {
        let batch = self.batch(seq)?;
        let read = batch.cursor.map_or(0, |c| c.rows_read);
        if !batch.cancelled {
            return Err(StoreError::NotCancelled(batch.name));
        }
        let ended: Vec<(u64, RowRecord)> = rows
            .iter()
            .filter(|row| row.index > read)
            .map(|row| {
                let mut r = RowRecord::new(row.id.clone(), row.line, row.spec.clone());
                r.state = RowState::Failed;
                r.fail_code = Some(super::CANCELLED.into());
                r.fail_msg = Some(msg.to_owned());
                (row.index, r)
            })
            .collect();
        {
            let _one = self.retiring.lock().unwrap_or_else(|p| p.into_inner());
            self.archive
                .append(seq, ended.iter().map(|(row, r)| (*row, r)))?;
        }
        let n = ended.len() as u64;
        let result = self.batches.transaction(|batches| {
            let mut batch = tx_batch(batches, seq)?;
            // Claims are refused once cancelled, so the cursor has not moved.
            if batch.cursor.map_or(0, |c| c.rows_read) == read {
                batch.cursor = Some(next);
                batch.counts.failed += n;
            }
            tx_put_batch(batches, &batch)?;
            Ok(())
        });
        result.map_err(tx_err)?;
        Ok(n)
    }

    // ---- secrets, spend, ledger ----

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

    /// Counts spend of this process as simulated (`run --simulate`): kept
    /// apart, never added to the real spend the cap counts.
    pub fn set_simulated_spend(&self, simulated: bool) {
        self.simulated_spend
            .store(simulated, std::sync::atomic::Ordering::Relaxed);
    }

    fn spend_key(&self) -> &'static [u8] {
        if self
            .simulated_spend
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            KEY_SPEND_SIMULATED
        } else {
            KEY_SPEND
        }
    }

    /// What has been spent so far (in the simulated account for a simulated run).
    pub fn spend(&self) -> Result<SpendTotals, StoreError> {
        self.spend_of(self.spend_key() == KEY_SPEND_SIMULATED)
    }

    /// The real (or the simulated) spend, whatever this process counts.
    pub fn spend_of(&self, simulated: bool) -> Result<SpendTotals, StoreError> {
        let key = if simulated {
            KEY_SPEND_SIMULATED
        } else {
            KEY_SPEND
        };
        match self.meta.get(key).map_err(db_err)? {
            Some(v) => decode("spend", &v),
            None => Ok(SpendTotals::default()),
        }
    }

    /// Ambiguous submits so far.
    pub fn ambiguous(&self) -> Result<AmbiguousTotals, StoreError> {
        match self.meta.get(KEY_AMBIGUOUS).map_err(db_err)? {
            Some(v) => decode("ambiguous submits", &v),
            None => Ok(AmbiguousTotals::default()),
        }
    }

    /// Counts an ambiguous submit of `key` on the row ([`Op::Ambiguous`]) and
    /// in the totals (a row counted once), and adds what it may have cost to
    /// the spend. The caller flushes.
    pub fn record_ambiguous(
        &self,
        key: RowKey,
        usd: f64,
        audio_seconds: f64,
    ) -> Result<(RowRecord, AmbiguousTotals), StoreError> {
        let record = self.apply(key, Op::Ambiguous)?;
        let first = record.ambiguous_submits == 1;
        let totals = self.meta.transaction(|meta| {
            let mut t: AmbiguousTotals = match meta.get(KEY_AMBIGUOUS)? {
                Some(v) => decode("ambiguous submits", &v).map_err(abort)?,
                None => AmbiguousTotals::default(),
            };
            t.attempts += 1;
            t.rows += u64::from(first);
            meta.insert(KEY_AMBIGUOUS, encode(&t).map_err(abort)?)?;
            Ok(t)
        });
        let totals = totals.map_err(tx_err)?;
        self.add_spend(usd, audio_seconds)?;
        Ok((record, totals))
    }

    /// Adds to (or, negative, refunds from) the spend; returns the new totals.
    /// The caller flushes before the submission it pays for.
    pub fn add_spend(&self, usd: f64, audio_seconds: f64) -> Result<SpendTotals, StoreError> {
        let key = self.spend_key();
        let result = self.meta.transaction(|meta| {
            let mut totals: SpendTotals = match meta.get(key)? {
                Some(v) => decode("spend", &v).map_err(abort)?,
                None => SpendTotals::default(),
            };
            totals.usd = (totals.usd + usd).max(0.0);
            totals.audio_seconds = (totals.audio_seconds + audio_seconds).max(0.0);
            meta.insert(key, encode(&totals).map_err(abort)?)?;
            Ok(totals)
        });
        result.map_err(tx_err)
    }

    pub fn load_ledger(&self) -> Result<Vec<LedgerEntry>, StoreError> {
        match self.meta.get(KEY_LEDGER).map_err(db_err)? {
            Some(v) => decode("request ledger", &v),
            None => Ok(Vec::new()),
        }
    }

    /// The durations the poll model last saved (none on a new state folder).
    pub fn load_durations(&self) -> Result<Vec<DurationSample>, StoreError> {
        match self.meta.get(KEY_DURATIONS).map_err(db_err)? {
            Some(v) => decode("task durations", &v),
            None => Ok(Vec::new()),
        }
    }

    pub fn save_durations(&self, samples: &[DurationSample]) -> Result<(), StoreError> {
        self.meta
            .insert(KEY_DURATIONS, encode(&samples)?)
            .map(|_| ())
            .map_err(db_err)
    }

    pub fn save_ledger(&self, entries: &[LedgerEntry]) -> Result<(), StoreError> {
        self.meta
            .insert(KEY_LEDGER, encode(&entries)?)
            .map(|_| ())
            .map_err(db_err)
    }
}

/// Moves batch `b`'s cursor past fresh row `key`, or refuses: a fresh row
/// of a cancelled or paused batch, or one at or behind the cursor (taken
/// before), is not taken.
fn take_fresh(
    b: &mut BatchRecord,
    key: RowKey,
    next: ReadPosition,
    action: &'static str,
) -> TxResult<()> {
    let read = b.cursor.map_or(0, |c| c.rows_read);
    let refused = if b.cancelled {
        Some("in a cancelled batch")
    } else if b.paused {
        Some("in a paused batch")
    } else if b.phase != BatchPhase::Active || key.row <= read {
        Some("claimed before")
    } else {
        None
    };
    if let Some(found) = refused {
        return Err(abort(StoreError::WrongState { key, found, action }));
    }
    b.cursor = Some(next);
    Ok(())
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

#[cfg(test)]
#[path = "sled_migrate_tests.rs"]
mod migrate_tests;
