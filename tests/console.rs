//! The console in a real browser (Debian's chromium through chromedriver,
//! driven over WebDriver by fantoccini) against the real daemon and the
//! simulator: the one-time link, a manifest dropped through the page and
//! its batch progressing live, a video that plays, pause / retry / cancel
//! with confirmation, the same actions refused without the session cookie
//! and from a page of another origin, and a row found by id in a
//! 100,000-row batch.
//!
//! Without chromium and chromedriver the tests print a SKIP line and pass.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use infinitetalk_batch::status::Report;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const DRIVER: &str = "/usr/bin/chromedriver";
/// Longest wait for anything the page should show.
const WAIT: Duration = Duration::from_secs(30);
/// WebDriver's codes of keys; RELEASE lets go of the modifiers held.
const TAB: &str = "\u{E004}";
const ENTER: &str = "\u{E007}";
const ESCAPE: &str = "\u{E00C}";
const SHIFT: &str = "\u{E008}";
const RELEASE: &str = "\u{E000}";

/// chromedriver on a free loopback port, and one browser session on it.
struct Browser {
    driver: Child,
    client: Option<Client>,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill9(&mut self.driver);
    }
}

fn browser_missing() -> bool {
    if Path::new(CHROMIUM).exists() && Path::new(DRIVER).exists() {
        return false;
    }
    eprintln!(
        "SKIP console browser tests: {CHROMIUM} or {DRIVER} missing (apt-get install -y --no-install-recommends chromium chromium-driver)"
    );
    true
}

impl Browser {
    async fn start() -> Browser {
        let port = free_addr().port();
        let driver = Command::new(DRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let up = wait_for(Duration::from_secs(15), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .await;
        assert!(up.is_some(), "chromedriver listens on {port}");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--window-size=1280,800",
                    "--autoplay-policy=no-user-gesture-required",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }),
        );
        let client = ClientBuilder::rustls()
            .expect("rustls")
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("browser session");
        // A page that does not load within WAIT is a failure, not a wait:
        // the browser's own default is five minutes.
        client
            .update_timeouts(fantoccini::wd::TimeoutConfiguration::new(
                None,
                Some(WAIT),
                None,
            ))
            .await
            .expect("page-load timeout");
        Browser {
            driver,
            client: Some(client),
            _profile: profile,
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().expect("session")
    }

    async fn goto(&self, url: &str) {
        self.c().goto(url).await.expect("navigate");
    }

    async fn js(&self, script: &str) -> Value {
        self.c().execute(script, vec![]).await.expect("script runs")
    }

    /// Runs `script` every 100 ms until it returns something truthy.
    async fn until(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.js(script).await;
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, css: &str) {
        self.c()
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Presses `key` (a WebDriver key code) on whatever has the focus.
    async fn press(&self, key: &str) {
        self.c()
            .active_element()
            .await
            .expect("a focused element")
            .send_keys(key)
            .await
            .unwrap_or_else(|e| panic!("key {key:?}: {e}"));
    }

    /// Moves the focus with Tab alone, as a keyboard user would, until it is
    /// on `css`; the element must show that it has the focus.
    async fn tab_to(&self, css: &str) {
        let on = format!(
            "const a = document.activeElement; return !!a && a.matches({css:?}) && a.matches(':focus-visible')"
        );
        for _ in 0..120 {
            if self.js(&on).await == json!(true) {
                return;
            }
            self.press(TAB).await;
        }
        panic!("{css} is not reached with Tab (or shows no focus)");
    }

    async fn stop(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

async fn status(listen: SocketAddr) -> Option<Report> {
    let resp = http()
        .get(format!("http://{listen}/status"))
        .send()
        .await
        .ok()?;
    resp.json().await.ok()
}

async fn wait_up(dirs: &Dirs, listen: SocketAddr) {
    let path = dirs.state.join("admin-token");
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if path.exists() && status(listen).await.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("daemon did not come up:\n{}", log_text(dirs, 0));
}

/// A one-time console link, as `infinitetalk-batch console` prints it.
async fn console_link(dirs: &Dirs, listen: SocketAddr) -> String {
    let out = Command::new(BIN)
        .args(["console", "--listen", &listen.to_string(), "--state"])
        .arg(&dirs.state)
        .output()
        .expect("console command runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("a link in {text:?}"))
        .to_owned()
}

async fn batch_state(listen: SocketAddr, name: &str) -> infinitetalk_batch::status::BatchStatus {
    status(listen)
        .await
        .expect("status")
        .batches
        .into_iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("batch {name}"))
}

/// The whole console: link, drop, live progress, video, actions, refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_browser() {
    if browser_missing() {
        return;
    }
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let listen = free_addr();
    let _daemon = spawn_daemon(&dirs, &sim.url(), listen, &POLL, 0);
    wait_up(&dirs, listen).await;
    let base = format!("http://{listen}");
    let b = Browser::start().await;

    // The one-time link sets the session and lands on the overview.
    b.goto(&console_link(&dirs, listen).await).await;
    let url = b.c().current_url().await.expect("url");
    assert_eq!(url.path(), "/", "the link redirects to the overview");
    b.until(
        "the live stream",
        "return document.querySelector('#live').dataset.state === 'live'",
    )
    .await;
    // Marks this page: a reload would lose it.
    b.js("window.__same_page = true; return true").await;

    // A manifest dropped through the page: 6 rows, one that fails.
    let mut rows = rows("d", 6, |i| format!("sim_audio_seconds={}", 2 + i));
    rows[5].2.push_str("&sim_fail=CONTENT_VIOLATION");
    let upload_dir = tempfile::tempdir().expect("tempdir");
    let file = write_manifest(upload_dir.path(), "dropped.csv", &rows);
    b.c()
        .find(Locator::Css("#manifest-file"))
        .await
        .expect("file input")
        .send_keys(&file.display().to_string())
        .await
        .expect("file chosen");
    let said = b
        .until("the check's answer", "const b = document.querySelector('#drop-accept'); return b && document.querySelector('#drop-result').textContent")
        .await;
    assert!(said.as_str().expect("text").contains("6 row(s)"), "{said}");
    b.click("#drop-accept").await;
    b.until(
        "accepted",
        "const a = document.querySelector('#drop-result a'); return a && a.textContent",
    )
    .await;

    // The batch appears and progresses on the same page, without a reload.
    b.until(
        "the batch finishes live",
        "const r = document.querySelector('tr[data-batch=dropped]'); return r && r.querySelector('[data-count=done]').textContent === '5' && r.querySelector('[data-count=failed]').textContent === '1'",
    )
    .await;
    assert_eq!(
        b.js("return window.__same_page === true").await,
        json!(true),
        "live, not reloaded"
    );
    assert!(
        dirs.inbox
            .join(".console")
            .read_dir()
            .map_or(0, |d| d.count())
            == 0,
        "nothing left staged"
    );

    // The same bytes again: said before accepting, refused as the inbox
    // refuses them. A broken manifest: every error line shown.
    let choose = |path: std::path::PathBuf| {
        let c = b.c().clone();
        async move {
            c.find(Locator::Css("#manifest-file"))
                .await
                .expect("file input")
                .send_keys(&path.display().to_string())
                .await
                .expect("file chosen");
        }
    };
    choose(file.clone()).await;
    let said = b
        .until("duplicate noticed", "const b = document.querySelector('#drop-accept'); return b && document.querySelector('#drop-result').textContent")
        .await;
    assert!(
        said.as_str()
            .expect("text")
            .contains("accepted before as batch dropped"),
        "{said}"
    );
    b.click("#drop-accept").await;
    let said = b
        .until("duplicate refused", "const r = document.querySelector('#drop-result'); return r.textContent.includes('Rejected') && r.textContent")
        .await;
    assert!(
        said.as_str()
            .expect("text")
            .contains("identical to a manifest already accepted"),
        "{said}"
    );
    assert!(
        dirs.inbox.join("rejected/dropped.errors.txt").exists(),
        "rejected like an inbox file"
    );
    let broken = upload_dir.path().join("broken.csv");
    std::fs::write(&broken, "id,image_url,audio_url\nok,https://x.test/a.png,https://x.test/a.mp3\nbad id,ftp://x.test/b.png,https://x.test/b.mp3\n")
        .expect("write");
    choose(broken).await;
    let lines = b
        .until("error lines", "const l = document.querySelectorAll('#drop-result ol.errors li'); return l.length && Array.from(l).map(x => x.textContent).join('|')")
        .await;
    let lines = lines.as_str().expect("text");
    assert!(
        lines.contains("line 3: column id:") && lines.contains("line 3: column image_url:"),
        "{lines}"
    );
    assert_eq!(
        b.js("return !!document.querySelector('#drop-accept')")
            .await,
        json!(false),
        "nothing to accept"
    );

    // A row's page plays its video (the simulator's outputs are real MP4s).
    b.goto(&format!("{base}/batches/dropped/rows/d0")).await;
    let duration = b
        .until(
            "the video's duration",
            "const v = document.querySelector('video'); return v && v.readyState >= 1 && isFinite(v.duration) && v.duration",
        )
        .await;
    assert!(duration.as_f64().expect("number") > 0.0, "{duration}");

    // Retry the failed row: its cost is shown first.
    b.goto(&format!("{base}/batches/dropped")).await;
    let cost = b
        .until(
            "retry cost",
            "return document.querySelector('#retry-cost').textContent",
        )
        .await;
    assert!(
        cost.as_str()
            .expect("text")
            .starts_with("1 row(s), at least $0.15"),
        "{cost}"
    );
    b.click("#retry-button").await;
    let said = b.until("retry answer", "const t = document.querySelector('#toast'); return t.className === 'show' && t.textContent").await;
    assert!(
        said.as_str().expect("text").contains("queued again: 1"),
        "{said}"
    );

    // Pause, then cancel with a confirmation, on a batch that is still
    // waiting (written to the inbox: paused at once through the page).
    let slow = rows_with("s", 40);
    write_manifest(&dirs.inbox, "slow.csv", &slow);
    let deadline = Instant::now() + WAIT;
    while status(listen)
        .await
        .is_none_or(|r| !r.batches.iter().any(|b| b.name == "slow"))
    {
        assert!(Instant::now() < deadline, "slow batch accepted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.goto(&format!("{base}/batches/slow")).await;
    b.click("button[data-action=pause]").await;
    b.until(
        "paused live",
        "const s = document.querySelector('#batch-state'); return s && s.dataset.paused === 'true'",
    )
    .await;
    assert!(batch_state(listen, "slow").await.paused);
    // The cancel, by keyboard alone: Tab to it, Enter; the confirmation
    // takes the focus on its "No", and gives it back when closed.
    let shown =
        "const c = document.querySelector('#cancel-confirm'); return !c.hidden && c.textContent";
    let focused = |css: &str| format!("return document.activeElement.matches({css:?})");
    let ask = "button[data-action=cancel-ask]";
    b.tab_to(ask).await;
    b.press(ENTER).await;
    let asked = b.until("confirmation shown", shown).await;
    assert!(
        asked
            .as_str()
            .expect("text")
            .contains("queued row(s) end failed"),
        "{asked}"
    );
    assert_eq!(
        b.js(&focused("button[data-action=cancel-no]")).await,
        json!(true),
        "the confirmation's No has the focus"
    );
    // "No" keeps it, and so does Escape.
    b.press(ENTER).await;
    let closed = "return document.querySelector('#cancel-confirm').hidden";
    assert_eq!(b.js(closed).await, json!(true));
    assert_eq!(b.js(&focused(ask)).await, json!(true), "focus back");
    b.press(ENTER).await;
    b.until("confirmation shown again", shown).await;
    b.press(ESCAPE).await;
    assert_eq!(b.js(closed).await, json!(true), "Escape closes it");
    assert_eq!(b.js(&focused(ask)).await, json!(true), "focus back");
    assert!(!batch_state(listen, "slow").await.cancelled);
    // Yes comes just before No.
    b.press(ENTER).await;
    b.until("confirmation shown once more", shown).await;
    b.press(&format!("{SHIFT}{TAB}{RELEASE}")).await;
    assert_eq!(
        b.js(&focused("button[data-action=cancel]")).await,
        json!(true),
        "Shift+Tab reaches Yes"
    );
    b.press(ENTER).await;
    let deadline = Instant::now() + WAIT;
    while !batch_state(listen, "slow").await.cancelled {
        assert!(Instant::now() < deadline, "cancelled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // At phone width nothing runs off the side: no page scrolls sideways.
    b.c()
        .set_window_size(390, 844)
        .await
        .expect("phone-sized window");
    for page in [
        "/",
        "/batches/dropped",
        "/batches/dropped/rows/d5",
        "/rejected",
    ] {
        b.goto(&format!("{base}{page}")).await;
        let widths = b
            .js("return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            .await;
        let (scroll, client) = (widths[0].as_u64(), widths[1].as_u64());
        assert!(
            scroll
                .zip(client)
                .is_some_and(|(s, c)| c > 0 && c <= 400 && s <= c),
            "{page} at phone width: scroll and client widths {widths}"
        );
    }
    b.stop().await;

    // A browser without the session: the page reads, the actions are refused.
    let other = Browser::start().await;
    other.goto(&format!("{base}/batches/dropped")).await;
    other.click("button[data-action=pause]").await;
    let said = other.until("refusal shown", "const t = document.querySelector('#toast'); return t.className.includes('bad') && t.textContent").await;
    assert!(
        said.as_str().expect("text").contains("not allowed"),
        "{said}"
    );
    assert!(
        !batch_state(listen, "dropped").await.paused,
        "nothing changed without the cookie"
    );

    // A page of another origin cannot act, even with the session cookie
    // in the browser (another port of 127.0.0.1 is the same site, so the
    // SameSite cookie goes along: the Origin check refuses it).
    other.goto(&console_link(&dirs, listen).await).await;
    let evil = EvilSite::start(listen).await;
    other.goto(&evil.url).await;
    other
        .until("the other site's form was refused", "return document.body && document.body.textContent.includes('cross-site request refused')")
        .await;
    other.goto(&format!("{}/fetch", evil.url)).await;
    let fetched = other
        .until("the other site's fetch settled", "return window.__done")
        .await;
    assert_eq!(fetched, json!("settled"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !batch_state(listen, "dropped").await.paused,
        "nothing changed from another origin"
    );
    // The same browser, on the console itself, may.
    other.goto(&format!("{base}/batches/dropped")).await;
    other.click("button[data-action=pause]").await;
    let deadline = Instant::now() + WAIT;
    while !batch_state(listen, "dropped").await.paused {
        assert!(
            Instant::now() < deadline,
            "paused from the console's own page"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    other.stop().await;
    evil.stop.cancel();
    sim.stop().await;
}

/// Rows whose tasks take long enough to stay queued during the test.
fn rows_with(prefix: &str, n: usize) -> Vec<(String, String, String)> {
    rows(prefix, n, |_| "sim_audio_seconds=600".into())
}

/// A page on another origin that tries to pause batch `dropped`.
struct EvilSite {
    url: String,
    stop: tokio_util::sync::CancellationToken,
}

impl EvilSite {
    async fn start(target: SocketAddr) -> EvilSite {
        use axum::response::Html;
        let action = format!("http://{target}/batches/dropped/pause");
        let form = format!(
            "<!doctype html><form id=f method=post action='{action}'></form><script>document.getElementById('f').submit()</script>"
        );
        let fetch = format!(
            "<!doctype html><script>fetch('{action}', {{method: 'POST', credentials: 'include', mode: 'no-cors'}}).finally(() => {{ window.__done = 'settled'; }})</script>"
        );
        let app = axum::Router::new()
            .route("/", axum::routing::get(move || async move { Html(form) }))
            .route(
                "/fetch",
                axum::routing::get(move || async move { Html(fetch) }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await;
        });
        EvilSite {
            url: format!("http://{addr}"),
            stop,
        }
    }
}

/// A row found by id in a batch of 100,000 rows, and its page opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_a_row_in_a_large_batch() {
    if browser_missing() {
        return;
    }
    let sim = Sim::start(fast_sim()).await;
    let dirs = Dirs::new();
    let listen = free_addr();
    let extra = with_poll(&["--max-concurrent", "4", "--max-requests-per-minute", "120"]);
    let _daemon = spawn_daemon(&dirs, &sim.url(), listen, &extra, 0);
    wait_up(&dirs, listen).await;
    let big = rows("row-", 100_000, |_| "sim_audio_seconds=600".into());
    write_manifest(&dirs.inbox, "big.csv", &big);
    let deadline = Instant::now() + WAIT;
    while status(listen)
        .await
        .is_none_or(|r| !r.batches.iter().any(|b| b.name == "big"))
    {
        assert!(
            Instant::now() < deadline,
            "big batch accepted:\n{}",
            log_text(&dirs, 0)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = Browser::start().await;
    let base = format!("http://{listen}");
    let opened = Instant::now();
    b.goto(&format!("{base}/batches/big")).await;
    b.until(
        "first page of rows",
        "return document.querySelectorAll('tr[data-row-id]').length === 50",
    )
    .await;
    eprintln!("first page of a 100,000-row batch: {:?}", opened.elapsed());
    // Deep pages open too (the manifest is read once, then remembered).
    b.goto(&format!("{base}/batches/big?after=99990")).await;
    let last = b.until("last rows", "const r = document.querySelectorAll('tr[data-row-id]'); return r.length && r[r.length - 1].dataset.rowId").await;
    assert_eq!(last, json!("row-99999"));

    b.goto(&format!("{base}/batches/big")).await;
    let q = b.c().find(Locator::Css("#q")).await.expect("search box");
    q.send_keys("row-77777").await.expect("typed");
    q.send_keys("\u{E007}").await.expect("enter");
    let found = b
        .until("search result", "const r = document.querySelectorAll('tr[data-row-id]'); return r.length && Array.from(r).map(x => x.dataset.rowId).join(',')")
        .await;
    assert_eq!(
        found,
        json!("row-77777"),
        "exact match only (no other id contains it)"
    );
    b.click("tr[data-row-id='row-77777'] a").await;
    let facts = b
        .until(
            "row page",
            "const d = document.querySelector('dl.facts'); return d && d.textContent",
        )
        .await;
    assert!(
        facts.as_str().expect("text").contains("77778 / line 77779"),
        "{facts}"
    );

    // An open page reconnects by itself after a daemon restart, and shows
    // what happens afterwards without a reload.
    b.goto(&format!("{base}/")).await;
    b.until(
        "live",
        "return document.querySelector('#live').dataset.state === 'live'",
    )
    .await;
    b.js("window.__same_page = true; return true").await;
    let mut daemon = _daemon;
    let stopped = Instant::now();
    assert!(
        terminate(&mut daemon, Duration::from_secs(20)).is_some_and(|s| s.success()),
        "a graceful stop with a console open"
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "an open stream does not hold the stop: {:?}",
        stopped.elapsed()
    );
    b.until(
        "the page sees the daemon gone",
        "return document.querySelector('#live').dataset.state === 'down'",
    )
    .await;
    let _daemon = spawn_daemon(&dirs, &sim.url(), listen, &extra, 1);
    write_manifest(
        &dirs.inbox,
        "after.csv",
        &rows("a", 2, |_| "sim_audio_seconds=1".into()),
    );
    b.until("reconnected and updated", "return document.querySelector('#live').dataset.state === 'live' && !!document.querySelector('tr[data-batch=after]')").await;
    assert_eq!(
        b.js("return window.__same_page === true").await,
        json!(true),
        "no reload"
    );
    b.stop().await;
    sim.stop().await;
}
