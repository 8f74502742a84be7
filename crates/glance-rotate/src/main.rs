//! `rename-old-images`: archives the older Glance images of a name and moves
//! their members to the new image. The original's call form still works:
//! `rename-old-images sl7x-x86_64 inventory AQ` (the words are the name).
//!
//! Exit status: 0 done (or nothing to do), 1 the rotation failed (the HTTP
//! status and Glance's message are logged), 2 bad arguments or configuration.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use glance_rotate::cli::Cli;
use glance_rotate::{credentials_from_rc, Credentials, RotateOptions, Target};
use packuilon_common::config::{self, IniFile, RotationConfig};
use packuilon_common::logging;
use packuilon_common::{EXIT_CONFIG, EXIT_FAILED};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_CONFIG } else { 0 };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    logging::init("rename-old-images", cli.log);
    let (creds, opts, target) = match setup(&cli) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED as u8);
        }
    };
    match rt.block_on(glance_rotate::rotate_with_credentials(creds, target, &opts)) {
        Ok(report) => {
            if report.dry_run {
                print_plan(&report);
            }
            tracing::info!(
                "{}: {} image(s) archived, {} member(s) moved, {} archive(s) deleted, {} HTTP requests{}",
                if report.name.is_empty() {
                    "rotation"
                } else {
                    report.name.as_str()
                },
                report.archived.len(),
                report.members_moved.len(),
                report.deleted.len(),
                report.http_requests,
                if report.dry_run {
                    " (dry run: nothing changed)"
                } else {
                    ""
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) if e.is_config() => {
            tracing::error!("{e}");
            ExitCode::from(EXIT_CONFIG as u8)
        }
        Err(e) => {
            tracing::error!("rotation failed: {e}");
            ExitCode::from(EXIT_FAILED as u8)
        }
    }
}

/// `--dry-run`: the plan on stdout, one action per line, whatever the log target.
fn print_plan(r: &glance_rotate::Report) {
    if let Some(why) = &r.skipped {
        println!("nothing to do: {why}");
    }
    if !r.new_image_id.is_empty() {
        println!("new image {} {:?}", r.new_image_id, r.name);
    }
    if r.shared_new_image {
        println!("share {} (private, has members to receive)", r.new_image_id);
    }
    for (member, from, to) in &r.members_moved {
        println!("move member {member} from {from} to {to}");
    }
    for (id, old, new) in &r.archived {
        println!("rename {id} {old:?} -> {new:?}");
    }
    for id in &r.deleted {
        println!("delete {id} (KEEP_ARCHIVES)");
    }
    for (id, why) in &r.kept {
        println!("keep {id}: {why}");
    }
    for (id, why) in &r.left_alone {
        println!("leave {id}: {why}");
    }
}

/// Credentials, options and target from the arguments and config; errors here mean exit 2.
fn setup(cli: &Cli) -> anyhow::Result<(Credentials, RotateOptions, Target)> {
    let explicit = cli.config.is_some() || std::env::var_os(config::CONFIG_ENV).is_some_and(|v| !v.is_empty());
    let path = config::resolve_path(cli.config.clone());
    let rotation = if explicit || path.exists() {
        IniFile::load(&path)?.rotation()?
    } else {
        RotationConfig::default()
    };
    let rc = cli.auth_file.clone().or_else(|| rotation.admin_auth_file.clone());
    let creds = match &rc {
        Some(rc) => {
            if !rc.exists() {
                anyhow::bail!("{}: auth file does not exist", rc.display());
            }
            credentials_from_rc(rc)?
        }
        None => Credentials::from_env(&Credentials::process_env())
            .context("no auth file (--auth-file or PACKER_ADMIN_AUTH_FILE) and the environment has no credentials")?,
    };
    let mut opts = RotateOptions::from(&rotation);
    opts.dry_run = cli.dry_run;
    let target = match &cli.image_id {
        Some(id) if id.trim().is_empty() => anyhow::bail!("--image-id: empty"),
        Some(id) => Target::ImageId(id.trim().to_string()),
        None => {
            let name = cli.name.join(" ");
            if name.trim().is_empty() {
                anyhow::bail!("the image name is empty");
            }
            Target::Name {
                name,
                created_after: None,
            }
        }
    };
    Ok((creds, opts, target))
}
