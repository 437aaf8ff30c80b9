//! Object storage against a real S3-protocol server (s3s-fs behind s3s's
//! SigV4 checks, in this process on 127.0.0.1:0): the server itself refuses
//! what it must, an `s3://` outbox receives every video whole and
//! `results.csv` last, a `kill -9` during uploads leaves no partial object
//! and downloads nothing twice, and wrong credentials pause without losing
//! anything.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::s3::{S3Server, get_bytes};
use common::*;
use infinitetalk_batch::simulator::SimArgs;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;

const BUCKET: &str = "talk-out";
const PREFIX: &str = "runs/nov";

fn outbox_url() -> String {
    format!("s3://{BUCKET}/{PREFIX}")
}

/// The daemon with an `s3://` outbox on `server`, polling as the fast
/// simulator suits, logging to run 0.
fn s3_daemon(dirs: &Dirs, sim: &Sim, server: &S3Server, listen: std::net::SocketAddr) -> Daemon {
    spawn_s3_daemon(
        dirs,
        &sim.url(),
        listen,
        &outbox_url(),
        &with_poll(&[]),
        0,
        &server.env(),
    )
}

/// Waits for `key` to exist on the server.
async fn wait_object(server: &S3Server, key: &str, limit: Duration) -> bool {
    let file = server.object_file(key);
    wait_for(limit, || file.exists().then_some(()))
        .await
        .is_some()
}

/// Checks every row of the batch's results.csv in the store against the
/// simulator: each `done` row's objects hold exactly the bytes served.
async fn check_store_against_sim(
    server: &S3Server,
    batch: &str,
    sim: &Sim,
) -> Vec<HashMap<String, String>> {
    let client = server.client();
    let text = get_bytes(&client, &format!("{PREFIX}/{batch}/results.csv")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("results.csv");
    std::fs::write(&local, &text).expect("write results copy");
    let results = read_results(&local);
    let tasks: HashMap<String, infinitetalk_batch::simulator::TaskInfo> = sim
        .handle
        .tasks()
        .into_iter()
        .map(|t| (t.task_id.clone(), t))
        .collect();
    for row in &results {
        let id = &row["id"];
        assert_eq!(row["state"], "done", "row {id}: {row:?}");
        let task = &tasks[&row["task_id"]];
        let outputs: Vec<&str> = row["output"].split(';').collect();
        assert_eq!(outputs.len(), task.results.len(), "row {id}");
        for (file, expected) in outputs.iter().zip(&task.results) {
            assert!(
                !file.contains('?') && !file.contains("X-Amz"),
                "row {id}: output names the object, not a URL: {file}"
            );
            let bytes = get_bytes(&client, &format!("{PREFIX}/{batch}/{file}")).await;
            assert_eq!(
                infinitetalk_batch::simulator::sha256_hex(&bytes),
                expected.sha256,
                "row {id}: {file} differs from what was served"
            );
        }
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_tampered_and_expired_presigned_urls() {
    let server = S3Server::start(BUCKET).await;
    let client = server.client();
    let path = ObjectPath::from("media/portrait.png");
    client
        .put(&path, b"portrait bytes".to_vec().into())
        .await
        .expect("put with the right key");
    let http = reqwest::Client::new();

    let url = client
        .signed_url(reqwest::Method::GET, &path, Duration::from_secs(60))
        .await
        .expect("sign");
    let ok = http.get(url.clone()).send().await.expect("get");
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.bytes().await.expect("body").as_ref(), b"portrait bytes");

    // One character of the signature changed.
    let mut tampered = url.to_string();
    let at = tampered.find("X-Amz-Signature=").expect("signature") + 16;
    let c = if &tampered[at..=at] == "0" { "1" } else { "0" };
    tampered.replace_range(at..=at, c);
    let refused = http.get(&tampered).send().await.expect("get");
    assert_eq!(refused.status(), 403, "tampered signature");
    // Another object under the same signature.
    let other = url.to_string().replace("portrait.png", "portrait.jpg");
    let refused = http.get(&other).send().await.expect("get");
    assert_eq!(refused.status(), 403, "signature of another key");

    // Expired: signed for 1 s, used after 2 s.
    let short = client
        .signed_url(reqwest::Method::GET, &path, Duration::from_secs(1))
        .await
        .expect("sign");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = http.get(short).send().await.expect("get");
    assert_eq!(expired.status(), 403, "expired URL");
    assert!(
        expired.text().await.unwrap_or_default().contains("expired"),
        "the server says why"
    );

    // A client with a wrong secret is refused too.
    let wrong = server.client_with_secret("not-the-secret");
    assert!(wrong.head(&path).await.is_err());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outbox_gets_every_video_whole_and_results_last() {
    let sim = Sim::start(fast_sim()).await;
    let server = S3Server::start(BUCKET).await;
    let dirs = Dirs::new();
    let mut rows = rows("s", 8, |_| "sim_audio_seconds=5".to_owned());
    // One video over one multipart part, one row with two videos.
    rows[0].2.push_str("&sim_video_bytes=7000000");
    rows[1].2.push_str("&sim_results=2");
    write_manifest(&dirs.inbox, "b1.csv", &rows);
    let listen = free_addr();
    let mut daemon = s3_daemon(&dirs, &sim, &server, listen);
    let results_key = format!("{PREFIX}/b1/results.csv");
    let finished = wait_object(&server, &results_key, Duration::from_secs(60)).await;
    // The console's player reads the videos from the store, ranges too.
    let video = format!("http://{listen}/batches/b1/files/s0.mp4");
    let http = reqwest::Client::new();
    let whole = http.get(&video).send().await.expect("GET video");
    let whole_status = whole.status();
    let whole = whole.bytes().await.expect("video body");
    let part = http
        .get(&video)
        .header("range", "bytes=1000-1099")
        .send()
        .await
        .expect("GET range");
    let (part_status, part_range) = (
        part.status(),
        part.headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    );
    let part = part.bytes().await.expect("range body");
    // Across the first 4 MiB GET's end: the daemon reads the store in parts.
    let across = http
        .get(&video)
        .header("range", "bytes=4194000-4195000")
        .send()
        .await
        .expect("GET range across parts")
        .bytes()
        .await
        .expect("range body");
    let status = terminate(&mut daemon, Duration::from_secs(25));
    let log = log_text(&dirs, 0);
    assert!(finished, "no results.csv in the store; log:\n{log}");
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let stored = get_bytes(&server.client(), &format!("{PREFIX}/b1/s0.mp4")).await;
    assert_eq!(whole_status, 200);
    assert!(whole[..] == stored[..], "the whole video as stored");
    assert_eq!(part_status, 206);
    assert_eq!(
        part_range.as_deref(),
        Some(format!("bytes 1000-1099/{}", stored.len()).as_str())
    );
    assert!(part[..] == stored[1000..1100], "the range as stored");
    assert!(
        across[..] == stored[4_194_000..4_195_001],
        "across two GETs"
    );

    let results = check_store_against_sim(&server, "b1", &sim).await;
    assert_eq!(results.len(), 8);
    let objects = server.list(&format!("{PREFIX}/b1")).await;
    let mut names: Vec<String> = objects
        .iter()
        .map(|(k, _)| k.trim_start_matches(&format!("{PREFIX}/b1/")).to_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..8).map(|i| format!("s{i}.mp4")).collect();
    want.extend([
        "s1~2.mp4".to_owned(),
        "manifest.csv".into(),
        "results.csv".into(),
    ]);
    want.sort();
    assert_eq!(names, want, "exactly the batch's files, nothing partial");
    let big = objects
        .iter()
        .find(|(k, _)| k.ends_with("/s0.mp4"))
        .expect("s0");
    assert!(big.1 >= 7_000_000, "the large video whole: {big:?}");
    // results.csv came last: no object is newer.
    let client = server.client();
    let mut newest_other = None;
    let mut results_at = None;
    for (key, _) in &objects {
        let meta = client
            .head(&ObjectPath::parse(key).expect("key"))
            .await
            .expect("head");
        if key.ends_with("results.csv") {
            results_at = Some(meta.last_modified);
        } else {
            newest_other = newest_other.max(Some(meta.last_modified));
        }
    }
    assert!(results_at >= newest_other, "results.csv written last");
    // The manifest in the store is the one dropped in the inbox.
    let manifest = get_bytes(&client, &format!("{PREFIX}/b1/manifest.csv")).await;
    assert!(String::from_utf8_lossy(&manifest).starts_with("id,image_url,audio_url,note"));
    // The local disk kept no video, and no secret reached the log.
    let local: Vec<String> = files_under_state(&dirs)
        .into_iter()
        .filter(|f| f.ends_with(".mp4") || f.ends_with(".part"))
        .collect();
    assert!(local.is_empty(), "videos left on the local disk: {local:?}");
    assert!(!log.contains(common::s3::SECRET_KEY), "secret in the log");
    assert!(
        !log.contains("X-Amz-Signature"),
        "a presigned URL in the log"
    );
    assert!(
        log.contains("takes writes"),
        "the store was probed at start: {log}"
    );
    server.stop().await;
    sim.stop().await;
}

fn files_under_state(dirs: &Dirs) -> Vec<String> {
    common::s3::files_under(&dirs.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_uploads_leaves_no_partial_object_and_downloads_nothing_twice() {
    let sim = Sim::start(fast_sim()).await;
    let server = S3Server::start(BUCKET).await;
    let dirs = Dirs::new();
    // Videos of three multipart parts each, so uploads take a while.
    let rows = rows("k", 6, |_| {
        "sim_audio_seconds=5&sim_video_bytes=12000000".to_owned()
    });
    write_manifest(&dirs.inbox, "big.csv", &rows);
    let listen = free_addr();
    let args = with_poll(&[]);
    let mut daemon = spawn_s3_daemon(
        &dirs,
        &sim.url(),
        listen,
        &outbox_url(),
        &args,
        0,
        &server.env(),
    );
    // Kill once an upload is under way: a part on the server, or the first
    // object complete.
    let uploading = wait_for(Duration::from_secs(60), || {
        let parts = common::s3::files_under(server.root.path())
            .iter()
            .any(|f| f.contains(".upload_id-"));
        parts.then_some(())
    })
    .await;
    kill9(&mut daemon);
    assert!(
        uploading.is_some(),
        "no upload started; log:\n{}",
        log_text(&dirs, 0)
    );

    // Whatever is under a final key now is a whole video.
    let tasks: HashMap<String, infinitetalk_batch::simulator::TaskInfo> = sim
        .handle
        .tasks()
        .into_iter()
        .map(|t| (t.audio_url.clone(), t))
        .collect();
    let client = server.client();
    let stored_at_kill = server.list(PREFIX).await;
    let mut downloads_at_kill = HashMap::new();
    for (key, _) in &stored_at_kill {
        let Some(id) = key
            .strip_prefix(&format!("{PREFIX}/big/"))
            .and_then(|n| n.strip_suffix(".mp4"))
        else {
            continue;
        };
        let row = rows.iter().find(|r| r.0 == id).expect("a row's video");
        let task = &tasks[&row.2];
        let bytes = get_bytes(&client, key).await;
        assert_eq!(
            infinitetalk_batch::simulator::sha256_hex(&bytes),
            task.results[0].sha256,
            "{key} under its final key is whole"
        );
        downloads_at_kill.insert(
            task.task_id.clone(),
            sim.handle.downloads_of(&task.task_id, 0),
        );
    }
    // And so is a video whose download had finished into its transfer
    // file (STATE/transfers/BATCH/TASK/NAME): it must be uploaded from
    // there, not fetched again.
    for (id, _, audio) in &rows {
        let Some(task) = tasks.get(audio) else {
            continue;
        };
        let digest = {
            use sha2::Digest;
            infinitetalk_batch::ingest::hex(&sha2::Sha256::digest(task.task_id.as_bytes()))
        };
        let transfer = dirs
            .state
            .join("transfers/big")
            .join(&digest[..16])
            .join(format!("{id}.mp4"));
        if transfer.exists() {
            downloads_at_kill.insert(
                task.task_id.clone(),
                sim.handle.downloads_of(&task.task_id, 0),
            );
        }
    }
    eprintln!(
        "stored or downloaded whole at the kill: {}",
        downloads_at_kill.len()
    );

    let mut daemon = spawn_s3_daemon(
        &dirs,
        &sim.url(),
        listen,
        &outbox_url(),
        &args,
        1,
        &server.env(),
    );
    let finished = wait_object(
        &server,
        &format!("{PREFIX}/big/results.csv"),
        Duration::from_secs(90),
    )
    .await;
    let status = terminate(&mut daemon, Duration::from_secs(25));
    assert!(
        finished,
        "no results.csv after the restart; log:\n{}\n---\n{}",
        log_text(&dirs, 0),
        log_text(&dirs, 1)
    );
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let results = check_store_against_sim(&server, "big", &sim).await;
    assert_eq!(results.len(), 6);
    // A video in the store at the kill was not fetched again.
    for (task_id, before) in &downloads_at_kill {
        assert_eq!(
            sim.handle.downloads_of(task_id, 0),
            *before,
            "task {task_id}: stored before the kill, downloaded again after it"
        );
    }
    // Every task's video was fetched at most a few times (resumes with
    // Range after the kill), never once per restart from scratch: the
    // simulator counts requests, so a whole second download would show.
    for t in sim.handle.tasks() {
        assert!(
            sim.handle.downloads_of(&t.task_id, 0) <= 2,
            "{t:?}: {} requests; logs:\n{}\n---\n{}",
            sim.handle.downloads_of(&t.task_id, 0),
            log_text(&dirs, 0),
            log_text(&dirs, 1)
        );
    }
    let objects = server.list(&format!("{PREFIX}/big")).await;
    assert_eq!(
        objects.len(),
        8,
        "6 videos, manifest.csv, results.csv: {objects:?}"
    );
    server.stop().await;
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_pause_submission_and_lose_nothing() {
    let sim = Sim::start(fast_sim()).await;
    let server = S3Server::start(BUCKET).await;
    let dirs = Dirs::new();
    let rows = rows("w", 4, |_| "sim_audio_seconds=5".to_owned());
    write_manifest(&dirs.inbox, "w.csv", &rows);
    let listen = free_addr();
    let wrong = server.env_with_secret("a-wrong-secret-0000");
    let mut daemon = spawn_s3_daemon(
        &dirs,
        &sim.url(),
        listen,
        &outbox_url(),
        &with_poll(&[]),
        0,
        &wrong,
    );
    // The batch is accepted, and nothing is submitted while the store refuses.
    let status_url = format!("http://{listen}/status");
    let http = reqwest::Client::new();
    let paused = async {
        for _ in 0..100 {
            if let Ok(r) = http.get(&status_url).send().await
                && let Ok(body) = r.text().await
                && body.contains("object store")
                && body.contains("\"w\"")
            {
                return Some(body);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = terminate(&mut daemon, Duration::from_secs(25));
    let log = log_text(&dirs, 0);
    assert!(
        paused.is_some(),
        "status shows no pause for the store; log:\n{log}"
    );
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(
        sim.handle.stats().submit_requests,
        0,
        "nothing paid for: {log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains(&format!("s3://{BUCKET}")) && l.contains("ERROR"))
        .unwrap_or_else(|| panic!("an error line naming the bucket: {log}"));
    assert!(line.contains("probe"), "and the operation: {line}");
    assert!(
        !log.contains("a-wrong-secret-0000"),
        "the secret is never logged"
    );
    assert!(server.list(PREFIX).await.is_empty(), "nothing stored");

    // With the right key the same folders finish the batch.
    let mut daemon = spawn_s3_daemon(
        &dirs,
        &sim.url(),
        listen,
        &outbox_url(),
        &with_poll(&[]),
        1,
        &server.env(),
    );
    let finished = wait_object(
        &server,
        &format!("{PREFIX}/w/results.csv"),
        Duration::from_secs(60),
    )
    .await;
    let status = terminate(&mut daemon, Duration::from_secs(25));
    assert!(finished, "log:\n{}", log_text(&dirs, 1));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let results = check_store_against_sim(&server, "w", &sim).await;
    assert_eq!(results.len(), 4);
    server.stop().await;
    sim.stop().await;
}

const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_files_go_through_the_media_store_as_presigned_urls() {
    let sim = Sim::start(fast_sim()).await;
    let server = S3Server::start(BUCKET).await;
    let dirs = Dirs::new();
    let media = dirs.root.path().join("media");
    std::fs::create_dir_all(&media).expect("media");
    std::fs::write(media.join("ann.png"), PNG).expect("png");
    for i in 0..2 {
        let wav = infinitetalk_batch::simulator::silent_wav_bytes(1.0 + f64::from(i));
        std::fs::write(media.join(format!("{i}.wav")), wav).expect("wav");
    }
    // Two rows share the portrait (one upload); a third names a URL.
    let tmp = dirs.inbox.join(".m.tmp");
    std::fs::write(
        &tmp,
        "id,image_url,audio_url\n\
         a,ann.png,0.wav\n\
         b,ann.png,1.wav\n\
         c,https://img.example/c.png,https://audio.example/c.mp3?sim_audio_seconds=5\n",
    )
    .expect("manifest");
    std::fs::rename(&tmp, dirs.inbox.join("m.csv")).expect("rename");
    let media_s = media.display().to_string();
    let store = format!("s3://{BUCKET}/inputs");
    let listen = free_addr();
    let mut daemon = spawn_s3_daemon(
        &dirs,
        &sim.url(),
        listen,
        &dirs.outbox.display().to_string(),
        &with_poll(&["--media-root", &media_s, "--media-store", &store]),
        0,
        &server.env(),
    );
    let finished = wait_results(&dirs, "m", Duration::from_secs(60)).await;
    let status = terminate(&mut daemon, Duration::from_secs(25));
    let log = log_text(&dirs, 0);
    assert!(finished, "batch did not finish; log:\n{log}");
    assert!(status.is_some_and(|s| s.success()), "{status:?}");

    // Every row done: the simulator fetched each presigned URL from the
    // S3 server (a URL it could not fetch would fail INVALID_*_URL).
    let results = check_results_against_sim(&dirs, "m", &sim.handle);
    assert!(
        results.iter().all(|r| r["state"] == "done"),
        "{results:?}\n{log}"
    );
    // results.csv keeps the manifest's cells, never a presigned URL.
    let a = results.iter().find(|r| r["id"] == "a").expect("row a");
    assert_eq!(a["image_url"], "ann.png");
    let tasks = sim.handle.tasks();
    let local_tasks: Vec<_> = tasks
        .iter()
        .filter(|t| t.audio_url.contains(&server.addr.to_string()))
        .collect();
    assert_eq!(local_tasks.len(), 2, "{tasks:?}");
    for t in &local_tasks {
        for u in t.image_urls.iter().chain([&t.audio_url]) {
            assert!(
                u.contains("X-Amz-Signature=") && u.contains("X-Amz-Expires=604800"),
                "a presigned URL valid 7 days: {u}"
            );
        }
    }
    // Each file once in the store, named by its content hash.
    let objects = server.list("inputs").await;
    let png_key = format!(
        "inputs/{}.png",
        infinitetalk_batch::simulator::sha256_hex(PNG)
    );
    assert_eq!(objects.len(), 3, "one portrait, two voices: {objects:?}");
    assert!(
        objects
            .iter()
            .any(|(k, n)| *k == png_key && *n == PNG.len() as u64),
        "{objects:?}"
    );
    assert_eq!(
        log.matches("uploaded to the media store").count(),
        3,
        "the shared portrait uploaded once:\n{log}"
    );
    assert!(
        !log.contains("X-Amz-Signature"),
        "presigned URLs never logged"
    );
    assert!(!log.contains(common::s3::SECRET_KEY), "secret never logged");
    // A presigned URL of the store, tampered, is refused by the server.
    let http = reqwest::Client::new();
    let url = &local_tasks[0].audio_url;
    assert_eq!(http.get(url).send().await.expect("get").status(), 200);
    let mut tampered = url.clone();
    let at = tampered.find("X-Amz-Signature=").expect("signature") + 16;
    let c = if &tampered[at..=at] == "0" { "1" } else { "0" };
    tampered.replace_range(at..=at, c);
    assert_eq!(http.get(&tampered).send().await.expect("get").status(), 403);
    server.stop().await;
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_mid_run_pauses_then_the_rows_finish() {
    // Tasks of about a second, so that the store can go away between the
    // submits and the downloads.
    let sim = Sim::start(SimArgs {
        time_factor: 0.2,
        ..fast_sim()
    })
    .await;
    let server = S3Server::start(BUCKET).await;
    let dirs = Dirs::new();
    let rows = rows("o", 4, |_| "sim_audio_seconds=5".to_owned());
    write_manifest(&dirs.inbox, "o.csv", &rows);
    let listen = free_addr();
    let env = server.env();
    let mut daemon = spawn_s3_daemon(
        &dirs,
        &sim.url(),
        listen,
        &outbox_url(),
        &with_poll(&[]),
        0,
        &env,
    );
    let submitted = wait_for(Duration::from_secs(30), || {
        (sim.handle.stats().submit_requests >= 4).then_some(())
    })
    .await;
    let down = server.outage().await;
    assert!(submitted.is_some(), "log:\n{}", log_text(&dirs, 0));
    // The videos cannot be stored: an error line naming the bucket and the
    // operation, the rows wait, submission is paused.
    let noticed = wait_for(Duration::from_secs(30), || {
        log_text(&dirs, 0)
            .lines()
            .any(|l| l.contains("cannot store the video") && l.contains(&format!("s3://{BUCKET}")))
            .then_some(())
    })
    .await;
    let status: String = reqwest::get(format!("http://{listen}/status"))
        .await
        .expect("status")
        .text()
        .await
        .expect("body");
    assert!(noticed.is_some(), "log:\n{}", log_text(&dirs, 0));
    assert!(status.contains("object store"), "{status}");
    assert!(!dirs.state.join("outbox/o/results.csv").exists());

    // Back on the same address: the rows finish by themselves.
    let server = S3Server::resume(down).await;
    let finished = wait_object(
        &server,
        &format!("{PREFIX}/o/results.csv"),
        Duration::from_secs(90),
    )
    .await;
    let stopped = terminate(&mut daemon, Duration::from_secs(25));
    let log = log_text(&dirs, 0);
    assert!(finished, "log:\n{log}");
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
    let results = check_store_against_sim(&server, "o", &sim).await;
    assert_eq!(results.len(), 4);
    assert!(log.contains("submission resumed"), "{log}");
    server.stop().await;
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifest_is_in_the_store_soon_after_acceptance() {
    // A task of 2.5 to 7.5 s: the batch runs well after its acceptance.
    let sim = Sim::start(sim_at(0.05)).await;
    let server = S3Server::start(BUCKET).await;
    let dirs = Dirs::new();
    write_manifest(
        &dirs.inbox,
        "early.csv",
        &rows("e", 1, |_| "sim_audio_seconds=5".to_owned()),
    );
    let listen = free_addr();
    let mut daemon = s3_daemon(&dirs, &sim, &server, listen);
    let manifest_key = format!("{PREFIX}/early/manifest.csv");
    let results_key = format!("{PREFIX}/early/results.csv");
    let early = wait_object(&server, &manifest_key, Duration::from_secs(20)).await;
    let results_then = server.object_file(&results_key).exists();
    // The row's task (2.5 s at least) has not ended yet.
    let report: Option<infinitetalk_batch::status::Report> =
        match reqwest::get(format!("http://{listen}/status")).await {
            Ok(resp) => resp.json().await.ok(),
            Err(_) => None,
        };
    let ended_then = report.and_then(|r| r.batches.first().map(|b| b.done + b.failed));
    let finished = wait_object(&server, &results_key, Duration::from_secs(60)).await;
    let status = terminate(&mut daemon, Duration::from_secs(25));
    let log = log_text(&dirs, 0);
    assert!(early, "no manifest.csv in the store; log:\n{log}");
    assert!(
        !results_then,
        "manifest.csv came only with results.csv; log:\n{log}"
    );
    assert_eq!(
        ended_then,
        Some(0),
        "manifest.csv came only after the row ended; log:\n{log}"
    );
    assert!(finished, "no results.csv in the store; log:\n{log}");
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    server.stop().await;
    sim.stop().await;
}
