//! A manifest dropped in the page: `POST /console/drop?name=FILE.csv` (the
//! file's bytes as the body) checks it exactly as the daemon would (every
//! error line; probing each row's audio when `--probe` is on) and answers
//! the row count and the estimated cost, or the problems; `POST
//! /console/drop/{token}/accept` then hands it to the same
//! [`crate::ingest::ingest_file`] the inbox watcher uses, with the same
//! duplicate refusal and the same `rejected/` folder.
//!
//! Between the two it waits in a private folder of the inbox
//! (`INBOX/.console/TOKEN/FILE.csv`: hidden, so the watcher ignores it, and
//! on the inbox's filesystem, so that ingest's rename works). At most
//! [`MAX_STAGED`] wait at once, each for [`STAGED_TTL`].

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};

use super::Console;
use crate::ingest::{self, Outcome};
use crate::manifest::{self, ManifestError};

/// Folder of the inbox where dropped manifests wait for the confirmation.
pub(crate) const STAGING_DIR: &str = ".console";
/// Dropped manifests waiting at once, at most (the oldest is dropped).
const MAX_STAGED: usize = 8;
/// How long a dropped manifest waits for its confirmation.
const STAGED_TTL: Duration = Duration::from_secs(3600);
/// Longest a probe of every row may take.
const PROBE_LIMIT: Duration = Duration::from_secs(300);
/// Problems sent back, at most (validation lists at most 1000 anyway).
const MAX_PROBLEMS: usize = 1000;

struct Staged {
    token: String,
    file: PathBuf,
    at: Instant,
    /// Still being checked: its file is read, so it is not evicted (a
    /// check given up by its client ends with the TTL).
    checking: bool,
}

/// Why a dropped manifest could not be staged.
#[derive(Debug, thiserror::Error)]
enum StageError {
    #[error("{MAX_STAGED} dropped manifests are being checked; try again when one is done")]
    Busy,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The manifests waiting for confirmation.
pub(crate) struct Drops {
    dir: PathBuf,
    staged: Mutex<Vec<Staged>>,
}

#[derive(Deserialize)]
pub(crate) struct DropQuery {
    name: String,
}

/// What the check found.
#[derive(Debug, Serialize, Deserialize)]
pub struct Checked {
    pub file: String,
    /// Set when the manifest is valid: the accept URL's token.
    pub token: Option<String>,
    pub rows: u64,
    pub cost_usd: f64,
    /// The cost is from each row's audio length (`--probe`), not the minimum.
    pub probed: bool,
    /// `line N: column C: ...`, every problem found.
    pub problems: Vec<String>,
    /// The batch these exact bytes were accepted as before (would be refused).
    pub duplicate_of: Option<String>,
}

/// What accepting did.
#[derive(Debug, Serialize, Deserialize)]
pub struct Accepted {
    pub batch: Option<String>,
    pub rows: u64,
    pub problems: Vec<String>,
}

impl Drops {
    pub(crate) fn new(inbox: PathBuf) -> Drops {
        let dir = inbox.join(STAGING_DIR);
        // Left by an earlier run: nothing waits for them any more.
        let _ = std::fs::remove_dir_all(&dir);
        Drops {
            dir,
            staged: Mutex::default(),
        }
    }

    /// Stages `bytes` as `file`; returns its token and path.
    fn stage(&self, file: &str, bytes: &[u8]) -> Result<(String, PathBuf), StageError> {
        use std::os::unix::fs::DirBuilderExt;
        let token = crate::ingest::hex(&rand::random::<[u8; 16]>());
        let dir = self.dir.join(&token);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let path = dir.join(file);
        if let Err(e) = crate::fsutil::write_atomic(&path, bytes) {
            // Nothing tracks the folder yet: it goes now or never.
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        let mut staged = self.staged.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let mut gone = Vec::new();
        staged.retain(|s| {
            let keep = now.duration_since(s.at) < STAGED_TTL;
            if !keep {
                gone.push(s.file.clone());
            }
            keep
        });
        if staged.len() >= MAX_STAGED {
            match staged.iter().position(|s| !s.checking) {
                Some(oldest) => gone.push(staged.remove(oldest).file),
                None => {
                    drop(staged);
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(StageError::Busy);
                }
            }
        }
        staged.push(Staged {
            token: token.clone(),
            file: path.clone(),
            at: now,
            checking: true,
        });
        drop(staged);
        gone.iter().for_each(|f| remove_staged(f));
        Ok((token, path))
    }

    /// Marks the drop of `token` checked: it may now be evicted by newer ones.
    fn checked(&self, token: &str) {
        let mut staged = self.staged.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = staged.iter_mut().find(|s| s.token == token) {
            s.checking = false;
        }
    }

    fn take(&self, token: &str) -> Option<PathBuf> {
        let mut staged = self.staged.lock().unwrap_or_else(PoisonError::into_inner);
        let i = staged.iter().position(|s| {
            crate::admin::constant_time_eq(s.token.as_bytes(), token.as_bytes())
                && s.at.elapsed() < STAGED_TTL
        })?;
        Some(staged.remove(i).file)
    }
}

fn remove_staged(file: &Path) {
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The drop zone of the overview.
pub(crate) fn form() -> Markup {
    html! {
        section.drop aria-labelledby="h-drop" {
            h2 #h-drop { "Add a manifest" }
            div #dropzone.dropzone {
                p { "Drop a CSV manifest here, or " }
                label.button for="manifest-file" { "choose a file" }
                input #manifest-file type="file" accept=".csv,text/csv";
            }
            div #drop-result aria-live="polite" {}
        }
    }
}

fn bad(status: StatusCode, msg: &str) -> Response {
    (status, msg.to_owned()).into_response()
}

/// A file name the inbox would take: `NAME.csv`, no folder, not hidden.
fn manifest_name(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next()?.trim();
    let stem = base.strip_suffix(".csv")?;
    (super::pages::safe_name(base) && !stem.is_empty()).then(|| base.to_owned())
}

pub(crate) async fn check(
    State(c): State<Console>,
    query: Result<Query<DropQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(file) = query.ok().and_then(|Query(q)| manifest_name(&q.name)) else {
        return bad(
            StatusCode::BAD_REQUEST,
            "name=FILE.csv is needed: a manifest's name ends in .csv",
        );
    };
    let body = match body {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let msg = format!(
                "the manifest is larger than {} MiB",
                super::MAX_UPLOAD_BYTES >> 20
            );
            return bad(StatusCode::PAYLOAD_TOO_LARGE, &msg);
        }
        Err(r) => return bad(StatusCode::BAD_REQUEST, &r.body_text()),
    };
    let (drops, store, f2) = (c.drops.clone(), c.engine.store.clone(), file.clone());
    let media = c.engine.settings.media.clone();
    let staged = tokio::task::spawn_blocking(move || {
        let (token, path) = drops.stage(&f2, &body)?;
        // Local files are checked as ingest will check them.
        let validated =
            manifest::validate_path_with(&path, &mut crate::media::MediaCheck::new(&media));
        let duplicate = match &validated {
            Ok(summary) => store.batch_with_hash(&summary.sha256).ok().flatten(),
            Err(_) => None,
        };
        Ok::<_, StageError>((token, path, validated, duplicate))
    })
    .await;
    let (token, path, validated, duplicate_of) = match staged {
        Ok(Ok(s)) => s,
        Ok(Err(e @ StageError::Busy)) => {
            return bad(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
        }
        Ok(Err(StageError::Io(e))) => {
            return bad(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot stage the manifest: {e}"),
            );
        }
        Err(e) => return bad(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let mut checked = Checked {
        file,
        token: None,
        rows: 0,
        cost_usd: 0.0,
        probed: false,
        problems: Vec::new(),
        duplicate_of,
    };
    match validated {
        Ok(summary) => {
            checked.rows = summary.rows;
            checked.cost_usd = summary.min_cost_usd(&c.engine.settings.defaults);
        }
        Err(ManifestError::Invalid { problems, .. }) => {
            checked.problems = problems
                .iter()
                .take(MAX_PROBLEMS)
                .map(ToString::to_string)
                .collect();
        }
        Err(e) => checked.problems.push(format!("line 1: column -: {e}")),
    }
    if checked.problems.is_empty() && c.engine.settings.probe {
        let estimate = tokio::time::timeout(
            PROBE_LIMIT,
            crate::probe::estimate_manifest(
                &path,
                &c.engine.settings.defaults,
                &c.engine.prober,
                crate::probe::DEFAULT_PROBES_IN_FLIGHT,
                &c.engine.settings.media.root,
            ),
        )
        .await;
        match estimate {
            Ok(Ok(e)) => {
                checked.probed = true;
                checked.cost_usd = e.total_usd();
                checked.problems = e.problems.into_iter().take(MAX_PROBLEMS).collect();
            }
            Ok(Err(e)) => checked.problems.push(format!("line 1: column -: {e}")),
            Err(_) => checked.problems.push(format!(
                "line 1: column audio_url: probing every row took longer than {} s; try again or check the audio hosts",
                PROBE_LIMIT.as_secs()
            )),
        }
    }
    if checked.problems.is_empty() {
        c.drops.checked(&token);
        checked.token = Some(token);
    } else if let Some(staged) = c.drops.take(&token) {
        remove_staged(&staged);
    }
    tracing::info!(file = %checked.file, rows = checked.rows, problems = checked.problems.len(), "manifest dropped in the console checked");
    Json(checked).into_response()
}

pub(crate) async fn accept(State(c): State<Console>, UrlPath(token): UrlPath<String>) -> Response {
    let Some(path) = c.drops.take(&token) else {
        return bad(
            StatusCode::NOT_FOUND,
            "this dropped manifest is no longer waiting: drop it again",
        );
    };
    let (store, folders) = (c.engine.store.clone(), c.engine.folders.clone());
    let simulated = c.engine.settings.simulate;
    let p2 = path.clone();
    let outcome =
        tokio::task::spawn_blocking(move || ingest::ingest_file(&store, &folders, &p2, simulated))
            .await;
    remove_staged(&path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match outcome {
        Ok(Ok(Outcome::Accepted(batch))) => {
            tracing::info!(file = %name, batch = %batch.name, rows = batch.total_rows, "manifest accepted from the console");
            c.engine.queue_changed();
            Json(Accepted {
                batch: Some(batch.name),
                rows: batch.total_rows,
                problems: Vec::new(),
            })
            .into_response()
        }
        Ok(Ok(Outcome::Rejected { problems })) => Json(Accepted {
            batch: None,
            rows: 0,
            problems: problems.iter().map(ToString::to_string).collect(),
        })
        .into_response(),
        Ok(Ok(Outcome::Unsettled)) => bad(
            StatusCode::CONFLICT,
            "the manifest could not be taken now (a file of that name is being taken): drop it again",
        ),
        Ok(Err(e)) => bad(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(e) => bad(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_being_checked_is_never_evicted() {
        let inbox = tempfile::tempdir().expect("tempdir");
        let drops = Drops::new(inbox.path().to_owned());
        let staged: Vec<(String, PathBuf)> = (0..MAX_STAGED)
            .map(|i| drops.stage(&format!("m{i}.csv"), b"id\n").expect("staged"))
            .collect();
        // All still being checked: a new one waits its turn, leaving nothing.
        let refused = drops.stage("late.csv", b"id\n").expect_err("no room");
        assert!(matches!(refused, StageError::Busy), "{refused}");
        assert_eq!(
            std::fs::read_dir(&drops.dir).expect("dir").count(),
            MAX_STAGED
        );
        // Once the second is checked, it is the one a newcomer evicts.
        drops.checked(&staged[1].0);
        let (late, _) = drops.stage("late.csv", b"id\n").expect("room");
        assert!(!staged[1].1.exists(), "the checked one went");
        assert!(
            staged[0].1.exists(),
            "the oldest, still being checked, stays"
        );
        assert!(drops.take(&staged[0].0).is_some());
        assert!(drops.take(&staged[1].0).is_none());
        assert!(drops.take(&late).is_some());
    }

    #[test]
    fn only_plain_csv_names() {
        assert_eq!(manifest_name("a.csv").as_deref(), Some("a.csv"));
        assert_eq!(manifest_name("C:\\x\\b.csv").as_deref(), Some("b.csv"));
        assert_eq!(manifest_name("../../etc/c.csv").as_deref(), Some("c.csv"));
        for bad in ["", ".csv", ".hidden.csv", "a.txt", "a.CSV.txt"] {
            assert!(manifest_name(bad).is_none(), "{bad}");
        }
    }
}
