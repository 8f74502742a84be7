//! Running packer: `PACKER_PATH build -machine-readable -color=false FILE`,
//! no shell in between, as the leader of its own process group, so that a
//! stop or a timeout reaches packer and every plugin and script it started.
//! The test gate's TEST_COMMAND runs the same way.
//!
//! - Stop (SIGTERM to the daemon) or BUILD_TIMEOUT: SIGINT to the group, as
//!   Ctrl-C at a terminal would, then SIGKILL to the group after the grace
//!   period. Measured with packer 1.6: SIGINT to the group gives "Cleanly
//!   cancelled builds after being interrupted." every time (its plugins
//!   ignore SIGINT and stay alive to clean up what they created in the
//!   cloud; scripts die); SIGTERM to the group kills the plugins and scripts
//!   first and the build merely errors (cloud resources may be left);
//!   SIGTERM to packer alone cancels cleanly but leaves its scripts running.
//! - The daemon killed with `kill -9`: packer gets SIGTERM through
//!   `PR_SET_PDEATHSIG`. That signal follows the *thread* that forked, so
//!   every packer is forked by one dedicated thread that lives as long as
//!   the daemon (never tokio's blocking pool, whose threads exit when
//!   idle). Each group id is also in the journal; the next start stops any
//!   group still alive (`kill_leftover_group`).
//! - Exit is awaited through a pidfd (no SIGCHLD polling, no sleeps).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// What to run: packer on a build file, or TEST_COMMAND (the test gate).
#[derive(Debug, Clone)]
pub(crate) struct GroupCommand {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<std::ffi::OsString>,
    /// Added to the daemon's own environment.
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) cwd: Option<PathBuf>,
}

impl GroupCommand {
    /// `PACKER_PATH build -machine-readable -color=false FILE`.
    pub(crate) fn packer_build(
        packer: PathBuf,
        build_file: &std::path::Path,
        env: BTreeMap<String, String>,
        cwd: Option<PathBuf>,
    ) -> GroupCommand {
        GroupCommand {
            program: packer,
            args: vec![
                "build".into(),
                "-machine-readable".into(),
                "-color=false".into(),
                build_file.into(),
            ],
            env,
            cwd,
        }
    }

    fn command(&self, daemon_pid: libc::pid_t) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(&self.env)
            // systemd's socket is the daemon's: packer has nothing to tell it.
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The daemon may have died between fork and prctl.
                if libc::getppid() != daemon_pid {
                    return Err(io::Error::other("rabbit2packer exited while starting packer"));
                }
                Ok(())
            });
        }
        cmd
    }
}

type SpawnRequest = (GroupCommand, oneshot::Sender<io::Result<Child>>);

/// The one long-lived thread that forks every packer (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct Spawner {
    tx: std_mpsc::Sender<SpawnRequest>,
}

impl Spawner {
    pub(crate) fn start() -> io::Result<Spawner> {
        let (tx, rx) = std_mpsc::channel::<SpawnRequest>();
        let daemon_pid = std::process::id() as libc::pid_t;
        std::thread::Builder::new()
            .name("packer-spawner".into())
            .spawn(move || {
                // Lives until every Spawner is dropped, i.e. as long as the daemon.
                for (cmd, reply) in rx {
                    let _ = reply.send(cmd.command(daemon_pid).spawn());
                }
            })?;
        Ok(Spawner { tx })
    }

    async fn spawn(&self, cmd: GroupCommand) -> io::Result<Child> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((cmd, reply))
            .map_err(|_| io::Error::other("the packer-spawner thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("the packer-spawner thread is gone"))?
    }
}

/// How a packer run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Packer's exit code, or 128 + signal when a signal ended it.
    pub(crate) exit_code: i32,
    pub(crate) timed_out: bool,
    /// Stopped because the daemon is stopping.
    pub(crate) cancelled: bool,
}

/// Process group id of a running packer (for the journal).
pub(crate) type Pgid = i32;

/// Kills a process group when dropped: a job that panics leaves nothing behind.
struct GroupGuard {
    pgid: Pgid,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, libc::SIGKILL);
        }
    }
}

fn signal_group(pgid: Pgid, sig: libc::c_int) {
    if pgid > 1 {
        // SAFETY: plain syscall; ESRCH (group gone) is fine.
        unsafe { libc::kill(-pgid, sig) };
    }
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall returning a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

struct PidFd(OwnedFd);
impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl PidFd {
    /// Registers the pidfd with the runtime: readable once the process exits.
    fn watch(self) -> io::Result<AsyncFd<PidFd>> {
        // SAFETY: PidFd owns its fd and never closes or replaces it while registered.
        Ok(unsafe { AsyncFd::register(self)? })
    }
}

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// Runs packer to the end. `on_start` gets the group id once it runs;
/// `on_line` gets each output line. After BUILD_TIMEOUT or
/// when `stop` fires, the group gets SIGINT (packer cancels and cleans up),
/// then SIGKILL after `grace`.
pub(crate) async fn run<S, L>(
    spawner: &Spawner,
    cmd: GroupCommand,
    timeout: Duration,
    grace: Duration,
    stop: &CancellationToken,
    on_start: S,
    mut on_line: L,
) -> io::Result<Outcome>
where
    S: FnOnce(Pgid),
    L: FnMut(Stream, &str),
{
    let mut child = spawner.spawn(cmd).await?;
    let pgid = child.id() as Pgid;
    let mut guard = GroupGuard { pgid, armed: true };
    on_start(pgid);
    let pidfd = PidFd(pidfd_open(pgid)?).watch()?;
    let stdout = tokio::process::ChildStdout::from_std(child.stdout.take().expect("piped"))?;
    let stderr = tokio::process::ChildStderr::from_std(child.stderr.take().expect("piped"))?;
    let mut out_lines = BufReader::new(stdout).lines();
    let mut err_lines = BufReader::new(stderr).lines();
    let (mut out_open, mut err_open) = (true, true);

    let exited = async {
        let _ = pidfd.readable().await;
    };
    tokio::pin!(exited);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut kill_at: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let (mut timed_out, mut cancelled) = (false, false);

    loop {
        tokio::select! {
            line = out_lines.next_line(), if out_open => match line {
                Ok(Some(l)) => on_line(Stream::Stdout, &l),
                _ => out_open = false,
            },
            line = err_lines.next_line(), if err_open => match line {
                Ok(Some(l)) => on_line(Stream::Stderr, &l),
                _ => err_open = false,
            },
            _ = &mut exited => break,
            _ = &mut deadline, if !timed_out && !cancelled => {
                timed_out = true;
                signal_group(pgid, libc::SIGINT);
                kill_at = Some(Box::pin(tokio::time::sleep(grace)));
            }
            _ = stop.cancelled(), if !timed_out && !cancelled => {
                cancelled = true;
                signal_group(pgid, libc::SIGINT);
                kill_at = Some(Box::pin(tokio::time::sleep(grace)));
            }
            _ = async { kill_at.as_mut().expect("guarded").await }, if kill_at.is_some() => {
                signal_group(pgid, libc::SIGKILL);
                kill_at = None;
            }
        }
    }
    // The leader is a zombie until reaped, so its group id cannot be reused
    // yet: whatever is left in the group (a script's background job) goes now.
    signal_group(pgid, libc::SIGKILL);
    let status = child.wait()?;
    guard.armed = false;
    // Drain what the pipes still hold (bounded: a stray holder of the pipe is dead now).
    let drain = async {
        while out_open {
            match out_lines.next_line().await {
                Ok(Some(l)) => on_line(Stream::Stdout, &l),
                _ => out_open = false,
            }
        }
        while err_open {
            match err_lines.next_line().await {
                Ok(Some(l)) => on_line(Stream::Stderr, &l),
                _ => err_open = false,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    let exit_code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(Outcome {
        exit_code,
        timed_out,
        cancelled,
    })
}

/// This boot's id: a recorded process group is only ours on the same boot.
pub(crate) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Live processes now in process group `pgid` (from /proc; zombies, which
/// are already dead, are left out).
pub fn group_members(pgid: Pgid) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
                // Fields after the command name, which is in parentheses.
                let rest = &s[s.rfind(')')? + 2..];
                let mut fields = rest.split(' ');
                if fields.next()? == "Z" {
                    return None;
                }
                fields.nth(1)?.parse::<Pgid>().ok()
            }) == Some(pgid)
        })
        .collect()
}

/// At start-up: a packer group recorded by a daemon that died (same boot)
/// and still alive gets SIGINT (as a stop would), then SIGKILL after `grace`. Returns how
/// many processes were found.
pub(crate) async fn kill_leftover_group(pgid: Pgid, recorded_boot: &str, grace: Duration) -> usize {
    if pgid <= 1 || recorded_boot != boot_id() || pgid == std::process::id() as Pgid {
        return 0;
    }
    let members = group_members(pgid);
    if members.is_empty() {
        return 0;
    }
    signal_group(pgid, libc::SIGINT);
    // Wait for each member's exit through its pidfd, bounded by the grace period.
    let fds: Vec<AsyncFd<PidFd>> = members
        .iter()
        .filter_map(|p| pidfd_open(*p).ok())
        .filter_map(|fd| PidFd(fd).watch().ok())
        .collect();
    let all_gone = futures::future::join_all(fds.iter().map(|fd| async move {
        let _ = fd.readable().await;
    }));
    if tokio::time::timeout(grace, all_gone).await.is_err() {
        signal_group(pgid, libc::SIGKILL);
    }
    members.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        let p = dir.join("fake-packer.sh");
        std::fs::write(&p, format!("#!/bin/bash\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn cmd(packer: PathBuf) -> GroupCommand {
        GroupCommand::packer_build(
            packer,
            std::path::Path::new("/dev/null"),
            [("R2P_X".to_string(), "a b".to_string())].into(),
            None,
        )
    }

    #[tokio::test]
    async fn runs_in_own_group_and_reports_exit_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(dir.path(), "echo \"$1 $2 $3 [$R2P_X]\"; echo err >&2; exit 3");
        let spawner = Spawner::start().unwrap();
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut group = 0;
        let o = run(
            &spawner,
            cmd(p),
            Duration::from_secs(30),
            Duration::from_secs(1),
            &CancellationToken::new(),
            |g| group = g,
            |s, l| match s {
                Stream::Stdout => out.push(l.to_string()),
                Stream::Stderr => err.push(l.to_string()),
            },
        )
        .await
        .unwrap();
        assert_eq!(o.exit_code, 3);
        assert!(group > 1);
        assert_eq!(out, vec!["build -machine-readable -color=false [a b]"]);
        assert_eq!(err, vec!["err"]);
    }

    #[tokio::test]
    async fn timeout_interrupts_then_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        // Ignores SIGINT, and leaves a child in the group.
        let p = script(dir.path(), "trap '' INT; sleep 60 & echo started; wait");
        let spawner = Spawner::start().unwrap();
        let mut group = 0;
        let t0 = std::time::Instant::now();
        let o = run(
            &spawner,
            cmd(p),
            Duration::from_millis(300),
            Duration::from_millis(300),
            &CancellationToken::new(),
            |g| group = g,
            |_, _| {},
        )
        .await
        .unwrap();
        assert!(o.timed_out);
        assert_eq!(o.exit_code, 128 + libc::SIGKILL);
        assert!(t0.elapsed() < Duration::from_secs(10));
        // SIGKILL is delivered asynchronously: allow the kernel a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !group_members(group).is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(group_members(group), Vec::<libc::pid_t>::new());
    }
}
