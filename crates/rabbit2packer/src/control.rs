//! The levers operators reach for at night, while the daemon runs:
//! `rabbit2packer rebuild IMAGE_KEY`, `cancel JOB`, `retry JOB`.
//!
//! The command reaches the running daemon over a Unix socket,
//! STATE_DIR/control.sock, mode 0600 and owned by the user the daemon runs
//! as: only that user and root can connect, and the daemon checks the
//! caller's uid again (SO_PEERCRED) before it acts. An operator gets the
//! answer at once (the job queued, the job cancelled, or why not), and the
//! daemon alone changes its scheduler and journal, so a command never races
//! a worker. One request per connection: a JSON line in, a JSON line out.
//!
//! - rebuild: a new job for the image with the newest profile the journal
//!   holds for it (as if cdb2rabbit had sent it again);
//! - cancel: a waiting job is dropped; a running one has its packer
//!   interrupted (SIGINT to packer's process group, SIGKILL after
//!   STOP_TIMEOUT), and either is recorded as `cancelled`;
//! - retry: a new job with the profile of a failed or cancelled job.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::journal::{JobRecord, JobState, Journal, LastBody, NewJob};
use crate::scheduler::{Accepted, Jobs};

/// The socket's name in STATE_DIR.
pub const SOCKET_NAME: &str = "control.sock";
/// The longest request line accepted.
const MAX_REQUEST: usize = 4096;

/// A command, as the CLI sends it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    Rebuild {
        image_key: String,
    },
    /// Every image built from a source image IMAGES_CONFIG no longer names.
    RebuildOutdated,
    Cancel {
        job: i64,
    },
    Retry {
        job: i64,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    pub ok: bool,
    /// What was done, or why not.
    pub message: String,
    /// The job queued (rebuild, retry) or cancelled.
    pub job: Option<i64>,
}

impl Reply {
    fn ok(message: String, job: i64) -> Reply {
        Reply {
            ok: true,
            message,
            job: Some(job),
        }
    }

    fn refused(message: String) -> Reply {
        Reply {
            ok: false,
            message,
            job: None,
        }
    }
}

/// Running jobs that a `cancel` can stop: each job's own token (a child of
/// the daemon's stop token, so a stop reaches them too).
#[derive(Debug, Default)]
pub(crate) struct Cancels {
    running: Mutex<HashMap<i64, (CancellationToken, Option<String>)>>,
}

impl Cancels {
    /// The token a job runs under, registered until [`Cancels::finish`].
    pub(crate) fn start(&self, job: i64, daemon_stop: &CancellationToken) -> CancellationToken {
        let token = daemon_stop.child_token();
        self.lock().insert(job, (token.clone(), None));
        token
    }

    /// The job ended: who cancelled it, if someone did.
    pub(crate) fn finish(&self, job: i64) -> Option<String> {
        self.lock().remove(&job).and_then(|(_, by)| by)
    }

    /// Stops job `job`'s build (`by` says why); false if it does not run here.
    pub(crate) fn cancel(&self, job: i64, by: &str) -> bool {
        match self.lock().get_mut(&job) {
            Some((token, who)) => {
                who.get_or_insert_with(|| by.to_string());
                token.cancel();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, (CancellationToken, Option<String>)>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the control server acts on.
#[derive(Debug, Clone)]
pub(crate) struct Control {
    pub(crate) journal: Arc<Journal>,
    pub(crate) jobs: Jobs,
    pub(crate) cancels: Arc<Cancels>,
    /// IMAGES_CONFIG (`rebuild --outdated`).
    pub(crate) images_file: std::path::PathBuf,
}

/// The journal a command reads and changes: this host's, or on STATE_DB the site's.
impl Control {
    async fn last_body(&self, image_key: &str) -> Result<Option<LastBody>, String> {
        match &self.jobs {
            Jobs::Site(site) => site.journal.last_body(image_key).await,
            Jobs::Local(_) => return self.journal.last_body(image_key).map_err(|e| e.to_string()),
        }
        .map_err(|e| e.to_string())
    }

    async fn job(&self, id: i64) -> Result<Option<JobRecord>, String> {
        match &self.jobs {
            Jobs::Site(site) => site.journal.job(id).await.map_err(|e| e.to_string()),
            Jobs::Local(_) => self.journal.job(id).map_err(|e| e.to_string()),
        }
    }

    async fn body(&self, id: i64) -> Result<Option<Vec<u8>>, String> {
        match &self.jobs {
            Jobs::Site(site) => site.journal.body(id).await.map_err(|e| e.to_string()),
            Jobs::Local(_) => self.journal.body(id).map_err(|e| e.to_string()),
        }
    }

    async fn cancel_waiting(&self, id: i64, why: &str) -> Result<bool, String> {
        match &self.jobs {
            Jobs::Site(site) => site.journal.cancel_waiting(id, why).await.map_err(|e| e.to_string()),
            Jobs::Local(s) => s.cancel_waiting(id, why).map_err(|e| e.to_string()),
        }
    }
}

/// Binds STATE_DIR/control.sock (0600; a socket left by a dead daemon is
/// replaced: STATE_DIR's lock says none runs).
pub(crate) fn bind(state_dir: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = state_dir.join(SOCKET_NAME);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Between the bind and the chmod the socket has the umask's mode; a
    // caller who connects then is still refused by its uid (`connection`).
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves connections until `stop` fires.
pub(crate) async fn serve(listener: UnixListener, control: Control, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            s = listener.accept() => match s {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::error!("control socket: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let control = control.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &control).await {
                tracing::warn!("control socket: {e}");
            }
        });
    }
}

async fn connection(stream: UnixStream, control: &Control) -> std::io::Result<()> {
    // SAFETY: plain syscall.
    let me = unsafe { libc::geteuid() };
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let uid = cred.uid();
    // Read before answering, even a refusal: the caller's write must not
    // meet a closed socket.
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
    reader.read_line(&mut line).await?;
    let reply = if uid != 0 && uid != me {
        tracing::warn!("control socket: refused a command from uid {uid} (only root or uid {me})");
        Reply::refused(format!(
            "permission denied: only root or the user rabbit2packer runs as (uid {me}) may do this"
        ))
    } else {
        match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let by = format!("{} (uid {uid})", user_name(uid));
                handle(control, &req, &by).await
            }
            Err(e) => Reply::refused(format!("bad request: {e}")),
        }
    };
    let mut text = serde_json::to_string(&reply).expect("replies serialise");
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

/// Carries out one request from user `by`.
pub(crate) async fn handle(control: &Control, req: &Request, by: &str) -> Reply {
    let result = match req {
        Request::Rebuild { image_key } => rebuild(control, image_key, by).await,
        Request::RebuildOutdated => rebuild_outdated(control, by).await,
        Request::Retry { job } => retry(control, *job, by).await,
        Request::Cancel { job } => cancel(control, *job, by).await,
    };
    result.unwrap_or_else(Reply::refused)
}

async fn rebuild(control: &Control, image_key: &str, by: &str) -> Result<Reply, String> {
    let found = control.last_body(image_key).await?;
    let Some((from, profile, body)) = found else {
        let known = control.journal.image_keys(10).unwrap_or_default();
        return Err(format!(
            "no profile of image {image_key:?} in the journal: nothing to rebuild from{}",
            if known.is_empty() {
                String::new()
            } else {
                format!(" (images with jobs: {})", known.join(", "))
            }
        ));
    };
    let id = queue(control, image_key, profile, body, &format!("rebuild-{image_key}")).await?;
    tracing::info!("{by}: rebuild of {image_key} queued as job {id} (the profile of job {from})");
    Ok(Reply::ok(
        format!("job {id} queued: a rebuild of {image_key} with the profile of job {from}"),
        id,
    ))
}

/// Queues a rebuild of every outdated image with its newest profile.
pub(crate) async fn rebuild_outdated(control: &Control, by: &str) -> Result<Reply, String> {
    let sources = crate::outdated::read_source_images(&control.images_file)?;
    let outdated = match &control.jobs {
        Jobs::Site(site) => crate::outdated::find_on_site(&site.journal, &sources)
            .await
            .map_err(|e| e.to_string())?,
        Jobs::Local(_) => crate::outdated::find(&control.journal, &sources).map_err(|e| e.to_string())?,
    };
    if outdated.is_empty() {
        return Ok(Reply {
            ok: true,
            message: format!(
                "no outdated image: every image was built from the source image {} names now",
                control.images_file.display()
            ),
            job: None,
        });
    }
    let mut queued = Vec::new();
    let mut last = 0;
    for o in &outdated {
        let Some((from, profile, body)) = control.last_body(&o.image_key).await? else {
            continue;
        };
        let id = queue(
            control,
            &o.image_key,
            profile,
            body,
            &format!("rebuild-outdated-{}", o.image_key),
        )
        .await?;
        tracing::info!(
            "{by}: {} is outdated (built from {}, IMAGES_CONFIG now names {}): rebuild queued as job {id} (the profile of job {from})",
            o.image_key,
            o.built_from,
            o.current
        );
        queued.push(format!("{} (job {id})", o.image_key));
        last = id;
    }
    Ok(Reply::ok(
        format!(
            "{} rebuild(s) of outdated images queued: {}",
            queued.len(),
            queued.join(", ")
        ),
        last,
    ))
}

async fn retry(control: &Control, job: i64, by: &str) -> Result<Reply, String> {
    let rec = control
        .job(job)
        .await?
        .ok_or_else(|| format!("no job {job} in the journal"))?;
    if !matches!(rec.state, JobState::Failed | JobState::Cancelled) {
        return Err(format!(
            "job {job} ({}) is {}: only a failed or cancelled job can be retried (see `rabbit2packer rebuild {}`)",
            rec.image_key,
            rec.state.as_str(),
            rec.image_key
        ));
    }
    let body = control.body(job).await?.ok_or_else(|| {
        format!(
            "the profile of job {job} is no longer kept (a newer job of {} replaced it): \
             use `rabbit2packer rebuild {}`",
            rec.image_key, rec.image_key
        )
    })?;
    let id = queue(
        control,
        &rec.image_key,
        rec.profile.clone(),
        body,
        &format!("retry-{job}"),
    )
    .await?;
    tracing::info!("{by}: job {job} of {} retried as job {id}", rec.image_key);
    Ok(Reply::ok(
        format!("job {id} queued: a retry of job {job} ({})", rec.image_key),
        id,
    ))
}

async fn queue(
    control: &Control,
    image_key: &str,
    profile: Option<String>,
    body: Vec<u8>,
    why: &str,
) -> Result<i64, String> {
    let job = NewJob {
        // Unique, and saying where the job came from.
        message_id: Some(format!("{why}-{}", uuid::Uuid::new_v4())),
        body_sha256: hex::encode(sha2::Sha256::digest(&body)),
        profile,
        image_key: image_key.to_string(),
        body,
    };
    match control.jobs.accept(job, false).await.map_err(|e| e.to_string())? {
        Accepted::New { id, superseded } => {
            if let Some(old) = superseded {
                tracing::info!("job {old} of {image_key} superseded by job {id}");
            }
            Ok(id)
        }
        Accepted::Duplicate(id) => Ok(id),
    }
}

async fn cancel(control: &Control, job: i64, by: &str) -> Result<Reply, String> {
    let rec = control
        .job(job)
        .await?
        .ok_or_else(|| format!("no job {job} in the journal"))?;
    let why = format!("cancelled by {by}");
    match rec.state {
        JobState::Waiting if control.cancel_waiting(job, &why).await? => {
            tracing::info!("Job {job} for {} cancelled by {by} (it was waiting)", rec.image_key);
            Ok(Reply::ok(
                format!("job {job} ({}) cancelled; it was waiting", rec.image_key),
                job,
            ))
        }
        JobState::Waiting | JobState::Running if control.cancels.cancel(job, &why) => {
            tracing::info!("Job {job} for {} cancelled by {by}: interrupting packer", rec.image_key);
            Ok(Reply::ok(
                format!(
                    "job {job} ({}) cancelled; packer is interrupted and cleans up (the job shows `cancelled` when it has; \
                     a job whose builds had already ended, rotating, finishes as it is and says so in the log)",
                    rec.image_key
                ),
                job,
            ))
        }
        JobState::Running if rec.host.is_some() => Err(format!(
            "job {job} ({}) runs on {}: cancel it there (`rabbit2packer cancel {job}` on that daemon)",
            rec.image_key,
            rec.host.as_deref().unwrap_or_default()
        )),
        state => Err(format!(
            "job {job} ({}) is {}: only a waiting or running job can be cancelled",
            rec.image_key,
            state.as_str()
        )),
    }
}

/// `name`, or the uid when it has none.
fn user_name(uid: u32) -> String {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: the buffers outlive the call; the result points into them.
    let name = unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut res: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut res);
        (rc == 0 && !res.is_null()).then(|| std::ffi::CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned())
    };
    name.unwrap_or_else(|| uid.to_string())
}

/// Why a command could not be carried out; [`ClientError::exit_code`] is
/// the CLI's exit status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon refused (unknown image or job, wrong state, not allowed).
    #[error("{0}")]
    Refused(String),
    /// The socket cannot be reached (no daemon, or not allowed to connect).
    #[error("{}: {problem}", socket.display())]
    Unreachable { socket: PathBuf, problem: String },
}

impl ClientError {
    /// 1: nothing was done (as for any runtime failure).
    pub fn exit_code(&self) -> i32 {
        packuilon_common::EXIT_FAILED
    }
}

/// Sends `req` to the daemon whose STATE_DIR is `state_dir`.
pub fn send(state_dir: &Path, req: &Request) -> Result<Reply, ClientError> {
    use std::io::{BufRead, Write};
    let socket = state_dir.join(SOCKET_NAME);
    let unreachable = |e: std::io::Error| {
        let problem = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                "permission denied: only root or the user rabbit2packer runs as may control it".to_string()
            }
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                format!("{e}: is rabbit2packer running with this STATE_DIR?")
            }
            _ => e.to_string(),
        };
        ClientError::Unreachable {
            socket: socket.clone(),
            problem,
        }
    };
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .map_err(unreachable)?;
    let mut line = serde_json::to_string(req).expect("requests serialise");
    line.push('\n');
    // A daemon that answers without reading (an older one, a refusal) may
    // have closed its end: its answer is still there to read.
    let written = stream.write_all(line.as_bytes());
    let mut answer = String::new();
    let read = std::io::BufReader::new(&stream).read_line(&mut answer);
    if answer.is_empty() {
        written.map_err(unreachable)?;
        read.map_err(unreachable)?;
    }
    let reply: Reply = serde_json::from_str(&answer).map_err(|e| ClientError::Unreachable {
        socket: socket.clone(),
        problem: format!("no answer from the daemon ({e})"),
    })?;
    if reply.ok {
        Ok(reply)
    } else {
        Err(ClientError::Refused(reply.message))
    }
}
