//! rabbit2packer: consumes profile change requests from RabbitMQ and builds
//! each image with Packer, exactly once per change, losing no request.
//!
//! Follow the data: a delivery (`consumer`) becomes a job in the durable
//! [`journal`] (acked only after the commit); the `scheduler` keeps per
//! image at most one running and one waiting job and hands ready ones to
//! THREAD_COUNT workers; a `job` takes the `catalog`'s templates for the
//! image, `render`s each to a build file, [`runner`] runs packer in its own
//! process group while [`build_log`] writes the log operators know; the new
//! image gets its `provenance` properties, waits for its test at the `gate`
//! (TEST_COMMAND), and is rotated (glance-rotate). [`history`] reads the journal for
//! `status` and `history`; [`daemon`] ties the life cycle together.
//! Beside the data path: [`status`] serves the status page, its API and the
//! [`metrics`]; `alerts` tells a person when an image starts failing or
//! recovers (mail, webhook), and [`control`] takes the operators'
//! `rebuild`, `cancel` and `retry` over a Unix socket.
//!
//! Several daemons (`STATE_DB`): the journal lives in PostgreSQL,
//! [`site_journal`], shared by the daemons of a site; `site` schedules the
//! daemon's work on it (claims under leases, LISTEN/NOTIFY), and
//! [`migrate_journal`] copies a host's SQLite journal into it.
//!
//! The API (for the binary, xtask's man pages, the tests and benchmarks):
//! [`cli`], [`daemon::run`] and [`daemon::load_settings`], the
//! [`journal::Journal`]'s records and [`history`]'s reports of them, the
//! [`status`] server's address and serving (its tests start the daemon itself), and
//! what the tests check on disk ([`build_log::logs_of`],
//! [`runner::group_members`]). The rest is `pub(crate)`.
//!
//! Not here: profile names and `$METADATA` (packuilon-common::profile),
//! config.ini (packuilon-common::config), Glance (glance-rotate).

pub mod alerts;
pub mod build_log;
pub(crate) mod catalog;
pub mod cli;
pub(crate) mod consumer;
pub mod control;
pub mod daemon;
pub(crate) mod gate;
pub mod history;
pub(crate) mod job;
pub mod journal;
pub mod metrics;
pub mod migrate_journal;
pub mod outdated;
pub mod plan;
pub(crate) mod provenance;
pub(crate) mod render;
pub mod rollback;
pub mod runner;
pub(crate) mod scheduler;
pub(crate) mod site;
pub mod site_journal;
pub mod status;

pub use catalog::{CatalogError, LoadError};
