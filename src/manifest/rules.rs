//! Rules: the contract's columns and what one row's cells must be.
//!
//! Maps the header to the columns the contract knows, checks each row's cells
//! (URLs, ids, resolution, seed, provider, UTF-8) and keeps the set of ids
//! seen, for uniqueness. Problems about the header, a row's shape or its
//! cells are worded here.
//!
//! It never reads the file (records come from `record`) and keeps nothing of
//! a row once checked but its id's 16-byte fingerprint.

use std::borrow::Cow;
use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};

use super::record::Record;
use super::{MAX_ID_LEN, Problems, WHOLE_FILE};
use crate::spec::{MAX_SEED, Provider, Resolution};

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
pub(super) struct Columns {
    /// Cells a row must have.
    width: usize,
    /// Name to cite for each cell position (lower case for known columns).
    names: Vec<String>,
    /// Cell position of each known column, by [`Known::slot`].
    known_at: [Option<usize>; 8],
    /// Cell positions of the extra columns, in header order.
    pub(super) extra_fields: Vec<usize>,
    /// Their names as written (trimmed).
    pub(super) extra_names: Vec<String>,
}

impl Columns {
    pub(super) fn from_header(header: &Record<'_>, problems: &mut Problems) -> Columns {
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
    /// Cell position of the `id` column, if the header has one.
    pub(super) fn id_field(&self) -> Option<usize> {
        self.known_at[Known::Id.slot()]
    }

    fn name(&self, i: usize) -> &str {
        self.names.get(i).map_or(WHOLE_FILE, String::as_str)
    }
}

/// A row's cells, valid by the contract (uniqueness of ids aside).
#[derive(Debug)]
pub(super) struct RowView<'a> {
    pub(super) image_url: &'a str,
    pub(super) mask_url: Option<&'a str>,
    pub(super) audio_url: &'a str,
    pub(super) prompt: Option<&'a str>,
    pub(super) resolution: Option<Resolution>,
    pub(super) seed: Option<i64>,
    pub(super) provider: Option<Provider>,
}

/// What checking one row found.
pub(super) struct Checked<'a> {
    /// The row's id (defaulted when blank) when it is a valid id, for the
    /// uniqueness check.
    pub(super) id: Option<Cow<'a, str>>,
    id_defaulted: bool,
    /// The row, when it broke no rule.
    pub(super) row: Option<RowView<'a>>,
    /// Cells that name local files, by [`crate::media::Column::index`]:
    /// checked against the media root by the caller, even when the row
    /// broke other rules (every problem is listed).
    pub(super) local: [Option<&'a str>; 3],
}

/// Checks every rule of the contract that one row can break on its own.
pub(super) fn check_row<'a>(
    columns: &Columns,
    record: &'a Record<'_>,
    index: u64,
    problems: &mut Problems,
) -> Checked<'a> {
    let mut failed = Checked {
        id: None,
        id_defaulted: false,
        row: None,
        local: [None; 3],
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

    let mut local = [None; 3];
    let mut url = |k: Known, value: Result<Option<&'a str>, ()>| -> Option<&'a str> {
        match value {
            // A local path is checked against the media root by the caller
            // (`crate::media`): these rules never touch the disk.
            Ok(Some(text)) if crate::media::is_local(text) => {
                let column = match k {
                    Known::ImageUrl => crate::media::Column::Image,
                    Known::MaskUrl => crate::media::Column::Mask,
                    _ => crate::media::Column::Audio,
                };
                local[usize::from(column.index())] = Some(text);
                Some(text)
            }
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
    failed.local = local;

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

/// The ids seen so far, in 16 bytes each whatever their length: 88 bits of
/// two independently keyed hashes of the id, and 40 bits of the line where
/// it first appeared. A million ids take about 35 MB at the table's worst.
/// A false duplicate needs two different ids to agree on 88 keyed bits,
/// about 2^-49 for a million rows.
pub(super) struct IdSet {
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
    pub(super) fn new() -> IdSet {
        IdSet {
            // Each `RandomState` gets its own SipHash key.
            keys: [RandomState::new(), RandomState::new()],
            seen: HashSet::default(),
        }
    }

    /// Records the id of a row checked on `line`, or reports it when an
    /// earlier row has it already.
    pub(super) fn check_unique(
        &mut self,
        checked: &Checked<'_>,
        line: u64,
        problems: &mut Problems,
    ) {
        if let Some(id) = &checked.id
            && let Some(first) = self.first_line_or_insert(id, line)
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
            problems.push(line, Known::Id.name(), message);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::test_support::{HEADER, ROW, one_problem, problems, summary, with_column};

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
                "\"a.mp3\" is not an http or https URL, and local files can only be sent to the API once published: set --media-url URL (served by this daemon's listener) or --media-store s3://BUCKET/PREFIX (an object store); neither is set",
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
            "line 2: column mask_url: \"mask.png\" is not an http or https URL, and local files can only be sent to the API once published: set --media-url URL (served by this daemon's listener) or --media-store s3://BUCKET/PREFIX (an object store); neither is set"
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
}
