//! `rabbit2packer`: the daemon (default) and its `status` / `history` commands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use packuilon_common::logging::{self, LogTarget};

const AFTER_HELP: &str = "\
Exit status: 0 clean stop; 1 runtime failure (systemd restarts it), such as the journal file
deleted or replaced under the daemon; 2 configuration error (named file and key, or an
unwritable journal named with its owner and mode; fix it, a restart will not).

Signals:
  SIGTERM/SIGINT  stop taking requests, interrupt each packer build (it cleans up in the
                  cloud), wait up to STOP_TIMEOUT; unfinished jobs rerun at the next start.
  SIGHUP          re-read the template map, source images and templates and say what was
                  found (edits are also picked up by themselves when a job starts; a broken
                  one keeps the last good).

Files:
  --config PATH, else $PACKER_UTILS_CONFIG, else /etc/packer-utils/config.ini
  STATE_DIR/rabbit2packer.sqlite  job journal (status, history); STATE_DIR/rejected/ bad messages
  LOG_DIR/<image key>.<template>.<epoch>.log  build logs; <image key>.<template>.log: the newest
  BUILD_FILE_DIR/<image key>.<template>.json  rendered templates packer runs";

/// Builds OpenStack images with Packer for every profile change queued by cdb2rabbit.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, after_help = AFTER_HELP)]
struct Cli {
    /// config.ini to read [default: $PACKER_UTILS_CONFIG, else /etc/packer-utils/config.ini]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Where log lines go [default: stderr on a terminal, journald under systemd, syslog otherwise]
    #[arg(long, global = true, value_enum, value_name = "TARGET")]
    log: Option<LogTarget>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon in the foreground (the default; as systemd runs it).
    Run,
    /// Show pending work: running, waiting and interrupted jobs (reads the journal; works while the daemon runs).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Read the journal in this directory instead of the config's STATE_DIR.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Show the last finished builds, newest first.
    History {
        /// Only this image key (e.g. inventory-sl7x-x86_64).
        image: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// How many jobs.
        #[arg(short = 'n', long, default_value_t = 20)]
        limit: usize,
        /// Read the journal in this directory instead of the config's STATE_DIR.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

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
        Some(Command::Status { json, state_dir }) => {
            report(&config, state_dir, |j| rabbit2packer::history::status(j, json))
        }
        Some(Command::History {
            image,
            json,
            limit,
            state_dir,
        }) => report(&config, state_dir, |j| {
            rabbit2packer::history::history(j, image.as_deref(), limit, json)
        }),
    }
}

fn report(
    config: &std::path::Path,
    state_dir: Option<PathBuf>,
    f: impl FnOnce(&rabbit2packer::journal::Journal) -> Result<String, rabbit2packer::journal::JournalError>,
) -> ExitCode {
    let state_dir = match state_dir {
        Some(d) => d,
        None => match rabbit2packer::daemon::load_settings(config) {
            Ok(s) => s.r2p.state_dir,
            Err(e) => {
                eprintln!("rabbit2packer: {e}");
                return ExitCode::from(e.exit_code() as u8);
            }
        },
    };
    let out = rabbit2packer::journal::Journal::open_read_only(&state_dir).and_then(|j| f(&j));
    match out {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rabbit2packer: {e}");
            ExitCode::from(1)
        }
    }
}
