//! The durable state: batches, the rows that have left the queue, and the
//! request ledger. The store is the bus: a row changes state only through
//! the methods here.
//!
//! Queued rows are not copied into the store. An accepted manifest is an
//! immutable file (`OUTBOX/BATCH/manifest.csv`), so a batch keeps a cursor
//! into it; a row gets a record only when it is claimed for submission (or
//! queued again after a claim). The store therefore stays small at a million
//! queued rows.
//!
//! Rows that ended leave the database: their final record is appended to a
//! per-batch archive file ([`archive`]) and synced first. The database
//! therefore holds only what is live (batches, claimed rows not yet ended,
//! the request ledger, secrets, spend), and its size and memory follow the
//! live rows, not the rows processed.
//!
//! A row changes state only through [`Store::claim`] and [`Store::apply`]
//! with an [`Op`] of the state machine ([`machine`]), which refuses every
//! change that is not in its table.
//!
//! Every method that precedes an outside effect is followed by a
//! [`Store::flush`] from the caller before the effect (write-ahead).
//!
//! Only `store/sled.rs` knows the database engine.

mod archive;
mod index_key;
pub mod machine;
mod sled;
mod view;

pub use self::machine::{Op, TRANSITIONS};

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::manifest::ReadPosition;
use crate::spec::RowSpec;

pub use self::sled::Store;
pub use self::view::RowFilter;

/// Fail code of rows a `cancel` ended.
pub const CANCELLED: &str = "CANCELLED";

/// The message of a row ended by a cancel.
pub const CANCEL_MSG: &str = "cancelled by the operator before submission";

/// Version of the on-disk layout this build reads and writes. Older layouts
/// are migrated at open: layout 1 kept every row ever claimed in the
/// database; layout 2 indexed every queued row in row order (layout 3 puts
/// those of known length longest first).
pub const SCHEMA_VERSION: u32 = 3;

/// Batches are numbered in order of acceptance.
pub type BatchSeq = u64;

/// One row of one batch: the batch's number and the row's 1-based index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RowKey {
    pub batch: BatchSeq,
    pub row: u64,
}

impl RowKey {
    pub const fn at(batch: BatchSeq, row: u64) -> RowKey {
        RowKey { batch, row }
    }
}

impl std::fmt::Display for RowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.batch, self.row)
    }
}

/// Where a row is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowState {
    /// Waiting to be submitted (again: rows never claimed have no record).
    Queued,
    /// A submit request may be on the wire: the write-ahead mark.
    Submitting,
    /// The API gave a task id; the task has not been seen finished.
    Running,
    /// The task succeeded; its videos are being fetched.
    Downloading,
    Done,
    Failed,
}

impl RowState {
    pub const ALL: [RowState; 6] = [
        RowState::Queued,
        RowState::Submitting,
        RowState::Running,
        RowState::Downloading,
        RowState::Done,
        RowState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RowState::Queued => "queued",
            RowState::Submitting => "submitting",
            RowState::Running => "running",
            RowState::Downloading => "downloading",
            RowState::Done => "done",
            RowState::Failed => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, RowState::Done | RowState::Failed)
    }

    pub(crate) fn tag(self) -> u8 {
        match self {
            RowState::Queued => 0,
            RowState::Submitting => 1,
            RowState::Running => 2,
            RowState::Downloading => 3,
            RowState::Done => 4,
            RowState::Failed => 5,
        }
    }
}

/// Everything known about a row that has left the queue at least once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowRecord {
    pub id: String,
    pub line: u64,
    pub spec: RowSpec,
    pub state: RowState,
    /// The current (or last) task of the row.
    #[serde(default)]
    pub task_id: Option<String>,
    /// Earlier tasks of the row, oldest first (service-side failures, retries).
    #[serde(default)]
    pub previous_tasks: Vec<String>,
    /// Resubmissions after a service-side failure code.
    #[serde(default)]
    pub resubmits: u32,
    /// Unix milliseconds of the current task's submission.
    #[serde(default)]
    pub submitted_at_ms: Option<u64>,
    /// Unix milliseconds when the task was seen finished.
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    /// Unix milliseconds when its videos were all in place (shown in the
    /// console's timeline only).
    #[serde(default)]
    pub downloaded_at_ms: Option<u64>,
    /// Processing time the API reported, in milliseconds.
    #[serde(default)]
    pub cost_time_ms: Option<u64>,
    #[serde(default)]
    pub result_urls: Vec<String>,
    /// Output files, relative to the batch folder.
    #[serde(default)]
    pub outputs: Vec<String>,
    #[serde(default)]
    pub fail_code: Option<String>,
    #[serde(default)]
    pub fail_msg: Option<String>,
    #[serde(default)]
    pub audio_seconds: Option<f64>,
    #[serde(default)]
    pub cost_usd: Option<f64>,
    /// Submits of this row whose answer was lost or unreadable (each may
    /// have created a paid task); bounded by `max-ambiguous-submits`.
    #[serde(default)]
    pub ambiguous_submits: u32,
    /// Claims given back because the audio's length could not be read
    /// (`--probe`); bounded by the dispatcher's probe rule.
    #[serde(default)]
    pub probe_deferrals: u32,
    /// Files in the batch folder and the task whose result each holds. A
    /// file is taken as a task's output only when recorded here with that
    /// task: one left by an earlier task is downloaded over.
    #[serde(default)]
    pub files: Vec<OutputFile>,
}

/// One output file and the task that produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    pub name: String,
    pub task_id: String,
}

impl RowRecord {
    /// The cost of the row's task, when it has (or may have) had a paid
    /// one: a task id, or a submit whose answer was lost (counted as paid).
    /// A row that never reached a task (refused, bad or changed media) cost
    /// nothing: what was reserved for it was refunded.
    pub fn paid_cost_usd(&self) -> Option<f64> {
        let sent =
            self.task_id.is_some() || !self.previous_tasks.is_empty() || self.ambiguous_submits > 0;
        self.cost_usd.filter(|_| sent)
    }

    pub fn new(id: String, line: u64, spec: RowSpec) -> Self {
        RowRecord {
            id,
            line,
            spec,
            state: RowState::Queued,
            task_id: None,
            previous_tasks: Vec::new(),
            resubmits: 0,
            submitted_at_ms: None,
            finished_at_ms: None,
            downloaded_at_ms: None,
            cost_time_ms: None,
            result_urls: Vec::new(),
            outputs: Vec::new(),
            fail_code: None,
            fail_msg: None,
            audio_seconds: None,
            cost_usd: None,
            ambiguous_submits: 0,
            probe_deferrals: 0,
            files: Vec::new(),
        }
    }

    /// Whether `name` is recorded as the output of `task_id`.
    pub fn owns_file(&self, name: &str, task_id: &str) -> bool {
        self.files
            .iter()
            .any(|f| f.name == name && f.task_id == task_id)
    }
}

/// How far a batch has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchPhase {
    /// Its manifest is being moved to the outbox; not yet accepted.
    Ingesting,
    /// Accepted: rows are queued or in flight.
    Active,
    /// Every row ended and `results.csv` was written.
    Finished,
}

/// Rows of a batch by state. Rows never claimed are counted by the cursor,
/// not here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub queued: u64,
    pub submitting: u64,
    pub running: u64,
    pub downloading: u64,
    pub done: u64,
    pub failed: u64,
}

impl Counts {
    fn slot(&mut self, state: RowState) -> &mut u64 {
        match state {
            RowState::Queued => &mut self.queued,
            RowState::Submitting => &mut self.submitting,
            RowState::Running => &mut self.running,
            RowState::Downloading => &mut self.downloading,
            RowState::Done => &mut self.done,
            RowState::Failed => &mut self.failed,
        }
    }

    pub fn get(&self, state: RowState) -> u64 {
        let mut c = *self;
        *c.slot(state)
    }

    fn moved(&mut self, from: Option<RowState>, to: RowState) {
        if let Some(from) = from {
            let slot = self.slot(from);
            *slot = slot.saturating_sub(1);
        }
        *self.slot(to) += 1;
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub seq: BatchSeq,
    /// Folder name under the outbox; unique.
    pub name: String,
    pub sha256: String,
    /// The inbox file it came from.
    pub source: PathBuf,
    /// Whether the inbox file is known to be gone.
    #[serde(default)]
    pub source_removed: bool,
    pub phase: BatchPhase,
    pub total_rows: u64,
    /// Next row of the manifest never claimed yet.
    pub cursor: Option<ReadPosition>,
    pub counts: Counts,
    pub created_at_ms: u64,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    /// Submitted against the built-in simulator: outputs are not real.
    #[serde(default)]
    pub simulated: bool,
    /// Cancelled by the operator: its queued rows are never submitted.
    #[serde(default)]
    pub cancelled: bool,
    /// Paused by the operator: no row of it is submitted until resumed
    /// (its running tasks finish).
    #[serde(default)]
    pub paused: bool,
    /// Its share of submissions among the active batches.
    #[serde(default)]
    pub priority: Priority,
}

/// A batch's share of submissions: each round of the feed takes up to
/// [`Priority::weight`] rows from every active batch, so none is starved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// Rows a batch contributes to one round of the feed.
    pub fn weight(self) -> usize {
        match self {
            Priority::High => 4,
            Priority::Normal => 2,
            Priority::Low => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl std::str::FromStr for Priority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            other => Err(format!("priority {other:?}: use high, normal or low")),
        }
    }
}

impl BatchRecord {
    /// Rows never claimed, by the cursor.
    pub fn unclaimed(&self) -> u64 {
        self.total_rows
            .saturating_sub(self.cursor.map_or(0, |c| c.rows_read))
    }

    /// Rows waiting for submission.
    pub fn queued(&self) -> u64 {
        self.unclaimed() + self.counts.queued
    }

    /// True when every row has ended.
    pub fn all_rows_ended(&self) -> bool {
        self.counts.done + self.counts.failed >= self.total_rows
    }
}

/// A row claimed for submission.
#[derive(Debug, Clone)]
pub enum Claim {
    /// The next unclaimed row of a batch, read from its manifest.
    Fresh {
        batch: BatchSeq,
        row: crate::manifest::ManifestRow,
        next: ReadPosition,
    },
    /// A row queued again.
    Again(RowKey),
}

/// Fresh row `index` of batch `batch`, for tests: id `r{index}`, default
/// spec, ten bytes a row.
#[cfg(test)]
pub(crate) fn test_claim(batch: BatchSeq, index: u64) -> Claim {
    Claim::Fresh {
        batch,
        row: crate::manifest::ManifestRow {
            index,
            line: index + 1,
            id: format!("r{index}"),
            spec: crate::spec::RowSpec::default(),
            extra: Vec::new(),
        },
        next: ReadPosition {
            byte: index * 10,
            line: index + 2,
            rows_read: index,
        },
    }
}

/// The next unclaimed row of a batch let into the queue without a slot,
/// with what was learned of its audio (`--probe`): see [`Store::admit`].
#[derive(Debug, Clone)]
pub struct Admission {
    pub batch: BatchSeq,
    pub row: crate::manifest::ManifestRow,
    pub next: ReadPosition,
    pub audio: AdmittedAudio,
}

/// What the probe of an admitted row's audio found.
#[derive(Debug, Clone, PartialEq)]
pub enum AdmittedAudio {
    /// Its length: the row waits `queued`, in the longest-first order.
    Seconds(f64),
    /// It could not be read now: the row waits `queued`, one round of
    /// probing counted (see [`machine::Op::ProbeDeferred`]).
    NotYet,
    /// It is bad for good: the row ends `failed`, never sent.
    Bad { code: String, msg: String },
}

/// What `begin_batch` decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    Started(BatchRecord),
    /// The same bytes were accepted before, as this batch.
    Duplicate {
        earlier: String,
    },
}

/// What has been spent, kept across restarts: the known (or, unprobed,
/// minimum) cost and audio of every row submitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SpendTotals {
    pub usd: f64,
    pub audio_seconds: f64,
}

/// Submits whose answer was lost or unreadable, kept across restarts: each
/// may have created a task that is paid and never followed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmbiguousTotals {
    /// Rows with at least one ambiguous submit ("possibly paid twice").
    pub rows: u64,
    /// Ambiguous submits in all.
    pub attempts: u64,
}

/// Requests sent in one second, for the sliding-window budget across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub unix_second: u64,
    pub requests: u32,
}

/// How long one finished task took, as the poll model remembers it (kept
/// across restarts so that polling starts at full pace).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DurationSample {
    /// Seconds from submission to the end, as the API measured it.
    pub secs: f64,
    /// Seconds of audio of the task, when probed.
    #[serde(default)]
    pub audio: Option<f64>,
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (often: another process has it).
    #[error(
        "cannot open the state database in {path}: {source} (is another infinitetalk-batch running on it?)"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state folder was written by another version of the layout.
    #[error(
        "the state folder {path} holds layout version {found}; this build reads version {supported} only. Use the build that wrote it, or point --state at a new folder"
    )]
    Version {
        path: PathBuf,
        found: String,
        supported: u32,
    },
    /// A read or write of the database failed.
    #[error("state database: {0}")]
    Db(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A value could not be encoded for the database.
    #[error("state database: cannot encode a value: {0}")]
    Encode(#[source] serde_json::Error),
    /// The archive of ended rows could not be read or written.
    #[error("archive of ended rows, {path}: {source}")]
    Archive {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A stored value could not be decoded (corruption or a foreign writer).
    #[error("state database holds an unreadable {what}: {message}")]
    Corrupt { what: &'static str, message: String },
    /// The row is not in a state that allows the operation.
    #[error("row {key} is {found}, cannot {action}")]
    WrongState {
        key: RowKey,
        found: &'static str,
        action: &'static str,
    },
    /// An answer about a task the row no longer runs (late or duplicate).
    #[error("row {key} no longer runs task {task_id}")]
    StaleTask { key: RowKey, task_id: String },
    #[error("no batch number {0}")]
    NoBatch(BatchSeq),
    #[error("no live record for row {0}")]
    NoRow(RowKey),
    /// An accepted batch cannot be abandoned like an interrupted ingest.
    #[error("batch {0} is accepted, not abandoned")]
    BatchAccepted(String),
    /// Unclaimed rows end `CANCELLED` only in a batch marked cancelled.
    #[error("batch {0} is not cancelled")]
    NotCancelled(String),
    /// A blocking store call did not complete (its thread panicked).
    #[error("state database call: {0}")]
    Task(#[from] tokio::task::JoinError),
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
