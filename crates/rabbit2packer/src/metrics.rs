//! The daemon's Prometheus metrics, served at `/metrics` by [`crate::status`].
//!
//! Counters live in this process and are bumped where things happen: a
//! template build ends (`job`), a rotation ends (`job`), a message is
//! rejected or the broker connection comes and goes (`consumer`). What the
//! journal already knows (running and waiting jobs) is read from it at
//! scrape time, and each image's last success is loaded from it at start,
//! so that gauge survives a restart. Labels are bounded by the number of
//! image keys and templates, never by jobs.
//!
//! The `prometheus` crate writes the text format 0.0.4 with `# HELP` and
//! `# TYPE` on the `_total` name of a counter: Debian's promtool 2.42 (what
//! the tests run) rejects the OpenMetrics style (`# TYPE x counter` over
//! `x_total`) that prometheus-client writes.

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Buckets of `packuilon_build_duration_seconds`: builds take from seconds
/// (a null builder) to hours (an image with many packages).
const DURATION_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 21600.0,
];

/// How one template build ended (`result` of `packuilon_builds_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BuildResult {
    Succeeded,
    Failed,
    Interrupted,
}

impl BuildResult {
    fn label(self) -> &'static str {
        match self {
            BuildResult::Succeeded => "succeeded",
            BuildResult::Failed => "failed",
            BuildResult::Interrupted => "interrupted",
        }
    }
}

/// The registry and the handles the daemon updates.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    builds: IntCounterVec,
    build_duration: HistogramVec,
    running: IntGauge,
    waiting: IntGauge,
    last_success: prometheus::GaugeVec,
    rotations: IntCounterVec,
    rejected: IntCounter,
    broker_connected: IntGauge,
    tests: IntCounterVec,
}

/// How a test gate ended (`result` of `packuilon_image_tests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TestResult {
    Passed,
    Failed,
    TimedOut,
    /// The test could not be run (Glance, no image, TEST_COMMAND not started).
    Error,
}

impl TestResult {
    const ALL: [TestResult; 4] = [
        TestResult::Passed,
        TestResult::Failed,
        TestResult::TimedOut,
        TestResult::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            TestResult::Passed => "passed",
            TestResult::Failed => "failed",
            TestResult::TimedOut => "timed_out",
            TestResult::Error => "error",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every family registered, at zero.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // The names and labels are constants: building them cannot fail.
        let builds = IntCounterVec::new(
            Opts::new(
                "packuilon_builds_total",
                "Template builds finished, by image, template and result.",
            ),
            &["image", "template", "result"],
        )
        .expect("valid metric");
        let build_duration = HistogramVec::new(
            HistogramOpts::new(
                "packuilon_build_duration_seconds",
                "Duration of template builds (packer runs), by template.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["template"],
        )
        .expect("valid metric");
        let running = IntGauge::new("packuilon_builds_running", "Jobs being built now.").expect("valid metric");
        let waiting = IntGauge::new(
            "packuilon_jobs_waiting",
            "Jobs waiting for a worker or for the next start.",
        )
        .expect("valid metric");
        let last_success = prometheus::GaugeVec::new(
            Opts::new(
                "packuilon_last_success_timestamp_seconds",
                "When the newest succeeded job of each image ended (Unix time).",
            ),
            &["image"],
        )
        .expect("valid metric");
        let rotations = IntCounterVec::new(
            Opts::new(
                "packuilon_rotations_total",
                "Image rotations (rename-old-images) by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let rejected = IntCounter::new(
            "packuilon_messages_rejected_total",
            "Messages that named no image (saved to STATE_DIR/rejected).",
        )
        .expect("valid metric");
        let broker_connected = IntGauge::new(
            "packuilon_broker_connected",
            "1 while rabbit2packer consumes from RabbitMQ, else 0.",
        )
        .expect("valid metric");
        let tests = IntCounterVec::new(
            Opts::new(
                "packuilon_image_tests_total",
                "Test gate runs (TEST_COMMAND on a new image) by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        for c in [
            Box::new(tests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(builds.clone()),
            Box::new(build_duration.clone()),
            Box::new(running.clone()),
            Box::new(waiting.clone()),
            Box::new(last_success.clone()),
            Box::new(rotations.clone()),
            Box::new(rejected.clone()),
            Box::new(broker_connected.clone()),
        ] {
            registry.register(c).expect("names are distinct");
        }
        // Results seen by a scrape even before the first rotation.
        for r in ["done", "skipped", "failed"] {
            rotations.with_label_values(&[r]);
        }
        for r in TestResult::ALL {
            tests.with_label_values(&[r.label()]);
        }
        Metrics {
            registry,
            builds,
            build_duration,
            running,
            waiting,
            last_success,
            rotations,
            rejected,
            broker_connected,
            tests,
        }
    }

    /// A test gate ended.
    pub(crate) fn test_finished(&self, result: TestResult) {
        self.tests.with_label_values(&[result.label()]).inc();
    }

    /// A template build ended after `seconds`.
    pub(crate) fn build_finished(&self, image: &str, template: &str, result: BuildResult, seconds: f64) {
        self.builds.with_label_values(&[image, template, result.label()]).inc();
        self.build_duration.with_label_values(&[template]).observe(seconds);
    }

    /// A job of `image` succeeded at Unix time `at`.
    pub(crate) fn image_succeeded(&self, image: &str, at: f64) {
        self.last_success.with_label_values(&[image]).set(at);
    }

    /// A rotation ended: `done`, `skipped` or `failed`.
    pub(crate) fn rotation(&self, result: &str) {
        self.rotations.with_label_values(&[result]).inc();
    }

    /// A message was rejected (it named no image).
    pub(crate) fn message_rejected(&self) {
        self.rejected.inc();
    }

    /// The consumer is (or is no longer) connected to the broker.
    pub(crate) fn set_broker_connected(&self, up: bool) {
        self.broker_connected.set(i64::from(up));
    }

    /// Is the consumer connected to the broker (for `/readyz`)?
    pub(crate) fn broker_connected(&self) -> bool {
        self.broker_connected.get() == 1
    }

    /// The text a scrape gets; `running` and `waiting` are the journal's
    /// counts at the time of the scrape.
    pub(crate) fn render(&self, running: i64, waiting: i64) -> String {
        self.running.set(running);
        self.waiting.set(waiting);
        let mut out = Vec::new();
        // Writing to a Vec fails only for metrics the encoder cannot express.
        if let Err(e) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// RFC 3339 to Unix time (seconds), for the last-success gauge.
pub(crate) fn unix_time(rfc3339: &str) -> Option<f64> {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .ok()
        .map(|t| t.timestamp_millis() as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_in_help_and_type() {
        let m = Metrics::new();
        m.build_finished("a-sl7x-x86_64", "t", BuildResult::Succeeded, 3.0);
        let text = m.render(1, 2);
        assert!(text.contains("# TYPE packuilon_builds_total counter"), "{text}");
        assert!(
            text.contains("packuilon_builds_total{image=\"a-sl7x-x86_64\",result=\"succeeded\",template=\"t\"} 1"),
            "{text}"
        );
        assert!(text.contains("packuilon_builds_running 1"), "{text}");
        assert!(text.contains("packuilon_jobs_waiting 2"), "{text}");
    }
}
