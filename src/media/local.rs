//! One local media file checked and hashed: inside the media root after
//! every link is resolved, a regular file, of a type the API takes in its
//! column, within the API's limits; then its SHA-256, streaming.
//!
//! It blocks (file system calls, hashing): call it from a blocking thread.
//! It never writes anything.

use std::fs::{File, Metadata};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{Column, MediaError};
use crate::probe::{self, AudioFormat, MAX_AUDIO_BYTES, ProbeError};

/// Largest image accepted. The API publishes no limit for portraits and
/// masks; this bounds what a task may be asked to fetch.
pub const MAX_IMAGE_BYTES: u64 = 32 * 1024 * 1024;

/// Read size while hashing.
const HASH_BUF: usize = 256 * 1024;

/// The media root, resolved once (all links followed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaRoot {
    /// As configured, for messages.
    pub given: PathBuf,
    /// Canonical: every file served must lie under it.
    pub canonical: PathBuf,
}

impl MediaRoot {
    /// Resolves `dir`; it must exist and be a folder.
    pub fn open(dir: &Path) -> Result<MediaRoot, MediaError> {
        let root_err = |source| MediaError::Root {
            root: dir.to_owned(),
            source,
        };
        let canonical = std::fs::canonicalize(dir).map_err(root_err)?;
        let meta = std::fs::metadata(&canonical).map_err(root_err)?;
        if !meta.is_dir() {
            return Err(root_err(io::Error::other("not a folder")));
        }
        Ok(MediaRoot {
            given: dir.to_owned(),
            canonical,
        })
    }

    /// The root as already canonical (read back from a media table).
    pub fn from_canonical(canonical: PathBuf) -> MediaRoot {
        MediaRoot {
            given: canonical.clone(),
            canonical,
        }
    }

    /// Resolves `cell` to a canonical path inside the root, or says why not.
    pub fn locate(&self, cell: &str) -> Result<PathBuf, MediaError> {
        let escapes = || MediaError::Escapes {
            cell: cell.to_owned(),
            root: self.given.clone(),
        };
        let rel = Path::new(cell);
        // `..` is refused outright, even when it would come back inside:
        // what a manifest names should read as what is sent.
        if rel.components().any(|c| c == Component::ParentDir) {
            return Err(escapes());
        }
        let joined = if rel.is_absolute() {
            rel.to_owned()
        } else {
            self.canonical.join(rel)
        };
        let canonical = match std::fs::canonicalize(&joined) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(MediaError::NotFound {
                    cell: cell.to_owned(),
                    root: self.given.clone(),
                });
            }
            Err(source) => {
                return Err(MediaError::Io {
                    path: joined,
                    source,
                });
            }
        };
        if canonical == self.canonical || !canonical.starts_with(&self.canonical) {
            return Err(escapes());
        }
        Ok(canonical)
    }
}

/// Container or image type of a local file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaFormat {
    Jpeg,
    Png,
    Webp,
    Mp3,
    Wav,
    M4a,
}

impl MediaFormat {
    /// File extension for URLs (the API may look at it).
    pub fn extension(self) -> &'static str {
        match self {
            MediaFormat::Jpeg => "jpg",
            MediaFormat::Png => "png",
            MediaFormat::Webp => "webp",
            MediaFormat::Mp3 => "mp3",
            MediaFormat::Wav => "wav",
            MediaFormat::M4a => "m4a",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            MediaFormat::Jpeg => 1,
            MediaFormat::Png => 2,
            MediaFormat::Webp => 3,
            MediaFormat::Mp3 => 4,
            MediaFormat::Wav => 5,
            MediaFormat::M4a => 6,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<MediaFormat> {
        Some(match code {
            1 => MediaFormat::Jpeg,
            2 => MediaFormat::Png,
            3 => MediaFormat::Webp,
            4 => MediaFormat::Mp3,
            5 => MediaFormat::Wav,
            6 => MediaFormat::M4a,
            _ => return None,
        })
    }

    fn from_audio(format: AudioFormat) -> MediaFormat {
        match format {
            AudioFormat::Mp3 => MediaFormat::Mp3,
            AudioFormat::Wav => MediaFormat::Wav,
            AudioFormat::M4a => MediaFormat::M4a,
        }
    }
}

/// The identity of a file's content as recorded at acceptance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fingerprint {
    pub size: u64,
    /// Modification time: seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    pub sha256: [u8; 32],
}

/// A local file that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalMedia {
    /// Canonical path (inside the root).
    pub path: PathBuf,
    pub format: MediaFormat,
    pub print: Fingerprint,
    /// Length of audio, in seconds.
    pub seconds: Option<f64>,
}

/// Modification time of `meta`.
pub fn mtime_of(meta: &Metadata) -> (i64, u32) {
    use std::os::unix::fs::MetadataExt;
    (meta.mtime(), u32::try_from(meta.mtime_nsec()).unwrap_or(0))
}

/// Opens a file without blocking on a FIFO; the handle must be a regular file.
pub(crate) fn open_regular(path: &Path, cell: &str) -> Result<(File, Metadata), MediaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io_err = |source| MediaError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(MediaError::NotRegular {
            cell: cell.to_owned(),
        });
    }
    Ok((file, meta))
}

/// SHA-256 of everything `file` holds from its start, and how many bytes.
pub(crate) fn hash_file(file: &mut File) -> io::Result<([u8; 32], u64)> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_BUF];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize().into(), total))
}

/// Checks the file `cell` names for `column` and hashes it.
pub fn resolve_local(
    root: &MediaRoot,
    cell: &str,
    column: Column,
) -> Result<LocalMedia, MediaError> {
    let path = root.locate(cell)?;
    let (mut file, meta) = open_regular(&path, cell)?;
    let io_err = |source| MediaError::Io {
        path: path.clone(),
        source,
    };
    let size = meta.len();
    let max = if column.is_audio() {
        MAX_AUDIO_BYTES
    } else {
        MAX_IMAGE_BYTES
    };
    if size > max {
        return Err(MediaError::TooLarge {
            cell: cell.to_owned(),
            size,
            max,
        });
    }
    let (format, seconds) = if column.is_audio() {
        let handle = file.try_clone().map_err(io_err)?;
        match probe::probe_file(handle) {
            Ok(p) => (MediaFormat::from_audio(p.format), Some(p.seconds)),
            Err(ProbeError::TooLong { seconds }) => {
                return Err(MediaError::TooLong {
                    cell: cell.to_owned(),
                    seconds,
                });
            }
            Err(e) => {
                return Err(MediaError::Unsupported {
                    cell: cell.to_owned(),
                    wanted: "MP3, WAV or M4A audio",
                    detail: e.to_string(),
                });
            }
        }
    } else {
        (sniff_image(&mut file, cell)?, None)
    };
    let (sha256, read) = hash_file(&mut file).map_err(io_err)?;
    let after = file.metadata().map_err(io_err)?;
    if read != size || after.len() != size || mtime_of(&after) != mtime_of(&meta) {
        return Err(MediaError::Unsettled {
            cell: cell.to_owned(),
        });
    }
    Ok(LocalMedia {
        path,
        format,
        print: Fingerprint {
            size,
            mtime: mtime_of(&meta),
            sha256,
        },
        seconds,
    })
}

/// JPEG, PNG or WebP, by the first bytes.
fn sniff_image(file: &mut File, cell: &str) -> Result<MediaFormat, MediaError> {
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(MediaError::Io {
                    path: PathBuf::from(cell),
                    source,
                });
            }
        }
    }
    let head = &head[..got];
    if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(MediaFormat::Jpeg);
    }
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Ok(MediaFormat::Png);
    }
    if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        return Ok(MediaFormat::Webp);
    }
    let shown: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Err(MediaError::Unsupported {
        cell: cell.to_owned(),
        wanted: "a JPEG, PNG or WebP image",
        detail: if head.is_empty() {
            "the file is empty".into()
        } else {
            format!("the file starts with bytes {}", shown.join(" "))
        },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny valid PNG header (enough for sniffing).
    pub(crate) const PNG: &[u8] =
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0";

    /// A silent 8 kHz 8-bit mono WAV of `seconds` (any length).
    pub(crate) fn wav_of(seconds: f64) -> Vec<u8> {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let samples = (seconds * 8000.0) as u32;
        let mut wav = crate::simulator::silent_wav_bytes(0.0);
        wav[4..8].copy_from_slice(&(36 + samples).to_le_bytes());
        wav[40..44].copy_from_slice(&samples.to_le_bytes());
        wav.resize(44 + samples as usize, 0x80);
        wav
    }

    fn root() -> (tempfile::TempDir, MediaRoot) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("media")).expect("mkdir");
        let root = MediaRoot::open(&dir.path().join("media")).expect("root");
        (dir, root)
    }

    #[test]
    fn a_png_inside_the_root_is_hashed() {
        let (_dir, root) = root();
        std::fs::create_dir(root.canonical.join("people")).expect("mkdir");
        std::fs::write(root.canonical.join("people/ann.png"), PNG).expect("write");
        let m = resolve_local(&root, "people/ann.png", Column::Image).expect("valid");
        assert_eq!(m.format, MediaFormat::Png);
        assert_eq!(m.print.size, PNG.len() as u64);
        assert_eq!(m.print.sha256, <[u8; 32]>::from(Sha256::digest(PNG)));
        // The absolute path of the same file is fine too.
        let abs = root.canonical.join("people/ann.png");
        let m2 = resolve_local(&root, abs.to_str().expect("utf8"), Column::Image).expect("valid");
        assert_eq!(m2.print, m.print);
    }

    #[test]
    fn escapes_are_refused() {
        let (dir, root) = root();
        std::fs::write(dir.path().join("secret.png"), PNG).expect("write");
        std::os::unix::fs::symlink(
            dir.path().join("secret.png"),
            root.canonical.join("link.png"),
        )
        .expect("symlink");
        for cell in [
            "../secret.png",
            "link.png",
            "/etc/passwd",
            "sub/../../secret.png",
        ] {
            match resolve_local(&root, cell, Column::Image) {
                Err(MediaError::Escapes { .. }) => {}
                other => panic!("{cell}: expected Escapes, got {other:?}"),
            }
        }
        // A link that stays inside is fine: the file it names is inside.
        std::fs::write(root.canonical.join("real.png"), PNG).expect("write");
        std::os::unix::fs::symlink(
            root.canonical.join("real.png"),
            root.canonical.join("in.png"),
        )
        .expect("symlink");
        resolve_local(&root, "in.png", Column::Image).expect("inside link");
    }

    #[test]
    fn wrong_types_and_non_files_are_refused() {
        let (_dir, root) = root();
        std::fs::write(root.canonical.join("a.png"), b"hello").expect("write");
        std::fs::create_dir(root.canonical.join("d")).expect("mkdir");
        match resolve_local(&root, "a.png", Column::Image) {
            Err(e @ MediaError::Unsupported { .. }) => {
                assert!(e.to_string().contains("JPEG, PNG or WebP"), "{e}");
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
        std::fs::write(root.canonical.join("p.png"), PNG).expect("write");
        assert!(matches!(
            resolve_local(&root, "p.png", Column::Audio),
            Err(MediaError::Unsupported { .. })
        ));
        assert!(matches!(
            resolve_local(&root, "d", Column::Image),
            Err(MediaError::NotRegular { .. })
        ));
        assert!(matches!(
            resolve_local(&root, "missing.png", Column::Image),
            Err(MediaError::NotFound { .. })
        ));
    }

    #[test]
    fn wav_audio_is_measured() {
        let (_dir, root) = root();
        let wav = wav_of(3.0);
        std::fs::write(root.canonical.join("a.wav"), &wav).expect("write");
        let m = resolve_local(&root, "a.wav", Column::Audio).expect("valid");
        assert_eq!(m.format, MediaFormat::Wav);
        let seconds = m.seconds.expect("measured");
        assert!((seconds - 3.0).abs() < 0.01, "{seconds}");
        let long = wav_of(601.0);
        std::fs::write(root.canonical.join("long.wav"), &long).expect("write");
        assert!(matches!(
            resolve_local(&root, "long.wav", Column::Audio),
            Err(MediaError::TooLong { .. })
        ));
    }

    #[test]
    fn too_large_images_are_refused_before_reading() {
        let (_dir, root) = root();
        let f = File::create(root.canonical.join("big.png")).expect("create");
        f.set_len(MAX_IMAGE_BYTES + 1).expect("sparse");
        assert!(matches!(
            resolve_local(&root, "big.png", Column::Image),
            Err(MediaError::TooLarge { .. })
        ));
    }
}
