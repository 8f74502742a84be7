//! The status server (`[rabbit2packer] STATUS_LISTEN`): one page that shows
//! what every image is doing, a page per job with its live build log, the
//! JSON API both pages use, `/metrics` for Prometheus, and `/healthz` and
//! `/readyz` for a load balancer or a monitoring check.
//!
//! It only reads. The journal is the source of truth: every answer comes
//! from a read-only connection of its own, on the blocking pool, with a
//! bounded amount of work (`limit` is capped), so a request never holds the
//! connection the consumer and the workers write through. The pages follow
//! changes with a long poll on `/api/changes`, woken by the journal's
//! writes ([`Journal::subscribe`]): no polling while nothing happens.
//! A build log is served by job and template index, from the path the
//! journal recorded, and only if it lies inside LOG_DIR; nothing in a
//! request names a file. The pages are static: they build their DOM with
//! `textContent`, so whatever a profile, a template or a log holds is shown
//! as text; they load nothing from elsewhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::journal::{JobFilter, JobRecord, JobState, Journal, StateFilter};
use crate::metrics::Metrics;
use crate::site::Site;

/// The most jobs one `/api/jobs` answer holds.
pub const MAX_LIMIT: usize = 500;
/// `/api/jobs` without `limit`.
const DEFAULT_LIMIT: usize = 50;
/// The most bytes of a build log one `/api/jobs/<id>/log` answer holds.
const MAX_LOG_CHUNK: u64 = 4 << 20;
/// How long `/api/changes` waits for a change before answering anyway.
const CHANGES_WAIT: Duration = Duration::from_secs(25);

const PAGE: &str = include_str!("page.html");
const JOB_PAGE: &str = include_str!("job.html");

/// What every handler shares.
struct Shared {
    /// The server's own read-only connection to the journal (on the site
    /// journal, this daemon's own: the live builds of the jobs it runs).
    journal: Arc<Journal>,
    /// The site journal (STATE_DB): the pages and the API show the whole site.
    site: Option<Arc<Site>>,
    /// Bumped by the daemon's writes to the journal.
    changes: tokio::sync::watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    /// LOG_DIR, resolved (symbolic links followed) at start.
    log_dir: PathBuf,
    /// IMAGES_CONFIG (outdated images).
    images_config: PathBuf,
}

/// The address people reach the page by, for links (alerts, log lines):
/// STATUS_URL, else `http://<host name>:<port>/` of the bound address.
pub fn public_url(status: &packuilon_common::config::StatusConfig, bound: std::net::SocketAddr) -> String {
    status.public_url(bound.port())
}

/// The server's routes over a journal opened read-only (and the site
/// journal, when the daemon is on one).
pub(crate) fn router(
    journal: Arc<Journal>,
    site: Option<Arc<Site>>,
    changes: tokio::sync::watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    log_dir: &Path,
    images_config: &Path,
) -> Router {
    let shared = Arc::new(Shared {
        journal,
        site,
        changes,
        metrics,
        log_dir: std::fs::canonicalize(log_dir).unwrap_or_else(|_| log_dir.to_path_buf()),
        images_config: images_config.to_path_buf(),
    });
    Router::new()
        .route("/", get(|| async { html(PAGE) }))
        .route("/jobs/{id}", get(job_page))
        .route("/api/images", get(images))
        .route("/api/jobs", get(jobs))
        .route("/api/jobs/{id}", get(job))
        .route("/api/jobs/{id}/log", get(job_log))
        .route("/api/changes", get(changes_handler))
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { problem(StatusCode::NOT_FOUND, "no such page") })
        .with_state(shared)
}

/// Serves `router` on `listener` until `stop` fires.
pub async fn serve(listener: std::net::TcpListener, router: Router, stop: CancellationToken) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

fn html(body: &'static str) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            // Nothing from elsewhere, no inline content but our own script and style.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
                ),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

fn problem(status: StatusCode, why: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": why.into() }))).into_response()
}

/// A refusal not yet made into a response (small enough to return in a
/// `Result`).
#[derive(Debug)]
struct Problem(StatusCode, String);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        problem(self.0, self.1)
    }
}

/// A job id from the URL: digits only, else 404 (there is no such job).
fn job_id(raw: &str) -> Result<i64, Problem> {
    let no_such_job = || Problem(StatusCode::NOT_FOUND, "no such job".into());
    if raw.is_empty() || raw.len() > 18 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(no_such_job());
    }
    raw.parse().map_err(|_| no_such_job())
}

/// Runs a journal read on the blocking pool.
async fn read<T: Send + 'static>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&Journal) -> crate::journal::Result<T> + Send + 'static,
) -> Result<T, Response> {
    let journal = shared.journal.clone();
    match tokio::task::spawn_blocking(move || f(&journal)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        Err(e) => Err(problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// Runs a read of the site journal.
async fn site_read<T>(
    f: impl std::future::Future<Output = Result<T, crate::site_journal::SiteJournalError>>,
) -> Result<T, Response> {
    f.await
        .map_err(|e| problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

/// Job `id`: from the site journal when there is one (with the live builds
/// of a job this daemon runs), else from this host's.
async fn find_job(shared: &Arc<Shared>, id: i64) -> Result<Option<JobRecord>, Response> {
    let Some(site) = &shared.site else {
        return read(shared, move |j| j.job(id)).await;
    };
    let mut job = site_read(site.journal.job(id)).await?;
    if let Some(j) = job
        .as_mut()
        .filter(|j| j.state == JobState::Running && j.host.as_deref() == Some(&site.host))
    {
        // The site journal has its builds once it ends; until then they are here.
        if let Some(local) = read(shared, move |l| l.job(id)).await? {
            j.builds = local.builds;
        }
    }
    Ok(job)
}

fn now() -> String {
    crate::journal::now()
}

async fn job_page(State(shared): State<Arc<Shared>>, UrlPath(raw): UrlPath<String>) -> Response {
    let id = match job_id(&raw) {
        Ok(id) => id,
        Err(p) => return p.into_response(),
    };
    match find_job(&shared, id).await {
        Ok(Some(_)) => html(JOB_PAGE),
        Ok(None) => problem(StatusCode::NOT_FOUND, "no such job"),
        Err(r) => r,
    }
}

async fn images(State(shared): State<Arc<Shared>>) -> Response {
    let images_config = shared.images_config.clone();
    let summaries = move |j: &Journal| {
        let mut images = j.images()?;
        // An IMAGES_CONFIG that cannot be read marks nothing (the daemon says why).
        if let Ok(sources) = crate::outdated::read_source_images(&images_config) {
            mark_outdated(&mut images, crate::outdated::find(j, &sources)?);
        }
        Ok(images)
    };
    let found = match &shared.site {
        Some(site) => site_images(site, &shared.images_config).await,
        None => read(&shared, summaries).await,
    };
    match found {
        Ok(images) => Json(serde_json::json!({ "now": now(), "images": images })).into_response(),
        Err(r) => r,
    }
}

/// The site's images, the outdated ones marked (see `images`).
async fn site_images(site: &Site, images_config: &Path) -> Result<Vec<crate::journal::ImageSummary>, Response> {
    let mut images = site_read(site.journal.images()).await?;
    if let Ok(sources) = crate::outdated::read_source_images(images_config) {
        mark_outdated(
            &mut images,
            site_read(crate::outdated::find_on_site(&site.journal, &sources)).await?,
        );
    }
    Ok(images)
}

/// Each image's `outdated` from the list of outdated ones.
fn mark_outdated(images: &mut [crate::journal::ImageSummary], outdated: Vec<crate::outdated::Outdated>) {
    let mut outdated: std::collections::BTreeMap<String, crate::outdated::Outdated> =
        outdated.into_iter().map(|o| (o.image_key.clone(), o)).collect();
    for im in images {
        im.outdated = outdated.remove(&im.image_key);
    }
}

/// `/api/jobs` query: every field optional, anything else is a 400.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    state: Option<String>,
    image: Option<String>,
    limit: Option<String>,
    before: Option<String>,
}

fn image_key_ok(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 400
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
}

fn parse_filter(q: JobsQuery) -> Result<JobFilter, String> {
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(StateFilter::parse(s).ok_or_else(|| {
            format!(
                "state: unknown state {s:?} (waiting, running, succeeded, failed, superseded, interrupted, finished)"
            )
        })?),
    };
    let image = match q.image {
        None => None,
        Some(i) if i.is_empty() => None,
        Some(i) if image_key_ok(&i) => Some(i),
        Some(_) => return Err("image: not an image key (letters, digits, '.', '_', '-', '+')".into()),
    };
    let limit = match q.limit.as_deref() {
        None | Some("") => DEFAULT_LIMIT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => return Err(format!("limit: must be a whole number from 1 to {MAX_LIMIT}")),
        },
    };
    let before = match q.before.as_deref() {
        None | Some("") => None,
        Some(b) => Some(b.parse::<i64>().map_err(|_| "before: must be a job id".to_string())?),
    };
    Ok(JobFilter {
        state,
        image,
        before,
        limit,
    })
}

async fn jobs(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let filter = match query.map_err(|e| e.body_text()).and_then(|Query(q)| parse_filter(q)) {
        Ok(f) => f,
        Err(why) => return problem(StatusCode::BAD_REQUEST, why),
    };
    let found = match &shared.site {
        Some(site) => site_read(site.journal.jobs(&filter)).await,
        None => read(&shared, move |j| j.jobs(&filter)).await,
    };
    match found {
        Ok(jobs) => Json(serde_json::json!({ "now": now(), "jobs": jobs })).into_response(),
        Err(r) => r,
    }
}

async fn job(State(shared): State<Arc<Shared>>, UrlPath(raw): UrlPath<String>) -> Response {
    let id = match job_id(&raw) {
        Ok(id) => id,
        Err(p) => return p.into_response(),
    };
    match find_job(&shared, id).await {
        Ok(Some(job)) => Json(serde_json::json!({ "now": now(), "job": job })).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "no such job"),
        Err(r) => r,
    }
}

/// `/api/jobs/<id>/log` query: which template build (default: the last) and
/// from which byte (to follow a running build).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    build: Option<String>,
    offset: Option<String>,
}

async fn job_log(
    State(shared): State<Arc<Shared>>,
    UrlPath(raw): UrlPath<String>,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let id = match job_id(&raw) {
        Ok(id) => id,
        Err(p) => return p.into_response(),
    };
    let Ok(Query(q)) = query else {
        return problem(StatusCode::BAD_REQUEST, "unknown query (build, offset)");
    };
    let number = |v: Option<String>, what: &str| -> Result<Option<u64>, Problem> {
        match v.as_deref() {
            None | Some("") => Ok(None),
            Some(s) => s
                .parse::<u64>()
                .map(Some)
                .map_err(|_| Problem(StatusCode::BAD_REQUEST, format!("{what}: must be a whole number"))),
        }
    };
    let (build, offset) = match (number(q.build, "build"), number(q.offset, "offset")) {
        (Ok(b), Ok(o)) => (b, o.unwrap_or(0)),
        (Err(p), _) | (_, Err(p)) => return p.into_response(),
    };
    let job = match find_job(&shared, id).await {
        Ok(Some(job)) => job,
        Ok(None) => return problem(StatusCode::NOT_FOUND, "no such job"),
        Err(r) => return r,
    };
    if let Some(site) = &shared.site {
        // A finished build's log is kept in the site journal, whoever ran it.
        match site_read(site.journal.build_log_at(id, build.map(|b| b as usize))).await {
            Ok(Some(text)) => return log_chunk(&text, offset),
            Ok(None) => {}
            Err(r) => return r,
        }
        if job.host.as_deref() != Some(&site.host) {
            let on = job.host.as_deref().unwrap_or("another daemon");
            let url = job
                .host_url
                .as_deref()
                .map(|u| format!(": {}/jobs/{id}", u.trim_end_matches('/')));
            return problem(
                StatusCode::NOT_FOUND,
                format!(
                    "no build log for this job here: it runs on {on}{}",
                    url.unwrap_or_default()
                ),
            );
        }
    }
    let record = match build {
        Some(n) => job.builds.get(n as usize),
        None => job.builds.last(),
    };
    let Some(log) = record.and_then(|b| b.log_path.clone()) else {
        return problem(StatusCode::NOT_FOUND, "no build log for this job");
    };
    let log_dir = shared.log_dir.clone();
    let chunk = tokio::task::spawn_blocking(move || read_log(&log_dir, Path::new(&log), offset)).await;
    match chunk {
        Ok(Ok((text, next, size))) => log_response(text, next, size),
        Ok(Err(status)) => problem(status, "build log not found in LOG_DIR"),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A log kept in the site journal, from `offset` (as `read_log` cuts a file).
fn log_chunk(text: &[u8], offset: u64) -> Response {
    let size = text.len() as u64;
    let start = offset.min(size) as usize;
    let end = (start + MAX_LOG_CHUNK as usize).min(text.len());
    let mut len = end - start;
    if end < text.len() {
        if let Some(nl) = text[start..end].iter().rposition(|b| *b == b'\n') {
            len = nl + 1;
        }
    }
    log_response(text[start..start + len].to_vec(), (start + len) as u64, size)
}

/// A piece of a build log, with the offset to ask for next and the log's size.
fn log_response(text: Vec<u8>, next: u64, size: u64) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::HeaderName::from_static("x-log-next-offset"),
                HeaderValue::from(next),
            ),
            (header::HeaderName::from_static("x-log-size"), HeaderValue::from(size)),
        ],
        text,
    )
        .into_response()
}

/// Up to [`MAX_LOG_CHUNK`] bytes of a build log from `offset`, if the file
/// (links resolved) is inside LOG_DIR; with the offset to ask for next and
/// the file's size.
fn read_log(log_dir: &Path, log: &Path, offset: u64) -> Result<(Vec<u8>, u64, u64), StatusCode> {
    use std::io::{Read, Seek};
    let real = std::fs::canonicalize(log).map_err(|_| StatusCode::NOT_FOUND)?;
    if !real.starts_with(log_dir) {
        tracing::warn!(
            "status: build log {} is outside LOG_DIR {}: not served",
            log.display(),
            log_dir.display()
        );
        return Err(StatusCode::NOT_FOUND);
    }
    let mut f = std::fs::File::open(&real).map_err(|_| StatusCode::NOT_FOUND)?;
    let meta = f.metadata().map_err(|_| StatusCode::NOT_FOUND)?;
    if !meta.is_file() {
        return Err(StatusCode::NOT_FOUND);
    }
    let size = meta.len();
    let start = offset.min(size);
    f.seek(std::io::SeekFrom::Start(start))
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let mut buf = Vec::new();
    f.take(MAX_LOG_CHUNK)
        .read_to_end(&mut buf)
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    // End on a whole line while the build writes, so a line is never split.
    let mut len = buf.len();
    if let Some(nl) = buf.iter().rposition(|b| *b == b'\n') {
        if len as u64 == MAX_LOG_CHUNK || start + (len as u64) == size {
            len = nl + 1;
        }
    }
    buf.truncate(len);
    Ok((buf, start + len as u64, size))
}

/// `/api/changes?after=N`: answers once the journal changed since N (or after
/// a while), with the new count. The pages wait on it to reload their data.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangesQuery {
    after: Option<String>,
}

async fn changes_handler(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<ChangesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let after = match query {
        Ok(Query(ChangesQuery { after: None })) => None,
        Ok(Query(ChangesQuery { after: Some(a) })) => match a.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => return problem(StatusCode::BAD_REQUEST, "after: must be a whole number"),
        },
        Err(_) => return problem(StatusCode::BAD_REQUEST, "unknown query (after)"),
    };
    let mut rx = shared.changes.clone();
    if let Some(after) = after {
        let _ = tokio::time::timeout(CHANGES_WAIT, rx.wait_for(|n| *n != after)).await;
    }
    let generation = *rx.borrow();
    Json(serde_json::json!({ "generation": generation })).into_response()
}

/// Running and waiting jobs: the site's on the site journal.
async fn counts(shared: &Arc<Shared>) -> Result<(i64, i64), Response> {
    match &shared.site {
        Some(site) => site_read(site.journal.counts()).await,
        None => read(shared, |j| j.counts()).await,
    }
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> Response {
    let (running, waiting) = match counts(&shared).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        shared.metrics.render(running, waiting),
    )
        .into_response()
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let unavailable = |why: String| (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response();
    if counts(&shared).await.is_err() {
        return unavailable("the job journal cannot be read".into());
    }
    if !shared.metrics.broker_connected() {
        return unavailable("not connected to RabbitMQ".into());
    }
    "ready\n".into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_digits_only() {
        assert_eq!(job_id("42").unwrap(), 42);
        for bad in ["", "-1", "1e3", "..", "1/2", "99999999999999999999", "%2e%2e"] {
            assert!(job_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_log_outside_log_dir_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        std::fs::write(dir.path().join("secret"), "no").unwrap();
        std::fs::write(logs.join("a.log"), "line 1\nline 2\n").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), logs.join("b.log")).unwrap();
        let logs = std::fs::canonicalize(&logs).unwrap();
        assert_eq!(read_log(&logs, &logs.join("a.log"), 7).unwrap().0, b"line 2\n");
        assert_eq!(
            read_log(&logs, &logs.join("b.log"), 0).unwrap_err(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            read_log(&logs, &logs.join("../secret"), 0).unwrap_err(),
            StatusCode::NOT_FOUND
        );
    }
}
