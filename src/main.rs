//! The binary: parse, install logging, load settings, run one command.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use infinitetalk_batch::cli::{
    Cli, Command, ConsoleArgs, DaemonArgs, LogFormat, StatusArgs, ValidateArgs,
};
use infinitetalk_batch::config::{Environment, FileSettings, Settings, default_listen};
use infinitetalk_batch::manifest::{self, ManifestError};
use infinitetalk_batch::spec::RowDefaults;
use infinitetalk_batch::{admin, daemon, manage, probe, simulator, status, store};
use tokio_util::sync::CancellationToken;

/// Exit codes: systemd skips restarts on a configuration error.
const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            limit_malloc_arenas();
            let settings = match Settings::resolve(&args, &Environment::from_process()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("infinitetalk-batch: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging(settings.log_format);
            runtime(|| async move {
                let shutdown = CancellationToken::new();
                let signals = tokio::spawn(watch_signals(shutdown.clone()));
                let result = daemon::run(settings, shutdown).await;
                signals.abort();
                match result {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %e, "daemon failed");
                        ExitCode::from(EXIT_RUNTIME)
                    }
                }
            })
        }
        Command::Validate(args) => validate(&args),
        Command::Status(args) => runtime(|| show_status(args)),
        Command::Retry(args) => {
            let req = manage::RetryRequest { codes: args.codes };
            runtime(|| manage_batch(args.daemon, args.batch, Some(req)))
        }
        Command::Cancel(args) => runtime(|| manage_batch(args.daemon, args.batch, None)),
        Command::Console(args) => runtime(|| console(args)),
        Command::Simulate(args) => {
            init_logging(LogFormat::Text);
            runtime(|| async move {
                match simulator::run_standalone(args.listen, args.sim).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("infinitetalk-batch simulate: {e:#}");
                        ExitCode::from(EXIT_RUNTIME)
                    }
                }
            })
        }
    }
}

/// glibc's malloc gives busy threads arenas of their own and keeps what was
/// freed in each: over a long run that held 30+ MB more than the daemon uses
/// (BENCHMARKS.md, `soak_bench`: 78.6 MB peak and growing, against 45.8 MB
/// flat with two arenas). glibc reads `MALLOC_ARENA_MAX` only when a process
/// starts, so `run` executes itself again once with it set: same PID, same
/// arguments. An operator's own value is left alone.
fn limit_malloc_arenas() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "MALLOC_ARENA_MAX";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(VAR, "2")
        .exec();
    eprintln!("infinitetalk-batch: cannot run again with {VAR}=2 ({err}); going on without it");
}

/// Threads for blocking calls (sled, files); they queue beyond this.
const MAX_BLOCKING_THREADS: usize = 8;

fn runtime<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    // Store calls and file I/O run on the blocking pool. Left at tokio's
    // default (512) it grew to hundreds of threads under load, each with its
    // own stack and allocator arena: 190 MB of RSS where 30 would do.
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt.block_on(f()),
        Err(e) => {
            eprintln!("infinitetalk-batch: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// SIGTERM or SIGINT starts a graceful stop; a second one exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("infinitetalk-batch: second signal, exiting now (state is safe on disk)");
    std::process::exit(130);
}

fn validate(args: &ValidateArgs) -> ExitCode {
    match manifest::validate_path(&args.file) {
        Ok(summary) => {
            let defaults = RowDefaults::default();
            if !args.probe {
                println!("{}: valid", args.file.display());
            }
            println!("rows: {}", summary.rows);
            for (res, n) in &summary.by_resolution {
                let label = match res {
                    Some(r) => r.to_string(),
                    None => format!("default ({})", defaults.resolution),
                };
                println!("resolution {label}: {n}");
            }
            if !summary.extra_columns.is_empty() {
                println!(
                    "extra columns carried to results.csv: {}",
                    summary.extra_columns.join(", ")
                );
            }
            if args.probe {
                return runtime(|| probe_costs(args, defaults));
            }
            println!(
                "minimum cost: ${:.2} (5 s billed per row at its resolution's rate; the real cost depends on the audio length)",
                summary.min_cost_usd(&defaults)
            );
            ExitCode::SUCCESS
        }
        Err(ManifestError::Invalid { problems, .. }) => {
            for p in &problems {
                println!("{p}");
            }
            eprintln!(
                "{}: invalid ({} problem(s)); nothing would be submitted",
                args.file.display(),
                problems.len()
            );
            ExitCode::from(1)
        }
        Err(e @ ManifestError::Io { .. }) => {
            eprintln!("infinitetalk-batch validate: {e}");
            ExitCode::from(1)
        }
    }
}

/// `validate --probe`: every row's audio read for its exact cost.
async fn probe_costs(args: &ValidateArgs, defaults: RowDefaults) -> ExitCode {
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("infinitetalk-batch validate: cannot build the HTTP client: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let prober = probe::Prober::new(
        http,
        Duration::from_secs(30),
        probe::DEFAULT_PROBES_IN_FLIGHT,
    );
    let estimate = match probe::estimate_manifest(
        &args.file,
        &defaults,
        &prober,
        probe::DEFAULT_PROBES_IN_FLIGHT,
    )
    .await
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("infinitetalk-batch validate: {e}");
            return ExitCode::from(1);
        }
    };
    if !estimate.problems.is_empty() {
        for p in &estimate.problems {
            println!("{p}");
        }
        eprintln!(
            "{}: invalid ({} problem(s)); nothing would be submitted",
            args.file.display(),
            estimate.problems.len()
        );
        return ExitCode::from(1);
    }
    for (res, (rows, seconds, usd)) in &estimate.by_resolution {
        println!("cost at {res}: ${usd:.2} ({rows} row(s), {seconds:.1} s of audio)");
    }
    println!(
        "estimated cost: ${:.2} (audio lengths read from each file; billed per second, minimum 5 s per row)",
        estimate.total_usd()
    );
    println!("{}: valid", args.file.display());
    if estimate.long_rows > 0 {
        println!(
            "warning: {} row(s) have audio over 60 s; the model's quality is known to drift on long clips",
            estimate.long_rows
        );
    }
    ExitCode::SUCCESS
}

/// `retry` (with a request) or `cancel`: the daemon first, else the state folder.
async fn manage_batch(
    args: DaemonArgs,
    batch: String,
    retry: Option<manage::RetryRequest>,
) -> ExitCode {
    let what = if retry.is_some() { "retry" } else { "cancel" };
    let file = match &args.config {
        Some(path) => match FileSettings::load(path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("infinitetalk-batch {what}: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => FileSettings::default(),
    };
    let listen = args.listen.or(file.listen).unwrap_or_else(default_listen);
    let folders = infinitetalk_batch::ingest::Folders {
        inbox: file.inbox.unwrap_or_else(|| "inbox".into()),
        outbox: args
            .outbox
            .or(file.outbox)
            .unwrap_or_else(|| "outbox".into()),
    };
    let state = args.state.or(file.state).unwrap_or_else(|| "state".into());
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .connect_timeout(Duration::from_secs(3))
        .build()
    else {
        eprintln!("infinitetalk-batch {what}: cannot build the HTTP client");
        return ExitCode::from(EXIT_RUNTIME);
    };
    let Ok(mut url) = url::Url::parse(&format!("http://{listen}/")) else {
        eprintln!("infinitetalk-batch {what}: bad listen address {listen}");
        return ExitCode::from(EXIT_CONFIG);
    };
    if let Ok(mut path) = url.path_segments_mut() {
        // Escapes the batch name.
        path.pop_if_empty().extend(["batches", &batch, what]);
    }
    let mut request = client.post(url);
    // Without a readable token the daemon answers 401, which is said below.
    if let Ok(token) = admin::read_token(&state) {
        request = request.bearer_auth(token.expose());
    }
    if let Some(req) = &retry {
        request = request.json(req);
    }
    let (text, live) = match request.send().await {
        Ok(resp) if resp.status().is_success() => match resp.text().await {
            Ok(t) => (describe(what, &t), true),
            Err(e) => {
                eprintln!("infinitetalk-batch {what}: the daemon's answer was cut: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        },
        Ok(resp) => {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            eprintln!("infinitetalk-batch {what}: the daemon refused ({status}): {body}");
            return ExitCode::from(EXIT_RUNTIME);
        }
        Err(e) if e.is_connect() => {
            let batch2 = batch.clone();
            let done = tokio::task::spawn_blocking(move || -> Result<String, String> {
                let store = store::Store::open(&state).map_err(|e| e.to_string())?;
                let text = match &retry {
                    Some(req) => {
                        let out = manage::retry(&store, &batch2, req).map_err(|e| e.to_string())?;
                        serde_json::to_string(&out).map_err(|e| e.to_string())?
                    }
                    None => {
                        let out =
                            manage::cancel(&store, &folders, &batch2).map_err(|e| e.to_string())?;
                        manage::finish_offline(&store, &folders, &batch2)
                            .map_err(|e| e.to_string())?;
                        serde_json::to_string(&out).map_err(|e| e.to_string())?
                    }
                };
                Ok(text)
            })
            .await;
            match done {
                Ok(Ok(t)) => (describe(what, &t), false),
                Ok(Err(e)) => {
                    eprintln!("infinitetalk-batch {what}: no daemon answers at {listen}, and {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
                Err(e) => {
                    eprintln!("infinitetalk-batch {what}: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            }
        }
        Err(e) => {
            eprintln!(
                "infinitetalk-batch {what}: no usable answer from the daemon at {listen}: {e}"
            );
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    println!("{text}");
    if !live {
        println!("(done on the state folder: no daemon was running)");
    }
    ExitCode::SUCCESS
}

/// `console`: asks the running daemon for a one-time console link.
async fn console(args: ConsoleArgs) -> ExitCode {
    let file = match &args.config {
        Some(path) => match FileSettings::load(path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("infinitetalk-batch console: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => FileSettings::default(),
    };
    let listen = args.listen.or(file.listen).unwrap_or_else(default_listen);
    let state = args.state.or(file.state).unwrap_or_else(|| "state".into());
    let token = match admin::read_token(&state) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "infinitetalk-batch console: {e} (run as the daemon's user, with its --state or --config)"
            );
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    // A daemon on 0.0.0.0 or :: is reached (and its link opened) on loopback.
    let mut reach = listen;
    if reach.ip().is_unspecified() {
        reach.set_ip(match reach.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    else {
        eprintln!("infinitetalk-batch console: cannot build the HTTP client");
        return ExitCode::from(EXIT_RUNTIME);
    };
    let sent = client
        .post(format!("http://{reach}/admin/ticket"))
        .bearer_auth(token.expose())
        .send()
        .await;
    let resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            eprintln!("infinitetalk-batch console: no daemon answers at {listen}: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        eprintln!(
            "infinitetalk-batch console: the daemon refused ({status}): {}",
            body.trim()
        );
        return ExitCode::from(EXIT_RUNTIME);
    }
    match resp.json::<admin::Ticket>().await {
        Ok(ticket) => {
            println!("http://{reach}{}", ticket.path);
            eprintln!(
                "open it in a browser within {} s; it works once",
                ticket.expires_in_secs
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("infinitetalk-batch console: unreadable answer from the daemon: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// The JSON outcome of retry/cancel, said plainly.
fn describe(what: &str, json: &str) -> String {
    if what == "retry" {
        match serde_json::from_str::<manage::RetryOutcome>(json) {
            Ok(o) => format!(
                "batch {}: {} failed row(s) queued again, each as a NEW task that is paid for again{}",
                o.batch,
                o.requeued,
                if o.rows.is_empty() {
                    String::new()
                } else {
                    format!(": {}", o.rows.join(", "))
                }
            ),
            Err(_) => json.to_owned(),
        }
    } else {
        match serde_json::from_str::<manage::CancelOutcome>(json) {
            Ok(o) => format!(
                "batch {}: {} queued row(s) cancelled (failed, CANCELLED; never submitted); {} task(s) still running will finish and be downloaded{}",
                o.batch,
                o.cancelled,
                o.still_running,
                if o.ended { "; every row has ended" } else { "" }
            ),
            Err(_) => json.to_owned(),
        }
    }
}

async fn show_status(args: StatusArgs) -> ExitCode {
    let file = match &args.config {
        Some(path) => match FileSettings::load(path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("infinitetalk-batch status: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => FileSettings::default(),
    };
    let listen = args.listen.or(file.listen).unwrap_or_else(default_listen);
    let state = args
        .state
        .clone()
        .or(file.state)
        .unwrap_or_else(|| "state".into());
    if !args.watch {
        return match fetch_report(listen, &state).await {
            Ok(report) => print_report(&report, args.json),
            Err(code) => code,
        };
    }
    let redraw = async {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let report = fetch_report(listen, &state).await;
            if !args.json {
                // Clear the screen and go home, as watch(1) does.
                print!("\x1b[2J\x1b[H");
            }
            match report {
                Ok(report) => {
                    let code = print_report(&report, args.json);
                    if code != ExitCode::SUCCESS {
                        return code;
                    }
                }
                Err(_) => println!("(no answer; trying again in 2 s)"),
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        code = redraw => code,
    }
}

/// The daemon's live report, or the state folder's when no daemon answers.
async fn fetch_report(
    listen: std::net::SocketAddr,
    state: &std::path::Path,
) -> Result<status::Report, ExitCode> {
    let live = async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .ok()?;
        let mut request = client.get(format!("http://{listen}/status"));
        // Needed when the daemon listens on a non-loopback address.
        if let Ok(token) = admin::read_token(state) {
            request = request.bearer_auth(token.expose());
        }
        let resp = request.send().await.ok()?;
        resp.json::<status::Report>().await.ok()
    };
    if let Some(report) = live.await {
        return Ok(report);
    }
    if !state.exists() {
        eprintln!(
            "infinitetalk-batch status: no daemon answers at {listen}, and there is no state folder at {}",
            state.display()
        );
        return Err(ExitCode::from(EXIT_RUNTIME));
    }
    let state = state.to_owned();
    let opened = tokio::task::spawn_blocking(move || {
        let store = store::Store::open(&state)?;
        status::from_store(&store)
    })
    .await;
    match opened {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(e)) => {
            eprintln!("infinitetalk-batch status: no daemon answers at {listen}, and {e}");
            Err(ExitCode::from(EXIT_RUNTIME))
        }
        Err(e) => {
            eprintln!("infinitetalk-batch status: {e}");
            Err(ExitCode::from(EXIT_RUNTIME))
        }
    }
}

fn print_report(report: &status::Report, json: bool) -> ExitCode {
    if json {
        match serde_json::to_string_pretty(report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("infinitetalk-batch status: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        }
    } else {
        print!("{}", status::render(report));
    }
    ExitCode::SUCCESS
}
