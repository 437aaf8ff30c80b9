//! `run`: wires the store, the engine's loops, the inbox watcher and the
//! listener together, and stops them all within `--stop-timeout`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::api::ApiClient;
use crate::config::{ApiKey, Settings};
use crate::dispatch::admit::Admitter;
use crate::dispatch::poll::Poller;
use crate::dispatch::submit::Submitter;
use crate::dispatch::{self, Engine, Inboxes};
use crate::ingest::{self, Folders};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::supervisor::{Beat, GaveUp, Health, Supervisor};
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
    /// The admin token could not be created or read.
    #[error(transparent)]
    AdminToken(#[from] crate::admin::TokenError),
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
    /// The object-store outbox cannot be configured (never a credential's value).
    #[error("outbox: {0}")]
    Outbox(String),
    /// A worker failed too often to go on; systemd should restart us.
    #[error(transparent)]
    GaveUp(GaveUp),
}

fn random_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    ingest::hex(&bytes)
}

/// Binds `--listen` and runs the daemon until `shutdown` is cancelled, then
/// stops gracefully.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), DaemonError> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"), listen = %settings.listen,
        state = %settings.state.display(), "starting"
    );
    // Said before anything can fail.
    if settings.simulate {
        tracing::warn!(
            "SIMULATED RUN (--simulate): no API key is used and nothing is paid; tasks go to the built-in simulator, videos are test patterns, and results.csv marks them simulated"
        );
    }
    let listener =
        std::net::TcpListener::bind(settings.listen).map_err(|source| DaemonError::Listen {
            addr: settings.listen,
            source,
        })?;
    serve(settings, listener, shutdown).await
}

/// Runs the daemon on an already bound listener (tests bind `127.0.0.1:0`)
/// until `shutdown` is cancelled or a worker cannot come back.
pub async fn serve(
    settings: Settings,
    listener: std::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let started = Instant::now();
    for warning in &settings.warnings {
        tracing::warn!("{warning}");
    }
    let settings = Arc::new(settings);
    let folder = |dir: &PathBuf| {
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::Folder {
            path: dir.clone(),
            source,
        })
    };
    folder(&settings.inbox)?;
    // An object-store outbox's staging folder lives under the state folder:
    // made once the store has opened (and versioned) it.
    if settings.outbox_store.is_none() {
        folder(&settings.outbox)?;
    }
    let listen_addr = listener.local_addr().unwrap_or(settings.listen);
    let listen_err = |source| DaemonError::Listen {
        addr: listen_addr,
        source,
    };
    listener.set_nonblocking(true).map_err(listen_err)?;
    let callback_listener = match settings.callback_listen {
        Some(addr) => {
            let bound = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| DaemonError::Listen { addr, source })?;
            Some(bound)
        }
        None => None,
    };
    let state_dir = settings.state.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&state_dir))
        .await
        .map_err(|e| DaemonError::Join(e.to_string()))??;
    if settings.outbox_store.is_some() {
        folder(&settings.outbox)?;
    }
    // A simulated run's spend is kept apart: never counted as real money.
    store.set_simulated_spend(settings.simulate);
    let admin_token = {
        let state_dir = settings.state.clone();
        tokio::task::spawn_blocking(move || crate::admin::load_or_create(&state_dir))
            .await
            .map_err(|e| DaemonError::Join(e.to_string()))??
    };
    let folders = Folders {
        inbox: settings.inbox.clone(),
        outbox: settings.outbox.clone(),
        media: settings.media.clone(),
    };
    {
        let (store, folders) = (store.clone(), folders.clone());
        tokio::task::spawn_blocking(move || ingest::recover(&store, &folders))
            .await
            .map_err(|e| DaemonError::Join(e.to_string()))??;
    }

    // Workers stop on `front_stop` (no restart after it), the engine's
    // tasks on `engine_stop`, cancelled right after.
    let front_stop = CancellationToken::new();
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
    let api = ApiClient::new(http.clone(), &api_base, &key, settings.api_timeout)
        .with_max_retry_after(settings.max_retry_after);
    let secret = store.callback_secret(random_secret)?;
    let callback_url = settings
        .callback_url
        .as_ref()
        .map(|u| format!("{}/callback/{secret}", u.as_str().trim_end_matches('/')));
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);

    let object_store = |target: &crate::outbox::StoreTarget| {
        let vars = std::env::vars().filter(|(k, _)| k.starts_with("AWS_"));
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        crate::outbox::S3Outbox::build(target.clone(), vars, credentials.as_deref())
            .map(Arc::new)
            .map_err(DaemonError::Outbox)
    };
    let outbox = match &settings.outbox_store {
        None => crate::outbox::Outbox::Local,
        Some(target) => crate::outbox::Outbox::S3(object_store(target)?),
    };
    let media_store = match &settings.media.publishing {
        crate::media::Publishing::Store(target) => Some(object_store(target)?),
        _ => None,
    };
    let (engine, inboxes) = Engine::new(
        store.clone(),
        api,
        http,
        settings.clone(),
        folders.clone(),
        outbox,
        metrics.clone(),
        callback_url,
        crate::media::Publisher::with_store(
            &settings.state,
            &settings.media.publishing,
            &secret,
            media_store,
        ),
        engine_stop.clone(),
    )?;
    let requeued = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || dispatch::requeue_interrupted_submits(&engine))
            .await
            .map_err(|e| DaemonError::Join(e.to_string()))??
    };

    // Before any row is submitted: a store that refuses writes pauses
    // submission from the start (and says so, naming the bucket).
    crate::outbox::health::check(&engine).await;
    engine
        .tracker
        .spawn(crate::outbox::health::health_worker(engine.clone()));
    let sup = Supervisor::new(front_stop.clone(), metrics);
    spawn_workers(&sup, &engine, &inboxes);
    {
        let engine = engine.clone();
        let health = sup.health();
        sup.spawn_unwatched("heartbeat", move |_| {
            heartbeat_loop(engine.clone(), health.clone())
        });
    }
    {
        let gate = crate::admin::Gate::new(crate::admin::GateConfig {
            token: admin_token,
            listen: listen_addr,
            callback_url: settings.callback_url.clone(),
            public_urls: match &settings.media.publishing {
                crate::media::Publishing::Url(url) => vec![url.clone()],
                crate::media::Publishing::Off | crate::media::Publishing::Store(_) => Vec::new(),
            },
        });
        let callback_here = callback_listener.is_none();
        if let Some(socket) = callback_listener {
            let router = listener::callback_router(engine.clone(), secret.clone());
            spawn_listener(&sup, "callback listener", router, socket, &front_stop);
        }
        let monitor = crate::console::Monitor::start(engine.clone(), requeued);
        let router = listener::router(
            engine.clone(),
            registry,
            secret,
            &gate,
            callback_here,
            monitor,
        );
        spawn_listener(&sup, "listener", router, listener, &front_stop);
    }
    {
        let engine = engine.clone();
        let config = inbox::InboxConfig {
            folders: folders.clone(),
            settle: Duration::from_secs(1),
            rescan_every: Duration::from_secs(30),
            simulated: settings.simulate,
        };
        let stop = front_stop.clone();
        // A failed watcher (the store refused a write) is restarted by the
        // supervisor: files wait in the inbox meanwhile, nothing is lost.
        sup.spawn_unwatched("inbox", move |_| {
            let (engine, config, stop) = (engine.clone(), config.clone(), stop.clone());
            async move {
                let store = engine.store.clone();
                let watched = inbox::watch(
                    store,
                    config,
                    move |batch| {
                        tracing::info!(batch = %batch.name, rows = batch.total_rows, "batch queued");
                        engine.queue_changed();
                        // The finisher puts its manifest in an object-store outbox.
                        let _ = engine.finished.send(batch.seq);
                    },
                    stop,
                )
                .await;
                if let Err(e) = watched {
                    tracing::error!(error = %e, "inbox watcher failed");
                }
            }
        });
    }

    tracing::info!(
        listen = %listen_addr, callback_listen = ?settings.callback_listen, inbox = %settings.inbox.display(), outbox = %settings.outbox.display(),
        state = %settings.state.display(), max_concurrent = settings.max_concurrent,
        max_requests_per_minute = settings.max_requests_per_minute,
        callbacks = settings.callback_url.is_some(), requeued_after_crash = requeued,
        startup_ms = started.elapsed().as_millis() as u64,
        "daemon ready"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let fatal = sup.fatal();
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = fatal.cancelled() => {}
    }
    let stop_started = Instant::now();
    tracing::info!(timeout = ?settings.stop_timeout, "stopping: no new work; in-flight submits finish");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    front_stop.cancel();
    engine_stop.cancel();
    engine.tracker.close();
    // Keep a margin for the final flush within the stop timeout, never
    // eating into the time a submit in flight may take (`--stop-timeout`
    // exceeds `--api-timeout`: checked at start).
    let margin = Duration::from_millis(500)
        .min(settings.stop_timeout.saturating_sub(settings.api_timeout) / 2);
    let deadline = settings.stop_timeout.saturating_sub(margin);
    let drained = tokio::time::timeout(deadline, async {
        sup.wait().await;
        engine.tracker.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("stop timeout reached with work in flight; it resumes at the next start");
    }
    let ledger = engine.budget.ledger();
    store
        .call(move |s| {
            s.save_ledger(&ledger)?;
            s.flush_blocking()
        })
        .await?;
    sim_stop.cancel();
    if let Some(sim) = sim {
        let _ = tokio::time::timeout(Duration::from_secs(2), sim.stopped()).await;
    }
    tracing::info!(
        took_ms = stop_started.elapsed().as_millis() as u64,
        "stopped"
    );
    match sup.gave_up() {
        Some(gave_up) => Err(DaemonError::GaveUp(gave_up)),
        None => Ok(()),
    }
}

/// Serves `router` on `listener` until `stop`.
fn spawn_listener(
    sup: &Supervisor,
    name: &'static str,
    router: axum::Router,
    listener: std::net::TcpListener,
    stop: &CancellationToken,
) {
    let stop = stop.clone();
    let listener = Arc::new(listener);
    sup.spawn_unwatched(name, move |_| {
        let (router, stop, listener) = (router.clone(), stop.clone(), listener.clone());
        async move {
            let socket = listener
                .try_clone()
                .and_then(tokio::net::TcpListener::from_std);
            let socket = match socket {
                Ok(socket) => socket,
                Err(e) => {
                    tracing::error!(error = %e, listener = name, "cannot take up the listening socket");
                    return;
                }
            };
            let served = axum::serve(socket, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, listener = name, "listener failed");
            }
        }
    });
}

/// The engine's workers, each taking its work up from the store when it
/// (re)starts.
fn spawn_workers(sup: &Supervisor, engine: &Arc<Engine>, inboxes: &Arc<Inboxes>) {
    let e = engine.clone();
    sup.spawn("submit", move |beat| Submitter::new(e.clone(), beat).run());
    if engine.settings.probe {
        let e = engine.clone();
        sup.spawn("admit", move |beat| Admitter::new(e.clone(), beat).run());
    }
    let (e, i) = (engine.clone(), inboxes.clone());
    sup.spawn("poll", move |beat| {
        let (e, i) = (e.clone(), i.clone());
        async move {
            let mut rx = i.poller.lock().await;
            Poller::new(e, beat).run(&mut rx).await;
        }
    });
    let (e, i) = (engine.clone(), inboxes.clone());
    sup.spawn("download", move |beat| {
        let (e, i) = (e.clone(), i.clone());
        async move {
            let mut rx = i.downloads.lock().await;
            download::download_worker(e, &mut rx, beat).await;
        }
    });
    let (e, i) = (engine.clone(), inboxes.clone());
    sup.spawn("results", move |beat| {
        let (e, i) = (e.clone(), i.clone());
        async move {
            let mut rx = i.finished.lock().await;
            results::finish_worker(e, &mut rx, beat).await;
        }
    });
    let e = engine.clone();
    sup.spawn("archive", move |beat| archive_worker(e.clone(), beat));
    let e = engine.clone();
    sup.spawn("ledger", move |beat| save_ledger_loop(e.clone(), beat));
    let e = engine.clone();
    sup.spawn_unwatched("reload", move |_| reload_loop(e.clone()));
}

/// Moves ended rows from the database to the archive, a group at a time
/// (rows ending close together share one sync).
async fn archive_worker(engine: Arc<Engine>, beat: Beat) {
    const GATHER: Duration = Duration::from_millis(250);
    const PER_PASS: usize = 4096;
    loop {
        let woken = tokio::time::timeout(Duration::from_secs(5), engine.ended.notified());
        if beat.wait(&engine.shutdown, woken).await.is_none() {
            break;
        }
        if beat
            .wait(&engine.shutdown, tokio::time::sleep(GATHER))
            .await
            .is_none()
        {
            break;
        }
        match engine.store.call(|s| s.retire(PER_PASS)).await {
            Ok(n) if n == PER_PASS => engine.ended.notify_one(),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot move ended rows to the archive; will retry");
            }
        }
    }
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
async fn save_ledger_loop(engine: Arc<Engine>, beat: Beat) {
    loop {
        let tick = tokio::time::sleep(Duration::from_secs(1));
        if beat.wait(&engine.shutdown, tick).await.is_none() {
            break;
        }
        let ledger = engine.budget.ledger();
        if let Err(e) = engine.store.call(move |s| s.save_ledger(&ledger)).await {
            tracing::error!(error = %e, "cannot save the request ledger");
        }
    }
}

/// STATUS= and WATCHDOG=1 for systemd. WATCHDOG=1 is sent only while every
/// watched worker is seen going round (each stamps its liveness at least
/// every second), so a wedged engine gets restarted rather than kept alive
/// by this timer.
async fn heartbeat_loop(engine: Arc<Engine>, health: Arc<Health>) {
    // STATUS= goes out every few seconds whatever the watchdog's interval, so
    // `systemctl status` follows a batch closely (WatchdogSec=60 alone would
    // refresh it only every 30 s).
    const STATUS_EVERY: Duration = Duration::from_secs(5);
    let watchdog = sd_notify::watchdog_enabled();
    let ping = watchdog.map(|interval| (interval / 2).max(Duration::from_millis(100)));
    let every = ping.map_or(STATUS_EVERY, |p| p.min(STATUS_EVERY));
    // Workers stamp every second; allow for a busy machine. Judged against
    // the watchdog's own pace, not the faster STATUS= tick.
    let fresh = ping.unwrap_or(every).max(Duration::from_secs(3));
    let mut stalled = false;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = engine.shutdown.cancelled() => break,
            _ = tick.tick() => {
                let e = engine.clone();
                let line = tokio::task::spawn_blocking(move || summary_line(&e))
                    .await
                    .unwrap_or_default();
                let mut states = vec![sd_notify::NotifyState::Status(&line)];
                if watchdog.is_some() {
                    match health.stalled(fresh) {
                        None => {
                            states.push(sd_notify::NotifyState::Watchdog);
                            stalled = false;
                        }
                        Some((worker, age)) if !stalled => {
                            stalled = true;
                            tracing::error!(
                                worker, stalled_ms = age.as_millis() as u64,
                                "a worker has not gone round; withholding WATCHDOG=1 so systemd restarts us"
                            );
                        }
                        Some(_) => {}
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
