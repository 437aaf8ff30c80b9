//! Operating the daemon: systemd units and sd_notify, `/metrics`, callbacks
//! (guarantee 7), `status`, logs that never show the key, the example config.

mod common;

use std::collections::HashMap;
use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use infinitetalk_batch::config::FileSettings;
use infinitetalk_batch::simulator::SimArgs;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

// ---------------------------------------------------------------- systemd

/// `systemd-analyze verify` on both shipped units, with ExecStart pointed at
/// the binary under test (verify insists that the executable exists).
#[test]
fn systemd_units_verify() {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!(
            "SKIPPED systemd_units_verify: systemd-analyze not found (apt-get install systemd)"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for (file, unit) in [
        ("infinitetalk-batch.service", "infinitetalk-batch.service"),
        (
            "infinitetalk-batch@.service",
            "infinitetalk-batch@acme.service",
        ),
    ] {
        let text = fs::read_to_string(examples.join(file)).expect("unit file");
        assert!(
            text.contains("ExecStart=/usr/local/bin/infinitetalk-batch run"),
            "{file}: ExecStart"
        );
        for needle in [
            "Type=notify",
            "Restart=on-failure",
            "RestartPreventExitStatus=2",
            "WatchdogSec=60",
            "TimeoutStopSec=30",
            "LoadCredential=apixo-api-key:",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
        ] {
            assert!(text.contains(needle), "{file} lacks {needle}");
        }
        fs::write(
            dir.path().join(file),
            text.replace("/usr/local/bin/infinitetalk-batch", BIN),
        )
        .expect("copy unit");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.path().join(unit))
            .env("SYSTEMD_LOG_LEVEL", "notice")
            .output()
            .expect("systemd-analyze runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Unknown keys are only warnings: any line about our unit is a failure.
        let ours: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("infinitetalk-batch"))
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify {unit}: {:?}\n{stderr}",
            out.status
        );
    }
}

/// READY=1 once serving, STATUS= lines, WATCHDOG=1 (fed by the poll loop),
/// STOPPING=1 after SIGTERM, over a real notify socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_status_watchdog_stopping() {
    let dirs = Dirs::new();
    let sock_path = dirs.root.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let listen = free_addr();
    let sock_env = sock_path.to_str().expect("utf-8 path").to_owned();
    // WATCHDOG_PID unset: sd-notify then takes the watchdog as ours.
    let mut daemon = spawn_with_env(
        &dirs,
        "http://127.0.0.1:9",
        listen,
        &[],
        0,
        &[("NOTIFY_SOCKET", &sock_env), ("WATCHDOG_USEC", "2000000")],
    );
    let mut seen: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 4096];
    let has =
        |seen: &[String], what: &str| seen.iter().any(|m| m.lines().any(|l| l.starts_with(what)));
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline
        && !(has(&seen, "READY=1") && has(&seen, "STATUS=") && has(&seen, "WATCHDOG=1"))
    {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    // More than one WATCHDOG=1: it keeps coming while the loop runs.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let pid = nix::unistd::Pid::from_raw(daemon.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !has(&seen, "STOPPING=1") {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    // SIGTERM was sent already: a second one would mean "exit now".
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut status = None;
    while status.is_none() && Instant::now() < deadline {
        status = daemon.try_wait().ok().flatten();
        std::thread::sleep(Duration::from_millis(50));
    }
    if status.is_none() {
        let _ = daemon.kill();
    }
    let _ = daemon.wait();
    let log = log_text(&dirs, 0);
    assert!(has(&seen, "READY=1"), "no READY=1: {seen:?}\n{log}");
    assert!(has(&seen, "STATUS=queued "), "no STATUS= summary: {seen:?}");
    let watchdogs = seen
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!(
        watchdogs >= 2,
        "WATCHDOG=1 sent {watchdogs} times: {seen:?}"
    );
    assert!(has(&seen, "STOPPING=1"), "no STOPPING=1: {seen:?}\n{log}");
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
}

/// Under the shipped units' WatchdogSec=60 (a ping every 30 s), STATUS= still
/// comes every few seconds, so that `systemctl status` follows a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_refreshed_every_few_seconds() {
    let dirs = Dirs::new();
    let sock_path = dirs.root.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let sock_env = sock_path.to_str().expect("utf-8 path").to_owned();
    let mut daemon = spawn_with_env(
        &dirs,
        "http://127.0.0.1:9",
        free_addr(),
        &[],
        0,
        &[("NOTIFY_SOCKET", &sock_env), ("WATCHDOG_USEC", "60000000")],
    );
    let mut buf = vec![0u8; 4096];
    let mut statuses = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && statuses.len() < 3 {
        if let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if text.lines().any(|l| l.starts_with("STATUS=")) {
                statuses.push(Instant::now());
            }
        }
    }
    let status = terminate(&mut daemon, Duration::from_secs(25));
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    assert_eq!(
        statuses.len(),
        3,
        "STATUS= datagrams in 30 s: {}",
        statuses.len()
    );
    let gap = statuses[2].duration_since(statuses[1]);
    assert!(gap <= Duration::from_secs(8), "STATUS= every {gap:?}");
}

// ---------------------------------------------------------------- metrics and status

fn value(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Counter(x)
        | prometheus_parse::Value::Gauge(x)
        | prometheus_parse::Value::Untyped(x) => *x,
        _ => f64::NAN,
    }
}

/// Sum of the samples named `name` whose labels include `labels`.
fn sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| value(&s.value))
        .sum()
}

/// The exposition is OpenMetrics as announced: `# EOF` once, last; every
/// sample belongs to a declared family; counters end in `_total`.
fn check_openmetrics(text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "ends with # EOF");
    assert_eq!(
        lines.iter().filter(|l| **l == "# EOF").count(),
        1,
        "# EOF exactly once"
    );
    let mut types: HashMap<&str, &str> = HashMap::new();
    for line in &lines {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (Some(name), Some(ty)) = (parts.next(), parts.next()) else {
                panic!("bad TYPE line {line}");
            };
            assert!(
                types.insert(name, ty).is_none(),
                "family {name} declared twice"
            );
            assert!(name.starts_with("infinitetalk_"), "{name}: prefix");
        }
    }
    for line in lines.iter().filter(|l| !l.starts_with('#')) {
        let name = line
            .split(['{', ' '])
            .next()
            .expect("sample name")
            .to_owned();
        let family = types
            .keys()
            .filter(|f| name.starts_with(**f))
            .max_by_key(|f| f.len())
            .unwrap_or_else(|| panic!("sample {name} has no TYPE"));
        let suffix = &name[family.len()..];
        match types[family] {
            "counter" => assert!(
                suffix == "_total" || suffix == "_created",
                "counter sample {name}"
            ),
            "gauge" => assert_eq!(suffix, "", "gauge sample {name}"),
            "histogram" => assert!(
                ["_bucket", "_sum", "_count", "_created"].contains(&suffix),
                "histogram sample {name}"
            ),
            other => panic!("{family}: unexpected type {other}"),
        }
    }
    for (family, ty) in &types {
        if *ty == "histogram" && (family.contains("duration") || family.contains("delay")) {
            assert!(family.ends_with("_seconds"), "{family}: names its unit");
        }
    }
}

fn status_json(listen: std::net::SocketAddr, state: &Path) -> serde_json::Value {
    let out = Command::new(BIN)
        .args([
            "status",
            "--json",
            "--listen",
            &listen.to_string(),
            "--state",
        ])
        .arg(state)
        .output()
        .expect("status runs");
    assert!(
        out.status.success(),
        "status: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_after_a_batch() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let n = 6;
    let mut rows = rows("m", n, |i| format!("sim_audio_seconds={}", 5 + i));
    rows[2].2.push_str("&sim_results=2");
    write_manifest(&dirs.inbox, "metrics.csv", &rows);
    let listen = free_addr();
    let mut daemon = spawn_with_env(&dirs, &sim.url(), listen, &POLL, 0, &[]);
    let finished = wait_results(&dirs, "metrics", Duration::from_secs(60)).await;
    assert!(finished, "batch did not finish:\n{}", log_text(&dirs, 0));

    let http = client();
    let resp = http
        .get(format!("http://{listen}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert!(resp.status().is_success());
    let ctype = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        ctype.starts_with("application/openmetrics-text; version=1.0.0"),
        "content type {ctype}"
    );
    let text = resp.text().await.expect("metrics body");
    check_openmetrics(&text);
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    let n = n as f64;
    let submits = sum(
        &scrape,
        "infinitetalk_api_requests_total",
        &[("endpoint", "submit"), ("outcome", "ok")],
    );
    assert!(submits >= n, "submit requests {submits}\n{text}");
    let polls = sum(
        &scrape,
        "infinitetalk_api_requests_total",
        &[("endpoint", "status")],
    );
    assert!(polls >= n, "status requests {polls}\n{text}");
    assert_eq!(sum(&scrape, "infinitetalk_tasks_submitted_total", &[]), n);
    assert_eq!(sum(&scrape, "infinitetalk_rows", &[("state", "done")]), n);
    assert_eq!(
        sum(&scrape, "infinitetalk_rows", &[("state", "failed")]),
        0.0
    );
    assert_eq!(
        sum(&scrape, "infinitetalk_rows", &[("state", "queued")]),
        0.0
    );
    assert_eq!(sum(&scrape, "infinitetalk_tasks_in_flight", &[]), 0.0);
    assert_eq!(
        sum(&scrape, "infinitetalk_batches", &[("phase", "finished")]),
        1.0
    );
    assert_eq!(
        sum(&scrape, "infinitetalk_task_duration_seconds_count", &[]),
        n
    );
    assert_eq!(sum(&scrape, "infinitetalk_polls_per_task_count", &[]), n);
    assert!(sum(&scrape, "infinitetalk_download_bytes_total", &[]) > 0.0);
    let hist = scrape
        .samples
        .iter()
        .find(|s| s.metric == "infinitetalk_task_duration_seconds")
        .expect("task duration histogram");
    match &hist.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let inf = buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .expect("+Inf bucket");
            assert_eq!(inf.count, n, "every task in the +Inf bucket");
        }
        other => panic!("not a histogram: {other:?}"),
    }

    // status --json: from the running daemon, then from the state folder.
    let live = status_json(listen, &dirs.state);
    assert_eq!(live["live"], true, "{live}");
    assert_eq!(live["batches"][0]["name"], "metrics", "{live}");
    assert_eq!(live["batches"][0]["done"], 6, "{live}");
    assert_eq!(live["tasks_in_flight"], 0, "{live}");

    let status = terminate(&mut daemon, Duration::from_secs(25));
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    let stored = status_json(listen, &dirs.state);
    assert_eq!(stored["live"], false, "{stored}");
    assert_eq!(stored["batches"][0]["name"], "metrics", "{stored}");
    assert_eq!(stored["batches"][0]["total"], 6, "{stored}");
    assert_eq!(stored["batches"][0]["done"], 6, "{stored}");
    sim.stop().await;
}

// ---------------------------------------------------------------- callbacks

/// A daemon in callback mode (`--poll-max 60s`) and its listener's address.
fn spawn_in_callback_mode(
    dirs: &Dirs,
    sim: &Sim,
    poll_min: &str,
) -> (Daemon, std::net::SocketAddr) {
    let listen = free_addr();
    let callback_base = format!("http://{listen}");
    let daemon = spawn_with_env(
        dirs,
        &sim.url(),
        listen,
        &[
            "--callback-url",
            &callback_base,
            "--poll-min",
            poll_min,
            "--poll-max",
            "60s",
        ],
        0,
        &[],
    );
    (daemon, listen)
}

/// Guarantee 7: a callback is only a hint. A wrong secret, an unknown task,
/// an oversized or malformed body are refused and logged; a forged "success"
/// with the right secret is checked against the status endpoint and changes
/// nothing; a genuine callback finishes rows long before the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_are_only_hints() {
    // Default time factor: 5 s of audio takes 1 to 3 s; 600 s takes minutes.
    let sim = Sim::start(SimArgs::default()).await;
    let dirs = Dirs::new();
    let started = Instant::now();
    let (mut daemon, listen) = spawn_in_callback_mode(&dirs, &sim, "2s");
    let callback_base = format!("http://{listen}");
    write_manifest(
        &dirs.inbox,
        "slow.csv",
        &rows("s", 1, |_| "sim_audio_seconds=600".into()),
    );
    write_manifest(
        &dirs.inbox,
        "fast.csv",
        &rows("f", 3, |_| "sim_audio_seconds=5".into()),
    );

    // (d) Without callbacks nothing would be polled for 60 s.
    let fast = wait_results(&dirs, "fast", Duration::from_secs(20)).await;
    let took = started.elapsed();
    assert!(fast, "fast batch not finished:\n{}", log_text(&dirs, 0));
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let results = read_results(&dirs.batch_dir("fast").join("results.csv"));
    assert!(results.iter().all(|r| r["state"] == "done"), "{results:?}");

    let slow = sim
        .handle
        .tasks()
        .into_iter()
        .find(|t| t.audio_url.contains("/s/0.mp3"))
        .expect("slow task submitted");
    assert_eq!(slow.state, "processing");
    let url = slow.callback_url.clone().expect("callback mode");
    let secret = url
        .rsplit('/')
        .next()
        .expect("secret in the callback URL")
        .to_owned();
    assert!(
        url.starts_with(&format!("{callback_base}/callback/")),
        "{url}"
    );
    assert!(secret.len() >= 16, "secret {secret:?}");

    // A server the forged result URL points at: nothing may connect to it.
    let bait = std::net::TcpListener::bind("127.0.0.1:0").expect("bait");
    bait.set_nonblocking(true).expect("nonblocking");
    let bait_url = format!(
        "http://{}/fake.mp4",
        bait.local_addr().expect("bait address")
    );
    let forged = serde_json::json!({
        "code": 200, "message": "success",
        "data": {
            "taskId": slow.task_id, "state": "success",
            "resultJson": serde_json::json!({"resultUrls": [bait_url]}).to_string(),
            "failCode": null, "failMsg": null,
            "createTime": 1, "completeTime": 2, "costTime": 1
        }
    });
    let http = client();
    let post = |path: String, body: Vec<u8>| {
        let http = http.clone();
        let url = format!("{callback_base}{path}");
        async move {
            http.post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("callback POST answered")
                .status()
                .as_u16()
        }
    };
    let forged_bytes = serde_json::to_vec(&forged).expect("json");

    // (a) A wrong secret: 403.
    assert_eq!(
        post("/callback/not-the-secret".into(), forged_bytes.clone()).await,
        403
    );
    // (a) The right secret, a forged success: accepted as a hint, confirmed
    // with a status query, which says the task still runs.
    let polls_before = sim.handle.stats().status_requests;
    assert_eq!(
        post(format!("/callback/{secret}"), forged_bytes.clone()).await,
        200
    );
    let confirmed = wait_for(Duration::from_secs(10), || {
        (sim.handle.stats().status_requests > polls_before).then_some(())
    })
    .await;
    assert!(
        confirmed.is_some(),
        "the callback was not confirmed by a status query"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    // (b) An unknown task: 404.
    let mut unknown = forged.clone();
    unknown["data"]["taskId"] = serde_json::json!("sim-0000000000000000");
    assert_eq!(
        post(
            format!("/callback/{secret}"),
            serde_json::to_vec(&unknown).expect("json")
        )
        .await,
        404
    );
    // (c) Oversized: 413. Malformed: 400.
    let mut big = serde_json::to_vec(&forged).expect("json");
    big.resize(65 * 1024, b' ');
    assert_eq!(post(format!("/callback/{secret}"), big).await, 413);
    assert_eq!(
        post(format!("/callback/{secret}"), b"{not json".to_vec()).await,
        400
    );

    let live = status_json(listen, &dirs.state);
    let slow_batch = live["batches"]
        .as_array()
        .expect("batches")
        .iter()
        .find(|b| b["name"] == "slow")
        .expect("slow batch")
        .clone();
    assert_eq!(slow_batch["in_flight"], 1, "{live}");
    assert_eq!(slow_batch["done"], 0, "{live}");
    assert_eq!(slow_batch["downloading"], 0, "{live}");
    assert!(!dirs.batch_dir("slow").join("s0.mp4").exists());
    assert!(
        matches!(bait.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the forged result URL was fetched"
    );

    let status = terminate(&mut daemon, Duration::from_secs(25));
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    let log = log_text(&dirs, 0);
    for needle in [
        "callback refused: wrong secret",
        "callback refused: no such task",
        "callback refused: body larger than the limit",
        "callback refused: not the status envelope",
    ] {
        assert_eq!(
            log.lines().filter(|l| l.contains(needle)).count(),
            1,
            "one log line {needle:?}:\n{log}"
        );
    }
    assert!(
        !log.contains(&secret),
        "the callback secret is logged:\n{log}"
    );
    sim.stop().await;
}

// ---------------------------------------------------------------- logs

/// The key never reaches the logs, even at debug (trace for our crate), in
/// either format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_never_logged() {
    let sim = Sim::start(fast_sim()).await;
    for (n, format) in ["text", "json"].into_iter().enumerate() {
        let dirs = Dirs::new();
        let batch = format!("keys{n}");
        write_manifest(
            &dirs.inbox,
            &format!("{batch}.csv"),
            &rows(&format!("k{n}"), 3, |_| "sim_audio_seconds=5".into()),
        );
        let listen = free_addr();
        let mut extra = POLL.to_vec();
        extra.extend(["--log-format", format]);
        let mut daemon = spawn_with_env(
            &dirs,
            &sim.url(),
            listen,
            &extra,
            n,
            &[("RUST_LOG", "debug,infinitetalk_batch=trace")],
        );
        let finished = wait_results(&dirs, &batch, Duration::from_secs(60)).await;
        let _ = client()
            .get(format!("http://{listen}/metrics"))
            .send()
            .await;
        let status = terminate(&mut daemon, Duration::from_secs(25));
        let log = log_text(&dirs, n);
        assert!(finished, "{format}: batch did not finish:\n{log}");
        assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
        assert!(
            log.lines().count() > 20,
            "{format}: debug logging is on:\n{log}"
        );
        assert!(!log.contains(KEY), "{format}: the API key is in the log");
        assert!(
            !log.to_ascii_lowercase().contains("bearer"),
            "{format}: an Authorization header is in the log"
        );
    }
    sim.stop().await;
}

/// When stderr is the journal (`JOURNAL_STREAM` names its device and inode),
/// every line starts with its syslog priority, which journald strips and
/// files the line under: `journalctl -p warning` then shows our warnings.
/// When it is not (the variable inherited, stderr elsewhere), lines are plain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_priorities_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt;
    // A taken listen address: a WARN (simulated run) then an ERROR (cannot
    // listen) and exit 1, with INFO lines between.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("addr");
    for (n, journal) in [(0, true), (1, false)] {
        let dirs = Dirs::new();
        // spawn_with_env truncates this file in place: same device and inode.
        let meta = fs::File::create(dirs.log_path(n))
            .and_then(|f| f.metadata())
            .expect("log file");
        let stream = if journal {
            format!("{}:{}", meta.dev(), meta.ino())
        } else {
            format!("{}:{}", meta.dev(), meta.ino() + 1)
        };
        let mut daemon = spawn_with_env(
            &dirs,
            "http://127.0.0.1:9",
            listen,
            &["--simulate"],
            n,
            &[("JOURNAL_STREAM", &stream)],
        );
        let status = wait_for(Duration::from_secs(20), || daemon.try_wait().ok().flatten()).await;
        if status.is_none() {
            kill9(&mut daemon);
        }
        let log = log_text(&dirs, n);
        assert_eq!(status.and_then(|s| s.code()), Some(1), "exit:\n{log}");
        let has = |prefix: &str, level: &str| {
            log.lines()
                .any(|l| l.starts_with(prefix) && l.contains(level))
        };
        if journal {
            assert!(has("<4>", " WARN "), "no <4> WARN line:\n{log}");
            assert!(has("<3>", "ERROR "), "no <3> ERROR line:\n{log}");
            assert!(has("<6>", " INFO "), "no <6> INFO line:\n{log}");
            for line in log.lines() {
                let want = if line.contains("ERROR ") {
                    "<3>"
                } else if line.contains(" WARN ") {
                    "<4>"
                } else if line.contains(" INFO ") {
                    "<6>"
                } else {
                    "<"
                };
                assert!(line.starts_with(want), "{want} expected: {line}");
            }
        } else {
            assert!(has("", " WARN ") && has("", "ERROR "), "{log}");
            assert!(!log.lines().any(|l| l.starts_with('<')), "{log}");
        }
    }
    drop(taken);
}

/// `run --simulate` keeps the simulator's tasks in the state folder: after a
/// kill -9 with tasks in flight, the restarted daemon finds them still known
/// (as the real service would) and every row ends done from its first task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_tasks_survive_a_kill9_of_the_daemon() {
    let dirs = Dirs::new();
    let listen = free_addr();
    let extra = with_poll(&["--simulate"]);
    let tasks_file = dirs.state.join("simulator-tasks.jsonl");
    let task_ids = |path: &Path| -> Vec<String> {
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["id"].as_str().map(str::to_owned))
            .collect()
    };
    let mut daemon = spawn_daemon(&dirs, "http://127.0.0.1:9", listen, &extra, 0);
    // 5 s of audio: 1 to 3 s of simulated work at the default time factor.
    write_manifest(
        &dirs.inbox,
        "simkill.csv",
        &rows("s", 6, |_| "sim_audio_seconds=5".into()),
    );
    let before = wait_for(Duration::from_secs(30), || {
        let ids = task_ids(&tasks_file);
        (ids.len() == 6).then_some(ids)
    })
    .await;
    kill9(&mut daemon);
    let before = before.unwrap_or_else(|| panic!("6 tasks not submitted:\n{}", log_text(&dirs, 0)));
    assert!(
        !dirs.batch_dir("simkill").join("results.csv").exists(),
        "the batch ended before the kill: nothing was in flight"
    );

    let mut daemon = spawn_daemon(&dirs, "http://127.0.0.1:9", listen, &extra, 1);
    let finished = wait_results(&dirs, "simkill", Duration::from_secs(60)).await;
    let status = terminate(&mut daemon, Duration::from_secs(25));
    let log = log_text(&dirs, 1);
    assert!(finished, "batch not finished after the restart:\n{log}");
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    let results = read_results(&dirs.batch_dir("simkill").join("results.csv"));
    assert_eq!(results.len(), 6);
    for row in &results {
        assert_eq!(row["state"], "done", "{row:?}\n{log}");
        assert!(
            before.contains(&row["task_id"]),
            "row {} got a new task {} (the first ones were {before:?})",
            row["id"],
            row["task_id"]
        );
    }
    assert!(!log.contains("no such task"), "{log}");
}

// ---------------------------------------------------------------- config

/// Every key of `FileSettings`, as the example config must show it.
const FILE_KEYS: [&str; 25] = [
    "inbox",
    "outbox",
    "state",
    "api-base",
    "api-key-file",
    "max-concurrent",
    "max-requests-per-minute",
    "poll-min",
    "poll-max",
    "listen",
    "callback-listen",
    "callback-url",
    "resolution",
    "provider",
    "prompt",
    "api-timeout",
    "stop-timeout",
    "simulate",
    "log-format",
    "retry-fail-codes",
    "max-resubmits",
    "download-give-up",
    "task-lost-after",
    "max-downloads",
    "pause-probe",
];

#[test]
fn example_config_parses_and_shows_every_key() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/infinitetalk-batch.toml");
    let parsed = FileSettings::load(&path).expect("the example config parses");
    assert_eq!(parsed.max_concurrent, Some(1000));
    assert_eq!(parsed.stop_timeout, Some(Duration::from_secs(20)));
    let text = fs::read_to_string(&path).expect("read example");
    // With its commented-out keys switched on, it still parses.
    let dir = tempfile::tempdir().expect("tempdir");
    let all: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if FILE_KEYS
                    .iter()
                    .any(|k| rest.starts_with(&format!("{k} = "))) =>
            {
                rest.to_owned()
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let all_path = dir.path().join("all.toml");
    fs::write(&all_path, &all).expect("write");
    let full = FileSettings::load(&all_path).expect("the example with every key parses");
    assert!(full.api_key_file.is_some() && full.callback_url.is_some());
    for key in FILE_KEYS {
        assert!(
            all.lines().any(|l| l.starts_with(&format!("{key} = "))),
            "the example config does not show {key}"
        );
    }
}

#[test]
fn bad_config_key_exits_2_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad.toml");
    fs::write(&config, "max-concurent = 3\n").expect("write");
    let out = Command::new(BIN)
        .args(["run", "--simulate", "--config"])
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .current_dir(dir.path())
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("max-concurent"), "{stderr}");
    assert!(!dir.path().join("state").exists(), "nothing created");
}

#[tokio::test]
async fn in_callback_mode_each_task_costs_one_status_query() {
    // Tasks of 0.1..0.6 s; the safety poll would come no earlier than 30 s.
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let (mut daemon, _) = spawn_in_callback_mode(&dirs, &sim, "100ms");
    write_manifest(
        &dirs.inbox,
        "cb.csv",
        &rows("c", 30, |i| format!("sim_audio_seconds={}", 5 + i % 10)),
    );
    let done = wait_results(&dirs, "cb", Duration::from_secs(25)).await;
    terminate(&mut daemon, Duration::from_secs(25));
    assert!(done, "batch not finished:\n{}", log_text(&dirs, 0));
    let stats = sim.handle.stats();
    assert_eq!(stats.tasks_created, 30);
    assert_eq!(stats.callbacks_acknowledged, 30);
    assert_eq!(
        stats.status_requests, 30,
        "one confirming status query per callback and no other poll"
    );
}

/// A stop sent the moment the daemon catches SIGTERM (while it still opens
/// its store and starts its workers) is a graceful one: exit 0, and the
/// accepted rows stay for the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_starting_is_graceful() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    write_manifest(
        &dirs.inbox,
        "early.csv",
        &rows("e", 3, |_| "sim_audio_seconds=5".into()),
    );
    for run in 0..3 {
        let mut daemon = spawn_daemon(&dirs, &sim.url(), free_addr(), &POLL, run);
        let status = terminate(&mut daemon, Duration::from_secs(25));
        let log = log_text(&dirs, run);
        assert!(
            status.is_some_and(|s| s.success()),
            "exit: {status:?}\n{log}"
        );
    }
    let listen = free_addr();
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &POLL, 3);
    let finished = wait_results(&dirs, "early", Duration::from_secs(60)).await;
    let status = terminate(&mut daemon, Duration::from_secs(25));
    assert!(finished, "{}", log_text(&dirs, 3));
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    let results = check_results_against_sim(&dirs, "early", &sim.handle);
    assert!(results.iter().all(|r| r["state"] == "done"), "{results:?}");
    sim.stop().await;
}
