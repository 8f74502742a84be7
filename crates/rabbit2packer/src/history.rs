//! `rabbit2packer status` and `rabbit2packer history`: what is running and
//! waiting, and the last builds, read from the journal (safe while the
//! daemon runs: SQLite WAL lets readers in beside the writer).
//!
//! Text output is one line per job (and per build): every value that came
//! from outside (a message's `profile` header or id, packer's errors, paths)
//! has its control characters escaped (`\n`, `\u{1b}`), so no value can
//! break a line or send a terminal escape.

use std::fmt::Write as _;

use crate::journal::{ImageHealth, JobRecord, JobState, Journal, JournalError};
use crate::outdated::Outdated;
use crate::site_journal::{SiteJournal, SiteJournalError};

/// Running, waiting and interrupted jobs as text (or JSON). Interrupted
/// jobs are pending work: after a stop they are all the journal holds.
/// With IMAGES_CONFIG's `source_images`, the text also lists the outdated images.
pub fn status(
    journal: &Journal,
    source_images: Option<&std::collections::BTreeMap<String, String>>,
    json: bool,
) -> Result<String, JournalError> {
    let jobs = journal.active()?;
    if json {
        return Ok(serde_json::to_string_pretty(&jobs).expect("records serialise") + "\n");
    }
    let failing = journal.image_health()?;
    let outdated = match source_images {
        Some(sources) => crate::outdated::find(journal, sources)?,
        None => Vec::new(),
    };
    Ok(status_text(&jobs, &failing, &outdated))
}

/// [`status`] of the whole site, from the site journal (STATE_DB): every
/// daemon's jobs, each running one with the daemon (HOST_NAME) that runs it.
pub async fn site_status(
    site: &SiteJournal,
    source_images: Option<&std::collections::BTreeMap<String, String>>,
    json: bool,
) -> Result<String, SiteJournalError> {
    let jobs = site.active().await?;
    if json {
        return Ok(serde_json::to_string_pretty(&jobs).expect("records serialise") + "\n");
    }
    let outdated = match source_images {
        Some(sources) => crate::outdated::find_on_site(site, sources).await?,
        None => Vec::new(),
    };
    Ok(status_text(&jobs, &site.image_health().await?, &outdated))
}

/// [`history`] of the whole site, from the site journal (STATE_DB).
pub async fn site_history(
    site: &SiteJournal,
    image: Option<&str>,
    limit: usize,
    json: bool,
) -> Result<String, SiteJournalError> {
    Ok(history_text(&site.history(image, limit).await?, json))
}

fn status_text(jobs: &[JobRecord], failing: &[ImageHealth], outdated: &[Outdated]) -> String {
    let mut out = String::new();
    let running: Vec<_> = jobs.iter().filter(|j| j.state == JobState::Running).collect();
    let waiting: Vec<_> = jobs.iter().filter(|j| j.state == JobState::Waiting).collect();
    let _ = writeln!(out, "running: {}", running.len());
    for j in running {
        let b = j.builds.iter().rev().find(|b| b.finished_at.is_none());
        // Built, and its images at the test gate.
        let testing = j
            .builds
            .iter()
            .rev()
            .find(|b| b.test.as_deref() == Some(crate::journal::TESTING));
        let _ = writeln!(
            out,
            "  #{} {} since {} on {}{}{}{}",
            j.id,
            esc(&j.image_key),
            esc(j.started_at.as_deref().unwrap_or("-")),
            j.host.as_deref().map(|h| format!("{}/", esc(h))).unwrap_or_default(),
            esc(j.worker.as_deref().unwrap_or("-")),
            match (b, testing) {
                (Some(b), _) => format!(", building {}", esc(&b.template)),
                (None, Some(t)) => format!(
                    ", testing {} ({})",
                    esc(&t.template),
                    t.images
                        .iter()
                        .map(|i| esc(&i.id).into_owned())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                (None, None) => String::new(),
            },
            b.or(testing)
                .and_then(|b| b.log_path.as_deref())
                .map(|p| format!(", log {}", esc(p)))
                .unwrap_or_default(),
        );
    }
    let _ = writeln!(out, "waiting: {}", waiting.len());
    for j in waiting {
        let _ = writeln!(
            out,
            "  #{} {} since {}{}{}",
            j.id,
            esc(&j.image_key),
            esc(j.received_at.as_deref().unwrap_or("-")),
            j.profile
                .as_deref()
                .map(|p| format!(", profile {}", esc(p)))
                .unwrap_or_default(),
            if j.attempts > 0 {
                format!(", attempt {}", j.attempts + 1)
            } else {
                String::new()
            }
        );
    }
    let interrupted: Vec<_> = jobs.iter().filter(|j| j.state == JobState::Interrupted).collect();
    if !interrupted.is_empty() {
        let _ = writeln!(
            out,
            "interrupted: {} (rabbit2packer stopped during the build; each runs again at the next start)",
            interrupted.len()
        );
        for j in interrupted {
            let b = j.builds.last();
            let _ = writeln!(
                out,
                "  #{} {} at {}{}{}",
                j.id,
                esc(&j.image_key),
                esc(j.finished_at.as_deref().unwrap_or("-")),
                b.map(|b| format!(", was building {}", esc(&b.template)))
                    .unwrap_or_default(),
                b.and_then(|b| b.log_path.as_deref())
                    .map(|p| format!(", log {}", esc(p)))
                    .unwrap_or_default(),
            );
        }
    }
    // Images alerted about as failing: the alert went out once; the count
    // says how many failures followed it without another alert.
    if !failing.is_empty() {
        let _ = writeln!(out, "failing: {}", failing.len());
        for h in failing {
            let _ = writeln!(
                out,
                "  {} {} since job #{} ({}){}",
                esc(&h.image_key),
                esc(&h.state),
                h.since_job,
                esc(&h.since_at),
                match h.further {
                    0 => String::new(),
                    n => format!(", {n} further failure(s), the last job #{}", h.last_job),
                }
            );
        }
    }
    if !outdated.is_empty() {
        let _ = writeln!(
            out,
            "outdated: {} (IMAGES_CONFIG names a new source image; `rabbit2packer rebuild --outdated` builds them)",
            outdated.len()
        );
        for o in outdated {
            let _ = writeln!(
                out,
                "  {} built from {} by job #{}, now {}",
                esc(&o.image_key),
                esc(&o.built_from),
                o.job,
                esc(&o.current)
            );
        }
    }
    out
}

/// The last `limit` finished jobs (of `image`), newest first, as text or JSON.
pub fn history(journal: &Journal, image: Option<&str>, limit: usize, json: bool) -> Result<String, JournalError> {
    Ok(history_text(&journal.history(image, limit)?, json))
}

fn history_text(jobs: &[JobRecord], json: bool) -> String {
    if json {
        return serde_json::to_string_pretty(&jobs).expect("records serialise") + "\n";
    }
    let mut out = String::new();
    if jobs.is_empty() {
        out.push_str("no finished builds\n");
    }
    for j in jobs {
        write_job(&mut out, j);
    }
    out
}

fn write_job(out: &mut String, j: &JobRecord) {
    let _ = write!(
        out,
        "#{} {} {} finished {}",
        j.id,
        esc(&j.image_key),
        esc(&j.outcome),
        esc(j.finished_at.as_deref().unwrap_or("-"))
    );
    if let Some(p) = &j.profile {
        let _ = write!(out, " profile {}", esc(p));
    }
    if let Some(m) = &j.message_id {
        let _ = write!(out, " message {}", esc(m));
    }
    if let Some(h) = &j.host {
        let _ = write!(out, " on {}", esc(h));
    }
    if let Some(s) = j.superseded_by {
        let _ = write!(out, " superseded by #{s}");
    }
    out.push('\n');
    if let Some(e) = &j.error {
        let _ = writeln!(out, "    error: {}", esc(e));
    }
    for b in &j.builds {
        let _ = writeln!(
            out,
            "    {} exit {} artifact {}{} rotation {} log {}",
            esc(&b.template),
            b.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            esc(b.artifact_id.as_deref().unwrap_or("-")),
            b.test
                .as_deref()
                .map(|t| format!(" test {}", esc(t)))
                .unwrap_or_default(),
            esc(b.rotation.as_deref().unwrap_or("-")),
            esc(b.log_path.as_deref().unwrap_or("-")),
        );
    }
}

/// `s` with its control characters escaped as Rust writes them (`\n`,
/// `\t`, `\u{1b}`); everything else, other languages included, as is.
pub(crate) fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(super::esc("plain é ü"), "plain é ü");
        assert_eq!(super::esc("a\nb\tc\u{1b}[2J"), "a\\nb\\tc\\u{1b}[2J");
    }
}
