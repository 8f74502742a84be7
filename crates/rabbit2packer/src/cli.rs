//! The command line of `rabbit2packer` and its subcommands, shared by the
//! binary and by the man pages and shell completions (`cargo xtask`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use packuilon_common::logging::LogTarget;

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

Control (rebuild, cancel, retry): sent to the running daemon over STATE_DIR/control.sock
(mode 0600, the service user's; the daemon also checks the caller is root or that user).
Exit status 0 done; 1 refused (unknown image or job, wrong state, not allowed) or no daemon;
2 bad arguments or configuration.

Files:
  --config PATH, else $PACKER_UTILS_CONFIG, else /etc/packer-utils/config.ini
  STATE_DIR/rabbit2packer.sqlite  job journal (status, history); STATE_DIR/rejected/ bad messages
  STATE_DIR/control.sock  where rebuild, cancel and retry reach the daemon
  LOG_DIR/<image key>.<template>.<epoch>.log  build logs; <image key>.<template>.log: the newest
  BUILD_FILE_DIR/<image key>.<template>.json  rendered templates packer runs";

/// Builds OpenStack images with Packer for every profile change queued by cdb2rabbit.
#[derive(Debug, Parser)]
// No `help` subcommand (`rabbit2packer status --help` is the way): it would
// only add a man page per subcommand that says "print this message".
#[command(name = "rabbit2packer", version, about, long_about = None, after_help = AFTER_HELP, disable_help_subcommand = true)]
pub struct Cli {
    /// config.ini to read [default: $PACKER_UTILS_CONFIG, else /etc/packer-utils/config.ini]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Where log lines go [default: stderr on a terminal, journald under systemd, syslog otherwise]
    #[arg(long, global = true, value_enum, value_name = "TARGET")]
    pub log: Option<LogTarget>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    /// Show what a build of a profile would do, building nothing: the image key, the
    /// templates chosen (and why), the source image, and `packer validate` on each
    /// rendered build file (--rotation: and what the rotation would do). Exit 0 all
    /// valid; 1 something would fail (named); 2 bad arguments, profile or config.
    Plan {
        /// The profile (JSON, as cdb2rabbit publishes it).
        profile: PathBuf,
        /// Also write the rendered build files here.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Also show what the rotation would archive and which members it would
        /// move (read-only Glance calls with the rotation's credentials).
        #[arg(long)]
        rotation: bool,
    },
    /// Queue a build of an image with the newest profile the journal holds for it,
    /// or with --outdated of every image built from a source image IMAGES_CONFIG no
    /// longer names (the running daemon does it; root or the service user only).
    Rebuild {
        /// The image key (e.g. inventory-sl7x-x86_64; see `history`).
        #[arg(required_unless_present = "outdated", conflicts_with = "outdated")]
        image_key: Option<String>,
        /// Every outdated image (see `status`).
        #[arg(long)]
        outdated: bool,
        /// The daemon's STATE_DIR (its control socket) instead of the config's.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Put the previous image of an image key back under its name: for each image
    /// its builds make, the newest archive becomes live again, the live image is
    /// renamed BROKEN_NAME and its members move back (as `rename-old-images
    /// --rollback`, with the rotation's credentials). Idempotent; a rerun finishes
    /// one stopped half-way. Exit 0 done (or nothing to do); 1 failed (named); 2 bad
    /// arguments, unknown image key or configuration.
    Rollback {
        /// The image key (e.g. inventory-sl7x-x86_64; see `history`).
        image_key: String,
        /// Go back one more archive when the live image is itself a rollback's.
        #[arg(long)]
        again: bool,
        /// Print what would be done, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Read the journal in this directory instead of the config's STATE_DIR.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Copy this host's SQLite journal (jobs with their history, builds and their logs,
    /// the bodies it kept, image health) into the shared PostgreSQL site journal. Once per
    /// journal (a second run is refused); the daemon of STATE_DIR must be stopped. Jobs
    /// running or interrupted arrive waiting. Exit 0 copied; 1 refused or failed (named);
    /// 2 bad URL, no journal in STATE_DIR, or configuration error.
    MigrateJournal {
        /// The site journal: postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?sslmode=...]
        #[arg(long, value_name = "URL")]
        to: String,
        /// Read the database password from this file (its first line).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// Copy the journal in this directory instead of the config's STATE_DIR.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Stop a waiting or running job: packer is interrupted and cleans up; the job
    /// is recorded as cancelled (root or the service user only).
    Cancel {
        /// The job's number (see `status`).
        job: i64,
        /// The daemon's STATE_DIR (its control socket) instead of the config's.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Run a failed or cancelled job again, as a new job with its profile
    /// (root or the service user only).
    Retry {
        /// The job's number (see `history`).
        job: i64,
        /// The daemon's STATE_DIR (its control socket) instead of the config's.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}
