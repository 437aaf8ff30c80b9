//! Local media published through `--media-url`: the real binary serves each
//! file from its listener's `/media/` route, and the simulator, which
//! fetches loopback inputs as the service would, takes them from there. A
//! batch that completes proves the published URLs work.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use infinitetalk_batch::ingest::{self, Folders, Outcome};
use infinitetalk_batch::media::{MediaSettings, Publishing};
use infinitetalk_batch::simulator::SimArgs;
use infinitetalk_batch::store::Store;

const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0";

fn wav(seconds: f64) -> Vec<u8> {
    infinitetalk_batch::simulator::silent_wav_bytes(seconds)
}

/// `dirs.root/media` with a portrait, a mask and `n` voices.
fn media_dir(dirs: &Dirs, n: usize) -> std::path::PathBuf {
    let media = dirs.root.path().join("media");
    std::fs::create_dir_all(media.join("voices")).expect("media");
    std::fs::write(media.join("ann.png"), PNG).expect("png");
    std::fs::write(media.join("mask.png"), PNG).expect("mask");
    for i in 0..n {
        std::fs::write(media.join(format!("voices/{i}.wav")), wav(1.0 + i as f64)).expect("wav");
    }
    media
}

fn manifest(dirs: &Dirs, name: &str, body: &str) {
    let tmp = dirs.inbox.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, format!("id,image_url,mask_url,audio_url\n{body}")).expect("write");
    std::fs::rename(&tmp, dirs.inbox.join(name)).expect("rename");
}

fn media_args<'a>(media: &'a str, url: &'a str) -> Vec<&'a str> {
    with_poll(&["--media-root", media, "--media-url", url])
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_files_run_end_to_end_through_the_media_route() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let media = media_dir(&dirs, 3);
    let listen = free_addr();
    let url = format!("http://127.0.0.1:{}", listen.port());
    manifest(
        &dirs,
        "local.csv",
        &format!(
            "a,ann.png,mask.png,voices/0.wav\n\
             b,ann.png,,voices/1.wav\n\
             c,{},,voices/2.wav\n\
             d,ann.png,,http://127.0.0.1:9/gone.wav\n",
            media.join("ann.png").display()
        ),
    );
    let media_s = media.display().to_string();
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &media_args(&media_s, &url), 0);
    let finished = wait_results(&dirs, "local", Duration::from_secs(60)).await;
    assert!(
        finished,
        "batch did not finish; log:\n{}",
        log_text(&dirs, 0)
    );

    let results = check_results_against_sim(&dirs, "local", &sim.handle);
    let state = |id: &str| {
        let r = results.iter().find(|r| r["id"] == id).expect("row");
        (r["state"].clone(), r["fail_code"].clone())
    };
    for id in ["a", "b", "c"] {
        assert_eq!(state(id), ("done".into(), String::new()), "row {id}");
    }
    // The simulator fetched what it was given: an unreachable loopback URL
    // fails its task as the service would.
    assert_eq!(state("d"), ("failed".into(), "INVALID_AUDIO_URL".into()));

    // Every local file went out as a URL under the daemon's /media route,
    // never as a path; the mask is the second image.
    let tasks = sim.handle.tasks();
    assert_eq!(tasks.len(), 4);
    let prefix = format!("{url}/media/");
    let task_a = tasks
        .iter()
        .find(|t| t.audio_url.ends_with(".wav") && t.image_urls.len() == 2)
        .expect("row a's task");
    for u in task_a.image_urls.iter().chain([&task_a.audio_url]) {
        assert!(u.starts_with(&prefix), "{u}");
    }
    assert!(task_a.image_urls[0].ends_with(".png"));
    // The rows have ended: their tokens answer 404 now.
    let http = client();
    for u in task_a.image_urls.iter().chain([&task_a.audio_url]) {
        let status = http.get(u).send().await.expect("answers").status();
        assert_eq!(status, 404, "{u}");
    }
    let log = log_text(&dirs, 0);
    assert!(!log.contains("/media/"), "tokens are never logged:\n{log}");
    let status = terminate(&mut daemon, Duration::from_secs(25));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_rows_file_is_served_with_range_and_head_and_nothing_else() {
    // Slow tasks: the row stays running while the route is tried.
    let sim = Sim::start(SimArgs {
        time_factor: 1.0,
        ..SimArgs::default()
    })
    .await;
    let dirs = Dirs::new();
    let media = media_dir(&dirs, 1);
    std::fs::write(media.join("other.png"), PNG).expect("other");
    // Off loopback, as when the API reaches it through a proxy: reading
    // routes need the admin token there, the media route only its token.
    let port = free_addr().port();
    let listen: std::net::SocketAddr = format!("0.0.0.0:{port}").parse().expect("addr");
    let url = format!("http://localhost:{port}");
    manifest(&dirs, "slow.csv", "a,ann.png,,voices/0.wav\n");
    let media_s = media.display().to_string();
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &media_args(&media_s, &url), 0);
    let task = wait_for(Duration::from_secs(30), || sim.handle.tasks().pop()).await;
    let Some(task) = task else {
        panic!("no task; log:\n{}", log_text(&dirs, 0));
    };
    let audio = task.audio_url.clone();
    let bytes = std::fs::read(media.join("voices/0.wav")).expect("wav");
    let http = client();
    let status = http
        .get(format!("{url}/status"))
        .send()
        .await
        .expect("answers")
        .status();
    assert_eq!(status, 401, "reading needs the admin token off loopback");

    let whole = http.get(&audio).send().await.expect("get");
    assert_eq!(whole.status(), 200);
    assert_eq!(
        whole.headers()["content-type"].to_str().expect("ascii"),
        "audio/wav"
    );
    assert_eq!(
        whole.bytes().await.expect("body").as_ref(),
        bytes.as_slice()
    );

    let head = http.head(&audio).send().await.expect("head");
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"].to_str().expect("ascii"),
        bytes.len().to_string()
    );
    assert_eq!(head.bytes().await.expect("body").len(), 0);

    let part = http
        .get(&audio)
        .header("range", "bytes=10-19")
        .send()
        .await
        .expect("range");
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"].to_str().expect("ascii"),
        format!("bytes 10-19/{}", bytes.len())
    );
    assert_eq!(part.bytes().await.expect("body").as_ref(), &bytes[10..20]);

    // A guessed or altered token, another column's token, a path: 404.
    let token_start = audio.rfind('/').expect("slash") + 1;
    let token = &audio[token_start..audio.len() - ".wav".len()];
    let mut altered = token.to_owned();
    let last = if altered.ends_with('0') { "1" } else { "0" };
    altered.replace_range(altered.len() - 1.., last);
    let mut column_swapped = token.to_owned();
    // Byte 16 of the token is the column: 02 (audio) → 00 (image).
    column_swapped.replace_range(32..34, "00");
    for path in [
        format!("/media/{altered}.wav"),
        format!("/media/{column_swapped}.png"),
        format!("/media/{}.wav", "0".repeat(66)),
        "/media/other.png".to_owned(),
        "/media/..%2fother.png".to_owned(),
        "/media/".to_owned(),
    ] {
        let status = http
            .get(format!("{url}{path}"))
            .send()
            .await
            .expect("answers")
            .status();
        assert_eq!(status, 404, "{path}");
    }
    let status = terminate(&mut daemon, Duration::from_secs(25));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    sim.stop().await;
}

/// Ingests `body` with the library, as the daemon would with these settings.
fn accept(dirs: &Dirs, media: &Path, url: &str, name: &str, body: &str) {
    let mut folders = Folders::new(dirs.inbox.clone(), dirs.outbox.clone());
    folders.media = MediaSettings {
        root: media.to_owned(),
        publishing: Publishing::Url(url::Url::parse(url).expect("url")),
    };
    let store = Store::open(&dirs.state).expect("store");
    manifest(dirs, name, body);
    match ingest::ingest_file(&store, &folders, &dirs.inbox.join(name), false).expect("ingest") {
        Outcome::Accepted(_) => {}
        other => panic!("not accepted: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_after_acceptance_fails_its_row_unsent() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let media = media_dir(&dirs, 4);
    let listen = free_addr();
    let url = format!("http://127.0.0.1:{}", listen.port());
    accept(
        &dirs,
        &media,
        &url,
        "changed.csv",
        "grown,ann.png,,voices/0.wav\n\
         same_size,ann.png,,voices/1.wav\n\
         gone,ann.png,,voices/2.wav\n\
         touched,ann.png,,voices/3.wav\n",
    );
    let voices = media.join("voices");
    // More bytes.
    std::fs::write(voices.join("0.wav"), wav(1.5)).expect("grow");
    // The same length, other bytes, a new time: only the hash tells.
    let mut other = wav(2.0);
    let last = other.len() - 1;
    other[last] ^= 0xff;
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(voices.join("1.wav"), &other).expect("rewrite");
    std::fs::remove_file(voices.join("2.wav")).expect("remove");
    // Touched, content unchanged: the hash says it is the same file.
    let same = std::fs::read(voices.join("3.wav")).expect("read");
    std::fs::write(voices.join("3.wav"), &same).expect("touch");

    let media_s = media.display().to_string();
    // With --probe, a local file's length is the one read at acceptance.
    let mut args = media_args(&media_s, &url);
    args.push("--probe");
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &args, 0);
    let finished = wait_results(&dirs, "changed", Duration::from_secs(60)).await;
    assert!(
        finished,
        "batch did not finish; log:\n{}",
        log_text(&dirs, 0)
    );
    let results = read_results(&dirs.batch_dir("changed").join("results.csv"));
    let row = |id: &str| results.iter().find(|r| r["id"] == id).expect("row");
    for id in ["grown", "same_size", "gone"] {
        let r = row(id);
        assert_eq!(r["state"], "failed", "{id}");
        assert_eq!(r["fail_code"], "MEDIA_CHANGED", "{id}");
        assert!(r["task_id"].is_empty(), "{id}: never sent");
        assert!(r["cost_usd"].is_empty(), "{id}: nothing paid: {r:?}");
    }
    assert_eq!(row("touched")["state"], "done");
    let seconds: f64 = row("touched")["audio_seconds"].parse().expect("seconds");
    assert!((seconds - 4.0).abs() < 0.01, "{seconds}");
    // Only the unchanged file's row reached the API.
    assert_eq!(sim.handle.tasks().len(), 1);
    let status = terminate(&mut daemon, Duration::from_secs(25));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    // No spend was counted for the three: only the touched row's task.
    let store = Store::open(&dirs.state).expect("store");
    let spent = store.spend_of(false).expect("spend");
    assert!(
        (spent.usd - 0.15).abs() < 1e-9,
        "one row at the 5 s minimum: {}",
        spent.usd
    );
    sim.stop().await;
}
