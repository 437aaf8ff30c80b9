//! A task the API no longer knows is not polled for ever: after five "no
//! such task" answers over `task-lost-after`, its row ends failed with
//! TASK_NOT_FOUND, shown in results.csv and status.

mod common;

use std::time::Duration;

use common::*;
use infinitetalk_batch::simulator::SimArgs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_the_api_forgot_end_failed_task_not_found() {
    // Tasks that take minutes: all still running when the daemon is killed.
    let sim = Sim::start(SimArgs {
        time_factor: 1.0,
        ..SimArgs::default()
    })
    .await;
    let dirs = Dirs::new();
    write_manifest(
        &dirs.inbox,
        "lost.csv",
        &rows("l", 6, |_| "sim_audio_seconds=30".into()),
    );
    let config = dirs.root.path().join("lost.toml");
    std::fs::write(&config, "task-lost-after = \"2s\"\n").expect("config");
    let config = config.to_string_lossy().into_owned();
    let listen = free_addr();
    let extra = with_poll(&["--config", &config]);
    let mut first = spawn_daemon(&dirs, &sim.url(), listen, &extra, 0);
    let submitted = wait_for(Duration::from_secs(30), || {
        (sim.handle.tasks().len() == 6).then_some(())
    })
    .await;
    // Let the task ids reach the disk.
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill9(&mut first);
    assert!(submitted.is_some(), "log:\n{}", log_text(&dirs, 0));

    // Another API that never heard of those tasks.
    let forgetful = Sim::start(SimArgs::default()).await;
    let mut second = spawn_daemon(&dirs, &forgetful.url(), listen, &extra, 1);
    let finished = wait_results(&dirs, "lost", Duration::from_secs(60)).await;
    let status = terminate(&mut second, Duration::from_secs(25));
    assert!(finished, "log:\n{}", log_text(&dirs, 1));
    assert!(status.is_some_and(|s| s.success()));
    let results = read_results(&dirs.batch_dir("lost").join("results.csv"));
    assert_eq!(results.len(), 6);
    for r in &results {
        assert_eq!(r["state"], "failed", "{r:?}");
        assert_eq!(r["fail_code"], "TASK_NOT_FOUND", "{r:?}");
        assert!(r["fail_msg"].contains("no task"), "{r:?}");
    }
    // Nothing was submitted again: the tasks may still run somewhere.
    assert!(forgetful.handle.tasks().is_empty());
    let stats = forgetful.handle.stats();
    assert!(
        stats.status_requests >= 30,
        "five answers a task at least: {}",
        stats.status_requests
    );
    sim.stop().await;
    forgetful.stop().await;
}
