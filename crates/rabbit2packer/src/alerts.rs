//! Alerts: a person hears about a failing image without watching anything.
//!
//! Alerts follow changes of an image's health, not every failure: an
//! image's build starts failing (its first build, or one after a success),
//! its rotation starts failing, or it recovers. Further failures of the same
//! kind are only counted (`rabbit2packer status`, the status page). The
//! health lives in the journal (`image_health`), so a restart neither sends
//! an alert again nor forgets that an image was failing.
//!
//! Sending happens off the build path: a worker records the health change
//! and puts the alert in the journal's outbox (one short transaction) and
//! wakes the sender; one task composes the message (the job, its build log's last lines) and sends it
//! by mail (lettre: SMTP with STARTTLS when offered, or a sendmail program)
//! and/or to a webhook (`{"text": ...}`, as Slack and Mattermost take it),
//! each with a timeout and a few retries, then takes it out of the outbox.
//! A mail server that is down is logged; it never holds up a build. An
//! alert not yet sent when the daemon stops is sent after the restart (at
//! least once: a stop between sending and taking it out sends it again). What comes from outside (profile
//! names, packer's output) is bounded (40 log lines, long lines cut) and
//! has its control characters replaced, so it cannot add mail headers or
//! break the JSON (which serde_json escapes anyway).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lettre::message::{header::ContentType, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSendmailTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use packuilon_common::config::{AlertsConfig, MailTransport};
use tokio::sync::Notify;

use crate::journal::{HealthChange, JobRecord, JobState, Journal, PendingAlert};

/// Lines of the build log an alert carries.
pub(crate) const LOG_LINES: usize = 40;
/// Characters kept of one log line (or of an error) in an alert.
const LINE_CHARS: usize = 300;
/// Characters kept of a subject.
const SUBJECT_CHARS: usize = 150;
/// How long one attempt to send may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// `build failing` / `rotation failing` / `test failing`: the health states of the journal.
pub(crate) const BUILD_FAILING: &str = "build failing";
pub(crate) const ROTATION_FAILING: &str = "rotation failing";
/// The image was built and failed its test (TEST_COMMAND).
pub(crate) const TEST_FAILING: &str = "test failing";

/// Why the alert settings cannot be used (a configuration error).
#[derive(Debug, thiserror::Error)]
#[error("{problem}")]
pub struct AlertSettingError {
    /// The key in `[global]`.
    pub key: &'static str,
    pub problem: String,
}

/// The daemon's side of alerts: records health changes, wakes the sender.
#[derive(Debug, Clone)]
pub(crate) struct Alerts {
    journal: Arc<Journal>,
    /// `None`: no ADMIN_MAIL and no ALERT_WEBHOOK (health is still
    /// recorded, nothing goes to the outbox).
    sender: Option<Arc<Notify>>,
}

/// Where alerts go, checked at start-up.
struct Channels {
    from: Mailbox,
    to: Vec<Mailbox>,
    mail: Option<Mailer>,
    webhook: Option<(reqwest::Client, reqwest::Url)>,
    status_url: String,
    retry_delays: Vec<Duration>,
}

enum Mailer {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Sendmail(AsyncSendmailTransport<Tokio1Executor>),
}

/// Pauses between attempts: 10 s, 1 min, 5 min (four attempts).
/// `RABBIT2PACKER_ALERT_RETRY_DELAYS` (seconds, comma-separated) overrides
/// them, so tests need not wait minutes.
fn retry_delays() -> Vec<Duration> {
    crate::daemon::retry_delays("RABBIT2PACKER_ALERT_RETRY_DELAYS", &[10, 60, 300])
}

impl Alerts {
    /// Checks the settings and starts the sending task (when alerts go
    /// anywhere). On the site journal (`site`), health and the outbox are
    /// there ([`crate::site`] records them); this daemon sends its own.
    pub(crate) fn start(
        cfg: &AlertsConfig,
        journal: Arc<Journal>,
        site: Option<Arc<crate::site::Site>>,
    ) -> Result<Alerts, AlertSettingError> {
        let channels = Channels::new(cfg)?;
        if channels.mail.is_none() && channels.webhook.is_none() {
            return Ok(Alerts { journal, sender: None });
        }
        let wake = Arc::new(Notify::new());
        // What the outbox holds from before a restart goes first.
        wake.notify_one();
        let outbox = Outbox {
            journal: journal.clone(),
            site,
        };
        tokio::spawn(send_all(channels, outbox, wake.clone()));
        Ok(Alerts {
            journal,
            sender: Some(wake),
        })
    }

    /// Records health, sends nothing (the unit tests).
    #[cfg(test)]
    pub(crate) fn disabled(journal: Arc<Journal>) -> Alerts {
        Alerts { journal, sender: None }
    }

    /// Alerts go somewhere (a health change goes to the outbox).
    pub(crate) fn sends(&self) -> bool {
        self.sender.is_some()
    }

    /// Something was put in the outbox (on the site journal): send it.
    pub(crate) fn wake(&self) {
        if let Some(wake) = &self.sender {
            wake.notify_one();
        }
    }

    /// After job `job_id` of `image_key` finished: records the image's
    /// health and queues an alert if it changed. Never waits on a sender.
    pub(crate) fn observe(&self, image_key: &str, job_id: i64) {
        let job = match self.journal.job(job_id) {
            Ok(Some(j)) => j,
            Ok(None) => return,
            Err(e) => {
                tracing::error!("alerts: {e}");
                return;
            }
        };
        let Some(failing) = health_of(&job) else {
            return;
        };
        match self
            .journal
            .record_health(image_key, job_id, failing, self.sender.is_some())
        {
            Ok(Some(_)) => {
                if let Some(wake) = &self.sender {
                    wake.notify_one();
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!("alerts: {e}"),
        }
    }
}

/// What a finished job says about its image: `Some(None)` healthy,
/// `Some(Some(state))` failing, `None` nothing (interrupted, cancelled).
pub(crate) fn health_of(job: &JobRecord) -> Option<Option<&'static str>> {
    match job.state {
        JobState::Failed if job.builds.iter().any(crate::journal::test_failed) => Some(Some(TEST_FAILING)),
        JobState::Failed => Some(Some(BUILD_FAILING)),
        JobState::Succeeded => {
            let rotation_failed = job
                .builds
                .iter()
                .any(|b| b.rotation.as_deref().is_some_and(|r| r.starts_with("failed")));
            Some(rotation_failed.then_some(ROTATION_FAILING))
        }
        _ => None,
    }
}

impl Channels {
    fn new(cfg: &AlertsConfig) -> Result<Channels, AlertSettingError> {
        let bad = |key, problem: String| AlertSettingError { key, problem };
        let from: Mailbox = cfg
            .mail_from
            .parse()
            .map_err(|e| bad("MAIL_FROM", format!("{:?}: {e}", cfg.mail_from)))?;
        let to = cfg
            .admin_mail
            .iter()
            .map(|a| a.parse().map_err(|e| bad("ADMIN_MAIL", format!("{a:?}: {e}"))))
            .collect::<Result<Vec<Mailbox>, _>>()?;
        let mail = if to.is_empty() {
            None
        } else {
            Some(match &cfg.mail_transport {
                MailTransport::Smtp {
                    host,
                    port,
                    credentials,
                } => {
                    let tls = TlsParameters::new(host.clone())
                        .map_err(|e| bad("SMTP_SERVER", format!("TLS for {host}: {e}")))?;
                    let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.as_str())
                        .port(*port)
                        .tls(Tls::Opportunistic(tls))
                        .timeout(Some(ATTEMPT_TIMEOUT));
                    if let Some((user, password)) = credentials {
                        b = b.credentials(Credentials::new(user.clone(), password.clone()));
                    }
                    Mailer::Smtp(b.build())
                }
                MailTransport::Sendmail(path) => Mailer::Sendmail(
                    AsyncSendmailTransport::<Tokio1Executor>::new_with_command(path.as_os_str()),
                ),
            })
        };
        let webhook = match &cfg.webhook {
            Some(url) => {
                let client = reqwest::Client::builder()
                    .timeout(ATTEMPT_TIMEOUT)
                    .user_agent(concat!("rabbit2packer/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| bad("ALERT_WEBHOOK", e.to_string()))?;
                Some((client, url.clone()))
            }
            None => None,
        };
        Ok(Channels {
            from,
            to,
            mail,
            webhook,
            status_url: cfg.status_url.clone(),
            retry_delays: retry_delays(),
        })
    }

    async fn mail(&self, alert: &Alert) -> Result<(), String> {
        let Some(mailer) = &self.mail else { return Ok(()) };
        let mut b = Message::builder()
            .from(self.from.clone())
            .subject(alert.subject.clone())
            .header(ContentType::TEXT_PLAIN);
        for to in &self.to {
            b = b.to(to.clone());
        }
        let message = b.body(alert.text.clone()).map_err(|e| e.to_string())?;
        let sent = match mailer {
            Mailer::Smtp(t) => tokio::time::timeout(ATTEMPT_TIMEOUT, t.send(message))
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map(drop).map_err(|e| e.to_string())),
            Mailer::Sendmail(t) => tokio::time::timeout(ATTEMPT_TIMEOUT, t.send(message))
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
        };
        sent
    }

    async fn webhook(&self, alert: &Alert) -> Result<(), String> {
        let Some((client, url)) = &self.webhook else {
            return Ok(());
        };
        let body = serde_json::json!({ "text": format!("{}\n\n{}", alert.subject, alert.text) });
        let response = client.post(url.clone()).json(&body).send().await.map_err(|e| {
            // reqwest's error names the URL, which may hold the hook's token.
            e.without_url().to_string()
        })?;
        response
            .error_for_status()
            .map(drop)
            .map_err(|e| e.without_url().to_string())
    }

    /// One channel, with retries; failures are logged, never returned.
    async fn deliver<'a, F, Fut>(&'a self, what: &str, alert: &'a Alert, send: F)
    where
        F: Fn(&'a Channels, &'a Alert) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let attempts = self.retry_delays.len() + 1;
        for attempt in 1..=attempts {
            match send(self, alert).await {
                Ok(()) => {
                    tracing::info!("alert sent by {what}: {}", alert.subject);
                    return;
                }
                Err(e) if attempt < attempts => {
                    let pause = self.retry_delays[attempt - 1];
                    tracing::warn!(
                        "alert by {what} failed (attempt {attempt} of {attempts}): {e}; retrying in {pause:?}"
                    );
                    tokio::time::sleep(pause).await;
                }
                Err(e) => {
                    tracing::error!(
                        "alert by {what} not sent after {attempts} attempts: {e}: {}",
                        alert.subject
                    )
                }
            }
        }
    }
}

/// The sending task: drains the outbox, oldest first, one alert at a time
/// (mail and webhook side by side), whenever it is woken.
async fn send_all(channels: Channels, outbox: Outbox, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let pending = match outbox.pending().await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("alerts: {e}");
                continue;
            }
        };
        for alert in pending {
            send_one(&channels, &outbox.journal, &alert).await;
            if let Err(e) = outbox.done(alert.id).await {
                tracing::error!("alerts: {e}");
            }
        }
    }
}

/// Where the alerts to send wait: this host's journal, or on the site
/// journal its outbox rows for this daemon. The job an alert tells about
/// is read from this host's journal either way (it ran here; its log is here).
struct Outbox {
    journal: Arc<Journal>,
    site: Option<Arc<crate::site::Site>>,
}

impl Outbox {
    async fn pending(&self) -> Result<Vec<PendingAlert>, String> {
        match &self.site {
            Some(site) => site.journal.pending_alerts(&site.host).await.map_err(|e| e.to_string()),
            None => self.journal.pending_alerts().map_err(|e| e.to_string()),
        }
    }

    async fn done(&self, id: i64) -> Result<(), String> {
        match &self.site {
            Some(site) => site.journal.alert_done(id).await.map_err(|e| e.to_string()),
            None => self.journal.alert_done(id).map_err(|e| e.to_string()),
        }
    }
}

async fn send_one(channels: &Channels, journal: &Journal, pending: &PendingAlert) {
    let job = match journal.job(pending.job_id) {
        Ok(Some(job)) => job,
        Ok(None) => return,
        Err(e) => {
            tracing::error!("alerts: {e}");
            return;
        }
    };
    let alert = compose(&pending.image_key, &job, &pending.change, &channels.status_url);
    tokio::join!(
        channels.deliver("mail", &alert, |c, a| c.mail(a)),
        channels.deliver("webhook", &alert, |c, a| c.webhook(a)),
    );
}

/// An alert's subject (one line, bounded) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Alert {
    pub(crate) subject: String,
    pub(crate) text: String,
}

/// The alert for `change` caused by `job`.
pub(crate) fn compose(image_key: &str, job: &JobRecord, change: &HealthChange, status_url: &str) -> Alert {
    let key = clean(image_key, LINE_CHARS);
    let mut text = String::new();
    let subject = match change {
        HealthChange::Failing { state, previous } => {
            let what = match state.as_str() {
                ROTATION_FAILING => "the image was built but its rotation (rename-old-images) failed",
                TEST_FAILING => {
                    "the image was built but failed its test (TEST_COMMAND); it was renamed \
                     BROKEN_NAME and the live image was left alone"
                }
                _ => "the build failed",
            };
            text.push_str(&format!("{key}: {what} (job {}).\n", job.id));
            match previous {
                Some(p) => text.push_str(&format!(
                    "Before this it was {} since job {}.\n",
                    clean(&p.state, 40),
                    p.since_job
                )),
                None => text.push_str("Before this it was healthy (or never built).\n"),
            }
            text.push_str(
                "Further failures of this image send no alert until it recovers; \
                 `rabbit2packer status` and the status page count them.\n",
            );
            format!("packuilon: {key} {state} (job {})", job.id)
        }
        HealthChange::Recovered { was } => {
            text.push_str(&format!(
                "{key}: job {} succeeded; the image had been {} since job {} ({}), with {} further failure(s).\n",
                job.id,
                clean(&was.state, 40),
                was.since_job,
                clean(&was.since_at, 40),
                was.further
            ));
            format!("packuilon: {key} recovered (job {})", job.id)
        }
    };
    text.push('\n');
    let field = |text: &mut String, name: &str, value: &str| {
        text.push_str(&format!("{name:<11} {}\n", clean(value, LINE_CHARS)));
    };
    field(&mut text, "Image key:", image_key);
    field(
        &mut text,
        "Job:",
        &format!(
            "{} ({}, attempt {}, {}, finished {})",
            job.id,
            job.outcome,
            job.attempts,
            job.worker.as_deref().unwrap_or("no worker"),
            job.finished_at.as_deref().unwrap_or("-")
        ),
    );
    field(&mut text, "Profile:", job.profile.as_deref().unwrap_or("(not named)"));
    for b in &job.builds {
        let mut v = format!(
            "{}: exit code {}",
            b.template,
            b.exit_code.map_or_else(|| "none".to_string(), |c| c.to_string())
        );
        if let Some(r) = &b.rotation {
            v.push_str(&format!("; rotation {r}"));
        }
        field(&mut text, "Template:", &v);
    }
    if job.builds.is_empty() {
        field(&mut text, "Template:", "(none was built)");
    }
    if let Some(e) = &job.error {
        field(&mut text, "Error:", e);
    }
    // The log that tells most: the first failed build's, else the last one's.
    let build = job
        .builds
        .iter()
        .find(|b| b.exit_code.is_some_and(|c| c != 0) || b.error.is_some())
        .or_else(|| job.builds.last());
    let log = build.and_then(|b| b.log_path.as_deref());
    if let Some(l) = log {
        field(&mut text, "Build log:", l);
    }
    field(&mut text, "Status:", status_url);
    if let (Some(l), false) = (log, matches!(change, HealthChange::Recovered { .. })) {
        text.push_str(&format!("\nLast {LOG_LINES} lines of the build log:\n"));
        match log_tail(Path::new(l), LOG_LINES) {
            Ok(lines) => {
                for line in lines {
                    text.push_str("  ");
                    text.push_str(&clean(&line, LINE_CHARS));
                    text.push('\n');
                }
            }
            Err(e) => text.push_str(&format!("  (cannot read it: {})\n", clean(&e.to_string(), LINE_CHARS))),
        }
    }
    Alert {
        subject: clean(&subject, SUBJECT_CHARS),
        text,
    }
}

/// The last `n` lines of a file, reading at most its last 256 KiB.
pub(crate) fn log_tail(path: &Path, n: usize) -> std::io::Result<Vec<String>> {
    use std::io::{Read, Seek, SeekFrom};
    const MAX: u64 = 256 * 1024;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(MAX);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(MAX).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        // The first line read is most likely a part of one.
        lines.remove(0);
    }
    let from = lines.len().saturating_sub(n);
    Ok(lines[from..].iter().map(|l| l.to_string()).collect())
}

/// One line, at most `max` characters, control characters (CR, LF, ESC,
/// ...) replaced by `?`: nothing from outside can start a header or a line.
pub(crate) fn clean(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect();
    if s.chars().nth(max).is_some() {
        out.push_str(" [...]");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{BuildRecord, ImageHealth};

    fn job(state: JobState, log: &Path) -> JobRecord {
        JobRecord {
            id: 7,
            image_key: "inventory-sl7x-x86_64".into(),
            profile: Some("ci-a.example.org.json\r\nBcc: evil@example.org".into()),
            message_id: None,
            state,
            outcome: state.as_str().into(),
            received_at: None,
            started_at: None,
            finished_at: Some("2026-01-01T00:00:00Z".into()),
            superseded_by: None,
            attempts: 1,
            worker: Some("Thread-1".into()),
            error: Some("a.json: packer exited with code 1".into()),
            builds: vec![BuildRecord {
                template: "a.json".into(),
                started_at: None,
                finished_at: None,
                exit_code: Some(1),
                log_path: Some(log.display().to_string()),
                artifact_id: None,
                rotation: None,
                error: Some("packer exited with code 1".into()),
                ..BuildRecord::default()
            }],
            host: None,
            host_url: None,
        }
    }

    #[test]
    fn a_failed_test_is_its_own_health_state_and_the_alert_says_the_live_image_was_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        std::fs::write(&log, "rabbit2packer: Test finished at 1 (epoch) with exit code 3\n").unwrap();
        let mut j = job(JobState::Failed, &log);
        assert_eq!(health_of(&j), Some(Some(BUILD_FAILING)));
        j.builds[0].exit_code = Some(0);
        j.builds[0].test = Some("failed: TEST_COMMAND exited with code 3".into());
        j.builds[0].test_exit_code = Some(3);
        assert_eq!(health_of(&j), Some(Some(TEST_FAILING)));
        let change = HealthChange::Failing {
            state: TEST_FAILING.into(),
            previous: None,
        };
        let a = compose("inventory-sl7x-x86_64", &j, &change, "http://h:8150/");
        assert_eq!(a.subject, "packuilon: inventory-sl7x-x86_64 test failing (job 7)");
        assert!(a.text.contains("failed its test (TEST_COMMAND)"), "{}", a.text);
        assert!(a.text.contains("the live image was left alone"), "{}", a.text);
        // A test still running (or passed) is not a failure.
        j.state = JobState::Succeeded;
        j.builds[0].test = Some("passed".into());
        assert_eq!(health_of(&j), Some(None));
    }

    #[test]
    fn a_failure_alert_names_the_job_and_carries_the_last_40_log_lines_cut_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        let mut text = String::new();
        for i in 0..100 {
            text.push_str(&format!("line {i}\n"));
        }
        text.push_str(&"y".repeat(1000));
        text.push_str("\nlast \x1b[31mred\n");
        std::fs::write(&log, text).unwrap();
        let change = HealthChange::Failing {
            state: BUILD_FAILING.into(),
            previous: None,
        };
        let a = compose(
            "inventory-sl7x-x86_64",
            &job(JobState::Failed, &log),
            &change,
            "http://h:8150/",
        );
        assert_eq!(a.subject, "packuilon: inventory-sl7x-x86_64 build failing (job 7)");
        assert!(a.text.contains("Job:        7 (failed, attempt 1"), "{}", a.text);
        assert!(a.text.contains("a.json: exit code 1"), "{}", a.text);
        assert!(a.text.contains("Status:     http://h:8150/"), "{}", a.text);
        // The profile's CR LF cannot start a line (nor a header).
        assert!(a.text.contains("ci-a.example.org.json??Bcc: evil"), "{}", a.text);
        assert!(!a.text.contains("\nBcc"), "{}", a.text);
        let tail: Vec<&str> = a
            .text
            .split("lines of the build log:\n")
            .nth(1)
            .unwrap()
            .lines()
            .collect();
        assert_eq!(tail.len(), 40);
        assert_eq!(tail[0], "  line 62");
        assert!(tail[38].ends_with(" [...]") && tail[38].len() < 320, "{}", tail[38]);
        assert_eq!(tail[39], "  last ?[31mred");
    }

    #[test]
    fn a_recovery_names_the_failure_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = job(JobState::Succeeded, &dir.path().join("none.log"));
        j.id = 9;
        let was = ImageHealth {
            image_key: j.image_key.clone(),
            state: BUILD_FAILING.into(),
            since_job: 7,
            since_at: "2026-01-01T00:00:00Z".into(),
            further: 1,
            last_job: 8,
        };
        let a = compose(&j.image_key, &j, &HealthChange::Recovered { was }, "http://h/");
        assert_eq!(a.subject, "packuilon: inventory-sl7x-x86_64 recovered (job 9)");
        assert!(
            a.text
                .contains("had been build failing since job 7 (2026-01-01T00:00:00Z), with 1 further failure(s)"),
            "{}",
            a.text
        );
    }

    #[tokio::test]
    async fn mail_goes_through_a_sendmail_program_with_one_subject_header() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("mail.txt");
        let sendmail = dir.path().join("sendmail");
        std::fs::write(
            &sendmail,
            format!("#!/bin/sh\necho \"$@\" > {0}.args\ncat > {0}\n", out.display()),
        )
        .unwrap();
        std::fs::set_permissions(&sendmail, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = AlertsConfig {
            admin_mail: vec!["ops@example.org".into()],
            mail_from: "r2p@example.org".into(),
            mail_transport: MailTransport::Sendmail(sendmail),
            webhook: None,
            status_url: "http://h/".into(),
        };
        let channels = Channels::new(&cfg).unwrap();
        let alert = Alert {
            subject: clean("packuilon: x\r\nBcc: evil@example.org", SUBJECT_CHARS),
            text: "line\n.\nafter a lone dot\n".into(),
        };
        channels.mail(&alert).await.unwrap();
        let mail = std::fs::read_to_string(&out).unwrap();
        assert!(
            mail.contains("Subject: packuilon: x??Bcc: evil@example.org\r\n"),
            "{mail}"
        );
        assert!(!mail.contains("\nBcc:"), "{mail}");
        assert!(mail.contains("To: ops@example.org\r\n"), "{mail}");
        let args = std::fs::read_to_string(dir.path().join("mail.txt.args")).unwrap();
        assert!(args.contains("ops@example.org"), "{args}");
    }

    #[test]
    fn health_is_recorded_once_per_change_and_counts_the_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.record_health("a", 1, None, false).unwrap(), None);
        assert!(matches!(
            j.record_health("a", 2, Some(BUILD_FAILING), true).unwrap(),
            Some(HealthChange::Failing { previous: None, .. })
        ));
        assert_eq!(j.record_health("a", 3, Some(BUILD_FAILING), true).unwrap(), None);
        assert!(matches!(
            j.record_health("a", 4, Some(ROTATION_FAILING), true).unwrap(),
            Some(HealthChange::Failing { previous: Some(_), .. })
        ));
        assert_eq!(j.record_health("a", 5, Some(ROTATION_FAILING), true).unwrap(), None);
        let h = j.image_health().unwrap();
        assert_eq!((h[0].since_job, h[0].further, h[0].last_job), (4, 1, 5));
        // One alert per change waits in the outbox, in order.
        let pending = j.pending_alerts().unwrap();
        assert_eq!(pending.iter().map(|p| p.job_id).collect::<Vec<_>>(), vec![2, 4]);
        j.alert_done(pending[0].id).unwrap();
        drop(j);
        // A restart remembers it.
        let j = Journal::open(dir.path()).unwrap();
        let Some(HealthChange::Recovered { was }) = j.record_health("a", 6, None, true).unwrap() else {
            panic!()
        };
        assert_eq!(was.since_job, 4);
        assert!(j.image_health().unwrap().is_empty());
        let pending = j.pending_alerts().unwrap();
        assert_eq!(pending.iter().map(|p| p.job_id).collect::<Vec<_>>(), vec![4, 6]);
        assert!(matches!(pending[1].change, HealthChange::Recovered { .. }));
    }
}
