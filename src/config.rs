//! Settings of `run`: flags merged over the TOML file merged over defaults,
//! in this one place.
//!
//! Unknown TOML keys and bad values are refused with the key's name. The API
//! key is read here and kept out of `Debug` output.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::{LogFormat, MediaArgs, RunArgs};
use crate::media::{MediaSettings, Publishing};
use crate::spec::{Provider, Resolution, RowDefaults};

pub const DEFAULT_API_BASE: &str = "https://api.apixo.ai";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8686";
/// Name of the systemd credential (`LoadCredential=`) holding the key.
pub const CREDENTIAL_NAME: &str = "apixo-api-key";

/// Why the settings cannot be used. Each names the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("cannot read the API key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no API key: give one with --api-key-file FILE (or the APIXO_API_KEY environment \
         variable, or a systemd credential named {CREDENTIAL_NAME}), or run against the \
         built-in simulator with --simulate"
    )]
    NoKey,
    /// No key, under systemd: the credential the unit loads is empty or
    /// absent (the shipped units fall back to an empty one, so that this
    /// line, not systemd's `243/CREDENTIALS`, tells the operator what to do).
    #[error(
        "no API key: give one with --api-key-file FILE, the APIXO_API_KEY environment \
         variable, or the systemd credential {CREDENTIAL_NAME}, which is empty here \
         ({}): put the key, one line, in the file the unit's LoadCredential={CREDENTIAL_NAME}:… \
         names (shipped units: /etc/infinitetalk-batch/api-key for infinitetalk-batch.service, \
         /etc/infinitetalk-batch/NAME.api-key for infinitetalk-batch@NAME.service), mode 0600 \
         owned by root, then systemctl restart the unit; or run against the built-in \
         simulator with --simulate",
        .dir.join(CREDENTIAL_NAME).display()
    )]
    NoKeyCredential { dir: PathBuf },
}

/// The settings as they may appear in the TOML file. Keys are the flag names,
/// with `-` or `_`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileSettings {
    pub inbox: Option<PathBuf>,
    pub outbox: Option<PathBuf>,
    pub state: Option<PathBuf>,
    #[serde(alias = "api_base")]
    pub api_base: Option<String>,
    #[serde(alias = "api_key_file")]
    pub api_key_file: Option<PathBuf>,
    #[serde(alias = "max_concurrent")]
    pub max_concurrent: Option<u32>,
    #[serde(alias = "max_requests_per_minute")]
    pub max_requests_per_minute: Option<u32>,
    #[serde(default, alias = "poll_min", with = "humantime_serde")]
    pub poll_min: Option<Duration>,
    #[serde(default, alias = "poll_max", with = "humantime_serde")]
    pub poll_max: Option<Duration>,
    pub listen: Option<SocketAddr>,
    #[serde(alias = "callback_listen")]
    pub callback_listen: Option<SocketAddr>,
    #[serde(alias = "callback_url")]
    pub callback_url: Option<String>,
    /// Folder of local media files (default `INBOX/media`).
    #[serde(alias = "media_root")]
    pub media_root: Option<PathBuf>,
    /// Public URL reaching the listener's `/media/` route.
    #[serde(alias = "media_url")]
    pub media_url: Option<String>,
    /// Object store (`s3://bucket/prefix`) local files are uploaded to.
    #[serde(alias = "media_store")]
    pub media_store: Option<String>,
    pub resolution: Option<Resolution>,
    pub provider: Option<Provider>,
    pub prompt: Option<String>,
    #[serde(default, alias = "api_timeout", with = "humantime_serde")]
    pub api_timeout: Option<Duration>,
    #[serde(default, alias = "stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Option<Duration>,
    pub simulate: Option<bool>,
    #[serde(alias = "log_format")]
    pub log_format: Option<LogFormat>,
    /// Fail codes that blame the service, not the row: resubmitted.
    #[serde(alias = "retry_fail_codes")]
    pub retry_fail_codes: Option<Vec<String>>,
    /// How many times one row is resubmitted for such codes.
    #[serde(alias = "max_resubmits")]
    pub max_resubmits: Option<u32>,
    /// How long after a task finished its download is retried before the row fails.
    #[serde(default, alias = "download_give_up", with = "humantime_serde")]
    pub download_give_up: Option<Duration>,
    /// How long the API may answer "no such task" about a running task
    /// before the row is settled (failed `TASK_NOT_FOUND`).
    #[serde(default, alias = "task_lost_after", with = "humantime_serde")]
    pub task_lost_after: Option<Duration>,
    /// Downloads running at once.
    #[serde(alias = "max_downloads")]
    pub max_downloads: Option<u32>,
    /// While paused (credits, 401), how often one row is tried.
    #[serde(default, alias = "pause_probe", with = "humantime_serde")]
    pub pause_probe: Option<Duration>,
    /// Read each row's audio length before submitting it.
    pub probe: Option<bool>,
    /// Spend cap in US dollars.
    #[serde(alias = "max_spend_usd")]
    pub max_spend_usd: Option<f64>,
    /// Further attempts of a row whose submit was ambiguous.
    #[serde(alias = "max_ambiguous_submits")]
    pub max_ambiguous_submits: Option<u32>,
    /// Largest video file downloaded, in bytes.
    #[serde(alias = "max_video_bytes")]
    pub max_video_bytes: Option<u64>,
    /// Longest one download attempt may take, whatever the server trickles.
    #[serde(default, alias = "download_attempt_timeout", with = "humantime_serde")]
    pub download_attempt_timeout: Option<Duration>,
    /// Longest `Retry-After` honoured (at most 1 h).
    #[serde(default, alias = "max_retry_after", with = "humantime_serde")]
    pub max_retry_after: Option<Duration>,
    /// Allow an `http://` API base that is not loopback.
    #[serde(alias = "allow_insecure_api")]
    pub allow_insecure_api: Option<bool>,
}

impl FileSettings {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }
}

/// The API key. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Everything `run` needs, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub inbox: PathBuf,
    /// The local folder the daemon writes results into: the outbox itself,
    /// or with an object-store outbox its staging folder under the state.
    pub outbox: PathBuf,
    /// `--outbox s3://bucket/prefix`: where results are published.
    pub outbox_store: Option<crate::outbox::StoreTarget>,
    pub state: PathBuf,
    pub api_base: String,
    /// `None` only with `simulate`.
    pub api_key: Option<ApiKey>,
    pub max_concurrent: u32,
    pub max_requests_per_minute: u32,
    pub poll_min: Duration,
    pub poll_max: Duration,
    pub listen: SocketAddr,
    /// Serve the callback route alone here, not on `listen`.
    pub callback_listen: Option<SocketAddr>,
    pub callback_url: Option<url::Url>,
    /// `--media-root`, `--media-url`: local files named by manifests.
    pub media: MediaSettings,
    pub defaults: RowDefaults,
    pub api_timeout: Duration,
    pub stop_timeout: Duration,
    pub simulate: bool,
    pub log_format: LogFormat,
    pub retry_fail_codes: Vec<String>,
    pub max_resubmits: u32,
    pub download_give_up: Duration,
    pub task_lost_after: Duration,
    pub max_downloads: u32,
    pub pause_probe: Duration,
    /// Probe each row's audio before submitting it.
    pub probe: bool,
    /// Submission pauses before the spend would cross this.
    pub max_spend_usd: Option<f64>,
    /// The `--config` file, re-read on SIGHUP for `max-spend-usd`.
    pub config_path: Option<PathBuf>,
    /// `--max-spend-usd` was given as a flag: it wins over the file, also on reload.
    pub spend_cap_from_flag: bool,
    /// Further attempts of a row after an ambiguous submit (each counted as paid).
    pub max_ambiguous_submits: u32,
    /// Largest video file downloaded; a longer one fails the attempt.
    pub max_video_bytes: u64,
    /// Deadline of one download attempt (a `.part` file keeps what arrived).
    pub download_attempt_timeout: Duration,
    /// Longest `Retry-After` honoured.
    pub max_retry_after: Duration,
    /// Warnings found while resolving (logged once logging is up).
    pub warnings: Vec<String>,
}

/// Defaults and bounds of the settings that are durations or sizes.
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(20);
pub const DEFAULT_MAX_AMBIGUOUS_SUBMITS: u32 = 2;
pub const DEFAULT_MAX_VIDEO_BYTES: u64 = 2 * 1024 * 1024 * 1024;
pub const DEFAULT_DOWNLOAD_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3600);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Where the key comes from when no flag or file names it.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    pub api_base: Option<String>,
    pub api_key: Option<String>,
    pub credentials_directory: Option<PathBuf>,
}

impl Environment {
    pub fn from_process() -> Self {
        Environment {
            api_base: std::env::var("APIXO_API_BASE")
                .ok()
                .filter(|s| !s.is_empty()),
            api_key: std::env::var("APIXO_API_KEY")
                .ok()
                .filter(|s| !s.is_empty()),
            credentials_directory: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        }
    }
}

impl Settings {
    /// Merges flags over the config file over defaults and reads the key.
    pub fn resolve(args: &RunArgs, env: &Environment) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(path) => FileSettings::load(path)?,
            None => FileSettings::default(),
        };
        Self::merge(args, file, env)
    }

    fn merge(
        args: &RunArgs,
        file: FileSettings,
        env: &Environment,
    ) -> Result<Settings, ConfigError> {
        let simulate = args.simulate || file.simulate.unwrap_or(false);
        let inbox = args
            .inbox
            .clone()
            .or(file.inbox.clone())
            .unwrap_or_else(|| "inbox".into());
        let media = media_settings(args.media.clone(), &file, &inbox)?;
        let api_base = args
            .api_base
            .clone()
            .or(file.api_base)
            .or_else(|| env.api_base.clone())
            .unwrap_or_else(|| DEFAULT_API_BASE.to_owned());
        let api_base = api_base.trim_end_matches('/').to_owned();
        let parsed = url::Url::parse(&api_base).map_err(|e| ConfigError::Invalid {
            key: "api-base",
            message: format!("{api_base:?} is not a URL: {e}"),
        })?;
        let allow_insecure = args.allow_insecure_api || file.allow_insecure_api.unwrap_or(false);
        check_api_base(&parsed, allow_insecure)?;
        let mut warnings = Vec::new();

        let key_file = args.api_key_file.clone().or(file.api_key_file);
        let api_key = read_key(key_file.as_deref(), env, &mut warnings)?;
        if api_key.is_none() && !simulate {
            return Err(match &env.credentials_directory {
                Some(dir) => ConfigError::NoKeyCredential { dir: dir.clone() },
                None => ConfigError::NoKey,
            });
        }

        let max_concurrent = args.max_concurrent.or(file.max_concurrent).unwrap_or(1000);
        positive("max-concurrent", max_concurrent)?;
        let max_requests_per_minute = args
            .max_requests_per_minute
            .or(file.max_requests_per_minute)
            .unwrap_or(10_000);
        if max_requests_per_minute < 2 {
            return Err(ConfigError::Invalid {
                key: "max-requests-per-minute",
                message: "must be at least 2 (a task needs a submit and a poll)".into(),
            });
        }
        let poll_min = args
            .poll_min
            .or(file.poll_min)
            .unwrap_or(Duration::from_secs(2));
        let poll_max = args
            .poll_max
            .or(file.poll_max)
            .unwrap_or(Duration::from_secs(30 * 60));
        at_most("poll-min", poll_min, DAY)?;
        at_most("poll-max", poll_max, DAY)?;
        if poll_min.is_zero() {
            return Err(ConfigError::Invalid {
                key: "poll-min",
                message: "must be more than zero".into(),
            });
        }
        if poll_max < poll_min {
            return Err(ConfigError::Invalid {
                key: "poll-max",
                message: format!(
                    "{} is shorter than poll-min {}",
                    humantime::format_duration(poll_max),
                    humantime::format_duration(poll_min)
                ),
            });
        }
        let listen = match args.listen.or(file.listen) {
            Some(addr) => addr,
            None => default_listen(),
        };
        let callback_listen = args.callback_listen.or(file.callback_listen);
        if callback_listen == Some(listen) {
            return Err(ConfigError::Invalid {
                key: "callback-listen",
                message: format!("{listen} is also the main listener's address (listen)"),
            });
        }
        let callback_url = match args.callback_url.clone().or(file.callback_url) {
            Some(raw) => {
                let url = url::Url::parse(&raw).map_err(|e| ConfigError::Invalid {
                    key: "callback-url",
                    message: format!("{raw:?} is not a URL: {e}"),
                })?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(ConfigError::Invalid {
                        key: "callback-url",
                        message: "must be an http or https URL".into(),
                    });
                }
                Some(url)
            }
            None => None,
        };
        let defaults = RowDefaults {
            resolution: args
                .resolution
                .or(file.resolution)
                .unwrap_or(Resolution::P480),
            provider: args.provider.or(file.provider).unwrap_or(Provider::Auto),
            prompt: args.prompt.clone().or(file.prompt).unwrap_or_default(),
        };
        let api_timeout = args
            .api_timeout
            .or(file.api_timeout)
            .unwrap_or(DEFAULT_API_TIMEOUT);
        nonzero("api-timeout", api_timeout)?;
        at_most("api-timeout", api_timeout, HOUR)?;
        let stop_timeout = args
            .stop_timeout
            .or(file.stop_timeout)
            .unwrap_or(DEFAULT_STOP_TIMEOUT);
        at_most("stop-timeout", stop_timeout, 2 * HOUR)?;
        if stop_timeout <= api_timeout {
            // A stop waits for every submit in flight: one cut short may
            // still create a task that nobody records.
            return Err(ConfigError::Invalid {
                key: "stop-timeout",
                message: format!(
                    "--stop-timeout ({}) must be longer than --api-timeout ({}): a graceful stop waits for the submits in flight",
                    humantime::format_duration(stop_timeout),
                    humantime::format_duration(api_timeout)
                ),
            });
        }
        let max_video_bytes = file.max_video_bytes.unwrap_or(DEFAULT_MAX_VIDEO_BYTES);
        if max_video_bytes == 0 {
            return Err(ConfigError::Invalid {
                key: "max-video-bytes",
                message: "must be at least 1".into(),
            });
        }
        let download_attempt_timeout = file
            .download_attempt_timeout
            .unwrap_or(DEFAULT_DOWNLOAD_ATTEMPT_TIMEOUT);
        nonzero("download-attempt-timeout", download_attempt_timeout)?;
        at_most("download-attempt-timeout", download_attempt_timeout, DAY)?;
        let max_retry_after = file.max_retry_after.unwrap_or(HOUR);
        at_most("max-retry-after", max_retry_after, HOUR)?;
        let pause_probe = args
            .pause_probe
            .or(file.pause_probe)
            .unwrap_or(Duration::from_secs(30));
        nonzero("pause-probe", pause_probe)?;
        at_most("pause-probe", pause_probe, DAY)?;
        let download_give_up = file
            .download_give_up
            .unwrap_or(Duration::from_secs(15 * 24 * 3600));
        at_most("download-give-up", download_give_up, 366 * DAY)?;
        let task_lost_after = file.task_lost_after.unwrap_or(Duration::from_secs(30 * 60));
        at_most("task-lost-after", task_lost_after, 30 * DAY)?;
        let max_spend_usd = args.max_spend_usd.or(file.max_spend_usd);
        if let Some(cap) = max_spend_usd
            && !(cap.is_finite() && cap >= 0.0)
        {
            return Err(ConfigError::Invalid {
                key: "max-spend-usd",
                message: format!("{cap} is not an amount of dollars"),
            });
        }
        let max_downloads = file.max_downloads.unwrap_or(8);
        positive("max-downloads", max_downloads)?;
        let state: PathBuf = args
            .state
            .clone()
            .or(file.state)
            .unwrap_or_else(|| "state".into());
        let (outbox, outbox_store) = resolve_outbox(
            &args
                .outbox
                .clone()
                .or(file.outbox)
                .unwrap_or_else(|| "outbox".into()),
            &state,
        )?;
        Ok(Settings {
            inbox,
            outbox,
            outbox_store,
            state,
            api_base,
            api_key,
            max_concurrent,
            max_requests_per_minute,
            poll_min,
            poll_max,
            listen,
            callback_listen,
            callback_url,
            media,
            defaults,
            api_timeout,
            stop_timeout,
            simulate,
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            retry_fail_codes: file.retry_fail_codes.unwrap_or_else(|| {
                [
                    "PROCESSING_TIMEOUT",
                    "MODEL_UNAVAILABLE",
                    "INSUFFICIENT_CREDITS",
                ]
                .map(String::from)
                .to_vec()
            }),
            max_resubmits: file.max_resubmits.unwrap_or(2),
            download_give_up,
            task_lost_after,
            max_downloads,
            pause_probe,
            probe: args.probe || file.probe.unwrap_or(false),
            max_spend_usd,
            config_path: args.config.clone(),
            spend_cap_from_flag: args.max_spend_usd.is_some(),
            max_ambiguous_submits: args
                .max_ambiguous_submits
                .or(file.max_ambiguous_submits)
                .unwrap_or(DEFAULT_MAX_AMBIGUOUS_SUBMITS),
            max_video_bytes,
            download_attempt_timeout,
            max_retry_after,
            warnings,
        })
    }
}

/// The local-media settings from flags over the file over defaults; shared
/// by `run` and `validate`, so that both check the same way.
pub fn media_settings(
    flags: MediaArgs,
    file: &FileSettings,
    inbox: &Path,
) -> Result<MediaSettings, ConfigError> {
    let root = flags
        .media_root
        .or_else(|| file.media_root.clone())
        .unwrap_or_else(|| MediaSettings::default_root(inbox));
    let url = flags.media_url.or_else(|| file.media_url.clone());
    let store = flags.media_store.or_else(|| file.media_store.clone());
    let publishing = match (url, store) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::Invalid {
                key: "media-store",
                message: "set --media-url or --media-store, not both: each local file is published one way".into(),
            });
        }
        (None, Some(raw)) => match crate::outbox::StoreTarget::parse(&raw) {
            Some(Ok(target)) => Publishing::Store(target),
            Some(Err(message)) => {
                return Err(ConfigError::Invalid {
                    key: "media-store",
                    message,
                });
            }
            None => {
                return Err(ConfigError::Invalid {
                    key: "media-store",
                    message: format!("{raw:?} is not an s3://BUCKET/PREFIX URL"),
                });
            }
        },
        (Some(raw), None) => {
            let url = url::Url::parse(&raw).map_err(|e| ConfigError::Invalid {
                key: "media-url",
                message: format!("{raw:?} is not a URL: {e}"),
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(ConfigError::Invalid {
                    key: "media-url",
                    message: "must be an http or https URL with a host".into(),
                });
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(ConfigError::Invalid {
                    key: "media-url",
                    message: "must not have a query or fragment: /media/TOKEN is appended to it"
                        .into(),
                });
            }
            Publishing::Url(url)
        }
        (None, None) => Publishing::Off,
    };
    Ok(MediaSettings { root, publishing })
}

/// `--outbox` as given → (the local folder results are written into, the
/// object store they are published to). An `s3://` outbox writes into
/// `STATE/outbox` and publishes from there.
pub fn resolve_outbox(
    outbox: &Path,
    state: &Path,
) -> Result<(PathBuf, Option<crate::outbox::StoreTarget>), ConfigError> {
    let Some(text) = outbox.to_str() else {
        return Ok((outbox.to_owned(), None));
    };
    match crate::outbox::StoreTarget::parse(text) {
        None => Ok((outbox.to_owned(), None)),
        Some(Ok(target)) => Ok((crate::outbox::staging_dir(state), Some(target))),
        Some(Err(message)) => Err(ConfigError::Invalid {
            key: "outbox",
            message,
        }),
    }
}

pub fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8686)))
}

/// The spend cap a reload of the config file asks for, when the file decides it.
pub fn reloaded_spend_cap(settings: &Settings) -> Result<Option<Option<f64>>, ConfigError> {
    let Some(path) = settings.config_path.as_deref() else {
        return Ok(None);
    };
    if settings.spend_cap_from_flag {
        return Ok(None);
    }
    let file = FileSettings::load(path)?;
    if let Some(cap) = file.max_spend_usd
        && !(cap.is_finite() && cap >= 0.0)
    {
        return Err(ConfigError::Invalid {
            key: "max-spend-usd",
            message: format!("{cap} is not an amount of dollars"),
        });
    }
    Ok(Some(file.max_spend_usd))
}

fn positive(key: &'static str, value: u32) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::Invalid {
            key,
            message: "must be at least 1".into(),
        });
    }
    Ok(())
}

/// Durations from settings are added to clocks: absurd ones are refused
/// here rather than overflowing later.
fn at_most(key: &'static str, value: Duration, max: Duration) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::Invalid {
            key,
            message: format!(
                "{} is longer than the most allowed, {}",
                humantime::format_duration(value),
                humantime::format_duration(max)
            ),
        });
    }
    Ok(())
}

/// An `http://` API base sends the key in clear: only loopback, unless
/// `--allow-insecure-api` says it is meant.
fn check_api_base(url: &url::Url, allow_insecure: bool) -> Result<(), ConfigError> {
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            };
            if loopback || allow_insecure {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    key: "api-base",
                    message: format!(
                        "{url} is plain http to another machine: the API key would cross the network in clear; use https, or pass --allow-insecure-api if this is meant"
                    ),
                })
            }
        }
        other => Err(ConfigError::Invalid {
            key: "api-base",
            message: format!("scheme {other:?}: must be https (or http on loopback)"),
        }),
    }
}

fn nonzero(key: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::Invalid {
            key,
            message: "must be more than zero".into(),
        });
    }
    Ok(())
}

fn read_key(
    file: Option<&Path>,
    env: &Environment,
    warnings: &mut Vec<String>,
) -> Result<Option<ApiKey>, ConfigError> {
    let mut from_file = |path: &Path| -> Result<Option<ApiKey>, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::KeyFile {
            path: path.to_owned(),
            source,
        })?;
        if let Some(w) = key_file_warning(path) {
            warnings.push(w);
        }
        let key = text.trim();
        Ok((!key.is_empty()).then(|| ApiKey::new(key)))
    };
    if let Some(path) = file {
        return from_file(path);
    }
    if let Some(key) = &env.api_key {
        return Ok(Some(ApiKey::new(key.trim())));
    }
    if let Some(dir) = &env.credentials_directory {
        let path = dir.join(CREDENTIAL_NAME);
        if path.exists() {
            return from_file(&path);
        }
    }
    Ok(None)
}

/// A warning when the key file can be read by group or others.
fn key_file_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o044 != 0).then(|| {
        format!(
            "the API key file {} is readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RunArgs {
        RunArgs::default()
    }

    #[test]
    fn refuses_to_start_without_key_or_simulate() {
        let err = Settings::merge(&args(), FileSettings::default(), &Environment::default())
            .expect_err("no key must be refused");
        let text = err.to_string();
        assert!(
            text.contains("--api-key-file") && text.contains("--simulate"),
            "{text}"
        );
    }

    #[test]
    fn an_empty_systemd_credential_says_what_to_create_where() {
        let dir = tempfile::tempdir().expect("tempdir");
        // What the shipped units' SetCredential= fallback leaves when the key
        // file is missing: a credential holding only a newline.
        std::fs::write(dir.path().join(CREDENTIAL_NAME), "\n").expect("credential");
        let env = Environment {
            credentials_directory: Some(dir.path().to_owned()),
            ..Environment::default()
        };
        let err = Settings::merge(&args(), FileSettings::default(), &env)
            .expect_err("an empty credential is no key");
        let text = err.to_string();
        assert!(text.starts_with("no API key: give one with"), "{text}");
        assert!(
            text.contains("/etc/infinitetalk-batch/api-key")
                && text.contains("/etc/infinitetalk-batch/NAME.api-key")
                && text.contains("--simulate")
                && !text.contains('\n'),
            "{text}"
        );
        let mut sim = args();
        sim.simulate = true;
        assert!(Settings::merge(&sim, FileSettings::default(), &env).is_ok());
    }

    #[test]
    fn object_store_settings() {
        let mut a = args();
        a.simulate = true;
        a.outbox = Some("s3://talk-videos/acme/".into());
        a.state = Some("/srv/state".into());
        a.media.media_store = Some("s3://talk-inputs/media".into());
        let s =
            Settings::merge(&a, FileSettings::default(), &Environment::default()).expect("valid");
        assert_eq!(
            s.outbox,
            PathBuf::from("/srv/state/outbox"),
            "staging under the state"
        );
        let target = s.outbox_store.expect("an object store");
        assert_eq!(
            (target.bucket.as_str(), target.prefix.as_str()),
            ("talk-videos", "acme")
        );
        assert!(matches!(s.media.publishing, Publishing::Store(ref t) if t.prefix == "media"));

        a.media.media_url = Some("https://media.example/".into());
        let err = Settings::merge(&a, FileSettings::default(), &Environment::default())
            .expect_err("both ways at once");
        assert!(err.to_string().contains("not both"), "{err}");
        a.media.media_url = None;
        a.media.media_store = Some("https://bucket.example/x".into());
        let err = Settings::merge(&a, FileSettings::default(), &Environment::default())
            .expect_err("not s3://");
        assert!(err.to_string().contains("media-store"), "{err}");
        a.media.media_store = None;
        a.outbox = Some("s3://Bad_Bucket".into());
        let err = Settings::merge(&a, FileSettings::default(), &Environment::default())
            .expect_err("bad bucket");
        assert!(err.to_string().contains("setting outbox"), "{err}");
    }

    #[test]
    fn flags_win_over_file() {
        let mut a = args();
        a.simulate = true;
        a.max_concurrent = Some(7);
        let file: FileSettings = toml::from_str(
            "max-concurrent = 20\nmax_requests_per_minute = 600\npoll-min = \"250ms\"",
        )
        .expect("valid toml");
        let s = Settings::merge(&a, file, &Environment::default()).expect("valid");
        assert_eq!(s.max_concurrent, 7);
        assert_eq!(s.max_requests_per_minute, 600);
        assert_eq!(s.poll_min, Duration::from_millis(250));
    }

    #[test]
    fn ambiguous_bound_from_file_or_flag() {
        let mut a = args();
        a.simulate = true;
        let file: FileSettings = toml::from_str("max-ambiguous-submits = 5").expect("toml");
        let s = Settings::merge(&a, file, &Environment::default()).expect("valid");
        assert_eq!(s.max_ambiguous_submits, 5);
        a.max_ambiguous_submits = Some(0);
        let file: FileSettings = toml::from_str("max-ambiguous-submits = 5").expect("toml");
        let s = Settings::merge(&a, file, &Environment::default()).expect("valid");
        assert_eq!(s.max_ambiguous_submits, 0);
        let s =
            Settings::merge(&a, FileSettings::default(), &Environment::default()).expect("valid");
        assert_eq!(s.api_timeout, DEFAULT_API_TIMEOUT);
        assert!(s.stop_timeout > s.api_timeout, "the defaults agree");
    }

    #[test]
    fn loopback_http_is_fine_other_http_needs_the_flag() {
        let mut a = args();
        a.simulate = true;
        a.api_base = Some("http://127.0.0.1:9/".into());
        Settings::merge(&a, FileSettings::default(), &Environment::default()).expect("loopback");
        a.api_base = Some("http://api.example.com".into());
        let err = Settings::merge(&a, FileSettings::default(), &Environment::default())
            .expect_err("insecure");
        assert!(err.to_string().contains("--allow-insecure-api"), "{err}");
        a.allow_insecure_api = true;
        Settings::merge(&a, FileSettings::default(), &Environment::default()).expect("allowed");
    }

    #[test]
    fn a_key_file_readable_by_others_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, "sk-1\n").expect("key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut a = args();
        a.api_key_file = Some(path.clone());
        let s =
            Settings::merge(&a, FileSettings::default(), &Environment::default()).expect("valid");
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(!s.warnings[0].contains("sk-1"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let s =
            Settings::merge(&a, FileSettings::default(), &Environment::default()).expect("valid");
        assert!(s.warnings.is_empty());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = toml::from_str::<FileSettings>("max-concurent = 3").expect_err("unknown key");
        assert!(err.to_string().contains("max-concurent"), "{err}");
    }

    #[test]
    fn key_debug_is_redacted() {
        let key = ApiKey::new("sk-secret");
        assert!(!format!("{key:?}").contains("secret"));
    }
}
