//! Alerts end to end: the real daemon, real packer, real RabbitMQ, and a real
//! SMTP server on loopback (Debian's python3-aiosmtpd) plus a real HTTP
//! listener for the webhook. One alert when an image starts failing (sent
//! although the mail server was down at first: retried), none for its
//! further failures (not even after a restart), one when it recovers.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rabbit2packer::journal::JobState;
use support::{in_state, prod, profile, succeeded, Site};

const T: Duration = Duration::from_secs(60);

/// aiosmtpd's Controller with a handler that writes each mail, decoded, to
/// DIR/NNN.mail: the envelope recipients, From, To, Subject, then the text.
const SMTP_SERVER: &str = r#"
import email, email.policy, os, signal, sys
from aiosmtpd.controller import Controller
port, out = int(sys.argv[1]), sys.argv[2]
count = 0
class Handler:
    async def handle_DATA(self, server, session, envelope):
        global count
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = msg.get_body(('plain',)).get_content().replace('\r\n', '\n')
        tmp = os.path.join(out, '%03d.tmp' % count)
        with open(tmp, 'w') as f:
            f.write('Rcpt: %s\nFrom: %s\nTo: %s\nSubject: %s\nHeaders: %d\n\n%s' % (
                ','.join(envelope.rcpt_tos), msg['From'], msg['To'], msg['Subject'], len(msg.keys()), body))
        os.rename(tmp, os.path.join(out, '%03d.mail' % count))
        count += 1
        return '250 OK'
c = Controller(Handler(), hostname='127.0.0.1', port=port)
c.start()
print('ready', flush=True)
signal.sigwait([signal.SIGTERM, signal.SIGINT])
c.stop()
"#;

struct SmtpServer {
    child: Child,
    dir: PathBuf,
}

impl SmtpServer {
    fn start(port: u16, dir: &Path) -> SmtpServer {
        std::fs::create_dir_all(dir).unwrap();
        let script = dir.join("smtpd.py");
        std::fs::write(&script, SMTP_SERVER).unwrap();
        // Debian's python3-aiosmtpd is installed for /usr/bin/python3 only.
        let mut child = Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("/usr/bin/python3 with python3-aiosmtpd");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "aiosmtpd did not start");
        SmtpServer {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn mails(&self) -> Vec<String> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "mail"))
            .collect();
        names.sort();
        names.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect()
    }

    fn wait_mails(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + T;
        loop {
            let m = self.mails();
            if m.len() >= n {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} mail(s); got {m:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A webhook receiver: answers 200 to every POST and keeps the bodies.
fn webhook() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/abc", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let sink = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            sink.lock().unwrap().push(String::from_utf8(body).unwrap());
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    (url, bodies)
}

/// Adds lines to `[global]` of the site's config.
fn add_global(site: &Site, lines: &str) {
    let text = std::fs::read_to_string(&site.config).unwrap();
    let text = text.replacen("\n[rabbit2packer]", &format!("{lines}\n\n[rabbit2packer]"), 1);
    std::fs::write(&site.config, text).unwrap();
}

#[test]
fn one_mail_when_an_image_starts_failing_none_for_repeats_even_after_a_restart_one_on_recovery() {
    let site = Site::new(1, "STATUS_URL = http://imagefactory.example.org:8150/");
    let port = packuilon_testsupport::free_port();
    let (hook, posts) = webhook();
    add_global(
        &site,
        &format!(
            "ADMIN_MAIL = ops@example.org, oncall@example.org\nMAIL_FROM = packuilon@example.org\n\
             SMTP_SERVER = 127.0.0.1:{port}\nALERT_WEBHOOK = {hook}"
        ),
    );
    let env = [("RABBIT2PACKER_ALERT_RETRY_DELAYS", "1,1,1,1,1,1,1,1,1,1")];
    let mut d = site.start_with_env(&env);
    std::fs::write(site.out.join("fail"), "").unwrap();
    // A profile name trying to add a header.
    let body = profile("inventory", "7x", "a", prod());
    support::publish_all_as(
        &site.queue.broker,
        &site.queue.name,
        &[(serde_json::to_vec(&body).unwrap(), None)],
        "ci-a.example.org.json\r\nBcc: evil@example.org",
    );
    site.wait_jobs("the first failure", T, |j| in_state(j, JobState::Failed).len() == 1);
    // The mail server is down: the build is recorded, the mail is retried.
    d.wait_log("alert by mail failed (attempt 1 of 11)", T);
    let smtp = SmtpServer::start(port, &site.dir.path().join("mail"));
    let mails = smtp.wait_mails(1);
    let m = &mails[0];
    assert!(m.starts_with("Rcpt: ops@example.org,oncall@example.org\n"), "{m}");
    assert!(m.contains("From: packuilon@example.org\n"), "{m}");
    assert!(
        m.contains("Subject: packuilon: inventory-sl7x-x86_64 build failing (job 1)\n"),
        "{m}"
    );
    assert!(m.contains("Image key:  inventory-sl7x-x86_64\n"), "{m}");
    assert!(m.contains("Job:        1 (failed, attempt 1, Thread-1"), "{m}");
    assert!(m.contains("Template:   a.json: exit code 1\n"), "{m}");
    assert!(m.contains("Status:     http://imagefactory.example.org:8150/\n"), "{m}");
    // The profile name's CR LF added no header: it is one line of the text.
    assert!(
        m.contains("Profile:    ci-a.example.org.json??Bcc: evil@example.org\n"),
        "{m}"
    );
    assert!(!m.contains("\nBcc:"), "{m}");
    // The log's tail, ending with the trailer.
    let tail = m.split("Last 40 lines of the build log:\n").nth(1).expect("log tail");
    assert!(tail.contains("failing on purpose"), "{tail}");
    assert!(tail.lines().count() <= 40, "{tail}");
    assert!(
        tail.trim_end()
            .lines()
            .last()
            .unwrap()
            .contains("rabbit2packer: Build finished at "),
        "{tail}"
    );
    // The webhook got the same alert as JSON.
    let deadline = Instant::now() + T;
    while posts.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no webhook post");
        std::thread::sleep(Duration::from_millis(50));
    }
    let post: serde_json::Value = serde_json::from_str(&posts.lock().unwrap()[0]).unwrap();
    let text = post["text"].as_str().unwrap();
    assert!(
        text.starts_with("packuilon: inventory-sl7x-x86_64 build failing (job 1)\n"),
        "{text}"
    );
    assert!(text.contains("failing on purpose"), "{text}");

    // A further failure: counted, no alert.
    site.publish(&body, None);
    site.wait_jobs("the second failure", T, |j| in_state(j, JobState::Failed).len() == 2);
    let (_, status, _) = site.cli(&["status"]);
    let deadline = Instant::now() + T;
    let mut status = status;
    while !status.contains("1 further failure(s)") {
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(50));
        status = site.cli(&["status"]).1;
    }
    assert!(
        status.contains("inventory-sl7x-x86_64 build failing since job #1"),
        "{status}"
    );
    d.stop();

    // After a restart the image is still known as failing: no new alert.
    let mut d = site.start_with_env(&env);
    site.publish(&body, None);
    site.wait_jobs("the third failure", T, |j| in_state(j, JobState::Failed).len() == 3);
    std::fs::remove_file(site.out.join("fail")).unwrap();
    site.publish(&body, None);
    site.wait_jobs("the recovery", T, |j| succeeded(j) == 1);
    let mails = smtp.wait_mails(2);
    assert_eq!(mails.len(), 2, "{mails:#?}");
    let r = &mails[1];
    assert!(
        r.contains("Subject: packuilon: inventory-sl7x-x86_64 recovered (job 4)\n"),
        "{r}"
    );
    assert!(
        r.contains("the image had been build failing since job 1") && r.contains("with 2 further failure(s)"),
        "{r}"
    );
    let deadline = Instant::now() + T;
    while posts.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "no recovery webhook post");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(posts.lock().unwrap().len(), 2);
    assert!(!site.cli(&["status"]).1.contains("failing:"));
    d.stop();
    // Nothing more was sent.
    assert_eq!(smtp.mails().len(), 2);
}

#[test]
fn a_bad_admin_mail_address_is_a_configuration_error_naming_the_key() {
    let site = Site::new(1, "");
    add_global(&site, "ADMIN_MAIL = ops@example.org, Ops <x@y>");
    let mut d = site.start();
    assert_eq!(d.wait_exit(T), 2);
    assert!(d.output().contains("[global] ADMIN_MAIL:"), "{}", d.output());
}

#[test]
fn an_alert_not_sent_before_a_stop_is_sent_after_the_restart() {
    let site = Site::new(1, "");
    let port = packuilon_testsupport::free_port();
    add_global(
        &site,
        &format!("ADMIN_MAIL = ops@example.org\nSMTP_SERVER = 127.0.0.1:{port}"),
    );
    // The mail server is down and the retries are slow: the stop comes first.
    let env = [("RABBIT2PACKER_ALERT_RETRY_DELAYS", "600")];
    let mut d = site.start_with_env(&env);
    std::fs::write(site.out.join("fail"), "").unwrap();
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    site.wait_jobs("the failure", T, |j| in_state(j, JobState::Failed).len() == 1);
    d.wait_log("alert by mail failed (attempt 1 of 2)", T);
    d.stop();
    let smtp = SmtpServer::start(port, &site.dir.path().join("mail"));
    let mut d = site.start_with_env(&env);
    let mails = smtp.wait_mails(1);
    assert!(
        mails[0].contains("Subject: packuilon: inventory-sl7x-x86_64 build failing (job 1)\n"),
        "{}",
        mails[0]
    );
    d.wait_log("alert sent by mail", T);
    d.stop();
    // Sent once: a third start has nothing left to send.
    let mut d = site.start_with_env(&env);
    d.wait_log("Ready:", T);
    d.stop();
    assert_eq!(smtp.mails().len(), 1);
}
