//! A real S3-protocol server for the tests: `s3s-fs` (objects as files in a
//! temp folder) behind `s3s`'s SigV4 checks, served by hyper on
//! `127.0.0.1:0` in the test's own runtime, the way s3s-fs's own
//! integration tests build it. It refuses a wrong key, a tampered signature
//! and an expired presigned URL, which a mock (moto, s3rver) would not.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use object_store::ObjectStore;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const ACCESS_KEY: &str = "AKIATESTS3S0000001";
pub const SECRET_KEY: &str = "test-secret-do-not-log-9b2e71c4";
pub const REGION: &str = "us-east-1";

/// One running server with one bucket.
pub struct S3Server {
    pub addr: SocketAddr,
    pub bucket: String,
    /// The server's root: objects live at `root/BUCKET/KEY`.
    pub root: tempfile::TempDir,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl S3Server {
    /// Starts a server with `bucket` created (a folder under its root).
    pub async fn start(bucket: &str) -> S3Server {
        let root = tempfile::tempdir().expect("s3 root");
        std::fs::create_dir_all(root.path().join(bucket)).expect("bucket folder");
        Self::serve(bucket, root, "127.0.0.1:0".parse().expect("addr")).await
    }

    /// Stops answering (connections dropped, the port closed), keeping the
    /// objects; [`S3Server::resume`] serves them again on the same address.
    pub async fn outage(self) -> (String, tempfile::TempDir, SocketAddr) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        (self.bucket, self.root, self.addr)
    }

    pub async fn resume(down: (String, tempfile::TempDir, SocketAddr)) -> S3Server {
        let (bucket, root, addr) = down;
        Self::serve(&bucket, root, addr).await
    }

    async fn serve(bucket: &str, root: tempfile::TempDir, addr: SocketAddr) -> S3Server {
        let fs = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs");
        let service = {
            let mut b = S3ServiceBuilder::new(fs);
            b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            b.build()
        };
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind s3");
        let addr = listener.local_addr().expect("s3 addr");
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (stop2, tasks2) = (stop.clone(), tasks.clone());
        tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop2.cancelled() => break,
                    a = listener.accept() => a,
                };
                let Ok((socket, _)) = accepted else { continue };
                let service = service.clone();
                let stop3 = stop2.clone();
                tasks2.spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service);
                    tokio::select! {
                        _ = conn => {}
                        () = stop3.cancelled() => {}
                    }
                });
            }
        });
        S3Server {
            addr,
            bucket: bucket.to_owned(),
            root,
            stop,
            tasks,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `AWS_*` variables a daemon needs to reach this server with
    /// `secret` as its secret key.
    pub fn env_with_secret(&self, secret: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", secret.to_owned()),
            ("AWS_REGION", REGION.to_owned()),
        ]
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.env_with_secret(SECRET_KEY)
    }

    /// A client of this server, as the tests' own eyes.
    pub fn client(&self) -> Arc<AmazonS3> {
        self.client_with_secret(SECRET_KEY)
    }

    pub fn client_with_secret(&self, secret: &str) -> Arc<AmazonS3> {
        let store = AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_bucket_name(&self.bucket)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(secret)
            .with_region(REGION)
            .with_allow_http(true)
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            })
            .build()
            .expect("s3 client");
        Arc::new(store)
    }

    /// Where the object `key` lives on disk.
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.root.path().join(&self.bucket).join(key)
    }

    /// Every object under `prefix`: (key, size), sorted by key.
    pub async fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        use futures_util::TryStreamExt;
        let client = self.client();
        let prefix = object_store::path::Path::parse(prefix).expect("prefix");
        let mut objects: Vec<(String, u64)> = tokio::time::timeout(
            Duration::from_secs(10),
            client.list(Some(&prefix)).try_collect::<Vec<_>>(),
        )
        .await
        .expect("list in time")
        .expect("list")
        .into_iter()
        .map(|m| (m.location.to_string(), m.size))
        .collect();
        objects.sort();
        objects
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }
}

/// Files under `dir`, recursively (relative paths), for checks on the
/// server's folder.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

/// The bytes of object `key`.
pub async fn get_bytes(client: &AmazonS3, key: &str) -> Vec<u8> {
    use object_store::ObjectStoreExt;
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        client.get(&object_store::path::Path::parse(key).expect("key")),
    )
    .await
    .expect("get in time")
    .expect("get");
    got.bytes().await.expect("body").to_vec()
}
