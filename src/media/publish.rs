//! A row's local files into URLs the API can fetch, at submit time.
//!
//! [`Publisher::prepare`] first checks that each local file still holds the
//! bytes validated at acceptance (the media table's size and modification
//! time; the SHA-256 again when either moved): a file that does not is a
//! [`MediaError::Changed`], and the row fails `MEDIA_CHANGED` unsent. Then
//! it asks the publishing mode for a URL:
//!
//! - `--media-url`: `URL/media/TOKEN.EXT`, served by the listener
//!   ([`super::serve`]). The token is the row's key and column with an HMAC
//!   over them and the file's hash, so it is unguessable, needs no write to
//!   the store, and dies with the row (the route checks the row is live).
//! - `--media-store` (object storage) is a further [`Mode`]: the same check
//!   first, then an upload named by the hash and a presigned URL.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use super::local::{MediaRoot, hash_file, mtime_of, open_regular};
use super::table::{self, Entry, Table};
use super::{Column, MediaError, MediaRef, Publishing, classify};
use crate::outbox::S3Outbox;
use crate::probe::ProbeError;
use crate::spec::RowSpec;
use crate::store::RowKey;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Bytes of the HMAC kept in a token (128 bits).
const MAC_BYTES: usize = 16;
/// Token bytes: batch (8), row (8), column (1), MAC.
const TOKEN_BYTES: usize = 17 + MAC_BYTES;

/// How local files become URLs.
#[derive(Clone)]
enum Mode {
    /// No publishing flag: a row with local files cannot be sent.
    Off,
    /// `--media-url`: files at `base/TOKEN.EXT`, `base` being the public
    /// URL of the listener's `/media` route.
    Url { base: String },
    /// `--media-store`: uploaded once under `prefix/SHA256.EXT`, then a
    /// presigned GET URL made at each submit (the URL is never stored).
    Store {
        s3: Arc<S3Outbox>,
        /// One upload per object at a time: rows sharing a file submitted
        /// together upload it once (the others find it there).
        uploading: Arc<Uploading>,
    },
}

/// How long a presigned media URL stays valid: SigV4's longest. The API
/// fetches inputs when the task starts, which may be long after the submit
/// when its queue is deep; a new URL is made at every submit.
pub const MEDIA_URL_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// A local file of a row, checked to hold the recorded bytes.
#[derive(Debug, Clone)]
pub struct Verified {
    pub column: Column,
    /// Canonical path, inside the media root.
    pub path: PathBuf,
    pub entry: Entry,
}

/// Turns local files into URLs; shared by the submitter and the listener.
pub struct Publisher {
    state_dir: PathBuf,
    mode: Mode,
    /// HMAC key of tokens, derived from the daemon's secret.
    key: [u8; 32],
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// `secret`: the daemon's stored secret (the callback secret); tokens
    /// stay valid across restarts, and only this daemon can make them.
    pub fn new(state_dir: &Path, publishing: &Publishing, secret: &str) -> Arc<Publisher> {
        Self::with_store(state_dir, publishing, secret, None)
    }

    /// [`Publisher::new`] with the client of `--media-store` (without it,
    /// a store setting publishes nothing: rows fail unpublished).
    pub fn with_store(
        state_dir: &Path,
        publishing: &Publishing,
        secret: &str,
        store: Option<Arc<S3Outbox>>,
    ) -> Arc<Publisher> {
        let mode = match (publishing, store) {
            (Publishing::Off, _) | (Publishing::Store(_), None) => Mode::Off,
            (Publishing::Url(url), _) => Mode::Url {
                base: route_url(url),
            },
            (Publishing::Store(_), Some(s3)) => Mode::Store {
                s3,
                uploading: Arc::default(),
            },
        };
        let mut mac = hmac_with(secret.as_bytes());
        mac.update(b"infinitetalk-batch media token key v1");
        let key: [u8; 32] = mac.finalize().into_bytes().into();
        Arc::new(Publisher {
            state_dir: state_dir.to_owned(),
            mode,
            key,
        })
    }

    /// The row's spec with each local file replaced by its URL. Blocking
    /// work (hashing) runs on a blocking thread.
    pub async fn prepare(
        self: &Arc<Self>,
        key: RowKey,
        spec: &RowSpec,
    ) -> Result<RowSpec, MediaError> {
        let locals = local_cells(spec);
        if locals.is_empty() {
            return Ok(spec.clone());
        }
        if matches!(self.mode, Mode::Off) {
            return Err(MediaError::Unpublished);
        }
        let this = self.clone();
        let owned: Vec<(Column, String)> =
            locals.iter().map(|(c, s)| (*c, (*s).to_owned())).collect();
        let verified = tokio::task::spawn_blocking(move || this.verify_row(key, &owned))
            .await
            .map_err(|e| MediaError::Table {
                path: table::path_of(&self.state_dir, key.batch),
                message: format!("checking the row's files panicked: {e}"),
            })??;
        let mut out = spec.clone();
        for v in verified {
            let url = match &self.mode {
                Mode::Store { s3, uploading } => self.store_url(s3, uploading, &v).await?,
                _ => self.url_for(key, &v)?,
            };
            match v.column {
                Column::Image => out.image_url = url,
                Column::Mask => out.mask_url = Some(url),
                Column::Audio => out.audio_url = url,
            }
        }
        Ok(out)
    }

    /// The audio length recorded at acceptance for row `key`'s local audio
    /// (what `--probe` would read over HTTP for a URL).
    pub async fn recorded_seconds(&self, key: RowKey) -> Result<f64, ProbeError> {
        let path = table::path_of(&self.state_dir, key.batch);
        let read = tokio::task::spawn_blocking(move || {
            Table::open(&path).and_then(|t| t.get(key.row, Column::Audio))
        })
        .await;
        match read {
            Ok(Ok(Some(Entry {
                seconds: Some(s), ..
            }))) => Ok(s),
            Ok(Ok(_)) => Err(ProbeError::NoDuration("local")),
            Ok(Err(e)) => Err(ProbeError::Unsupported(e.to_string())),
            Err(e) => Err(ProbeError::Unsupported(format!(
                "reading the media table panicked: {e}"
            ))),
        }
    }

    /// The object store of `--media-store`, if that is the mode.
    pub fn store(&self) -> Option<&Arc<S3Outbox>> {
        match &self.mode {
            Mode::Store { s3, .. } => Some(s3),
            _ => None,
        }
    }

    /// A presigned URL of one verified file in the media store, uploading
    /// it first unless an object of its hash and size is there.
    async fn store_url(
        &self,
        s3: &S3Outbox,
        uploading: &Uploading,
        v: &Verified,
    ) -> Result<String, MediaError> {
        let object = s3.key_under(&format!(
            "{}.{}",
            crate::ingest::hex(&v.entry.print.sha256),
            v.entry.format.extension()
        ));
        let turn = UploadTurn::take(uploading, &object);
        let held = turn.lock.lock().await;
        let uploaded = self.upload_once(s3, &object, v).await;
        drop(held);
        drop(turn);
        uploaded?;
        Ok(s3.signed_get(&object, MEDIA_URL_TTL).await?)
    }

    /// Uploads `v` to `object` unless an object of its size is there.
    async fn upload_once(
        &self,
        s3: &S3Outbox,
        object: &str,
        v: &Verified,
    ) -> Result<(), MediaError> {
        if s3.size_of(object).await? != Some(v.entry.print.size) {
            s3.upload_file(&v.path, object).await?;
            // The file may have changed while it was read: an object named
            // by a hash must hold those bytes, or go.
            let (path, print) = (v.path.clone(), v.entry.print);
            let still = tokio::task::spawn_blocking(move || {
                let (mut file, meta) = open_regular(&path, &path.to_string_lossy())?;
                if meta.len() == print.size && mtime_of(&meta) == print.mtime {
                    return Ok(true);
                }
                let (sha256, read) = hash_file(&mut file).map_err(|source| MediaError::Io {
                    path: path.clone(),
                    source,
                })?;
                Ok::<_, MediaError>(sha256 == print.sha256 && read == print.size)
            })
            .await
            .map_err(|e| MediaError::Table {
                path: v.path.clone(),
                message: format!("re-checking the file panicked: {e}"),
            })??;
            if !still {
                let _ = s3.delete(object).await;
                return Err(MediaError::Changed {
                    path: v.path.clone(),
                    why: "it changed while it was uploaded".into(),
                });
            }
            tracing::info!(store = %s3.target, key = %object, bytes = v.entry.print.size, "local file uploaded to the media store");
        }
        Ok(())
    }

    /// The URL of one verified file.
    fn url_for(&self, key: RowKey, v: &Verified) -> Result<String, MediaError> {
        match &self.mode {
            Mode::Off | Mode::Store { .. } => Err(MediaError::Unpublished),
            Mode::Url { base } => Ok(format!(
                "{base}/{}.{}",
                self.token(key, v.column, &v.entry.print.sha256),
                v.entry.format.extension()
            )),
        }
    }

    /// Checks each `(column, cell)` of row `key` against the media table.
    /// Blocks.
    pub fn verify_row(
        &self,
        key: RowKey,
        cells: &[(Column, String)],
    ) -> Result<Vec<Verified>, MediaError> {
        let table = Table::open(&table::path_of(&self.state_dir, key.batch))?;
        cells
            .iter()
            .map(|(column, cell)| verify(&table, key.row, *column, cell))
            .collect()
    }

    /// The token of `column` of row `key` whose file hashes to `sha256`:
    /// hex of the key, the column and an HMAC over them and the hash.
    pub fn token(&self, key: RowKey, column: Column, sha256: &[u8; 32]) -> String {
        let mut bytes = Vec::with_capacity(TOKEN_BYTES);
        bytes.extend_from_slice(&key.batch.to_be_bytes());
        bytes.extend_from_slice(&key.row.to_be_bytes());
        bytes.push(column.index());
        let mac = self.mac(&bytes, sha256);
        bytes.extend_from_slice(&mac[..MAC_BYTES]);
        crate::ingest::hex(&bytes)
    }

    /// The row and column a token claims, and its MAC (not yet checked).
    pub(crate) fn parse_token(token: &str) -> Option<(RowKey, Column, [u8; MAC_BYTES])> {
        if token.len() != TOKEN_BYTES * 2 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let bytes: Vec<u8> = (0..TOKEN_BYTES)
            .map(|i| u8::from_str_radix(token.get(2 * i..2 * i + 2)?, 16).ok())
            .collect::<Option<_>>()?;
        let batch = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let row = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        let column = Column::from_index(*bytes.get(16)?)?;
        let mac: [u8; MAC_BYTES] = bytes.get(17..)?.try_into().ok()?;
        Some((RowKey { batch, row }, column, mac))
    }

    /// Whether `mac` is the token MAC of `key`, `column` and `sha256`
    /// (compared in constant time).
    pub(crate) fn mac_matches(
        &self,
        key: RowKey,
        column: Column,
        sha256: &[u8; 32],
        mac: &[u8; MAC_BYTES],
    ) -> bool {
        let mut bytes = Vec::with_capacity(17);
        bytes.extend_from_slice(&key.batch.to_be_bytes());
        bytes.extend_from_slice(&key.row.to_be_bytes());
        bytes.push(column.index());
        let want = self.mac(&bytes, sha256);
        crate::admin::constant_time_eq(&want[..MAC_BYTES], mac)
    }

    fn mac(&self, bytes: &[u8], sha256: &[u8; 32]) -> [u8; 32] {
        let mut mac = hmac_with(&self.key);
        mac.update(bytes);
        mac.update(sha256);
        mac.finalize().into_bytes().into()
    }

    pub(crate) fn state_dir(&self) -> &Path {
        &self.state_dir
    }
}

/// The public URL of the `/media` route from `--media-url`: a URL whose path
/// ends in `/media` names the route itself, any other reaches the listener's
/// root (the route is under it).
fn route_url(url: &url::Url) -> String {
    let base = url.as_str().trim_end_matches('/');
    if url.path().trim_end_matches('/').ends_with("/media") {
        base.to_owned()
    } else {
        format!("{base}/media")
    }
}

/// The uploads in progress, one lock per object key.
type Uploading = std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// A place in line for uploading one object. The key leaves the map when
/// its last user is done, or dropped half-way (a stop): the map holds only
/// objects in use, and nobody still waiting finds a fresh lock and uploads
/// the same object beside the first.
struct UploadTurn<'a> {
    map: &'a Uploading,
    object: String,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> UploadTurn<'a> {
    fn take(map: &'a Uploading, object: &str) -> UploadTurn<'a> {
        let lock = map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(object.to_owned())
            .or_default()
            .clone();
        UploadTurn {
            map,
            object: object.to_owned(),
            lock,
        }
    }
}

impl Drop for UploadTurn<'_> {
    fn drop(&mut self) {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The map's handle and this one: nobody else is in line.
        if Arc::strong_count(&self.lock) <= 2 {
            map.remove(&self.object);
        }
    }
}

/// A keyed HMAC; HMAC takes keys of any length, so this cannot fail.
fn hmac_with(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// The local cells of a row, by column.
pub fn local_cells(spec: &RowSpec) -> Vec<(Column, &str)> {
    let mut out = Vec::new();
    for (column, cell) in [
        (Column::Image, Some(spec.image_url.as_str())),
        (Column::Mask, spec.mask_url.as_deref()),
        (Column::Audio, Some(spec.audio_url.as_str())),
    ] {
        if let Some(MediaRef::Local(cell)) = cell.map(classify) {
            out.push((column, cell));
        }
    }
    out
}

/// Checks that `cell` still names a file holding what the table recorded
/// for `row`/`column`: same size and modification time, or else the same
/// SHA-256. Blocks.
pub fn verify(table: &Table, row: u64, column: Column, cell: &str) -> Result<Verified, MediaError> {
    let root = MediaRoot::from_canonical(table.root().to_owned());
    let changed = |why: String| MediaError::Changed {
        path: root.canonical.join(cell),
        why,
    };
    let entry = table
        .get(row, column)?
        .ok_or_else(|| changed("no record of it was made at acceptance".into()))?;
    let path = root.locate(cell).map_err(|e| changed(e.to_string()))?;
    let (mut file, meta) = open_regular(&path, cell).map_err(|e| changed(e.to_string()))?;
    if meta.len() != entry.print.size {
        return Err(changed(format!(
            "{} bytes, {} at acceptance",
            meta.len(),
            entry.print.size
        )));
    }
    if mtime_of(&meta) != entry.print.mtime {
        let (sha256, read) = hash_file(&mut file).map_err(|e| changed(e.to_string()))?;
        if sha256 != entry.print.sha256 || read != entry.print.size {
            return Err(changed("its content's SHA-256 differs".into()));
        }
    }
    Ok(Verified {
        column,
        path,
        entry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_lock_stays_while_anyone_is_in_line_and_goes_after() {
        let map = Uploading::default();
        let len = || map.lock().expect("map").len();
        let first = UploadTurn::take(&map, "k");
        let second = UploadTurn::take(&map, "k");
        assert!(Arc::ptr_eq(&first.lock, &second.lock), "one lock a key");
        drop(first);
        assert_eq!(len(), 1, "the second still waits on it");
        let third = UploadTurn::take(&map, "k");
        assert!(Arc::ptr_eq(&second.lock, &third.lock), "no fresh lock");
        drop(second);
        drop(third);
        assert_eq!(len(), 0, "gone with its last user");
    }

    #[test]
    fn the_media_url_names_the_listener_or_its_media_route() {
        let route = |raw: &str| route_url(&url::Url::parse(raw).expect("url"));
        for (raw, want) in [
            ("http://127.0.0.1:8686", "http://127.0.0.1:8686/media"),
            ("http://127.0.0.1:8686/", "http://127.0.0.1:8686/media"),
            ("http://127.0.0.1:8686/media", "http://127.0.0.1:8686/media"),
            (
                "http://127.0.0.1:8686/media/",
                "http://127.0.0.1:8686/media",
            ),
            ("https://m.example/it", "https://m.example/it/media"),
            ("https://m.example/it/media/", "https://m.example/it/media"),
            (
                "https://m.example/multimedia",
                "https://m.example/multimedia/media",
            ),
        ] {
            assert_eq!(route(raw), want, "{raw}");
        }
    }

    #[test]
    fn tokens_round_trip_and_bind_the_row_and_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Publisher::new(dir.path(), &Publishing::Off, "secret");
        let key = RowKey { batch: 3, row: 42 };
        let t = p.token(key, Column::Audio, &[1; 32]);
        let (k, c, mac) = Publisher::parse_token(&t).expect("parses");
        assert_eq!((k, c), (key, Column::Audio));
        assert!(p.mac_matches(k, c, &[1; 32], &mac));
        // Another content, row, column or secret does not match.
        assert!(!p.mac_matches(k, c, &[2; 32], &mac));
        assert!(!p.mac_matches(RowKey { batch: 3, row: 43 }, c, &[1; 32], &mac));
        assert!(!p.mac_matches(k, Column::Image, &[1; 32], &mac));
        let other = Publisher::new(dir.path(), &Publishing::Off, "other");
        assert!(!other.mac_matches(k, c, &[1; 32], &mac));
        assert!(Publisher::parse_token("zz").is_none());
        assert!(Publisher::parse_token(&t[..t.len() - 2]).is_none());
    }
}
