//! Issue #15: the console over a large batch, and what an open console
//! costs an idle daemon.
//!
//! ```text
//! cargo build --release --bins --examples
//! ./target/release/examples/console_bench [ROWS] [IDLE_SECS]
//! ```
//!
//! Defaults: 1,000,000 rows, 60 s. Starts the release daemon (`run
//! --simulate`, its own temp folders), drops one manifest of ROWS rows,
//! pauses the batch as soon as it is accepted (so that the daemon goes idle)
//! and waits until nothing is in flight. Then prints:
//!
//! - the time of the first load of the batch's page (rows 1–50: the
//!   daemon's first look at the batch), of a page at the end of the batch
//!   (first time: the manifest read once; second time: from the positions
//!   remembered), and of a search by id for the last row;
//! - the daemon's CPU (utime + stime from /proc/PID/stat) over IDLE_SECS
//!   with no console open, then over IDLE_SECS with a console's live stream
//!   (`/console/live`, what an open page keeps) connected.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod bench_util;

use bench_util::{BoxError, binary, cpu_seconds};

fn arg(n: usize, default: u64) -> Result<u64, BoxError> {
    match std::env::args().nth(n) {
        Some(a) => Ok(a.replace('_', "").parse()?),
        None => Ok(default),
    }
}

/// Kills the child when dropped, so that a failed run leaves nothing behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_manifest(path: &Path, rows: u64) -> Result<(), BoxError> {
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    writeln!(f, "id,image_url,audio_url")?;
    for i in 0..rows {
        writeln!(
            f,
            "row-{i},https://img.example/{i}.png,https://audio.example/{i}.mp3?sim_audio_seconds=600"
        )?;
    }
    f.flush()?;
    Ok(())
}

async fn status(http: &reqwest::Client, base: &str) -> Option<serde_json::Value> {
    http.get(format!("{base}/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// Time of one GET until its whole body arrived; fails unless 200.
async fn timed_get(http: &reqwest::Client, url: &str) -> Result<(Duration, String), BoxError> {
    let started = Instant::now();
    let resp = http.get(url).send().await?;
    if !resp.status().is_success() {
        return Err(format!("{url}: {}", resp.status()).into());
    }
    let body = resp.text().await?;
    Ok((started.elapsed(), body))
}

async fn cpu_over(pid: u32, secs: u64) -> Result<f64, BoxError> {
    let before = cpu_seconds(pid).ok_or("cannot read the daemon's CPU time")?;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let after = cpu_seconds(pid).ok_or("cannot read the daemon's CPU time")?;
    Ok((after - before) / secs as f64 * 100.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let rows = arg(1, 1_000_000)?;
    let idle = arg(2, 60)?.max(5);
    let bin = binary()?;
    let work = tempfile::tempdir()?;
    let (inbox, outbox, state) = (
        work.path().join("inbox"),
        work.path().join("outbox"),
        work.path().join("state"),
    );
    fs::create_dir_all(&inbox)?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let base = format!("http://127.0.0.1:{port}");
    let daemon = Reaped(
        Command::new(&bin)
            .args(["run", "--simulate", "--inbox"])
            .arg(&inbox)
            .arg("--outbox")
            .arg(&outbox)
            .arg("--state")
            .arg(&state)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let pid = daemon.0.id();
    let tmp = work.path().join("big.csv");
    let t = Instant::now();
    write_manifest(&tmp, rows)?;
    let bytes = fs::metadata(&tmp)?.len();
    println!(
        "manifest: {rows} rows, {:.1} MB, written in {:.1?}",
        bytes as f64 / 1e6,
        t.elapsed()
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    // The token exists once the daemon is up.
    let token_path = state.join("admin-token");
    let up = Instant::now();
    while status(&http, &base).await.is_none() || !token_path.exists() {
        if up.elapsed() > Duration::from_secs(30) {
            return Err("the daemon did not come up".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = fs::read_to_string(&token_path)?.trim().to_owned();
    fs::rename(&tmp, inbox.join("big.csv"))?;
    let t = Instant::now();
    loop {
        let accepted = status(&http, &base).await.is_some_and(|s| {
            s["batches"]
                .as_array()
                .is_some_and(|b| b.iter().any(|b| b["name"] == "big"))
        });
        if accepted {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            return Err("the manifest was not accepted".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("accepted in {:.1?}", t.elapsed());
    let paused = http
        .post(format!("{base}/batches/big/pause"))
        .bearer_auth(&token)
        .send()
        .await?;
    if !paused.status().is_success() {
        return Err(format!("pause: {}", paused.status()).into());
    }
    // Idle: the tasks submitted before the pause have ended.
    let t = Instant::now();
    loop {
        let s = status(&http, &base).await.ok_or("status")?;
        if s["tasks_in_flight"].as_u64() == Some(0) {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err("tasks still in flight after 2 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the store settle (archive passes, flushes) before timing anything.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (first, body) = timed_get(&http, &format!("{base}/batches/big")).await?;
    let shown = body.matches("data-row-id=").count();
    println!("first load of the batch's page (rows 1-50): {first:.1?} ({shown} rows shown)");
    let (again, _) = timed_get(&http, &format!("{base}/batches/big")).await?;
    println!("second load of the same page: {again:.1?}");
    let end = rows.saturating_sub(50);
    let (deep, _) = timed_get(&http, &format!("{base}/batches/big?after={end}")).await?;
    println!("first load of the last page (after={end}): {deep:.1?}");
    let (deep2, _) = timed_get(&http, &format!("{base}/batches/big?after={end}")).await?;
    println!("second load of the last page: {deep2:.1?}");
    let last = format!("row-{}", rows - 1);
    let (found, body) = timed_get(&http, &format!("{base}/batches/big?q={last}")).await?;
    if !body.contains(&format!("data-row-id=\"{last}\"")) {
        return Err(format!("search for {last} did not find it").into());
    }
    println!("search by id for the last row ({last}): {found:.1?}");

    let closed = cpu_over(pid, idle).await?;
    println!("daemon CPU, idle, no console open, over {idle} s: {closed:.3}% of one core");
    let mut live = http
        .get(format!("{base}/console/live"))
        .timeout(Duration::from_secs(idle + 60))
        .send()
        .await?;
    let first_event = live.chunk().await?.map_or(0, |c| c.len());
    let reader = tokio::spawn(async move {
        let mut bytes = 0usize;
        while let Ok(Some(c)) = live.chunk().await {
            bytes += c.len();
        }
        bytes
    });
    let open = cpu_over(pid, idle).await?;
    reader.abort();
    println!(
        "daemon CPU, idle, one console's live stream open, over {idle} s: {open:.3}% of one core (first event {first_event} bytes)"
    );
    drop(daemon);
    Ok(())
}
