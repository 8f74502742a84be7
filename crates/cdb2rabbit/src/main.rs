//! `cdb2rabbit`: run from cron, a systemd timer, or the ncm-cdispd hook
//! (cdp-listend passes a unix time, accepted and ignored). Parses arguments,
//! loads config.ini, runs once, exits 0 (all done), 1 (something failed and
//! is retried next run) or 2 (configuration or usage error).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use packuilon_common::config::{self, IniFile};
use packuilon_common::logging::{self, LogTarget};
use packuilon_common::{EXIT_CONFIG, EXIT_FAILED};

use cdb2rabbit::{Mode, Options};

/// Finds the Quattor profiles that changed on the Aquilon broker and
/// publishes them to the RabbitMQ build queue (confirmed, none lost).
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Exit status: 0 all processed; 1 something failed (retried next run); 2 configuration error."
)]
struct Cli {
    /// config.ini to read [default: $PACKER_UTILS_CONFIG or /etc/packer-utils/config.ini]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Publish every profile matching PROFILE_MATCH, changed or not.
    #[arg(long, conflicts_with = "profile")]
    all: bool,

    /// Publish this profile (as named in the index, e.g. ns/host.example.org.json)
    /// whatever the cache says; repeatable.
    #[arg(long, value_name = "NAME")]
    profile: Vec<String>,

    /// Print what would be published (one "would publish: NAME" line each);
    /// touch neither the broker nor the cache.
    #[arg(long)]
    dry_run: bool,

    /// Where log lines go [default: stderr on a terminal, journald under systemd, syslog otherwise]
    #[arg(long, value_enum, value_name = "TARGET")]
    log: Option<LogTarget>,

    /// How long to wait for another run to release the cache lock (e.g. 600, 10m).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    lock_wait: Duration,

    /// The unix time cdp-listend passes (the broker's notification time); ignored.
    #[arg(value_name = "UNIX_TIME")]
    cdp_time: Option<u64>,
}

fn parse_duration(v: &str) -> Result<Duration, String> {
    config::parse_duration(v).ok_or_else(|| format!("not a duration: {v:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init("cdb2rabbit", cli.log);
    ExitCode::from(run(cli) as u8)
}

fn run(cli: Cli) -> i32 {
    let path = config::resolve_path(cli.config);
    let mut warnings = Vec::new();
    let loaded = IniFile::load(&path).and_then(|ini| Ok((ini.global(&mut warnings)?, ini.cdb2rabbit(&mut warnings)?)));
    let (global, cdb) = match loaded {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return EXIT_CONFIG;
        }
    };
    for w in warnings {
        tracing::warn!("{w}");
    }
    let options = Options {
        mode: if cli.all {
            Mode::All
        } else if !cli.profile.is_empty() {
            Mode::Named(cli.profile)
        } else {
            Mode::Changed
        },
        dry_run: cli.dry_run,
        lock_wait: cli.lock_wait,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("{e:#}");
            return EXIT_FAILED;
        }
    };
    match runtime.block_on(cdb2rabbit::run(&global, &cdb, &options)) {
        Ok(summary) => summary.exit_status(),
        Err(e) => {
            tracing::error!("{e}");
            e.exit_status()
        }
    }
}
