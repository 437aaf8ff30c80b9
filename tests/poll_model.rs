//! What the poll model learns survives a restart, even a `kill -9`: the
//! tasks taken up at start are polled on a trained ladder at once, instead of
//! waiting (all but a few scouts) for a new cohort to teach it again.

mod common;

use std::time::{Duration, Instant};

use common::*;
use infinitetalk_batch::simulator::SimArgs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poll_model_survives_kill_9_and_polls_at_once() {
    // Tasks of 0.5..6 s; the daemon waits up to 20 s between polls of a
    // task it knows nothing about.
    let sim = Sim::start(SimArgs {
        time_factor: 0.01,
        ..SimArgs::default()
    })
    .await;
    let dirs = Dirs::new();
    let listen = free_addr();
    let extra = [
        "--poll-min",
        "100ms",
        "--poll-max",
        "20s",
        "--max-concurrent",
        "12",
    ];
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &extra, 0);
    write_manifest(
        &dirs.inbox,
        "learn.csv",
        &rows("learn", 400, |_| "sim_audio_seconds=10".into()),
    );
    // Long enough for many tasks to end and the model to be saved (every 10 s).
    let started = Instant::now();
    let learned = wait_for(Duration::from_secs(60), || {
        let s = sim.handle.stats();
        (s.tasks_succeeded >= 40 && started.elapsed() > Duration::from_secs(12)).then_some(())
    })
    .await;
    assert!(learned.is_some(), "log:\n{}", log_text(&dirs, 0));
    kill9(&mut daemon);
    let in_flight = sim.handle.stats().unfinished_tasks;
    // Let every task in flight end while the daemon is down.
    tokio::time::sleep(Duration::from_secs(7)).await;

    let before = sim.handle.stats().download_requests;
    let restart = Instant::now();
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &extra, 1);
    // Untrained, only the scouts (8) would be polled before poll_max (20 s);
    // with the model restored, every task taken up is past its first rung,
    // is polled at once, seen ended and its video downloaded.
    let polled = wait_for(Duration::from_secs(10), || {
        let s = sim.handle.stats();
        (s.download_requests >= before + in_flight).then_some(restart.elapsed())
    })
    .await;
    let log = log_text(&dirs, 1);
    assert!(in_flight > 8, "only {in_flight} tasks were in flight");
    let polled =
        polled.unwrap_or_else(|| panic!("the tasks taken up were not seen ended; log:\n{log}"));
    assert!(
        polled < Duration::from_secs(5),
        "{in_flight} tasks taken up seen ended only after {polled:?}"
    );
    assert!(
        log.contains("poll model restored") && log.contains("trained=true"),
        "{log}"
    );
    let status = terminate(&mut daemon, Duration::from_secs(25));
    assert!(status.is_some_and(|s| s.success()));
    sim.stop().await;
}
