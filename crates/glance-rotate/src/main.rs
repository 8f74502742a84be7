//! `rename-old-images`: archives the older Glance images of a name and moves
//! their members to the new image. The original's call form still works:
//! `rename-old-images sl7x-x86_64 inventory AQ` (the words are the name).
//!
//! `--show NAME` lists what Glance holds for the name; `--rollback NAME`
//! gives the name back to its newest archive (see `glance_rotate::rollback`).
//!
//! Exit status: 0 done (or nothing to do), 1 the rotation or rollback failed
//! (the HTTP status and Glance's message are logged), 2 bad arguments or
//! configuration.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use glance_rotate::cli::Cli;
use glance_rotate::{
    credentials_from_rc, Credentials, Glance, RollbackReport, RotateError, RotateOptions, Session, ShownImage, Target,
};
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
    let (creds, opts, action) = match setup(&cli) {
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
    let target = match action {
        Action::Rotate(target) => target,
        Action::Show(name) => return finish(rt.block_on(show(creds, &name, cli.json)), "show"),
        Action::Rollback { name, again } => {
            return finish(rt.block_on(rollback(creds, &name, again, &opts, cli.json)), "rollback")
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

/// The exit status of --show or --rollback.
fn finish(r: Result<(), RotateError>, what: &str) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_config() => {
            tracing::error!("{e}");
            ExitCode::from(EXIT_CONFIG as u8)
        }
        Err(e) => {
            tracing::error!("{what} failed: {e}");
            ExitCode::from(EXIT_FAILED as u8)
        }
    }
}

fn glance(creds: Credentials) -> Result<Glance, RotateError> {
    Ok(Glance::new(Arc::new(Session::new(creds)?)))
}

/// `--show`: a table (or JSON) on stdout.
async fn show(creds: Credentials, name: &str, json: bool) -> Result<(), RotateError> {
    let images = glance_rotate::show(&glance(creds)?, name).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&images).unwrap_or_default());
    } else if images.is_empty() {
        println!("no image named {name:?}, and no archive or broken image of it");
    } else {
        print_images(&images);
    }
    Ok(())
}

/// One row per image (ROLE ... NAME), then an indented line of its details.
fn print_images(images: &[ShownImage]) {
    let rows: Vec<[String; 7]> = images
        .iter()
        .map(|i| {
            let since = match i.role {
                glance_rotate::Role::Live => &i.created_at,
                glance_rotate::Role::Archive => i.archived_at.as_ref().unwrap_or(&i.created_at),
                glance_rotate::Role::Broken => i.broken_at.as_ref().unwrap_or(&i.created_at),
            };
            [
                i.role.as_str().to_string(),
                i.id.clone(),
                i.status.clone(),
                format!("{}{}", i.visibility, if i.os_hidden { ",hidden" } else { "" }),
                i.members.to_string(),
                since.clone(),
                format!("{:?}", i.name),
            ]
        })
        .collect();
    let head = ["ROLE", "ID", "STATUS", "VISIBILITY", "MEMBERS", "SINCE", "NAME"];
    let mut widths = head.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (k, (c, w)) in cells.iter().zip(widths).enumerate() {
            if k + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{out}");
    };
    line(&head.map(String::from));
    for (i, r) in images.iter().zip(&rows) {
        line(r);
        let mut details = vec![format!("owner={}", i.owner.as_deref().unwrap_or("none"))];
        if let Some(x) = &i.restored_from {
            details.push(format!("restored_from={x}"));
        }
        if let Some(x) = &i.rolled_back_to {
            details.push(format!("rolled_back_to={x}"));
        }
        details.extend(i.properties.iter().map(|(k, v)| format!("{k}={v:?}")));
        println!("    {}", details.join("  "));
    }
}

/// `--rollback`: what was (or would be) done on stdout, each step in the log.
async fn rollback(
    creds: Credentials,
    name: &str,
    again: bool,
    opts: &RotateOptions,
    json: bool,
) -> Result<(), RotateError> {
    let g = glance(creds)?;
    let r = if again {
        glance_rotate::rollback_again(&g, name, opts).await?
    } else {
        glance_rotate::rollback(&g, name, opts).await?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        print_rollback(&r);
    }
    tracing::info!(
        "{}: {}, {} member(s) moved, {} HTTP requests{}",
        r.name,
        if r.already_done {
            "already rolled back".to_string()
        } else {
            format!("image {} has the name", r.restored_image_id)
        },
        r.members_moved.len(),
        r.http_requests,
        if r.dry_run { " (dry run: nothing changed)" } else { "" }
    );
    Ok(())
}

fn print_rollback(r: &RollbackReport) {
    print!("{}", r.text());
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

/// What the command line asks for.
enum Action {
    Rotate(Target),
    Show(String),
    Rollback { name: String, again: bool },
}

/// Credentials, options and action from the arguments and config; errors here mean exit 2.
fn setup(cli: &Cli) -> anyhow::Result<(Credentials, RotateOptions, Action)> {
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
    let action = match &cli.image_id {
        Some(id) if id.trim().is_empty() => anyhow::bail!("--image-id: empty"),
        Some(id) => Action::Rotate(Target::ImageId(id.trim().to_string())),
        None => {
            let name = cli.name.join(" ");
            if name.trim().is_empty() {
                anyhow::bail!("the image name is empty");
            }
            if cli.show {
                Action::Show(name)
            } else if cli.rollback {
                Action::Rollback { name, again: cli.again }
            } else {
                Action::Rotate(Target::Name {
                    name,
                    created_after: None,
                })
            }
        }
    };
    Ok((creds, opts, action))
}
