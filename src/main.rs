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
            let journal = stderr_is_journal();
            let settings = match Settings::resolve(&args, &Environment::from_process()) {
                Ok(s) => s,
                Err(e) => {
                    // Logging is not set up yet: mark the line an error for
                    // the journal by hand (`journalctl -p err` finds it).
                    let prefix = if journal { "<3>" } else { "" };
                    eprintln!("{prefix}infinitetalk-batch: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging(settings.log_format, journal);
            runtime(|| async move {
                let shutdown = CancellationToken::new();
                // Installed before the daemon starts, so that a stop sent
                // while it starts is a graceful one too.
                let signals = tokio::spawn(watch_signals(stop_signals(), shutdown.clone()));
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
            runtime(|| manage_batch(args.daemon, args.batch, Action::Retry(req)))
        }
        Command::Cancel(args) => runtime(|| manage_batch(args.daemon, args.batch, Action::Cancel)),
        Command::Pause(args) => runtime(|| manage_batch(args.daemon, args.batch, Action::Pause)),
        Command::Resume(args) => runtime(|| manage_batch(args.daemon, args.batch, Action::Resume)),
        Command::Priority(args) => match args.level.parse::<store::Priority>() {
            Ok(priority) => {
                runtime(|| manage_batch(args.daemon, args.batch, Action::Priority(priority)))
            }
            Err(e) => {
                eprintln!("infinitetalk-batch priority: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Console(args) => runtime(|| console(args)),
        Command::Simulate(args) => {
            init_logging(LogFormat::Text, stderr_is_journal());
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

/// Logs to stderr; when stderr is the systemd journal, each line carries its
/// syslog priority and no time stamp (journald stamps every line itself).
fn init_logging(format: LogFormat, journal: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: in the journal or a file the escape codes
    // would be noise, and would break `grep 'batch=NAME'`.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if journal {
        let builder = builder.with_writer(JournalStderr).without_time();
        match format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().try_init(),
        }
    } else {
        let builder = builder.with_writer(std::io::stderr);
        match format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().try_init(),
        }
    };
}

/// Whether stderr is connected to the systemd journal.
///
/// systemd sets `JOURNAL_STREAM=DEVICE:INODE` for the stream it connected;
/// the variable alone is not enough, since a child whose stderr was
/// redirected elsewhere inherits it too (systemd.exec(5), `$JOURNAL_STREAM`).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // A duplicate of the descriptor, so that dropping the File leaves fd 2 open.
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// The syslog priority prefix journald reads off the start of a stream line
/// (sd-daemon(3)): without it every line lands at the stream's default, info,
/// and `journalctl -p warning` would show none of our warnings.
fn priority_prefix(level: &tracing::Level) -> &'static [u8] {
    match *level {
        tracing::Level::ERROR => b"<3>",
        tracing::Level::WARN => b"<4>",
        tracing::Level::INFO => b"<6>",
        tracing::Level::DEBUG | tracing::Level::TRACE => b"<7>",
    }
}

/// Makes a stderr writer per log event that prefixes the event's priority.
struct JournalStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for JournalStderr {
    type Writer = PriorityLines<std::io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        PriorityLines::new(std::io::stderr(), b"<6>")
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        PriorityLines::new(std::io::stderr(), priority_prefix(meta.level()))
    }
}

/// Writes through to `inner`, putting `prefix` at the start of every line:
/// a message that spans lines (an error's source chain, a JSON field with a
/// newline) keeps its priority on each journal entry it becomes.
struct PriorityLines<W> {
    inner: W,
    prefix: &'static [u8],
    at_line_start: bool,
}

impl<W> PriorityLines<W> {
    fn new(inner: W, prefix: &'static [u8]) -> Self {
        Self {
            inner,
            prefix,
            at_line_start: true,
        }
    }
}

impl<W: std::io::Write> std::io::Write for PriorityLines<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = Vec::with_capacity(buf.len() + 2 * self.prefix.len());
        for piece in buf.split_inclusive(|b| *b == b'\n') {
            if self.at_line_start {
                out.extend_from_slice(self.prefix);
            }
            out.extend_from_slice(piece);
            self.at_line_start = piece.ends_with(b"\n");
        }
        // One write for the whole event, so that lines of concurrent events
        // do not interleave.
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// SIGTERM's and SIGINT's streams; from now on neither ends the process
/// by itself.
fn stop_signals() -> Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => Some((term, int)),
        _ => None,
    }
}

/// SIGTERM or SIGINT starts a graceful stop; a second one exits at once.
async fn watch_signals(
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
    shutdown: CancellationToken,
) {
    let Some((mut term, mut int)) = signals else {
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
    // Local files are checked against the same media settings as `run`'s.
    let file = match &args.config {
        Some(path) => match FileSettings::load(path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("infinitetalk-batch validate: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => FileSettings::default(),
    };
    let inbox = file.inbox.clone().unwrap_or_else(|| "inbox".into());
    let media = match infinitetalk_batch::config::media_settings(args.media.clone(), &file, &inbox)
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("infinitetalk-batch validate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let media_root = media.root.clone();
    let checked = std::fs::File::open(&args.file)
        .map_err(|source| ManifestError::Io {
            path: args.file.clone(),
            source,
        })
        .and_then(|f| {
            manifest::validate_reader_with(
                f,
                &args.file,
                &mut infinitetalk_batch::media::MediaCheck::new(&media),
            )
        });
    match checked {
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
                return runtime(|| probe_costs(args, defaults, &media_root));
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
async fn probe_costs(
    args: &ValidateArgs,
    defaults: RowDefaults,
    media_root: &std::path::Path,
) -> ExitCode {
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
        media_root,
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

/// What a batch command asks of the daemon (or of the state folder).
enum Action {
    Retry(manage::RetryRequest),
    Cancel,
    Pause,
    Resume,
    Priority(store::Priority),
}

impl Action {
    /// The command's name, also the last segment of its route.
    fn name(&self) -> &'static str {
        match self {
            Action::Retry(_) => "retry",
            Action::Cancel => "cancel",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Priority(_) => "priority",
        }
    }
}

/// A batch command: the daemon first, else the state folder.
async fn manage_batch(args: DaemonArgs, batch: String, action: Action) -> ExitCode {
    let what = action.name();
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
    let state = args.state.or(file.state).unwrap_or_else(|| "state".into());
    let outbox = args
        .outbox
        .or(file.outbox)
        .unwrap_or_else(|| "outbox".into());
    // An `s3://` outbox: the daemon's local working folder under the state.
    let (outbox, in_store) = match infinitetalk_batch::config::resolve_outbox(&outbox, &state) {
        Ok((local, store)) => (local, store.is_some()),
        Err(e) => {
            eprintln!("infinitetalk-batch {what}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let folders = infinitetalk_batch::ingest::Folders::new(
        file.inbox.unwrap_or_else(|| "inbox".into()),
        outbox,
    );
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
    match &action {
        Action::Retry(req) => request = request.json(req),
        Action::Priority(priority) => {
            request = request.json(&manage::PriorityRequest {
                priority: *priority,
            });
        }
        Action::Cancel | Action::Pause | Action::Resume => {}
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
                let json = |v: Result<String, serde_json::Error>| v.map_err(|e| e.to_string());
                let text = match &action {
                    Action::Retry(req) => {
                        let out = manage::retry(&store, &batch2, req).map_err(|e| e.to_string())?;
                        json(serde_json::to_string(&out))?
                    }
                    Action::Cancel => {
                        let out =
                            manage::cancel(&store, &folders, &batch2).map_err(|e| e.to_string())?;
                        // An object-store outbox is published by the daemon:
                        // the batch stays for its finisher at the next start.
                        if !in_store {
                            manage::finish_offline(&store, &folders, &batch2)
                                .map_err(|e| e.to_string())?;
                        }
                        json(serde_json::to_string(&out))?
                    }
                    Action::Pause | Action::Resume => {
                        let paused = matches!(action, Action::Pause);
                        let out = manage::set_paused(&store, &batch2, paused)
                            .map_err(|e| e.to_string())?;
                        json(serde_json::to_string(&out))?
                    }
                    Action::Priority(priority) => {
                        let out = manage::set_priority(&store, &batch2, *priority)
                            .map_err(|e| e.to_string())?;
                        json(serde_json::to_string(&out))?
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
    if matches!(what, "pause" | "resume" | "priority") {
        return match serde_json::from_str::<manage::ControlOutcome>(json) {
            Ok(o) => format!(
                "batch {}: {}, priority {}",
                o.batch,
                if o.paused {
                    "paused (running tasks finish; nothing new is submitted)"
                } else {
                    "submitting"
                },
                o.priority.as_str()
            ),
            Err(_) => json.to_owned(),
        };
    }
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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn every_line_of_an_event_carries_its_priority() {
        let mut w = PriorityLines::new(Vec::new(), priority_prefix(&tracing::Level::WARN));
        w.write_all(b"WARN first\n  caused by: second\n")
            .expect("write");
        assert_eq!(w.inner, b"<4>WARN first\n<4>  caused by: second\n");
    }

    #[test]
    fn a_line_written_in_pieces_is_prefixed_once() {
        let mut w = PriorityLines::new(Vec::new(), priority_prefix(&tracing::Level::ERROR));
        w.write_all(b"ERROR part").expect("write");
        w.write_all(b" two\nnext").expect("write");
        assert_eq!(w.inner, b"<3>ERROR part two\n<3>next");
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority_prefix(&tracing::Level::ERROR), b"<3>");
        assert_eq!(priority_prefix(&tracing::Level::WARN), b"<4>");
        assert_eq!(priority_prefix(&tracing::Level::INFO), b"<6>");
        assert_eq!(priority_prefix(&tracing::Level::DEBUG), b"<7>");
        assert_eq!(priority_prefix(&tracing::Level::TRACE), b"<7>");
    }
}
