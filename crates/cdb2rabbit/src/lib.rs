//! cdb2rabbit: finds the Quattor profiles that changed on the Aquilon broker
//! and publishes them to the RabbitMQ build queue, losing none.
//!
//! The data flows through one module per concept:
//! - [`index`]: `profiles-info.xml` (the broker's index and the cached copy of it);
//! - [`names`]: which profile names are accepted (they become paths);
//! - [`fetch`]: HTTP(S) downloads with limits and gzip;
//! - [`concurrency`]: how many download at once, adapting to the web server;
//! - [`publish`]: confirmed, mandatory, persistent publishes;
//! - [`cache`]: CACHE_DIR (cached index, cached profiles, run lock), atomic writes,
//!   and the run's transaction, which keeps the order that makes them durable;
//! - [`run`](mod@run): one run, and the rule that only confirmed publishes advance the cache;
//! - [`metrics_file`]: what the run did, for node_exporter's textfile collector.
//!
//! Not here: building images (rabbit2packer) or anything about Glance.

pub mod cache;
pub mod cli;
pub mod concurrency;
pub mod fetch;
pub mod index;
pub mod json;
pub mod metrics_file;
pub mod names;
pub mod publish;
pub mod run;

pub use run::{run, Mode, Options, RunError, Summary};
