//! The inbox watcher: decides when a manifest dropped into the inbox is
//! completely written, and hands it to [`ingest::ingest_file`], one at a time.
//!
//! A file is taken only when nobody holds it open (as far as inotify's
//! open/close events tell) and its size, modification time and inode held
//! still across two looks `settle` apart. Open/close tracking is what lets a
//! writer pause longer than `settle` between chunks; the two looks are the
//! safety net for what events cannot see (a close after a partial write,
//! network filesystems that send no events, a queue overflow).
//!
//! The watch starts before the first scan so nothing that arrives during the
//! scan is missed, and a periodic rescan catches whatever events were lost.
//!
//! This module must never take a file twice at once, never move or delete a
//! file itself (only `ingest` does), never touch a sub-folder of the inbox,
//! and never open a file itself: ingest takes it (rename into `.taking/`) and
//! opens it without following links or blocking on a FIFO.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{Event, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ingest::{self, Folders, IngestError, Outcome};
use crate::store::{BatchRecord, Store, StoreError};

/// How long a file must hold still before it is taken, unless configured.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(1);
/// How often the inbox is listed again in case events were lost, unless configured.
pub const DEFAULT_RESCAN_EVERY: Duration = Duration::from_secs(30);
/// How long a stop waits for an ingest already running. Ingest is crash-safe,
/// so giving up early loses nothing; waiting only avoids redoing the work.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Settings of [`watch`].
#[derive(Debug, Clone)]
pub struct InboxConfig {
    pub folders: Folders,
    /// How long size and modification time must hold still before a file is taken.
    pub settle: Duration,
    /// Interval of the safety-net listing of the inbox.
    pub rescan_every: Duration,
    /// Batches are submitted to the built-in simulator (recorded on the batch).
    pub simulated: bool,
}

impl InboxConfig {
    /// The default timings ([`DEFAULT_SETTLE`], [`DEFAULT_RESCAN_EVERY`]).
    pub fn new(folders: Folders, simulated: bool) -> Self {
        InboxConfig {
            folders,
            settle: DEFAULT_SETTLE,
            rescan_every: DEFAULT_RESCAN_EVERY,
            simulated,
        }
    }
}

/// Why the watcher could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// The inbox or the outbox does not exist and could not be created.
    #[error("cannot create the folder {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The inbox could not be watched (on Linux often the inotify limits:
    /// `fs.inotify.max_user_watches` / `max_user_instances`).
    #[error("cannot watch the inbox {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    /// The state database failed while finishing the ingests a stop
    /// interrupted.
    #[error("the state database failed while recovering interrupted ingests: {0}")]
    Recover(#[source] StoreError),
    /// The state database failed while a manifest was being ingested; the
    /// file stays in the inbox and is taken again after a restart.
    #[error("the state database failed while ingesting {file}: {source}")]
    Store {
        file: PathBuf,
        #[source]
        source: StoreError,
    },
}

/// Whether the inbox takes a file of this name: `*.csv` (the extension in
/// any case, since spreadsheet tools on some systems write `.CSV`), not
/// hidden, and not a temporary or backup name of a download tool or editor.
/// Only the file name is looked at; the caller checks the folder and the
/// file type.
pub fn is_candidate(path: &Path) -> bool {
    let Some(name) = path.file_name() else {
        return false;
    };
    let bytes = name.as_encoded_bytes();
    let hidden_or_temp = bytes.starts_with(b".")
        || bytes.starts_with(b"#")
        || bytes.ends_with(b"#")
        || bytes.ends_with(b"~");
    if hidden_or_temp {
        return false;
    }
    // `x.csv.part`, `x.csv.tmp`, `x.csv.swp` and the like end in another
    // extension, so requiring `.csv` last rules them out.
    path.extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("csv"))
        && path.file_stem().is_some_and(|stem| !stem.is_empty())
}

/// Watches the inbox until `shutdown` is cancelled: a scan at start, then
/// notify events plus a periodic rescan. Each file taken goes through
/// [`ingest::ingest_file`] on a blocking thread, one at a time; every
/// accepted batch is passed to `on_batch`.
///
/// Before the first scan it runs [`ingest::recover`] (idempotent, so a
/// caller that already ran it loses nothing) and passes the batches it
/// completes to `on_batch` too, since an interrupted ingest left in place
/// would otherwise make its file look like a duplicate.
///
/// Returns `Ok` after a stop, at worst a few seconds after the cancel (an
/// ingest already running gets that long to finish; it is crash-safe either
/// way). Returns an error only if the watch cannot start or the state
/// database fails.
pub async fn watch(
    store: Store,
    config: InboxConfig,
    on_batch: impl Fn(BatchRecord) + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> Result<(), InboxError> {
    let folders = config.folders.clone();
    for dir in [&folders.inbox, &folders.outbox] {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| InboxError::CreateDir {
                path: dir.clone(),
                source,
            })?;
    }
    // Canonical form so that event paths (built from the watched path) and
    // scanned paths agree, whatever relative path the user gave.
    let inbox = tokio::fs::canonicalize(&folders.inbox)
        .await
        .map_err(|source| InboxError::CreateDir {
            path: folders.inbox.clone(),
            source,
        })?;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = start_watcher(&inbox, tx)?;

    let recovered = {
        let (store, folders) = (store.clone(), folders.clone());
        tokio::task::spawn_blocking(move || ingest::recover(&store, &folders)).await
    };
    match recovered {
        Ok(Ok(batches)) => batches.into_iter().for_each(&on_batch),
        Ok(Err(IngestError::Store(source))) => return Err(InboxError::Recover(source)),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not finish recovering interrupted ingests; retried at next start")
        }
        Err(e) => tracing::error!(error = %e, "recovery of interrupted ingests panicked"),
    }

    let settle = config.settle;
    let mut tracker = Tracker::new(settle, config.rescan_every.max(settle));
    let mut ingests: JoinSet<(PathBuf, Result<Outcome, IngestError>)> = JoinSet::new();
    let mut rescan_at = Instant::now();
    let mut result = Ok(());

    loop {
        let now = Instant::now();
        if now >= rescan_at {
            rescan(&inbox, &mut tracker, &mut watcher, now).await;
            rescan_at = Instant::now() + config.rescan_every;
        }

        let due = tracker.due(Instant::now());
        if !due.is_empty() {
            for (path, look) in look_all(due).await {
                if let Some(retry) = tracker.observed(&path, look, Instant::now()) {
                    warn_retry(&path, &retry);
                }
            }
        }

        if ingests.is_empty()
            && let Some((path, stamp)) = tracker.next_ready()
        {
            let look = look_all(vec![path.clone()]).await.pop().map(|(_, l)| l);
            match look {
                Some(Look::File(now_stamp)) if now_stamp == stamp => {
                    tracing::info!(file = %path.display(), "taking manifest");
                    tracker.started(&path);
                    let (store, folders) = (store.clone(), folders.clone());
                    let simulated = config.simulated;
                    ingests.spawn_blocking(move || {
                        let outcome = ingest::ingest_file(&store, &folders, &path, simulated);
                        (path, outcome)
                    });
                }
                Some(look) => {
                    if let Some(retry) = tracker.observed(&path, look, Instant::now()) {
                        warn_retry(&path, &retry);
                    }
                }
                None => {}
            }
            // Something may already be ready for the next round.
            continue;
        }

        let wake = tracker
            .next_wake()
            .map_or(rescan_at, |at| at.min(rescan_at));
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(joined) = ingests.join_next() => {
                match joined {
                    Ok((path, outcome)) => {
                        if let Err(e) = finish(&mut tracker, &path, outcome, &on_batch) {
                            result = Err(e);
                            break;
                        }
                    }
                    Err(e) => {
                        // A panic in ingest; the file stays and is retried
                        // like an unreadable one.
                        tracing::error!(error = %e, "ingest panicked");
                        if let Some(path) = tracker.busy.clone() {
                            let retry = tracker.failed(&path, Instant::now());
                            warn_retry(&path, &Retry { reason: "ingest panicked".into(), ..retry });
                        }
                    }
                }
            }
            signal = rx.recv() => {
                let mut next = signal;
                let mut overflow = false;
                while let Some(signal) = next {
                    match signal {
                        Signal::Rescan => overflow = true,
                        other => tracker.signal(other, Instant::now()),
                    }
                    next = rx.try_recv().ok();
                }
                if overflow {
                    tracing::info!("file events were lost; rescanning the inbox");
                    tracker.forget_opens(Instant::now());
                    rescan_at = Instant::now();
                }
            }
            () = tokio::time::sleep_until(wake) => {}
        }
    }

    drop(watcher);
    if !ingests.is_empty() {
        match tokio::time::timeout(STOP_GRACE, ingests.join_next()).await {
            Ok(Some(Ok((path, outcome)))) => {
                if let Err(e) = finish(&mut tracker, &path, outcome, &on_batch) {
                    result = result.and(Err(e));
                }
            }
            Ok(_) => {}
            Err(_) => tracing::warn!(
                "an ingest still running at stop was left to finish on its own; a file it did not finish is taken again at the next start"
            ),
        }
    }
    result
}

fn start_watcher(
    inbox: &Path,
    tx: mpsc::UnboundedSender<Signal>,
) -> Result<notify::RecommendedWatcher, InboxError> {
    let watch_err = |source| InboxError::Watch {
        path: inbox.to_owned(),
        source,
    };
    let root = inbox.to_owned();
    // A writer emits one modify event per write call; only the first of a
    // run matters (the stability check catches the rest), so runs are
    // collapsed here, on notify's thread, to keep the channel short.
    let mut last_changed: Option<PathBuf> = None;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        for signal in translate(event, &root) {
            match &signal {
                Signal::Changed(p) if last_changed.as_ref() == Some(p) => continue,
                Signal::Changed(p) => last_changed = Some(p.clone()),
                other if other.path() == last_changed.as_deref() => last_changed = None,
                _ => {}
            }
            // Fails only once the loop has ended: nothing left to tell.
            let _ = tx.send(signal);
        }
    })
    .map_err(watch_err)?;
    watcher
        .watch(inbox, RecursiveMode::NonRecursive)
        .map_err(watch_err)?;
    Ok(watcher)
}

/// Lists the inbox; recreates and watches it again if it was removed.
async fn rescan(
    inbox: &Path,
    tracker: &mut Tracker,
    watcher: &mut notify::RecommendedWatcher,
    now: Instant,
) {
    let dir = inbox.to_owned();
    let listed = tokio::task::spawn_blocking(move || list(&dir)).await;
    match listed {
        Ok(Ok(paths)) => paths.into_iter().for_each(|p| tracker.discovered(p, now)),
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
            tracing::warn!(inbox = %inbox.display(), "the inbox folder vanished; creating it again");
            let recreated = std::fs::create_dir_all(inbox);
            let _ = watcher.unwatch(inbox);
            let watched = watcher.watch(inbox, RecursiveMode::NonRecursive);
            if let Err(e) = recreated.map_err(notify::Error::io).and(watched) {
                tracing::warn!(inbox = %inbox.display(), error = %e, "cannot watch the inbox again; relying on the periodic rescan");
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(inbox = %inbox.display(), error = %e, "cannot list the inbox; trying again at the next rescan");
        }
        Err(e) => tracing::error!(error = %e, "inbox listing panicked"),
    }
}

/// The candidate files directly in `dir`. Sub-folders, FIFOs and sockets are
/// left out here already (no extra system call: the entry carries its type).
fn list(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if !is_candidate(&path) {
            continue;
        }
        match entry.file_type() {
            Ok(t) if t.is_file() || t.is_symlink() => out.push(path),
            Ok(_) => {}
            // Unknown type: let the stat decide.
            Err(_) => out.push(path),
        }
    }
    Ok(out)
}

/// Looks at each path on a blocking thread.
async fn look_all(paths: Vec<PathBuf>) -> Vec<(PathBuf, Look)> {
    let fallback = paths.clone();
    tokio::task::spawn_blocking(move || {
        paths
            .into_iter()
            .map(|p| {
                let look = Look::at(&p);
                (p, look)
            })
            .collect()
    })
    .await
    .unwrap_or_else(|e| {
        let msg = e.to_string();
        fallback
            .into_iter()
            .map(|p| (p, Look::Failed(io::Error::other(msg.clone()))))
            .collect()
    })
}

fn finish(
    tracker: &mut Tracker,
    path: &Path,
    outcome: Result<Outcome, IngestError>,
    on_batch: &impl Fn(BatchRecord),
) -> Result<(), InboxError> {
    let now = Instant::now();
    match outcome {
        Ok(Outcome::Accepted(batch)) => {
            tracing::info!(file = %path.display(), batch = %batch.name, rows = batch.total_rows, "manifest accepted");
            tracker.left(path, now);
            on_batch(batch);
        }
        // `ingest::reject` has logged the file and its count of problems.
        Ok(Outcome::Rejected { .. }) => tracker.left(path, now),
        Ok(Outcome::Unsettled) => {
            let retry = tracker.failed(path, now);
            warn_retry(
                path,
                &Retry {
                    reason: "changed or vanished while being read".into(),
                    ..retry
                },
            );
        }
        Err(IngestError::Io { source, .. }) => {
            let retry = tracker.failed(path, now);
            warn_retry(
                path,
                &Retry {
                    reason: source.to_string(),
                    ..retry
                },
            );
        }
        Err(IngestError::Store(source)) => {
            tracker.failed(path, now);
            return Err(InboxError::Store {
                file: path.to_owned(),
                source,
            });
        }
    }
    Ok(())
}

fn warn_retry(path: &Path, retry: &Retry) {
    // Powers of two only: a file that stays unreadable for a day should not
    // fill the log, but its first failures should be seen.
    if retry.attempt.is_power_of_two() {
        tracing::warn!(
            file = %path.display(),
            attempt = retry.attempt,
            retry_in = ?retry.delay,
            "cannot take manifest now: {}; will retry",
            retry.reason
        );
    } else {
        tracing::debug!(file = %path.display(), attempt = retry.attempt, retry_in = ?retry.delay, "retry scheduled: {}", retry.reason);
    }
}

// ---- events ----

/// What the loop needs to know from one notify event, for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Signal {
    /// Created or renamed into the inbox.
    Appeared(PathBuf),
    /// Opened by anyone (including ingest itself).
    Open(PathBuf),
    /// Closed; `wrote` when it had been opened for writing.
    Close { path: PathBuf, wrote: bool },
    /// Its content changed.
    Changed(PathBuf),
    /// Permissions or times changed: worth trying again at once.
    Touched(PathBuf),
    /// Removed or renamed away.
    Gone(PathBuf),
    /// Events were lost: list the inbox again.
    Rescan,
}

impl Signal {
    fn path(&self) -> Option<&Path> {
        match self {
            Signal::Appeared(p)
            | Signal::Open(p)
            | Signal::Changed(p)
            | Signal::Touched(p)
            | Signal::Gone(p)
            | Signal::Close { path: p, .. } => Some(p),
            Signal::Rescan => None,
        }
    }
}

fn translate(event: notify::Result<Event>, inbox: &Path) -> Vec<Signal> {
    let event = match event {
        Ok(event) => event,
        Err(e) => {
            tracing::warn!(error = %e, "file watch error; rescanning the inbox");
            return vec![Signal::Rescan];
        }
    };
    if event.need_rescan() {
        return vec![Signal::Rescan];
    }
    let make: fn(PathBuf) -> Signal = match event.kind {
        EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
            Signal::Appeared
        }
        // inotify reports both halves separately as From and To.
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => return Vec::new(),
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) | EventKind::Remove(_) => {
            Signal::Gone
        }
        EventKind::Modify(ModifyKind::Metadata(_)) => Signal::Touched,
        EventKind::Modify(ModifyKind::Name(_)) => Signal::Appeared,
        EventKind::Modify(_) => Signal::Changed,
        EventKind::Access(AccessKind::Open(_)) => Signal::Open,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            |path| Signal::Close { path, wrote: true }
        }
        EventKind::Access(AccessKind::Close(_)) => |path| Signal::Close { path, wrote: false },
        EventKind::Access(_) => return Vec::new(),
        // Unknown to notify: let a look at the file decide.
        EventKind::Any | EventKind::Other => Signal::Appeared,
    };
    let gone = matches!(
        event.kind,
        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From))
    );
    let mut out = Vec::new();
    for path in event.paths {
        if path == inbox {
            // The inbox itself was removed or moved: the listing recreates it.
            if gone {
                out.push(Signal::Rescan);
            }
        } else if path.parent() == Some(inbox) && is_candidate(&path) {
            out.push(make(path));
        }
    }
    out
}

// ---- the settle logic, free of I/O and of the clock ----

/// What identifies a version of a file's content without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    /// A file replaced under the same name (rename over) has another inode.
    inode: u64,
}

/// One look at a path.
#[derive(Debug)]
enum Look {
    File(Stamp),
    /// Gone: nothing to take (a rescan finds it again).
    Missing,
    /// A folder, FIFO or socket: never opened.
    NotAFile,
    Failed(io::Error),
}

impl Look {
    /// Never follows a symlink: a link is looked at itself, and taken so
    /// that ingest can refuse it with a reason.
    fn at(path: &Path) -> Look {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_file() || m.file_type().is_symlink() => Look::File(Stamp {
                len: m.len(),
                modified: m.modified().ok(),
                inode: inode(&m),
            }),
            Ok(_) => Look::NotAFile,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Look::Missing,
            Err(e) => Look::Failed(e),
        }
    }
}

#[cfg(unix)]
fn inode(m: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(m)
}

#[cfg(not(unix))]
fn inode(_: &std::fs::Metadata) -> u64 {
    0
}

/// A retry scheduled after a failure.
#[derive(Debug, Clone)]
struct Retry {
    attempt: u32,
    delay: Duration,
    reason: String,
}

#[derive(Debug)]
struct Entry {
    /// Arrival order: files are taken oldest first.
    first_seen: Instant,
    /// Opens minus closes seen; above zero someone may still be writing.
    opens: u32,
    /// The last look and when it was taken.
    stamp: Option<(Stamp, Instant)>,
    /// When to look next; `None` while ready or waiting for a close.
    due: Option<Instant>,
    /// Held still for `settle` with nobody holding it open.
    ready: bool,
    /// Failed attempts in a row, for the backoff.
    failures: u32,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Entry {
            first_seen: now,
            opens: 0,
            stamp: None,
            due: Some(now),
            ready: false,
            failures: 0,
        }
    }

    /// Forgets what was seen: the next look starts a new settle period.
    fn restart(&mut self, at: Instant) {
        self.stamp = None;
        self.ready = false;
        self.due = Some(at);
    }
}

/// The pending candidates with their last look; owned by the watch loop.
#[derive(Debug)]
struct Tracker {
    settle: Duration,
    max_backoff: Duration,
    entries: HashMap<PathBuf, Entry>,
    /// The file being ingested.
    busy: Option<PathBuf>,
}

impl Tracker {
    fn new(settle: Duration, max_backoff: Duration) -> Self {
        Tracker {
            settle,
            max_backoff,
            entries: HashMap::new(),
            busy: None,
        }
    }

    fn entry(&mut self, path: PathBuf, now: Instant) -> &mut Entry {
        self.entries.entry(path).or_insert_with(|| Entry::new(now))
    }

    /// Found by listing the inbox.
    fn discovered(&mut self, path: PathBuf, now: Instant) {
        if self.busy.as_ref() != Some(&path) {
            self.entry(path, now);
        }
    }

    fn signal(&mut self, signal: Signal, now: Instant) {
        match signal {
            Signal::Appeared(path) => {
                let e = self.entry(path, now);
                // A rename over the name brings another file, with no open
                // writer of its own that we know of.
                e.opens = 0;
                e.failures = 0;
                e.restart(now);
            }
            Signal::Open(path) => {
                let e = self.entry(path, now);
                e.opens += 1;
                e.ready = false;
            }
            Signal::Close { path, wrote } => {
                if !wrote && !self.entries.contains_key(&path) {
                    return;
                }
                let e = self.entry(path, now);
                e.opens = e.opens.saturating_sub(1);
                if wrote {
                    e.failures = 0;
                    e.restart(now);
                } else if e.opens == 0 && e.due.is_none() && !e.ready {
                    e.due = Some(now);
                }
            }
            Signal::Changed(path) => self.entry(path, now).restart(now),
            Signal::Touched(path) => {
                let e = self.entry(path, now);
                e.failures = 0;
                e.restart(now);
            }
            Signal::Gone(path) => {
                self.entries.remove(&path);
            }
            Signal::Rescan => {}
        }
    }

    /// Events were lost: open counts can no longer be trusted, so fall back
    /// to the stability check alone.
    fn forget_opens(&mut self, now: Instant) {
        for e in self.entries.values_mut() {
            e.opens = 0;
            if e.due.is_none() && !e.ready {
                e.due = Some(now);
            }
        }
    }

    /// Paths to look at now.
    fn due(&self, now: Instant) -> Vec<PathBuf> {
        self.entries
            .iter()
            .filter(|(p, e)| {
                !e.ready && e.due.is_some_and(|d| d <= now) && self.busy.as_ref() != Some(*p)
            })
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Records a look; returns the retry scheduled if the look failed.
    fn observed(&mut self, path: &Path, look: Look, now: Instant) -> Option<Retry> {
        let settle = self.settle;
        let e = self.entries.get_mut(path)?;
        if e.opens > 0 {
            e.ready = false;
            e.due = None;
            return None;
        }
        match look {
            Look::Missing | Look::NotAFile => {
                self.entries.remove(path);
                None
            }
            Look::Failed(err) => {
                let mut retry = self.failed(path, now);
                retry.reason = err.to_string();
                Some(retry)
            }
            Look::File(stamp) => {
                match e.stamp {
                    Some((seen, at)) if seen == stamp && now.duration_since(at) >= settle => {
                        e.ready = true;
                        e.due = None;
                    }
                    Some((seen, at)) if seen == stamp => e.due = Some(at + settle),
                    _ => {
                        e.stamp = Some((stamp, now));
                        e.ready = false;
                        e.due = Some(now + settle);
                    }
                }
                None
            }
        }
    }

    /// The oldest ready file and the stamp it settled at.
    fn next_ready(&self) -> Option<(PathBuf, Stamp)> {
        if self.busy.is_some() {
            return None;
        }
        self.entries
            .iter()
            .filter(|(_, e)| e.ready && e.opens == 0)
            .filter_map(|(p, e)| e.stamp.map(|(s, _)| (e.first_seen, p, s)))
            .min_by_key(|(first, p, _)| (*first, (*p).clone()))
            .map(|(_, p, s)| (p.clone(), s))
    }

    fn started(&mut self, path: &Path) {
        self.busy = Some(path.to_owned());
        if let Some(e) = self.entries.get_mut(path) {
            e.ready = false;
            e.due = None;
        }
    }

    /// The file left the inbox (accepted or rejected). A file of the same
    /// name may have arrived meanwhile: look again rather than forget.
    fn left(&mut self, path: &Path, now: Instant) {
        self.busy = None;
        if let Some(e) = self.entries.get_mut(path) {
            e.failures = 0;
            e.restart(now);
        }
    }

    /// The file could not be taken now: try again after a growing delay,
    /// capped at the rescan interval.
    fn failed(&mut self, path: &Path, now: Instant) -> Retry {
        if self.busy.as_deref() == Some(path) {
            self.busy = None;
        }
        let (settle, max) = (self.settle, self.max_backoff);
        let e = self.entry(path.to_owned(), now);
        e.failures = e.failures.saturating_add(1);
        let delay = settle
            .saturating_mul(1u32 << (e.failures - 1).min(16))
            .min(max);
        e.restart(now + delay);
        Retry {
            attempt: e.failures,
            delay,
            reason: String::new(),
        }
    }

    /// When the loop must next look at something (ready files are taken
    /// without waiting).
    fn next_wake(&self) -> Option<Instant> {
        self.entries
            .iter()
            .filter(|(p, _)| self.busy.as_ref() != Some(*p))
            .filter_map(|(_, e)| e.due)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_millis(300);

    fn stamp(len: u64) -> Stamp {
        Stamp {
            len,
            modified: None,
            inode: 7,
        }
    }

    fn p(name: &str) -> PathBuf {
        PathBuf::from("/in").join(name)
    }

    #[test]
    fn candidates_by_name() {
        for yes in ["a.csv", "A.CSV", "batch 1.Csv", "a.b.csv", "x#y.csv"] {
            assert!(is_candidate(Path::new(yes)), "{yes}");
        }
        for no in [
            ".hidden.csv",
            ".csv",
            "a.txt",
            "b.csv.part",
            "c.csv~",
            "d.csv.tmp",
            ".e.csv.swp",
            "e.csv.swx",
            "#f.csv#",
            "csv",
            "g.csvx",
            "",
        ] {
            assert!(!is_candidate(Path::new(no)), "{no}");
        }
    }

    #[test]
    fn events_outside_the_inbox_or_for_other_names_are_dropped() {
        let inbox = Path::new("/in");
        let ev =
            |kind, path: &str| translate(Ok(Event::new(kind).add_path(PathBuf::from(path))), inbox);
        let close = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(
            ev(close, "/in/a.csv"),
            vec![Signal::Close {
                path: p("a.csv"),
                wrote: true
            }]
        );
        assert!(ev(close, "/in/sub/a.csv").is_empty());
        assert!(ev(close, "/in/rejected/a.csv").is_empty());
        assert!(ev(close, "/in/.a.csv.tmp").is_empty());
        assert_eq!(
            ev(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/in/a.csv"
            ),
            vec![Signal::Appeared(p("a.csv"))]
        );
        assert_eq!(
            ev(EventKind::Remove(notify::event::RemoveKind::Folder), "/in"),
            vec![Signal::Rescan]
        );
        let overflow = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(translate(Ok(overflow), inbox), vec![Signal::Rescan]);
    }

    #[test]
    fn taken_after_holding_still_for_settle() {
        let t0 = Instant::now();
        let mut t = Tracker::new(SETTLE, Duration::from_secs(1));
        t.discovered(p("a.csv"), t0);
        assert_eq!(t.due(t0), vec![p("a.csv")]);
        assert!(t.observed(&p("a.csv"), Look::File(stamp(10)), t0).is_none());
        assert!(t.next_ready().is_none());
        assert!(t.due(t0 + SETTLE / 2).is_empty());
        assert_eq!(t.next_wake(), Some(t0 + SETTLE));
        // Grew meanwhile: a new settle period starts.
        t.observed(&p("a.csv"), Look::File(stamp(20)), t0 + SETTLE);
        assert!(t.next_ready().is_none());
        t.observed(&p("a.csv"), Look::File(stamp(20)), t0 + SETTLE * 2);
        assert_eq!(t.next_ready(), Some((p("a.csv"), stamp(20))));
    }

    #[test]
    fn an_open_file_waits_for_its_close_however_long_the_pause() {
        let t0 = Instant::now();
        let mut t = Tracker::new(SETTLE, Duration::from_secs(1));
        t.signal(Signal::Appeared(p("a.csv")), t0);
        t.signal(Signal::Open(p("a.csv")), t0);
        t.signal(Signal::Changed(p("a.csv")), t0);
        // The writer pauses far longer than settle: still not taken.
        for i in 0..10 {
            let now = t0 + SETTLE * i;
            for path in t.due(now) {
                t.observed(&path, Look::File(stamp(5)), now);
            }
            assert!(t.next_ready().is_none());
        }
        assert_eq!(t.next_wake(), None, "waits for the close, not a timer");
        let closed = t0 + SETTLE * 10;
        t.signal(
            Signal::Close {
                path: p("a.csv"),
                wrote: true,
            },
            closed,
        );
        assert_eq!(t.due(closed), vec![p("a.csv")]);
        t.observed(&p("a.csv"), Look::File(stamp(9)), closed);
        t.observed(&p("a.csv"), Look::File(stamp(9)), closed + SETTLE);
        assert_eq!(t.next_ready(), Some((p("a.csv"), stamp(9))));
    }

    #[test]
    fn lost_events_fall_back_to_the_stability_check() {
        let t0 = Instant::now();
        let mut t = Tracker::new(SETTLE, Duration::from_secs(1));
        t.signal(Signal::Open(p("a.csv")), t0);
        t.observed(&p("a.csv"), Look::File(stamp(5)), t0);
        assert_eq!(t.next_wake(), None);
        t.forget_opens(t0 + SETTLE);
        t.observed(&p("a.csv"), Look::File(stamp(5)), t0 + SETTLE);
        t.observed(&p("a.csv"), Look::File(stamp(5)), t0 + SETTLE * 2);
        assert!(t.next_ready().is_some());
    }

    #[test]
    fn one_at_a_time_oldest_first() {
        let t0 = Instant::now();
        let mut t = Tracker::new(SETTLE, Duration::from_secs(1));
        t.discovered(p("b.csv"), t0);
        t.discovered(p("a.csv"), t0 + Duration::from_millis(1));
        for now in [t0 + SETTLE, t0 + SETTLE * 3] {
            for path in t.due(now) {
                t.observed(&path, Look::File(stamp(1)), now);
            }
        }
        assert_eq!(t.next_ready().map(|r| r.0), Some(p("b.csv")));
        t.started(&p("b.csv"));
        assert!(t.next_ready().is_none(), "never two at once");
        // Events about the file being ingested do not make it due again.
        t.signal(Signal::Open(p("b.csv")), t0 + SETTLE * 3);
        t.discovered(p("b.csv"), t0 + SETTLE * 3);
        assert!(!t.due(t0 + SETTLE * 4).contains(&p("b.csv")));
        t.signal(Signal::Gone(p("b.csv")), t0 + SETTLE * 4);
        t.left(&p("b.csv"), t0 + SETTLE * 4);
        assert_eq!(t.next_ready().map(|r| r.0), Some(p("a.csv")));
        assert!(!t.entries.contains_key(&p("b.csv")));
    }

    #[test]
    fn failures_back_off_up_to_the_cap_and_a_change_retries_at_once() {
        let t0 = Instant::now();
        let cap = Duration::from_secs(1);
        let mut t = Tracker::new(SETTLE, cap);
        t.discovered(p("a.csv"), t0);
        t.started(&p("a.csv"));
        let delays: Vec<_> = (0..4).map(|_| t.failed(&p("a.csv"), t0).delay).collect();
        assert_eq!(
            delays,
            [SETTLE, SETTLE * 2, cap, cap],
            "grows, capped at the rescan interval"
        );
        assert!(t.busy.is_none());
        assert!(t.due(t0 + SETTLE).is_empty());
        assert_eq!(t.due(t0 + cap), vec![p("a.csv")]);
        // Our own read's close does not cut the backoff short.
        t.signal(Signal::Open(p("a.csv")), t0);
        t.signal(
            Signal::Close {
                path: p("a.csv"),
                wrote: false,
            },
            t0,
        );
        assert!(t.due(t0).is_empty());
        // A chmod does.
        t.signal(Signal::Touched(p("a.csv")), t0);
        assert_eq!(t.due(t0), vec![p("a.csv")]);
        let retry = t.observed(
            &p("a.csv"),
            Look::Failed(io::Error::from(io::ErrorKind::PermissionDenied)),
            t0,
        );
        assert_eq!(retry.map(|r| r.attempt), Some(1));
    }

    #[test]
    fn vanished_and_non_files_are_dropped() {
        let t0 = Instant::now();
        let mut t = Tracker::new(SETTLE, Duration::from_secs(1));
        t.discovered(p("a.csv"), t0);
        t.discovered(p("fifo.csv"), t0);
        t.observed(&p("a.csv"), Look::Missing, t0);
        t.observed(&p("fifo.csv"), Look::NotAFile, t0);
        assert!(t.entries.is_empty());
        // A read-only close of a file never tracked creates nothing.
        t.signal(
            Signal::Close {
                path: p("x.csv"),
                wrote: false,
            },
            t0,
        );
        assert!(t.entries.is_empty());
    }
}
