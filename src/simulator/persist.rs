//! The simulator's task table on disk.
//!
//! The in-process simulator of `run --simulate` dies with the daemon. Without
//! this file a daemon restarted after a crash would poll tasks nobody knows
//! any more; with it, a crash looks to the simulator as it would to the real
//! service: a client that went away and came back, its tasks still there
//! (and finished meanwhile, by the wall clock).
//!
//! The format is JSON lines: a header (format version, the secret that signs
//! result URLs, the listening address), then one line per task, appended
//! when the task is created, before its submit is answered. On open, and
//! whenever the appended lines outnumber the live tasks, the file is
//! compacted: tasks that ended more than [`KEEP_ENDED`] ago and all but the
//! newest [`MAX_TASKS`] are dropped, and the rest is rewritten atomically
//! (temporary file, fsync, rename).
//!
//! It must never fsync on every submit: what `write` took survives a killed
//! process, which is the failure this file is for, and against power loss a
//! simulator promises nothing. Only a compaction (once per [`COMPACT_MIN`]
//! appends at most) syncs, as any atomic rewrite does.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::state::Outcome;
use crate::fsutil;

/// How long an ended task stays known: as long as a result URL may live.
pub(crate) const KEEP_ENDED: Duration = Duration::from_secs(24 * 3600);
/// The most tasks kept, newest first.
pub(crate) const MAX_TASKS: usize = 100_000;
/// Appended lines tolerated before a compaction, at the least.
const COMPACT_MIN: usize = 10_000;
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    v: u32,
    secret: String,
    addr: Option<SocketAddr>,
}

/// One task with its instants as wall-clock milliseconds (an `Instant` means
/// nothing to another process).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SavedTask {
    pub id: String,
    pub image_urls: Vec<String>,
    pub audio_url: String,
    pub callback_url: Option<String>,
    pub created_ms: u64,
    pub processing_ms: u64,
    pub ends_ms: u64,
    pub outcome: Outcome,
}

/// What a previous run left.
#[derive(Debug, Default)]
pub(crate) struct Saved {
    pub secret: Option<String>,
    pub addr: Option<SocketAddr>,
    pub tasks: Vec<SavedTask>,
}

/// Reads `path`. A missing file is an empty table. A line that does not
/// parse is skipped: only the last one can be torn, by a crash mid-write.
/// A header of another format version discards the file's tasks.
pub(crate) fn load(path: &Path) -> io::Result<Saved> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Saved::default()),
        Err(e) => return Err(e),
    };
    let mut lines = io::BufReader::new(file).lines();
    let Some(first) = lines.next().transpose()? else {
        return Ok(Saved::default());
    };
    let header = match serde_json::from_str::<Header>(&first) {
        Ok(h) if h.v == VERSION => h,
        _ => return Ok(Saved::default()),
    };
    let mut tasks = Vec::new();
    for line in lines {
        if let Ok(task) = serde_json::from_str::<SavedTask>(&line?) {
            tasks.push(task);
        }
    }
    Ok(Saved {
        secret: Some(header.secret),
        addr: header.addr,
        tasks,
    })
}

/// Drops tasks that ended more than [`KEEP_ENDED`] before `now_ms`, then all
/// but the newest [`MAX_TASKS`]; keeps the order (oldest first).
pub(crate) fn prune(tasks: &mut Vec<SavedTask>, now_ms: u64) {
    let horizon = now_ms.saturating_sub(u64::try_from(KEEP_ENDED.as_millis()).unwrap_or(u64::MAX));
    tasks.retain(|t| t.ends_ms >= horizon);
    if tasks.len() > MAX_TASKS {
        let extra = tasks.len() - MAX_TASKS;
        tasks.drain(..extra);
    }
}

/// The open file, appended to as tasks are created.
pub(crate) struct Journal {
    path: PathBuf,
    file: File,
    header: Header,
    appended: usize,
}

impl Journal {
    /// Writes a fresh file holding `tasks` (pruned already) and opens it for
    /// appending.
    pub(super) fn create(
        path: &Path,
        secret: &str,
        addr: SocketAddr,
        tasks: &[SavedTask],
    ) -> io::Result<Journal> {
        let header = Header {
            v: VERSION,
            secret: secret.to_owned(),
            addr: Some(addr),
        };
        write_all(path, &header, tasks)?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Journal {
            path: path.to_owned(),
            file,
            header,
            appended: 0,
        })
    }

    /// Appends one task: one `write` of one whole line.
    pub(super) fn append(&mut self, task: &SavedTask) -> io::Result<()> {
        let mut line = serde_json::to_vec(task).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.appended += 1;
        Ok(())
    }

    /// Whether the appended lines call for a compaction, given `live` tasks.
    pub(super) fn wants_compaction(&self, live: usize) -> bool {
        self.appended > live.max(COMPACT_MIN)
    }

    /// Replaces the file with `tasks` (pruned already), atomically.
    pub(super) fn rewrite(&mut self, tasks: &[SavedTask]) -> io::Result<()> {
        write_all(&self.path, &self.header, tasks)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.appended = 0;
        Ok(())
    }
}

fn write_all(path: &Path, header: &Header, tasks: &[SavedTask]) -> io::Result<()> {
    fsutil::write_atomic_with(path, |w| {
        serde_json::to_writer(&mut *w, header).map_err(io::Error::other)?;
        w.write_all(b"\n")?;
        for t in tasks {
            serde_json::to_writer(&mut *w, t).map_err(io::Error::other)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, ends_ms: u64) -> SavedTask {
        SavedTask {
            id: id.into(),
            image_urls: vec!["https://a.test/p.png".into()],
            audio_url: "https://a.test/a.mp3".into(),
            callback_url: None,
            created_ms: ends_ms.saturating_sub(10),
            processing_ms: ends_ms.saturating_sub(5),
            ends_ms,
            outcome: Outcome::Success {
                results: 1,
                pad: None,
            },
        }
    }

    #[test]
    fn round_trip_skips_a_torn_last_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sim.jsonl");
        let addr: SocketAddr = "127.0.0.1:4567".parse().expect("addr");
        let mut j = Journal::create(&path, "s3cret", addr, &[task("a", 100)]).expect("create");
        j.append(&task("b", 200)).expect("append");
        drop(j);
        // A crash in the middle of a line.
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"{\"id\":\"c\",\"ima").expect("torn");
        let saved = load(&path).expect("load");
        assert_eq!(saved.secret.as_deref(), Some("s3cret"));
        assert_eq!(saved.addr, Some(addr));
        let ids: Vec<&str> = saved.tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn missing_or_foreign_files_are_empty_tables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sim.jsonl");
        assert!(load(&path).expect("missing").tasks.is_empty());
        std::fs::write(&path, "{\"v\":999,\"secret\":\"x\",\"addr\":null}\n{}\n").expect("w");
        let saved = load(&path).expect("foreign");
        assert!(saved.tasks.is_empty() && saved.secret.is_none());
    }

    #[test]
    fn prune_drops_long_ended_tasks_and_keeps_the_newest() {
        let day = u64::try_from(KEEP_ENDED.as_millis()).expect("fits");
        let now = 10 * day;
        let mut tasks = vec![task("old", now - day - 1), task("recent", now - day + 1)];
        tasks.push(task("running", now + 1000));
        prune(&mut tasks, now);
        let ids: Vec<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["recent", "running"]);

        let mut many: Vec<SavedTask> = (0..MAX_TASKS + 3)
            .map(|i| task(&i.to_string(), now))
            .collect();
        prune(&mut many, now);
        assert_eq!(many.len(), MAX_TASKS);
        assert_eq!(many[0].id, "3");
    }
}
