//! The example config shipped in `config/config.ini` documents every key:
//! it must load, and must name every key the loader knows.

use std::path::Path;

use packuilon_common::config::IniFile;

fn example() -> (std::path::PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/config.ini");
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

#[test]
fn example_config_loads_without_warnings() {
    let (path, text) = example();
    let ini = IniFile::parse(&path, &text).unwrap();
    let mut warnings = Vec::new();
    ini.global(&mut warnings).unwrap();
    ini.cdb2rabbit(&mut warnings).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn example_config_documents_every_key() {
    let (path, text) = example();
    // Uncomment every commented key: all of them must still be known keys.
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest)
                if rest
                    .split_once(" = ")
                    .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_uppercase() || c == '_')) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let ini = IniFile::parse(&path, &uncommented).unwrap();
    let mut warnings = Vec::new();
    ini.global(&mut warnings).ok(); // RABBIT_CA_FILE may name a file this machine lacks
    ini.cdb2rabbit(&mut warnings).ok();
    ini.rotation().ok();
    assert!(warnings.iter().all(|w| !w.contains("unknown key")), "{warnings:?}");
    for key in [
        "QUEUE_TYPE",
        "RABBIT_VHOST",
        "RABBIT_TLS",
        "RABBIT_CA_FILE",
        "RABBIT_RETRIES",
        "RABBIT_RETRY_DELAY",
        "CA_BUNDLE",
        "HTTP_TIMEOUT",
        "DOWNLOAD_CONCURRENCY",
        "METRICS_FILE",
        "ADMIN_MAIL",
        "MAIL_FROM",
        "SMTP_SERVER",
        "SMTP_USER",
        "SMTP_PASSWORD",
        "SENDMAIL_PATH",
        "ALERT_WEBHOOK",
        "STATUS_URL",
        "PACKER_ADMIN_AUTH_FILE",
        "PACKER_PATH",
        "STATE_DIR",
        "LOG_KEEP",
        "BUILD_TIMEOUT",
        "STOP_TIMEOUT",
        "ARCHIVE_NAME",
        "HIDE_ARCHIVED",
        "KEEP_ARCHIVES",
        "STATUS_LISTEN",
        "STATUS_URL",
    ] {
        assert!(
            text.contains(&format!("#{key} = ")),
            "config/config.ini does not document {key}"
        );
    }
}
