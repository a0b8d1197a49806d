//! Configuration: built-in defaults, overridden by a TOML file, overridden by `BREAKWATER_*` environment
//! variables and command-line flags (clap merges those two).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings of `breakwater serve`, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Root of the content store, and of the SQLite database when no metadata URL is given.
    pub data: PathBuf,
    /// `sqlite://...` or `postgres://...`.
    pub metadata: String,
    pub log_format: LogFormat,
    pub delete_enabled: bool,
}

/// The TOML file: every key optional, names as in the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data: Option<PathBuf>,
    pub metadata: Option<String>,
    pub log_format: Option<LogFormat>,
    pub delete_enabled: Option<bool>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
pub const DEFAULT_DATA: &str = "./breakwater-data";

/// The embedded metadata store's URL for a data directory.
pub fn sqlite_url(data: &Path) -> String {
    format!("sqlite://{}?mode=rwc", data.join("metadata.db").display())
}
