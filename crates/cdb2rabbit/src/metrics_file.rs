//! `[cdb2rabbit] METRICS_FILE`: cdb2rabbit is a batch job, so Prometheus
//! cannot scrape it; after each run it leaves a text file that
//! node_exporter's textfile collector serves (`--collector.textfile.directory`).
//! The file is replaced atomically (a temp file in the same directory, then
//! a rename), so the collector never reads half a file. The time of the
//! last successful run is carried over from the previous file: a failing
//! run must not make the last success look recent, nor forget it.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The metric naming the last successful run (read back from the previous file).
const LAST_SUCCESS: &str = "packuilon_cdb2rabbit_last_success_timestamp_seconds";

/// What one run did, as the file reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunMetrics {
    /// When the run ended.
    pub finished: SystemTime,
    pub duration: Duration,
    /// Exit status 0: everything published or unchanged.
    pub success: bool,
    /// Profiles published (confirmed by the broker).
    pub published: usize,
    /// Profiles that failed (retried by the next run); a run that failed as
    /// a whole counts none here, its `success` is false.
    pub failed: usize,
    /// Profiles the broker's index listed; `None` when it was not read.
    pub index_profiles: Option<usize>,
}

fn seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The text of the file. `last_success` is the previous file's value, used
/// when this run failed.
pub fn render(m: &RunMetrics, last_success: Option<f64>) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: String| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"));
    };
    gauge(
        "packuilon_cdb2rabbit_last_run_timestamp_seconds",
        "When the last cdb2rabbit run ended (unix time).",
        format!("{:.3}", seconds(m.finished)),
    );
    let success = if m.success {
        Some(seconds(m.finished))
    } else {
        last_success
    };
    if let Some(s) = success {
        gauge(
            LAST_SUCCESS,
            "When the last cdb2rabbit run that published or checked every profile ended (unix time).",
            format!("{s:.3}"),
        );
    }
    gauge(
        "packuilon_cdb2rabbit_run_duration_seconds",
        "How long the last cdb2rabbit run took.",
        format!("{:.3}", m.duration.as_secs_f64()),
    );
    gauge(
        "packuilon_cdb2rabbit_published",
        "Profiles the last run published (confirmed by the broker).",
        m.published.to_string(),
    );
    gauge(
        "packuilon_cdb2rabbit_failed",
        "Profiles that failed in the last run (retried by the next).",
        m.failed.to_string(),
    );
    if let Some(n) = m.index_profiles {
        gauge(
            "packuilon_cdb2rabbit_index_profiles",
            "Profiles listed in the broker's index at the last run.",
            n.to_string(),
        );
    }
    out
}

/// The last success recorded in an existing file, if any.
fn previous_success(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(LAST_SUCCESS)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

/// Writes the file atomically (mode 0644: node_exporter runs as another user).
pub fn write(path: &Path, m: &RunMetrics) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let text = render(m, previous_success(path));
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // node_exporter reads only `*.prom`: the temp file's name must not end so.
    let mut tmp = tempfile::Builder::new()
        .prefix(".cdb2rabbit-metrics-")
        .tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(success: bool) -> RunMetrics {
        RunMetrics {
            finished: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_millis(1500),
            success,
            published: 2,
            failed: usize::from(!success),
            index_profiles: Some(7),
        }
    }

    #[test]
    fn a_failed_run_keeps_the_previous_success_time() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cdb2rabbit.prom");
        write(&f, &run(true)).unwrap();
        let mut failed = run(false);
        failed.finished += Duration::from_secs(60);
        write(&f, &failed).unwrap();
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            text.contains("packuilon_cdb2rabbit_last_success_timestamp_seconds 1700000000.000\n"),
            "{text}"
        );
        assert!(
            text.contains("packuilon_cdb2rabbit_last_run_timestamp_seconds 1700000060.000\n"),
            "{text}"
        );
        assert!(text.contains("packuilon_cdb2rabbit_failed 1\n"), "{text}");
    }

    #[test]
    fn no_success_yet_means_no_success_sample() {
        let text = render(&run(false), None);
        assert!(!text.contains(LAST_SUCCESS), "{text}");
    }
}
