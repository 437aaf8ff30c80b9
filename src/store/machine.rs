//! The row state machine: every change of a row's state is one [`Op`], and
//! this file is the only place that says which changes are legal.
//!
//! ```text
//!  (unclaimed) ──claim──▶ submitting ──task_created──▶ running ──succeeded──▶ downloading ──downloaded──▶ done
//!       queued ──claim──▶     │  ▲ costed, ambiguous      │  │                   │  ▲ fresh_urls, file_saved
//!         ▲  ▲                │  └────┘                   │  │                   └──┘
//!         │  └─unsent/deferred┤                           │  └─task_failed──▶ failed ◀──download_failed──┘
//!         │                   └─────── submit_failed ─────┼─────────────────▶ failed
//!         └────────────────── resubmit (service-side code) ┘
//!  queued ──cancel──▶ failed;   failed ──retry──▶ queued (a deliberate retry, each a new paid task)
//! ```
//!
//! With `--probe` a fresh row is not claimed but *admitted*
//! ([`super::Store::admit`]), with no slot: `(unclaimed) ──admit──▶ queued`
//! with its audio's length (or to be probed again), or `──admit──▶ failed`
//! when its audio is bad; it is then claimed from `queued`, longest first.
//!
//! `deferred` is `probe_deferred`: the audio's length could not be read yet.
//! In a cancelled batch a row never goes back to `queued`: [`super::Store::apply`]
//! follows any operation that would queue it with `cancel`, in the same
//! transaction.
//!
//! A final row (`done`, `failed`) is changed by nothing but `retry`. An
//! operation on a running or downloading row names the task it is about, and
//! is refused when the row has moved on to another task (a late or duplicate
//! answer about an earlier task changes nothing).

use super::{RowKey, RowRecord, RowState, StoreError};

/// One legal change of a row. `claim` and `admit` are
/// [`super::Store::claim`]'s and [`super::Store::admit`]'s alone (a fresh
/// row has no record to change yet).
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// The probed length and cost of a row about to be sent.
    Costed { audio_seconds: f64, cost_usd: f64 },
    /// The API answered with a task id.
    TaskCreated { task_id: String, at_ms: u64 },
    /// A submit of the row was sent and its answer lost or unreadable: it
    /// may have created a task. Counted on the row (the bound of retries).
    Ambiguous,
    /// Back to the queue without a task: never sent (paused), or found
    /// `submitting` after a crash.
    Unsent,
    /// Back to the queue because the audio's length could not be read now
    /// (`--probe`). Counted on the row (the bound of such tries).
    ProbeDeferred,
    /// The row ends without a task: refused by the API, bad audio, or a
    /// submit that stayed ambiguous past its bound.
    SubmitFailed { code: String, msg: String },
    /// The task succeeded; its videos are to be fetched.
    Succeeded {
        task_id: String,
        result_urls: Vec<String>,
        cost_time_ms: Option<u64>,
        at_ms: u64,
    },
    /// The task failed and the row ends with the API's code.
    TaskFailed {
        task_id: String,
        code: String,
        msg: String,
    },
    /// The task failed on the service's side: the row goes back to the queue
    /// for a new task. `counted` says whether it uses up a resubmission.
    Resubmit {
        task_id: String,
        code: String,
        msg: String,
        counted: bool,
    },
    /// New result URLs for a task whose old ones expired.
    FreshUrls { result_urls: Vec<String> },
    /// One video of the task is complete under its final name.
    FileSaved { task_id: String, name: String },
    /// Every video is in place.
    Downloaded { outputs: Vec<String> },
    /// The videos stayed out of reach (or the disk refused them) for good.
    DownloadFailed { code: String, msg: String },
    /// An operator's cancel of a queued row.
    Cancel { msg: String },
    /// An operator's retry of a failed row: a new task, paid again.
    Retry,
}

/// Every legal edge, for documentation and tests: operation, from, to.
pub const TRANSITIONS: &[(&str, RowState, RowState)] = &[
    ("claim", RowState::Queued, RowState::Submitting),
    ("costed", RowState::Submitting, RowState::Submitting),
    ("task_created", RowState::Submitting, RowState::Running),
    ("ambiguous", RowState::Submitting, RowState::Submitting),
    ("unsent", RowState::Submitting, RowState::Queued),
    ("probe_deferred", RowState::Submitting, RowState::Queued),
    ("submit_failed", RowState::Submitting, RowState::Failed),
    ("succeeded", RowState::Running, RowState::Downloading),
    ("task_failed", RowState::Running, RowState::Failed),
    ("resubmit", RowState::Running, RowState::Queued),
    ("fresh_urls", RowState::Downloading, RowState::Downloading),
    ("file_saved", RowState::Downloading, RowState::Downloading),
    ("downloaded", RowState::Downloading, RowState::Done),
    ("download_failed", RowState::Downloading, RowState::Failed),
    ("cancel", RowState::Queued, RowState::Failed),
    ("retry", RowState::Failed, RowState::Queued),
];

impl Op {
    /// The cancel of queued row `r` of a cancelled batch; what ended its
    /// last task, if anything did, stays in the message.
    pub fn cancel_of(r: &RowRecord) -> Op {
        let msg = match (&r.fail_code, &r.fail_msg) {
            (Some(code), Some(why)) => {
                format!("batch cancelled by the operator; not submitted again after {code}: {why}")
            }
            (Some(code), None) => {
                format!("batch cancelled by the operator; not submitted again after {code}")
            }
            _ => super::CANCEL_MSG.to_owned(),
        };
        Op::Cancel { msg }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Costed { .. } => "costed",
            Op::TaskCreated { .. } => "task_created",
            Op::Ambiguous => "ambiguous",
            Op::Unsent => "unsent",
            Op::ProbeDeferred => "probe_deferred",
            Op::SubmitFailed { .. } => "submit_failed",
            Op::Succeeded { .. } => "succeeded",
            Op::TaskFailed { .. } => "task_failed",
            Op::Resubmit { .. } => "resubmit",
            Op::FreshUrls { .. } => "fresh_urls",
            Op::FileSaved { .. } => "file_saved",
            Op::Downloaded { .. } => "downloaded",
            Op::DownloadFailed { .. } => "download_failed",
            Op::Cancel { .. } => "cancel",
            Op::Retry => "retry",
        }
    }

    /// The state a row must be in for this operation, and the one it leaves in.
    pub fn edge(&self) -> (RowState, RowState) {
        let name = self.name();
        TRANSITIONS
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, from, to)| (*from, *to))
            // Every variant has a row in the table (a unit test checks it).
            .unwrap_or((RowState::Failed, RowState::Failed))
    }

    /// The task an answer is about, for operations on a task.
    fn task(&self) -> Option<&str> {
        match self {
            Op::Succeeded { task_id, .. }
            | Op::TaskFailed { task_id, .. }
            | Op::Resubmit { task_id, .. }
            | Op::FileSaved { task_id, .. } => Some(task_id),
            _ => None,
        }
    }

    /// Applies the operation to `r`, or refuses it, changing nothing.
    pub fn apply(self, key: RowKey, r: &mut RowRecord) -> Result<(), StoreError> {
        let (from, to) = self.edge();
        if r.state != from {
            return Err(StoreError::WrongState {
                key,
                found: r.state.as_str(),
                action: self.name(),
            });
        }
        if let Some(task) = self.task()
            && r.task_id.as_deref() != Some(task)
        {
            return Err(StoreError::StaleTask {
                key,
                task_id: task.to_owned(),
            });
        }
        match self {
            Op::Costed {
                audio_seconds,
                cost_usd,
            } => {
                r.audio_seconds = Some(audio_seconds);
                r.cost_usd = Some(cost_usd);
            }
            Op::TaskCreated { task_id, at_ms } => {
                if let Some(old) = r.task_id.replace(task_id) {
                    r.previous_tasks.push(old);
                }
                r.submitted_at_ms = Some(at_ms);
                r.fail_code = None;
                r.fail_msg = None;
            }
            Op::Ambiguous => r.ambiguous_submits = r.ambiguous_submits.saturating_add(1),
            Op::Unsent => {}
            Op::ProbeDeferred => r.probe_deferrals = r.probe_deferrals.saturating_add(1),
            Op::SubmitFailed { code, msg }
            | Op::DownloadFailed { code, msg }
            | Op::TaskFailed { code, msg, .. } => {
                r.fail_code = Some(code);
                r.fail_msg = Some(msg);
            }
            Op::Succeeded {
                result_urls,
                cost_time_ms,
                at_ms,
                ..
            } => {
                r.result_urls = result_urls;
                r.cost_time_ms = cost_time_ms;
                r.finished_at_ms = Some(at_ms);
            }
            Op::Resubmit {
                code, msg, counted, ..
            } => {
                if let Some(old) = r.task_id.take() {
                    r.previous_tasks.push(old);
                }
                if counted {
                    r.resubmits += 1;
                }
                r.submitted_at_ms = None;
                r.fail_code = Some(code);
                r.fail_msg = Some(msg);
            }
            Op::FreshUrls { result_urls } => r.result_urls = result_urls,
            Op::FileSaved { task_id, name } => {
                r.files.retain(|f| f.name != name);
                r.files.push(super::OutputFile { name, task_id });
            }
            Op::Downloaded { outputs } => {
                r.outputs = outputs;
                // For the console's timeline; nothing decides on it.
                r.downloaded_at_ms = Some(super::now_ms());
            }
            Op::Cancel { msg } => {
                r.fail_code = Some(super::CANCELLED.into());
                r.fail_msg = Some(msg);
            }
            Op::Retry => {
                if let Some(old) = r.task_id.take() {
                    r.previous_tasks.push(old);
                }
                r.resubmits = 0;
                r.ambiguous_submits = 0;
                r.probe_deferrals = 0;
                r.submitted_at_ms = None;
                r.finished_at_ms = None;
                r.downloaded_at_ms = None;
                r.cost_time_ms = None;
                r.result_urls.clear();
                r.outputs.clear();
                // The audio may have been replaced: it is read again.
                r.audio_seconds = None;
                r.cost_usd = None;
                r.fail_code = None;
                r.fail_msg = None;
            }
        }
        r.state = to;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::RowSpec;

    fn record(state: RowState, task: Option<&str>) -> RowRecord {
        let mut r = RowRecord::new("r".into(), 2, RowSpec::default());
        r.state = state;
        r.task_id = task.map(str::to_owned);
        r
    }

    fn every_op() -> Vec<Op> {
        let t = || "t1".to_owned();
        vec![
            Op::Costed {
                audio_seconds: 5.0,
                cost_usd: 0.15,
            },
            Op::TaskCreated {
                task_id: t(),
                at_ms: 1,
            },
            Op::Ambiguous,
            Op::Unsent,
            Op::ProbeDeferred,
            Op::SubmitFailed {
                code: "C".into(),
                msg: "m".into(),
            },
            Op::Succeeded {
                task_id: t(),
                result_urls: vec![],
                cost_time_ms: None,
                at_ms: 1,
            },
            Op::TaskFailed {
                task_id: t(),
                code: "C".into(),
                msg: "m".into(),
            },
            Op::Resubmit {
                task_id: t(),
                code: "C".into(),
                msg: "m".into(),
                counted: true,
            },
            Op::FreshUrls {
                result_urls: vec![],
            },
            Op::FileSaved {
                task_id: t(),
                name: "r.mp4".into(),
            },
            Op::Downloaded { outputs: vec![] },
            Op::DownloadFailed {
                code: "C".into(),
                msg: "m".into(),
            },
            Op::Cancel { msg: "m".into() },
            Op::Retry,
        ]
    }

    #[test]
    fn every_op_has_one_edge_and_only_its_edge_is_legal() {
        let key = RowKey { batch: 1, row: 1 };
        for op in every_op() {
            let rows: Vec<_> = TRANSITIONS.iter().filter(|e| e.0 == op.name()).collect();
            assert_eq!(rows.len(), 1, "{} in the table once", op.name());
            let (from, to) = op.edge();
            for state in RowState::ALL {
                let mut r = record(state, Some("t1"));
                let before = r.clone();
                let applied = op.clone().apply(key, &mut r);
                if state == from {
                    applied.expect("legal");
                    assert_eq!(r.state, to, "{}", op.name());
                } else {
                    assert!(applied.is_err(), "{} from {state:?}", op.name());
                    assert_eq!(r, before, "a refused op changes nothing");
                }
            }
        }
    }

    #[test]
    fn answers_about_another_task_change_nothing() {
        let key = RowKey { batch: 1, row: 1 };
        let mut r = record(RowState::Running, Some("t2"));
        let before = r.clone();
        let op = Op::Succeeded {
            task_id: "t1".into(),
            result_urls: vec!["u".into()],
            cost_time_ms: None,
            at_ms: 1,
        };
        assert!(matches!(
            op.apply(key, &mut r),
            Err(StoreError::StaleTask { .. })
        ));
        assert_eq!(r, before);
    }

    #[test]
    fn only_retry_leaves_a_final_state() {
        for (name, from, _) in TRANSITIONS {
            if from.is_final() {
                assert_eq!(*name, "retry");
            }
        }
    }
}
