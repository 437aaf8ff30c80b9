//! The command line: one binary, four commands, as the contract names them.
//!
//! Flags of `run` are all optional here so that [`crate::config`] can tell a
//! flag the user gave from a default, and let flags win over the TOML file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::spec::{Provider, Resolution};

#[derive(Debug, Parser)]
#[command(
    name = "infinitetalk-batch",
    version,
    about = "Turns folders of CSV manifests into talking-head videos through the APIXO InfiniteTalk API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground, logging to stderr.
    Run(Box<RunArgs>),
    /// Check a manifest exactly as the daemon would; submits nothing.
    Validate(ValidateArgs),
    /// Show per-batch progress, from the running daemon or the state folder.
    Status(StatusArgs),
    /// Run the built-in simulator of the API alone.
    Simulate(SimulateArgs),
    /// Queue a batch's failed rows again, each as a new (paid) task.
    Retry(RetryArgs),
    /// Stop submitting a batch: its queued rows end failed (CANCELLED).
    Cancel(CancelArgs),
    /// Stop submitting a batch's rows until resumed (its running tasks finish).
    Pause(CancelArgs),
    /// Submit a paused batch's rows again.
    Resume(CancelArgs),
    /// Set a batch's share of submissions among the active batches.
    Priority(PriorityArgs),
    /// Print a one-time link that opens the running daemon's console.
    Console(ConsoleArgs),
}

/// Where a running daemon listens, or its state when none runs.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Address of the daemon's listener [default: 127.0.0.1:8686, or the config's].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// State folder to use when no daemon answers [default: ./state, or the config's].
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Outbox, for results.csv when no daemon answers [default: ./outbox, or the config's].
    #[arg(long, value_name = "DIR")]
    pub outbox: Option<PathBuf>,
    /// TOML config file of the daemon.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    /// The batch (its folder name under the outbox).
    pub batch: String,
    /// Only rows failed with these fail codes (comma-separated); all failed rows without it.
    #[arg(long, value_name = "C,...", value_delimiter = ',')]
    pub codes: Option<Vec<String>>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, Args)]
pub struct PriorityArgs {
    /// The batch (its folder name under the outbox).
    pub batch: String,
    /// high, normal or low: rows taken from the batch per round (4, 2, 1).
    #[arg(value_parser = ["high", "normal", "low"])]
    pub level: String,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The batch (its folder name under the outbox).
    pub batch: String,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 250ms, 15s, 2m)"))
}

fn parse_resolution(s: &str) -> Result<Resolution, String> {
    s.parse()
}

fn parse_provider(s: &str) -> Result<Provider, String> {
    s.parse()
}

#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// TOML file with any of the settings below (flags win over it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Watched folder for manifests [default: ./inbox].
    #[arg(long, value_name = "DIR")]
    pub inbox: Option<PathBuf>,
    /// Where results land: a folder, or an object store as s3://BUCKET/PREFIX [default: ./outbox].
    #[arg(long, value_name = "DIR")]
    pub outbox: Option<PathBuf>,
    /// The state database [default: ./state].
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// API root [default: env APIXO_API_BASE, else https://api.apixo.ai].
    #[arg(long, value_name = "URL")]
    pub api_base: Option<String>,
    /// File holding the API key [default: env APIXO_API_KEY].
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Tasks submitted and not yet seen finished [default: 1000].
    #[arg(long, value_name = "N")]
    pub max_concurrent: Option<u32>,
    /// API requests (submits + polls) in any sliding 60 s window [default: 10000].
    #[arg(long, value_name = "N")]
    pub max_requests_per_minute: Option<u32>,
    /// Shortest interval between two status polls of one task [default: 2s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub poll_min: Option<Duration>,
    /// Longest interval between two status polls of one task [default: 30m].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub poll_max: Option<Duration>,
    /// HTTP listener for /status, /metrics and callbacks [default: 127.0.0.1:8686].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Serve the callback route alone on this address (the one to expose to
    /// the API); the main listener then has no callback route.
    #[arg(long, value_name = "ADDR")]
    pub callback_listen: Option<SocketAddr>,
    /// Public URL of this daemon's listener root; enables callback mode.
    #[arg(long, value_name = "URL")]
    pub callback_url: Option<String>,
    #[command(flatten)]
    pub media: MediaArgs,
    /// Resolution for rows that leave it blank [default: 480p].
    #[arg(long, value_name = "480p|720p", value_parser = parse_resolution)]
    pub resolution: Option<Resolution>,
    /// Provider for rows that leave it blank [default: auto].
    #[arg(long, value_name = "auto|value|official", value_parser = parse_provider)]
    pub provider: Option<Provider>,
    /// Prompt for rows that leave it blank [default: empty].
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Limit of one API request [default: 15s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub api_timeout: Option<Duration>,
    /// A graceful stop finishes within this; must exceed --api-timeout [default: 20s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub stop_timeout: Option<Duration>,
    /// Further attempts of a row whose submit answer was lost or unreadable,
    /// each counted as paid [default: 2].
    #[arg(long, value_name = "N")]
    pub max_ambiguous_submits: Option<u32>,
    /// Accept a plain http:// --api-base that is not loopback (the key then
    /// crosses the network in clear).
    #[arg(long)]
    pub allow_insecure_api: bool,
    /// Run against the built-in simulator in-process; no key needed.
    #[arg(long)]
    pub simulate: bool,
    /// While submission is paused (credits, 401), how often one row is tried [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub pause_probe: Option<Duration>,
    /// Read each row's audio length just before submitting it: exact costs in
    /// results.csv, and bad audio fails the row before it is paid for.
    #[arg(long)]
    pub probe: bool,
    /// Stop submitting before the spend (known cost of submitted rows) would
    /// cross this many US dollars [default: no cap].
    #[arg(long, value_name = "USD")]
    pub max_spend_usd: Option<f64>,
    /// Log format on stderr [default: text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// Where local media files are and how the API gets them: the daemon's
/// flags, which `validate` takes to check a manifest as that daemon would.
#[derive(Debug, Clone, Default, Args)]
pub struct MediaArgs {
    /// Folder of the local files manifests may name instead of URLs
    /// [default: the config's, else INBOX/media].
    #[arg(long, value_name = "DIR")]
    pub media_root: Option<PathBuf>,
    /// Public URL that reaches the daemon's listener (e.g. through a reverse
    /// proxy); local files are served to the API under URL/media/TOKEN.
    #[arg(long, value_name = "URL")]
    pub media_url: Option<String>,
    /// Object store for local files (s3://BUCKET/PREFIX): each uploaded once,
    /// named by its content hash, and sent to the API as a presigned URL.
    #[arg(long, value_name = "URL")]
    pub media_store: Option<String>,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The manifest to check.
    pub file: PathBuf,
    /// Also read every row's audio (HTTP Range, headers only) for its exact
    /// length and cost; audio over 10 minutes, unreachable or not MP3, WAV or
    /// M4A fails validation.
    #[arg(long)]
    pub probe: bool,
    /// TOML config file of the daemon: local files are checked against its
    /// media settings, as the daemon would.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub media: MediaArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Redraw every 2 s until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// Address of the daemon's listener [default: 127.0.0.1:8686, or the config's].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// State folder to read when no daemon answers [default: ./state, or the config's].
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// TOML config file of the daemon, for its listen address and state folder.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// Address of the daemon's listener [default: 127.0.0.1:8686, or the config's].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// State folder of the daemon, holding its admin token [default: ./state, or the config's].
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// TOML config file of the daemon, for its listen address and state folder.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Address to serve the simulated API on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8687")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub sim: crate::simulator::SimArgs,
}
