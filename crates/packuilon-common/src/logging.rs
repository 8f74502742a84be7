//! Logging under the original's syslog idents (`cdb2rabbit`, `rabbit2packer`,
//! `rename-old-images`), with the original's wording at the call sites.
//!
//! Where the lines go: `--log stderr|syslog|journald`, or by default stderr
//! on a terminal, the journal under systemd, syslog otherwise. A target that
//! cannot be opened (no journald socket, no `/dev/log`) falls back to stderr
//! with a warning there, so a message is never silently dropped. The level
//! comes from `PACKUILON_LOG` (`RUST_LOG` syntax; default [`DEFAULT_FILTER`]).

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogTarget {
    Stderr,
    Syslog,
    Journald,
}

impl LogTarget {
    /// stderr on a terminal, journald under systemd, syslog otherwise.
    pub fn detect() -> LogTarget {
        if std::io::stderr().is_terminal() {
            LogTarget::Stderr
        } else if std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some() {
            LogTarget::Journald
        } else {
            LogTarget::Syslog
        }
    }
}

/// The filter without `PACKUILON_LOG`/`RUST_LOG`: `info`, without the AMQP
/// client's own lines. lapin logs every refused login or dropped
/// connection as several ERROR lines ("Exponential backoff attempts
/// exhausted" on the first of ten attempts); our callers already log each
/// failure once, with the endpoint and what happens next.
/// `PACKUILON_LOG=info,lapin=debug` brings them back.
pub const DEFAULT_FILTER: &str = "info,lapin=off";

fn default_filter() -> EnvFilter {
    EnvFilter::try_from_env("PACKUILON_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

/// Installs the global subscriber for `ident`; returns the target in use.
/// Call once, first thing in `main`.
pub fn init(ident: &'static str, target: Option<LogTarget>) -> LogTarget {
    let filter = default_filter;
    let wanted = target.unwrap_or_else(LogTarget::detect);
    let mut fallback_reason = None;
    match wanted {
        LogTarget::Journald => match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_syslog_identifier(ident.to_string());
                tracing_subscriber::registry().with(layer.with_filter(filter())).init();
                return LogTarget::Journald;
            }
            Err(e) => fallback_reason = Some(format!("journald unavailable ({e})")),
        },
        LogTarget::Syslog => {
            let formatter = syslog::Formatter3164 {
                facility: syslog::Facility::LOG_USER,
                hostname: None,
                process: ident.to_string(),
                pid: std::process::id(),
            };
            match syslog::unix(formatter) {
                Ok(logger) => {
                    let layer = SyslogLayer {
                        logger: Mutex::new(logger),
                    };
                    tracing_subscriber::registry().with(layer.with_filter(filter())).init();
                    return LogTarget::Syslog;
                }
                Err(e) => fallback_reason = Some(format!("syslog unavailable ({e})")),
            }
        }
        LogTarget::Stderr => {}
    }
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry().with(layer.with_filter(filter())).init();
    if let Some(reason) = fallback_reason {
        tracing::warn!("{reason}: logging to stderr instead");
    }
    LogTarget::Stderr
}

type SyslogLogger = syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>;

/// Sends each event to syslog as one line: the message, then its fields.
struct SyslogLayer {
    logger: Mutex<SyslogLogger>,
}

impl<S: Subscriber> Layer<S> for SyslogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut line = LineVisitor::default();
        event.record(&mut line);
        let text = line.finish();
        let Ok(mut logger) = self.logger.lock() else { return };
        let level = *event.metadata().level();
        let result = if level == Level::ERROR {
            logger.err(&text)
        } else if level == Level::WARN {
            logger.warning(&text)
        } else if level == Level::INFO {
            logger.info(&text)
        } else {
            logger.debug(&text)
        };
        if result.is_err() {
            // syslogd went away: the line still reaches someone.
            eprintln!("{text}");
        }
    }
}

#[derive(Default)]
struct LineVisitor {
    message: String,
    fields: String,
}

impl LineVisitor {
    fn finish(self) -> String {
        if self.fields.is_empty() {
            self.message
        } else {
            format!("{}{}", self.message, self.fields)
        }
    }
}

impl Visit for LineVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects the messages that pass the filter.
    struct Collect(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Collect {
        fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
            let mut line = LineVisitor::default();
            event.record(&mut line);
            self.0.lock().unwrap().push(line.finish());
        }
    }

    #[test]
    fn the_default_filter_keeps_our_lines_and_drops_the_amqp_clients_own() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscriber =
            tracing_subscriber::registry().with(Collect(seen.clone()).with_filter(EnvFilter::new(DEFAULT_FILTER)));
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "lapin::io_loop", "Exponential backoff attempts exhausted, aborting recovery");
            tracing::error!(target: "lapin", "Connection error");
            tracing::debug!("not at info");
            tracing::warn!("Could not connect to RabbitMQ (attempt 1/10)");
            tracing::info!("Starting");
        });
        assert_eq!(
            *seen.lock().unwrap(),
            ["Could not connect to RabbitMQ (attempt 1/10)", "Starting"]
        );
    }
}
