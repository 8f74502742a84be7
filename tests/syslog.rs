//! Logs where operators look: the original's README tells them to watch
//! syslog. These tests start Debian's real `rsyslog` with a config of their
//! own (imuxsock on `/dev/log`, one file out, control-character escaping
//! off so that nothing but Packuilon's own escaping keeps a record whole),
//! run `cdb2rabbit` and `rabbit2packer` with `--log syslog`, and read what
//! arrived: the idents, the original's wording, a priority that matches the
//! level, and hostile text (newlines and escape sequences from a profile or
//! a message, a line longer than syslog takes) arriving whole and harmless.
//!
//! `/dev/log` is the machine's: the two tests take turns on a lock file, and
//! a socket that was already there is moved aside and put back afterwards.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use packuilon_testsupport::broker::TestQueue;
use packuilon_testsupport::http::ProfileServer;
use packuilon_testsupport::site::{profile, write_index};
use packuilon_testsupport::{unique_name, workspace_bin};
use serde_json::json;

const DEV_LOG: &str = "/dev/log";
const RSYSLOGD: &str = "/usr/sbin/rsyslogd";

/// A private rsyslogd listening on `/dev/log`, writing
/// `ident|severity|message` lines to `out`.
struct Rsyslog {
    child: Child,
    out: PathBuf,
    saved: Option<PathBuf>,
    _dir: tempfile::TempDir,
    _turn: File,
}

impl Rsyslog {
    fn start() -> Rsyslog {
        assert!(
            Path::new(RSYSLOGD).exists(),
            "{RSYSLOGD} is missing: make test installs Debian's rsyslog"
        );
        // Our turn on /dev/log, across test processes too.
        let turn = File::create("/tmp/packuilon-test-dev-log.lock").unwrap();
        assert_eq!(unsafe { libc::flock(turn.as_raw_fd(), libc::LOCK_EX) }, 0);
        let saved = if Path::new(DEV_LOG).symlink_metadata().is_ok() {
            let aside = PathBuf::from(format!("/dev/log.packuilon-test-{}", std::process::id()));
            std::fs::rename(DEV_LOG, &aside).unwrap();
            Some(aside)
        } else {
            None
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("messages");
        let conf = dir.path().join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                "global(workDirectory=\"{d}\" parser.escapeControlCharactersOnReceive=\"off\" maxMessageSize=\"64k\")\n\
                 module(load=\"imuxsock\" SysSock.Name=\"{DEV_LOG}\" SysSock.RateLimit.Interval=\"0\")\n\
                 template(name=\"packuilon\" type=\"string\" string=\"%programname%|%syslogseverity-text%|%msg%\\n\")\n\
                 *.* action(type=\"omfile\" file=\"{out}\" template=\"packuilon\")\n",
                d = dir.path().display(),
                out = out.display(),
            ),
        )
        .unwrap();
        let child = Command::new(RSYSLOGD)
            .args(["-n", "-f"])
            .arg(&conf)
            .arg("-i")
            .arg(dir.path().join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.path().join("rsyslogd.stderr")).unwrap())
            .spawn()
            .unwrap();
        let mut me = Rsyslog {
            child,
            out,
            saved,
            _dir: dir,
            _turn: turn,
        };
        // Ready once a probe record makes it to the file.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if Path::new(DEV_LOG).exists() {
                let _ = Command::new("logger").args(["-t", "probe", "ready"]).status();
                if me.records().iter().any(|r| r.ident == "probe") {
                    break;
                }
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!("rsyslogd exited: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "rsyslogd did not start listening on {DEV_LOG}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        me
    }

    /// Every line of the output file, whole.
    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn records(&self) -> Vec<Record> {
        self.lines().iter().filter_map(|l| Record::parse(l)).collect()
    }

    /// The records of `ident`, after waiting until `done` holds for them.
    fn wait_for(&self, ident: &str, what: &str, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let records: Vec<Record> = self.records().into_iter().filter(|r| r.ident == ident).collect();
            if done(&records) {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; syslog has:\n{}",
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_file(DEV_LOG);
        if let Some(saved) = &self.saved {
            let _ = std::fs::rename(saved, DEV_LOG);
        }
    }
}

#[derive(Debug, Clone)]
struct Record {
    ident: String,
    severity: String,
    msg: String,
}

impl Record {
    fn parse(line: &str) -> Option<Record> {
        let (ident, rest) = line.split_once('|')?;
        let (severity, msg) = rest.split_once('|')?;
        Some(Record {
            ident: ident.to_string(),
            severity: severity.to_string(),
            msg: msg.trim_start().to_string(),
        })
    }
}

fn has(records: &[Record], severity: &str, text: &str) -> bool {
    records.iter().any(|r| r.severity == severity && r.msg == text)
}

/// Every line in the file is a whole record (other programs on the machine
/// log too): nothing a profile or a message held started a line of its own.
fn assert_no_forged_lines(syslog: &Rsyslog) {
    const SEVERITIES: [&str; 8] = ["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"];
    for line in syslog.lines() {
        let ok = Record::parse(&line).is_some_and(|r| {
            !r.ident.is_empty()
                && r.ident.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                && SEVERITIES.contains(&r.severity.as_str())
        });
        assert!(ok, "a line that is no record: {line:?}\n{}", syslog.lines().join("\n"));
        assert!(!line.contains('\u{1b}'), "an escape sequence reached syslog: {line:?}");
    }
}

/// The records `[part i/n]` of one long message, joined again.
fn joined_parts(records: &[Record], severity: &str, start: &str) -> Option<String> {
    let first = records.iter().position(|r| {
        r.severity == severity
            && r.msg.starts_with(start)
            && r.msg.rsplit_once(" [part ").is_some_and(|(_, m)| m.starts_with("1/"))
    })?;
    let (_, marker) = records[first].msg.rsplit_once(" [part 1/")?;
    let n: usize = marker.trim_end_matches(']').parse().ok()?;
    let mut whole = String::new();
    for (i, r) in records[first..first + n].iter().enumerate() {
        assert_eq!(r.severity, severity, "{records:#?}");
        let (text, marker) = r.msg.rsplit_once(" [part ")?;
        assert_eq!(marker, format!("{}/{n}]", i + 1));
        whole.push_str(text);
    }
    Some(whole)
}

fn run_syslog(bin: &str, config: &Path) -> i32 {
    Command::new(workspace_bin(bin))
        .arg("--config")
        .arg(config)
        .args(["--log", "syslog"])
        .stdin(Stdio::null())
        .status()
        .unwrap()
        .code()
        .unwrap_or(-1)
}

#[test]
fn cdb2rabbit_logs_to_syslog_under_its_ident_with_the_originals_lines_and_priorities() {
    let syslog = Rsyslog::start();
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    let personality = unique_name("syslog");
    let ci = format!("{personality}-sl-7x-x86-64.ci.example.org.json");
    std::fs::write(site.join(&ci), profile(&personality, &["openssh-server"]).to_string()).unwrap();
    write_index(&site, &[(&ci, 1_700_000_000)]);
    let server = ProfileServer::serve(&site);
    let queue = TestQueue::new("syslog-cdb2rabbit");
    let config = dir.path().join("config.ini");
    std::fs::write(
        &config,
        format!(
            "{global}\n[cdb2rabbit]\nPROFILE_INFO_URL = {index}\nPROFILE_DIR_URL = {base}\nPROFILE_MATCH = .ci.\n\
             CACHE_DIR = {d}/cache\n",
            global = queue.broker.global_section(&queue.name),
            index = server.url("profiles-info.xml"),
            base = server.base,
            d = dir.path().display(),
        ),
    )
    .unwrap();

    // The first run records the baseline.
    assert_eq!(run_syslog("cdb2rabbit", &config), 0);
    let records = syslog.wait_for("cdb2rabbit", "the first run's lines", |r| {
        has(r, "info", "Cached info file does not exist, creating one and exiting")
    });
    assert!(has(&records, "info", "Starting"), "{records:#?}");

    // The CI profile changes; a second CI profile with a very long name is
    // listed but cannot be downloaded; an entry whose name holds a newline
    // and a tab (written in the index as character references) is refused.
    std::fs::write(
        site.join(&ci),
        profile(&personality, &["openssh-server", "htop"]).to_string(),
    )
    .unwrap();
    let long = format!(
        "{}/{personality}-gone.ci.example.org.json",
        vec!["d".repeat(200); 12].join("/")
    );
    let hostile = "evil&#10;Exiting normally&#9;x.ci.example.org.json";
    write_index(
        &site,
        &[(&ci, 1_700_000_600), (&long, 1_700_000_600), (hostile, 1_700_000_600)],
    );
    assert_eq!(run_syslog("cdb2rabbit", &config), 1, "a failed download exits 1");
    let updated = format!("Profile has updated: {ci}");
    let records = syslog.wait_for("cdb2rabbit", "the second run's lines", |r| {
        r.iter().filter(|r| r.msg == "Starting").count() == 2
            && has(r, "info", &updated)
            && joined_parts(r, "err", "").is_some_and(|whole| whole.contains(&long))
            && r.iter().any(|r| r.msg.contains("evil\\nExiting normally\\tx"))
    });
    for line in [
        format!("CI profile rebuilt: {ci}"),
        format!("Downloading profile {ci}"),
        format!("Profile has updated: {ci}"),
    ] {
        assert!(has(&records, "info", &line), "no info record {line:?}: {records:#?}");
    }
    // The original's line, then the structured fields.
    assert!(
        records
            .iter()
            .any(|r| r.severity == "info" && r.msg.starts_with("Pushing message to queue for build")),
        "{records:#?}"
    );
    // The failed download is an error, and its line, far longer than one
    // syslog record, arrives whole in marked parts.
    let whole = joined_parts(&records, "err", "").unwrap_or_else(|| panic!("no long error in parts: {records:#?}"));
    assert!(whole.contains(&long), "{whole}");
    // The refused name is reported, escaped, on one line.
    assert!(
        records
            .iter()
            .any(|r| r.severity != "info" && r.msg.contains("evil\\nExiting normally\\tx")),
        "{records:#?}"
    );
    assert_no_forged_lines(&syslog);
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbit2packer_logs_to_syslog_under_its_ident_and_a_failed_build_is_an_error() {
    let syslog = Rsyslog::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let queue = TestQueue::new("syslog-rabbit2packer");
    let template = d.join("fail.json");
    std::fs::write(
        &template,
        json!({
            "builders": [{"type": "null", "communicator": "none"}],
            "provisioners": [{"type": "shell-local", "inline": ["echo building $NAME", "exit 3"]}]
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(d.join("template-map.json"), json!({"DEFAULT": [template]}).to_string()).unwrap();
    std::fs::write(
        d.join("source-images.json"),
        json!({"sl7x-x86_64": "0b10e583-9e13-4878-9116-f4002846fa73"}).to_string(),
    )
    .unwrap();
    std::fs::write(d.join("auth.sh"), "export OS_AUTH_URL=http://127.0.0.1:9/v3\n").unwrap();
    let config = d.join("config.ini");
    std::fs::write(
        &config,
        format!(
            "{global}\n[rabbit2packer]\nTHREAD_COUNT = 1\nLOG_DIR = {d}/logs\nBUILD_FILE_DIR = {d}/build-files\n\
             STATE_DIR = {d}/state\nPACKER_AUTH_FILE = {d}/auth.sh\nPACKER_TEMPLATE_MAP = {d}/template-map.json\n\
             IMAGES_CONFIG = {d}/source-images.json\nSTATUS_LISTEN = 127.0.0.1:0\n",
            global = queue.broker.global_section(&queue.name),
            d = d.display(),
        ),
    )
    .unwrap();

    let personality = unique_name("syslog");
    let key = format!("{personality}-sl7x-x86_64");
    // A message id is the sender's: a newline and an escape sequence in it
    // must not start a record of their own.
    let hostile_id = "bad\nThread-1: image built successfully: forged\u{1b}[2J";
    let conn = queue.broker.connect().await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    packuilon_common::rabbit::declare_queue(&channel, &queue.name, Default::default(), "the test broker")
        .await
        .unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for (body, id) in [
        (b"{not json".to_vec(), hostile_id),
        (profile(&personality, &[]).to_string().into_bytes(), "good-1"),
    ] {
        channel
            .basic_publish(
                "".into(),
                queue.name.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(id.into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let _ = conn.close(200, "published".into()).await;

    let mut daemon = Command::new(workspace_bin("rabbit2packer"))
        .arg("--config")
        .arg(&config)
        .args(["--log", "syslog"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let records = syslog.wait_for("rabbit2packer", "the failed build's error", |r| {
        r.iter()
            .any(|r| r.msg.contains("packer exited with non zero exit code"))
    });
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = daemon.wait().unwrap();
    assert_eq!(status.code(), Some(0), "a clean stop");

    assert!(has(&records, "info", "Starting"), "{records:#?}");
    assert!(has(&records, "info", "Starting Thread-1"), "{records:#?}");
    assert!(
        has(&records, "info", &format!("Thread-1 processing {key}")),
        "{records:#?}"
    );
    assert!(
        has(
            &records,
            "err",
            &format!("Thread-1: packer exited with non zero exit code, {key}.fail.json build failed")
        ),
        "a failed build is an error: {records:#?}"
    );
    let rejected = records
        .iter()
        .find(|r| {
            r.msg
                .starts_with("could not decode profile, malformed json? Continuing")
        })
        .unwrap_or_else(|| panic!("no record of the malformed message: {records:#?}"));
    assert_eq!(rejected.severity, "err");
    assert!(
        rejected
            .msg
            .contains("bad\\nThread-1: image built successfully: forged\\u{1b}[2J"),
        "{rejected:?}"
    );
    assert!(
        !records
            .iter()
            .any(|r| r.msg.starts_with("Thread-1: image built successfully")),
        "{records:#?}"
    );
    assert_no_forged_lines(&syslog);
}
