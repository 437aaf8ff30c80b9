//! One manifest file into one batch, or into `INBOX/rejected/`.
//!
//! The order makes a crash at any instant safe: the batch is recorded as
//! `Ingesting` and flushed; the manifest is copied whole into
//! `OUTBOX/BATCH/manifest.csv` (temp file, fsync, rename) and its bytes are
//! checked against what was validated; the batch becomes `Active` and is
//! flushed; only then does the file leave the inbox. [`recover`] finishes or
//! undoes whatever a crash interrupted, and a file still in the inbox is
//! simply ingested again.
//!
//! A file is taken the maildir way: first renamed into the private folder
//! `INBOX/.taking/`, then opened there without following a symlink and
//! without blocking (a FIFO), and the open handle is checked to be a regular
//! file; it is read only through that handle. A symlink is rejected with a
//! reason, never followed. A file left in `.taking/` by a crash is finished
//! or put back in the inbox by [`recover`].

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::fsutil;
use crate::manifest::{self, ManifestError, Problem};
use crate::media::{MediaCheck, MediaSettings, table};
use crate::store::{BatchPhase, BatchRecord, Begin, Store, StoreError};

/// Name of the folder under the inbox that holds rejected manifests.
pub const REJECTED_DIR: &str = "rejected";
/// Name of the private folder under the inbox where a file is taken.
pub const TAKING_DIR: &str = ".taking";
/// Name of the accepted manifest inside a batch folder.
pub const MANIFEST_NAME: &str = "manifest.csv";

/// The folders ingest works between.
#[derive(Debug, Clone)]
pub struct Folders {
    pub inbox: PathBuf,
    pub outbox: PathBuf,
    /// Where local media files are looked for and how they are published.
    pub media: MediaSettings,
}

impl Folders {
    /// The folders with the default media settings (root `INBOX/media`, not
    /// published: manifests with local files are rejected).
    pub fn new(inbox: PathBuf, outbox: PathBuf) -> Folders {
        let media = MediaSettings {
            root: MediaSettings::default_root(&inbox),
            publishing: crate::media::Publishing::Off,
        };
        Folders {
            inbox,
            outbox,
            media,
        }
    }

    pub fn batch_dir(&self, batch: &str) -> PathBuf {
        self.outbox.join(batch)
    }

    pub fn manifest_of(&self, batch: &str) -> PathBuf {
        self.batch_dir(batch).join(MANIFEST_NAME)
    }

    pub fn rejected_dir(&self) -> PathBuf {
        self.inbox.join(REJECTED_DIR)
    }

    pub fn taking_dir(&self) -> PathBuf {
        self.inbox.join(TAKING_DIR)
    }
}

/// What became of one file.
#[derive(Debug)]
pub enum Outcome {
    Accepted(BatchRecord),
    /// Moved to `rejected/` with its errors file.
    Rejected {
        problems: Vec<Problem>,
    },
    /// The file changed or vanished while being read; try again later.
    Unsettled,
}

/// Why a file could not be ingested now. The file stays where it is.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> IngestError + '_ {
    move |source| IngestError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Ingests the manifest at `file` (a `*.csv` directly in the inbox).
pub fn ingest_file(
    store: &Store,
    folders: &Folders,
    file: &Path,
    simulated: bool,
) -> Result<Outcome, IngestError> {
    let Some(taken) = take(folders, file)? else {
        return Ok(Outcome::Unsettled);
    };
    let outcome = ingest_taken(store, folders, &taken, simulated);
    // Whatever did not end the file's stay (a retry later) puts it back.
    if matches!(outcome, Ok(Outcome::Unsettled) | Err(_)) && taken.symlink_metadata().is_ok() {
        put_back(&taken, file);
    }
    // The private folder goes when empty (it fails harmlessly otherwise).
    let _ = fs::remove_dir(folders.taking_dir());
    outcome
}

/// Renames `file` into the private folder; `None` when it vanished.
fn take(folders: &Folders, file: &Path) -> Result<Option<PathBuf>, IngestError> {
    let dir = private_dir(folders)?;
    let Some(name) = file.file_name() else {
        return Ok(None);
    };
    let taken = dir.join(name);
    if taken.symlink_metadata().is_ok() {
        // A file of that name taken earlier could not be put back: never
        // rename over it (the folder is private: no one else writes there).
        tracing::warn!(file = %file.display(), taken = %taken.display(), "a file of this name is still in the private folder; move it out to let this one be taken");
        return Ok(None);
    }
    match fs::rename(file, &taken) {
        Ok(()) => Ok(Some(taken)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at(file)(e)),
    }
}

/// `INBOX/.taking/`, created private; refused if something else (a link)
/// sits at its name.
fn private_dir(folders: &Folders) -> Result<PathBuf, IngestError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = folders.taking_dir();
    match fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(dir),
        Ok(_) => Err(io_at(&dir)(io::Error::other(
            "is not a folder (a link?); remove it so that manifests can be taken",
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(io_at(&dir))?;
            Ok(dir)
        }
        Err(e) => Err(io_at(&dir)(e)),
    }
}

/// Moves a taken file back to the inbox (to be taken again later).
fn put_back(taken: &Path, to: &Path) {
    if to.symlink_metadata().is_ok() {
        tracing::warn!(file = %taken.display(), "cannot put a manifest back: another file has its name in the inbox; it stays in the private folder");
        return;
    }
    match fs::rename(taken, to) {
        Ok(()) => {
            if let Some(dir) = to.parent() {
                let _ = fsutil::sync_dir(dir);
            }
        }
        Err(e) => {
            tracing::warn!(file = %taken.display(), error = %e, "cannot put a manifest back in the inbox");
        }
    }
}

/// Opens a taken file for reading: no symlink followed, no blocking open of
/// a FIFO, and the handle must be a regular file. The inner `Err(reason)`
/// is a file refused for good; I/O errors are the outer error.
fn open_taken(taken: &Path) -> Result<Result<fs::File, String>, IngestError> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(taken);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(Err(
                "the manifest is a symbolic link; links are not followed (place the file itself in the inbox)"
                    .into(),
            ));
        }
        Err(e) => return Err(io_at(taken)(e)),
    };
    let meta = file.metadata().map_err(io_at(taken))?;
    if !meta.is_file() {
        return Ok(Err(
            "the manifest is not a regular file (a FIFO, socket or device); it is not read".into(),
        ));
    }
    Ok(Ok(file))
}

/// Ingests a file already in the private folder, from its handle.
fn ingest_taken(
    store: &Store,
    folders: &Folders,
    file: &Path,
    simulated: bool,
) -> Result<Outcome, IngestError> {
    let handle = match open_taken(file)? {
        Ok(handle) => handle,
        Err(reason) => {
            let problems = vec![Problem {
                line: 1,
                column: "-".into(),
                message: reason,
            }];
            reject(folders, file, &problems)?;
            return Ok(Outcome::Rejected { problems });
        }
    };
    let mut media = MediaCheck::recording(&folders.media, store.path());
    let summary = match manifest::validate_reader_with(&handle, file, &mut media) {
        Ok(summary) => summary,
        Err(ManifestError::Invalid { problems, .. }) => {
            reject(folders, file, &problems)?;
            return Ok(Outcome::Rejected { problems });
        }
        Err(ManifestError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(Outcome::Unsettled);
        }
        Err(ManifestError::Io { path, source }) => return Err(IngestError::Io { path, source }),
    };
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "batch".into());
    let name_free = |name: &str| !folders.batch_dir(name).exists();
    let batch = match store.begin_batch(&stem, &summary.sha256, summary.rows, file, &name_free)? {
        Begin::Started(batch) => batch,
        Begin::Duplicate { earlier } => {
            if let Some(batch) = own_leftover(store, &earlier, file)? {
                // Our own accepted file whose removal failed earlier: finish it.
                remove_source(store, &batch)?;
                return Ok(Outcome::Accepted(batch));
            }
            let problems = vec![Problem {
                line: 1,
                column: "-".into(),
                message: format!(
                    "identical to a manifest already accepted as batch {earlier:?}; \
                     nothing from this file is submitted (change it to submit it again)"
                ),
            }];
            reject(folders, file, &problems)?;
            return Ok(Outcome::Rejected { problems });
        }
    };
    store.flush_blocking()?;
    // The media table takes its final name before the manifest is copied:
    // a batch whose copy is complete has its table (see `recover`).
    if let Some(writer) = media.into_table() {
        let dest = table::path_of(store.path(), batch.seq);
        if let Err(e) = writer.persist(&dest) {
            undo(store, &batch, &folders.manifest_of(&batch.name))?;
            return Err(IngestError::Io {
                path: dest,
                source: std::io::Error::other(e.to_string()),
            });
        }
    }

    let dir = folders.batch_dir(&batch.name);
    let dest = folders.manifest_of(&batch.name);
    crate::failpoint::hit("ingest-before-copy");
    let copied = fs::create_dir_all(&dir)
        .and_then(|()| {
            let mut src = &handle;
            io::Seek::seek(&mut src, io::SeekFrom::Start(0))?;
            copy_hashed(src, &dest)
        })
        .map_err(io_at(file));
    match copied {
        Ok(sha) if sha == summary.sha256 => {}
        Ok(_) => {
            // Changed between validation and copy: still being written.
            undo(store, &batch, &dest)?;
            return Ok(Outcome::Unsettled);
        }
        Err(e) => {
            undo(store, &batch, &dest)?;
            return Err(e);
        }
    }
    let batch = store.activate_batch(batch.seq, simulated)?;
    store.flush_blocking()?;
    remove_source(store, &batch)?;
    Ok(Outcome::Accepted(batch))
}

/// The accepted batch `name` if `file` is its own inbox file, not yet removed.
fn own_leftover(
    store: &Store,
    name: &str,
    file: &Path,
) -> Result<Option<BatchRecord>, IngestError> {
    Ok(store.batches()?.into_iter().find(|b| {
        b.name == name && b.phase != BatchPhase::Ingesting && !b.source_removed && b.source == file
    }))
}

fn undo(store: &Store, batch: &BatchRecord, dest: &Path) -> Result<(), IngestError> {
    // A copy cut short leaves its temporary file: remove it too, so that the
    // folder goes and the file, taken again, keeps its name.
    let _ = fsutil::remove_temps(dest);
    let _ = fs::remove_file(dest);
    if let Some(dir) = dest.parent() {
        let _ = fs::remove_dir(dir);
    }
    let _ = fs::remove_file(table::path_of(store.path(), batch.seq));
    store.abandon_batch(batch.seq)?;
    store.flush_blocking()?;
    Ok(())
}

/// Removes an accepted batch's inbox file, if it still holds the same bytes.
fn remove_source(store: &Store, batch: &BatchRecord) -> Result<(), IngestError> {
    match sha256_of(&batch.source) {
        Ok(sha) if sha == batch.sha256 => {
            fs::remove_file(&batch.source).map_err(io_at(&batch.source))?;
            if let Some(dir) = batch.source.parent() {
                let _ = fsutil::sync_dir(dir);
            }
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(&batch.source)(e)),
    }
    store.mark_source_removed(batch.seq)?;
    Ok(())
}

/// Finishes or undoes ingests a crash interrupted. Run once at start-up,
/// before the inbox is scanned.
pub fn recover(store: &Store, folders: &Folders) -> Result<Vec<BatchRecord>, IngestError> {
    table::remove_pending(store.path());
    let mut accepted = Vec::new();
    for batch in store.batches()? {
        match batch.phase {
            BatchPhase::Ingesting => {
                let dest = folders.manifest_of(&batch.name);
                match sha256_of(&dest) {
                    Ok(sha) if sha == batch.sha256 => {
                        let batch = store.activate_batch(batch.seq, batch.simulated)?;
                        store.flush_blocking()?;
                        remove_source(store, &batch)?;
                        tracing::info!(batch = %batch.name, "finished an ingest interrupted by a stop");
                        accepted.push(batch);
                    }
                    _ => {
                        tracing::info!(batch = %batch.name, "undid an ingest interrupted by a stop; the file will be taken again");
                        undo(store, &batch, &dest)?;
                    }
                }
            }
            BatchPhase::Active | BatchPhase::Finished if !batch.source_removed => {
                remove_source(store, &batch)?;
            }
            _ => {}
        }
    }
    put_back_leftovers(store, folders)?;
    Ok(accepted)
}

/// Files a stop left in the private folder, taken but not ingested, go back
/// to the inbox to be taken again.
fn put_back_leftovers(store: &Store, folders: &Folders) -> Result<(), IngestError> {
    let dir = folders.taking_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_at(&dir)(e)),
    };
    let owned: Vec<PathBuf> = store
        .batches()?
        .into_iter()
        .filter(|b| !b.source_removed)
        .map(|b| b.source)
        .collect();
    for entry in entries {
        let entry = entry.map_err(io_at(&dir))?;
        let path = entry.path();
        if owned.contains(&path) {
            continue;
        }
        let to = folders.inbox.join(entry.file_name());
        tracing::info!(file = %to.display(), "a manifest taken when the daemon stopped goes back to the inbox");
        put_back(&path, &to);
    }
    Ok(())
}

/// Moves `file` to `rejected/NAME.csv` after writing `rejected/NAME.errors.txt`.
pub fn reject(folders: &Folders, file: &Path, problems: &[Problem]) -> Result<(), IngestError> {
    let dir = folders.rejected_dir();
    fs::create_dir_all(&dir).map_err(io_at(&dir))?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "manifest.csv".into());
    let stem = file
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "manifest".into());
    let errors_path = dir.join(format!("{stem}.errors.txt"));
    let mut text = String::new();
    for p in problems {
        text.push_str(&p.to_string());
        text.push('\n');
    }
    fsutil::write_atomic(&errors_path, text.as_bytes()).map_err(io_at(&errors_path))?;
    let dest = dir.join(name);
    fsutil::move_file(file, &dest).map_err(io_at(file))?;
    tracing::warn!(file = %file.display(), problems = problems.len(), "manifest rejected; see {}", errors_path.display());
    Ok(())
}

fn sha256_of(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Copies `src` to `to` atomically, returning the SHA-256 of what was copied.
fn copy_hashed(mut src: impl Read, to: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    fsutil::write_atomic_with(to, |w| {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            hasher.update(&buf[..n]);
            io::Write::write_all(w, &buf[..n])?;
            crate::failpoint::hit("ingest-mid-copy");
        }
    })?;
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
