//! Logging under the original's syslog idents (`cdb2rabbit`, `rabbit2packer`,
//! `rename-old-images`), with the original's wording at the call sites.
//!
//! Where the lines go: `--log stderr|syslog|journald`, or by default stderr
//! on a terminal, the journal under systemd, syslog otherwise. A target that
//! cannot be opened (no journald socket, no `/dev/log`) falls back to stderr
//! with a warning there, so a message is never silently dropped. The level
//! comes from `PACKUILON_LOG` (`RUST_LOG` syntax; default [`DEFAULT_FILTER`]).
//!
//! Syslog gets each event at the priority of its level (error → `err`,
//! warn → `warning`, info → `info`, debug/trace → `debug`), facility `user`.
//! A line may carry text from a profile, a message or a URL: its control
//! characters are escaped (a newline becomes `\n`), so it stays one record
//! and cannot forge another. A line longer than [`SYSLOG_MAX_BODY`] bytes,
//! which some syslog daemons would cut, is sent as several records marked
//! `[part i/n]`, so it arrives whole.

use std::borrow::Cow;
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
        for record in syslog_records(&text) {
            let result = if level == Level::ERROR {
                logger.err(&record)
            } else if level == Level::WARN {
                logger.warning(&record)
            } else if level == Level::INFO {
                logger.info(&record)
            } else {
                logger.debug(&record)
            };
            if result.is_err() {
                // syslogd went away: the line still reaches someone.
                eprintln!("{record}");
            }
        }
    }
}

/// The longest message body sent in one syslog record, in bytes. RFC 3164
/// allows 1024 bytes for the whole packet (priority, time stamp, ident and
/// pid take about 50 of them); rsyslog's default is 8 KiB, other daemons
/// keep to 1024 or 2048.
pub const SYSLOG_MAX_BODY: usize = 960;

/// `text` as the records syslog gets: control characters escaped, then cut
/// on character boundaries into bodies of at most [`SYSLOG_MAX_BODY`]
/// bytes, each but a lone one ending in ` [part i/n]`.
pub fn syslog_records(text: &str) -> Vec<String> {
    let text = escape_control(text);
    if text.len() <= SYSLOG_MAX_BODY {
        return vec![text.into_owned()];
    }
    // Room for the " [part 999/999]" marker.
    let room = SYSLOG_MAX_BODY - 16;
    let mut parts = Vec::new();
    let mut rest: &str = &text;
    while !rest.is_empty() {
        let mut end = rest.len().min(room);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        parts.push(&rest[..end]);
        rest = &rest[end..];
    }
    let n = parts.len();
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| format!("{part} [part {}/{n}]", i + 1))
        .collect()
}

/// Escapes what a terminal or a log reader would act on: `\n`, `\r`, `\t`,
/// and `\u{..}` for other control characters (C0, DEL, C1) and the Unicode
/// line and paragraph separators. A backslash is left as it is.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    let needs = |c: char| c.is_control() || c == '\u{2028}' || c == '\u{2029}';
    if !text.chars().any(needs) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
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
    fn control_characters_are_escaped_and_plain_lines_kept_as_they_are() {
        assert!(matches!(escape_control("Starting"), Cow::Borrowed("Starting")));
        assert_eq!(
            escape_control("a\nb\r\tc\u{1b}[31m\u{7f}\u{85}\u{2028}é\\n"),
            "a\\nb\\r\\tc\\u{1b}[31m\\u{7f}\\u{85}\\u{2028}é\\n"
        );
    }

    #[test]
    fn a_long_line_is_cut_into_marked_records_on_character_boundaries() {
        let short = "x".repeat(SYSLOG_MAX_BODY);
        assert_eq!(syslog_records(&short), std::slice::from_ref(&short));
        let long = "é".repeat(1500) + "\n" + &"z".repeat(10);
        let records = syslog_records(&long);
        assert_eq!(records.len(), 4, "{records:?}");
        for (i, r) in records.iter().enumerate() {
            assert!(r.len() <= SYSLOG_MAX_BODY, "{}", r.len());
            assert!(r.ends_with(&format!(" [part {}/4]", i + 1)), "{r}");
        }
        let joined: String = records.iter().map(|r| r.rsplit_once(" [part ").unwrap().0).collect();
        assert_eq!(joined, escape_control(&long));
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
