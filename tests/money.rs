//! Spend cap, retry and cancel: the real binary against the simulator.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use infinitetalk_batch::status::Report;

const POLL: [&str; 4] = ["--poll-min", "100ms", "--poll-max", "1s"];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = POLL.to_vec();
    v.extend_from_slice(extra);
    v
}

async fn status(listen: std::net::SocketAddr) -> Option<Report> {
    let resp = reqwest::get(format!("http://{listen}/status")).await.ok()?;
    resp.json::<Report>().await.ok()
}

/// Waits until `/status` satisfies `check`.
async fn wait_status(
    listen: std::net::SocketAddr,
    limit: Duration,
    check: impl Fn(&Report) -> bool,
) -> Option<Report> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(r) = status(listen).await
            && check(&r)
        {
            return Some(r);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `infinitetalk-batch CMD BATCH ...` against `dirs` and `listen`.
fn manage(dirs: &Dirs, listen: std::net::SocketAddr, cmd: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(cmd)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--state")
        .arg(&dirs.state)
        .arg("--outbox")
        .arg(&dirs.outbox)
        .output()
        .expect("command runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn results_path(dirs: &Dirs, batch: &str) -> std::path::PathBuf {
    dirs.batch_dir(batch).join("results.csv")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_pauses_before_the_row_that_would_cross_it_and_a_higher_cap_resumes() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let mut rows = rows("m", 6, |i| format!("sim_audio_seconds={}", 5 + i));
    for i in [4, 5] {
        rows[i].2.push_str("&sim_fail=CONTENT_VIOLATION");
    }
    write_manifest(&dirs.inbox, "capped.csv", &rows);
    let listen = free_addr();
    // Unprobed rows count 5 s at 480p: $0.15 each; $0.50 allows 3.
    let mut daemon = spawn_daemon(
        &dirs,
        &sim.url(),
        listen,
        &args(&["--max-spend-usd", "0.50"]),
        0,
    );
    let paused = wait_status(listen, Duration::from_secs(30), |r| {
        r.paused.is_some() && r.batches.first().is_some_and(|b| b.done == 3)
    })
    .await;
    let report = paused.unwrap_or_else(|| panic!("no cap pause; log:\n{}", log_text(&dirs, 0)));
    assert!(
        report
            .paused
            .as_deref()
            .is_some_and(|p| p.contains("spend cap")),
        "{report:?}"
    );
    let b = &report.batches[0];
    assert_eq!((b.done, b.failed, b.queued), (3, 0, 3), "{report:?}");
    let spend = report.spend.expect("spend shown");
    assert!((spend.spent_usd - 0.45).abs() < 1e-9, "{spend:?}");
    assert_eq!(spend.cap_usd, Some(0.5));
    // It stays paused: nothing more is submitted.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sim.handle.tasks().len(), 3);
    assert!(terminate(&mut daemon, Duration::from_secs(25)).is_some_and(|s| s.success()));
    assert!(log_text(&dirs, 0).contains("spend cap"));

    // A restart with a higher cap: everything completes; the spend was kept.
    let mut daemon = spawn_daemon(
        &dirs,
        &sim.url(),
        listen,
        &args(&["--max-spend-usd", "10"]),
        1,
    );
    let path = results_path(&dirs, "capped");
    let finished = wait_for(Duration::from_secs(60), || path.exists().then_some(())).await;
    assert!(finished.is_some(), "log:\n{}", log_text(&dirs, 1));
    let report = status(listen).await.expect("status");
    assert!((report.spend.expect("spend").spent_usd - 0.90).abs() < 1e-9);
    let results = read_results(&path);
    assert_eq!(results.iter().filter(|r| r["state"] == "done").count(), 4);
    let failed: Vec<_> = results.iter().filter(|r| r["state"] == "failed").collect();
    assert_eq!(failed.len(), 2);
    let old_tasks: Vec<String> = failed.iter().map(|r| r["task_id"].clone()).collect();

    // Retry through the running daemon: new tasks, results.csv rewritten.
    let (ok, text) = manage(
        &dirs,
        listen,
        &["retry", "capped", "--codes", "CONTENT_VIOLATION"],
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("2 failed row(s) queued again") && text.contains("NEW task"),
        "{text}"
    );
    let rewritten = wait_for(Duration::from_secs(60), || {
        let results = read_results(&path);
        let tasks: Vec<String> = results
            .iter()
            .filter(|r| r["state"] == "failed")
            .map(|r| r["task_id"].clone())
            .collect();
        (tasks.len() == 2 && tasks.iter().all(|t| !old_tasks.contains(t))).then_some(())
    })
    .await;
    assert!(rewritten.is_some(), "log:\n{}", log_text(&dirs, 1));
    assert!(terminate(&mut daemon, Duration::from_secs(25)).is_some_and(|s| s.success()));

    // Retry with no daemon: on the state folder; the next start submits.
    let (ok, text) = manage(&dirs, listen, &["retry", "capped"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("2 failed row(s) queued again") && text.contains("no daemon"),
        "{text}"
    );
    let (ok, text) = manage(&dirs, listen, &["retry", "nope"]);
    assert!(!ok && text.contains("no batch named"), "{text}");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_queued_rows_with_the_daemon_running_or_not() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    write_manifest(&dirs.inbox, "live.csv", &rows("l", 8, |_| String::new()));
    let listen = free_addr();
    let mut daemon = spawn_daemon(
        &dirs,
        &sim.url(),
        listen,
        &args(&["--max-spend-usd", "0.30"]),
        0,
    );
    let paused = wait_status(listen, Duration::from_secs(30), |r| {
        r.paused.is_some() && r.batches.first().is_some_and(|b| b.done == 2)
    })
    .await;
    assert!(
        paused.is_some(),
        "{:?}\nlog:\n{}",
        status(listen).await,
        log_text(&dirs, 0)
    );
    let (ok, text) = manage(&dirs, listen, &["cancel", "live"]);
    assert!(ok, "{text}");
    assert!(text.contains("6 queued row(s) cancelled"), "{text}");
    let path = results_path(&dirs, "live");
    let written = wait_for(Duration::from_secs(20), || path.exists().then_some(())).await;
    assert!(written.is_some(), "log:\n{}", log_text(&dirs, 0));
    let results = read_results(&path);
    assert_eq!(results.iter().filter(|r| r["state"] == "done").count(), 2);
    assert_eq!(
        results
            .iter()
            .filter(|r| r["state"] == "failed" && r["fail_code"] == "CANCELLED")
            .count(),
        6
    );

    // A second batch, cancelled with the daemon stopped.
    write_manifest(&dirs.inbox, "offline.csv", &rows("o", 5, |_| String::new()));
    let accepted = wait_for(Duration::from_secs(20), || {
        dirs.batch_dir("offline")
            .join("manifest.csv")
            .exists()
            .then_some(())
    })
    .await;
    assert!(accepted.is_some(), "log:\n{}", log_text(&dirs, 0));
    assert!(terminate(&mut daemon, Duration::from_secs(25)).is_some_and(|s| s.success()));
    let (ok, text) = manage(&dirs, listen, &["cancel", "offline"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("5 queued row(s) cancelled") && text.contains("no daemon"),
        "{text}"
    );
    let results = read_results(&results_path(&dirs, "offline"));
    assert_eq!(results.len(), 5);
    assert!(results.iter().all(|r| r["fail_code"] == "CANCELLED"));
    sim.stop().await;
}

/// A 16-bit mono PCM WAV of `seconds` of silence at 8 kHz.
fn wav(seconds: u32) -> Vec<u8> {
    let data = seconds * 8_000 * 2;
    let mut v = Vec::new();
    v.extend_from_slice(b"RIFF");
    v.extend_from_slice(&(36 + data).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes());
    v.extend_from_slice(&8_000u32.to_le_bytes());
    v.extend_from_slice(&16_000u32.to_le_bytes());
    v.extend_from_slice(&2u16.to_le_bytes());
    v.extend_from_slice(&16u16.to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&data.to_le_bytes());
    v.resize(v.len() + data as usize, 0);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probed_rows_carry_their_cost_and_bad_audio_is_never_submitted() {
    use axum::routing::get;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let down_hits = std::sync::Arc::new(AtomicUsize::new(0));
    let hits = down_hits.clone();
    let app = axum::Router::new()
        .route("/seven.wav", get(|| async { wav(7) }))
        .route("/page.wav", get(|| async { "<html>not audio</html>" }))
        .route(
            "/down.wav",
            get(move || async move {
                hits.fetch_add(1, Ordering::SeqCst);
                axum::http::StatusCode::SERVICE_UNAVAILABLE
            }),
        );
    let files = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", files.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(files, app).await;
    });
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let row = |id: &str, path: &str| {
        (
            id.to_owned(),
            format!("https://img.example/{id}.png"),
            format!("{base}/{path}"),
        )
    };
    write_manifest(
        &dirs.inbox,
        "probed.csv",
        &[
            row("good", "seven.wav"),
            row("missing", "missing.wav"),
            row("page", "page.wav"),
            row("down", "down.wav"),
        ],
    );
    let listen = free_addr();
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &args(&["--probe"]), 0);
    // The row whose audio host stays down waits in the queue between rounds
    // of tries without holding up the others.
    let others_ended = wait_status(listen, Duration::from_secs(30), |r| {
        r.batches
            .first()
            .is_some_and(|b| b.done == 1 && b.failed == 2)
    })
    .await;
    assert!(
        others_ended.is_some(),
        "the other rows wait behind the unreadable one; log:\n{}",
        log_text(&dirs, 0)
    );
    // ... and it fails after a bounded number of tries (about a minute).
    let path = results_path(&dirs, "probed");
    let finished = wait_for(Duration::from_secs(150), || path.exists().then_some(())).await;
    let report = status(listen).await;
    assert!(terminate(&mut daemon, Duration::from_secs(25)).is_some_and(|s| s.success()));
    assert!(finished.is_some(), "log:\n{}", log_text(&dirs, 0));
    let results = read_results(&path);
    let by_id = |id: &str| {
        results
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("row {id}"))
    };
    assert_eq!(by_id("good")["state"], "done");
    assert_eq!(by_id("good")["audio_seconds"], "7.00");
    assert_eq!(by_id("good")["cost_usd"], "0.2100");
    assert_eq!(by_id("missing")["state"], "failed");
    assert_eq!(by_id("missing")["fail_code"], "AUDIO_PROBE_FAILED");
    assert!(by_id("missing")["fail_msg"].contains("HTTP 404"));
    assert_eq!(by_id("page")["fail_code"], "AUDIO_UNSUPPORTED");
    assert_eq!(by_id("page")["task_id"], "");
    assert_eq!(by_id("down")["fail_code"], "AUDIO_PROBE_FAILED");
    assert!(
        by_id("down")["fail_msg"].contains("HTTP 503")
            && by_id("down")["fail_msg"].contains("after 7 rounds of 3 tries"),
        "{}",
        by_id("down")["fail_msg"]
    );
    assert_eq!(
        down_hits.load(Ordering::SeqCst),
        21,
        "7 rounds of 3 tries, then no more"
    );
    assert_eq!(sim.handle.tasks().len(), 1, "bad audio is never submitted");
    let spend = report.and_then(|r| r.spend).expect("spend in status");
    assert!((spend.spent_usd - 0.21).abs() < 1e-9, "{spend:?}");
    assert!((spend.audio_seconds - 7.0).abs() < 1e-9, "{spend:?}");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_batch_ends_when_its_running_rows_come_back_to_the_queue() {
    // Tasks of 2.5 to 7.5 s, time enough to cancel while they run; each
    // fails once with a service-side code, which queues its row again.
    let sim = Sim::start(sim_at(0.05)).await;
    let dirs = Dirs::new();
    write_manifest(
        &dirs.inbox,
        "back.csv",
        &rows("k", 3, |_| {
            "sim_audio_seconds=5&sim_fail_once=PROCESSING_TIMEOUT".into()
        }),
    );
    let listen = free_addr();
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &args(&[]), 0);
    let running = wait_status(listen, Duration::from_secs(30), |r| {
        r.batches.first().is_some_and(|b| b.in_flight == 3)
    })
    .await;
    assert!(running.is_some(), "log:\n{}", log_text(&dirs, 0));
    let (ok, text) = manage(&dirs, listen, &["cancel", "back"]);
    assert!(ok, "{text}");
    assert!(text.contains("0 queued row(s) cancelled"), "{text}");
    // The failed tasks would be submitted again: the cancel stops that, and
    // the batch ends.
    let path = results_path(&dirs, "back");
    let written = wait_for(Duration::from_secs(60), || path.exists().then_some(())).await;
    assert!(terminate(&mut daemon, Duration::from_secs(25)).is_some_and(|s| s.success()));
    assert!(written.is_some(), "log:\n{}", log_text(&dirs, 0));
    let results = read_results(&path);
    assert_eq!(results.len(), 3);
    assert!(
        results
            .iter()
            .all(|r| r["state"] == "failed" && r["fail_code"] == "CANCELLED"),
        "{results:?}"
    );
    assert_eq!(
        sim.handle.tasks().len(),
        3,
        "no second task after the cancel"
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_raised_cap_from_the_config_file() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    write_manifest(
        &dirs.inbox,
        "hup.csv",
        &rows("h", 4, |_| "sim_audio_seconds=5".into()),
    );
    let config = dirs.root.path().join("daemon.toml");
    std::fs::write(&config, "max-spend-usd = 0.30\n").expect("config");
    let listen = free_addr();
    let config_arg = config.to_string_lossy().into_owned();
    let mut daemon = spawn_daemon(
        &dirs,
        &sim.url(),
        listen,
        &args(&["--config", &config_arg]),
        0,
    );
    // $0.15 a row: the cap allows 2.
    let paused = wait_status(listen, Duration::from_secs(30), |r| {
        r.paused.is_some() && r.batches.first().is_some_and(|b| b.done == 2)
    })
    .await;
    assert!(
        paused.is_some(),
        "no cap pause; log:\n{}",
        log_text(&dirs, 0)
    );
    std::fs::write(&config, "max-spend-usd = 5.0\n").expect("raise the cap");
    let pid = nix::unistd::Pid::from_raw(daemon.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let finished = wait_for(Duration::from_secs(30), || {
        results_path(&dirs, "hup").exists().then_some(())
    })
    .await;
    assert!(terminate(&mut daemon, Duration::from_secs(25)).is_some_and(|s| s.success()));
    let log = log_text(&dirs, 0);
    assert!(
        finished.is_some(),
        "the raised cap did not resume submission; log:\n{log}"
    );
    assert!(log.contains("spend cap reloaded"), "{log}");
    let results = read_results(&results_path(&dirs, "hup"));
    assert!(results.iter().all(|r| r["state"] == "done"));
    sim.stop().await;
}
