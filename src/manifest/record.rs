//! Records: the bytes of a manifest split into CSV records (on csv-core),
//! each with the exact line it starts on and the byte offset of the next.
//!
//! It exists so that problems cite lines as a text editor counts them (LF,
//! CRLF and a lone CR each end one), a byte-order mark is dropped only at the
//! start of the file, reading can resume at any saved record, and memory
//! stays bounded whatever the input ([`MAX_ROW_BYTES`], [`MAX_ROW_FIELDS`]).
//!
//! It knows nothing of columns or the contract's rules: it never judges a
//! cell, and never holds more than one record's cells.

use std::io::{self, Read};

use super::{MAX_ROW_BYTES, MAX_ROW_FIELDS};

/// Why a record's cells were not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    TooLong,
    TooManyFields,
}

impl Fault {
    pub(super) fn message(self) -> String {
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
pub(super) struct Record<'p> {
    /// Line where the record starts.
    pub(super) line: u64,
    fields: &'p [u8],
    ends: &'p [usize],
    pub(super) fault: Option<Fault>,
    /// Where the next record starts (blank lines skipped).
    pub(super) next_byte: u64,
    pub(super) next_line: u64,
}

impl Record<'_> {
    pub(super) fn len(&self) -> usize {
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
    pub(super) fn text(&self, i: usize) -> Result<&str, u64> {
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
    pub(super) fn is_blank(&self) -> bool {
        self.fault.is_none() && self.fields.iter().all(|&b| matches!(b, b' ' | b'\t'))
    }
}

/// CSV records with the exact line each starts on and the byte offset of
/// the next one. Memory stays bounded: at most [`MAX_ROW_BYTES`] of cells.
pub(super) struct RecordParser<R> {
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
    pub(super) fn new(src: R, start: Option<(u64, u64)>) -> RecordParser<R> {
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

    pub(super) fn into_inner(self) -> R {
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
    pub(super) fn next_record(&mut self) -> io::Result<Option<Record<'_>>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::test_support::{
        HEADER, QUIRKY, ROW, file, one_problem, problems, read_all,
    };
    use crate::manifest::{RowReader, validate_path};

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
            "line 8: column audio_url: \"nope\" is not an http or https URL, and local files can only be sent to the API once published: set --media-url URL (served by this daemon's listener) or --media-store s3://BUCKET/PREFIX (an object store); neither is set"
        );
        // The same with CRLF.
        let crlf = text.replace('\n', "\r\n");
        assert_eq!(
            one_problem(crlf.as_bytes()),
            "line 8: column audio_url: \"nope\" is not an http or https URL, and local files can only be sent to the API once published: set --media-url URL (served by this daemon's listener) or --media-store s3://BUCKET/PREFIX (an object store); neither is set"
        );
        // Old Mac line ends: a lone CR ends a line too.
        let cr = text.replace('\n', "\r");
        assert_eq!(
            one_problem(cr.as_bytes()),
            "line 8: column audio_url: \"nope\" is not an http or https URL, and local files can only be sent to the API once published: set --media-url URL (served by this daemon's listener) or --media-store s3://BUCKET/PREFIX (an object store); neither is set"
        );
        // No line end at the end of the file.
        let text = format!("{HEADER}{ROW}{}", bad.trim_end());
        assert_eq!(
            one_problem(text.as_bytes()),
            "line 3: column audio_url: \"nope\" is not an http or https URL, and local files can only be sent to the API once published: set --media-url URL (served by this daemon's listener) or --media-store s3://BUCKET/PREFIX (an object store); neither is set"
        );
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
                "line 5: column audio_url: \"bad\" is not an http or https URL, and local files can only be sent to the API once published: set --media-url URL (served by this daemon's listener) or --media-store s3://BUCKET/PREFIX (an object store); neither is set",
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
}
