//! `cargo xtask`-style build tasks, run by the Makefile (never installed).
//!
//! `xtask assets DIR` writes what the packages ship besides the binaries,
//! generated from the binaries' own clap definitions so that `--help`, the
//! man pages and the completions can never disagree:
//! - `DIR/man/<command>.1`, and `rabbit2packer-<subcommand>.1` for each
//!   subcommand (the man page lists them), gzipped by the packaging step;
//! - `DIR/completions/bash/<command>` for `/usr/share/bash-completion/completions/`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Command, CommandFactory};
use clap_complete::Shell;

fn commands() -> Vec<Command> {
    vec![
        cdb2rabbit::cli::Cli::command(),
        rabbit2packer::cli::Cli::command(),
        glance_rotate::cli::Cli::command(),
    ]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [task, dir] if task == "assets" => assets(Path::new(dir)),
        _ => bail!("usage: xtask assets DIR"),
    }
}

fn assets(dir: &Path) -> Result<()> {
    let man = dir.join("man");
    let bash = dir.join("completions/bash");
    for d in [&man, &bash] {
        // Start empty, so a renamed subcommand leaves no stale page behind.
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    for mut cmd in commands() {
        let name = cmd.get_name().to_string();
        cmd.build();
        clap_mangen::generate_to(cmd.clone(), &man).with_context(|| format!("man pages of {name}"))?;
        let written: PathBuf = clap_complete::generate_to(Shell::Bash, &mut cmd, name.clone(), &bash)
            .with_context(|| format!("bash completion of {name}"))?;
        // bash-completion looks completions up by the command's own name.
        fs::rename(&written, bash.join(&name))?;
    }
    Ok(())
}
