//! `[cdb2rabbit] METRICS_FILE`: the real binary writes a textfile that the
//! real `promtool check metrics` (Debian's prometheus) accepts, after a
//! successful and after a failed run.

#[allow(dead_code)] // support serves the other test files too
mod support;

use support::{profile, Site};

fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_file_after_each_run_passes_promtool_and_keeps_the_last_success() {
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("cdb2rabbit.prom");
    let site = Site::new("ci-")
        .with_extra_cdb(&format!("METRICS_FILE = {}\n", prom.display()))
        .with_baseline(&["ci-a.example.org.json", "ci-b.example.org.json"]);
    site.put("ci-a.example.org.json", &profile("a", 2), 101);
    site.run(&[]).assert_status(0);
    let text = std::fs::read_to_string(&prom).unwrap();
    packuilon_testsupport::command::promtool_check_metrics(&text);
    assert_eq!(value(&text, "packuilon_cdb2rabbit_published"), Some(1.0), "{text}");
    assert_eq!(value(&text, "packuilon_cdb2rabbit_failed"), Some(0.0), "{text}");
    assert_eq!(value(&text, "packuilon_cdb2rabbit_index_profiles"), Some(2.0), "{text}");
    let success = value(&text, "packuilon_cdb2rabbit_last_success_timestamp_seconds").unwrap();
    assert_eq!(
        value(&text, "packuilon_cdb2rabbit_last_run_timestamp_seconds"),
        Some(success)
    );
    assert!(value(&text, "packuilon_cdb2rabbit_run_duration_seconds").unwrap() > 0.0);

    // The broker is unreachable: the run fails, the last success stays.
    site.put("ci-b.example.org.json", &profile("b", 2), 102);
    site.set_broker_port(Some(1));
    let out = site.run(&[]);
    out.assert_status(1);
    let text = std::fs::read_to_string(&prom).unwrap();
    packuilon_testsupport::command::promtool_check_metrics(&text);
    assert_eq!(
        value(&text, "packuilon_cdb2rabbit_last_success_timestamp_seconds"),
        Some(success),
        "{text}"
    );
    assert!(value(&text, "packuilon_cdb2rabbit_last_run_timestamp_seconds").unwrap() > success);
    assert_eq!(value(&text, "packuilon_cdb2rabbit_published"), Some(0.0), "{text}");
    // No temp file is left beside it (node_exporter reads the whole directory).
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["cdb2rabbit.prom"]);
}

#[test]
fn dry_run_writes_no_metrics_file() {
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("cdb2rabbit.prom");
    let site = Site::new("ci-")
        .with_extra_cdb(&format!("METRICS_FILE = {}\n", prom.display()))
        .with_baseline(&["ci-a.example.org.json"]);
    std::fs::remove_file(&prom).unwrap();
    site.put("ci-a.example.org.json", &profile("a", 2), 101);
    site.run(&["--dry-run"]).assert_status(0);
    assert!(!prom.exists());
}
