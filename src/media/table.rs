//! The media table of a batch: what each local file of each row held when
//! the manifest was accepted (size, modification time, SHA-256, type, audio
//! length), in `STATE/media/SEQ.table`.
//!
//! One fixed-size record a row (a slot for each media column), at an offset
//! computed from the row's index: written once, streaming, while the
//! manifest is validated; read one slot at a time at submit and by the
//! `/media` route. Rows without local files leave holes (read as empty), so
//! memory never depends on the batch's length and disk only on its rows with
//! local files. The header holds the canonical media root the paths were
//! resolved against, so a later `--media-root` change cannot redirect them.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::local::{Fingerprint, MediaFormat};
use super::{Column, MediaError};
use crate::store::BatchSeq;

const MAGIC: &[u8; 8] = b"ITBMEDIA";
const VERSION: u32 = 1;
/// Bytes before the first record; the root path must fit in it.
const HEADER: u64 = 4096;
const SLOT: u64 = 64;
const ROW: u64 = SLOT * 3;

/// Folder of the media tables under the state folder.
pub const DIR: &str = "media";

/// The table of batch `seq`.
pub fn path_of(state_dir: &Path, seq: BatchSeq) -> PathBuf {
    state_dir.join(DIR).join(format!("{seq}.table"))
}

/// One recorded file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    pub format: MediaFormat,
    pub print: Fingerprint,
    pub seconds: Option<f64>,
}

impl Entry {
    fn encode(&self) -> [u8; SLOT as usize] {
        let mut b = [0u8; SLOT as usize];
        b[0] = 1;
        b[1] = self.format.code();
        b[4..8].copy_from_slice(&self.print.mtime.1.to_le_bytes());
        b[8..16].copy_from_slice(&self.print.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.print.mtime.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.seconds.unwrap_or(f64::NAN).to_le_bytes());
        b[32..64].copy_from_slice(&self.print.sha256);
        b
    }

    fn decode(b: &[u8; SLOT as usize]) -> Option<Entry> {
        if b[0] != 1 {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let seconds = f64::from_bits(u64_at(24));
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&b[32..64]);
        Some(Entry {
            format: MediaFormat::from_code(b[1])?,
            print: Fingerprint {
                size: u64_at(8),
                #[allow(clippy::cast_possible_wrap)]
                mtime: (u64_at(16) as i64, u32_at(4)),
                sha256,
            },
            seconds: (!seconds.is_nan()).then_some(seconds),
        })
    }
}

fn offset(row: u64, column: Column) -> Option<u64> {
    let index = row.checked_sub(1)?;
    HEADER.checked_add(
        index
            .checked_mul(ROW)?
            .checked_add(u64::from(column.index()) * SLOT)?,
    )
}

fn table_err(path: &Path, message: impl Into<String>) -> MediaError {
    MediaError::Table {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// A table being written, in a temporary file beside its final place.
pub struct TableWriter {
    file: tempfile::NamedTempFile,
    dir: PathBuf,
}

impl TableWriter {
    /// Starts a table in `STATE/media/` for files resolved under `root`
    /// (canonical).
    pub fn create(state_dir: &Path, root: &Path) -> Result<TableWriter, MediaError> {
        let dir = state_dir.join(DIR);
        let io_err = |source| MediaError::Io {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io_err)?;
        let file = tempfile::Builder::new()
            .prefix(".pending-")
            .tempfile_in(&dir)
            .map_err(io_err)?;
        let root_bytes = root.as_os_str().as_encoded_bytes();
        let room = usize::try_from(HEADER).unwrap_or(usize::MAX) - 16;
        if root_bytes.len() > room {
            return Err(table_err(
                &dir,
                format!("the media root's path is longer than {room} bytes"),
            ));
        }
        let mut header = Vec::with_capacity(16 + root_bytes.len());
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&u32::try_from(root_bytes.len()).unwrap_or(0).to_le_bytes());
        header.extend_from_slice(root_bytes);
        file.as_file().write_all_at(&header, 0).map_err(io_err)?;
        Ok(TableWriter { file, dir })
    }

    /// Records `entry` for the cell of `column` in row `row` (1-based).
    pub fn put(&mut self, row: u64, column: Column, entry: &Entry) -> Result<(), MediaError> {
        let at = offset(row, column).ok_or_else(|| table_err(&self.dir, "row out of range"))?;
        self.file
            .as_file()
            .write_all_at(&entry.encode(), at)
            .map_err(|source| MediaError::Io {
                path: self.file.path().to_owned(),
                source,
            })
    }

    /// Syncs the table and gives it its final name (and syncs the folder).
    pub fn persist(self, dest: &Path) -> Result<(), MediaError> {
        let io_err = |source| MediaError::Io {
            path: dest.to_owned(),
            source,
        };
        self.file.as_file().sync_all().map_err(io_err)?;
        self.file.persist(dest).map_err(|e| io_err(e.error))?;
        crate::fsutil::sync_dir(&self.dir).map_err(io_err)?;
        Ok(())
    }
}

/// Removes table files a crash left half-written.
pub fn remove_pending(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir.join(DIR)) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".pending-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A batch's table, open for reading.
#[derive(Debug)]
pub struct Table {
    file: File,
    path: PathBuf,
    root: PathBuf,
}

impl Table {
    pub fn open(path: &Path) -> Result<Table, MediaError> {
        let file = File::open(path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                table_err(path, "missing: the batch recorded no local files")
            } else {
                MediaError::Io {
                    path: path.to_owned(),
                    source: e,
                }
            }
        })?;
        let mut head = [0u8; 16];
        file.read_exact_at(&mut head, 0)
            .map_err(|source| MediaError::Io {
                path: path.to_owned(),
                source,
            })?;
        if &head[..8] != MAGIC || head[8..12] != VERSION.to_le_bytes() {
            return Err(table_err(path, "not a media table of this version"));
        }
        let len = u32::from_le_bytes([head[12], head[13], head[14], head[15]]) as usize;
        if len as u64 > HEADER - 16 {
            return Err(table_err(path, "damaged header"));
        }
        let mut root = vec![0u8; len];
        file.read_exact_at(&mut root, 16)
            .map_err(|source| MediaError::Io {
                path: path.to_owned(),
                source,
            })?;
        let root =
            PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(root));
        Ok(Table {
            file,
            path: path.to_owned(),
            root,
        })
    }

    /// The canonical media root the table's paths were resolved against.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The entry of `column` in row `row`, if that cell named a local file.
    pub fn get(&self, row: u64, column: Column) -> Result<Option<Entry>, MediaError> {
        let at = offset(row, column).ok_or_else(|| table_err(&self.path, "row out of range"))?;
        let mut b = [0u8; SLOT as usize];
        match self.file.read_exact_at(&mut b, at) {
            Ok(()) => Ok(Entry::decode(&b)),
            // Past the end: rows after the last local file.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(source) => Err(MediaError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_holes_read_empty() {
        let state = tempfile::tempdir().expect("tempdir");
        let root = state.path().join("root");
        let mut w = TableWriter::create(state.path(), &root).expect("create");
        let e = Entry {
            format: MediaFormat::Wav,
            print: Fingerprint {
                size: 1234,
                mtime: (1_700_000_000, 999),
                sha256: [7; 32],
            },
            seconds: Some(3.5),
        };
        let img = Entry {
            format: MediaFormat::Png,
            seconds: None,
            ..e
        };
        w.put(5, Column::Audio, &e).expect("put");
        w.put(1, Column::Image, &img).expect("put");
        let dest = path_of(state.path(), 9);
        w.persist(&dest).expect("persist");
        let t = Table::open(&dest).expect("open");
        assert_eq!(t.root(), root.as_path());
        assert_eq!(t.get(5, Column::Audio).expect("get"), Some(e));
        assert_eq!(t.get(1, Column::Image).expect("get"), Some(img));
        assert_eq!(t.get(1, Column::Audio).expect("get"), None);
        assert_eq!(t.get(3, Column::Mask).expect("get"), None);
        assert_eq!(t.get(1000, Column::Image).expect("get"), None);
        assert!(t.get(0, Column::Image).is_err());
    }
}
