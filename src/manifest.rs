//! Manifests: CSV files of image/audio pairs, read and validated as the
//! contract says.
//!
//! Validation streams the file once (bounded memory whatever its length) and
//! collects every problem, not only the first. The same reader later feeds
//! the dispatcher row by row from the accepted `manifest.csv`, starting at a
//! saved [`ReadPosition`], so the store never needs a copy of queued rows.
//!
//! This module never touches the store or the network.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::{Resolution, RowDefaults, RowSpec};

/// One problem found in a manifest, printed as `line N: column C: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Line of the file as a text editor counts it (header = 1); a row's
    /// problem cites the line where the row starts.
    pub line: u64,
    /// Column name as the contract spells it (lower case), or `-` for a
    /// problem of the whole file.
    pub column: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: column {}: {}",
            self.line, self.column, self.message
        )
    }
}

/// Why a manifest could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be opened or read (not a problem of its content).
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The content breaks the contract's rules; every problem is listed.
    #[error("{path} is not a valid manifest ({} problem(s))", problems.len())]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// One data row of a valid manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRow {
    /// 1-based number among the data rows.
    pub index: u64,
    /// Line where the row starts.
    pub line: u64,
    /// The `id` cell, or the row's number when blank or absent.
    pub id: String,
    pub spec: RowSpec,
    /// Cells of columns the contract does not know, in header order.
    pub extra: Vec<String>,
}

/// Where to resume reading an accepted manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadPosition {
    /// Byte offset of the next record.
    pub byte: u64,
    /// Line of the next record.
    pub line: u64,
    /// Data rows already read before this position.
    pub rows_read: u64,
}

/// What validation learned about a valid manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub rows: u64,
    /// Rows per resolution; `None` counts rows that leave it blank.
    pub by_resolution: BTreeMap<Option<Resolution>, u64>,
    /// Lower-case hex SHA-256 of the file's bytes.
    pub sha256: String,
    /// Names of the extra columns, in header order, as written in the header.
    pub extra_columns: Vec<String>,
}

impl Summary {
    /// The least the batch can cost: 5 billed seconds a row at its rate.
    pub fn min_cost_usd(&self, defaults: &RowDefaults) -> f64 {
        self.by_resolution
            .iter()
            .map(|(res, n)| res.unwrap_or(defaults.resolution).cost_usd(0.0) * *n as f64)
            .sum()
    }
}

/// Validates the manifest at `path` completely.
pub fn validate_path(path: &Path) -> Result<Summary, ManifestError> {
    let _ = path;
    todo!("manifest validation")
}

/// Reads the rows of a manifest that has already been validated.
pub struct RowReader {
    _private: (),
}

impl RowReader {
    /// Opens `path` and positions the reader at `from` (or at the first data
    /// row when `from` is `None`).
    pub fn open(path: &Path, from: Option<ReadPosition>) -> Result<Self, ManifestError> {
        let _ = (path, from);
        todo!("manifest row reader")
    }

    /// The names of the extra columns, in header order, as written.
    pub fn extra_columns(&self) -> &[String] {
        todo!()
    }

    /// The next row, with the position just after it; `None` at the end.
    pub fn next_row(&mut self) -> Result<Option<(ManifestRow, ReadPosition)>, ManifestError> {
        todo!()
    }
}
