//! What `status` shows: per-batch progress, the pause reason and the limits,
//! from the running daemon (`GET /status`) or read from the state folder.

use serde::{Deserialize, Serialize};

use crate::store::{BatchPhase, BatchRecord, Priority, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchStatus {
    pub name: String,
    /// The store's number for the batch (not shown).
    #[serde(skip)]
    pub seq: crate::store::BatchSeq,
    pub phase: BatchPhase,
    pub total: u64,
    pub queued: u64,
    pub in_flight: u64,
    pub downloading: u64,
    pub done: u64,
    pub failed: u64,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub cancelled: bool,
    /// Estimated seconds until every row has ended (a running daemon only;
    /// none while paused or not yet known).
    #[serde(default)]
    pub eta_seconds: Option<u64>,
}

impl BatchStatus {
    /// Rows not ended yet.
    pub fn remaining(&self) -> u64 {
        self.queued + self.in_flight + self.downloading
    }
}

impl From<&BatchRecord> for BatchStatus {
    fn from(b: &BatchRecord) -> Self {
        BatchStatus {
            name: b.name.clone(),
            seq: b.seq,
            phase: b.phase,
            total: b.total_rows,
            queued: b.queued(),
            in_flight: b.counts.submitting + b.counts.running,
            downloading: b.counts.downloading,
            done: b.counts.done,
            failed: b.counts.failed,
            priority: b.priority,
            paused: b.paused,
            cancelled: b.cancelled,
            eta_seconds: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_concurrent: u32,
    pub max_requests_per_minute: u32,
}

/// Money: what has been spent and the cap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spend {
    /// Known cost of the rows submitted (the 5 s minimum for rows not probed).
    pub spent_usd: f64,
    /// Seconds of probed audio submitted.
    pub audio_seconds: f64,
    #[serde(default)]
    pub cap_usd: Option<f64>,
    /// Rows are probed for their exact cost before submission.
    #[serde(default)]
    pub probing: bool,
    /// Cost counted by runs against the built-in simulator (`--simulate`):
    /// nothing was paid, and it never counts against a real run's cap.
    #[serde(default)]
    pub simulated_usd: f64,
    /// Rows with a submit whose answer was lost or unreadable: each such
    /// submit may have created a task, paid and never followed.
    #[serde(default)]
    pub possibly_paid_twice_rows: u64,
    /// Such submits in all (each counted in `spent_usd`).
    #[serde(default)]
    pub ambiguous_submits: u64,
}

impl Spend {
    pub fn from_store(store: &Store) -> Result<Spend, StoreError> {
        let totals = store.spend_of(false)?;
        let ambiguous = store.ambiguous()?;
        Ok(Spend {
            spent_usd: totals.usd,
            audio_seconds: totals.audio_seconds,
            cap_usd: None,
            probing: false,
            simulated_usd: store.spend_of(true)?.usd,
            possibly_paid_twice_rows: ambiguous.rows,
            ambiguous_submits: ambiguous.attempts,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// True when a running daemon answered; false when read from the store.
    pub live: bool,
    pub batches: Vec<BatchStatus>,
    #[serde(default)]
    pub paused: Option<String>,
    #[serde(default)]
    pub limits: Option<Limits>,
    #[serde(default)]
    pub tasks_in_flight: Option<u64>,
    #[serde(default)]
    pub requests_last_minute: Option<u64>,
    #[serde(default)]
    pub simulated: bool,
    #[serde(default)]
    pub spend: Option<Spend>,
    /// Estimated seconds until every active batch has ended (a running
    /// daemon only).
    #[serde(default)]
    pub eta_seconds: Option<u64>,
}

/// The batches as the store has them (ingesting ones left out).
pub fn batches(store: &Store) -> Result<Vec<BatchStatus>, StoreError> {
    Ok(store
        .batches()?
        .iter()
        .filter(|b| b.phase != BatchPhase::Ingesting)
        .map(BatchStatus::from)
        .collect())
}

/// Reads the state folder of a daemon that is not running.
pub fn from_store(store: &Store) -> Result<Report, StoreError> {
    Ok(Report {
        live: false,
        batches: batches(store)?,
        paused: None,
        limits: None,
        tasks_in_flight: None,
        requests_last_minute: None,
        simulated: false,
        spend: Some(Spend::from_store(store)?),
        eta_seconds: None,
    })
}

fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        ((done as f64 / total as f64) * width as f64).round() as usize
    };
    let filled = filled.min(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// `90` -> `1m30s`, `7200` -> `2h0m`: an estimate needs no more.
pub fn short_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// A table a person reads at a glance.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let source = if report.live {
        "daemon"
    } else {
        "state folder (daemon not running)"
    };
    out.push_str(&format!("source: {source}\n"));
    if let Some(reason) = &report.paused {
        out.push_str(&format!("SUBMISSION PAUSED: {reason}\n"));
    }
    if let (Some(l), Some(t), Some(r)) = (
        &report.limits,
        report.tasks_in_flight,
        report.requests_last_minute,
    ) {
        out.push_str(&format!(
            "tasks in flight: {t}/{}   requests in the last minute: {r}/{}\n",
            l.max_concurrent, l.max_requests_per_minute
        ));
    }
    if let Some(s) = &report.spend {
        out.push_str(&format!("spent: ${:.2}", s.spent_usd));
        if let Some(cap) = s.cap_usd {
            out.push_str(&format!(" of a ${cap:.2} cap"));
        }
        out.push_str(&format!(
            "   audio submitted: {:.1} s{}\n",
            s.audio_seconds,
            if s.probing {
                ""
            } else {
                " (not probed: 5 s minimum counted per row)"
            }
        ));
        if s.simulated_usd > 0.0 {
            out.push_str(&format!(
                "simulated: ${:.2} (runs with --simulate; nothing paid, not counted against the cap)\n",
                s.simulated_usd
            ));
        }
        if s.possibly_paid_twice_rows > 0 {
            out.push_str(&format!(
                "possibly paid twice: {} rows ({} submits whose answer was lost, each counted as paid)\n",
                s.possibly_paid_twice_rows, s.ambiguous_submits
            ));
        }
    }
    let width = report
        .batches
        .iter()
        .map(|b| b.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    out.push_str(&format!(
        "{:<width$}  {:>8} {:>8} {:>9} {:>11} {:>8} {:>8} {:>9}  progress\n",
        "batch", "total", "queued", "in flight", "downloading", "done", "failed", "eta"
    ));
    for b in &report.batches {
        out.push_str(&format!(
            "{:<width$}  {:>8} {:>8} {:>9} {:>11} {:>8} {:>8} {:>9}  {} {}\n",
            b.name,
            b.total,
            b.queued,
            b.in_flight,
            b.downloading,
            b.done,
            b.failed,
            b.eta_seconds.map_or_else(|| "-".to_owned(), short_duration),
            bar(b.done + b.failed, b.total, 20),
            if b.phase == BatchPhase::Finished {
                "finished".to_owned()
            } else {
                let mut notes = Vec::new();
                if b.cancelled {
                    notes.push("cancelled");
                } else if b.paused {
                    notes.push("PAUSED");
                }
                if b.priority != Priority::Normal {
                    notes.push(b.priority.as_str());
                }
                notes.join(", ")
            }
        ));
    }
    if report.batches.is_empty() {
        out.push_str("(no batches yet)\n");
    }
    if let Some(eta) = report.eta_seconds.filter(|s| *s > 0) {
        out.push_str(&format!(
            "estimated time to finish every batch: {}\n",
            short_duration(eta)
        ));
    }
    out
}
