//! What manifest validation asks of local media: each local cell resolved,
//! checked and hashed ([`resolve_local`]), the result recorded in the
//! batch's media table when the manifest is being accepted.
//!
//! Memory stays bounded whatever the manifest's length: a cache of at most
//! [`CACHE_ENTRIES`] files (so that a portrait shared by every row is hashed
//! once, not once a row) and the table being written, which lives on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::local::{Fingerprint, MediaFormat, MediaRoot, mtime_of, resolve_local};
use super::table::{Entry, TableWriter};
use super::{Column, MediaError, MediaSettings, UNPUBLISHED_MESSAGE};

/// Most files remembered while one manifest is validated.
pub(super) const CACHE_ENTRIES: usize = 4096;

/// The local-media side of validating one manifest.
pub struct MediaCheck {
    settings: MediaSettings,
    /// Opened at the first local cell; an error is reported once.
    root: Option<Result<MediaRoot, ()>>,
    state_dir: Option<PathBuf>,
    table: Option<TableWriter>,
    cache: HashMap<PathBuf, Entry>,
    unpublished_reported: bool,
    /// Local cells seen.
    pub local_cells: u64,
    /// Files hashed (cache misses).
    pub hashed: u64,
}

impl MediaCheck {
    /// No media settings (library callers that validate a manifest on its
    /// own, e.g. benchmarks): as a daemon with neither publishing flag.
    pub fn off() -> MediaCheck {
        MediaCheck {
            settings: MediaSettings::default(),
            root: None,
            state_dir: None,
            table: None,
            cache: HashMap::new(),
            unpublished_reported: false,
            local_cells: 0,
            hashed: 0,
        }
    }

    /// Checks local files as `run` would, recording nothing (`validate`).
    pub fn new(settings: &MediaSettings) -> MediaCheck {
        MediaCheck {
            settings: settings.clone(),
            ..MediaCheck::off()
        }
    }

    /// Checks local files and records them in a media table under
    /// `state_dir` (ingest); [`MediaCheck::into_table`] hands it over.
    pub fn recording(settings: &MediaSettings, state_dir: &Path) -> MediaCheck {
        MediaCheck {
            state_dir: Some(state_dir.to_owned()),
            ..MediaCheck::new(settings)
        }
    }

    /// The table written, when the manifest had local files.
    pub fn into_table(self) -> Option<TableWriter> {
        self.table
    }

    /// Checks the local file `cell` of `column` in row `row`; each problem
    /// found is handed to `report` (a message without line or column).
    pub fn check(&mut self, row: u64, column: Column, cell: &str, report: &mut dyn FnMut(String)) {
        self.local_cells += 1;
        let settings = &self.settings;
        if !settings.publishing.is_on() {
            // Nothing local can be sent: say so once, with both ways out,
            // rather than a line about each file.
            if !self.unpublished_reported {
                self.unpublished_reported = true;
                report(format!("{cell:?} {UNPUBLISHED_MESSAGE}"));
            }
            return;
        }
        if self.root.is_none() {
            match MediaRoot::open(&settings.root) {
                Ok(root) => self.root = Some(Ok(root)),
                Err(e) => {
                    self.root = Some(Err(()));
                    report(format!("{cell:?} is a local path, but {e}"));
                    return;
                }
            }
        }
        let Some(Ok(root)) = &self.root else {
            return;
        };
        let root = root.clone();
        let entry = match self.resolve(&root, cell, column) {
            Ok(entry) => entry,
            Err(e) => {
                report(e.to_string());
                return;
            }
        };
        if let Some(state_dir) = &self.state_dir {
            if self.table.is_none() {
                match TableWriter::create(state_dir, &root.canonical) {
                    Ok(t) => self.table = Some(t),
                    Err(e) => {
                        report(format!("cannot record local files: {e}"));
                        return;
                    }
                }
            }
            if let Some(table) = &mut self.table
                && let Err(e) = table.put(row, column, &entry)
            {
                report(format!("cannot record local files: {e}"));
            }
        }
    }

    /// The entry of one file, from the cache when the file is unchanged.
    fn resolve(
        &mut self,
        root: &MediaRoot,
        cell: &str,
        column: Column,
    ) -> Result<Entry, MediaError> {
        let path = root.locate(cell)?;
        if let Some(cached) = self.cache.get(&path)
            && kind_fits(cached.format, column)
            && let Ok(meta) = std::fs::metadata(&path)
            && meta.is_file()
            && meta.len() == cached.print.size
            && mtime_of(&meta) == cached.print.mtime
        {
            return Ok(*cached);
        }
        let local = resolve_local(root, cell, column)?;
        self.hashed += 1;
        let entry = Entry {
            format: local.format,
            print: Fingerprint { ..local.print },
            seconds: local.seconds,
        };
        if self.cache.len() >= CACHE_ENTRIES {
            self.cache.clear();
        }
        self.cache.insert(local.path, entry);
        Ok(entry)
    }
}

/// A file checked for one column is not taken as checked for the other kind.
fn kind_fits(format: MediaFormat, column: Column) -> bool {
    let audio = matches!(
        format,
        MediaFormat::Mp3 | MediaFormat::Wav | MediaFormat::M4a
    );
    audio == column.is_audio()
}
