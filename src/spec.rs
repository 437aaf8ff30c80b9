//! What one manifest row asks the API for, and what it costs.
//!
//! Shared by the manifest reader (which produces a [`RowSpec`]), the store
//! (which keeps it for rows in flight) and the API client (which sends it).
//! It knows nothing about files, HTTP or storage.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The API bills at least this many seconds of audio per task.
pub const MIN_BILLED_SECONDS: f64 = 5.0;

/// Output resolution of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Resolution {
    #[serde(rename = "480p")]
    P480,
    #[serde(rename = "720p")]
    P720,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::P480 => "480p",
            Resolution::P720 => "720p",
        }
    }

    /// Price in US dollars per billed second of audio.
    pub fn usd_per_second(self) -> f64 {
        match self {
            Resolution::P480 => 0.03,
            Resolution::P720 => 0.06,
        }
    }

    /// What a task of `audio_seconds` costs: billed per second, minimum 5 s.
    pub fn cost_usd(self, audio_seconds: f64) -> f64 {
        audio_seconds.max(MIN_BILLED_SECONDS) * self.usd_per_second()
    }
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Resolution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "480p" => Ok(Resolution::P480),
            "720p" => Ok(Resolution::P720),
            other => Err(format!("must be 480p or 720p, not {other:?}")),
        }
    }
}

/// Which pool of the API's providers runs a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Auto,
    Value,
    Official,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Auto => "auto",
            Provider::Value => "value",
            Provider::Official => "official",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Provider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Provider::Auto),
            "value" => Ok(Provider::Value),
            "official" => Ok(Provider::Official),
            other => Err(format!("must be auto, value or official, not {other:?}")),
        }
    }
}

/// Largest seed the API accepts; `-1` means random.
pub const MAX_SEED: i64 = 2_147_483_647;

/// The request parameters of one row, as written in the manifest.
/// `None` means "blank in the manifest": the daemon's default applies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowSpec {
    pub image_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_url: Option<String>,
    pub audio_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Provider>,
}

/// Defaults for the optional columns a row leaves blank (`--resolution`,
/// `--provider`, `--prompt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowDefaults {
    pub resolution: Resolution,
    pub provider: Provider,
    pub prompt: String,
}

impl Default for RowDefaults {
    fn default() -> Self {
        RowDefaults {
            resolution: Resolution::P480,
            provider: Provider::Auto,
            prompt: String::new(),
        }
    }
}

impl RowSpec {
    pub fn resolution_or(&self, defaults: &RowDefaults) -> Resolution {
        self.resolution.unwrap_or(defaults.resolution)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_has_a_five_second_minimum() {
        assert!((Resolution::P480.cost_usd(1.0) - 0.15).abs() < 1e-9);
        assert!((Resolution::P720.cost_usd(10.0) - 0.60).abs() < 1e-9);
    }

    #[test]
    fn parses_only_the_documented_values() {
        assert_eq!("720p".parse::<Resolution>(), Ok(Resolution::P720));
        assert!("720P".parse::<Resolution>().is_err());
        assert_eq!("value".parse::<Provider>(), Ok(Provider::Value));
        assert!("fast".parse::<Provider>().is_err());
    }
}
