//! The real binary against the built-in simulator over loopback.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use infinitetalk_batch::simulator::{CreditsStyle, Faults, SimArgs};
use infinitetalk_batch::store::{RowState, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_end_to_end_with_identical_bytes() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let mut rows = rows("e", 200, |i| format!("sim_audio_seconds={}", 5 + i % 20));
    // A few rows with two result files, and a few the API refuses.
    for i in [3, 50, 120] {
        rows[i].2.push_str("&sim_results=2");
    }
    for i in [7, 77] {
        rows[i].2.push_str("&sim_fail=CONTENT_VIOLATION");
    }
    write_manifest(&dirs.inbox, "batch1.csv", &rows);
    let listen = free_addr();
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &with_poll(&[]), 0);
    let finished = wait_results(&dirs, "batch1", Duration::from_secs(90)).await;
    let status = terminate(&mut daemon, Duration::from_secs(25));
    assert!(
        finished,
        "batch did not finish; log:\n{}",
        log_text(&dirs, 0)
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "graceful stop exits 0: {status:?}"
    );

    let header = results_header(&dirs.batch_dir("batch1").join("results.csv"));
    assert_eq!(
        header,
        [
            "id",
            "image_url",
            "audio_url",
            "note",
            "state",
            "task_id",
            "output",
            "fail_code",
            "fail_msg",
            "audio_seconds",
            "cost_usd"
        ]
    );
    let results = check_results_against_sim(&dirs, "batch1", &sim.handle);
    assert_eq!(results.len(), 200);
    let by_id: HashMap<&str, &HashMap<String, String>> =
        results.iter().map(|r| (r["id"].as_str(), r)).collect();
    assert_eq!(by_id["e7"]["state"], "failed");
    assert_eq!(by_id["e7"]["fail_code"], "CONTENT_VIOLATION");
    assert!(!by_id["e7"]["fail_msg"].is_empty());
    assert_eq!(by_id["e3"]["output"], "e3.mp4;e3~2.mp4");
    assert_eq!(
        by_id["e5"]["note"], "note, for e5",
        "extra columns carried unchanged"
    );
    assert_eq!(results.iter().filter(|r| r["state"] == "done").count(), 198);
    // The manifest left the inbox for the batch folder.
    assert!(dirs.batch_dir("batch1").join("manifest.csv").exists());
    assert!(!dirs.inbox.join("batch1.csv").exists());
    // No hidden partial files remain.
    let leftovers: Vec<_> = std::fs::read_dir(dirs.batch_dir("batch1"))
        .expect("batch dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let stats = sim.handle.stats();
    assert_eq!(stats.rejected_429, 0);
    assert_eq!(
        stats.max_submissions_per_pair, 1,
        "no row was paid for twice"
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_pays_once() {
    let sim = Sim::start(SimArgs {
        time_factor: 0.004,
        max_concurrent: 60,
        ..SimArgs::default()
    })
    .await;
    let dirs = Dirs::new();
    let rows = rows("k", 300, |i| {
        if i.is_multiple_of(25) {
            "sim_fail=INVALID_IMAGE_URL".to_string()
        } else {
            format!("sim_audio_seconds={}", 5 + i % 30)
        }
    });
    write_manifest(&dirs.inbox, "crash.csv", &rows);
    let listen = free_addr();
    let extra = with_poll(&["--max-concurrent", "60"]);
    let mut run = 0;
    // Kill at moments spread over the batch's life.
    for wait_ms in [700u64, 1900, 1300, 2600, 900] {
        let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &extra, run);
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        kill9(&mut daemon);
        run += 1;
    }
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &extra, run);
    let finished = wait_results(&dirs, "crash", Duration::from_secs(120)).await;
    terminate(&mut daemon, Duration::from_secs(25));
    assert!(
        finished,
        "batch did not finish; last log:\n{}",
        log_text(&dirs, run)
    );

    let results = check_results_against_sim(&dirs, "crash", &sim.handle);
    assert_eq!(results.len(), 300);
    for r in &results {
        let i: usize = r["id"][1..].parse().expect("id");
        let expected = if i.is_multiple_of(25) {
            "failed"
        } else {
            "done"
        };
        assert_eq!(r["state"], expected, "row {}", r["id"]);
    }
    // Guarantee 2: a pair submitted twice only when its first task id was
    // never recorded (the submit was in flight at the kill).
    let store = Store::open(&dirs.state).expect("store reopens");
    let batch = store
        .batches()
        .expect("batches")
        .into_iter()
        .find(|b| b.name == "crash")
        .expect("batch");
    let mut in_flight_resubmits = 0;
    let records = store.batch_rows(batch.seq).expect("read rows");
    assert_eq!(records.len(), 300, "every row has a record");
    for (_, record) in records {
        assert!(matches!(record.state, RowState::Done | RowState::Failed));
        assert!(
            record.previous_tasks.is_empty(),
            "row {} was resubmitted after having task {:?}",
            record.id,
            record.previous_tasks
        );
    }
    let mut per_pair: HashMap<(Vec<String>, String), usize> = HashMap::new();
    for t in sim.handle.tasks() {
        *per_pair
            .entry((t.image_urls.clone(), t.audio_url.clone()))
            .or_default() += 1;
    }
    for n in per_pair.values() {
        in_flight_resubmits += n - 1;
    }
    let logs: String = (0..=run).map(|n| log_text(&dirs, n)).collect();
    let warned = logs.matches("submitting it again").count();
    assert!(
        in_flight_resubmits <= warned,
        "{in_flight_resubmits} extra tasks but only {warned} rows were named as in flight at a kill"
    );
    println!(
        "rows resubmitted because their submit was in flight at a kill: {in_flight_resubmits}"
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_at_the_server_across_a_restart() {
    let sim = Sim::start(SimArgs {
        time_factor: 0.002,
        max_concurrent: 20,
        max_requests_per_minute: 600,
        ..SimArgs::default()
    })
    .await;
    let dirs = Dirs::new();
    write_manifest(
        &dirs.inbox,
        "limits.csv",
        &rows("l", 450, |i| format!("sim_audio_seconds={}", 5 + i % 10)),
    );
    let listen = free_addr();
    let extra = with_poll(&["--max-concurrent", "20", "--max-requests-per-minute", "600"]);
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &extra, 0);
    // Run into the limit, then restart hard while the window is full.
    tokio::time::sleep(Duration::from_secs(40)).await;
    kill9(&mut daemon);
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &extra, 1);
    tokio::time::sleep(Duration::from_secs(35)).await;
    terminate(&mut daemon, Duration::from_secs(25));
    let stats = sim.handle.stats();
    assert!(
        stats.submit_requests > 100,
        "the test must reach the limit: {stats:?}"
    );
    assert!(
        stats.max_requests_in_window >= 300,
        "the budget should be used: {stats:?}"
    );
    assert!(stats.max_requests_in_window <= 600, "window: {stats:?}");
    assert!(stats.max_unfinished_tasks <= 20, "concurrency: {stats:?}");
    assert_eq!(stats.rejected_429, 0, "{stats:?}");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_everywhere_still_finish_every_row_intact() {
    let sim = Sim::start(SimArgs {
        time_factor: 0.002,
        seed: Some(7),
        faults: Faults {
            error_5xx: 0.1,
            reset: 0.05,
            malformed: 0.05,
            slow: 0.05,
            slow_ms: 300,
            cut_download: 0.3,
            ..Faults::default()
        },
        ..SimArgs::default()
    })
    .await;
    let dirs = Dirs::new();
    write_manifest(
        &dirs.inbox,
        "faulty.csv",
        &rows("f", 80, |i| {
            format!("sim_audio_seconds={}&sim_video_bytes=300000", 5 + i % 10)
        }),
    );
    let listen = free_addr();
    let mut daemon = spawn_daemon(
        &dirs,
        &sim.url(),
        listen,
        // Resets and garbled submit answers are ambiguous; their bound is
        // tested in tests/trust.rs, raised here so no row ends on a streak.
        &with_poll(&["--api-timeout", "2s", "--max-ambiguous-submits", "50"]),
        0,
    );
    let finished = wait_results(&dirs, "faulty", Duration::from_secs(120)).await;
    terminate(&mut daemon, Duration::from_secs(25));
    assert!(finished, "log:\n{}", log_text(&dirs, 0));
    let results = check_results_against_sim(&dirs, "faulty", &sim.handle);
    assert!(
        results.iter().all(|r| r["state"] == "done"),
        "no row may fail from transient faults"
    );
    let stats = sim.handle.stats();
    assert!(
        stats.faults.error_5xx > 0 && stats.faults.reset > 0 && stats.faults.malformed > 0,
        "{stats:?}"
    );
    assert!(stats.faults.cut_download > 0, "{stats:?}");
    sim.stop().await;
}

async fn credits_outage(style: CreditsStyle) {
    let sim = Sim::start(SimArgs {
        time_factor: 0.002,
        credits_out_after: Some(Duration::from_millis(300)),
        credits_out_for: Some(Duration::from_secs(3)),
        faults: Faults {
            credits_style: style,
            ..Faults::default()
        },
        ..SimArgs::default()
    })
    .await;
    let dirs = Dirs::new();
    write_manifest(
        &dirs.inbox,
        "credits.csv",
        &rows("c", 40, |i| format!("sim_audio_seconds={}", 5 + i % 10)),
    );
    let listen = free_addr();
    let mut daemon = spawn_daemon(
        &dirs,
        &sim.url(),
        listen,
        &with_poll(&["--pause-probe", "500ms", "--max-concurrent", "5"]),
        0,
    );
    let finished = wait_results(&dirs, "credits", Duration::from_secs(90)).await;
    terminate(&mut daemon, Duration::from_secs(25));
    let log = log_text(&dirs, 0);
    assert!(finished, "log:\n{log}");
    let results = check_results_against_sim(&dirs, "credits", &sim.handle);
    assert!(
        results.iter().all(|r| r["state"] == "done"),
        "credits never fail a row"
    );
    assert!(
        sim.handle.stats().faults.credits_out > 0,
        "the outage must have been hit"
    );
    assert!(log.contains("submission paused"), "the pause is logged");
    assert!(
        log.contains("submission resumed"),
        "and so is the resumption"
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_credits_as_400_pauses_and_resumes() {
    credits_outage(CreditsStyle::Http400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_credits_as_failed_task_pauses_and_resumes() {
    credits_outage(CreditsStyle::Task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_side_failures_are_resubmitted_a_bounded_number_of_times() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let rows = rows("s", 6, |i| match i {
        0 | 1 => "sim_fail_once=PROCESSING_TIMEOUT".into(),
        2 => "sim_fail=MODEL_UNAVAILABLE".into(),
        _ => "sim_audio_seconds=5".into(),
    });
    write_manifest(&dirs.inbox, "retry.csv", &rows);
    let listen = free_addr();
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &with_poll(&[]), 0);
    let finished = wait_results(&dirs, "retry", Duration::from_secs(60)).await;
    terminate(&mut daemon, Duration::from_secs(25));
    let log = log_text(&dirs, 0);
    assert!(finished, "log:\n{log}");
    let results = check_results_against_sim(&dirs, "retry", &sim.handle);
    let by_id: HashMap<&str, &HashMap<String, String>> =
        results.iter().map(|r| (r["id"].as_str(), r)).collect();
    assert_eq!(by_id["s0"]["state"], "done");
    assert_eq!(by_id["s1"]["state"], "done");
    assert_eq!(by_id["s2"]["state"], "failed");
    assert_eq!(by_id["s2"]["fail_code"], "MODEL_UNAVAILABLE");
    // 1 + the default 2 resubmissions for the row that always fails.
    let tasks = sim.handle.tasks();
    let count = |needle: &str| {
        tasks
            .iter()
            .filter(|t| t.audio_url.contains(needle))
            .count()
    };
    assert_eq!(count("/s/2.mp3"), 3);
    assert_eq!(count("/s/0.mp3"), 2);
    assert_eq!(
        log.matches("will be submitted again as a new task").count(),
        4
    );
    sim.stop().await;
}
