//! Issue #16: uploading a large output to an S3-protocol server with the
//! daemon's own uploader (`outbox::S3Outbox::upload_file`: 5 MiB multipart
//! parts streamed from the file), against a plain disk copy of the same
//! bytes, and the uploader's peak memory while it streams.
//!
//! ```sh
//! cargo run --release --example s3_bench            # a 1024 MB file
//! cargo run --release --example s3_bench -- 256     # any size in MB
//! ```
//!
//! The server (s3s-fs behind s3s's SigV4 checks, as in the tests) runs in a
//! child process (this example with `serve`), so the peak RSS printed is the
//! uploader's alone.

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use infinitetalk_batch::outbox::{S3Outbox, StoreTarget};

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/common/s3.rs"]
mod s3;

const BUCKET: &str = "bench";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        serve();
        return;
    }
    let mb: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(1024);
    bench(mb);
}

/// Child: runs the server until stdin closes; prints its address first.
fn serve() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let server = s3::S3Server::start(BUCKET).await;
        println!("{}", server.addr);
        let _ = std::io::stdout().flush();
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await;
        server.stop().await;
    });
}

/// Peak resident memory of this process so far (`VmHWM`), in MB.
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn write_input(path: &Path, mb: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create input"));
    // Incompressible enough, and cheap: a xorshift stream.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1024 * 1024];
    for _ in 0..mb {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk).expect("write input");
    }
    f.flush().expect("flush");
    f.get_ref().sync_all().expect("sync input");
}

fn bench(mb: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("video.mp4");
    write_input(&input, mb);
    let bytes = mb * 1024 * 1024;
    let rate = |d: Duration| bytes as f64 / 1_048_576.0 / d.as_secs_f64();

    // A plain disk copy of the same bytes, made durable like an upload is.
    let copy = dir.path().join("copy.mp4");
    let t = Instant::now();
    std::fs::copy(&input, &copy).expect("copy");
    std::fs::File::open(&copy)
        .and_then(|f| f.sync_all())
        .expect("sync copy");
    let copy_time = t.elapsed();
    std::fs::remove_file(&copy).expect("remove copy");

    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(exe)
        .arg("serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("server child");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("server address");
    let endpoint = format!("http://{}", line.trim());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let before = peak_rss_mb();
    let (upload_time, stored) = rt.block_on(async {
        let target = StoreTarget::parse(&format!("s3://{BUCKET}/bench"))
            .expect("s3 URL")
            .expect("valid");
        let vars = [
            ("AWS_ENDPOINT_URL", endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY.to_owned()),
            ("AWS_REGION", s3::REGION.to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v));
        let store = S3Outbox::build(target, vars, None).expect("client");
        let t = Instant::now();
        let stored = store
            .upload_file(&input, &store.key("b1", "r1.mp4"))
            .await
            .expect("upload");
        (t.elapsed(), stored)
    });
    let after = peak_rss_mb();
    drop(child.stdin.take());
    let _ = child.wait();
    assert_eq!(stored, bytes, "the store holds every byte");

    println!("file: {mb} MB");
    println!(
        "disk copy (copy + fsync): {:.2} s = {:.0} MB/s",
        copy_time.as_secs_f64(),
        rate(copy_time)
    );
    println!(
        "upload to s3s-fs on loopback (multipart, 5 MiB parts, length checked): {:.2} s = {:.0} MB/s",
        upload_time.as_secs_f64(),
        rate(upload_time)
    );
    println!("uploader peak RSS (VmHWM): {before:.1} MB before the upload, {after:.1} MB after");
}
