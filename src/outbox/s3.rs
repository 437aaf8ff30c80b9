//! The object-store side of the outbox (and of `--media-store`): an S3
//! client from `object_store`, its configuration from the `AWS_*`
//! variables or systemd credentials, and uploads streamed from local files.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreExt, WriteMultipart};
use tokio::io::AsyncReadExt;

use super::OutboxError;

/// Size of one multipart part (S3's minimum but for the last part): what
/// an upload holds in memory is a few of these, whatever the file's size.
pub(crate) const PART_BYTES: usize = 5 * 1024 * 1024;
/// Parts in flight at once per upload.
const PARTS_IN_FLIGHT: usize = 2;
/// Systemd credential names read when the `AWS_*` variable is not set.
const CREDENTIAL_FILES: [(&str, &str); 3] = [
    ("aws-access-key-id", "aws_access_key_id"),
    ("aws-secret-access-key", "aws_secret_access_key"),
    ("aws-session-token", "aws_session_token"),
];

/// `s3://bucket/prefix`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreTarget {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
}

impl StoreTarget {
    /// Parses `s3://bucket[/prefix]`; `None` for anything that is not an
    /// `s3://` URL (a local path), an error for a malformed one.
    pub fn parse(text: &str) -> Option<Result<StoreTarget, String>> {
        let rest = text.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Some(Err(format!(
                "{text}: the bucket must be 3 to 63 of a-z 0-9 . -"
            )));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|s| s == "." || s == "..")
            || prefix.contains("//")
            || prefix.chars().any(char::is_control)
        {
            return Some(Err(format!(
                "{text}: the prefix has an empty, `.` or `..` segment or a control character"
            )));
        }
        Some(Ok(StoreTarget {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        }))
    }
}

impl std::fmt::Display for StoreTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Most bytes one GET of [`S3Outbox::read`] asks for: at the client's 60 s
/// request timeout, a reader taking 70 KB/s still gets every part whole.
const READ_PART: u64 = 4 * 1024 * 1024;

/// `range` in consecutive parts of at most [`READ_PART`] bytes.
fn read_parts(range: std::ops::Range<u64>) -> impl Iterator<Item = std::ops::Range<u64>> {
    (range.start..range.end)
        .step_by(usize::try_from(READ_PART).unwrap_or(usize::MAX))
        .map(move |start| start..range.end.min(start.saturating_add(READ_PART)))
}

/// One GET of bytes `range` of `path`, its body as it arrives.
async fn get_range(
    store: &AmazonS3,
    path: &ObjectPath,
    range: std::ops::Range<u64>,
) -> object_store::Result<
    futures_util::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
> {
    let options = object_store::GetOptions {
        range: Some(object_store::GetRange::Bounded(range)),
        ..Default::default()
    };
    Ok(store.get_opts(path, options).await?.into_stream())
}

/// One bucket and prefix of an S3-compatible service.
pub struct S3Outbox {
    pub target: StoreTarget,
    pub(crate) store: Arc<AmazonS3>,
}

// Only the target: the client's configuration holds the credentials.
impl std::fmt::Debug for S3Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Outbox({})", self.target)
    }
}

impl S3Outbox {
    /// A client of `target`, configured from `vars` (the process's `AWS_*`
    /// variables) and, for the keys they lack, the systemd credentials in
    /// `credentials` (`aws-access-key-id`, `aws-secret-access-key`,
    /// `aws-session-token`).
    pub fn build(
        target: StoreTarget,
        vars: impl IntoIterator<Item = (String, String)>,
        credentials: Option<&Path>,
    ) -> Result<S3Outbox, String> {
        let mut builder = AmazonS3Builder::new();
        let mut set = std::collections::HashSet::new();
        let mut plain_http = false;
        for (key, value) in vars {
            if key.starts_with("AWS_")
                && !value.is_empty()
                && let Ok(k) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>()
            {
                if matches!(
                    k,
                    AmazonS3ConfigKey::Endpoint | AmazonS3ConfigKey::S3Endpoint
                ) {
                    plain_http |= value.to_ascii_lowercase().starts_with("http://");
                }
                set.insert(key.to_ascii_lowercase());
                builder = builder.with_config(k, value);
            }
        }
        // An endpoint the operator wrote as http:// is meant as such (as the
        // AWS CLI takes it): object_store would refuse it without its own
        // AWS_ALLOW_HTTP. SigV4 never sends the secret key itself.
        if plain_http && !set.contains("aws_allow_http") {
            builder = builder.with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp),
                "true",
            );
        }
        if let Some(dir) = credentials {
            for (file, key) in CREDENTIAL_FILES {
                if set.contains(key) {
                    continue;
                }
                let path = dir.join(file);
                if let Ok(text) = std::fs::read_to_string(&path) {
                    let value = text.trim();
                    if let (false, Ok(k)) = (value.is_empty(), key.parse::<AmazonS3ConfigKey>()) {
                        builder = builder.with_config(k, value);
                    }
                }
            }
        }
        // Bounded: one request at most a minute (a 5 MiB part), a dead
        // endpoint noticed in seconds; the daemon retries on its own, with
        // backoff, so the client's own retries stay few.
        let client = |k: ClientConfigKey, v: &str| (AmazonS3ConfigKey::Client(k), v.to_owned());
        for (k, v) in [
            client(ClientConfigKey::ConnectTimeout, "5s"),
            client(ClientConfigKey::Timeout, "60s"),
        ] {
            builder = builder.with_config(k, v);
        }
        let store = builder
            .with_bucket_name(&target.bucket)
            .with_retry(object_store::RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(15),
                ..Default::default()
            })
            .build()
            // The builder's errors name settings, never their values.
            .map_err(|e| format!("{target}: {e}"))?;
        Ok(S3Outbox {
            target,
            store: Arc::new(store),
        })
    }

    /// The object key of file `name` of `batch`: `prefix/BATCH/NAME`.
    pub fn key(&self, batch: &str, name: &str) -> String {
        self.key_under(&format!("{batch}/{name}"))
    }

    /// `prefix/REST`.
    pub fn key_under(&self, rest: &str) -> String {
        if self.target.prefix.is_empty() {
            rest.to_owned()
        } else {
            format!("{}/{rest}", self.target.prefix)
        }
    }

    fn error(&self, op: &'static str, key: &str, e: &object_store::Error) -> OutboxError {
        OutboxError::Store {
            bucket: self.target.bucket.clone(),
            op,
            key: key.to_owned(),
            message: one_line(&e.to_string()),
        }
    }

    /// `key` as the store's path, taken as it is: `Path::from` would
    /// percent-encode `~` (of `ID~2.mp4`) into the key itself.
    fn path(&self, key: &str) -> Result<ObjectPath, OutboxError> {
        ObjectPath::parse(key).map_err(|e| self.error("name", key, &e.into()))
    }

    /// The size of the object at `key`, `None` if there is none.
    pub async fn size_of(&self, key: &str) -> Result<Option<u64>, OutboxError> {
        match self.store.head(&self.path(key)?).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("HEAD", key, &e)),
        }
    }

    /// Puts `batch_dir/manifest.csv` at `prefix/BATCH/manifest.csv`.
    pub async fn put_manifest(&self, batch: &str, batch_dir: &Path) -> Result<u64, OutboxError> {
        let name = crate::ingest::MANIFEST_NAME;
        self.upload_file(&batch_dir.join(name), &self.key(batch, name))
            .await
    }

    /// Bytes `range` of the object at `key`, as they arrive. Read by GETs
    /// of at most [`READ_PART`] bytes one after the other, since each GET
    /// must end within the client's request timeout however slowly the
    /// bytes are taken; the first is sent before this returns, so that a
    /// store that refuses is an error here.
    pub async fn read(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<
        futures_util::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
        OutboxError,
    > {
        use futures_util::{StreamExt, TryStreamExt};
        let path = self.path(key)?;
        let mut parts = read_parts(range);
        let Some(first) = parts.next() else {
            return Ok(futures_util::stream::empty().boxed());
        };
        let first = get_range(&self.store, &path, first)
            .await
            .map_err(|e| self.error("GET", key, &e))?;
        let store = self.store.clone();
        let rest = futures_util::stream::iter(parts)
            .then(move |part| {
                let (store, path) = (store.clone(), path.clone());
                async move { get_range(&store, &path, part).await }
            })
            .try_flatten();
        Ok(first.chain(rest).boxed())
    }

    /// Removes the object at `key` (gone already is fine).
    pub async fn delete(&self, key: &str) -> Result<(), OutboxError> {
        match self.store.delete(&self.path(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("DELETE", key, &e)),
        }
    }

    /// A presigned GET URL of `key`, valid for `ttl` (at most 7 days).
    /// Made by signing locally: no request. Never logged or stored.
    pub async fn signed_get(&self, key: &str, ttl: Duration) -> Result<String, OutboxError> {
        use object_store::signer::Signer;
        let url = self
            .store
            .signed_url(reqwest::Method::GET, &self.path(key)?, ttl)
            .await
            .map_err(|e| self.error("presign GET", key, &e))?;
        Ok(url.to_string())
    }

    /// Checks that the store takes writes under the prefix: starts a
    /// multipart upload and aborts it, which leaves nothing behind.
    pub async fn probe(&self) -> Result<(), OutboxError> {
        let key = self.key_under(".infinitetalk-batch-probe");
        let mut upload = self
            .store
            .put_multipart(&self.path(&key)?)
            .await
            .map_err(|e| self.error("create multipart upload (probe)", &key, &e))?;
        upload
            .abort()
            .await
            .map_err(|e| self.error("abort multipart upload (probe)", &key, &e))
    }

    /// Streams `local` to `key` with a multipart upload (the object appears
    /// only once complete), then checks the stored length. Returns it.
    pub async fn upload_file(&self, local: &Path, key: &str) -> Result<u64, OutboxError> {
        let io = |source| OutboxError::Io {
            path: local.to_owned(),
            source,
        };
        let mut file = tokio::fs::File::open(local).await.map_err(io)?;
        let want = file.metadata().await.map_err(io)?.len();
        let path = self.path(key)?;
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| self.error("create multipart upload", key, &e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; 256 * 1024];
        let streamed: Result<(), OutboxError> = async {
            loop {
                let n = file.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    return Ok(());
                }
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| self.error("upload part", key, &e))?;
                writer.write(&buf[..n]);
            }
        }
        .await;
        if let Err(e) = streamed {
            // Best effort: an upload left open is no object, only parts a
            // lifecycle rule reclaims.
            let _ = writer.abort().await;
            return Err(e);
        }
        writer
            .finish()
            .await
            .map_err(|e| self.error("complete multipart upload", key, &e))?;
        match self.size_of(key).await? {
            Some(got) if got == want => Ok(want),
            got => Err(OutboxError::Length {
                bucket: self.target.bucket.clone(),
                key: key.to_owned(),
                got: got.unwrap_or(0),
                want,
            }),
        }
    }
}

/// Error texts of the store may quote a response body over several lines:
/// one log line per event.
fn one_line(text: &str) -> String {
    let joined: Vec<&str> = text.split_whitespace().collect();
    let mut s = joined.join(" ");
    if s.len() > 400 {
        let mut end = 400;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_go_in_parts_of_at_most_read_part() {
        let parts: Vec<_> = read_parts(10..10 + 2 * READ_PART + 1).collect();
        assert_eq!(
            parts,
            vec![
                10..10 + READ_PART,
                10 + READ_PART..10 + 2 * READ_PART,
                10 + 2 * READ_PART..11 + 2 * READ_PART
            ]
        );
        assert_eq!(read_parts(5..6).collect::<Vec<_>>(), vec![5..6]);
        assert_eq!(read_parts(7..7).count(), 0);
    }

    #[test]
    fn parses_targets() {
        assert_eq!(StoreTarget::parse("./outbox"), None);
        assert_eq!(StoreTarget::parse("/srv/out"), None);
        let t = StoreTarget::parse("s3://my-bucket/videos/2026/")
            .expect("s3")
            .expect("valid");
        assert_eq!(t.bucket, "my-bucket");
        assert_eq!(t.prefix, "videos/2026");
        assert_eq!(t.to_string(), "s3://my-bucket/videos/2026");
        let t = StoreTarget::parse("s3://bkt").expect("s3").expect("valid");
        assert_eq!(t.prefix, "");
        assert!(StoreTarget::parse("s3://").expect("s3").is_err());
        assert!(
            StoreTarget::parse("s3://Bad_Bucket/x")
                .expect("s3")
                .is_err()
        );
        assert!(StoreTarget::parse("s3://bkt/a/../b").expect("s3").is_err());
    }

    #[test]
    fn debug_shows_no_credentials() {
        let target = StoreTarget::parse("s3://bkt/p")
            .expect("s3")
            .expect("valid");
        let vars = [
            ("AWS_ACCESS_KEY_ID", "AKIDSHOULDNOTSHOW"),
            ("AWS_SECRET_ACCESS_KEY", "secret-should-not-show"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let out = S3Outbox::build(target, vars, None).expect("builds");
        let shown = format!("{out:?}");
        assert!(!shown.contains("SHOULDNOTSHOW") && !shown.contains("should-not-show"));
        assert_eq!(out.key("b1", "r1.mp4"), "p/b1/r1.mp4");
    }

    #[test]
    fn credentials_come_from_systemd_when_the_env_lacks_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("aws-access-key-id"), "AKIDFROMFILE\n").expect("write");
        std::fs::write(dir.path().join("aws-secret-access-key"), "s3cr3t\n").expect("write");
        let target = StoreTarget::parse("s3://bkt").expect("s3").expect("valid");
        let vars = [("AWS_REGION".to_owned(), "eu-west-1".to_owned())];
        assert!(S3Outbox::build(target, vars, Some(dir.path())).is_ok());
    }

    #[test]
    fn errors_are_one_line() {
        assert_eq!(one_line("a\n  b\tc"), "a b c");
        assert!(one_line(&"x".repeat(1000)).len() < 410);
    }
}
