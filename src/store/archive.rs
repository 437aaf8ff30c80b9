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

/// A batch's archive for reading; `None` while it has none.
fn open_reader(path: &Path) -> Result<Option<BufReader<File>>, StoreError> {
    match File::open(path) {
        Ok(file) => Ok(Some(BufReader::with_capacity(256 * 1024, file))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
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
        let Some(mut reader) = open_reader(&path)? else {
            return Ok(());
        };
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

/// What the console needs of one archived line, read without building the
/// whole record.
#[derive(Deserialize)]
struct PeekLine {
    row: u64,
    record: PeekRecord,
}

#[derive(Deserialize)]
struct PeekRecord {
    state: super::RowState,
    #[serde(default)]
    fail_code: Option<String>,
}

/// Most distinct fail codes told apart in one batch's index; the rest share
/// the last slot (the set of codes is open, the index must stay bounded).
const MAX_CODES: usize = 1024;

/// Where the last record of each row of one batch's archive starts, with
/// its state and fail code, kept up to date by reading only what was
/// appended since the last look (the file only grows). Twelve bytes a row.
#[derive(Debug, Default)]
pub(crate) struct ArchiveIndex {
    /// Bytes of the file indexed so far (whole lines only).
    scanned: u64,
    /// Per row (row 1 first): offset + 1 of its last record, 0 for none.
    offsets: Vec<u64>,
    /// Per row: state tag in the high 16 bits, fail code slot + 1 below.
    marks: Vec<u32>,
    codes: Vec<String>,
}

impl ArchiveIndex {
    /// Reads the records appended to batch `seq`'s archive since the last
    /// call. Rows outside `1..=total_rows` are ignored.
    pub(crate) fn refresh(
        &mut self,
        archive: &Archive,
        seq: BatchSeq,
        total_rows: u64,
    ) -> Result<(), StoreError> {
        let len = usize::try_from(total_rows).unwrap_or(usize::MAX);
        if self.offsets.len() != len {
            self.offsets.resize(len, 0);
            self.marks.resize(len, 0);
        }
        let path = archive.path(seq);
        let err = io_err(&path);
        let Some(mut reader) = open_reader(&path)? else {
            return Ok(());
        };
        reader.seek(SeekFrom::Start(self.scanned)).map_err(&err)?;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(&err)?;
            if n == 0 || line.last() != Some(&b'\n') {
                return Ok(());
            }
            let offset = self.scanned;
            let peek: PeekLine =
                serde_json::from_slice(&line).map_err(|e| StoreError::Corrupt {
                    what: "archived row",
                    message: format!("{} at byte {offset}: {e}", path.display()),
                })?;
            if let Some(i) = peek
                .row
                .checked_sub(1)
                .and_then(|i| usize::try_from(i).ok())
                .filter(|i| *i < len)
            {
                let code = match peek.record.fail_code {
                    Some(c) => self.code_slot(c) + 1,
                    None => 0,
                };
                self.offsets[i] = offset + 1;
                self.marks[i] = (u32::from(peek.record.state.tag()) << 16) | code;
            }
            self.scanned += n as u64;
        }
    }

    fn code_slot(&mut self, code: String) -> u32 {
        if let Some(i) = self.codes.iter().position(|c| *c == code) {
            return i as u32;
        }
        if self.codes.len() < MAX_CODES {
            self.codes.push(code);
        }
        (self.codes.len() - 1) as u32
    }

    /// The offset of row `row`'s last record, if it has one.
    pub(crate) fn offset(&self, row: u64) -> Option<u64> {
        let i = usize::try_from(row.checked_sub(1)?).ok()?;
        self.offsets.get(i).and_then(|o| o.checked_sub(1))
    }

    /// Row `row`'s archived state tag and fail code.
    pub(crate) fn mark(&self, row: u64) -> Option<(u8, Option<&str>)> {
        self.offset(row)?;
        let m = self.marks[usize::try_from(row - 1).ok()?];
        let code = (m & 0xFFFF)
            .checked_sub(1)
            .and_then(|c| self.codes.get(c as usize))
            .map(String::as_str);
        Some(((m >> 16) as u8, code))
    }

    /// Rows after `after` that have a record, in row order, for which
    /// `take(row, state tag, fail code)` says yes, at most `limit`.
    pub(crate) fn rows_after(
        &self,
        after: u64,
        limit: usize,
        mut take: impl FnMut(u64, u8, Option<&str>) -> bool,
    ) -> Vec<(u64, u64)> {
        let start = usize::try_from(after).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        for i in start..self.offsets.len() {
            if out.len() >= limit {
                break;
            }
            let Some(offset) = self.offsets[i].checked_sub(1) else {
                continue;
            };
            let row = i as u64 + 1;
            if let Some((state, code)) = self.mark(row)
                && take(row, state, code)
            {
                out.push((row, offset));
            }
        }
        out
    }

    /// Rows with a record, by state tag and fail code.
    pub(crate) fn tally(&self) -> Vec<(u8, Option<&str>, u64)> {
        let mut counts: std::collections::BTreeMap<u32, u64> = Default::default();
        for (o, m) in self.offsets.iter().zip(&self.marks) {
            if *o != 0 {
                *counts.entry(*m).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .map(|(m, n)| {
                let code = (m & 0xFFFF)
                    .checked_sub(1)
                    .and_then(|c| self.codes.get(c as usize))
                    .map(String::as_str);
                ((m >> 16) as u8, code, n)
            })
            .collect()
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
