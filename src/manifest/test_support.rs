//! Helpers shared by the manifest module's unit tests: small manifests
//! written to temporary files, and what validating or reading them yields.

use std::io::Write;
use std::path::Path;

use super::{ManifestError, ManifestRow, ReadPosition, RowReader, Summary, validate_path};

pub(super) const HEADER: &str = "image_url,audio_url\n";
pub(super) const ROW: &str = "https://x.test/a.png,https://x.test/a.mp3\n";

/// Every column, in odd case and spacing, after a byte-order mark: CRLF line
/// ends, a quoted cell over two lines, a blank line, blank cells.
pub(super) const QUIRKY: &[u8] = b"\xef\xbb\xbf Id ,IMAGE_URL , audio_url,Mask_Url,prompt,resolution,seed,provider,Note,client ref\r\n\
a-1,  https://x.test/a.png  ,https://x.test/a.mp3,,\"Hello, \"\"world\"\"\r\nsecond line\",720p,-1,auto,  first ,c1\r\n\
\r\n\
,http://x.test/b.png,https://x.test/b.wav,https://x.test/m.png,,480p, 42 ,value,\"multi\nline note\",\r\n\
z.9_Z,https://x.test/c.png,https://x.test/c.m4a,,   ,,2147483647,official,,c3\r\n";

pub(super) fn file(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(bytes).expect("write");
    f.flush().expect("flush");
    f
}

pub(super) fn problems(bytes: &[u8]) -> Vec<String> {
    let f = file(bytes);
    match validate_path(f.path()) {
        Err(ManifestError::Invalid { problems, .. }) => {
            problems.iter().map(ToString::to_string).collect()
        }
        other => panic!("expected problems, got {other:?}"),
    }
}

pub(super) fn summary(bytes: &[u8]) -> Summary {
    let f = file(bytes);
    validate_path(f.path()).expect("valid manifest")
}

/// One problem expected: the manifest breaks exactly one rule.
pub(super) fn one_problem(bytes: &[u8]) -> String {
    let mut list = problems(bytes);
    assert_eq!(list.len(), 1, "{list:#?}");
    list.remove(0)
}

/// A manifest with the required columns and `cells` in column `column`.
pub(super) fn with_column(column: &str, cell: &str) -> String {
    format!("image_url,audio_url,{column}\nhttps://x.test/a.png,https://x.test/a.mp3,{cell}\n")
}

pub(super) fn read_all(
    path: &Path,
    from: Option<ReadPosition>,
) -> Vec<(ManifestRow, ReadPosition)> {
    let mut reader = RowReader::open(path, from).expect("open");
    let mut rows = Vec::new();
    while let Some(item) = reader.next_row().expect("row") {
        rows.push(item);
    }
    rows
}
