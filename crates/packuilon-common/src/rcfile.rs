//! OpenStack RC files (`PACKER_AUTH_FILE`, `PACKER_ADMIN_AUTH_FILE`).
//!
//! Real RC files hold logic (`if`, `unset`, prompts), so they are sourced by
//! bash, never parsed: the result is what the file exports. No shell stands
//! between the daemon and Packer; only this one-off `bash` reads the file.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

/// Sourcing an RC file failed. The file's values are never part of it.
#[derive(Debug, thiserror::Error)]
pub enum RcFileError {
    #[error("{file}: cannot source with bash: {source}")]
    Spawn { file: String, source: std::io::Error },
    #[error("{file}: sourcing it with bash failed ({status}){}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Failed {
        file: String,
        status: String,
        stderr: String,
    },
}

/// Sources `file` with bash (stdin from /dev/null, so a password prompt
/// reads nothing) and returns the exported variables it set or changed.
pub fn source(file: &Path) -> Result<BTreeMap<String, String>, RcFileError> {
    let name = file.display().to_string();
    // Print the environment before and after, separated by an empty record.
    let script = r#"env -0; printf '\0'; . "$1" >&2 </dev/null || exit $?; env -0"#;
    let out = Command::new("bash")
        .args(["--noprofile", "--norc", "-c", script, "packuilon-rc"])
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RcFileError::Spawn {
            file: name.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        let tail: String = stderr
            .chars()
            .rev()
            .take(500)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(RcFileError::Failed {
            file: name,
            // ExitStatus's Display already says "exit status: N".
            status: match (
                out.status.code(),
                std::os::unix::process::ExitStatusExt::signal(&out.status),
            ) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                (None, None) => out.status.to_string(),
            },
            stderr: tail,
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut records = text.split('\0');
    let mut before = BTreeMap::new();
    for rec in records.by_ref() {
        if rec.is_empty() {
            break;
        }
        if let Some((k, v)) = rec.split_once('=') {
            before.insert(k, v);
        }
    }
    let mut exported = BTreeMap::new();
    for rec in records {
        if let Some((k, v)) = rec.split_once('=') {
            if k != "_" && k != "SHLVL" && before.get(k) != Some(&v) {
                exported.insert(k.to_string(), v.to_string());
            }
        }
    }
    Ok(exported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_logic_and_returns_exports() {
        let dir = tempfile::tempdir().unwrap();
        let rc = dir.path().join("openrc.sh");
        std::fs::write(
            &rc,
            "export OS_AUTH_URL=http://127.0.0.1:5000/v3\n\
             echo 'Please enter your OpenStack Password: '\n\
             read -sr OS_PASSWORD_INPUT\n\
             export OS_PASSWORD=\"s3cr=t ${OS_PASSWORD_INPUT}\"\n\
             NOT_EXPORTED=1\n\
             if [ -z \"$OS_REGION_NAME\" ]; then unset OS_REGION_NAME; fi\n",
        )
        .unwrap();
        let env = source(&rc).unwrap();
        assert_eq!(
            env.get("OS_AUTH_URL").map(String::as_str),
            Some("http://127.0.0.1:5000/v3")
        );
        assert_eq!(env.get("OS_PASSWORD").map(String::as_str), Some("s3cr=t "));
        assert!(!env.contains_key("NOT_EXPORTED"));
        assert!(!env.contains_key("OS_PASSWORD_INPUT"));
    }

    #[test]
    fn a_failing_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let rc = dir.path().join("bad.sh");
        std::fs::write(&rc, "export A=1\nfalse\n").unwrap();
        let e = source(&rc).unwrap_err().to_string();
        assert!(e.contains("bad.sh"), "{e}");
        assert!(
            e.ends_with("bad.sh: sourcing it with bash failed (exit status 1)"),
            "{e}"
        );
        std::fs::write(&rc, "echo 'oops' >&2\nexit 3\n").unwrap();
        let e = source(&rc).unwrap_err().to_string();
        assert!(
            e.ends_with("bad.sh: sourcing it with bash failed (exit status 3): oops"),
            "{e}"
        );
        let e = source(&dir.path().join("missing.sh")).unwrap_err().to_string();
        assert!(e.contains("missing.sh"), "{e}");
    }
}
