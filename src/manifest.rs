//! Manifests: CSV files of image/audio pairs, read and validated as the
//! contract says.
//!
//! Validation streams the file once (bounded memory whatever its length) and
//! collects every problem, not only the first. The same reader later feeds
//! the dispatcher row by row from the accepted `manifest.csv`, starting at a
//! saved [`ReadPosition`], so the store never needs a copy of queued rows.
//!
//! This module never touches the store or the network.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::spec::{MAX_SEED, Provider, Resolution, RowDefaults, RowSpec};

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
    let io_err = |source| ManifestError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
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
        if let Some(id) = &checked.id
            && let Some(first) = ids.first_line_or_insert(id, record.line)
        {
            let message = if checked.id_defaulted {
                format!(
                    "the default id {} (this row's number) is already the id of the row on \
                     line {first}; ids must be unique",
                    quoted(id)
                )
            } else {
                format!(
                    "{} is already the id of the row on line {first}; ids must be unique",
                    quoted(id)
                )
            };
            problems.push(record.line, Known::Id.name(), message);
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
    })
}

fn invalid(path: &Path, problems: Problems) -> ManifestError {
    ManifestError::Invalid {
        path: path.to_owned(),
        problems: problems.into_vec(),
    }
}

/// Reads the rows of a manifest that has already been validated.
pub struct RowReader {
    path: PathBuf,
    parser: RecordParser<File>,
    columns: Columns,
    rows_read: u64,
}

impl RowReader {
    /// Opens `path` and positions the reader at `from` (or at the first data
    /// row when `from` is `None`).
    pub fn open(path: &Path, from: Option<ReadPosition>) -> Result<Self, ManifestError> {
        let io_err = |source| ManifestError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let mut parser = RecordParser::new(file, None);
        let mut problems = Problems::new(MAX_PROBLEMS);
        // The column mapping always comes from the header, even when resuming.
        let columns = match parser.next_record().map_err(io_err)? {
            Some(header) => Columns::from_header(&header, &mut problems),
            None => {
                problems.push(1, WHOLE_FILE, "the file is empty");
                return Err(invalid(path, problems));
            }
        };
        if !problems.is_empty() {
            return Err(invalid(path, problems));
        }
        let (parser, rows_read) = match from {
            None => (parser, 0),
            Some(pos) => {
                let mut file = parser.into_inner();
                file.seek(SeekFrom::Start(pos.byte)).map_err(io_err)?;
                (
                    RecordParser::new(file, Some((pos.byte, pos.line))),
                    pos.rows_read,
                )
            }
        };
        Ok(RowReader {
            path: path.to_owned(),
            parser,
            columns,
            rows_read,
        })
    }

    /// The names of the extra columns, in header order, as written.
    pub fn extra_columns(&self) -> &[String] {
        &self.columns.extra_names
    }

    /// The next row, with the position just after it; `None` at the end.
    pub fn next_row(&mut self) -> Result<Option<(ManifestRow, ReadPosition)>, ManifestError> {
        loop {
            let record = match self.parser.next_record() {
                Ok(Some(record)) => record,
                Ok(None) => return Ok(None),
                Err(source) => {
                    return Err(ManifestError::Io {
                        path: self.path.clone(),
                        source,
                    });
                }
            };
            if record.is_blank() {
                continue;
            }
            let index = self.rows_read + 1;
            let mut problems = Problems::new(MAX_PROBLEMS);
            let checked = check_row(&self.columns, &record, index, &mut problems);
            let (Some(row), Some(id), true) = (checked.row, checked.id, problems.is_empty()) else {
                if problems.is_empty() {
                    problems.push(record.line, WHOLE_FILE, "row cannot be read");
                }
                return Err(ManifestError::Invalid {
                    path: self.path.clone(),
                    problems: problems.into_vec(),
                });
            };
            let extra = self
                .columns
                .extra_fields
                .iter()
                .map(|&i| record.text(i).unwrap_or_default().trim().to_owned())
                .collect();
            let next = ReadPosition {
                byte: record.next_byte,
                line: record.next_line,
                rows_read: index,
            };
            let manifest_row = ManifestRow {
                index,
                line: record.line,
                id: id.into_owned(),
                spec: RowSpec {
                    image_url: row.image_url.to_owned(),
                    mask_url: row.mask_url.map(str::to_owned),
                    audio_url: row.audio_url.to_owned(),
                    prompt: row.prompt.map(str::to_owned),
                    resolution: row.resolution,
                    seed: row.seed,
                    provider: row.provider,
                },
                extra,
            };
            self.rows_read = index;
            return Ok(Some((manifest_row, next)));
        }
    }
}

// ---------------------------------------------------------------------------
// Columns and rows

/// The columns the contract knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Id,
    ImageUrl,
    AudioUrl,
    MaskUrl,
    Prompt,
    Resolution,
    Seed,
    Provider,
}

impl Known {
    const ALL: [Known; 8] = [
        Known::Id,
        Known::ImageUrl,
        Known::AudioUrl,
        Known::MaskUrl,
        Known::Prompt,
        Known::Resolution,
        Known::Seed,
        Known::Provider,
    ];

    fn name(self) -> &'static str {
        match self {
            Known::Id => "id",
            Known::ImageUrl => "image_url",
            Known::AudioUrl => "audio_url",
            Known::MaskUrl => "mask_url",
            Known::Prompt => "prompt",
            Known::Resolution => "resolution",
            Known::Seed => "seed",
            Known::Provider => "provider",
        }
    }

    fn required(self) -> bool {
        matches!(self, Known::ImageUrl | Known::AudioUrl)
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// The header, turned into where each column is.
#[derive(Debug)]
struct Columns {
    /// Cells a row must have.
    width: usize,
    /// Name to cite for each cell position (lower case for known columns).
    names: Vec<String>,
    /// Cell position of each known column, by [`Known::slot`].
    known_at: [Option<usize>; 8],
    /// Cell positions of the extra columns, in header order.
    extra_fields: Vec<usize>,
    /// Their names as written (trimmed).
    extra_names: Vec<String>,
}

impl Columns {
    fn from_header(header: &Record<'_>, problems: &mut Problems) -> Columns {
        let mut columns = Columns {
            width: header.len(),
            names: Vec::with_capacity(header.len()),
            known_at: [None; 8],
            extra_fields: Vec::new(),
            extra_names: Vec::new(),
        };
        if let Some(fault) = header.fault {
            problems.push(header.line, WHOLE_FILE, fault.message());
            columns.width = 0;
        }
        let mut seen: HashSet<String> = HashSet::new();
        for i in 0..header.len() {
            let name = match header.text(i) {
                Ok(text) => text.trim_start_matches('\u{feff}').trim().to_owned(),
                Err(bad_line) => {
                    problems.push(
                        bad_line,
                        WHOLE_FILE,
                        format!(
                            "the name of column {} has bytes that are not UTF-8; a manifest \
                             must be UTF-8",
                            i + 1
                        ),
                    );
                    columns.names.push(WHOLE_FILE.to_owned());
                    continue;
                }
            };
            let lower = name.to_lowercase();
            let cited = match Known::ALL.iter().find(|k| k.name() == lower) {
                Some(k) => k.name().to_owned(),
                None => name.clone(),
            };
            columns.names.push(cited.clone());
            if name.is_empty() {
                problems.push(
                    header.line,
                    WHOLE_FILE,
                    format!(
                        "column {} of the header has no name; name it or remove it",
                        i + 1
                    ),
                );
                continue;
            }
            if !seen.insert(lower.clone()) {
                problems.push(
                    header.line,
                    &cited,
                    "the header names this column twice (column names ignore case)",
                );
                continue;
            }
            match Known::ALL.iter().find(|k| k.name() == lower) {
                Some(k) => columns.known_at[k.slot()] = Some(i),
                None => {
                    columns.extra_fields.push(i);
                    columns.extra_names.push(name);
                }
            }
        }
        for k in Known::ALL {
            if k.required() && columns.known_at[k.slot()].is_none() {
                problems.push(
                    1,
                    k.name(),
                    format!("the header has no {} column; it is required", k.name()),
                );
            }
        }
        columns
    }

    /// Name to cite for cell `i`.
    fn name(&self, i: usize) -> &str {
        self.names.get(i).map_or(WHOLE_FILE, String::as_str)
    }
}

/// A row's cells, valid by the contract (uniqueness of ids aside).
#[derive(Debug)]
struct RowView<'a> {
    image_url: &'a str,
    mask_url: Option<&'a str>,
    audio_url: &'a str,
    prompt: Option<&'a str>,
    resolution: Option<Resolution>,
    seed: Option<i64>,
    provider: Option<Provider>,
}

/// What checking one row found.
struct Checked<'a> {
    /// The row's id (defaulted when blank) when it is a valid id, for the
    /// uniqueness check.
    id: Option<Cow<'a, str>>,
    id_defaulted: bool,
    /// The row, when it broke no rule.
    row: Option<RowView<'a>>,
}

/// Checks every rule of the contract that one row can break on its own.
fn check_row<'a>(
    columns: &Columns,
    record: &'a Record<'_>,
    index: u64,
    problems: &mut Problems,
) -> Checked<'a> {
    let mut failed = Checked {
        id: None,
        id_defaulted: false,
        row: None,
    };
    let line = record.line;
    if let Some(fault) = record.fault {
        problems.push(line, WHOLE_FILE, fault.message());
        return failed;
    }
    if record.len() != columns.width {
        let hint = if record.next_line > line + 1 {
            " (is a quote left open?)"
        } else {
            ""
        };
        problems.push(
            line,
            WHOLE_FILE,
            format!(
                "the row has {} but the header has {}{hint}",
                cells(record.len()),
                columns.width
            ),
        );
        return failed;
    }

    let mut ok = true;
    // `None`: absent column or blank cell; `Err`: not UTF-8 (already reported).
    let mut cell = |k: Known| -> Result<Option<&'a str>, ()> {
        let Some(i) = columns.known_at[k.slot()] else {
            return Ok(None);
        };
        match record.text(i) {
            Ok(text) => {
                let text = text.trim();
                Ok((!text.is_empty()).then_some(text))
            }
            Err(bad_line) => {
                problems.push(
                    bad_line,
                    columns.name(i),
                    "has bytes that are not UTF-8; a manifest must be UTF-8",
                );
                Err(())
            }
        }
    };
    let id = cell(Known::Id);
    let image = cell(Known::ImageUrl);
    let audio = cell(Known::AudioUrl);
    let mask = cell(Known::MaskUrl);
    let prompt = cell(Known::Prompt);
    let resolution = cell(Known::Resolution);
    let seed = cell(Known::Seed);
    let provider = cell(Known::Provider);
    // Cells of extra columns must be UTF-8 too: they go into results.csv.
    for &i in &columns.extra_fields {
        if let Err(bad_line) = record.text(i) {
            problems.push(
                bad_line,
                columns.name(i),
                "has bytes that are not UTF-8; a manifest must be UTF-8",
            );
            ok = false;
        }
    }

    match id {
        Ok(Some(text)) => match id_problem(text) {
            None => failed.id = Some(Cow::Borrowed(text)),
            Some(message) => {
                problems.push(line, Known::Id.name(), message);
                ok = false;
            }
        },
        Ok(None) => {
            failed.id = Some(Cow::Owned(index.to_string()));
            failed.id_defaulted = true;
        }
        Err(()) => ok = false,
    }

    let mut url = |k: Known, value: Result<Option<&'a str>, ()>| -> Option<&'a str> {
        match value {
            Ok(Some(text)) => match url_problem(text) {
                None => Some(text),
                Some(message) => {
                    problems.push(line, k.name(), message);
                    ok = false;
                    None
                }
            },
            Ok(None) => {
                if k.required() && columns.known_at[k.slot()].is_some() {
                    problems.push(line, k.name(), "is blank; an http or https URL is required");
                    ok = false;
                }
                None
            }
            Err(()) => {
                ok = false;
                None
            }
        }
    };
    let image_url = url(Known::ImageUrl, image);
    let audio_url = url(Known::AudioUrl, audio);
    let mask_url = url(Known::MaskUrl, mask);

    let mut parsed = |k: Known, value: Result<Option<&'a str>, ()>, allowed: &str| match value {
        Ok(Some(text)) => {
            let result = match k {
                Known::Resolution => text.parse::<Resolution>().map(Parsed::Resolution).ok(),
                Known::Provider => text.parse::<Provider>().map(Parsed::Provider).ok(),
                _ => parse_seed(text).map(Parsed::Seed),
            };
            if result.is_none() {
                problems.push(line, k.name(), format!("{} is not {allowed}", quoted(text)));
                ok = false;
            }
            result
        }
        Ok(None) => None,
        Err(()) => {
            ok = false;
            None
        }
    };
    let resolution = match parsed(Known::Resolution, resolution, "480p or 720p") {
        Some(Parsed::Resolution(r)) => Some(r),
        _ => None,
    };
    let seed = match parsed(Known::Seed, seed, "-1 or an integer from 0 to 2147483647") {
        Some(Parsed::Seed(s)) => Some(s),
        _ => None,
    };
    let provider = match parsed(Known::Provider, provider, "auto, value or official") {
        Some(Parsed::Provider(p)) => Some(p),
        _ => None,
    };
    let prompt = match prompt {
        Ok(p) => p,
        Err(()) => {
            ok = false;
            None
        }
    };

    if let (true, Some(image_url), Some(audio_url)) = (ok, image_url, audio_url) {
        failed.row = Some(RowView {
            image_url,
            mask_url,
            audio_url,
            prompt,
            resolution,
            seed,
            provider,
        });
    }
    failed
}

enum Parsed {
    Resolution(Resolution),
    Seed(i64),
    Provider(Provider),
}

fn parse_seed(text: &str) -> Option<i64> {
    // Only plain digits: "+5" or " 5" would be accepted by `parse` alone.
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seed = text.parse::<i64>().ok()?;
    (seed == -1 || (0..=MAX_SEED).contains(&seed)).then_some(seed)
}

/// What is wrong with `id`, if anything.
fn id_problem(id: &str) -> Option<String> {
    const ALLOWED: &str = "use 1 to 128 of A-Z a-z 0-9 . _ - not starting with \".\"";
    if id.len() > MAX_ID_LEN {
        return Some(format!(
            "{} is too long for an id ({} characters); {ALLOWED}",
            quoted(id),
            id.chars().count()
        ));
    }
    if id.starts_with('.') {
        return Some(format!("{} starts with \".\"; {ALLOWED}", quoted(id)));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Some(format!(
            "{} has the character {c:?}, not allowed in an id; {ALLOWED}",
            quoted(id)
        ));
    }
    None
}

/// What is wrong with `text` as an http or https URL, if anything.
fn url_problem(text: &str) -> Option<String> {
    let why = match url::Url::parse(text) {
        Err(e) => e.to_string(),
        Ok(u) if !matches!(u.scheme(), "http" | "https") => {
            format!("its scheme is {}", u.scheme())
        }
        Ok(u) if u.host_str().is_none_or(str::is_empty) => "it has no host".to_owned(),
        Ok(_) => return None,
    };
    Some(format!(
        "{} is not an http or https URL ({why})",
        quoted(text)
    ))
}

fn cells(n: usize) -> String {
    if n == 1 {
        "1 cell".to_owned()
    } else {
        format!("{n} cells")
    }
}

/// `text` quoted for a message, cut short when long.
fn quoted(text: &str) -> String {
    const MAX_CHARS: usize = 60;
    match text.char_indices().nth(MAX_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}…", &text[..cut]),
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

// ---------------------------------------------------------------------------
// Problems

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

// ---------------------------------------------------------------------------
// Ids seen

/// The ids seen so far, in 16 bytes each whatever their length: 88 bits of
/// two independently keyed hashes of the id, and 40 bits of the line where
/// it first appeared. A million ids take about 35 MB at the table's worst.
/// A false duplicate needs two different ids to agree on 88 keyed bits,
/// about 2^-49 for a million rows.
struct IdSet {
    keys: [RandomState; 2],
    seen: HashSet<IdSlot, BuildHasherDefault<PassThrough>>,
}

const LINE_BITS: u32 = 40;
const LINE_MASK: u64 = (1 << LINE_BITS) - 1;

#[derive(Debug, Clone, Copy, Eq)]
struct IdSlot {
    hash: u64,
    /// High bits: more of the id's hash; low `LINE_BITS`: its first line.
    tail: u64,
}

impl PartialEq for IdSlot {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.tail >> LINE_BITS == other.tail >> LINE_BITS
    }
}

impl Hash for IdSlot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The slot's hash is already a keyed hash: hashing it again would only
/// cost time.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl IdSet {
    fn new() -> IdSet {
        IdSet {
            // Each `RandomState` gets its own SipHash key.
            keys: [RandomState::new(), RandomState::new()],
            seen: HashSet::default(),
        }
    }

    /// The line where `id` was first seen; records it at `line` if new.
    fn first_line_or_insert(&mut self, id: &str, line: u64) -> Option<u64> {
        let slot = IdSlot {
            hash: self.keys[0].hash_one(id),
            tail: (self.keys[1].hash_one(id) & !LINE_MASK) | line.min(LINE_MASK),
        };
        if let Some(first) = self.seen.get(&slot) {
            return Some(first.tail & LINE_MASK);
        }
        self.seen.insert(slot);
        None
    }
}

// ---------------------------------------------------------------------------
// Records: CSV parsing with exact line numbers and bounded memory

/// Why a record's cells were not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    TooLong,
    TooManyFields,
}

impl Fault {
    fn message(self) -> String {
        match self {
            Fault::TooLong => {
                format!("the row is longer than {MAX_ROW_BYTES} bytes (is a quote left open?)")
            }
            Fault::TooManyFields => format!("the row has more than {MAX_ROW_FIELDS} cells"),
        }
    }
}

/// Counts lines as a text editor does: LF, CRLF and a lone CR each end one.
#[derive(Debug, Clone, Copy)]
struct Lines {
    line: u64,
    after_cr: bool,
}

impl Lines {
    fn new(line: u64) -> Lines {
        Lines {
            line,
            after_cr: false,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        let Some(&last) = bytes.last() else {
            return;
        };
        if !bytes.contains(&b'\r') {
            let lf = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
            let joined = u64::from(self.after_cr && bytes[0] == b'\n');
            self.line += lf - joined;
            self.after_cr = false;
            return;
        }
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' => self.line += 1,
                b'\r' => {
                    self.line += 1;
                    self.after_cr = true;
                }
                _ => self.after_cr = false,
            }
        }
        debug_assert_eq!(self.after_cr, last == b'\r');
    }
}

/// One record, its cells borrowed from the parser.
struct Record<'p> {
    /// Line where the record starts.
    line: u64,
    fields: &'p [u8],
    ends: &'p [usize],
    fault: Option<Fault>,
    /// Where the next record starts (blank lines skipped).
    next_byte: u64,
    next_line: u64,
}

impl Record<'_> {
    fn len(&self) -> usize {
        if self.fault.is_some() {
            0
        } else {
            self.ends.len()
        }
    }

    fn bytes(&self, i: usize) -> (usize, &[u8]) {
        let start = if i == 0 {
            0
        } else {
            self.ends.get(i - 1).copied().unwrap_or(0)
        };
        let end = self.ends.get(i).copied().unwrap_or(start);
        (start, self.fields.get(start..end).unwrap_or_default())
    }

    /// Cell `i` as text, or the line of its first byte that is not UTF-8.
    fn text(&self, i: usize) -> Result<&str, u64> {
        let (start, bytes) = self.bytes(i);
        std::str::from_utf8(bytes).map_err(|e| {
            let upto = self
                .fields
                .get(..start + e.valid_up_to())
                .unwrap_or_default();
            let mut lines = Lines::new(self.line);
            lines.feed(upto);
            lines.line
        })
    }

    /// Whitespace only, e.g. a line of spaces or `,,,` from a spreadsheet:
    /// not a row.
    fn is_blank(&self) -> bool {
        self.fault.is_none() && self.fields.iter().all(|&b| matches!(b, b' ' | b'\t'))
    }
}

/// CSV records with the exact line each starts on and the byte offset of
/// the next one. Memory stays bounded: at most [`MAX_ROW_BYTES`] of cells.
struct RecordParser<R> {
    src: R,
    core: csv_core::Reader,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    eof: bool,
    /// File offset of `buf[pos]`.
    offset: u64,
    lines: Lines,
    /// A byte-order mark may still have to be skipped.
    at_file_start: bool,
    out: Vec<u8>,
    ends: Vec<usize>,
}

const READ_BUF: usize = 64 * 1024;

impl<R: Read> RecordParser<R> {
    /// Parses `src`, positioned at the start of the file (`start` = `None`)
    /// or at `(byte, line)`, the start of a record.
    fn new(src: R, start: Option<(u64, u64)>) -> RecordParser<R> {
        let mut core = csv_core::Reader::new();
        // csv-core drops a byte-order mark before the first record it reads,
        // wherever that is; a reader resumed at a row must parse it as a
        // reader from the start would, so feed it a blank line first. The
        // file's own mark is skipped in `next_record`.
        let (mut o, mut e) = ([0u8; 1], [0usize; 1]);
        let _ = core.read_record(b"\n", &mut o, &mut e);
        let (offset, line) = start.unwrap_or((0, 1));
        RecordParser {
            src,
            core,
            buf: vec![0; READ_BUF].into_boxed_slice(),
            pos: 0,
            filled: 0,
            eof: false,
            offset,
            lines: Lines::new(line),
            at_file_start: start.is_none(),
            out: vec![0; 4096],
            ends: vec![0; 64],
        }
    }

    fn into_inner(self) -> R {
        self.src
    }

    fn fill_at_least(&mut self, n: usize) -> io::Result<()> {
        while self.filled - self.pos < n && !self.eof {
            if self.pos > 0 {
                self.buf.copy_within(self.pos..self.filled, 0);
                self.filled -= self.pos;
                self.pos = 0;
            }
            match self.src.read(&mut self.buf[self.filled..]) {
                Ok(0) => self.eof = true,
                Ok(k) => self.filled += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn advance(&mut self, n: usize) {
        self.pos += n;
        self.offset += n as u64;
    }

    /// Skips line ends (blank lines) up to the next record or the end.
    fn skip_line_ends(&mut self) -> io::Result<()> {
        loop {
            self.fill_at_least(1)?;
            let avail = &self.buf[self.pos..self.filled];
            let n = avail
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            self.lines.feed(&avail[..n]);
            self.advance(n);
            if self.pos < self.filled || self.eof {
                return Ok(());
            }
        }
    }

    /// The next record, or `None` at the end of the file.
    fn next_record(&mut self) -> io::Result<Option<Record<'_>>> {
        use csv_core::ReadRecordResult as R;
        if self.at_file_start {
            self.at_file_start = false;
            self.fill_at_least(3)?;
            if self.buf[self.pos..self.filled].starts_with(b"\xef\xbb\xbf") {
                self.advance(3);
            }
        }
        self.skip_line_ends()?;
        if self.pos == self.filled {
            return Ok(None);
        }
        let line = self.lines.line;
        let (mut outlen, mut endlen) = (0, 0);
        let mut fault = None;
        loop {
            self.fill_at_least(1)?;
            let input = &self.buf[self.pos..self.filled];
            let (res, nin, nout, nend) =
                self.core
                    .read_record(input, &mut self.out[outlen..], &mut self.ends[endlen..]);
            self.lines.feed(&input[..nin]);
            self.advance(nin);
            outlen += nout;
            endlen += nend;
            match res {
                R::InputEmpty => {}
                R::OutputFull => {
                    if self.out.len() >= MAX_ROW_BYTES {
                        // Keep parsing to find where the record ends, but
                        // drop its cells.
                        fault.get_or_insert(Fault::TooLong);
                        (outlen, endlen) = (0, 0);
                    } else {
                        let len = (self.out.len() * 2).min(MAX_ROW_BYTES);
                        self.out.resize(len, 0);
                    }
                }
                R::OutputEndsFull => {
                    if self.ends.len() >= MAX_ROW_FIELDS {
                        fault.get_or_insert(Fault::TooManyFields);
                        (outlen, endlen) = (0, 0);
                    } else {
                        let len = (self.ends.len() * 2).min(MAX_ROW_FIELDS);
                        self.ends.resize(len, 0);
                    }
                }
                R::Record => break,
                R::End => return Ok(None),
            }
        }
        self.skip_line_ends()?;
        Ok(Some(Record {
            line,
            fields: self.out.get(..outlen).unwrap_or_default(),
            ends: self.ends.get(..endlen).unwrap_or_default(),
            fault,
            next_byte: self.offset,
            next_line: self.lines.line,
        }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const HEADER: &str = "image_url,audio_url\n";
    const ROW: &str = "https://x.test/a.png,https://x.test/a.mp3\n";

    fn file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(bytes).expect("write");
        f.flush().expect("flush");
        f
    }

    fn problems(bytes: &[u8]) -> Vec<String> {
        let f = file(bytes);
        match validate_path(f.path()) {
            Err(ManifestError::Invalid { problems, .. }) => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }

    fn summary(bytes: &[u8]) -> Summary {
        let f = file(bytes);
        validate_path(f.path()).expect("valid manifest")
    }

    /// One problem expected: the manifest breaks exactly one rule.
    fn one_problem(bytes: &[u8]) -> String {
        let mut list = problems(bytes);
        assert_eq!(list.len(), 1, "{list:#?}");
        list.remove(0)
    }

    /// A manifest with the required columns and `cells` in column `column`.
    fn with_column(column: &str, cell: &str) -> String {
        format!("image_url,audio_url,{column}\nhttps://x.test/a.png,https://x.test/a.mp3,{cell}\n")
    }

    fn read_all(path: &Path, from: Option<ReadPosition>) -> Vec<(ManifestRow, ReadPosition)> {
        let mut reader = RowReader::open(path, from).expect("open");
        let mut rows = Vec::new();
        while let Some(item) = reader.next_row().expect("row") {
            rows.push(item);
        }
        rows
    }

    fn sha_hex(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    const QUIRKY: &[u8] = b"\xef\xbb\xbf Id ,IMAGE_URL , audio_url,Mask_Url,prompt,resolution,seed,provider,Note,client ref\r\n\
a-1,  https://x.test/a.png  ,https://x.test/a.mp3,,\"Hello, \"\"world\"\"\r\nsecond line\",720p,-1,auto,  first ,c1\r\n\
\r\n\
,http://x.test/b.png,https://x.test/b.wav,https://x.test/m.png,,480p, 42 ,value,\"multi\nline note\",\r\n\
z.9_Z,https://x.test/c.png,https://x.test/c.m4a,,   ,,2147483647,official,,c3\r\n";

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
    fn every_column_and_quirk_reads_back() {
        let f = file(QUIRKY);
        let mut reader = RowReader::open(f.path(), None).expect("open");
        assert_eq!(reader.extra_columns(), ["Note", "client ref"]);
        let mut rows = Vec::new();
        while let Some(item) = reader.next_row().expect("row") {
            rows.push(item);
        }
        assert_eq!(rows.len(), 3);
        let (r1, p1) = &rows[0];
        assert_eq!((r1.index, r1.line, r1.id.as_str()), (1, 2, "a-1"));
        assert_eq!(
            r1.spec,
            RowSpec {
                image_url: "https://x.test/a.png".into(),
                mask_url: None,
                audio_url: "https://x.test/a.mp3".into(),
                prompt: Some("Hello, \"world\"\r\nsecond line".into()),
                resolution: Some(Resolution::P720),
                seed: Some(-1),
                provider: Some(Provider::Auto),
            }
        );
        assert_eq!(r1.extra, vec!["first", "c1"]);
        assert_eq!((p1.line, p1.rows_read), (5, 1));
        let (r2, p2) = &rows[1];
        assert_eq!((r2.index, r2.line, r2.id.as_str()), (2, 5, "2"));
        assert_eq!(r2.spec.mask_url.as_deref(), Some("https://x.test/m.png"));
        assert_eq!(r2.spec.prompt, None);
        assert_eq!(r2.spec.seed, Some(42));
        assert_eq!(r2.spec.provider, Some(Provider::Value));
        assert_eq!(r2.extra, vec!["multi\nline note", ""]);
        assert_eq!((p2.line, p2.rows_read), (7, 2));
        let (r3, p3) = &rows[2];
        assert_eq!((r3.index, r3.line, r3.id.as_str()), (3, 7, "z.9_Z"));
        assert_eq!(r3.spec.prompt, None);
        assert_eq!(r3.spec.resolution, None);
        assert_eq!(r3.spec.seed, Some(MAX_SEED));
        assert_eq!(r3.spec.provider, Some(Provider::Official));
        assert_eq!(r3.extra, vec!["", "c3"]);
        assert_eq!(p3.byte, QUIRKY.len() as u64);
        assert_eq!((p3.line, p3.rows_read), (8, 3));
    }

    #[test]
    fn resuming_at_any_saved_position_reads_the_same_rows() {
        let mut quirky_more = QUIRKY.to_vec();
        quirky_more.extend_from_slice(
            "x,https://x.test/d.png,https://x.test/d.mp3,,,,,,,\n\n  \nlast,https://x.test/e.png,https://x.test/e.mp3,,\"p\rq\",,,,,"
                .as_bytes(),
        );
        for bytes in [QUIRKY, quirky_more.as_slice()] {
            let f = file(bytes);
            let whole = read_all(f.path(), None);
            for (k, (_, pos)) in whole.iter().enumerate() {
                let rest = read_all(f.path(), Some(*pos));
                assert_eq!(rest.as_slice(), &whole[k + 1..]);
            }
            // Piecewise: reopen after every row.
            let mut pos = None;
            let mut pieces = Vec::new();
            loop {
                let mut reader = RowReader::open(f.path(), pos).expect("open");
                match reader.next_row().expect("row") {
                    Some((row, next)) => {
                        pieces.push((row, next));
                        pos = Some(next);
                    }
                    None => break,
                }
            }
            assert_eq!(pieces, whole);
        }
        let f = file(&quirky_more);
        let ids: Vec<_> = read_all(f.path(), None)
            .into_iter()
            .map(|(r, _)| (r.id, r.line))
            .collect();
        assert_eq!(ids.len(), 5);
        assert_eq!(ids[4], ("last".to_owned(), 11));
    }

    #[test]
    fn a_row_starting_with_a_byte_order_mark_reads_the_same_when_resumed() {
        let text = "\u{feff}prompt,image_url,audio_url\n\
            a,https://x.test/a.png,https://x.test/a.mp3\n\
            \u{feff}b,https://x.test/a.png,https://x.test/a.mp3\n";
        let f = file(text.as_bytes());
        let whole = read_all(f.path(), None);
        assert_eq!(whole[1].0.spec.prompt.as_deref(), Some("\u{feff}b"));
        assert_eq!(read_all(f.path(), Some(whole[0].1)), &whole[1..]);
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
    fn missing_required_column_cites_line_1() {
        assert_eq!(
            one_problem(b"image_url,prompt\nhttps://x.test/a.png,hi\n"),
            "line 1: column audio_url: the header has no audio_url column; it is required"
        );
        assert_eq!(
            problems(b"id\n1\n"),
            vec![
                "line 1: column image_url: the header has no image_url column; it is required",
                "line 1: column audio_url: the header has no audio_url column; it is required",
            ]
        );
    }

    #[test]
    fn duplicate_column_names_are_rejected() {
        assert_eq!(
            one_problem(
                format!(
                    "image_url,audio_url,Image_URL \n{}",
                    ROW.replace('\n', ",x\n")
                )
                .as_bytes()
            ),
            "line 1: column image_url: the header names this column twice (column names ignore case)"
        );
        assert_eq!(
            one_problem(
                b"image_url,audio_url,Note,NOTE\nhttps://x.test/a.png,https://x.test/a.mp3,a,b\n"
            ),
            "line 1: column NOTE: the header names this column twice (column names ignore case)"
        );
    }

    #[test]
    fn blank_column_name_is_rejected() {
        assert_eq!(
            one_problem(b"image_url,audio_url, \nhttps://x.test/a.png,https://x.test/a.mp3,x\n"),
            "line 1: column -: column 3 of the header has no name; name it or remove it"
        );
    }

    #[test]
    fn column_names_ignore_case_order_and_spaces() {
        let s = summary(b" Audio_URL ,IMAGE_url\nhttps://x.test/a.mp3,https://x.test/a.png\n");
        assert_eq!(s.rows, 1);
        assert!(s.extra_columns.is_empty());
    }

    #[test]
    fn byte_order_mark_is_not_part_of_the_first_name() {
        let f = file(
            b"\xef\xbb\xbfid,image_url,audio_url\nabc,https://x.test/a.png,https://x.test/a.mp3\n",
        );
        let rows = read_all(f.path(), None);
        assert_eq!(rows[0].0.id, "abc");
        assert!(
            validate_path(f.path())
                .expect("valid")
                .extra_columns
                .is_empty()
        );
    }

    #[test]
    fn wrong_number_of_cells_is_rejected() {
        let text = format!("{HEADER}{ROW}https://x.test/a.png,https://x.test/a.mp3,extra\n");
        assert_eq!(
            one_problem(text.as_bytes()),
            "line 3: column -: the row has 3 cells but the header has 2"
        );
        let text = format!("{HEADER}https://x.test/a.png\n");
        assert_eq!(
            one_problem(text.as_bytes()),
            "line 2: column -: the row has 1 cell but the header has 2"
        );
    }

    #[test]
    fn quote_left_open_is_hinted() {
        let text = format!("{HEADER}\"https://x.test/a.png,https://x.test/a.mp3\n{ROW}{ROW}");
        assert_eq!(
            one_problem(text.as_bytes()),
            "line 2: column -: the row has 1 cell but the header has 2 (is a quote left open?)"
        );
    }

    #[test]
    fn invalid_ids_are_rejected() {
        let cases = [
            ("a b", "\"a b\" has the character ' ', not allowed in an id"),
            (".hidden", "\".hidden\" starts with \".\""),
            ("x/y", "\"x/y\" has the character '/', not allowed in an id"),
            ("é", "\"é\" has the character 'é', not allowed in an id"),
        ];
        for (id, what) in cases {
            assert_eq!(
                one_problem(with_column("id", id).as_bytes()),
                format!(
                    "line 2: column id: {what}; use 1 to 128 of A-Z a-z 0-9 . _ - not starting with \".\""
                )
            );
        }
        let long = "a".repeat(129);
        assert_eq!(
            one_problem(with_column("id", &long).as_bytes()),
            format!(
                "line 2: column id: \"{}\"… is too long for an id (129 characters); use 1 to 128 of A-Z a-z 0-9 . _ - not starting with \".\"",
                "a".repeat(60)
            )
        );
        summary(with_column("id", &"a".repeat(128)).as_bytes());
        summary(with_column("id", "A-z_0.9").as_bytes());
    }

    #[test]
    fn duplicate_ids_cite_the_first_line() {
        let text = "id,image_url,audio_url\n\
            a,https://x.test/a.png,https://x.test/a.mp3\n\
            \n\
            b,https://x.test/a.png,https://x.test/a.mp3\n\
            a,https://x.test/a.png,https://x.test/a.mp3\n";
        assert_eq!(
            one_problem(text.as_bytes()),
            "line 5: column id: \"a\" is already the id of the row on line 2; ids must be unique"
        );
    }

    #[test]
    fn default_ids_take_part_in_uniqueness() {
        // Explicit "3" first, then the third row's default id.
        let text = "id,image_url,audio_url\n\
            3,https://x.test/a.png,https://x.test/a.mp3\n\
            ,https://x.test/a.png,https://x.test/a.mp3\n\
            ,https://x.test/a.png,https://x.test/a.mp3\n";
        assert_eq!(
            one_problem(text.as_bytes()),
            "line 4: column id: the default id \"3\" (this row's number) is already the id of the row on line 2; ids must be unique"
        );
        // A default first, then the same id written out.
        let text = "id,image_url,audio_url\n\
            ,https://x.test/a.png,https://x.test/a.mp3\n\
            1,https://x.test/a.png,https://x.test/a.mp3\n";
        assert_eq!(
            one_problem(text.as_bytes()),
            "line 3: column id: \"1\" is already the id of the row on line 2; ids must be unique"
        );
    }

    #[test]
    fn ids_are_case_sensitive() {
        let text = "id,image_url,audio_url\n\
            a,https://x.test/a.png,https://x.test/a.mp3\n\
            A,https://x.test/a.png,https://x.test/a.mp3\n";
        assert_eq!(summary(text.as_bytes()).rows, 2);
    }

    #[test]
    fn blank_required_url_is_rejected() {
        assert_eq!(
            one_problem(format!("{HEADER} ,https://x.test/a.mp3\n").as_bytes()),
            "line 2: column image_url: is blank; an http or https URL is required"
        );
        assert_eq!(
            one_problem(format!("{HEADER}https://x.test/a.png,\n").as_bytes()),
            "line 2: column audio_url: is blank; an http or https URL is required"
        );
    }

    #[test]
    fn urls_must_be_http_or_https_with_a_host() {
        let cases = [
            (
                "a.mp3",
                "\"a.mp3\" is not an http or https URL (relative URL without a base)",
            ),
            (
                "ftp://x.test/a.mp3",
                "\"ftp://x.test/a.mp3\" is not an http or https URL (its scheme is ftp)",
            ),
            (
                "https://",
                "\"https://\" is not an http or https URL (empty host)",
            ),
            (
                "file:///a.mp3",
                "\"file:///a.mp3\" is not an http or https URL (its scheme is file)",
            ),
        ];
        for (url, what) in cases {
            assert_eq!(
                one_problem(format!("{HEADER}https://x.test/a.png,{url}\n").as_bytes()),
                format!("line 2: column audio_url: {what}")
            );
            assert_eq!(
                one_problem(format!("{HEADER}{url},https://x.test/a.mp3\n").as_bytes()),
                format!("line 2: column image_url: {what}")
            );
        }
        summary(
            format!("{HEADER}HTTP://X.test:8080/a%20b.png?x=1,http://127.0.0.1/a\n").as_bytes(),
        );
    }

    #[test]
    fn mask_url_is_optional_but_checked() {
        summary(with_column("mask_url", " ").as_bytes());
        assert_eq!(
            one_problem(with_column("mask_url", "mask.png").as_bytes()),
            "line 2: column mask_url: \"mask.png\" is not an http or https URL (relative URL without a base)"
        );
    }

    #[test]
    fn resolution_is_480p_or_720p() {
        summary(with_column("resolution", " 480p ").as_bytes());
        summary(with_column("resolution", "").as_bytes());
        for bad in ["1080p", "720P", "480"] {
            assert_eq!(
                one_problem(with_column("resolution", bad).as_bytes()),
                format!("line 2: column resolution: \"{bad}\" is not 480p or 720p")
            );
        }
    }

    #[test]
    fn seed_is_minus_one_or_in_range() {
        for good in ["-1", "0", "2147483647", "007"] {
            summary(with_column("seed", good).as_bytes());
        }
        for bad in [
            "abc",
            "-2",
            "2147483648",
            "+5",
            "1.5",
            "99999999999999999999",
            "-",
        ] {
            assert_eq!(
                one_problem(with_column("seed", bad).as_bytes()),
                format!(
                    "line 2: column seed: \"{bad}\" is not -1 or an integer from 0 to 2147483647"
                )
            );
        }
    }

    #[test]
    fn provider_is_auto_value_or_official() {
        for good in ["auto", "value", "official", ""] {
            summary(with_column("provider", good).as_bytes());
        }
        for bad in ["fast", "Auto"] {
            assert_eq!(
                one_problem(with_column("provider", bad).as_bytes()),
                format!("line 2: column provider: \"{bad}\" is not auto, value or official")
            );
        }
    }

    #[test]
    fn prompt_is_any_text() {
        summary(
            with_column("prompt", "\"anything, at all: \"\"quoted\"\"\n\tand more\"").as_bytes(),
        );
    }

    #[test]
    fn bytes_not_utf8_cite_their_line_and_column() {
        // The bad byte is on the second line of a row that starts on line 3.
        let mut text =
            format!("image_url,audio_url,prompt\n{}", ROW.replace('\n', ",ok\n")).into_bytes();
        text.extend_from_slice(
            b"https://x.test/a.png,https://x.test/a.mp3,\"first\r\nsecond \xff\"\n",
        );
        assert_eq!(
            one_problem(&text),
            "line 4: column prompt: has bytes that are not UTF-8; a manifest must be UTF-8"
        );
        let text = b"image_url,audio_url,no\xe9\nhttps://x.test/a.png,https://x.test/a.mp3,x\n";
        assert_eq!(
            one_problem(text),
            "line 1: column -: the name of column 3 has bytes that are not UTF-8; a manifest must be UTF-8"
        );
        let text = b"image_url,audio_url,note\nhttps://x.test/a.png,https://x.test/a.mp3,caf\xe9\n";
        assert_eq!(
            one_problem(text),
            "line 2: column note: has bytes that are not UTF-8; a manifest must be UTF-8"
        );
    }

    #[test]
    fn line_numbers_count_as_an_editor_does() {
        let bad = "https://x.test/a.png,nope\n";
        // LF, blank lines, a quoted field over three lines.
        let text = format!(
            "image_url,audio_url,prompt\n\n{},\"a\nb\nc\"\n\n\n{}",
            ROW.trim_end(),
            bad.replace('\n', ",\n")
        );
        assert_eq!(
            one_problem(text.as_bytes()),
            "line 8: column audio_url: \"nope\" is not an http or https URL (relative URL without a base)"
        );
        // The same with CRLF.
        let crlf = text.replace('\n', "\r\n");
        assert_eq!(
            one_problem(crlf.as_bytes()),
            "line 8: column audio_url: \"nope\" is not an http or https URL (relative URL without a base)"
        );
        // Old Mac line ends: a lone CR ends a line too.
        let cr = text.replace('\n', "\r");
        assert_eq!(
            one_problem(cr.as_bytes()),
            "line 8: column audio_url: \"nope\" is not an http or https URL (relative URL without a base)"
        );
        // No line end at the end of the file.
        let text = format!("{HEADER}{ROW}{}", bad.trim_end());
        assert_eq!(
            one_problem(text.as_bytes()),
            "line 3: column audio_url: \"nope\" is not an http or https URL (relative URL without a base)"
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
            text.push_str("https://x.test/a.png,bad\n");
        }
        let list = problems(text.as_bytes());
        assert_eq!(list.len(), MAX_PROBLEMS + 1);
        assert_eq!(
            list[MAX_PROBLEMS],
            "line 1002: column -: 500 more problem(s) from this line on are not listed"
        );
    }

    #[test]
    fn overlong_row_is_rejected_and_parsing_goes_on() {
        let mut text = format!("{HEADER}{ROW}").into_bytes();
        text.extend_from_slice(b"\"");
        text.extend(std::iter::repeat_n(b'x', MAX_ROW_BYTES + 10));
        text.extend_from_slice(b"\nmore\",https://x.test/a.mp3\n");
        text.extend_from_slice(b"https://x.test/a.png,bad\n");
        assert_eq!(
            problems(&text),
            vec![
                "line 3: column -: the row is longer than 1048576 bytes (is a quote left open?)",
                "line 5: column audio_url: \"bad\" is not an http or https URL (relative URL without a base)",
            ]
        );
    }

    #[test]
    fn too_many_cells_is_rejected() {
        let mut text = format!("{HEADER}{ROW}");
        text.push_str(&",".repeat(MAX_ROW_FIELDS + 5));
        text.push_str("x\n");
        assert_eq!(
            one_problem(text.as_bytes()),
            "line 3: column -: the row has more than 4096 cells"
        );
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let inputs: [&[u8]; 8] = [
            b"\"",
            b"\"\"\"",
            b"\xef\xbb",
            b"\x00\x01\x02,\xff\xfe\n\r\r\n\"",
            b"image_url,audio_url\n\"\r",
            b"image_url,audio_url\n\xef\xbb\xbf,\n",
            b",,,,\n,,,,\n",
            b"\r",
        ];
        for input in inputs {
            let f = file(input);
            let _ = validate_path(f.path());
            if let Ok(mut reader) = RowReader::open(f.path(), None) {
                while let Ok(Some(_)) = reader.next_row() {}
            }
        }
    }

    #[test]
    fn reader_reports_a_file_that_no_longer_validates() {
        let text = format!("{HEADER}{ROW}https://x.test/a.png,bad\n");
        let f = file(text.as_bytes());
        let mut reader = RowReader::open(f.path(), None).expect("open");
        assert!(reader.next_row().expect("first row").is_some());
        match reader.next_row() {
            Err(ManifestError::Invalid { problems, .. }) => assert_eq!(
                problems[0].to_string(),
                "line 3: column audio_url: \"bad\" is not an http or https URL (relative URL without a base)"
            ),
            other => panic!("expected Invalid, got {other:?}"),
        }
        match RowReader::open(Path::new("/nonexistent/manifest.csv"), None) {
            Err(ManifestError::Io { .. }) => {}
            Err(e) => panic!("expected Io, got {e}"),
            Ok(_) => panic!("expected Io, got a reader"),
        }
        match RowReader::open(file(b"id\n1\n").path(), None) {
            Err(ManifestError::Invalid { problems, .. }) => assert_eq!(problems.len(), 2),
            Err(e) => panic!("expected Invalid, got {e}"),
            Ok(_) => panic!("expected Invalid, got a reader"),
        }
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

    /// Hands out one byte per read, to exercise every buffer boundary.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((&b, rest)), Some(slot)) => {
                    *slot = b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    type Parsed = (u64, Vec<Vec<u8>>, Option<Fault>, u64, u64);

    fn parse_all<R: Read>(src: R) -> Vec<Parsed> {
        let mut parser = RecordParser::new(src, None);
        let mut out = Vec::new();
        while let Some(r) = parser.next_record().expect("read") {
            let cells = (0..r.len()).map(|i| r.bytes(i).1.to_vec()).collect();
            out.push((r.line, cells, r.fault, r.next_byte, r.next_line));
        }
        out
    }

    #[test]
    fn records_do_not_depend_on_read_sizes() {
        let mut more = QUIRKY.to_vec();
        more.extend_from_slice(b"a,\"b\r\r\nc\"\r\rd\n");
        for bytes in [QUIRKY, more.as_slice()] {
            assert_eq!(parse_all(Trickle(bytes)), parse_all(bytes));
        }
        let parsed = parse_all(more.as_slice());
        let last = parsed.last().expect("records");
        assert_eq!(last.0, 12);
        assert_eq!(last.1, vec![b"d".to_vec()]);
        assert_eq!(
            parsed[parsed.len() - 2].1,
            vec![b"a".to_vec(), b"b\r\r\nc".to_vec()]
        );
    }

    #[test]
    fn lines_counts_cr_lf_and_crlf_once_each() {
        let text = b"a\nb\r\nc\rd\r\r\n\n";
        let mut whole = Lines::new(1);
        whole.feed(text);
        assert_eq!(whole.line, 7);
        for split in 0..text.len() {
            let mut parts = Lines::new(1);
            parts.feed(&text[..split]);
            parts.feed(&text[split..]);
            assert_eq!(parts.line, 7, "split at {split}");
        }
    }

    #[test]
    fn id_set_finds_repeats() {
        // The set's memory per id is what keeps a million rows small.
        assert_eq!(std::mem::size_of::<IdSlot>(), 16);
        let mut ids = IdSet::new();
        for i in 0..10_000u64 {
            assert_eq!(ids.first_line_or_insert(&i.to_string(), i + 2), None);
        }
        assert_eq!(ids.first_line_or_insert("42", 99_999), Some(44));
        assert_eq!(ids.first_line_or_insert("x", u64::MAX), None);
        assert_eq!(ids.first_line_or_insert("x", 1), Some(LINE_MASK));
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
