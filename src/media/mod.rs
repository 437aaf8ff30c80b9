//! Local media: manifest cells that name files on this machine rather than
//! public URLs, checked when a manifest is accepted and published for the
//! API when a row is submitted.
//!
//! The API takes only public URLs. A cell of `image_url`, `mask_url` or
//! `audio_url` that is not an http(s) URL is a path under the media root
//! (`--media-root`, default `INBOX/media`). At acceptance each such file is
//! checked ([`local::resolve_local`]: inside the root, a regular file, an
//! accepted type within the API's limits) and its size, modification time
//! and SHA-256 are written to the batch's media table ([`table`]), one fixed
//! record a row, so that a million-row batch costs disk, not memory. At
//! submit, a [`publish::Publisher`] checks the file still holds those bytes
//! (else the row fails `MEDIA_CHANGED`) and turns it into a URL the API can
//! fetch: `--media-url` serves it from the listener's `/media/` route under
//! a token ([`serve`]); `--media-store` (object storage) plugs in at the
//! same seam.
//!
//! This module never decides a row's state: it answers with URLs or a
//! [`MediaError`], and the dispatcher records the outcome through the store.
//!
//! # Layout
//!
//! - this file: the columns, how a cell is told to be a URL or a path, the
//!   settings, the errors;
//! - `local`: a path checked and hashed, streaming;
//! - `check`: what manifest validation calls for each local cell (a bounded
//!   cache, the media table being written);
//! - `table`: the per-batch table of recorded files;
//! - `publish`: a local file into a URL at submit time;
//! - `serve`: the listener's `/media/{token}` route.

use std::path::{Path, PathBuf};

mod check;
pub mod local;
pub mod publish;
pub(crate) mod serve;
pub mod table;

pub use check::MediaCheck;
pub use local::{LocalMedia, MediaFormat, MediaRoot, resolve_local};
pub use publish::Publisher;

/// Fail code of a row whose local file no longer holds the bytes validated
/// at acceptance (changed, replaced or removed).
pub const MEDIA_CHANGED: &str = "MEDIA_CHANGED";
/// Fail code of a row with local files when the daemon runs with no way to
/// publish them (started without `--media-url` or `--media-store`).
pub const MEDIA_UNPUBLISHED: &str = "MEDIA_UNPUBLISHED";

/// Name of the media root under the inbox when `--media-root` is not given.
pub const DEFAULT_ROOT_DIR: &str = "media";

/// The manifest columns that may name media.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Column {
    Image,
    Mask,
    Audio,
}

impl Column {
    pub const ALL: [Column; 3] = [Column::Image, Column::Mask, Column::Audio];

    /// The column's name in a manifest.
    pub fn name(self) -> &'static str {
        match self {
            Column::Image => "image_url",
            Column::Mask => "mask_url",
            Column::Audio => "audio_url",
        }
    }

    /// Position in a media table record and in tokens.
    pub fn index(self) -> u8 {
        match self {
            Column::Image => 0,
            Column::Mask => 1,
            Column::Audio => 2,
        }
    }

    pub fn from_index(i: u8) -> Option<Column> {
        Column::ALL.get(usize::from(i)).copied()
    }

    pub(crate) fn is_audio(self) -> bool {
        self == Column::Audio
    }
}

/// What a media cell names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaRef<'a> {
    /// A URL (checked to be http or https by the manifest rules).
    Url(&'a str),
    /// A path: absolute, or relative to the media root.
    Local(&'a str),
}

/// Tells a URL from a local path. A cell that starts with a URL scheme and
/// `:` (`https:`, `ftp:`, `s3:`) is a URL, so that a mistyped scheme is
/// reported as such rather than looked for on disk; anything else is a path.
/// A path whose first segment holds a `:` can be written `./a:b.wav`.
pub fn classify(cell: &str) -> MediaRef<'_> {
    let cell = cell.trim();
    let scheme_end = cell.find(':');
    let is_url = scheme_end.is_some_and(|end| {
        let scheme = &cell[..end];
        scheme.len() >= 2
            && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    if is_url {
        MediaRef::Url(cell)
    } else {
        MediaRef::Local(cell)
    }
}

/// True when `cell` names a local file.
pub fn is_local(cell: &str) -> bool {
    matches!(classify(cell), MediaRef::Local(_))
}

/// How local files are made reachable by the API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Publishing {
    /// Neither flag: manifests with local paths are rejected.
    #[default]
    Off,
    /// `--media-url URL`: the listener serves `/media/{token}`; the API
    /// reaches it at `URL/media/{token}`.
    Url(url::Url),
    /// `--media-store s3://bucket/prefix`: each file uploaded once, named by
    /// its content hash, and sent as a presigned GET URL made at submit.
    Store(crate::outbox::StoreTarget),
}

impl Publishing {
    pub fn is_on(&self) -> bool {
        !matches!(self, Publishing::Off)
    }
}

/// The local-media settings, shared by `run` and `validate`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MediaSettings {
    /// `--media-root` (default `INBOX/media`).
    pub root: PathBuf,
    pub publishing: Publishing,
}

impl MediaSettings {
    /// The default root for `inbox`.
    pub fn default_root(inbox: &Path) -> PathBuf {
        inbox.join(DEFAULT_ROOT_DIR)
    }
}

/// The text of the problem of a manifest with local files and no way to
/// publish them: names both flags (contract, "Local media").
pub const UNPUBLISHED_MESSAGE: &str = "is not an http or https URL, and local files can only \
     be sent to the API once published: set --media-url URL (served by this daemon's listener) \
     or --media-store s3://BUCKET/PREFIX (an object store); neither is set";

/// Why a local media file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The media root is missing or not a folder.
    #[error("the media root {root} cannot be used: {source}")]
    Root {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No file at the path.
    #[error("{cell:?}: no such file under the media root {root}")]
    NotFound { cell: String, root: PathBuf },
    /// The path leaves the media root (`..`, an absolute path elsewhere, a
    /// symbolic link pointing out).
    #[error("{cell:?} is outside the media root {root}; only files inside it are sent")]
    Escapes { cell: String, root: PathBuf },
    /// A folder, FIFO, socket or device.
    #[error("{cell:?} is not a regular file")]
    NotRegular { cell: String },
    /// Not a type the API takes in this column.
    #[error("{cell:?} is not {wanted} ({detail})")]
    Unsupported {
        cell: String,
        wanted: &'static str,
        detail: String,
    },
    /// Larger than the API takes.
    #[error("{cell:?} is {size} bytes; at most {max} bytes are accepted here")]
    TooLarge { cell: String, size: u64, max: u64 },
    /// Audio longer than the API takes.
    #[error("{cell:?} is {seconds:.1} s of audio; the API accepts at most 10 minutes")]
    TooLong { cell: String, seconds: f64 },
    /// The file changed while it was read.
    #[error(
        "{cell:?} changed while it was being read; drop the manifest again once it is complete"
    )]
    Unsettled { cell: String },
    /// The file no longer holds the bytes validated at acceptance.
    #[error("{path} changed since the manifest was accepted ({why}); it is not sent")]
    Changed { path: PathBuf, why: String },
    /// Reading failed.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The batch's media table is missing or unreadable.
    #[error("media table {path}: {message}")]
    Table { path: PathBuf, message: String },
    /// Local files but no way to publish them.
    #[error("{UNPUBLISHED_MESSAGE}")]
    Unpublished,
    /// The media store refused or could not be reached: the row waits
    /// (never failed for it) and submission pauses.
    #[error(transparent)]
    Store(#[from] crate::outbox::OutboxError),
}

impl MediaError {
    /// The fail code a row gets when this stops its submit.
    /// Whether the row should wait and be tried again rather than fail.
    pub fn is_transient(&self) -> bool {
        matches!(self, MediaError::Store(_))
    }

    pub fn fail_code(&self) -> &'static str {
        match self {
            MediaError::Unpublished => MEDIA_UNPUBLISHED,
            _ => MEDIA_CHANGED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths_are_told_apart() {
        assert_eq!(
            classify("https://x.test/a.png"),
            MediaRef::Url("https://x.test/a.png")
        );
        assert_eq!(
            classify("HTTP://x.test/a"),
            MediaRef::Url("HTTP://x.test/a")
        );
        assert_eq!(classify("ftp://x/a.png"), MediaRef::Url("ftp://x/a.png"));
        assert_eq!(classify("s3://b/k"), MediaRef::Url("s3://b/k"));
        assert_eq!(classify("a.png"), MediaRef::Local("a.png"));
        assert_eq!(
            classify("people/ann.png"),
            MediaRef::Local("people/ann.png")
        );
        assert_eq!(
            classify("/srv/media/a.wav"),
            MediaRef::Local("/srv/media/a.wav")
        );
        assert_eq!(classify("./a:b.wav"), MediaRef::Local("./a:b.wav"));
        assert_eq!(classify("dir/a:b.wav"), MediaRef::Local("dir/a:b.wav"));
        assert_eq!(classify(" a.png "), MediaRef::Local("a.png"));
    }

    #[test]
    fn the_unpublished_problem_names_both_flags() {
        let text = MediaError::Unpublished.to_string();
        assert!(text.contains("--media-url"), "{text}");
        assert!(text.contains("--media-store"), "{text}");
    }
}
