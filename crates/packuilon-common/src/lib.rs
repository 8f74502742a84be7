//! What the Packuilon binaries share.
//!
//! - [`config`]: `/etc/packer-utils/config.ini`, loaded and validated once at
//!   start-up into typed sections; every error names the file, section and key.
//! - [`logging`]: syslog / journald / stderr logging under the original idents.
//! - [`rabbit`]: connecting to RabbitMQ (with the original's retry policy) and
//!   declaring the build queue exactly as the original did.
//! - [`profile`]: the bits of a compiled Quattor profile that name an image,
//!   and the names derived from them (image key, `$NAME`, `$METADATA`).
//! - [`rcfile`]: OpenStack RC files, sourced by bash (they hold logic).
//!
//! Not here: anything that talks HTTP or runs Packer; those belong to the
//! crate of the binary that needs them.

pub mod config;
pub mod logging;
pub mod profile;
pub mod rabbit;
pub mod rcfile;

/// Exit status for configuration and usage errors, shared by every binary.
pub const EXIT_CONFIG: i32 = 2;
/// Exit status when some of the work failed (and will be retried).
pub const EXIT_FAILED: i32 = 1;
