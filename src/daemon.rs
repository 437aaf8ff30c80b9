//! `run`: wires the store, the engine's loops, the inbox watcher and the
//! listener together, and stops them all within `--stop-timeout`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::api::ApiClient;
use crate::config::{ApiKey, Settings};
use crate::dispatch::{self, Engine};
use crate::ingest::{self, Folders};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::{download, inbox, listener, results, simulator};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot create folder {path}: {source}")]
    Folder {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recovering interrupted ingests: {0}")]
    Recover(#[from] ingest::IngestError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
    #[error("built-in simulator: {0}")]
    Simulator(#[from] simulator::SimError),
    #[error("inbox: {0}")]
    Inbox(#[from] inbox::InboxError),
    #[error("a background task failed: {0}")]
    Join(String),
}

fn random_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    ingest::hex(&bytes)
}

/// Runs the daemon until `shutdown` is cancelled, then stops gracefully.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let started = Instant::now();
    if settings.simulate {
        tracing::warn!(
            "SIMULATED RUN (--simulate): no API key is used and nothing is paid; tasks go to the built-in simulator, videos are test patterns, and results.csv marks them simulated"
        );
    }
    let settings = Arc::new(settings);
    for dir in [&settings.inbox, &settings.outbox] {
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::Folder {
            path: dir.clone(),
            source,
        })?;
    }
    let state_dir = settings.state.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&state_dir))
        .await
        .map_err(|e| DaemonError::Join(e.to_string()))??;
    let folders = Folders {
        inbox: settings.inbox.clone(),
        outbox: settings.outbox.clone(),
    };
    {
        let (store, folders) = (store.clone(), folders.clone());
        tokio::task::spawn_blocking(move || ingest::recover(&store, &folders))
            .await
            .map_err(|e| DaemonError::Join(e.to_string()))??;
    }

    // The engine's own token: cancelled after the listener and inbox stop.
    let engine_stop = CancellationToken::new();
    let sim_stop = CancellationToken::new();
    let (api_base, key, sim) = if settings.simulate {
        let sim = simulator::start_in_process(&settings.state, sim_stop.clone()).await?;
        tracing::info!(simulator = %sim.base_url(), "built-in simulator serving");
        (sim.base_url(), ApiKey::new("simulated"), Some(sim))
    } else {
        let key = settings
            .api_key
            .clone()
            .ok_or_else(|| DaemonError::Http("no API key".into()))?;
        (settings.api_base.clone(), key, None)
    };

    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .user_agent(concat!("infinitetalk-batch/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| DaemonError::Http(e.to_string()))?;
    let api = ApiClient::new(http.clone(), &api_base, &key, settings.api_timeout);
    let secret = store.callback_secret(random_secret)?;
    let callback_url = settings
        .callback_url
        .as_ref()
        .map(|u| format!("{}/callback/{secret}", u.as_str().trim_end_matches('/')));
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);

    let (engine, inboxes) = Engine::new(
        store.clone(),
        api,
        http,
        settings.clone(),
        folders.clone(),
        metrics,
        callback_url,
        engine_stop.clone(),
    )?;

    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: settings.listen,
            source,
        })?;
    let listen_addr = listener.local_addr().unwrap_or(settings.listen);

    let requeued = dispatch::resume(&engine)?;
    let loops = tokio_util::task::TaskTracker::new();
    loops.spawn(dispatch::submit_loop(engine.clone()));
    loops.spawn(dispatch::poll_loop(engine.clone(), inboxes.poller));
    loops.spawn(download::download_loop(engine.clone(), inboxes.downloads));
    loops.spawn(results::finish_loop(engine.clone(), inboxes.finished));
    loops.spawn(save_ledger_loop(engine.clone()));
    loops.spawn(heartbeat_loop(engine.clone()));
    loops.spawn(reload_loop(engine.clone()));

    let front_stop = CancellationToken::new();
    {
        let router = listener::router(engine.clone(), registry, secret);
        let stop = front_stop.clone();
        loops.spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "listener failed");
            }
        });
    }
    let inbox_task = {
        let engine = engine.clone();
        let config = inbox::InboxConfig {
            folders: folders.clone(),
            settle: Duration::from_secs(1),
            rescan_every: Duration::from_secs(30),
            simulated: settings.simulate,
        };
        let stop = front_stop.clone();
        let store = store.clone();
        tokio::spawn(async move {
            // A failed watcher (the store refused a write) is restarted with
            // backoff: files wait in the inbox meanwhile, nothing is lost.
            let mut failures = 0u32;
            loop {
                let engine = engine.clone();
                let watched = inbox::watch(
                    store.clone(),
                    config.clone(),
                    move |batch| {
                        tracing::info!(batch = %batch.name, rows = batch.total_rows, "batch queued");
                        engine.work.notify_one();
                    },
                    stop.clone(),
                )
                .await;
                match watched {
                    Ok(()) => break,
                    Err(e) => {
                        failures += 1;
                        let wait = dispatch::backoff(
                            failures,
                            Duration::from_secs(1),
                            Duration::from_secs(60),
                        );
                        tracing::error!(error = %e, retry_in = ?wait, "inbox watcher failed; restarting it");
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = stop.cancelled() => break,
                        }
                    }
                }
            }
        })
    };

    tracing::info!(
        listen = %listen_addr, inbox = %settings.inbox.display(), outbox = %settings.outbox.display(),
        state = %settings.state.display(), max_concurrent = settings.max_concurrent,
        max_requests_per_minute = settings.max_requests_per_minute,
        callbacks = settings.callback_url.is_some(), requeued_after_crash = requeued,
        startup_ms = started.elapsed().as_millis() as u64,
        "daemon ready"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    shutdown.cancelled().await;
    let stop_started = Instant::now();
    tracing::info!(timeout = ?settings.stop_timeout, "stopping: no new work; in-flight submits finish");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    front_stop.cancel();
    engine_stop.cancel();
    loops.close();
    engine.tracker.close();
    // Keep a margin for the final flush within the stop timeout.
    let deadline = settings
        .stop_timeout
        .saturating_sub(Duration::from_millis(500));
    let drained = tokio::time::timeout(deadline, async {
        loops.wait().await;
        engine.tracker.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("stop timeout reached with work in flight; it resumes at the next start");
    }
    inbox_task.abort();
    let _ = store.save_ledger(&engine.budget.ledger());
    store.flush().await?;
    sim_stop.cancel();
    if let Some(sim) = sim {
        let _ = tokio::time::timeout(Duration::from_secs(2), sim.stopped()).await;
    }
    tracing::info!(
        took_ms = stop_started.elapsed().as_millis() as u64,
        "stopped"
    );
    Ok(())
}

/// SIGHUP re-reads the config file's `max-spend-usd`: raising the cap
/// resumes submission without a restart.
async fn reload_loop(engine: Arc<Engine>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; config reload disabled");
        return;
    };
    loop {
        tokio::select! {
            () = engine.shutdown.cancelled() => break,
            got = hup.recv() => {
                if got.is_none() {
                    break;
                }
                match crate::config::reloaded_spend_cap(&engine.settings) {
                    Ok(Some(cap)) => {
                        tracing::info!(cap_usd = ?cap, "SIGHUP: spend cap reloaded from the config file");
                        engine.set_spend_cap(cap);
                    }
                    Ok(None) => tracing::info!("SIGHUP: nothing to reload (no --config file, or --max-spend-usd given as a flag)"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: config not reloaded; keeping the current settings"),
                }
            }
        }
    }
}

/// Saves what the request budget spent, every second, so a restart does not
/// start with a full window.
async fn save_ledger_loop(engine: Arc<Engine>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = engine.shutdown.cancelled() => break,
            _ = tick.tick() => {
                if let Err(e) = engine.store.save_ledger(&engine.budget.ledger()) {
                    tracing::error!(error = %e, "cannot save the request ledger");
                }
            }
        }
    }
}

/// STATUS= and WATCHDOG=1 for systemd. WATCHDOG=1 is sent only while the
/// poll loop is seen going round (it stamps its liveness at least every
/// second), so a wedged engine gets restarted rather than kept alive by this
/// timer.
async fn heartbeat_loop(engine: Arc<Engine>) {
    // STATUS= goes out every few seconds whatever the watchdog's interval, so
    // `systemctl status` follows a batch closely (WatchdogSec=60 alone would
    // refresh it only every 30 s).
    const STATUS_EVERY: Duration = Duration::from_secs(5);
    let watchdog = sd_notify::watchdog_enabled();
    let ping = watchdog.map(|interval| (interval / 2).max(Duration::from_millis(100)));
    let every = ping.map_or(STATUS_EVERY, |p| p.min(STATUS_EVERY));
    // The poll loop wakes every second; allow for a busy machine. Judged
    // against the watchdog's own pace, not the faster STATUS= tick.
    let fresh = ping.unwrap_or(every).max(Duration::from_secs(3));
    let mut stalled = false;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = engine.shutdown.cancelled() => break,
            _ = tick.tick() => {
                let line = summary_line(&engine);
                let mut states = vec![sd_notify::NotifyState::Status(&line)];
                if watchdog.is_some() {
                    let age = engine.poll_loop_age();
                    if age <= fresh {
                        states.push(sd_notify::NotifyState::Watchdog);
                        stalled = false;
                    } else if !stalled {
                        stalled = true;
                        tracing::error!(
                            stalled_ms = age.as_millis() as u64,
                            "the poll loop has not gone round; withholding WATCHDOG=1 so systemd restarts us"
                        );
                    }
                }
                let _ = sd_notify::notify(&states);
            }
        }
    }
}

/// One line: queued / in flight / downloading / done / failed / pause.
pub fn summary_line(engine: &Engine) -> String {
    let report = listener::live_report(engine);
    let sum = |f: fn(&crate::status::BatchStatus) -> u64| report.batches.iter().map(f).sum::<u64>();
    let mut line = format!(
        "queued {} / in flight {} / downloading {} / done {} / failed {}",
        sum(|b| b.queued),
        sum(|b| b.in_flight),
        sum(|b| b.downloading),
        sum(|b| b.done),
        sum(|b| b.failed)
    );
    if let Some(reason) = &report.paused {
        line.push_str(&format!(" / PAUSED: {reason}"));
    }
    line
}
