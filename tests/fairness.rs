//! Active batches share submission: a small batch dropped behind a large one
//! starts at once and finishes long before it; `pause` stops a batch's new
//! tasks (running ones finish), `resume` and `priority` act through the
//! daemon's admin routes, all from the command line.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn cli(dirs: &Dirs, listen: std::net::SocketAddr, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--state")
        .arg(&dirs.state)
        .output()
        .expect("run the CLI");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Tasks the simulator has seen for rows whose audio URL names `prefix`.
fn tasks_of(sim: &Sim, prefix: &str) -> usize {
    let needle = format!("/{prefix}/");
    sim.handle
        .tasks()
        .iter()
        .filter(|t| t.audio_url.contains(&needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_batch_is_not_stuck_behind_a_large_one_and_pause_holds_a_batch() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let listen = free_addr();
    let extra = with_poll(&["--max-concurrent", "4"]);
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &extra, 0);
    write_manifest(
        &dirs.inbox,
        "big.csv",
        &rows("big", 240, |_| "sim_audio_seconds=10".into()),
    );
    let started = wait_for(Duration::from_secs(30), || {
        (tasks_of(&sim, "big") >= 8).then_some(())
    })
    .await;
    assert!(started.is_some(), "log:\n{}", log_text(&dirs, 0));

    write_manifest(
        &dirs.inbox,
        "small.csv",
        &rows("small", 6, |_| "sim_audio_seconds=5".into()),
    );
    let small_done = wait_results(&dirs, "small", Duration::from_secs(30)).await;
    assert!(
        small_done,
        "the small batch waited; log:\n{}",
        log_text(&dirs, 0)
    );
    let big_tasks = tasks_of(&sim, "big");
    assert!(
        big_tasks < 180,
        "the small batch finished only after {big_tasks} of the big one's 240 rows"
    );
    assert!(!dirs.batch_dir("big").join("results.csv").exists());

    // The new routes sit behind the admin boundary: no token, no change.
    let client = reqwest::Client::new();
    for route in ["pause", "resume", "priority"] {
        let answer = client
            .post(format!("http://{listen}/batches/big/{route}"))
            .body(r#"{"priority": "low"}"#)
            .send()
            .await
            .expect("daemon answers");
        assert_eq!(answer.status().as_u16(), 401, "{route} without the token");
    }
    let (ok, text) = cli(&dirs, listen, &["status"]);
    assert!(
        ok && !text.contains("PAUSED") && !text.contains("low"),
        "{text}"
    );

    // Pause: the big batch's running tasks finish, no new ones start.
    let (ok, text) = cli(&dirs, listen, &["pause", "big"]);
    assert!(ok && text.contains("paused"), "{text}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let paused_at = tasks_of(&sim, "big");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        tasks_of(&sim, "big"),
        paused_at,
        "tasks started while paused"
    );
    let (ok, text) = cli(&dirs, listen, &["status"]);
    assert!(ok && text.contains("PAUSED"), "{text}");

    let (ok, text) = cli(&dirs, listen, &["priority", "big", "high"]);
    assert!(ok && text.contains("priority high"), "{text}");
    let (ok, text) = cli(&dirs, listen, &["resume", "big"]);
    assert!(ok && text.contains("submitting"), "{text}");
    // A running batch has an estimated time to finish; a finished one none.
    let (ok, text) = cli(&dirs, listen, &["status", "--json"]);
    assert!(ok, "{text}");
    let report: serde_json::Value = serde_json::from_str(&text).expect("status --json");
    let eta_of = |name: &str| {
        report["batches"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["name"] == name))
            .map(|b| b["eta_seconds"].clone())
    };
    assert!(
        eta_of("big")
            .and_then(|e| e.as_u64())
            .is_some_and(|e| e > 0),
        "{text}"
    );
    assert_eq!(eta_of("small"), Some(serde_json::Value::Null), "{text}");
    let big_done = wait_results(&dirs, "big", Duration::from_secs(90)).await;
    let status = terminate(&mut daemon, Duration::from_secs(25));
    assert!(big_done, "log:\n{}", log_text(&dirs, 0));
    assert!(status.is_some_and(|s| s.success()));
    let results = check_results_against_sim(&dirs, "big", &sim.handle);
    assert_eq!(results.len(), 240);
    assert_eq!(sim.handle.stats().max_submissions_per_pair, 1);

    // With the daemon stopped the CLI works on the state folder; an unknown
    // batch is refused.
    let (ok, text) = cli(&dirs, listen, &["priority", "nosuch", "low"]);
    assert!(!ok, "{text}");
    sim.stop().await;
}

/// With `--probe`, rows are admitted with their audio's length before they
/// have a slot, and a batch's queued rows go longest first: its last tasks
/// are its short ones. Read off the simulator's order of task creation, with
/// one slot so that the order is the daemon's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_probe_the_longest_rows_are_sent_first() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let listen = free_addr();
    let lengths = [6u32, 19, 8, 25, 5, 14, 30, 7, 11, 9];
    let manifest: Vec<_> = lengths
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                format!("lf{i}"),
                format!("https://img.example/lf/{i}.png"),
                format!("{}/media/lf{i}.wav?sim_audio_seconds={s}", sim.url()),
            )
        })
        .collect();
    write_manifest(&dirs.inbox, "longest.csv", &manifest);
    let extra = with_poll(&["--probe", "--max-concurrent", "1"]);
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &extra, 0);
    let done = wait_results(&dirs, "longest", Duration::from_secs(90)).await;
    let status = terminate(&mut daemon, Duration::from_secs(25));
    assert!(done, "log:\n{}", log_text(&dirs, 0));
    assert!(status.is_some_and(|s| s.success()));
    let results = check_results_against_sim(&dirs, "longest", &sim.handle);
    assert_eq!(results.len(), lengths.len());
    let sent: Vec<u32> = sim
        .handle
        .tasks()
        .iter()
        .filter_map(|t| t.audio_url.split("sim_audio_seconds=").nth(1))
        .filter_map(|s| s.parse().ok())
        .collect();
    let mut longest_first = lengths.to_vec();
    longest_first.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(sent, longest_first, "tasks in the order they were created");
    sim.stop().await;
}
