//! Manifests: CSV files of image/audio pairs, read and validated as the
//! contract says.
//!
//! Validation streams the file once (bounded memory whatever its length) and
//! collects every problem, not only the first. The same reader later feeds
//! the dispatcher row by row from the accepted `manifest.csv`, starting at a
//! saved [`ReadPosition`], so the store never needs a copy of queued rows.
//!
//! This module never touches the store or the network.
//!
//! # Layout
//!
//! - this file: the public types and limits, [`validate_path`], and the list
//!   of problems it collects;
//! - `record`: bytes to CSV records, with exact line numbers, the byte-order
//!   mark and bounded memory;
//! - `rules`: the contract's columns, what a row's cells must be, and the set
//!   of ids seen;
//! - `reader`: [`RowReader`], the rows of an accepted manifest from a saved
//!   position.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::media::{Column, MediaCheck};
use crate::spec::{Resolution, RowDefaults, RowSpec};

mod reader;
mod record;
mod rules;
#[cfg(test)]
mod test_support;

pub use reader::RowReader;

use record::RecordParser;
use rules::{Columns, IdSet, check_row};

/// One problem found in a manifest, printed as `line N: column C: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Line of the file as a text editor counts it (header = 1); a row's
    /// problem cites the line where the row starts.
    pub line: u64,
    /// Column name as the contract spells it (lower case), or `-` for a
    /// problem of the whole file.
    pub column: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: column {}: {}",
            self.line, self.column, self.message
        )
    }
}

/// Why a manifest could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be opened or read (not a problem of its content).
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The content breaks the contract's rules; every problem is listed.
    #[error("{path} is not a valid manifest ({} problem(s))", problems.len())]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// One data row of a valid manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRow {
    /// 1-based number among the data rows.
    pub index: u64,
    /// Line where the row starts.
    pub line: u64,
    /// The `id` cell, or the row's number when blank or absent.
    pub id: String,
    pub spec: RowSpec,
    /// Cells of columns the contract does not know, in header order.
    pub extra: Vec<String>,
}

/// Where to resume reading an accepted manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadPosition {
    /// Byte offset of the next record.
    pub byte: u64,
    /// Line of the next record.
    pub line: u64,
    /// Data rows already read before this position.
    pub rows_read: u64,
}

/// What validation learned about a valid manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub rows: u64,
    /// Rows per resolution; `None` counts rows that leave it blank.
    pub by_resolution: BTreeMap<Option<Resolution>, u64>,
    /// Lower-case hex SHA-256 of the file's bytes.
    pub sha256: String,
    /// Names of the extra columns, in header order, as written in the header.
    pub extra_columns: Vec<String>,
    /// Cells naming local files (see [`crate::media`]).
    pub local_files: u64,
}

impl Summary {
    /// The least the batch can cost: 5 billed seconds a row at its rate.
    pub fn min_cost_usd(&self, defaults: &RowDefaults) -> f64 {
        self.by_resolution
            .iter()
            .map(|(res, n)| res.unwrap_or(defaults.resolution).cost_usd(0.0) * *n as f64)
            .sum()
    }
}

/// Most problems listed for one manifest: past this the error file would be
/// too long to read, and one more line says how many were left out.
pub const MAX_PROBLEMS: usize = 1000;

/// Longest row (its cells' bytes) accepted. A quote left open would otherwise
/// make one "row" of the rest of the file, held in memory whole.
pub const MAX_ROW_BYTES: usize = 1 << 20;

/// Most cells in one row, for the same reason as [`MAX_ROW_BYTES`].
pub const MAX_ROW_FIELDS: usize = 4096;

/// Longest id: ids become file names.
pub const MAX_ID_LEN: usize = 128;

/// Column name used for problems of the whole file.
const WHOLE_FILE: &str = "-";

/// Validates the manifest at `path` completely.
///
/// Reads the file once, in bounded memory, and lists every problem (up to
/// [`MAX_PROBLEMS`]) in [`ManifestError::Invalid`]. Lines that are blank or
/// hold only spaces, tabs and commas are not rows (spreadsheets export them
/// under the data); they do not count for default ids either. The SHA-256 in
/// the [`Summary`] is of exactly the bytes that were validated.
pub fn validate_path(path: &Path) -> Result<Summary, ManifestError> {
    let file = File::open(path).map_err(|source| ManifestError::Io {
        path: path.to_owned(),
        source,
    })?;
    validate_reader(file, path)
}

/// [`validate_path`] with local files checked by `media` (see
/// [`crate::media::MediaCheck`]), as the daemon checks them.
pub fn validate_path_with(path: &Path, media: &mut MediaCheck) -> Result<Summary, ManifestError> {
    let file = File::open(path).map_err(|source| ManifestError::Io {
        path: path.to_owned(),
        source,
    })?;
    validate_reader_with(file, path, media)
}

/// [`validate_path`] on an open handle (`path` names it in errors): the
/// daemon reads an inbox file only through the handle it checked.
pub fn validate_reader(file: impl Read, path: &Path) -> Result<Summary, ManifestError> {
    validate_reader_with(file, path, &mut MediaCheck::off())
}

/// [`validate_reader`] with the local files that cells name checked by
/// `media` (against the media root, and recorded when ingesting).
pub fn validate_reader_with(
    file: impl Read,
    path: &Path,
    media: &mut MediaCheck,
) -> Result<Summary, ManifestError> {
    let io_err = |source| ManifestError::Io {
        path: path.to_owned(),
        source,
    };
    let mut parser = RecordParser::new(HashingReader::new(file), None);
    let mut problems = Problems::new(MAX_PROBLEMS);

    let columns = match parser.next_record().map_err(io_err)? {
        Some(header) => Columns::from_header(&header, &mut problems),
        None => {
            problems.push(
                1,
                WHOLE_FILE,
                "the file has no header row and no data rows; a manifest needs both",
            );
            return Err(invalid(path, problems));
        }
    };

    let mut ids = IdSet::new();
    let mut rows: u64 = 0;
    let mut by_resolution: BTreeMap<Option<Resolution>, u64> = BTreeMap::new();
    while let Some(record) = parser.next_record().map_err(io_err)? {
        if record.is_blank() {
            continue;
        }
        rows += 1;
        let checked = check_row(&columns, &record, rows, &mut problems);
        ids.check_unique(&checked, record.line, &mut problems);
        for column in Column::ALL {
            if let Some(cell) = checked.local[usize::from(column.index())] {
                let line = record.line;
                media.check(rows, column, cell, &mut |message| {
                    problems.push(line, column.name(), message);
                });
            }
        }
        if let Some(row) = checked.row {
            *by_resolution.entry(row.resolution).or_default() += 1;
        }
    }
    if rows == 0 {
        problems.push(1, WHOLE_FILE, "no data rows under the header");
    }
    let sha256 = hex(&parser.into_inner().finish());
    if !problems.is_empty() {
        return Err(invalid(path, problems));
    }
    Ok(Summary {
        rows,
        by_resolution,
        sha256,
        extra_columns: columns.extra_names,
        local_files: media.local_cells,
    })
}

fn invalid(path: &Path, problems: Problems) -> ManifestError {
    ManifestError::Invalid {
        path: path.to_owned(),
        problems: problems.into_vec(),
    }
}

/// Problems collected so far, at most `cap` of them kept.
#[derive(Debug)]
struct Problems {
    list: Vec<Problem>,
    cap: usize,
    omitted: u64,
    first_omitted_line: u64,
}

impl Problems {
    fn new(cap: usize) -> Problems {
        Problems {
            list: Vec::new(),
            cap,
            omitted: 0,
            first_omitted_line: 0,
        }
    }

    fn push(&mut self, line: u64, column: &str, message: impl Into<String>) {
        if self.list.len() < self.cap {
            self.list.push(Problem {
                line,
                column: column.to_owned(),
                message: message.into(),
            });
        } else {
            if self.omitted == 0 {
                self.first_omitted_line = line;
            }
            self.omitted += 1;
        }
    }

    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    fn into_vec(mut self) -> Vec<Problem> {
        if self.omitted > 0 {
            self.list.push(Problem {
                line: self.first_omitted_line,
                column: WHOLE_FILE.to_owned(),
                message: format!(
                    "{} more problem(s) from this line on are not listed",
                    self.omitted
                ),
            });
        }
        self.list
    }
}

/// Hashes every byte read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }

    fn finish(self) -> Vec<u8> {
        self.hasher.finalize().to_vec()
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::test_support::{HEADER, QUIRKY, one_problem, problems, summary};
    use super::*;

    fn sha_hex(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    #[test]
    fn every_column_and_quirk_validates() {
        let s = summary(QUIRKY);
        assert_eq!(s.rows, 3);
        assert_eq!(
            s.by_resolution,
            BTreeMap::from([
                (None, 1),
                (Some(Resolution::P480), 1),
                (Some(Resolution::P720), 1)
            ])
        );
        assert_eq!(s.sha256, sha_hex(QUIRKY));
        assert_eq!(s.extra_columns, vec!["Note", "client ref"]);
        let cost = s.min_cost_usd(&RowDefaults::default());
        assert!((cost - (0.15 + 0.15 + 0.30)).abs() < 1e-9);
    }

    #[test]
    fn empty_file_is_rejected() {
        assert_eq!(
            one_problem(b""),
            "line 1: column -: the file has no header row and no data rows; a manifest needs both"
        );
        assert_eq!(
            one_problem(b"\r\n\n\n"),
            "line 1: column -: the file has no header row and no data rows; a manifest needs both"
        );
        assert_eq!(
            one_problem(b"\xef\xbb\xbf"),
            "line 1: column -: the file has no header row and no data rows; a manifest needs both"
        );
    }

    #[test]
    fn header_only_is_rejected() {
        assert_eq!(
            one_problem(HEADER.as_bytes()),
            "line 1: column -: no data rows under the header"
        );
        // Blank lines, lines of spaces and rows of empty cells are not rows.
        assert_eq!(
            one_problem(b"image_url,audio_url\r\n\r\n   \n,\n , \n"),
            "line 1: column -: no data rows under the header"
        );
    }

    #[test]
    fn every_problem_is_listed_in_line_order() {
        let text = "id,image_url,audio_url,resolution,seed,provider\n\
            .a,ftp://x/a.png,,1080p,x,fast\n\
            ok,https://x.test/a.png,https://x.test/a.mp3,480p,1,auto\n\
            ok,https://x.test/a.png,https://x.test/a.mp3\n\
            ok,https://x.test/a.png,https://x.test/a.mp3,480p,1,auto\n";
        assert_eq!(
            problems(text.as_bytes()),
            vec![
                "line 2: column id: \".a\" starts with \".\"; use 1 to 128 of A-Z a-z 0-9 . _ - not starting with \".\"",
                "line 2: column image_url: \"ftp://x/a.png\" is not an http or https URL (its scheme is ftp)",
                "line 2: column audio_url: is blank; an http or https URL is required",
                "line 2: column resolution: \"1080p\" is not 480p or 720p",
                "line 2: column seed: \"x\" is not -1 or an integer from 0 to 2147483647",
                "line 2: column provider: \"fast\" is not auto, value or official",
                "line 4: column -: the row has 3 cells but the header has 6",
                "line 5: column id: \"ok\" is already the id of the row on line 3; ids must be unique",
            ]
        );
    }

    #[test]
    fn problems_are_capped() {
        let mut text = String::from(HEADER);
        for _ in 0..1500 {
            text.push_str("https://x.test/a.png,ftp://x.test/bad\n");
        }
        let list = problems(text.as_bytes());
        assert_eq!(list.len(), MAX_PROBLEMS + 1);
        assert_eq!(
            list[MAX_PROBLEMS],
            "line 1002: column -: 500 more problem(s) from this line on are not listed"
        );
    }

    #[test]
    fn missing_file_is_an_io_error() {
        match validate_path(Path::new("/nonexistent/manifest.csv")) {
            Err(ManifestError::Io { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected Io, got {other:?}"),
        }
    }

    #[test]
    fn fixtures_match_their_purpose() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/manifests");
        let s = validate_path(&dir.join("valid_all_columns.csv")).expect("valid fixture");
        assert_eq!(s.rows, 4);
        match validate_path(&dir.join("broken.csv")) {
            Err(ManifestError::Invalid { problems, .. }) => {
                let got: Vec<String> = problems.iter().map(ToString::to_string).collect();
                let want = std::fs::read_to_string(dir.join("broken.errors.txt"))
                    .expect("expected errors");
                assert_eq!(got, want.lines().collect::<Vec<_>>());
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }
}
