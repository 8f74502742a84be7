//! The command line of `rename-old-images`, shared by the binary and by the
//! man page and shell completions (`cargo xtask`).

use std::path::PathBuf;

use clap::Parser;
use packuilon_common::logging::LogTarget;

/// Archive older Glance images of a name and move their members to the new image.
///
/// Credentials: --auth-file, else [rabbit2packer] PACKER_ADMIN_AUTH_FILE of the
/// config (default /etc/packer-utils/admin-auth.sh when it exists), else the OS_*
/// variables of the environment. Rotation keys come from the config's
/// [rabbit2packer] section: ARCHIVE_NAME, HIDE_ARCHIVED, KEEP_ARCHIVES, BROKEN_NAME.
///
/// --show lists what Glance holds for the name (live image, archives, broken
/// images); --rollback gives the name back to its newest archive.
#[derive(Debug, Parser)]
#[command(name = "rename-old-images", version)]
#[command(group(clap::ArgGroup::new("action").args(["show", "rollback"])))]
pub struct Cli {
    /// config.ini (default: $PACKER_UTILS_CONFIG, else /etc/packer-utils/config.ini; a missing default is fine).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// OpenStack RC file to source with bash (admin credentials).
    #[arg(long, value_name = "RC")]
    pub auth_file: Option<PathBuf>,
    /// The new image's ID (instead of a name).
    #[arg(long, value_name = "ID", conflicts_with = "name")]
    pub image_id: Option<String>,
    /// Print the plan, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// List the live image of the name, its archives and its broken images,
    /// with their provenance properties; change nothing.
    #[arg(long, conflicts_with_all = ["image_id", "dry_run"])]
    pub show: bool,
    /// Roll the name back: its newest archive takes the name again, the live
    /// image is renamed BROKEN_NAME (private) and its members move back. Run
    /// again after a failure to finish; a finished rollback is not repeated.
    #[arg(long, conflicts_with = "image_id")]
    pub rollback: bool,
    /// With --rollback: also when the live image was itself restored by a
    /// rollback (goes back one more archive each time).
    #[arg(long, requires = "rollback")]
    pub again: bool,
    /// With --show or --rollback: print JSON on stdout instead of text.
    #[arg(long, requires = "action")]
    pub json: bool,
    /// Where log lines go (default: stderr on a terminal, journald under systemd, syslog otherwise).
    #[arg(long, value_enum, value_name = "TARGET")]
    pub log: Option<LogTarget>,
    /// The image name; several words are joined with spaces. The new image is
    /// the newest active image of exactly that name.
    #[arg(value_name = "WORD", required_unless_present = "image_id")]
    pub name: Vec<String>,
}
