//! The command line of `cdb2rabbit`, shared by the binary and by the man
//! page and shell completions (`cargo xtask`), so they cannot disagree.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use packuilon_common::config;
use packuilon_common::logging::LogTarget;

/// Finds the Quattor profiles that changed on the Aquilon broker and
/// publishes them to the RabbitMQ build queue (confirmed, none lost).
#[derive(Debug, Parser)]
#[command(
    name = "cdb2rabbit",
    version,
    after_help = "Exit status: 0 all processed; 1 something failed (retried next run); 2 configuration error."
)]
pub struct Cli {
    /// config.ini to read [default: $PACKER_UTILS_CONFIG or /etc/packer-utils/config.ini]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Publish every profile matching PROFILE_MATCH, changed or not.
    #[arg(long, conflicts_with = "profile")]
    pub all: bool,

    /// Publish this profile (as named in the index, e.g. ns/host.example.org.json)
    /// whatever the cache says; repeatable.
    #[arg(long, value_name = "NAME")]
    pub profile: Vec<String>,

    /// Print what would be published (one "would publish: NAME" line each);
    /// touch neither the broker nor the cache.
    #[arg(long)]
    pub dry_run: bool,

    /// Where log lines go [default: stderr on a terminal, journald under systemd, syslog otherwise]
    #[arg(long, value_enum, value_name = "TARGET")]
    pub log: Option<LogTarget>,

    /// How long to wait for another run to release the cache lock (e.g. 600, 10m).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub lock_wait: Duration,

    /// The unix time cdp-listend passes (the broker's notification time); ignored.
    #[arg(value_name = "UNIX_TIME")]
    pub cdp_time: Option<u64>,
}

fn parse_duration(v: &str) -> Result<Duration, String> {
    config::parse_duration(v).ok_or_else(|| format!("not a duration: {v:?}"))
}
