//! `cdb2rabbit`: run from cron, a systemd timer, or the ncm-cdispd hook
//! (cdp-listend passes a unix time, accepted and ignored). Parses arguments,
//! loads config.ini, runs once, exits 0 (all done), 1 (something failed and
//! is retried next run) or 2 (configuration or usage error).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use packuilon_common::config::{self, IniFile};
use packuilon_common::logging;
use packuilon_common::{EXIT_CONFIG, EXIT_FAILED};

use cdb2rabbit::cli::Cli;
use cdb2rabbit::metrics_file::{self, RunMetrics};
use cdb2rabbit::{Mode, Options};

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
    let started = std::time::Instant::now();
    let outcome = runtime.block_on(cdb2rabbit::run(&global, &cdb, &options));
    let status = match &outcome {
        Ok(summary) => summary.exit_status(),
        // A queue of the other type than QUEUE_TYPE: named with the file, as a config error.
        Err(e @ cdb2rabbit::RunError::BrokerConfig(_)) => {
            tracing::error!("{}: {e}", path.display());
            e.exit_status()
        }
        Err(e) => {
            tracing::error!("{e}");
            e.exit_status()
        }
    };
    // A dry run touches nothing, the metrics file included.
    if let (Some(path), false) = (&cdb.metrics_file, options.dry_run) {
        let summary = outcome.as_ref().ok();
        let metrics = RunMetrics {
            finished: std::time::SystemTime::now(),
            duration: started.elapsed(),
            success: status == 0,
            published: summary.map_or(0, |s| s.published.len()),
            failed: summary.map_or(0, |s| s.failed.len()),
            index_profiles: summary.and_then(|s| s.index_profiles),
        };
        if let Err(e) = metrics_file::write(path, &metrics) {
            tracing::error!("{}: cannot write the metrics file (METRICS_FILE): {e}", path.display());
        }
    }
    status
}
