//! Audio probing against files of known length served over loopback by a
//! tiny server that honours (or ignores, or breaks) HTTP Range.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use infinitetalk_batch::probe::{AudioFormat, ProbeError, Prober};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Honours Range.
    Ranges,
    /// Ignores Range: always the whole file, 200.
    Whole,
    /// Announces the asked range but sends only half of it.
    Cut,
}

#[derive(Clone, Default)]
struct Files {
    files: Arc<HashMap<String, (Vec<u8>, Mode)>>,
    hits: Arc<AtomicUsize>,
}

async fn serve_file(
    State(files): State<Files>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    files.hits.fetch_add(1, Ordering::Relaxed);
    let Some((data, mode)) = files.files.get(&name) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let total = data.len() as u64;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
    let (start, end) = match (mode, range) {
        (Mode::Whole, _) | (_, None) => return data.clone().into_response(),
        (_, Some((a, _))) if a >= total => {
            return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
        }
        (_, Some((a, b))) => (a, b.min(total - 1)),
    };
    let slice = data[start as usize..=end as usize].to_vec();
    let announced = slice.len();
    let body = if *mode == Mode::Cut {
        let half = slice[..announced / 2].to_vec();
        Body::from_stream(futures_util::stream::iter([Ok::<_, std::io::Error>(half)]))
    } else {
        Body::from(slice)
    };
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{end}/{total}"),
        )
        .header(header::CONTENT_LENGTH, announced)
        .body(body)
        .expect("response")
}

async fn serve(files: Vec<(&str, Vec<u8>, Mode)>) -> (SocketAddr, Files) {
    let files = Files {
        files: Arc::new(
            files
                .into_iter()
                .map(|(n, d, m)| (n.to_owned(), (d, m)))
                .collect(),
        ),
        hits: Arc::default(),
    };
    let app = Router::new()
        .route("/{name}", axum::routing::get(serve_file))
        .with_state(files.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, files)
}

/// A 16-bit PCM WAV of `seconds` of silence whose header claims `declared` seconds.
fn wav(rate: u32, channels: u16, seconds: f64, declared: f64) -> Vec<u8> {
    let block = u32::from(channels) * 2;
    let frames = (seconds * f64::from(rate)) as u32;
    let declared_bytes = (declared * f64::from(rate)) as u32 * block;
    let mut v = Vec::new();
    v.extend_from_slice(b"RIFF");
    v.extend_from_slice(&(36 + declared_bytes).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes());
    v.extend_from_slice(&channels.to_le_bytes());
    v.extend_from_slice(&rate.to_le_bytes());
    v.extend_from_slice(&(rate * block).to_le_bytes());
    v.extend_from_slice(&(block as u16).to_le_bytes());
    v.extend_from_slice(&16u16.to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&declared_bytes.to_le_bytes());
    v.resize(v.len() + (frames * block) as usize, 0);
    v
}

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/audio")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn prober() -> Prober {
    // A small head so that later range requests (the M4A's moov at the end) are exercised.
    Prober::new(reqwest::Client::new(), Duration::from_secs(10), 4).with_head_bytes(4096)
}

fn close(got: f64, want: f64, tolerance: f64) {
    assert!(
        (got - want).abs() <= tolerance,
        "got {got} s, want {want} s (± {tolerance})"
    );
}

#[tokio::test]
async fn reads_the_length_of_wav_mp3_and_m4a() {
    let m4a = fixture("sine5.m4a");
    let (addr, files) = serve(vec![
        ("a.wav", wav(16_000, 1, 3.0, 3.0), Mode::Ranges),
        ("stereo.wav", wav(44_100, 2, 2.5, 2.5), Mode::Whole),
        ("a.mp3", fixture("sine3.mp3"), Mode::Ranges),
        ("noxing.mp3", fixture("sine4-noxing.mp3"), Mode::Ranges),
        ("a.m4a", m4a.clone(), Mode::Ranges),
        ("whole.m4a", m4a, Mode::Whole),
    ])
    .await;
    let p = prober();
    let url = |n: &str| format!("http://{addr}/{n}");
    let got = p.probe(&url("a.wav")).await.expect("wav");
    assert_eq!(got.format, AudioFormat::Wav);
    close(got.seconds, 3.0, 0.001);
    close(
        p.probe(&url("stereo.wav")).await.expect("wav").seconds,
        2.5,
        0.001,
    );
    let got = p.probe(&url("a.mp3")).await.expect("mp3");
    assert_eq!(got.format, AudioFormat::Mp3);
    close(got.seconds, 3.0, 0.1);
    // No Xing header: estimated from the bitrate and the file's size.
    close(
        p.probe(&url("noxing.mp3")).await.expect("mp3").seconds,
        4.0,
        0.2,
    );
    // moov at the end of the file: fetched by a later range request.
    let got = p.probe(&url("a.m4a")).await.expect("m4a");
    assert_eq!(got.format, AudioFormat::M4a);
    close(got.seconds, 5.0, 0.1);
    close(
        p.probe(&url("whole.m4a")).await.expect("m4a").seconds,
        5.0,
        0.1,
    );
    // Answers are cached per URL.
    let hits = files.hits.load(Ordering::Relaxed);
    close(p.probe(&url("a.m4a")).await.expect("m4a").seconds, 5.0, 0.1);
    assert_eq!(files.hits.load(Ordering::Relaxed), hits);
}

#[tokio::test]
async fn only_the_header_of_a_long_file_is_read_and_over_ten_minutes_is_refused() {
    // 11 minutes at 8 kHz mono: 10.5 MB, of which only the head is fetched.
    let long = wav(8_000, 1, 660.0, 660.0);
    let (addr, files) = serve(vec![("long.wav", long, Mode::Ranges)]).await;
    let err = prober()
        .probe(&format!("http://{addr}/long.wav"))
        .await
        .expect_err("too long");
    assert!(matches!(err, ProbeError::TooLong { .. }), "{err}");
    assert!(!err.is_transient());
    assert_eq!(
        err.to_string(),
        "the audio is 660.0 s long; the API accepts at most 10 minutes"
    );
    assert_eq!(files.hits.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_file_that_lies_or_is_cut_short() {
    let m4a = fixture("sine5.m4a");
    let truncated = m4a[..m4a.len() * 2 / 3].to_vec();
    let (addr, _) = serve(vec![
        // The header claims 20 minutes; 2 s of samples follow.
        ("liar.wav", wav(16_000, 1, 2.0, 1200.0), Mode::Ranges),
        // The moov box that holds the duration was cut off.
        ("truncated.m4a", truncated, Mode::Ranges),
        // The server announces every range but breaks off halfway.
        ("cut.wav", wav(16_000, 1, 3.0, 3.0), Mode::Cut),
    ])
    .await;
    let p = prober();
    let url = |n: &str| format!("http://{addr}/{n}");
    close(
        p.probe(&url("liar.wav"))
            .await
            .expect("the bytes decide")
            .seconds,
        2.0,
        0.01,
    );
    let err = p.probe(&url("truncated.m4a")).await.expect_err("no moov");
    assert!(!err.is_transient(), "{err:?}");
    let err = p.probe(&url("cut.wav")).await.expect_err("cut short");
    // Cut short or a broken connection, depending on when the server gives up: retried.
    assert!(
        matches!(err, ProbeError::CutShort { .. } | ProbeError::Network(_)),
        "{err:?}"
    );
    assert!(err.is_transient());
}

#[tokio::test]
async fn not_audio_missing_and_unreachable() {
    let (addr, _) = serve(vec![(
        "page.mp3",
        b"<html>not audio</html>".to_vec(),
        Mode::Ranges,
    )])
    .await;
    let p = prober();
    let err = p
        .probe(&format!("http://{addr}/page.mp3"))
        .await
        .expect_err("not audio");
    assert!(matches!(err, ProbeError::Unsupported(_)), "{err:?}");
    assert!(err.to_string().starts_with("not MP3, WAV or M4A audio"));
    let err = p
        .probe(&format!("http://{addr}/missing.wav"))
        .await
        .expect_err("404");
    assert_eq!(err, ProbeError::Status(404));
    assert!(!err.is_transient());
    // Nothing listens on a port just released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let err = p
        .probe(&format!("http://{closed}/a.wav"))
        .await
        .expect_err("refused");
    assert!(err.is_transient(), "{err:?}");
}

#[tokio::test]
async fn the_simulator_serves_audio_as_long_as_it_bills() {
    use infinitetalk_batch::simulator::{self, SimArgs};
    let stop = tokio_util::sync::CancellationToken::new();
    let sim = simulator::start(
        "127.0.0.1:0".parse().expect("addr"),
        SimArgs {
            seed: Some(3),
            ..SimArgs::default()
        },
        stop.clone(),
    )
    .await
    .expect("simulator starts");
    let base = sim.base_url();
    let p = prober();
    let marked = p
        .probe(&format!("{base}/media/a.wav?sim_audio_seconds=7.5"))
        .await
        .expect("marked wav");
    assert_eq!(marked.format, AudioFormat::Wav);
    close(marked.seconds, 7.5, 0.01);
    // Without a marker: the simulator's stable whole number of 5..=60 s.
    let plain = p
        .probe(&format!("{base}/media/b.wav"))
        .await
        .expect("plain wav")
        .seconds;
    assert!(
        (5.0..=60.0).contains(&plain) && (plain - plain.round()).abs() < 0.01,
        "{plain}"
    );
    let err = p
        .probe(&format!("{base}/media/c.mp3"))
        .await
        .expect_err("only wav is served");
    assert!(!err.is_transient(), "{err}");
    let stats = sim.stats();
    assert_eq!(
        (stats.submit_requests, stats.status_requests),
        (0, 0),
        "media is not the API"
    );
    stop.cancel();
}

#[tokio::test]
async fn a_failure_is_not_remembered() {
    let (addr, files) = serve(vec![("a.wav", wav(8_000, 1, 3.0, 3.0), Mode::Ranges)]).await;
    let p = prober();
    let missing = format!("http://{addr}/fixed-later.wav");
    p.probe(&missing).await.expect_err("not there");
    let hits = files.hits.load(Ordering::Relaxed);
    // Asked again, not answered from memory: a fixed URL would work now.
    p.probe(&missing).await.expect_err("still not there");
    assert!(
        files.hits.load(Ordering::Relaxed) > hits,
        "the failure was cached"
    );
    assert_eq!(p.cached_entries(), 0);
}
