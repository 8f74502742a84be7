//! config/prometheus-alerts.yml, the example alert rules, with the real
//! `promtool` (Debian's prometheus): valid for `promtool check rules`, and
//! firing on the series the daemon and cdb2rabbit write (`promtool test
//! rules` with made-up series of those names).

use std::path::{Path, PathBuf};
use std::process::Command;

fn rules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prometheus-alerts.yml")
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (Debian package prometheus) is installed");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn example_alert_rules_pass_promtool_check_rules() {
    let (ok, out) = promtool(&["check", "rules", rules().to_str().unwrap()]);
    assert!(ok, "{out}");
}

#[test]
fn example_alert_rules_fire_on_a_failing_build_a_stale_cdb2rabbit_and_a_lost_broker() {
    let dir = tempfile::tempdir().unwrap();
    let test = dir.path().join("test.yml");
    std::fs::write(
        &test,
        format!(
            r#"rule_files: ["{rules}"]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'packuilon_builds_total{{image="inventory-sl7x-x86_64",template="a",result="failed"}}'
        values: '0 1 1 1 1 1'
      - series: 'packuilon_builds_total{{image="inventory-sl7x-x86_64",template="a",result="succeeded"}}'
        values: '3 3 3 3 3 3'
      - series: 'packuilon_broker_connected{{instance="h:8150",job="rabbit2packer"}}'
        values: '0x10'
      - series: 'packuilon_cdb2rabbit_last_run_timestamp_seconds{{instance="h:9100"}}'
        values: '0x120'
      - series: 'packuilon_cdb2rabbit_last_success_timestamp_seconds{{instance="h:9100"}}'
        values: '0x120'
    alert_rule_test:
      - eval_time: 5m
        alertname: PackuilonBuildFailing
        exp_alerts:
          - exp_labels: {{severity: warning, image: inventory-sl7x-x86_64, template: a, result: failed}}
            exp_annotations:
              summary: "Image inventory-sl7x-x86_64 fails to build"
              description: "The build of inventory-sl7x-x86_64 (template a) failed in the last hour; see `rabbit2packer history inventory-sl7x-x86_64` and the build log."
      - eval_time: 10m
        alertname: PackuilonBrokerDisconnected
        exp_alerts:
          - exp_labels: {{severity: critical, instance: "h:8150", job: rabbit2packer}}
            exp_annotations:
              summary: "rabbit2packer on h:8150 is not connected to RabbitMQ"
              description: "Journaled jobs still build, but no new request is taken until the broker answers."
      - eval_time: 30m
        alertname: PackuilonCdb2rabbitNotRunning
        exp_alerts: []
      - eval_time: 120m
        alertname: PackuilonCdb2rabbitNotRunning
        exp_alerts:
          - exp_labels: {{severity: critical, instance: "h:9100"}}
            exp_annotations:
              summary: "cdb2rabbit has not run successfully for an hour"
              description: "Profile changes are not reaching the build queue; see `journalctl -u cdb2rabbit`."
"#,
            rules = rules().display()
        ),
    )
    .unwrap();
    let (ok, out) = promtool(&["test", "rules", test.to_str().unwrap()]);
    assert!(ok, "{out}");
}
