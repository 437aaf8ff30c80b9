//! The binary: parse, install logging, load settings, run one command.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use infinitetalk_batch::cli::{Cli, Command, LogFormat, StatusArgs, ValidateArgs};
use infinitetalk_batch::config::{Environment, FileSettings, Settings, default_listen};
use infinitetalk_batch::manifest::{self, ManifestError};
use infinitetalk_batch::spec::RowDefaults;
use infinitetalk_batch::{daemon, simulator, status, store};
use tokio_util::sync::CancellationToken;

/// Exit codes: systemd skips restarts on a configuration error.
const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
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

fn runtime<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
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
            println!("{}: valid", args.file.display());
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
        let resp = client
            .get(format!("http://{listen}/status"))
            .send()
            .await
            .ok()?;
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
