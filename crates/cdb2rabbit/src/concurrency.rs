//! How many profiles download at once: a limit that adapts to the web server.
//!
//! A fixed number suits one server only: a plain static server with a short
//! listen backlog drops connections (a 1 s SYN retransmit each) well before
//! a server with keep-alive and a long backlog is busy. The limit is AIMD,
//! as TCP's window: it starts at [`START`], grows by one after a limit's
//! worth of responses whose latency stays within [`TOLERANCE`] times the
//! best seen (plus [`SLACK`]), and halves on a sign of overload (a connect
//! error, timeout, reset or 5xx, or a latency jump). It never exceeds
//! DOWNLOAD_CONCURRENCY and never falls below one. One overload lowers it
//! once: the downloads started before the cut do not cut it again.
//!
//! A level that overloaded the server (an error or a stalled download,
//! not a mere latency jump) is remembered: the limit grows back quickly to
//! just below it, and past it only after [`PROBE_AFTER`] answers there.
//! A server whose listen backlog is shorter than the limit drops a SYN
//! every few hundred downloads otherwise (each a stalled download, see
//! below), as the limit halves and climbs back to the same level again and
//! again.
//!
//! A raise is kept only when it pays: one more download at once must make
//! answers come faster (see [`GAIN`]), else the limit goes back and that
//! level is treated as the one above: tried again after [`PROBE_AFTER`]
//! answers. A server at its capacity (Python's `http.server`, one request
//! at a time under its GIL) answers later, not faster, with more at once.
//!
//! A download refused by an overloaded server (a 5xx, a refused or reset
//! connection) is asked for again after the cut, at most [`ATTEMPTS`] times
//! in all, so a busy server costs the run time, not profiles.
//!
//! A download the server has not answered (no status and headers yet)
//! after [`STALL_MIN`] (or [`STALL_FACTOR`] times the usual latency, if
//! longer) cuts the limit and is asked for again, the first answer winning
//! and the other request dropped: a SYN that a full listen backlog dropped
//! is retransmitted by the kernel only after a second, which is most of a
//! 1,000-profile run against such a server (at 250 ms, the floor before,
//! one such download was still most of a 100-profile run). A body that
//! takes its time once the server answered (a large profile, a slow link)
//! is waited for, however long it takes within HTTP_TIMEOUT. The second
//! request takes the stalled one's place (waiting for another place could
//! wait for the stalled one itself, when the limit was cut to one): the
//! requests the server sees never exceed the limit unless a stalled one
//! did reach it after all; a connection whose SYN was dropped never
//! reached the server, and closing it costs the server nothing, so the
//! server does the same download twice only when it did answer, slowly,
//! after all.

use std::cell::{Cell, RefCell};
use std::time::Duration;

use tracing::{debug, info};
use url::Url;

use crate::fetch::{FetchError, Fetcher};

/// The limit a run starts with (or DOWNLOAD_CONCURRENCY, if lower).
pub const START: usize = 2;
/// A response slower than this many times the best seen (smoothed) is a
/// sign of a server that queues requests.
pub const TOLERANCE: f64 = 2.0;
/// Latency allowed on top of [`TOLERANCE`] times the best: jitter on a fast
/// server (a millisecond or two) is not congestion.
pub const SLACK: Duration = Duration::from_millis(20);
/// Weight of a new sample in the smoothed latency.
const WEIGHT: f64 = 0.25;
/// A download the server has not answered after this long (or
/// [`STALL_FACTOR`] times the smoothed latency, if longer) is asked for
/// again (see the module's docs).
pub const STALL_MIN: Duration = Duration::from_millis(50);
/// See [`STALL_MIN`].
pub const STALL_FACTOR: u32 = 8;
/// [`STALL_MIN`] before the server answered anything.
pub const STALL_FIRST: Duration = Duration::from_millis(250);
/// A raise from `L` to `L + 1` downloads at once is kept when answers
/// come at least `1 + GAIN / L` times as fast (by Little's law, the limit
/// over the mean latency): a quarter of what one more download at once
/// gives a server that is not yet busy (`1 + 1 / L`), so that jitter does
/// not stop the climb. A server already at its capacity answers no faster,
/// only later.
pub const GAIN: f64 = 0.25;
/// Answers at the highest level known to be safe before the limit tries
/// the one above it, which overloaded the server before (see the module's
/// docs).
pub const PROBE_AFTER: usize = 256;
/// Tries of a download refused by an overloaded server, the first included.
pub const ATTEMPTS: u32 = 4;
/// Before a refused download is asked for again: this, times the tries so far.
pub const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// What a download came to, as far as the server's load goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered, in this long.
    Answered(Duration),
    /// The server seems overloaded: a connect error, timeout, reset or 5xx.
    Overloaded,
    /// Still unanswered after [`Controller::stall_after`].
    Stalled,
    /// Says nothing about the server's load (a 404, a bad name, a file URL).
    Neutral,
}

/// The AIMD controller, without clocks or tasks (see the module's docs).
#[derive(Debug, Clone)]
pub struct Controller {
    limit: usize,
    max: usize,
    /// Responses since the limit last changed.
    successes: usize,
    best: Option<Duration>,
    /// The highest limit not known to overload the server, or to bring
    /// no faster answers than the one below (`max` until one did): reached
    /// quickly, passed only after [`PROBE_AFTER`] answers.
    ceiling: usize,
    /// Smoothed latency of the responses since the limit was last cut.
    smoothed: Option<f64>,
    /// Latencies (seconds) of the answers since the limit last changed: their sum.
    level_sum: f64,
    /// The level before the last raise and its answers' mean latency.
    below: Option<(usize, f64)>,
    /// Counts the cuts: a download started before the last cut cannot cut again.
    epoch: u64,
}

/// Why the limit changed, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Grew,
    /// Back to the level below: the raise brought no faster answers.
    Held,
    Cut(&'static str),
}

impl Controller {
    /// `max` is DOWNLOAD_CONCURRENCY (at least one).
    pub fn new(max: usize) -> Controller {
        let max = max.max(1);
        Controller {
            limit: START.min(max),
            max,
            successes: 0,
            best: None,
            ceiling: max,
            level_sum: 0.0,
            below: None,
            smoothed: None,
            epoch: 0,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// How long a download may go unanswered before it is asked for again
    /// (see [`STALL_MIN`]).
    pub fn stall_after(&self) -> Duration {
        let usual = match (self.smoothed, self.best) {
            (Some(s), _) => Duration::from_secs_f64(s),
            (None, Some(best)) => best,
            // Nothing known of this server yet: a distant one may well
            // take longer than STALL_MIN to answer.
            (None, None) => return STALL_FIRST,
        };
        STALL_MIN.max(usual * STALL_FACTOR)
    }

    /// The epoch a download starting now belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Takes in a download's outcome (started in `epoch`); what changed.
    pub fn record(&mut self, epoch: u64, outcome: Outcome) -> Option<Change> {
        match outcome {
            Outcome::Neutral => None,
            Outcome::Overloaded => self.cut(epoch, "connect error, timeout, reset or 5xx", true),
            Outcome::Stalled => self.cut(epoch, "a download went unanswered", true),
            Outcome::Answered(latency) => {
                let best = *self.best.get_or_insert(latency);
                let best = best.min(latency);
                self.best = Some(best);
                // Started before the last cut: it says how slow things were, not are.
                if epoch != self.epoch {
                    return None;
                }
                let secs = latency.as_secs_f64();
                let smoothed = match self.smoothed {
                    Some(s) => s + WEIGHT * (secs - s),
                    None => secs,
                };
                self.smoothed = Some(smoothed);
                if smoothed > TOLERANCE * best.as_secs_f64() + SLACK.as_secs_f64() {
                    return self.cut(epoch, "responses slowed down", false);
                }
                self.successes += 1;
                self.level_sum += secs;
                let needed = if self.limit >= self.ceiling {
                    PROBE_AFTER
                } else {
                    self.limit
                };
                if self.successes < needed {
                    return None;
                }
                let mean = self.level_sum / self.successes as f64;
                if let Some((below, below_mean)) = self.below.take() {
                    // Answers per second, by Little's law: limit / latency.
                    let gain = (self.limit as f64 / mean) / (below as f64 / below_mean);
                    if gain < 1.0 + GAIN / below as f64 {
                        self.limit = below;
                        self.ceiling = below;
                        self.successes = 0;
                        self.level_sum = 0.0;
                        return Some(Change::Held);
                    }
                }
                if self.limit < self.max {
                    self.below = Some((self.limit, mean));
                    self.limit += 1;
                    self.ceiling = self.ceiling.max(self.limit);
                    self.successes = 0;
                    self.level_sum = 0.0;
                    return Some(Change::Grew);
                }
                None
            }
        }
    }

    /// Halves the limit; `overloaded`: the server refused or dropped
    /// work at this level, which is then not reached again soon.
    fn cut(&mut self, epoch: u64, why: &'static str, overloaded: bool) -> Option<Change> {
        if epoch != self.epoch {
            return None;
        }
        if overloaded {
            self.ceiling = self.limit.saturating_sub(1).max(1);
        }
        self.epoch += 1;
        self.successes = 0;
        self.level_sum = 0.0;
        self.below = None;
        self.smoothed = None;
        if self.limit == 1 {
            return None;
        }
        self.limit = (self.limit / 2).max(1);
        Some(Change::Cut(why))
    }
}

/// The controller shared by a run's downloads (on one thread): a download
/// waits for a [`Permit`] and reports its outcome through it.
#[derive(Debug)]
pub struct Limiter {
    controller: RefCell<Controller>,
    active: Cell<usize>,
    freed: tokio::sync::Notify,
}

impl Limiter {
    pub fn new(max: usize) -> Limiter {
        Limiter {
            controller: RefCell::new(Controller::new(max)),
            active: Cell::new(0),
            freed: tokio::sync::Notify::new(),
        }
    }

    pub fn limit(&self) -> usize {
        self.controller.borrow().limit()
    }

    pub fn stall_after(&self) -> Duration {
        self.controller.borrow().stall_after()
    }

    /// Takes in the outcome of a download started in `epoch`, and logs a change.
    fn record(&self, epoch: u64, outcome: Outcome) {
        let change = self.controller.borrow_mut().record(epoch, outcome);
        let limit = self.limit();
        match change {
            Some(Change::Grew) => debug!("download concurrency raised to {limit}"),
            Some(Change::Held) => debug!("download concurrency back to {limit}: one more brought no faster answers"),
            Some(Change::Cut(why)) => info!("Download concurrency lowered to {limit} ({why})"),
            None => {}
        }
    }

    /// Waits until fewer than the limit downloads are under way.
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            // Registered before the check, so a release in between is not missed.
            let freed = self.freed.notified();
            if self.active.get() < self.limit() {
                self.active.set(self.active.get() + 1);
                return Permit {
                    limiter: self,
                    epoch: self.controller.borrow().epoch(),
                    started: std::time::Instant::now(),
                };
            }
            freed.await;
        }
    }

    /// GETs `url` (at most `limit` bytes) within the limit, telling the
    /// controller how it went; asked for again (see [`ATTEMPTS`]) if the
    /// server refused it as overloaded. `file://` URLs say nothing of a load.
    pub async fn download(&self, fetcher: &Fetcher, url: &Url, limit: u64) -> Result<Vec<u8>, FetchError> {
        let mut attempt = 1;
        loop {
            let permit = self.acquire().await;
            let (fetched, stalled) = self.ask(fetcher, url, limit, &permit).await;
            let took = permit.elapsed();
            permit.done(match &fetched {
                // A stall was taken in when it happened.
                _ if url.scheme() == "file" || stalled => Outcome::Neutral,
                Ok(_) => Outcome::Answered(took),
                Err(e) if e.is_overload() => Outcome::Overloaded,
                Err(_) => Outcome::Neutral,
            });
            match fetched {
                // A timeout already took HTTP_TIMEOUT: not waited for again.
                Err(e) if e.is_overload() && !matches!(e, FetchError::Timeout { .. }) && attempt < ATTEMPTS => {
                    debug!("{e}; asking again ({attempt} of {ATTEMPTS} tries so far)");
                    tokio::time::sleep(RETRY_PAUSE * attempt).await;
                    attempt += 1;
                }
                fetched => return fetched,
            }
        }
    }

    /// One try of a download: the request, and if the server has not
    /// answered it (status and headers) within [`Limiter::stall_after`],
    /// the same request again, in its place; the first answer wins and the
    /// other request is dropped. Whether it stalled.
    async fn ask(
        &self,
        fetcher: &Fetcher,
        url: &Url,
        limit: u64,
        permit: &Permit<'_>,
    ) -> (Result<Vec<u8>, FetchError>, bool) {
        let answered = Cell::new(false);
        let first = fetcher.get_noting(url, limit, &answered);
        tokio::pin!(first);
        if url.scheme() == "file" {
            return (first.await, false);
        }
        tokio::select! {
            fetched = &mut first => return (fetched, false),
            () = tokio::time::sleep(self.stall_after()) => {}
        }
        if answered.get() {
            // The server answered; its body takes its time (a large
            // profile, a slow link): not a stall.
            return (first.await, false);
        }
        self.record(permit.epoch, Outcome::Stalled);
        debug!("{url}: no answer after {:?}, asking again", permit.elapsed());
        let again = fetcher.get(url, limit);
        tokio::pin!(again);
        tokio::select! {
            fetched = &mut first => (fetched, true),
            fetched = &mut again => (fetched, true),
        }
    }
}

/// One download under way; dropped without [`Permit::done`] (an abandoned
/// download), it frees its place and says nothing.
#[derive(Debug)]
pub struct Permit<'a> {
    limiter: &'a Limiter,
    epoch: u64,
    started: std::time::Instant,
}

impl Permit<'_> {
    /// Since the download started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn done(self, outcome: Outcome) {
        self.limiter.record(self.epoch, outcome);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.limiter.active.set(self.limiter.active.get() - 1);
        self.limiter.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Outcome {
        Outcome::Answered(Duration::from_millis(n))
    }

    /// Records `outcome` of a download started at the current epoch and
    /// checks that it cut the limit to `to`, saying `why`.
    fn assert_cuts(c: &mut Controller, outcome: Outcome, why: &'static str, to: usize) {
        let e = c.epoch();
        assert_eq!(c.record(e, outcome), Some(Change::Cut(why)));
        assert_eq!(c.limit(), to);
    }

    /// Feeds `n` answers of `latency` ms, each started at the current epoch.
    fn answer(c: &mut Controller, n: usize, latency: u64) {
        for _ in 0..n {
            let e = c.epoch();
            c.record(e, ms(latency));
        }
    }

    #[test]
    fn starts_low_and_grows_to_the_ceiling_while_latency_holds() {
        let mut c = Controller::new(8);
        assert_eq!(c.limit(), 2);
        answer(&mut c, 2, 5);
        assert_eq!(c.limit(), 3);
        answer(&mut c, 3, 6);
        assert_eq!(c.limit(), 4);
        answer(&mut c, 1000, 5);
        assert_eq!(c.limit(), 8, "never above DOWNLOAD_CONCURRENCY");
        assert_eq!(Controller::new(1).limit(), 1);
        assert_eq!(Controller::new(0).limit(), 1);
    }

    #[test]
    fn overload_halves_once_per_event_and_never_below_one() {
        let mut c = Controller::new(16);
        answer(&mut c, 1000, 5);
        assert_eq!(c.limit(), 16);
        let before = c.epoch();
        assert_cuts(&mut c, Outcome::Overloaded, "connect error, timeout, reset or 5xx", 8);
        // The other downloads started before the cut: no further cut.
        for _ in 0..7 {
            assert_eq!(c.record(before, Outcome::Overloaded), None);
            assert_eq!(c.record(before, ms(5)), None);
        }
        assert_eq!(c.limit(), 8);
        for _ in 0..10 {
            let e = c.epoch();
            c.record(e, Outcome::Overloaded);
        }
        assert_eq!(c.limit(), 1);
        // Neutral outcomes change nothing.
        let e = c.epoch();
        assert_eq!(c.record(e, Outcome::Neutral), None);
        assert_eq!(c.limit(), 1);
        // And it grows again, past the level that overloaded (2) only
        // after PROBE_AFTER answers.
        answer(&mut c, PROBE_AFTER - 1, 5);
        assert_eq!(c.limit(), 1);
        answer(&mut c, 1, 5);
        assert_eq!(c.limit(), 2);
    }

    /// Feeds `n` answers from a server at its capacity, which serves one
    /// request at a time in `service` µs: the latency grows with the limit.
    fn saturated(c: &mut Controller, n: usize, service: u64) {
        for _ in 0..n {
            let e = c.epoch();
            let latency = Duration::from_micros(service * c.limit() as u64 + 30);
            c.record(e, Outcome::Answered(latency));
        }
    }

    #[test]
    fn a_raise_that_brings_no_faster_answers_is_undone() {
        // python3 -m http.server: one request at a time, about 0.6 ms each,
        // well within SLACK of the best latency however many wait.
        let mut c = Controller::new(8);
        saturated(&mut c, 2, 600);
        assert_eq!(c.limit(), 3);
        assert_eq!(
            {
                let e = c.epoch();
                let mut change = None;
                for _ in 0..3 {
                    change = c.record(e, Outcome::Answered(Duration::from_micros(600 * 3 + 30)));
                }
                change
            },
            Some(Change::Held)
        );
        assert_eq!(c.limit(), 2);
        // It stays there, trying one more only after PROBE_AFTER answers.
        saturated(&mut c, PROBE_AFTER - 1, 600);
        assert_eq!(c.limit(), 2);
        saturated(&mut c, 1, 600);
        assert_eq!(c.limit(), 3);
        saturated(&mut c, 3 * PROBE_AFTER, 600);
        assert!(c.limit() <= 3, "{}", c.limit());

        // A distant server answers as fast with more under way: up to the ceiling.
        let mut far = Controller::new(8);
        answer(&mut far, 100, 20);
        assert_eq!(far.limit(), 8);
        // One that is busy from 5 on: back to 4 when 5 brings nothing.
        let mut busy = Controller::new(8);
        for _ in 0..200 {
            let e = busy.epoch();
            let latency = Duration::from_millis(20).max(Duration::from_micros(5000 * busy.limit() as u64));
            busy.record(e, Outcome::Answered(latency));
        }
        assert_eq!(busy.limit(), 4);
    }

    #[test]
    fn a_level_that_overloaded_is_passed_again_only_after_probe_after_answers() {
        let mut c = Controller::new(8);
        answer(&mut c, 100, 1);
        assert_eq!(c.limit(), 8);
        // A SYN dropped by a full listen backlog at 8.
        assert_cuts(&mut c, Outcome::Stalled, "a download went unanswered", 4);
        // Back to just below it quickly...
        answer(&mut c, 4 + 5 + 6, 1);
        assert_eq!(c.limit(), 7);
        // ... and to 8 only after PROBE_AFTER answers at 7.
        answer(&mut c, PROBE_AFTER - 1, 1);
        assert_eq!(c.limit(), 7);
        answer(&mut c, 1, 1);
        assert_eq!(c.limit(), 8);
        // Overloaded again at 8, then at 7: 6 is the level held now.
        assert_cuts(&mut c, Outcome::Overloaded, "connect error, timeout, reset or 5xx", 4);
        answer(&mut c, 4 + 5 + 6, 1);
        assert_eq!(c.limit(), 7);
        assert_cuts(&mut c, Outcome::Overloaded, "connect error, timeout, reset or 5xx", 3);
        answer(&mut c, 3 + 4 + 5, 1);
        assert_eq!(c.limit(), 6);
        answer(&mut c, PROBE_AFTER - 1, 1);
        assert_eq!(c.limit(), 6);
        // A latency jump halves the limit but leaves the known level alone.
        let mut slow = Controller::new(8);
        answer(&mut slow, 100, 2);
        assert_cuts(&mut slow, ms(1000), "responses slowed down", 4);
        answer(&mut slow, 4 + 5 + 6 + 7, 2);
        assert_eq!(slow.limit(), 8);
    }

    #[test]
    fn a_latency_jump_cuts_but_jitter_does_not() {
        let mut c = Controller::new(8);
        answer(&mut c, 200, 2);
        assert_eq!(c.limit(), 8);
        // A few ms of jitter on a fast server: within SLACK.
        answer(&mut c, 50, 12);
        assert_eq!(c.limit(), 8);
        // SYNs dropped by a full backlog: a second or more each.
        let e = c.epoch();
        assert_eq!(c.record(e, ms(1000)), Some(Change::Cut("responses slowed down")));
        assert_eq!(c.limit(), 4);
        // Slow responses already under way do not cut again.
        assert_eq!(c.record(e, ms(1000)), None);
        assert_eq!(c.limit(), 4);
        // Nor do they weigh on the latency the next answers are held to.
        answer(&mut c, 4, 2);
        assert_eq!(c.limit(), 5);
        // A slow server throughout (best is slow too) is not congested.
        let mut slow = Controller::new(8);
        answer(&mut slow, 100, 300);
        assert_eq!(slow.limit(), 8);
    }

    #[test]
    fn a_download_is_asked_for_again_after_eight_times_the_usual_latency() {
        let mut c = Controller::new(8);
        // Before any answer, the server may be a distant one.
        assert_eq!(c.stall_after(), STALL_FIRST);
        answer(&mut c, 20, 2);
        assert_eq!(c.stall_after(), STALL_MIN);
        let mut slow = Controller::new(8);
        answer(&mut slow, 20, 100);
        assert_eq!(slow.stall_after(), Duration::from_millis(800));
        // 20 answers took it from 2 to 7; a stall halves it.
        assert_eq!(slow.limit(), 7);
        assert_cuts(&mut slow, Outcome::Stalled, "a download went unanswered", 3);
    }

    #[test]
    fn the_limiter_holds_downloads_to_the_limit() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let limiter = Limiter::new(8);
            let a = limiter.acquire().await;
            let b = limiter.acquire().await;
            // A third waits for a place.
            let third = limiter.acquire();
            tokio::pin!(third);
            assert!(futures::poll!(third.as_mut()).is_pending());
            drop(a);
            let c = third.await;
            b.done(ms(1));
            c.done(ms(1));
            assert_eq!(limiter.limit(), 3);
            let held: Vec<_> = futures::future::join_all((0..3).map(|_| limiter.acquire())).await;
            assert_eq!(held.len(), 3);
        });
    }
}
