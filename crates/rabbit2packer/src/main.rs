//! `rabbit2packer`: the daemon (default), its `status` / `history` commands
//! (read the journal), `plan` (a build without building) and `rebuild` /
//! `cancel` / `retry` (ask the daemon); `migrate-journal` (SQLite to the site journal).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use packuilon_common::logging;
use rabbit2packer::cli::{Cli, Command};
use rabbit2packer::control::Request;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = packuilon_common::config::resolve_path(cli.config.clone());
    match cli.command {
        None | Some(Command::Run) => {
            logging::init("rabbit2packer", cli.log);
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(rabbit2packer::daemon::run(&config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::from(e.exit_code() as u8)
                }
            }
        }
        Some(Command::Status { json, state_dir }) if state_dir.is_none() && site_config(&config).is_some() => {
            let sources = source_images(&config);
            site_report(&config, async |site| {
                rabbit2packer::history::site_status(site, sources.as_ref(), json).await
            })
        }
        Some(Command::History {
            image,
            json,
            limit,
            state_dir: None,
        }) if site_config(&config).is_some() => site_report(&config, async |site| {
            rabbit2packer::history::site_history(site, image.as_deref(), limit, json).await
        }),
        Some(Command::Status { json, state_dir }) => {
            let sources = source_images(&config);
            report(&config, state_dir, |j| {
                rabbit2packer::history::status(j, sources.as_ref(), json)
            })
        }
        Some(Command::History {
            image,
            json,
            limit,
            state_dir,
        }) => report(&config, state_dir, |j| {
            rabbit2packer::history::history(j, image.as_deref(), limit, json)
        }),
        Some(Command::Plan { profile, out, rotation }) => plan(&config, &profile, out.as_deref(), rotation),
        Some(Command::Rebuild {
            image_key: Some(image_key),
            state_dir,
            ..
        }) => control(&config, state_dir, Request::Rebuild { image_key }),
        Some(Command::Rebuild {
            image_key: None,
            state_dir,
            ..
        }) => control(&config, state_dir, Request::RebuildOutdated),
        Some(Command::Rollback {
            image_key,
            again,
            dry_run,
            state_dir,
        }) => rollback(&config, state_dir, &image_key, again, dry_run),
        Some(Command::MigrateJournal {
            to,
            password_file,
            state_dir,
        }) => migrate_journal(&config, state_dir, &to, password_file.as_deref()),
        Some(Command::Cancel { job, state_dir }) => control(&config, state_dir, Request::Cancel { job }),
        Some(Command::Retry { job, state_dir }) => control(&config, state_dir, Request::Retry { job }),
    }
}

/// The config's settings, or the exit status of its error (said on stderr).
fn settings(config: &std::path::Path) -> Result<rabbit2packer::daemon::Settings, ExitCode> {
    rabbit2packer::daemon::load_settings(config).map_err(|e| {
        eprintln!("rabbit2packer: {e}");
        ExitCode::from(e.exit_code() as u8)
    })
}

fn state_dir_of(config: &std::path::Path, state_dir: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    match state_dir {
        Some(d) => Ok(d),
        None => settings(config).map(|s| s.r2p.state_dir),
    }
}

/// `plan`: what a build of the profile would do (exit 0 valid, 1 would fail, 2 bad input).
fn plan(
    config: &std::path::Path,
    profile: &std::path::Path,
    out: Option<&std::path::Path>,
    rotation: bool,
) -> ExitCode {
    let settings = match settings(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match rabbit2packer::plan::plan(&settings, profile, out, rotation) {
        Ok(p) => {
            print!("{}", p.report);
            ExitCode::from(if p.ok { 0 } else { 1 })
        }
        Err(e) => {
            eprintln!("rabbit2packer: {e}");
            ExitCode::from(2)
        }
    }
}

/// `rollback`: the previous image of each of the key's names back under its name.
fn rollback(
    config: &std::path::Path,
    state_dir: Option<PathBuf>,
    image_key: &str,
    again: bool,
    dry_run: bool,
) -> ExitCode {
    let settings = match settings(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let dir = state_dir.unwrap_or_else(|| settings.r2p.state_dir.clone());
    let journal = match rabbit2packer::journal::Journal::open_read_only(&dir) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("rabbit2packer: {e}");
            return ExitCode::from(2);
        }
    };
    match rabbit2packer::rollback::rollback(&settings, &journal, image_key, again, dry_run) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            if let rabbit2packer::rollback::RollbackError::Failed { report, .. } = &e {
                print!("{report}");
            }
            eprintln!("rabbit2packer: rollback: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `migrate-journal`: this host's SQLite journal into the site journal.
fn migrate_journal(
    config: &std::path::Path,
    state_dir: Option<PathBuf>,
    url: &str,
    password_file: Option<&std::path::Path>,
) -> ExitCode {
    let state_dir = match state_dir_of(config, state_dir) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rabbit2packer: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(rabbit2packer::migrate_journal::migrate(&state_dir, url, password_file)) {
        Ok(copied) => {
            println!("{copied}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rabbit2packer: migrate-journal: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `rebuild`, `cancel`, `retry`: asks the running daemon.
fn control(config: &std::path::Path, state_dir: Option<PathBuf>, req: Request) -> ExitCode {
    let state_dir = match state_dir_of(config, state_dir) {
        Ok(d) => d,
        Err(code) => return code,
    };
    match rabbit2packer::control::send(&state_dir, &req) {
        Ok(reply) => {
            println!("{}", reply.message);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rabbit2packer: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// IMAGES_CONFIG's source images (outdated images): without a readable
/// config or file they are not listed.
fn source_images(config: &std::path::Path) -> Option<std::collections::BTreeMap<String, String>> {
    let settings = rabbit2packer::daemon::load_settings(config).ok()?;
    rabbit2packer::outdated::read_source_images(&settings.r2p.images_config).ok()
}

/// `[rabbit2packer] STATE_DB` and its keys, when config.ini names a site journal.
fn site_config(config: &std::path::Path) -> Option<packuilon_common::config::SiteConfig> {
    rabbit2packer::daemon::load_settings(config).ok()?.r2p.site
}

/// Prints what `f` reads from the site journal (STATE_DB): the whole site.
fn site_report(
    config: &std::path::Path,
    f: impl AsyncFnOnce(
        &rabbit2packer::site_journal::SiteJournal,
    ) -> Result<String, rabbit2packer::site_journal::SiteJournalError>,
) -> ExitCode {
    let Some(site) = site_config(config) else {
        return ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rabbit2packer: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let out = rt.block_on(async {
        let journal =
            rabbit2packer::site_journal::SiteJournal::connect(&site.url, site.password_file.as_deref()).await?;
        f(&journal).await
    });
    print_report(out, |e| if e.is_config() { 2 } else { 1 })
}

/// Prints a report, or its error on stderr with the exit status `code` gives.
fn print_report<E: std::fmt::Display>(out: Result<String, E>, code: impl FnOnce(&E) -> u8) -> ExitCode {
    match out {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rabbit2packer: {e}");
            ExitCode::from(code(&e))
        }
    }
}

fn report(
    config: &std::path::Path,
    state_dir: Option<PathBuf>,
    f: impl FnOnce(&rabbit2packer::journal::Journal) -> Result<String, rabbit2packer::journal::JournalError>,
) -> ExitCode {
    let state_dir = match state_dir_of(config, state_dir) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let out = rabbit2packer::journal::Journal::open_read_only(&state_dir).and_then(|j| f(&j));
    print_report(out, |_| 1)
}
