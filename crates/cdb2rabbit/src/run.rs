//! One cdb2rabbit run: index -> candidates -> downloads -> publishes ->
//! cache, losing nothing.
//!
//! The rule that makes a run safe to fail at any point: a profile's mtime in
//! the cached index advances only when the profile was processed (published
//! and confirmed by the broker, or found unchanged). A profile that failed
//! (download, JSON, publish, a bad index entry) keeps its old cached mtime or
//! stays absent, so the next run picks it up again. The cached index is
//! written once, atomically, at the end, and not at all when the index or the
//! broker could not be reached.
//!
//! Downloads run at most DOWNLOAD_CONCURRENCY at a time, fewer while the
//! web server shows strain (see [`crate::concurrency`]). Changed profiles are
//! published in small batches ([`PUBLISH_BATCH`] profiles, or whatever
//! arrived within [`PUBLISH_WAIT`]) and their confirms are awaited alongside
//! the next downloads, so the run costs about as much as the downloads
//! themselves. Batches matter to the broker: messages that arrive together
//! share its disk sync and its confirm, where messages trickling in one by
//! one cost it a sync each (five times its CPU, measured on RabbitMQ 3.10).
//! A profile downloaded but not yet published when the run dies is simply
//! looked at again by the next run. The broker is contacted only when
//! something is to be published.
//!
//! A run can also stop half-way (SIGTERM or SIGINT, a broker that stops
//! confirming within PUBLISH_TIMEOUT, a CACHE_DIR without room for the
//! copies): nothing new starts, the publishes in flight are awaited, and the
//! profiles the broker confirmed are recorded as usual; the others keep
//! their cached state, so a stop costs the next run no duplicate. At most
//! `MAX_BYTES_IN_FLIGHT` bytes of bodies are held for publishing.
//!
//! Profiles that left the index are dropped from the cached index but their
//! cached copies are kept, as the original kept them: a host removed and
//! re-added (or briefly missing from the index) comes back as a new entry,
//! is downloaded, and is published only if its JSON differs from the copy,
//! so it is not rebuilt for nothing. The copies of retired hosts stay in
//! CACHE_DIR (one small file each; bounding that is a later concern). An
//! index with no profile at all is refused while the cache knows some: a
//! broken web server must not make the cache forget them.

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{FutureExt, LocalBoxFuture};
use futures::stream::{FuturesUnordered, StreamExt};
use packuilon_common::config::{Cdb2RabbitConfig, GlobalConfig};
use packuilon_common::EXIT_FAILED;
use tracing::{debug, error, info, warn};

use crate::cache::{CacheDir, CacheError, Expected, Recorder, Transaction};
use crate::concurrency::Limiter;
use crate::fetch::{profile_url, FetchError, Fetcher, PROFILE_LIMIT};
use crate::index::{self, IndexError, INDEX_LIMIT};
use crate::json;
use crate::publish::{Confirmed, PublishError, Publisher};

/// Changed profiles held for publishing or awaiting their confirm (or their
/// cached copy) at once. A broker that takes 50 ms to confirm a batch (its
/// disk sync, on a busy host) held the downloads up at 256; memory is
/// bounded by [`MAX_BYTES_IN_FLIGHT`].
const MAX_IN_FLIGHT: usize = 1024;
/// The bytes of the bodies held for publishing or awaiting their confirm (or
/// their cached copy): no download is taken in while they are over this
/// (profiles of up to 64 MiB each, 256 at once, would be 16 GiB).
const MAX_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;
/// Changed profiles published together.
const PUBLISH_BATCH: usize = 64;
/// The longest a changed profile waits for its batch to fill.
const PUBLISH_WAIT: Duration = Duration::from_millis(50);

/// Which profiles a run publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Matching profiles that are new or whose mtime changed (the cron run).
    Changed,
    /// `--all`: every matching profile, whatever the cache says.
    All,
    /// `--profile NAME...`: these profiles, whatever the cache and PROFILE_MATCH say.
    Named(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    /// Report what would be published; touch neither the broker nor the cache.
    pub dry_run: bool,
    /// How long to wait for another run's lock.
    pub lock_wait: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Changed,
            dry_run: false,
            lock_wait: Duration::from_secs(600),
        }
    }
}

/// A failure that stops the whole run (nothing is written to the cache).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Fetch(FetchError),
    #[error("{url}: {source}")]
    Index { url: String, source: IndexError },
    #[error("{0}; cache left untouched, the next run retries")]
    Broker(PublishError),
    /// The broker refuses the configuration (QUEUE_TYPE): exit 2.
    #[error("{0}; cache left untouched")]
    BrokerConfig(PublishError),
    /// An index without a single profile while the cache knows some: far
    /// more likely a broken web server than a site without hosts, and
    /// trusting it would forget every profile (then republish them all).
    #[error("{url}: the index lists no profile but the cache knows {cached}; refusing it (remove {cache_file} to accept it)")]
    EmptyIndex {
        url: String,
        cached: usize,
        cache_file: String,
    },
    /// A setting that cannot work (e.g. a CA_BUNDLE without certificates).
    #[error("configuration: {0}")]
    Config(FetchError),
}

impl RunError {
    /// 2 for configuration errors (retrying will not help), else 1.
    pub fn exit_status(&self) -> i32 {
        match self {
            RunError::Config(_) | RunError::BrokerConfig(_) => packuilon_common::EXIT_CONFIG,
            _ => EXIT_FAILED,
        }
    }
}

/// Why one profile failed (it is retried by the next run).
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Entry(#[from] index::EntryError),
    #[error("profile {0:?} is not in the index")]
    NotInIndex(String),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{url}: not valid JSON: {message}")]
    NotJson { url: String, message: String },
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("cached copy of {name}: {source}")]
    Cache { name: String, source: CacheError },
}

/// What a run did; [`Summary::exit_status`] is the process's exit status.
#[derive(Debug, Default)]
pub struct Summary {
    /// First run: the index was recorded as the baseline, nothing published.
    pub baseline: bool,
    /// Confirmed by the broker, with their message ids.
    pub published: Vec<Confirmed>,
    /// Downloaded and equal (as JSON) to the cached copy.
    pub unchanged: Vec<String>,
    /// `--dry-run`: what would have been published.
    pub would_publish: Vec<String>,
    /// XML profiles: not published, recorded as processed.
    pub skipped: Vec<String>,
    /// Failed profiles and why; retried next run.
    pub failed: Vec<(String, String)>,
    /// Why the run stopped before it had looked at every candidate (a
    /// signal, a broker that stopped confirming, a full CACHE_DIR); what it
    /// had not finished is left for the next run.
    pub stopped: Option<String>,
    /// Candidates a stopped run left for the next run, unprocessed.
    pub left: Vec<String>,
    /// Profiles the broker's index lists (known once it was read).
    pub index_profiles: Option<usize>,
}

impl Summary {
    pub fn exit_status(&self) -> i32 {
        if self.failed.is_empty() && self.stopped.is_none() {
            0
        } else {
            EXIT_FAILED
        }
    }

    fn fail(&mut self, name: &str, err: &ProfileError) {
        error!("{err}");
        self.failed.push((name.to_string(), err.to_string()));
    }
}

enum Verdict {
    Unchanged,
    Changed(Vec<u8>),
}

/// Runs once. `Err` means the run stopped before publishing anything more
/// and left the cache untouched.
pub async fn run(global: &GlobalConfig, config: &Cdb2RabbitConfig, options: &Options) -> Result<Summary, RunError> {
    info!("Starting");
    let cache = CacheDir::new(&config.cache_dir);
    // A dry run only reads: it takes no lock, so it never creates CACHE_DIR.
    let mut txn = if options.dry_run {
        cache.peek()?
    } else {
        cache.begin(options.lock_wait)?
    };
    // The cached index is read while the HTTP client is set up and the
    // broker's index downloads and is parsed (then it is matched against it).
    let cached = txn.cached_index();
    let fetcher = Fetcher::new(config).map_err(RunError::Config)?;
    let started = std::time::Instant::now();
    let index = Arc::new(fetch_index(&fetcher, config, started).await?);
    let cached = cached.await?;
    let first_run = cached.is_none();
    let index::Matched {
        olds,
        problem_olds,
        removed,
    } = match cached {
        Some(cached) => cached.against(&index)?,
        None => index::match_cached(&index, Vec::new()),
    };
    debug!("cached index matched at {:?}", started.elapsed());
    if index.entries.is_empty() && index.problems.is_empty() && !removed.is_empty() {
        return Err(RunError::EmptyIndex {
            url: config.profile_info_url.to_string(),
            cached: removed.len(),
            cache_file: txn.index_path().display().to_string(),
        });
    }

    let mut summary = Summary {
        index_profiles: Some(index.entries.len() + index.problems.len()),
        ..Summary::default()
    };
    for problem in &index.problems {
        summary.fail(problem.name(), &ProfileError::Entry(problem.clone()));
    }

    if first_run && options.mode == Mode::Changed {
        summary.baseline = true;
        if options.dry_run {
            info!(
                "Cached info file does not exist; a real run would record the index as the baseline \
                 and exit (dry run: nothing written)"
            );
        } else {
            info!("Cached info file does not exist, creating one and exiting");
            txn.finish_baseline(index.entries.iter().map(|e| (e.name.as_str(), e.mtime)))?;
        }
        return Ok(summary);
    }

    let candidates = select_candidates(&index, &olds, config, &options.mode, &mut summary);
    debug!("{} candidate(s) selected at {:?}", candidates.len(), started.elapsed());
    // The index this run records if every candidate succeeds (the usual
    // case), unless that is the cached one or not known ahead.
    let expected = (!matches!(options.mode, Mode::Named(_))
        && (!removed.is_empty() || index.entries.iter().zip(&olds).any(|(e, old)| *old != Some(e.mtime))))
    .then(|| Expected {
        index: index.clone(),
        extra: problem_olds.iter().map(|(n, m)| (n.to_string(), *m)).collect(),
    });
    let recorder = txn.plan(&candidates, expected);
    let mut processed = Pipeline {
        global,
        config,
        txn: &txn,
        fetcher: &fetcher,
        dry_run: options.dry_run,
        force: options.mode != Mode::Changed,
        summary,
        in_flight_bytes: 0,
    };
    if let Err(e) = processed.run(&candidates, &recorder).await {
        txn.abandon().await;
        return Err(e);
    }
    drop(recorder);
    let mut summary = processed.summary;
    let left = unfinished(&mut summary, &candidates);

    if options.dry_run {
        return Ok(summary);
    }
    let mut failed: HashSet<&str> = summary.failed.iter().map(|(n, _)| n.as_str()).collect();
    failed.extend(left);
    // With --profile, other profiles were not looked at: their cached state stays
    // as it was (or becomes the baseline on a first run).
    let only: Option<HashSet<&str>> = match &options.mode {
        Mode::Named(names) if !first_run => Some(names.iter().map(String::as_str).collect()),
        _ => None,
    };
    let record = index_to_record(&index, &olds, problem_olds, removed, &failed, only.as_ref());
    let succeeded: HashSet<&str> = candidates
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !failed.contains(name))
        .collect();
    txn.finish(record, &succeeded).await?;
    report(&mut summary);
    Ok(summary)
}

/// The broker's index, downloaded and parsed.
async fn fetch_index(
    fetcher: &Fetcher,
    config: &Cdb2RabbitConfig,
    started: std::time::Instant,
) -> Result<index::Index, RunError> {
    let raw = fetcher
        .get(&config.profile_info_url, INDEX_LIMIT)
        .await
        .map_err(RunError::Fetch)?;
    debug!("index: {} bytes downloaded in {:?}", raw.len(), started.elapsed());
    let index = index::parse(raw).map_err(|source| RunError::Index {
        url: config.profile_info_url.to_string(),
        source,
    })?;
    debug!(
        "index: {} entries, {} bad, parsed at {:?}",
        index.entries.len(),
        index.problems.len(),
        started.elapsed()
    );
    Ok(index)
}

/// The candidates a stopped run did not finish (listed in the summary):
/// they keep their cached state.
fn unfinished<'a>(summary: &mut Summary, candidates: &[(&'a str, u64)]) -> HashSet<&'a str> {
    if summary.stopped.is_none() {
        return HashSet::new();
    }
    let done: HashSet<&str> = summary
        .published
        .iter()
        .map(|c| c.profile.as_str())
        .chain(summary.unchanged.iter().map(String::as_str))
        .chain(summary.would_publish.iter().map(String::as_str))
        .chain(summary.failed.iter().map(|(n, _)| n.as_str()))
        .collect();
    let left: HashSet<&str> = candidates
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !done.contains(name))
        .collect();
    let mut names: Vec<String> = left.iter().map(|n| n.to_string()).collect();
    names.sort();
    summary.left = names;
    left
}

/// The cached index this run records, `None` when it says exactly what
/// the cached one says (it is then not rewritten): a profile's mtime
/// advances unless it `failed` or, with `--profile`, is not among `only`.
fn index_to_record<'a>(
    index: &'a index::Index,
    olds: &[Option<u64>],
    problem_olds: Vec<(&'a str, u64)>,
    mut removed: Vec<String>,
    failed: &HashSet<&str>,
    only: Option<&HashSet<&str>>,
) -> Option<Vec<(&'a str, u64)>> {
    let mut new_index: Vec<(&str, u64)> = Vec::with_capacity(index.entries.len());
    // Whether the new cached index says exactly what the old one said.
    let mut same_as_cached = removed.is_empty();
    for (entry, old) in index.entries.iter().zip(olds) {
        let name = entry.name.as_str();
        let keep_old = (!failed.is_empty() && failed.contains(name)) || only.is_some_and(|o| !o.contains(name));
        if !keep_old {
            new_index.push((name, entry.mtime));
            same_as_cached &= *old == Some(entry.mtime);
        } else if let Some(old) = old {
            new_index.push((name, *old));
        }
    }
    // Bad entries keep whatever the cache said about them.
    new_index.extend(problem_olds);
    removed.sort();
    for name in removed {
        info!("Profile left the index: {name} (its cached copy is kept)");
    }
    if same_as_cached {
        info!("Cached profile_info is up to date");
        None
    } else {
        info!("Updating cached profile_info");
        Some(new_index)
    }
}

/// The run's last words: why it stopped, what failed.
fn report(summary: &mut Summary) {
    if let Some(why) = &summary.stopped {
        error!(
            "Run stopped ({why}): what the broker confirmed is recorded; {} profile(s) not processed are left for the next run{}",
            summary.left.len(),
            if summary.left.is_empty() {
                String::new()
            } else {
                format!(": {}", summary.left.join(", "))
            }
        );
    }
    if summary.failed.is_empty() && summary.stopped.is_none() {
        info!("Exiting normally");
    } else if !summary.failed.is_empty() {
        summary.failed.sort();
        error!(
            "{} profile(s) failed and will be retried by the next run: {}",
            summary.failed.len(),
            summary
                .failed
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

/// The profiles this run downloads, as (name, mtime) from the index.
fn select_candidates<'a>(
    index: &'a index::Index,
    olds: &[Option<u64>],
    config: &Cdb2RabbitConfig,
    mode: &Mode,
    summary: &mut Summary,
) -> Vec<(&'a str, u64)> {
    let matching = |name: &str| name.contains(config.profile_match.as_str());
    let candidates: Vec<(&str, u64)> = match mode {
        Mode::Changed => index
            .entries
            .iter()
            .zip(olds)
            .filter(|(e, old)| matching(&e.name) && **old != Some(e.mtime))
            .map(|(e, _)| (e.name.as_str(), e.mtime))
            .collect(),
        Mode::All => index
            .entries
            .iter()
            .filter(|e| matching(&e.name))
            .map(|e| (e.name.as_str(), e.mtime))
            .collect(),
        Mode::Named(names) => {
            let mtimes = index.mtimes();
            let problems: HashSet<&str> = index.problems.iter().map(|p| p.name()).collect();
            let mut seen = HashSet::new();
            let mut out = Vec::new();
            for name in names {
                if !seen.insert(name.as_str()) {
                    continue;
                }
                match mtimes.get_key_value(name.as_str()) {
                    Some((n, m)) => out.push((*n, *m)),
                    // Already reported as a bad entry.
                    None if problems.contains(name.as_str()) => {}
                    None => summary.fail(name, &ProfileError::NotInIndex(name.clone())),
                }
            }
            out
        }
    };
    // Packuilon publishes JSON profiles only (as the original sent the
    // profile's JSON). An XML profile would fail as "not valid JSON" on every
    // run forever; it is a configuration matter, not a transient failure, so
    // it is reported and recorded as processed.
    let (xml, candidates): (Vec<_>, Vec<_>) = candidates.into_iter().partition(|(name, _)| is_xml_profile(name));
    for (name, _) in xml {
        warn!(
            "{name} is an XML profile; only JSON profiles are published \
             (check PROFILE_MATCH or the broker's output format); skipped"
        );
        summary.skipped.push(name.to_string());
    }
    candidates
}

/// Whether the broker compiled this profile to XML (`.xml`, `.xml.gz`).
fn is_xml_profile(name: &str) -> bool {
    name.ends_with(".xml") || name.ends_with(".xml.gz")
}

/// Downloads, compares, publishes and records, for one run.
struct Pipeline<'a> {
    global: &'a GlobalConfig,
    config: &'a Cdb2RabbitConfig,
    /// The run's cache transaction: cached copies, and which are not trusted.
    txn: &'a Transaction,
    fetcher: &'a Fetcher,
    dry_run: bool,
    /// `--all` / `--profile`: publish even when the JSON equals the cached copy.
    force: bool,
    summary: Summary,
    /// Bytes of the bodies published whose cached copies are not written yet.
    in_flight_bytes: usize,
}

/// Publishes still waiting for their confirm (or cached copy).
type InFlightSet = FuturesUnordered<LocalBoxFuture<'static, InFlight>>;

impl Pipeline<'_> {
    async fn run(&mut self, candidates: &[(&str, u64)], recorder: &Recorder) -> Result<(), RunError> {
        let (fetcher, txn, base) = (self.fetcher, self.txn, &self.config.profile_dir_url);
        let force = self.force;
        // DOWNLOAD_CONCURRENCY is the ceiling; how many run at once adapts to the server.
        let limiter = Limiter::new(self.config.download_concurrency);
        let limiter = &limiter;
        let mut downloads = futures::stream::iter(candidates.iter().copied())
            .map(|(name, mtime)| async move {
                // As the original, profile by profile (not all before the first download).
                info!("CI profile rebuilt: {name}");
                info!("Downloading profile {name}");
                // Published whatever their cached copy says, if they changed.
                let force = force || txn.untrusted(name);
                (name, mtime, examine(fetcher, limiter, txn, base, name, force).await)
            })
            .buffer_unordered(self.config.download_concurrency);
        // SIGTERM or SIGINT (systemd, an operator's Ctrl-C) stops the run
        // cleanly (see `Summary::stopped`). A second one stops waiting for
        // the confirms still due.
        let mut signals = Signals::register(self.dry_run);
        // Set when the run stops waiting for the confirms still due.
        let (give_up, gave_up) = tokio::sync::watch::channel(false);
        // The broker connection opens when the first changed profile is
        // found, while the downloads go on.
        let mut publisher: Option<Rc<Publisher>> = None;
        let mut connecting: Option<LocalBoxFuture<'_, Result<Publisher, PublishError>>> = None;
        let mut in_flight: InFlightSet = FuturesUnordered::new();
        // Changed profiles waiting for their batch (and their bytes); when
        // the batch is due at the latest.
        let mut batch: Vec<(&str, u64, Vec<u8>)> = Vec::with_capacity(PUBLISH_BATCH);
        let mut batch_bytes = 0usize;
        let mut batch_due = tokio::time::Instant::now();
        let mut overdue = false;
        let mut downloads_done = candidates.is_empty();
        loop {
            let stopping = self.summary.stopped.is_some();
            if stopping {
                // Nothing new starts: what waits for its batch, or for the
                // connection, is left for the next run.
                batch.clear();
                batch_bytes = 0;
                connecting = None;
            }
            if !batch.is_empty() {
                match &publisher {
                    Some(p) if batch.len() >= PUBLISH_BATCH || downloads_done || overdue => {
                        self.publish(p, &mut batch, recorder, &mut in_flight, &gave_up);
                        batch_bytes = 0;
                        overdue = false;
                        continue;
                    }
                    Some(_) => {}
                    None if connecting.is_none() => connecting = Some(Publisher::connect(self.global).boxed_local()),
                    None => {}
                }
            }
            let downloading = !downloads_done && !stopping;
            if in_flight.is_empty() && batch.is_empty() && !downloading {
                break;
            }
            let held = self.in_flight_bytes + batch_bytes;
            tokio::select! {
                // Confirms first: they free memory and let downloads continue.
                biased;
                signal = signals.next() => {
                    if stopping {
                        warn!("Received {signal} again: no longer waiting for the broker's confirms");
                        let _ = give_up.send(true);
                    } else {
                        warn!(
                            "Received {signal}: stopping; no new download or publish starts, the {} publish(es) \
                             in flight are awaited (at most PUBLISH_TIMEOUT) and what the broker confirmed is recorded",
                            in_flight.len()
                        );
                        self.summary.stopped = Some(format!("{signal} received"));
                    }
                }
                Some((name, size, result, written)) = in_flight.next(), if !in_flight.is_empty() => {
                    self.in_flight_bytes -= size;
                    self.confirmed(name, result, written, &give_up);
                }
                connected = async { connecting.as_mut().expect("checked").await }, if connecting.is_some() => {
                    connecting = None;
                    publisher = Some(Rc::new(connected.map_err(|e| if e.is_config() {
                        RunError::BrokerConfig(e)
                    } else {
                        RunError::Broker(e)
                    })?));
                }
                () = tokio::time::sleep_until(batch_due), if !batch.is_empty() && !overdue => overdue = true,
                next = downloads.next(), if downloading
                    && in_flight.len() + batch.len() < MAX_IN_FLIGHT
                    && held < MAX_BYTES_IN_FLIGHT => {
                    let Some((name, mtime, verdict)) = next else {
                        downloads_done = true;
                        // The copies written so far go to disk while the last
                        // batch is published and confirmed.
                        recorder.sync_ahead();
                        continue;
                    };
                    match verdict {
                        Err(e) => self.summary.fail(name, &e),
                        Ok(Verdict::Unchanged) => {
                            info!("Profile has not updated: {name}");
                            self.summary.unchanged.push(name.to_string());
                        }
                        Ok(Verdict::Changed(body)) => {
                            info!("Profile has updated: {name}");
                            if self.dry_run {
                                println!("would publish: {name}");
                                self.summary.would_publish.push(name.to_string());
                                continue;
                            }
                            if batch.is_empty() {
                                batch_due = tokio::time::Instant::now() + PUBLISH_WAIT;
                            }
                            batch_bytes += body.len();
                            batch.push((name, mtime, body));
                        }
                    }
                }
            }
        }
        // Downloads a stopped run had started are abandoned here.
        drop(downloads);
        if let Some(p) = publisher {
            p.close().await;
        }
        Ok(())
    }

    /// Publishes the batch: each profile's publish, confirm and then cached
    /// copy go on in `in_flight`, alongside the downloads (awaiting each
    /// publish here held up the downloads for 1-8 ms a batch). Only what
    /// CACHE_DIR has room for is published: a copy that cannot be written
    /// would make the next run publish the profile again (and the next...).
    fn publish(
        &mut self,
        publisher: &Rc<Publisher>,
        batch: &mut Vec<(&str, u64, Vec<u8>)>,
        recorder: &Recorder,
        in_flight: &mut InFlightSet,
        gave_up: &tokio::sync::watch::Receiver<bool>,
    ) {
        // statvfs(2) once a batch. Unknown (an error): the writes will tell.
        let room = self.txn.room().ok();
        let mut needed = room.map_or(0, |r| r.needed(self.in_flight_bytes) + r.block);
        for (i, (name, _, body)) in batch.iter().enumerate() {
            if let Some(room) = room {
                needed += room.needed(body.len());
                if needed > room.free || room.files.is_some_and(|files| files < 2 * (i as u64 + 1)) {
                    error!(
                        "{}: no room for the cached copy of {name} ({} bytes; {} bytes free): not publishing it \
                         (the broker would get it again on every run); stopping the run",
                        self.txn.root().display(),
                        body.len(),
                        room.free
                    );
                    self.summary.stopped = Some(format!("{} is full", self.txn.root().display()));
                    batch.truncate(i);
                    break;
                }
            }
        }
        if !batch.is_empty() {
            // The broker is there: copies will follow its confirms.
            recorder.expect_copies();
        }
        for (name, mtime, body) in batch.drain(..) {
            info!(profile = name, "Pushing message to queue for build");
            self.in_flight_bytes += body.len();
            let published = publish_then_copy(
                publisher.clone(),
                name.to_string(),
                mtime,
                body,
                recorder.clone(),
                gave_up.clone(),
            );
            in_flight.push(published.boxed_local());
        }
    }

    /// The broker answered, and the cached copy was written if it confirmed.
    fn confirmed(
        &mut self,
        name: String,
        result: Result<Confirmed, PublishError>,
        written: Option<Result<(), CacheError>>,
        give_up: &tokio::sync::watch::Sender<bool>,
    ) {
        match (result, written) {
            (Err(e), _) => {
                // A broker that stopped confirming (stalled, or blocking
                // publishers) will not confirm the others either.
                if matches!(e, PublishError::Timeout { .. }) && !*give_up.borrow() {
                    self.summary.stopped = Some("the broker stopped confirming publishes".to_string());
                    let _ = give_up.send(true);
                }
                self.summary.fail(&name, &e.into())
            }
            (Ok(done), Some(Ok(()))) => {
                info!(
                    "Broker confirmed profile {} (message id {})",
                    done.profile, done.message_id
                );
                self.summary.published.push(done);
            }
            // Published, but the next comparison would use a stale copy: fail it,
            // and it stays listed as unsynced, so the next run publishes it
            // again whatever the copy says (a duplicate, never a loss).
            (Ok(done), Some(Err(source))) => {
                info!(
                    "Broker confirmed profile {} (message id {})",
                    done.profile, done.message_id
                );
                if source.is_no_space() && self.summary.stopped.is_none() {
                    self.summary.stopped = Some(format!("{} is full", self.txn.root().display()));
                }
                self.summary.fail(
                    &name,
                    &ProfileError::Cache {
                        name: name.clone(),
                        source,
                    },
                );
            }
            (Ok(_), None) => unreachable!("a confirmed publish always writes its copy"),
        }
    }
}

/// SIGTERM and SIGINT, caught for the pipeline (before it, and in a dry
/// run, they end the process as usual: nothing was published yet).
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn register(dry_run: bool) -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        if dry_run {
            return Signals { term: None, int: None };
        }
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// The next signal's name (never, without handlers).
    async fn next(&mut self) -> &'static str {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            let received = match s {
                Some(s) => s.recv().await.is_some(),
                None => false,
            };
            if !received {
                std::future::pending::<()>().await;
            }
        }
        tokio::select! {
            () = recv(&mut self.term) => "SIGTERM",
            () = recv(&mut self.int) => "SIGINT",
        }
    }
}

/// What a publish came to: the profile, its size, the broker's answer, and
/// the cached copy's write when the broker confirmed.
type InFlight = (
    String,
    usize,
    Result<Confirmed, PublishError>,
    Option<Result<(), CacheError>>,
);

/// Times a profile is published again after the broker closed the channel
/// under it (another profile too large for it, say).
const CHANNEL_RETRIES: u32 = 3;

/// Publishes a profile and awaits the broker's answer (at most
/// PUBLISH_TIMEOUT, less if the run gives up first); only a confirmed
/// publish replaces the cached copy.
async fn publish_then_copy(
    publisher: Rc<Publisher>,
    name: String,
    mtime: u64,
    body: Vec<u8>,
    recorder: Recorder,
    mut gave_up: tokio::sync::watch::Receiver<bool>,
) -> InFlight {
    let sent = std::time::Instant::now();
    let size = body.len();
    let publish = async {
        let mut retries = 0;
        let message_id = crate::publish::new_message_id();
        loop {
            if let Some(e) = publisher.oversized(&name, size) {
                return Err(e);
            }
            let generation = publisher.generation();
            let result = match publisher.publish_as(message_id.clone(), &name, mtime, &body).await {
                Ok(pending) => pending.confirmed().await,
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.channel_lost() && retries < CHANNEL_RETRIES => {
                    publisher.reopen(generation, &e).await?;
                    if publisher.oversized(&name, size).is_none() {
                        warn!("{e}; publishing {name} again on a new channel");
                    }
                    retries += 1;
                }
                other => return other,
            }
        }
    };
    let given_up = async {
        if gave_up.wait_for(|g| *g).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        r = tokio::time::timeout(publisher.timeout(), publish) => match r {
            Ok(answer) => answer,
            Err(_) => Err(publisher.timed_out(&name)),
        },
        () = given_up => Err(PublishError::GaveUp { profile: name.clone() }),
    };
    drop(publisher);
    debug!("confirm of {name} took {:?}", sent.elapsed());
    let written = match result {
        Ok(_) => Some(recorder.record(name.clone(), body).await),
        Err(_) => None,
    };
    (name, size, result, written)
}

/// Downloads one profile and compares it, as JSON, with its cached copy
/// (unless `force`: a manual rebuild is published whatever the copy says).
async fn examine(
    fetcher: &Fetcher,
    limiter: &Limiter,
    txn: &Transaction,
    base: &url::Url,
    name: &str,
    force: bool,
) -> Result<Verdict, ProfileError> {
    let url = profile_url(base, name)?;
    let body = limiter.download(fetcher, &url, PROFILE_LIMIT).await?;
    let not_json = |e: serde_json::Error| ProfileError::NotJson {
        url: url.to_string(),
        message: e.to_string(),
    };
    // Checking that it is JSON at all needs no tree (and allocates nothing).
    let is_json = |bytes: &[u8]| serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map(drop);
    if force {
        is_json(&body).map_err(not_json)?;
        return Ok(Verdict::Changed(body));
    }
    let old = txn
        .read_profile(name)
        .map_err(|source| ProfileError::Cache {
            name: name.to_string(),
            source,
        })?
        .and_then(|bytes| index::gunzip_if_gzip(bytes, PROFILE_LIMIT).ok());
    // The same bytes are the same JSON; differing ones are compared as JSON.
    let unchanged = match old {
        Some(old) if old == body => {
            is_json(&body).map_err(not_json)?;
            true
        }
        Some(old) => json::same(&body, &old).map_err(not_json)?,
        None => {
            json::digest(&body).map_err(not_json)?;
            false
        }
    };
    Ok(if unchanged {
        Verdict::Unchanged
    } else {
        Verdict::Changed(body)
    })
}
