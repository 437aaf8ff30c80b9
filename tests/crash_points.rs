//! The real daemon dies at exact instants (named failpoints: the process
//! aborts there, as abruptly as `kill -9`), then starts again on the same
//! folders: nothing is lost, nothing is paid or written twice, nothing is
//! left behind.

mod common;

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use common::*;
use infinitetalk_batch::failpoint;

/// Waits for a daemon that is to die at its failpoint; false if it lives on.
async fn died(child: &mut Child, limit: Duration) -> bool {
    wait_for(limit, || child.try_wait().ok().flatten())
        .await
        .is_some_and(|status| !status.success())
}

fn hidden_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs a 40-row batch with the daemon dying at `point` once, then again
/// without it; checks the results are whole and each row paid once.
async fn dies_at(point: &str) {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let mut rows = rows("c", 40, |i| format!("sim_audio_seconds={}", 5 + i % 7));
    rows[4].2.push_str("&sim_fail=CONTENT_VIOLATION");
    write_manifest(&dirs.inbox, "crash.csv", &rows);
    let listen = free_addr();
    let mut first = spawn_with_env(
        &dirs,
        &sim.url(),
        listen,
        &with_poll(&[]),
        0,
        &[(failpoint::VAR, point)],
    );
    let aborted = died(&mut first, Duration::from_secs(60)).await;
    kill9(&mut first);
    assert!(
        aborted,
        "never reached {point}; log:\n{}",
        log_text(&dirs, 0)
    );

    let mut second = spawn_daemon(&dirs, &sim.url(), listen, &with_poll(&[]), 1);
    let finished = wait_results(&dirs, "crash", Duration::from_secs(60)).await;
    let status = terminate(&mut second, Duration::from_secs(25));
    assert!(
        finished,
        "{point}: no results after the restart; log:\n{}",
        log_text(&dirs, 1)
    );
    assert!(status.is_some_and(|s| s.success()), "{point}: {status:?}");
    let results = check_results_against_sim(&dirs, "crash", &sim.handle);
    assert_eq!(results.len(), 40, "{point}: every row once");
    let ids: std::collections::HashSet<&str> = results.iter().map(|r| r["id"].as_str()).collect();
    assert_eq!(ids.len(), 40, "{point}: no row twice");
    assert_eq!(results.iter().filter(|r| r["state"] == "failed").count(), 1);
    let stats = sim.handle.stats();
    assert_eq!(
        stats.max_submissions_per_pair, 1,
        "{point}: a row paid twice"
    );
    assert!(
        hidden_files(&dirs.batch_dir("crash")).is_empty(),
        "{point}: left {:?}",
        hidden_files(&dirs.batch_dir("crash"))
    );
    assert!(
        !dirs.outbox.join("crash-2").exists(),
        "{point}: taken twice"
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_the_archive_write_and_the_rows_leaving_the_database() {
    dies_at("archive-before-remove").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_before_the_archive_write() {
    dies_at("archive-before-append").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_while_results_csv_is_written() {
    dies_at("results-mid-write").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_while_the_manifest_is_copied_leaves_nothing_behind() {
    dies_at("ingest-mid-copy").await;
}
