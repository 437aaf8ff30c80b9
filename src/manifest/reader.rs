//! The resumable reader: the rows of an accepted manifest, in order, from the
//! start or from a saved [`ReadPosition`].
//!
//! The dispatcher reads rows ahead from `OUTBOX/BATCH/manifest.csv` rather
//! than the store holding a copy of every queued row; after a restart it
//! resumes at the position the store saved.
//!
//! It never validates a whole file: that is [`validate_path`](super::validate_path)'s
//! job, done before a manifest is accepted, so it keeps no set of ids. It
//! never skips a bad row either: a row that breaks a rule is an error, since
//! an accepted manifest does not change.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::record::RecordParser;
use super::rules::{Columns, check_row};
use super::{
    MAX_PROBLEMS, ManifestError, ManifestRow, Problems, ReadPosition, WHOLE_FILE, invalid,
};
use crate::spec::RowSpec;

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

    /// Data rows read so far (the index of the last one).
    pub fn rows_read(&self) -> u64 {
        self.rows_read
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

impl RowReader {
    /// The next row's number and id, with the position just after it,
    /// without checking the row: the manifest was validated when it was
    /// accepted. Several times faster than [`RowReader::next_row`], for
    /// skipping ahead and searching by id; its rows and positions are those
    /// `next_row` gives.
    pub fn next_id(&mut self) -> Result<Option<(u64, String, ReadPosition)>, ManifestError> {
        let id_field = self.columns.id_field();
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
            let id = id_field
                .and_then(|i| record.text(i).ok())
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map_or_else(|| index.to_string(), str::to_owned);
            self.rows_read = index;
            let next = ReadPosition {
                byte: record.next_byte,
                line: record.next_line,
                rows_read: index,
            };
            return Ok(Some((index, id, next)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::test_support::{HEADER, QUIRKY, ROW, file, read_all};
    use crate::spec::{MAX_SEED, Provider, Resolution};

    #[test]
    fn ids_and_positions_without_checks_match_the_rows() {
        let f = file(QUIRKY);
        let mut full = RowReader::open(f.path(), None).expect("open");
        let mut quick = RowReader::open(f.path(), None).expect("open");
        while let Some((row, pos)) = full.next_row().expect("row") {
            let (index, id, quick_pos) = quick.next_id().expect("id").expect("same rows");
            assert_eq!((index, id, quick_pos), (row.index, row.id, pos));
        }
        assert!(quick.next_id().expect("end").is_none());
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
    fn reader_reports_a_file_that_no_longer_validates() {
        let text = format!("{HEADER}{ROW}https://x.test/a.png,ftp://x.test/bad\n");
        let f = file(text.as_bytes());
        let mut reader = RowReader::open(f.path(), None).expect("open");
        assert!(reader.next_row().expect("first row").is_some());
        match reader.next_row() {
            Err(ManifestError::Invalid { problems, .. }) => assert_eq!(
                problems[0].to_string(),
                "line 3: column audio_url: \"ftp://x.test/bad\" is not an http or https URL (its scheme is ftp)"
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
}
