//! `rabbit2packer`: the daemon (default) and its `status` / `history` commands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use packuilon_common::logging;
use rabbit2packer::cli::{Cli, Command};

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
