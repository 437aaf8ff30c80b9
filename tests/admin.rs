//! The admin boundary of the listener, against the real binary: the admin
//! token, cross-site refusal, the `Host` check, reading on a non-loopback
//! listener, the one-time console link, and `--callback-listen`.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;
use infinitetalk_batch::status::Report;
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};

const POLL_FAST: [&str; 4] = ["--poll-min", "100ms", "--poll-max", "1s"];

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

fn token(dirs: &Dirs) -> String {
    std::fs::read_to_string(dirs.state.join("admin-token"))
        .expect("admin token readable")
        .trim()
        .to_owned()
}

/// `/status` of the daemon at `addr` (sent to `127.0.0.1:PORT`), with `token`.
async fn status(addr: SocketAddr, token: Option<&str>) -> Option<Report> {
    let url = format!("http://127.0.0.1:{}/status", addr.port());
    let mut req = client().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.ok()?;
    resp.json::<Report>().await.ok()
}

async fn wait_status(
    addr: SocketAddr,
    token: Option<&str>,
    limit: Duration,
    check: impl Fn(&Report) -> bool,
) -> Option<Report> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(r) = status(addr, token).await
            && check(&r)
        {
            return Some(r);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the daemon created its token and answers.
async fn wait_up(dirs: &Dirs, addr: SocketAddr) -> String {
    let path = dirs.state.join("admin-token");
    let made = wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string(&path)
            .ok()
            .filter(|t| t.trim().len() == 64)
    })
    .await;
    assert!(
        made.is_some(),
        "no admin token; log:\n{}",
        log_text(dirs, 0)
    );
    let token = token(dirs);
    let up = wait_status(addr, Some(&token), Duration::from_secs(30), |_| true).await;
    assert!(
        up.is_some(),
        "daemon not answering; log:\n{}",
        log_text(dirs, 0)
    );
    token
}

/// POST `path` on `addr` with the given headers; the status code.
async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> StatusCode {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.insert(
            header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    client()
        .post(format!("http://127.0.0.1:{}{path}", addr.port()))
        .headers(map)
        .send()
        .await
        .expect("answered")
        .status()
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client().get(format!("http://127.0.0.1:{}{path}", addr.port()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("answered")
}

/// `infinitetalk-batch console` for the daemon of `dirs` at `listen`.
fn console_link(dirs: &Dirs, listen: SocketAddr) -> String {
    let out = Command::new(BIN)
        .args(["console", "--listen", &listen.to_string(), "--state"])
        .arg(&dirs.state)
        .output()
        .expect("console runs");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "console failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Opens a console link; the session cookie (`name=value`) it set.
async fn open_link(link: &str) -> Result<String, StatusCode> {
    let resp = client().get(link).send().await.expect("link answered");
    if resp.status() != StatusCode::SEE_OTHER {
        return Err(resp.status());
    }
    assert_eq!(resp.headers()[header::LOCATION], "/");
    let set = resp.headers()[header::SET_COOKIE]
        .to_str()
        .expect("cookie text")
        .to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    Ok(set.split(';').next().expect("name=value").to_owned())
}

fn failed_rows(n_ok: usize, n_fail: usize) -> Vec<(String, String, String)> {
    let mut rows = rows("r", n_ok + n_fail, |i| {
        format!("sim_audio_seconds={}", 5 + i)
    });
    for row in rows.iter_mut().skip(n_ok) {
        row.2.push_str("&sim_fail=CONTENT_VIOLATION");
    }
    rows
}

/// Every changing request needs the token (or the console's cookie) and
/// is refused when it comes from another site, token or not; a refused
/// request changes nothing. The `Host` check guards the whole listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_requests_need_the_token_and_never_come_from_another_site() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    write_manifest(&dirs.inbox, "b.csv", &failed_rows(1, 2));
    let listen = free_addr();
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &POLL_FAST, 0);
    let token = wait_up(&dirs, listen).await;
    let ended = wait_status(listen, None, Duration::from_secs(60), |r| {
        r.batches
            .first()
            .is_some_and(|b| b.done == 1 && b.failed == 2)
    })
    .await;
    assert!(ended.is_some(), "log:\n{}", log_text(&dirs, 0));
    let tasks_before = sim.handle.tasks().len();
    assert_eq!(tasks_before, 3);

    let bearer = format!("Bearer {token}");
    let bearer = bearer.as_str();
    let own_origin = format!("http://127.0.0.1:{}", listen.port());
    let retry = "/batches/b/retry";
    // No token, a wrong one: 401.
    assert_eq!(post(listen, retry, &[]).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        post(listen, retry, &[("authorization", "Bearer 00ff")]).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post(listen, "/batches/b/cancel", &[]).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post(listen, "/admin/ticket", &[]).await,
        StatusCode::UNAUTHORIZED
    );
    // Cross-site, with the right token: 403. Either header saying so is
    // enough, even when the other says "same-origin".
    let evil_same_origin = [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "same-origin"),
        ("authorization", bearer),
    ];
    let other_port_same_origin = [
        ("origin", "http://127.0.0.1:1"),
        ("sec-fetch-site", "same-origin"),
        ("authorization", bearer),
    ];
    for headers in [
        &[("sec-fetch-site", "cross-site"), ("authorization", bearer)][..],
        &[("sec-fetch-site", "same-site"), ("authorization", bearer)],
        &[("origin", "http://evil.example"), ("authorization", bearer)],
        &[("origin", "http://127.0.0.1:1"), ("authorization", bearer)],
        &[("origin", "null"), ("authorization", bearer)],
        &evil_same_origin,
        &other_port_same_origin,
    ] {
        assert_eq!(
            post(listen, retry, headers).await,
            StatusCode::FORBIDDEN,
            "{headers:?}"
        );
    }
    // Nothing was retried.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sim.handle.tasks().len(), tasks_before);
    let report = status(listen, None).await.expect("status");
    let b = &report.batches[0];
    assert_eq!((b.done, b.failed, b.queued, b.in_flight), (1, 2, 0, 0));

    // The Host check: a rebound name is refused on every route; the
    // listener's own names pass.
    for path in ["/status", "/metrics", "/login?ticket=x"] {
        let resp = get(listen, path, &[("host", "rebound.example:8686")]).await;
        assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST, "{path}");
    }
    assert_eq!(
        post(
            listen,
            retry,
            &[("host", "rebound.example"), ("authorization", bearer)]
        )
        .await,
        StatusCode::MISDIRECTED_REQUEST
    );
    // A refused path that carries a secret is logged without it.
    assert_eq!(
        post(
            listen,
            "/callback/not-logged-c4llback-s3cret",
            &[("host", "rebound.example")]
        )
        .await,
        StatusCode::MISDIRECTED_REQUEST
    );
    let port = listen.port().to_string();
    for host in [
        "localhost".to_owned(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ] {
        let resp = get(listen, "/status", &[("host", &host)]).await;
        assert_eq!(resp.status(), StatusCode::OK, "{host}");
    }

    // With the token (and the page's own Origin): the retry happens.
    assert_eq!(
        post(
            listen,
            retry,
            &[("authorization", bearer), ("origin", &own_origin)]
        )
        .await,
        StatusCode::OK
    );
    let again = wait_status(listen, None, Duration::from_secs(60), |r| {
        r.batches.first().is_some_and(|b| b.failed == 2) && sim.handle.tasks().len() == 5
    })
    .await;
    assert!(again.is_some(), "log:\n{}", log_text(&dirs, 0));

    // The console link: once, then 401; its cookie works like the token,
    // and not from another site.
    let link = console_link(&dirs, listen);
    assert!(
        link.starts_with(&format!("http://{listen}/login?ticket=")),
        "{link}"
    );
    let cookie = open_link(&link).await.expect("the link opens");
    assert_eq!(open_link(&link).await, Err(StatusCode::UNAUTHORIZED));
    assert_eq!(
        open_link(&format!("http://{listen}/login?ticket=")).await,
        Err(StatusCode::UNAUTHORIZED)
    );
    assert_eq!(
        post(
            listen,
            retry,
            &[("cookie", &cookie), ("sec-fetch-site", "cross-site")]
        )
        .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post(listen, retry, &[("cookie", "infinitetalk_session=forged")]).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(sim.handle.tasks().len(), 5);
    // Behind a proxy that rewrites Host and says so in X-Forwarded-Host
    // (minting a console link changes nothing that costs).
    let proxied = |forwarded: &'static str| {
        [
            ("cookie", cookie.as_str()),
            ("sec-fetch-site", "same-origin"),
            ("origin", "https://console.example"),
            ("x-forwarded-host", forwarded),
        ]
    };
    assert_eq!(
        post(listen, "/admin/ticket", &proxied("console.example")).await,
        StatusCode::OK
    );
    assert_eq!(
        post(listen, "/admin/ticket", &proxied("other.example")).await,
        StatusCode::FORBIDDEN
    );
    // The console's own page: its origin is the address it was sent to.
    let own_origin = format!("http://127.0.0.1:{}", listen.port());
    assert_eq!(
        post(
            listen,
            retry,
            &[
                ("cookie", &cookie),
                ("sec-fetch-site", "same-origin"),
                ("origin", &own_origin)
            ]
        )
        .await,
        StatusCode::OK
    );
    let third = wait_for(Duration::from_secs(60), || {
        (sim.handle.tasks().len() == 7).then_some(())
    })
    .await;
    assert!(third.is_some(), "log:\n{}", log_text(&dirs, 0));

    // The CLI sends the token from the state folder.
    let _ = wait_status(listen, None, Duration::from_secs(60), |r| {
        r.batches.first().is_some_and(|b| b.failed == 2)
    })
    .await;
    let out = Command::new(BIN)
        .args(["cancel", "b", "--listen", &listen.to_string(), "--state"])
        .arg(&dirs.state)
        .output()
        .expect("cancel runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(terminate(&mut daemon, Duration::from_secs(25)).is_some_and(|s| s.success()));
    let log = log_text(&dirs, 0);
    assert!(!log.contains(&token), "the admin token is logged");
    assert!(!log.contains(&cookie), "a session is logged");
    assert!(
        !log.contains("not-logged-c4llback-s3cret") && log.contains("/callback/REDACTED"),
        "a refused callback path is logged whole: {log}"
    );
    sim.stop().await;
}

/// On a non-loopback address, reading needs the token too; `/metrics` does
/// not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_off_loopback_needs_the_token_to_read() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let port = free_addr().port();
    let listen: SocketAddr = format!("0.0.0.0:{port}").parse().expect("addr");
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &POLL_FAST, 0);
    let token = wait_up(&dirs, listen).await;
    let host = format!("127.0.0.1:{port}");
    let h = [("host", host.as_str())];
    assert_eq!(
        get(listen, "/status", &h).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let bearer = format!("Bearer {token}");
    let bearer = bearer.as_str();
    assert_eq!(
        get(
            listen,
            "/status",
            &[("host", &host), ("authorization", bearer)]
        )
        .await
        .status(),
        StatusCode::OK
    );
    let metrics = get(listen, "/metrics", &h).await;
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(
        metrics
            .text()
            .await
            .expect("body")
            .contains("infinitetalk_rows")
    );
    // Any address of the machine is one of its names; a rebound name is not.
    assert_eq!(
        get(
            listen,
            "/status",
            &[("host", "192.0.2.7"), ("authorization", bearer)]
        )
        .await
        .status(),
        StatusCode::OK
    );
    assert_eq!(
        get(listen, "/metrics", &[("host", "rebound.example")])
            .await
            .status(),
        StatusCode::MISDIRECTED_REQUEST
    );
    // The console's cookie reads too.
    let link = console_link(&dirs, listen);
    assert!(
        link.starts_with(&format!("http://127.0.0.1:{port}/login?ticket=")),
        "{link}"
    );
    let cookie = open_link(&link).await.expect("the link opens");
    assert_eq!(
        get(listen, "/status", &[("host", &host), ("cookie", &cookie)])
            .await
            .status(),
        StatusCode::OK
    );
    // `status` sends the token.
    let out = Command::new(BIN)
        .args([
            "status",
            "--json",
            "--listen",
            &listen.to_string(),
            "--state",
        ])
        .arg(&dirs.state)
        .output()
        .expect("status runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("\"live\": true"), "{text}");
    assert!(terminate(&mut daemon, Duration::from_secs(25)).is_some_and(|s| s.success()));
    sim.stop().await;
}

/// `--callback-listen`: the callback route answers there, alone; the main
/// listener no longer has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_listen_serves_the_callback_route_alone() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    write_manifest(&dirs.inbox, "cb.csv", &failed_rows(3, 0));
    let listen = free_addr();
    let cb = free_addr();
    let mut daemon = spawn_daemon(
        &dirs,
        &sim.url(),
        listen,
        &[
            "--poll-min",
            "100ms",
            "--poll-max",
            "60s",
            "--callback-listen",
            &cb.to_string(),
            "--callback-url",
            &format!("http://{cb}"),
        ],
        0,
    );
    let _token = wait_up(&dirs, listen).await;
    // Callbacks (sent to the callback listener) finish the rows long before
    // the 60 s poll.
    let done = wait_results(&dirs, "cb", Duration::from_secs(40)).await;
    assert!(done, "log:\n{}", log_text(&dirs, 0));
    let tasks = sim.handle.tasks();
    let url = tasks[0].callback_url.clone().expect("callback mode");
    assert!(url.starts_with(&format!("http://{cb}/callback/")), "{url}");
    let path = url
        .strip_prefix(&format!("http://{cb}"))
        .expect("path")
        .to_owned();
    // There: the secret path is the only credential (a bad body is 400).
    assert_eq!(post(cb, &path, &[]).await, StatusCode::BAD_REQUEST);
    assert_eq!(
        post(cb, "/callback/not-the-secret", &[("host", "api.example")]).await,
        StatusCode::FORBIDDEN
    );
    // Nothing else is served there.
    assert_eq!(
        get(cb, "/status", &[]).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(cb, "/metrics", &[]).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        post(cb, "/batches/cb/retry", &[]).await,
        StatusCode::NOT_FOUND
    );
    // The main listener has no callback route.
    assert_eq!(post(listen, &path, &[]).await, StatusCode::NOT_FOUND);
    assert!(terminate(&mut daemon, Duration::from_secs(25)).is_some_and(|s| s.success()));
    sim.stop().await;
}

/// The token file is created private at the first start and kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_is_private_and_kept_across_restarts() {
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let listen = free_addr();
    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &POLL_FAST, 0);
    let first = wait_up(&dirs, listen).await;
    assert!(first.bytes().all(|b| b.is_ascii_hexdigit()), "{first}");
    let path = dirs.state.join("admin-token");
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    assert!(terminate(&mut daemon, Duration::from_secs(25)).is_some_and(|s| s.success()));

    let mut daemon = spawn_daemon(&dirs, &sim.url(), listen, &POLL_FAST, 1);
    let _ = wait_status(listen, None, Duration::from_secs(30), |_| true).await;
    assert_eq!(token(&dirs), first);
    assert_eq!(
        post(
            listen,
            "/admin/ticket",
            &[("authorization", &format!("Bearer {first}"))]
        )
        .await,
        StatusCode::OK
    );
    assert!(terminate(&mut daemon, Duration::from_secs(25)).is_some_and(|s| s.success()));
    sim.stop().await;
}
