//! Build logs as operators and their monitoring know them:
//! `LOG_DIR/<image key>.<template>.<epoch>.log`, human-readable, ending with
//! `rabbit2packer: Build finished at <epoch> (epoch) with exit code <rc>`;
//! `LOG_DIR/<image key>.<template>.log` links to the newest, and only the
//! newest LOG_KEEP are kept (the original overwrote or never pruned them).
//!
//! Packer runs with `-machine-readable`; each UI line of that stream is
//! decoded back to what a person would have seen (`%!(PACKER_COMMA)` and
//! `\n` restored), and the artifact lines give the image ID.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One artifact Packer reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Artifact {
    pub(crate) builder_id: String,
    pub(crate) id: String,
}

/// The builder id of Packer's openstack builder: its artifact ID is a Glance image ID.
pub(crate) const OPENSTACK_BUILDER_ID: &str = "mitchellh.openstack";

/// What the log learned from Packer's output.
#[derive(Debug, Clone, Default)]
pub(crate) struct Summary {
    pub(crate) path: PathBuf,
    pub(crate) artifacts: Vec<Artifact>,
    /// `Image: <uuid>` from a UI message: the image exists even when a
    /// post-processor failed and no artifact lines came.
    pub(crate) image_seen: Option<String>,
    /// The last `ui,error` line (for the job's error).
    pub(crate) last_error: Option<String>,
}

impl Summary {
    /// The artifact ID recorded in the journal.
    pub(crate) fn artifact_id(&self) -> Option<String> {
        if self.artifacts.is_empty() {
            return self.image_seen.clone();
        }
        Some(
            self.artifacts
                .iter()
                .map(|a| a.id.as_str())
                .collect::<Vec<_>>()
                .join(","),
        )
    }

    /// Glance image IDs of the openstack artifacts.
    pub(crate) fn openstack_images(&self) -> Vec<String> {
        self.artifacts
            .iter()
            .filter(|a| a.builder_id == OPENSTACK_BUILDER_ID)
            .map(|a| a.id.clone())
            .collect()
    }
}

/// A decoded machine-readable line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MachineLine {
    pub(crate) target: String,
    pub(crate) kind: String,
    pub(crate) data: Vec<String>,
}

/// `timestamp,target,type,data...` with each data field unescaped.
pub(crate) fn decode(line: &str) -> Option<MachineLine> {
    let mut parts = line.split(',');
    let ts = parts.next()?;
    if ts.is_empty() || !ts.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let target = parts.next()?.to_string();
    let kind = parts.next()?.to_string();
    let data = parts.map(unescape).collect();
    Some(MachineLine { target, kind, data })
}

/// Restores what `-machine-readable` escaped.
pub(crate) fn unescape(field: &str) -> String {
    field.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n")
}

/// The log file of one template build, being written.
pub(crate) struct BuildLog {
    path: PathBuf,
    /// Unbuffered: each line is one write(2), so the log is readable during
    /// the build and keeps what packer printed if the daemon is killed.
    out: File,
    summary: Summary,
    pending_artifact: Vec<(usize, Artifact)>,
    log_dir: PathBuf,
    stem: String,
    keep: usize,
}

impl std::fmt::Debug for BuildLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildLog").field("path", &self.path).finish()
    }
}

fn epoch_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl BuildLog {
    /// Creates `LOG_DIR/<image key>.<template>.<epoch>.log` and points
    /// `<image key>.<template>.log` at it. Two builds in the same second get
    /// consecutive epochs rather than one file.
    pub(crate) fn create(log_dir: &Path, image_key: &str, template: &str, keep: usize) -> std::io::Result<BuildLog> {
        let stem = format!("{image_key}.{template}");
        let mut epoch = epoch_now();
        loop {
            let path = log_dir.join(format!("{stem}.{epoch}.log"));
            match File::options().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    // Operators follow the link while the build runs, not after.
                    // A link that cannot be made must not stop the build.
                    if let Err(e) = update_link(log_dir, &stem, &path) {
                        tracing::warn!(
                            "cannot point {}.log at {}: {e}",
                            log_dir.join(&stem).display(),
                            path.display()
                        );
                    }
                    return Ok(BuildLog {
                        path,
                        out: file,
                        summary: Summary::default(),
                        pending_artifact: Vec::new(),
                        log_dir: log_dir.to_path_buf(),
                        stem,
                        keep: keep.max(1),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => epoch += 1,
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// One line of packer's stdout (machine-readable).
    pub(crate) fn packer_line(&mut self, line: &str) {
        let Some(m) = decode(line) else {
            // Not machine-readable (a panic, a plugin's stray output): keep it as is.
            self.write(line);
            return;
        };
        match (m.kind.as_str(), m.data.as_slice()) {
            ("ui", [level, text, ..]) => {
                if level == "error" {
                    self.summary.last_error = Some(text.trim().to_string());
                }
                if level == "message" {
                    if let Some(uuid) = image_line(text) {
                        self.summary.image_seen = Some(uuid);
                    }
                }
                let text = text.clone();
                self.write(text.strip_suffix('\n').unwrap_or(&text));
            }
            ("artifact", [index, field, value, ..]) => {
                let index: usize = index.parse().unwrap_or(0);
                let pos = match self.pending_artifact.iter().position(|(i, _)| *i == index) {
                    Some(p) => p,
                    None => {
                        self.pending_artifact.push((index, Artifact::default()));
                        self.pending_artifact.len() - 1
                    }
                };
                match field.as_str() {
                    "builder-id" => self.pending_artifact[pos].1.builder_id = value.clone(),
                    "id" => self.pending_artifact[pos].1.id = value.clone(),
                    _ => {}
                }
            }
            ("artifact", [index, field]) if field == "end" => {
                let index: usize = index.parse().unwrap_or(0);
                if let Some(pos) = self.pending_artifact.iter().position(|(i, _)| *i == index) {
                    let (_, a) = self.pending_artifact.remove(pos);
                    self.summary.artifacts.push(a);
                }
            }
            _ => {}
        }
    }

    /// A line of packer's stderr, kept as is.
    pub(crate) fn raw_line(&mut self, line: &str) {
        self.write(line);
    }

    /// A line from rabbit2packer itself (timeouts, stops, spawn failures).
    pub(crate) fn note(&mut self, text: &str) {
        self.write(&format!("rabbit2packer: {text}"));
    }

    fn write(&mut self, text: &str) {
        // A full disk must not stop the build; the journal still gets the result.
        let mut line = String::with_capacity(text.len() + 1);
        line.push_str(text);
        line.push('\n');
        let _ = self.out.write_all(line.as_bytes());
    }

    /// Prunes old logs, writes the trailer, and returns what was learned.
    /// On a full LOG_DIR the trailer may fail: pruning still happens (first,
    /// so that it frees space for the trailer), and what was learned during
    /// the build comes back inside the error.
    pub(crate) fn finish(mut self, exit_code: i32) -> Result<Summary, Unfinished> {
        // An artifact without its `end` line still counts.
        for (_, a) in self.pending_artifact.drain(..) {
            self.summary.artifacts.push(a);
        }
        self.summary.path = self.path.clone();
        let pruned = prune(&self.log_dir, &self.stem, self.keep);
        let trailer = writeln!(
            self.out,
            "rabbit2packer: Build finished at {} (epoch) with exit code {exit_code}",
            epoch_now()
        )
        .and_then(|()| self.out.sync_all());
        let error = match (trailer, pruned) {
            (Ok(()), Ok(())) => return Ok(self.summary),
            (Err(e), _) => std::io::Error::new(e.kind(), format!("cannot write the trailer: {e}")),
            (Ok(()), Err(e)) => std::io::Error::new(e.kind(), format!("cannot remove old logs: {e}")),
        };
        Err(Unfinished {
            summary: self.summary,
            error,
        })
    }
}

/// The test gate's part of a build log: appended after packer's trailer
/// (TEST_COMMAND's output and rabbit2packer's notes), ending with its own
/// trailer `rabbit2packer: Test finished at <epoch> (epoch) with exit code
/// <rc>`, so the log's last line still says how it ended. A log that cannot
/// be opened loses these lines, never the test.
pub(crate) struct TestLog {
    out: Option<File>,
}

impl TestLog {
    /// Opens `path` to append (a log pruned or removed meanwhile is created again).
    pub(crate) fn open(path: &Path) -> TestLog {
        match File::options().append(true).create(true).open(path) {
            Ok(f) => TestLog { out: Some(f) },
            Err(e) => {
                tracing::warn!("cannot append the test's output to {}: {e}", path.display());
                TestLog { out: None }
            }
        }
    }

    /// A line TEST_COMMAND printed, kept as is.
    pub(crate) fn line(&mut self, text: &str) {
        if let Some(out) = &mut self.out {
            let mut line = String::with_capacity(text.len() + 1);
            line.push_str(text);
            line.push('\n');
            let _ = out.write_all(line.as_bytes());
        }
    }

    /// A line from rabbit2packer about the test.
    pub(crate) fn note(&mut self, text: &str) {
        self.line(&format!("rabbit2packer: test: {text}"));
    }

    /// The test's trailer.
    pub(crate) fn finish(&mut self, exit_code: i32) {
        self.line(&format!(
            "rabbit2packer: Test finished at {} (epoch) with exit code {exit_code}",
            epoch_now()
        ));
        if let Some(out) = &mut self.out {
            let _ = out.sync_all();
        }
    }
}

/// The trailer or the pruning failed; the build's summary is still here.
#[derive(Debug)]
pub(crate) struct Unfinished {
    pub(crate) summary: Summary,
    pub(crate) error: std::io::Error,
}

impl std::fmt::Display for Unfinished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// `Image: <uuid>` as the openstack builder prints it.
fn image_line(text: &str) -> Option<String> {
    let rest = text
        .trim()
        .split_once(": Image: ")
        .map(|(_, r)| r)
        .or_else(|| text.trim().strip_prefix("Image: "))?;
    let id = rest.trim();
    (id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')).then(|| id.to_string())
}

/// Points `LOG_DIR/<stem>.log` at `newest` (atomically: rename over it).
fn update_link(log_dir: &Path, stem: &str, newest: &Path) -> std::io::Result<()> {
    let link = log_dir.join(format!("{stem}.log"));
    let tmp = log_dir.join(format!(".{stem}.log.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let target = newest
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| newest.to_path_buf());
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, &link)
}

/// The build logs of `<stem>` (image key and template), oldest first.
pub fn logs_of(log_dir: &Path, stem: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let prefix = format!("{stem}.");
    let mut logs = Vec::new();
    for entry in std::fs::read_dir(log_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let Some(epoch) = rest.strip_suffix(".log") else {
            continue;
        };
        if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(e) = epoch.parse::<u64>() {
            logs.push((e, entry.path()));
        }
    }
    logs.sort();
    Ok(logs)
}

/// Deletes all but the newest `keep` logs of `<stem>`.
pub(crate) fn prune(log_dir: &Path, stem: &str, keep: usize) -> std::io::Result<()> {
    let logs = logs_of(log_dir, stem)?;
    let excess = logs.len().saturating_sub(keep);
    for (_, path) in logs.into_iter().take(excess) {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_readable_is_decoded_and_trailer_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = BuildLog::create(dir.path(), "inv-sl7x-x86_64", "managed.json", 30).unwrap();
        for line in [
            "1795596345,,ui,say,==> openstack: Creating the image: sl7x-x86_64 inventory",
            "1795596345,,ui,message,    openstack: Image: d7ea93d8-1189-4eb6-8b64-d3b7624c58c0",
            "1795596345,,ui,message,    null: hello%!(PACKER_COMMA) world",
            "1795596346,,ui,say,\\n==> Builds finished. The artifacts of successful builds are:",
            "1795596346,openstack,artifact-count,1",
            "1795596346,openstack,artifact,0,builder-id,mitchellh.openstack",
            "1795596346,openstack,artifact,0,id,d7ea93d8-1189-4eb6-8b64-d3b7624c58c0",
            "1795596346,openstack,artifact,0,end",
        ] {
            log.packer_line(line);
        }
        let path = log.path().to_path_buf();
        let s = log.finish(0).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("    null: hello, world\n"), "{text}");
        assert!(text.contains("\n\n==> Builds finished."), "{text}");
        let last = text.lines().last().unwrap();
        assert!(last.starts_with("rabbit2packer: Build finished at "), "{last}");
        assert!(last.ends_with(" (epoch) with exit code 0"), "{last}");
        assert_eq!(s.openstack_images(), vec!["d7ea93d8-1189-4eb6-8b64-d3b7624c58c0"]);
        assert_eq!(s.image_seen.as_deref(), Some("d7ea93d8-1189-4eb6-8b64-d3b7624c58c0"));
        let link = dir.path().join("inv-sl7x-x86_64.managed.json.log");
        assert_eq!(
            std::fs::read_link(link).unwrap(),
            PathBuf::from(path.file_name().unwrap())
        );
    }

    #[test]
    fn each_line_is_readable_through_the_link_before_the_build_ends() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("k.t.json.log");
        let old = BuildLog::create(dir.path(), "k", "t.json", 30).unwrap();
        let old_path = old.path().to_path_buf();
        old.finish(0).unwrap();
        let mut log = BuildLog::create(dir.path(), "k", "t.json", 30).unwrap();
        assert_ne!(log.path(), old_path);
        assert_eq!(dir.path().join(std::fs::read_link(&link).unwrap()), log.path());
        log.packer_line("1795596345,,ui,say,==> null: first line");
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "==> null: first line\n");
        // Dropped without finish (as a killed daemon would): what was written stays.
        let path = log.path().to_path_buf();
        drop(log);
        assert_eq!(std::fs::read_to_string(path).unwrap(), "==> null: first line\n");
    }

    #[test]
    fn a_link_that_cannot_be_made_does_not_stop_the_build_log() {
        let dir = tempfile::tempdir().unwrap();
        // Something an operator left where the link goes.
        std::fs::create_dir_all(dir.path().join("k.t.json.log/kept")).unwrap();
        let mut log = BuildLog::create(dir.path(), "k", "t.json", 30).unwrap();
        log.packer_line("1795596345,,ui,say,==> null: first line");
        let path = log.path().to_path_buf();
        log.finish(0).unwrap();
        assert!(std::fs::read_to_string(path)
            .unwrap()
            .starts_with("==> null: first line\n"));
        assert!(dir.path().join("k.t.json.log/kept").is_dir());
    }

    #[test]
    fn only_newest_logs_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        for e in [100, 200, 300, 400] {
            std::fs::write(dir.path().join(format!("k.t.json.{e}.log")), "").unwrap();
        }
        std::fs::write(dir.path().join("k.t.json.extra.1.log"), "").unwrap();
        prune(dir.path(), "k.t.json", 2).unwrap();
        let left: Vec<u64> = logs_of(dir.path(), "k.t.json")
            .unwrap()
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        assert_eq!(left, vec![300, 400]);
        assert!(dir.path().join("k.t.json.extra.1.log").exists());
    }
}
