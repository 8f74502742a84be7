//! `rabbit2packer status` and `rabbit2packer history`: what is running and
//! waiting, and the last builds, read from the journal (safe while the
//! daemon runs: SQLite WAL lets readers in beside the writer).

use std::fmt::Write as _;

use crate::journal::{JobRecord, JobState, Journal, JournalError};

/// Running, waiting and interrupted jobs as text (or JSON). Interrupted
/// jobs are pending work: after a stop they are all the journal holds.
pub fn status(journal: &Journal, json: bool) -> Result<String, JournalError> {
    let jobs = journal.active()?;
    if json {
        return Ok(serde_json::to_string_pretty(&jobs).expect("records serialise") + "\n");
    }
    let mut out = String::new();
    let running: Vec<_> = jobs.iter().filter(|j| j.state == JobState::Running).collect();
    let waiting: Vec<_> = jobs.iter().filter(|j| j.state == JobState::Waiting).collect();
    let _ = writeln!(out, "running: {}", running.len());
    for j in running {
        let b = j.builds.iter().rev().find(|b| b.finished_at.is_none());
        let _ = writeln!(
            out,
            "  #{} {} since {} on {}{}{}",
            j.id,
            j.image_key,
            j.started_at.as_deref().unwrap_or("-"),
            j.worker.as_deref().unwrap_or("-"),
            b.map(|b| format!(", building {}", b.template)).unwrap_or_default(),
            b.and_then(|b| b.log_path.as_deref())
                .map(|p| format!(", log {p}"))
                .unwrap_or_default(),
        );
    }
    let _ = writeln!(out, "waiting: {}", waiting.len());
    for j in waiting {
        let _ = writeln!(
            out,
            "  #{} {} since {}{}{}",
            j.id,
            j.image_key,
            j.received_at.as_deref().unwrap_or("-"),
            j.profile
                .as_deref()
                .map(|p| format!(", profile {p}"))
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
                j.image_key,
                j.finished_at.as_deref().unwrap_or("-"),
                b.map(|b| format!(", was building {}", b.template)).unwrap_or_default(),
                b.and_then(|b| b.log_path.as_deref())
                    .map(|p| format!(", log {p}"))
                    .unwrap_or_default(),
            );
        }
    }
    Ok(out)
}

/// The last `limit` finished jobs (of `image`), newest first, as text or JSON.
pub fn history(journal: &Journal, image: Option<&str>, limit: usize, json: bool) -> Result<String, JournalError> {
    let jobs = journal.history(image, limit)?;
    if json {
        return Ok(serde_json::to_string_pretty(&jobs).expect("records serialise") + "\n");
    }
    let mut out = String::new();
    if jobs.is_empty() {
        out.push_str("no finished builds\n");
    }
    for j in &jobs {
        write_job(&mut out, j);
    }
    Ok(out)
}

fn write_job(out: &mut String, j: &JobRecord) {
    let _ = write!(
        out,
        "#{} {} {} finished {}",
        j.id,
        j.image_key,
        j.outcome,
        j.finished_at.as_deref().unwrap_or("-")
    );
    if let Some(p) = &j.profile {
        let _ = write!(out, " profile {p}");
    }
    if let Some(m) = &j.message_id {
        let _ = write!(out, " message {m}");
    }
    if let Some(s) = j.superseded_by {
        let _ = write!(out, " superseded by #{s}");
    }
    out.push('\n');
    if let Some(e) = &j.error {
        let _ = writeln!(out, "    error: {e}");
    }
    for b in &j.builds {
        let _ = writeln!(
            out,
            "    {} exit {} artifact {} rotation {} log {}",
            b.template,
            b.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            b.artifact_id.as_deref().unwrap_or("-"),
            b.rotation.as_deref().unwrap_or("-"),
            b.log_path.as_deref().unwrap_or("-"),
        );
    }
}
