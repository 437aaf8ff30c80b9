//! Final records of ended rows: one append-only file per batch,
//! `STATE/archive/SEQ.jsonl`, one JSON line per record.
//!
//! A row's final record is appended and synced here before the row leaves
//! the database, so sled holds only live rows. A crash between the two
//! appends the same record again at the next start: readers take the last
//! record of each row, so a repeat is harmless. A line cut short by a crash
//! (no newline) is ignored when reading and cut off before the next append.
//!
//! This file never decides states; it only keeps what the state machine
//! ended.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{BatchSeq, RowRecord, StoreError};

const DIR: &str = "archive";

#[derive(Serialize)]
struct LineOut<'a> {
    row: u64,
    record: &'a RowRecord,
}

#[derive(Deserialize)]
struct LineIn {
    row: u64,
    record: RowRecord,
}

/// The archive folder of one state folder.
#[derive(Debug, Clone)]
pub(crate) struct Archive {
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> StoreError + '_ {
    move |source| StoreError::Archive {
        path: path.to_owned(),
        source,
    }
}

impl Archive {
    pub(crate) fn open(state_dir: &Path) -> Result<Archive, StoreError> {
        let dir = state_dir.join(DIR);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Archive { dir })
    }

    fn path(&self, seq: BatchSeq) -> PathBuf {
        self.dir.join(format!("{seq}.jsonl"))
    }

    /// Appends final records of batch `seq` and syncs them to disk.
    pub(crate) fn append<'a>(
        &self,
        seq: BatchSeq,
        records: impl IntoIterator<Item = (u64, &'a RowRecord)>,
    ) -> Result<(), StoreError> {
        let path = self.path(seq);
        let err = io_err(&path);
        let mut buf = Vec::new();
        for (row, record) in records {
            serde_json::to_writer(&mut buf, &LineOut { row, record })
                .map_err(|e| err(io::Error::other(e)))?;
            buf.push(b'\n');
        }
        if buf.is_empty() {
            return Ok(());
        }
        let new = !path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(&err)?;
        cut_torn_tail(&mut file).map_err(&err)?;
        file.write_all(&buf).map_err(&err)?;
        file.sync_data().map_err(&err)?;
        if new {
            crate::fsutil::sync_dir(&self.dir).map_err(&err)?;
        }
        Ok(())
    }

    /// Visits every complete record of batch `seq` in file order, with the
    /// byte offset of its line. A batch with no file has no records.
    pub(crate) fn scan(
        &self,
        seq: BatchSeq,
        mut f: impl FnMut(u64, u64, RowRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let path = self.path(seq);
        let err = io_err(&path);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(err(e)),
        };
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let mut line = Vec::new();
        let mut offset = 0u64;
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(&err)?;
            if n == 0 || line.last() != Some(&b'\n') {
                // The end, or a line a crash cut short: never acted upon.
                return Ok(());
            }
            let parsed: LineIn =
                serde_json::from_slice(&line).map_err(|e| StoreError::Corrupt {
                    what: "archived row",
                    message: format!("{} at byte {offset}: {e}", path.display()),
                })?;
            f(parsed.row, offset, parsed.record)?;
            offset += n as u64;
        }
    }

    /// Where the last record of each row starts (`None` for rows without
    /// one), for rows `1..=total_rows`: eight bytes a row.
    pub(crate) fn index(
        &self,
        seq: BatchSeq,
        total_rows: u64,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        let len = usize::try_from(total_rows).unwrap_or(usize::MAX);
        let mut offsets = vec![None; len];
        self.scan(seq, |row, offset, _| {
            if let Some(slot) = row
                .checked_sub(1)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| offsets.get_mut(i))
            {
                *slot = Some(offset);
            }
            Ok(())
        })?;
        Ok(offsets)
    }

    /// A reader for [`ArchiveReader::at`] lookups of batch `seq`.
    pub(crate) fn reader(&self, seq: BatchSeq) -> Result<ArchiveReader, StoreError> {
        let path = self.path(seq);
        let file = File::open(&path).map_err(io_err(&path))?;
        Ok(ArchiveReader {
            reader: BufReader::with_capacity(64 * 1024, file),
            path,
            line: Vec::new(),
        })
    }

    /// The archive's size on disk, for reports.
    pub(crate) fn bytes(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// Random access to records by the offsets of [`Archive::index`].
pub(crate) struct ArchiveReader {
    reader: BufReader<File>,
    path: PathBuf,
    line: Vec<u8>,
}

impl ArchiveReader {
    pub(crate) fn at(&mut self, offset: u64) -> Result<RowRecord, StoreError> {
        let err = io_err(&self.path);
        self.reader.seek(SeekFrom::Start(offset)).map_err(&err)?;
        self.line.clear();
        self.reader
            .read_until(b'\n', &mut self.line)
            .map_err(&err)?;
        let parsed: LineIn =
            serde_json::from_slice(&self.line).map_err(|e| StoreError::Corrupt {
                what: "archived row",
                message: format!("{} at byte {offset}: {e}", self.path.display()),
            })?;
        Ok(parsed.record)
    }
}

/// Cuts a last line that a crash left without its newline, so that the next
/// append starts on a line of its own.
fn cut_torn_tail(file: &mut File) -> io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // Search backwards for the end of the last whole line.
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    let keep = loop {
        let start = end.saturating_sub(chunk.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk[..n])?;
        if let Some(pos) = chunk[..n].iter().rposition(|b| *b == b'\n') {
            break start + pos as u64 + 1;
        }
        if start == 0 {
            break 0;
        }
        end = start;
    };
    file.set_len(keep)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::RowSpec;

    fn rec(id: &str) -> RowRecord {
        RowRecord::new(id.into(), 2, RowSpec::default())
    }

    #[test]
    fn last_record_wins_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = Archive::open(dir.path()).expect("open");
        archive
            .append(7, [(1, &rec("a")), (2, &rec("b"))])
            .expect("append");
        archive.append(7, [(1, &rec("a2"))]).expect("append again");
        // A crash mid-line.
        let path = archive.path(7);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"{\"row\":2,\"reco").expect("torn");
        drop(f);
        let index = archive.index(7, 3).expect("index");
        assert!(index[0].is_some() && index[1].is_some() && index[2].is_none());
        let mut reader = archive.reader(7).expect("reader");
        assert_eq!(reader.at(index[0].expect("a")).expect("read").id, "a2");
        assert_eq!(reader.at(index[1].expect("b")).expect("read").id, "b");
        archive
            .append(7, [(3, &rec("c"))])
            .expect("append after tear");
        let mut ids = Vec::new();
        archive
            .scan(7, |row, _, r| {
                ids.push((row, r.id));
                Ok(())
            })
            .expect("scan");
        assert_eq!(
            ids,
            [
                (1, "a".into()),
                (2, "b".into()),
                (1, "a2".into()),
                (3, "c".into())
            ]
        );
    }
}
