//! The simulator against a real server on 127.0.0.1:0, driven with reqwest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use infinitetalk_batch::simulator::{self, CreditsStyle, Faults, SimArgs, SimHandle};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const SUBMIT: &str = "/api/v1/generateTask/infinitetalk";
const STATUS: &str = "/api/v1/statusTask/infinitetalk";
const KEY: &str = "test-key";

struct Sim {
    handle: SimHandle,
    base: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
}

impl Sim {
    async fn start(args: SimArgs) -> Self {
        let shutdown = CancellationToken::new();
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let handle = simulator::start(addr, args, shutdown.clone())
            .await
            .expect("simulator starts");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        Self {
            base: handle.base_url(),
            handle,
            client,
            shutdown,
        }
    }

    async fn fast() -> Self {
        Self::start(SimArgs {
            time_factor: 0.001,
            seed: Some(7),
            ..SimArgs::default()
        })
        .await
    }

    async fn submit_raw(&self, body: &Value) -> reqwest::Result<reqwest::Response> {
        self.client
            .post(format!("{}{SUBMIT}", self.base))
            .bearer_auth(KEY)
            .json(body)
            .send()
            .await
    }

    /// Submits and returns (HTTP status, body).
    async fn submit(&self, body: &Value) -> (u16, Value) {
        let resp = self.submit_raw(body).await.expect("submit answered");
        let code = resp.status().as_u16();
        (code, resp.json().await.expect("submit body is JSON"))
    }

    async fn submit_ok(&self, body: &Value) -> String {
        let (code, v) = self.submit(body).await;
        assert_eq!(code, 200, "{v}");
        v["data"]["taskId"].as_str().expect("taskId").to_string()
    }

    async fn status_raw(&self, id: &str) -> reqwest::Result<reqwest::Response> {
        self.client
            .get(format!("{}{STATUS}?taskId={id}", self.base))
            .bearer_auth(KEY)
            .send()
            .await
    }

    async fn status(&self, id: &str) -> (u16, Value) {
        let resp = self.status_raw(id).await.expect("status answered");
        let code = resp.status().as_u16();
        (code, resp.json().await.expect("status body is JSON"))
    }

    /// Polls until the task has ended; returns its `data`.
    async fn wait_done(&self, id: &str) -> Value {
        for _ in 0..400 {
            let (code, v) = self.status(id).await;
            assert_eq!(code, 200, "{v}");
            let state = v["data"]["state"].as_str().expect("state").to_string();
            if state == "success" || state == "failed" {
                return v["data"].clone();
            }
            assert!(state == "pending" || state == "processing", "{state}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("task {id} did not end");
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.handle.stopped())
            .await
            .expect("simulator stops within 5 s");
    }
}

fn body(image: &str, audio: &str) -> Value {
    json!({
        "request_type": "async",
        "provider": "auto",
        "input": {
            "mode": "image-to-video",
            "image_urls": [image],
            "audio_urls": [audio],
            "prompt": "",
            "resolution": "480p",
            "seed": -1
        }
    })
}

fn simple() -> Value {
    body(
        "https://img.test/a.png",
        "https://audio.test/a.mp3?sim_audio_seconds=1",
    )
}

fn result_urls(data: &Value) -> Vec<String> {
    let raw = data["resultJson"].as_str().expect("resultJson is a string");
    let parsed: Value = serde_json::from_str(raw).expect("resultJson holds JSON");
    parsed["resultUrls"]
        .as_array()
        .expect("resultUrls")
        .iter()
        .map(|u| u.as_str().expect("url").to_string())
        .collect()
}

#[test]
fn defaults_match_the_flags() {
    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        sim: SimArgs,
    }
    let parsed = Cmd::parse_from(["x"]).sim;
    assert_eq!(
        serde_json::to_value(&parsed).expect("json"),
        serde_json::to_value(SimArgs::default()).expect("json")
    );
    let flags = Cmd::parse_from([
        "x",
        "--error-5xx",
        "0.5",
        "--credits-style",
        "task",
        "--credits-out-after",
        "2m",
        "--result-ttl",
        "1s",
    ])
    .sim;
    assert!((flags.faults.error_5xx - 0.5).abs() < f64::EPSILON);
    assert_eq!(flags.faults.credits_style, CreditsStyle::Task);
    assert_eq!(flags.credits_out_after, Some(Duration::from_secs(120)));
    assert_eq!(flags.result_ttl, Duration::from_secs(1));
    assert!(Cmd::try_parse_from(["x", "--reset", "1.5"]).is_err());
}

#[tokio::test]
async fn each_validation_rule_answers_400_naming_the_field() {
    let sim = Sim::fast().await;
    let mut cases: Vec<(&str, Value)> = Vec::new();
    let mut add = |field: &'static str, f: &dyn Fn(&mut Value)| {
        let mut v = simple();
        f(&mut v);
        cases.push((field, v));
    };
    add("request_type", &|v| v["request_type"] = json!("sync"));
    add("request_type", &|v| {
        v.as_object_mut().expect("obj").remove("request_type");
    });
    add("callback_url", &|v| v["request_type"] = json!("callback"));
    add("callback_url", &|v| {
        v["request_type"] = json!("callback");
        v["callback_url"] = json!("not a url");
    });
    add("provider", &|v| v["provider"] = json!("cheap"));
    add("input", &|v| {
        v.as_object_mut().expect("obj").remove("input");
    });
    add("input.mode", &|v| {
        v["input"]["mode"] = json!("text-to-video")
    });
    add("input.image_urls", &|v| {
        v["input"]["image_urls"] = json!([])
    });
    add("input.image_urls", &|v| {
        v["input"]["image_urls"] = json!(["http://a.test/1", "http://a.test/2", "http://a.test/3"]);
    });
    add("input.image_urls[0]", &|v| {
        v["input"]["image_urls"] = json!(["file:///etc/passwd"]);
    });
    add("input.audio_urls", &|v| {
        v["input"]["audio_urls"] = json!([])
    });
    add("input.audio_urls", &|v| {
        v["input"]["audio_urls"] = json!(["http://a.test/1.mp3", "http://a.test/2.mp3"]);
    });
    add("input.audio_urls[0]", &|v| {
        v["input"]["audio_urls"] = json!([5])
    });
    add("input.resolution", &|v| {
        v["input"]["resolution"] = json!("1080p")
    });
    add("input.seed", &|v| v["input"]["seed"] = json!(-2));
    add("input.seed", &|v| {
        v["input"]["seed"] = json!(2_147_483_648_i64)
    });
    add("input.seed", &|v| v["input"]["seed"] = json!("5"));
    add("input.prompt", &|v| v["input"]["prompt"] = json!(null));
    add("surprise", &|v| v["surprise"] = json!(true));
    add("input.fps", &|v| v["input"]["fps"] = json!(25));
    let n = cases.len();
    for (field, v) in cases {
        let (code, answer) = sim.submit(&v).await;
        assert_eq!(code, 400, "{field}: {answer}");
        assert_eq!(answer["code"], 400);
        assert!(answer["data"].is_null());
        let msg = answer["message"].as_str().expect("message");
        assert!(msg.starts_with(&format!("{field}:")), "{field}: {msg}");
    }
    // Not JSON at all, and JSON without its content type.
    let resp = sim
        .client
        .post(format!("{}{SUBMIT}", sim.base))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body("{\"request_type\":")
        .send()
        .await
        .expect("answered");
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.expect("json");
    assert!(v["message"].as_str().expect("msg").starts_with("body:"));
    let resp = sim
        .client
        .post(format!("{}{SUBMIT}", sim.base))
        .bearer_auth(KEY)
        .body(simple().to_string())
        .send()
        .await
        .expect("answered");
    assert_eq!(resp.status().as_u16(), 400);

    // The documented variants that must pass: callback with URL, no provider,
    // a mask image, seed at both ends of its range.
    let mut ok = simple();
    ok["request_type"] = json!("callback");
    ok["callback_url"] = json!("http://127.0.0.1:9/cb");
    ok.as_object_mut().expect("obj").remove("provider");
    ok["input"]["image_urls"] = json!(["https://img.test/a.png", "https://img.test/mask.png"]);
    ok["input"]["seed"] = json!(2_147_483_647);
    sim.submit_ok(&ok).await;
    ok["input"]["seed"] = json!(0);
    ok["request_type"] = json!("async");
    sim.submit_ok(&ok).await;

    let stats = sim.handle.stats();
    assert_eq!(stats.rejected_400, n as u64 + 2);
    assert_eq!(stats.submit_requests, n as u64 + 4);
    assert_eq!(stats.tasks_created, 2);
    sim.stop().await;
}

#[tokio::test]
async fn keys_are_required_and_checked() {
    let sim = Sim::start(SimArgs {
        key: Some(KEY.into()),
        ..SimArgs::default()
    })
    .await;
    let url = format!("{}{SUBMIT}", sim.base);
    let none = sim
        .client
        .post(&url)
        .json(&simple())
        .send()
        .await
        .expect("answered");
    assert_eq!(none.status().as_u16(), 401);
    let v: Value = none.json().await.expect("json");
    assert_eq!(v["code"], 401);
    let empty = sim
        .client
        .post(&url)
        .header("authorization", "Bearer ")
        .json(&simple())
        .send()
        .await
        .expect("answered");
    assert_eq!(empty.status().as_u16(), 401);
    let wrong = sim
        .client
        .post(&url)
        .bearer_auth("other")
        .json(&simple())
        .send()
        .await
        .expect("answered");
    assert_eq!(wrong.status().as_u16(), 401);
    sim.submit_ok(&simple()).await;
    assert_eq!(sim.handle.stats().rejected_401, 3);
    sim.stop().await;

    // Without --key any non-empty key passes.
    let sim = Sim::fast().await;
    let resp = sim
        .client
        .post(format!("{}{SUBMIT}", sim.base))
        .bearer_auth("anything")
        .json(&simple())
        .send()
        .await
        .expect("answered");
    assert_eq!(resp.status().as_u16(), 200);
    sim.stop().await;
}

#[tokio::test]
async fn sliding_window_answers_429_exactly_past_the_limit() {
    let sim = Sim::start(SimArgs {
        max_requests_per_minute: 5,
        time_factor: 0.001,
        ..SimArgs::default()
    })
    .await;
    let id = sim.submit_ok(&simple()).await;
    for i in 0..4 {
        let (code, v) = sim.status(&id).await;
        assert_eq!(code, 200, "request {} of 5: {v}", i + 2);
        // Admin routes never count.
        let s: Value = sim
            .client
            .get(format!("{}/sim/stats", sim.base))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("json");
        assert_eq!(s["rejected_429"], 0);
    }
    let (code, v) = sim.status(&id).await;
    assert_eq!(code, 429, "{v}");
    assert_eq!(v["code"], 429);
    let (code, _) = sim.submit(&simple()).await;
    assert_eq!(code, 429);
    let stats = sim.handle.stats();
    assert_eq!(stats.rejected_429, 2);
    assert_eq!(stats.rejected_429_window, 2);
    assert_eq!(stats.rejected_429_concurrency, 0);
    // Rejected requests count in the window too.
    assert_eq!(stats.max_requests_in_window, 7);
    assert_eq!(stats.requests_in_window, 7);
    assert_eq!(stats.submit_requests, 2);
    assert_eq!(stats.status_requests, 5);
    sim.stop().await;
}

#[tokio::test]
async fn concurrency_cap_answers_429_exactly_at_the_cap() {
    let sim = Sim::start(SimArgs {
        max_concurrent: 3,
        time_factor: 0.01,
        ..SimArgs::default()
    })
    .await;
    // 2 s of audio at factor 0.01: 0.2 to 0.6 s of processing.
    let b = |i: usize| {
        body(
            &format!("https://img.test/{i}.png"),
            "https://audio.test/a.mp3?sim_audio_seconds=2",
        )
    };
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(sim.submit_ok(&b(i)).await);
    }
    let (code, v) = sim.submit(&b(3)).await;
    assert_eq!(code, 429, "{v}");
    let stats = sim.handle.stats();
    assert_eq!(stats.rejected_429_concurrency, 1);
    assert_eq!(stats.max_unfinished_tasks, 3);
    assert_eq!(stats.unfinished_tasks, 3);
    // Tasks free their slot when processing ends, polled or not.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sim.handle.stats().unfinished_tasks, 0);
    sim.submit_ok(&b(4)).await;
    assert_eq!(sim.handle.stats().max_unfinished_tasks, 3);
    sim.stop().await;
}

#[tokio::test]
async fn a_task_succeeds_with_downloadable_mp4s() {
    let sim = Sim::start(SimArgs {
        time_factor: 0.005,
        ..SimArgs::default()
    })
    .await;
    let id = sim
        .submit_ok(&body(
            "https://img.test/a.png",
            "https://audio.test/a.mp3?sim_audio_seconds=10&sim_results=2&sim_video_bytes=50000",
        ))
        .await;
    assert!(id.len() > 10);
    let (_, first) = sim.status(&id).await;
    let state = first["data"]["state"].as_str().expect("state");
    assert!(state == "pending" || state == "processing", "{state}");
    assert!(first["data"]["resultJson"].is_null());
    assert!(first["data"]["completeTime"].is_null());
    let data = sim.wait_done(&id).await;
    assert_eq!(data["state"], "success");
    assert_eq!(data["taskId"], id.as_str());
    let create = data["createTime"].as_u64().expect("createTime");
    let complete = data["completeTime"].as_u64().expect("completeTime");
    assert_eq!(
        data["costTime"].as_u64().expect("costTime"),
        complete - create
    );
    let urls = result_urls(&data);
    assert_eq!(urls.len(), 2);

    let tasks = sim.handle.tasks();
    let info = tasks.iter().find(|t| t.task_id == id).expect("task listed");
    assert_eq!(info.state, "success");
    assert_eq!(info.results.len(), 2);

    let mut files = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let resp = sim.client.get(url).send().await.expect("download");
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.content_length(), Some(50_000));
        let bytes = resp.bytes().await.expect("bytes");
        assert_eq!(&bytes[4..8], b"ftyp");
        assert_eq!(bytes.len(), 50_000);
        assert_eq!(info.results[i].sha256, simulator::sha256_hex(&bytes));
        assert_eq!(info.results[i].len, 50_000);
        assert_eq!(
            bytes.as_ref(),
            simulator::result_video(&id, i, Some(50_000)).as_slice()
        );
        files.push(bytes);
    }
    assert_ne!(files[0], files[1]);

    let resp = sim
        .client
        .get(&urls[0])
        .header("range", "bytes=1000-")
        .send()
        .await
        .expect("range");
    assert_eq!(resp.status().as_u16(), 206);
    assert_eq!(
        resp.headers()["content-range"].to_str().expect("ascii"),
        "bytes 1000-49999/50000"
    );
    assert_eq!(resp.content_length(), Some(49_000));
    let tail = resp.bytes().await.expect("bytes");
    assert_eq!(tail.as_ref(), &files[0][1000..]);
    let resp = sim
        .client
        .get(&urls[0])
        .header("range", "bytes=50000-")
        .send()
        .await
        .expect("range");
    assert_eq!(resp.status().as_u16(), 416);

    // Unknown tasks and files.
    let (code, v) = sim.status("sim-nope").await;
    assert_eq!(code, 404);
    assert_eq!(v["code"], 404);
    let stats = sim.handle.stats();
    assert_eq!(stats.download_requests, 4);
    assert_eq!(stats.tasks_succeeded, 1);
    assert_eq!(
        stats.requests_in_window,
        stats.submit_requests + stats.status_requests
    );
    sim.stop().await;
}

#[tokio::test]
async fn expired_and_forged_tokens_are_refused_and_fresh_urls_work() {
    let sim = Sim::start(SimArgs {
        time_factor: 0.001,
        result_ttl: Duration::from_millis(300),
        ..SimArgs::default()
    })
    .await;
    let id = sim.submit_ok(&simple()).await;
    let old = result_urls(&sim.wait_done(&id).await).remove(0);
    let forged = old.replace("token=", "token=1");
    let resp = sim.client.get(&forged).send().await.expect("answered");
    assert_eq!(resp.status().as_u16(), 403);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let resp = sim.client.get(&old).send().await.expect("answered");
    assert!(
        [403, 410].contains(&resp.status().as_u16()),
        "{}",
        resp.status()
    );
    let fresh = result_urls(&sim.wait_done(&id).await).remove(0);
    assert_ne!(fresh, old);
    let resp = sim.client.get(&fresh).send().await.expect("answered");
    assert_eq!(resp.status().as_u16(), 200);
    sim.stop().await;
}

/// A callback receiver answering 500 to the first `fail_first` POSTs.
async fn receiver(
    fail_first: usize,
    shutdown: CancellationToken,
) -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
    let got: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
    let seen = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/cb",
        axum::routing::post({
            let got = Arc::clone(&got);
            move |axum::Json(v): axum::Json<Value>| {
                let got = Arc::clone(&got);
                let seen = Arc::clone(&seen);
                async move {
                    got.lock().expect("lock").push(v);
                    if seen.fetch_add(1, Ordering::SeqCst) < fail_first {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        axum::http::StatusCode::OK
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/cb", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .expect("receiver");
    });
    (url, got)
}

#[tokio::test]
async fn callbacks_arrive_and_are_retried() {
    let stop = CancellationToken::new();
    let (url, got) = receiver(1, stop.clone()).await;
    let sim = Sim::fast().await;
    let mut b = simple();
    b["request_type"] = json!("callback");
    b["callback_url"] = json!(url);
    let id = sim.submit_ok(&b).await;
    // Retries come after 30 s x 0.001 = 30 ms.
    for _ in 0..300 {
        if sim.handle.stats().callbacks_acknowledged == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = sim.handle.stats();
    assert_eq!(stats.callbacks_acknowledged, 1);
    assert_eq!(stats.callbacks_sent, 2);
    let got = got.lock().expect("lock").clone();
    assert_eq!(got.len(), 2);
    for v in &got {
        assert_eq!(v["code"], 200);
        assert_eq!(v["data"]["taskId"], id.as_str());
        assert_eq!(v["data"]["state"], "success");
        assert_eq!(result_urls(&v["data"]).len(), 1);
    }
    sim.stop().await;
    stop.cancel();
}

#[tokio::test]
async fn callbacks_give_up_after_three_retries() {
    let stop = CancellationToken::new();
    let (url, got) = receiver(usize::MAX, stop.clone()).await;
    let sim = Sim::fast().await;
    let mut b = simple();
    b["request_type"] = json!("callback");
    b["callback_url"] = json!(url);
    sim.submit_ok(&b).await;
    // 30 ms + 120 ms + 600 ms of retry delays.
    for _ in 0..300 {
        if sim.handle.stats().callbacks_given_up == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = sim.handle.stats();
    assert_eq!(stats.callbacks_given_up, 1);
    assert_eq!(stats.callbacks_sent, 4);
    assert_eq!(got.lock().expect("lock").len(), 4);
    sim.stop().await;
    stop.cancel();
}

#[tokio::test]
async fn fault_5xx_reset_malformed_slow() {
    let sim = Sim::fast().await;
    let id = sim.submit_ok(&simple()).await;

    sim.handle.set_faults(Faults {
        error_5xx: 1.0,
        ..Faults::default()
    });
    let (code, v) = sim.status(&id).await;
    assert!(code == 500 || code == 503, "{code}");
    assert_eq!(v["code"], code);
    // Admin routes never get faults.
    let f: Faults = sim
        .client
        .get(format!("{}/sim/faults", sim.base))
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    assert!((f.error_5xx - 1.0).abs() < f64::EPSILON);

    sim.handle.set_faults(Faults {
        reset: 1.0,
        ..Faults::default()
    });
    assert!(sim.status_raw(&id).await.is_err());
    assert!(sim.submit_raw(&simple()).await.is_err());
    let tasks: Value = sim
        .client
        .get(format!("{}/sim/tasks", sim.base))
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    assert_eq!(
        tasks.as_array().expect("array").len(),
        1,
        "a reset submit creates nothing"
    );

    sim.handle.set_faults(Faults {
        malformed: 1.0,
        ..Faults::default()
    });
    let resp = sim.status_raw(&id).await.expect("answered");
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.expect("text");
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
    let resp = sim.submit_raw(&simple()).await.expect("answered");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.json::<Value>().await.is_err());
    assert_eq!(
        sim.handle.tasks().len(),
        1,
        "a malformed submit answer creates nothing"
    );

    // Through the admin route this time.
    let resp = sim
        .client
        .put(format!("{}/sim/faults", sim.base))
        .json(&json!({"slow": 1.0, "slow_ms": 300}))
        .send()
        .await
        .expect("admin");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(sim.handle.faults().slow_ms, 300);
    let resp = sim
        .client
        .put(format!("{}/sim/faults", sim.base))
        .json(&json!({"reset": 2.0}))
        .send()
        .await
        .expect("admin");
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(
        sim.handle.faults().slow_ms,
        300,
        "a refused PUT changes nothing"
    );
    let t0 = Instant::now();
    let (code, _) = sim.status(&id).await;
    assert_eq!(code, 200);
    assert!(t0.elapsed() >= Duration::from_millis(300));

    let stats = sim.handle.stats();
    assert_eq!(stats.faults.error_5xx, 1);
    assert_eq!(stats.faults.reset, 2);
    assert_eq!(stats.faults.malformed, 2);
    assert_eq!(stats.faults.slow, 1);
    assert_eq!(stats.tasks_created, 1);
    sim.stop().await;
}

#[tokio::test]
async fn fault_cut_download_and_lost_submit_answer() {
    let sim = Sim::fast().await;
    let id = sim.submit_ok(&simple()).await;
    let url = result_urls(&sim.wait_done(&id).await).remove(0);
    sim.handle.set_faults(Faults {
        cut_download: 1.0,
        lost_submit_answer: 1.0,
        ..Faults::default()
    });
    let mut resp = sim.client.get(&url).send().await.expect("headers arrive");
    let announced = resp.content_length().expect("content-length");
    let mut got = 0_u64;
    let mut failed = false;
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => got += c.len() as u64,
            Ok(None) => break,
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "a cut download ends in an error");
    assert!(got < announced, "{got} of {announced}");

    assert!(sim.submit_raw(&simple()).await.is_err());
    let tasks = sim.handle.tasks();
    assert_eq!(tasks.len(), 2, "the lost answer's task exists");
    let stats = sim.handle.stats();
    assert_eq!(stats.faults.cut_download, 1);
    assert_eq!(stats.faults.lost_submit_answer, 1);
    sim.stop().await;
}

#[tokio::test]
async fn credits_out_in_each_style_and_unauthorized() {
    let sim = Sim::fast().await;
    for (style, code) in [(CreditsStyle::Http400, 400), (CreditsStyle::Http402, 402)] {
        sim.handle.set_faults(Faults {
            credits_out: true,
            credits_style: style,
            ..Faults::default()
        });
        let (got, v) = sim.submit(&simple()).await;
        assert_eq!(got, code);
        assert_eq!(v["code"], code);
        assert_eq!(v["message"], "Insufficient credits");
    }
    assert_eq!(sim.handle.tasks().len(), 0);
    sim.handle.set_faults(Faults {
        credits_out: true,
        credits_style: CreditsStyle::Task,
        ..Faults::default()
    });
    let id = sim.submit_ok(&simple()).await;
    let data = sim.wait_done(&id).await;
    assert_eq!(data["state"], "failed");
    assert_eq!(data["failCode"], "INSUFFICIENT_CREDITS");
    assert!(data["resultJson"].is_null());

    sim.handle.set_faults(Faults {
        unauthorized: true,
        ..Faults::default()
    });
    let (code, _) = sim.status(&id).await;
    assert_eq!(code, 401);
    let (code, _) = sim.submit(&simple()).await;
    assert_eq!(code, 401);
    sim.handle.set_faults(Faults::default());
    let (code, _) = sim.status(&id).await;
    assert_eq!(code, 200);
    let stats = sim.handle.stats();
    assert_eq!(stats.faults.credits_out, 3);
    assert_eq!(stats.faults.unauthorized, 2);
    assert_eq!(stats.rejected_401, 2);
    assert_eq!(stats.rejected_400, 1);
    assert_eq!(stats.tasks_failed, 1);
    sim.stop().await;
}

#[tokio::test]
async fn periods_switch_faults_on_and_off() {
    let sim = Sim::start(SimArgs {
        time_factor: 0.001,
        credits_out_for: Some(Duration::from_millis(300)),
        unauthorized_after: Some(Duration::from_millis(600)),
        ..SimArgs::default()
    })
    .await;
    let (code, _) = sim.submit(&simple()).await;
    assert_eq!(code, 400);
    tokio::time::sleep(Duration::from_millis(400)).await;
    sim.submit_ok(&simple()).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (code, _) = sim.submit(&simple()).await;
    assert_eq!(code, 401);
    assert!(sim.handle.faults().unauthorized);
    sim.stop().await;
}

#[tokio::test]
async fn fail_markers_and_pair_counters() {
    let sim = Sim::fast().await;
    let violating = body(
        "https://img.test/a.png?sim_fail=CONTENT_VIOLATION",
        "https://audio.test/a.mp3?sim_audio_seconds=1",
    );
    let once = body(
        "https://img.test/b.png",
        "https://audio.test/b.mp3?sim_audio_seconds=1&sim_fail_once=PROCESSING_TIMEOUT",
    );
    let a1 = sim.submit_ok(&violating).await;
    let a2 = sim.submit_ok(&violating).await;
    let b1 = sim.submit_ok(&once).await;
    let b2 = sim.submit_ok(&once).await;
    let b3 = sim.submit_ok(&once).await;
    for id in [&a1, &a2] {
        let d = sim.wait_done(id).await;
        assert_eq!(d["state"], "failed");
        assert_eq!(d["failCode"], "CONTENT_VIOLATION");
        assert!(!d["failMsg"].as_str().expect("failMsg").is_empty());
    }
    let d = sim.wait_done(&b1).await;
    assert_eq!(d["failCode"], "PROCESSING_TIMEOUT");
    for id in [&b2, &b3] {
        assert_eq!(sim.wait_done(id).await["state"], "success");
    }
    let tasks = sim.handle.tasks();
    assert_eq!(
        tasks
            .iter()
            .filter(|t| t.fail_code.as_deref() == Some("CONTENT_VIOLATION"))
            .count(),
        2
    );
    let stats = sim.handle.stats();
    assert_eq!(stats.max_submissions_per_pair, 3);
    assert_eq!(stats.pairs_submitted_more_than_once, 2);
    assert_eq!(stats.tasks_created, 5);
    assert_eq!(stats.tasks_failed, 3);
    assert_eq!(stats.tasks_succeeded, 2);
    sim.stop().await;
}

#[tokio::test]
async fn shutdown_stops_pending_callbacks_and_slow_answers() {
    let sim = Sim::start(SimArgs {
        // Tasks would take minutes; their callbacks must not hold shutdown.
        time_factor: 1.0,
        ..SimArgs::default()
    })
    .await;
    let mut b = simple();
    b["request_type"] = json!("callback");
    b["callback_url"] = json!("http://127.0.0.1:9/cb");
    sim.submit_ok(&b).await;
    sim.handle.set_faults(Faults {
        slow: 1.0,
        slow_ms: 60_000,
        ..Faults::default()
    });
    // Admin routes are never slowed.
    let t0 = Instant::now();
    let resp = sim
        .client
        .get(format!("{}/sim/stats", sim.base))
        .send()
        .await
        .expect("admin");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(t0.elapsed() < Duration::from_secs(5));
    // An answer held back for a minute must not hold the shutdown.
    let slow = tokio::spawn({
        let client = sim.client.clone();
        let url = format!("{}{STATUS}?taskId=x", sim.base);
        async move {
            client
                .get(url)
                .bearer_auth(KEY)
                .send()
                .await
                .map(|r| r.status())
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = sim.handle.addr;
    sim.stop().await;
    let _ = slow.await.expect("join");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn standalone_runs_until_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let run = tokio::spawn(simulator::run_standalone(addr, SimArgs::default()));
    let mut up = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(up, "simulator listens");
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).expect("raise");
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("stops within 5 s")
        .expect("join")
        .expect("clean exit");
}

#[tokio::test]
async fn loopback_inputs_are_fetched_and_others_taken_as_reachable() {
    let sim = Sim::fast().await;
    // A small server that answers 200 to one path and 404 to others, on
    // loopback: what a daemon's /media or a local object store looks like.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let other = listener.local_addr().expect("addr");
    let app = axum::Router::new().route("/ok.png", axum::routing::get(|| async { "x" }));
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let base = sim.base.clone();
    let cases = [
        // Not loopback: never fetched, taken as reachable.
        (
            "https://img.test/a.png".to_owned(),
            "https://audio.test/a.mp3?sim_audio_seconds=1".to_owned(),
            None,
        ),
        // The simulator's own /media serves .wav audio.
        (
            format!("http://{other}/ok.png"),
            format!("{base}/media/a.wav?sim_audio_seconds=1"),
            None,
        ),
        // ... and nothing else: an image there is not found.
        (
            format!("{base}/media/a.png"),
            "https://audio.test/a.mp3?sim_audio_seconds=1".to_owned(),
            Some("INVALID_IMAGE_URL"),
        ),
        (
            format!("http://{other}/missing.png"),
            "https://audio.test/a.mp3?sim_audio_seconds=1".to_owned(),
            Some("INVALID_IMAGE_URL"),
        ),
        // Nothing listens on port 9.
        (
            "https://img.test/a.png".to_owned(),
            "http://127.0.0.1:9/a.wav?sim_audio_seconds=1".to_owned(),
            Some("INVALID_AUDIO_URL"),
        ),
        (
            "https://img.test/a.png".to_owned(),
            format!(
                "http://localhost:{}/nope.wav?sim_audio_seconds=1",
                other.port()
            ),
            Some("INVALID_AUDIO_URL"),
        ),
    ];
    for (image, audio, want) in cases {
        let id = sim.submit_ok(&body(&image, &audio)).await;
        let data = sim.wait_done(&id).await;
        match want {
            None => assert_eq!(data["state"], "success", "{image} {audio}: {data}"),
            Some(code) => {
                assert_eq!(data["state"], "failed", "{image} {audio}: {data}");
                assert_eq!(data["failCode"], code, "{image} {audio}");
            }
        }
    }
    server.abort();
    sim.stop().await;
}
