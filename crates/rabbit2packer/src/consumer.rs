//! Taking requests off the queue: `basic_consume` (the broker pushes; the
//! original polled every 2 s per thread), manual acks, a bounded prefetch.
//!
//! Each delivery is journaled first and acked after the commit (to the
//! journal file that is on disk, see [`crate::journal::Journal::check_on_disk`]),
//! so a message is never lost and RabbitMQ's consumer timeout (30 min) never
//! meets a build. A message that cannot name an image is saved whole to
//! `STATE_DIR/rejected/`, published with its reason to the durable queue
//! `<QUEUE>.rejected` (seen site-wide, replayable), and acked; nothing else
//! stops. When the broker goes away the consumer reconnects with backoff
//! (RABBIT_RETRY_DELAY, doubling, at most 30 s) while builds go on, starting
//! with the next node of RABBIT_HOST (round robin) when it lists several.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation};
use packuilon_common::config::GlobalConfig;
use packuilon_common::profile::{ImageNames, ProfileError};
use packuilon_common::rabbit;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::journal::NewJob;
use crate::scheduler::{Accepted, Jobs, NotJournaled};

/// Unacked deliveries the broker may push ahead of the journal.
pub(crate) const PREFETCH: u16 = 64;
/// The longest pause between reconnection attempts.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// RABBIT_RETRY_DELAY, doubling after each failed attempt, at most MAX_BACKOFF.
fn reconnect_pause(first: Duration, attempt: u32) -> Duration {
    first
        .checked_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .unwrap_or(MAX_BACKOFF)
        .min(MAX_BACKOFF)
}

/// Suffix of the queue rejected messages are published to: `<QUEUE>.rejected`.
pub const REJECTED_SUFFIX: &str = ".rejected";
/// The header of a rejected message that says why it was rejected.
pub const REASON_HEADER: &str = "x-packuilon-reason";
/// The header of a rejected message naming the host that rejected it.
pub const REJECTED_BY_HEADER: &str = "x-packuilon-rejected-by";
/// The longest reason put in [`REASON_HEADER`], in characters.
pub const REASON_MAX_CHARS: usize = 1000;

/// Why consuming stopped: the broker could not be reached at all, or a
/// connection that worked went wrong, or the daemon must stop.
enum Lost {
    Unreachable(lapin::Error),
    Broken(lapin::Error),
    /// The site journal (STATE_DB) is unreachable: consuming pauses, the
    /// unacked deliveries go back to the queue.
    Database,
    Fatal(Fatal),
}

/// Why the daemon must stop.
#[derive(Debug)]
pub(crate) enum Fatal {
    /// The journal is no longer the one on disk.
    Journal(JournalLost),
    /// A queue exists with another type than QUEUE_TYPE (exit 2).
    QueueType(rabbit::RabbitError),
}

/// The journal file was deleted or replaced under the daemon: the message
/// went back to the queue, no more are acked, and the daemon must exit.
#[derive(Debug)]
pub(crate) struct JournalLost(pub crate::journal::JournalError);

/// A declare that failed: a QUEUE_TYPE mismatch stops the daemon, anything
/// else is a broken connection.
fn declare_failed(e: rabbit::RabbitError) -> Lost {
    match e {
        rabbit::RabbitError::Amqp { source, .. } => Lost::Broken(source),
        e if e.is_config() => Lost::Fatal(Fatal::QueueType(e)),
        other => Lost::Broken(lapin::Error::from(std::io::Error::other(other.to_string()))),
    }
}

/// Why a delivery is not acked: it stays the broker's (requeued).
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotAcked {
    /// The journal could not commit it; fatal when the journal file is gone.
    #[error("{0}")]
    Journal(#[from] crate::journal::JournalError),
    /// The site journal (STATE_DB) could not commit it.
    #[error("{0}")]
    Site(#[from] crate::site_journal::SiteJournalError),
    /// A malformed message could not be saved whole to `STATE_DIR/rejected/`.
    #[error("{0}")]
    NotSaved(String),
}

impl From<NotJournaled> for NotAcked {
    fn from(e: NotJournaled) -> NotAcked {
        match e {
            NotJournaled::Local(e) => NotAcked::Journal(e),
            NotJournaled::Site(e) => NotAcked::Site(e),
        }
    }
}

impl From<lapin::Error> for Lost {
    fn from(e: lapin::Error) -> Lost {
        Lost::Broken(e)
    }
}

/// Consumes until `stop` fires, reconnecting with backoff. The daemon runs
/// journaled jobs meanwhile: it does not wait for this to connect. An error
/// means the daemon must exit (the journal it writes is not the one on disk).
pub(crate) async fn run(
    global: &GlobalConfig,
    state_dir: &Path,
    jobs: Jobs,
    stop: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<(), Fatal> {
    let endpoint = rabbit::endpoint(&global.rabbit);
    let mut attempt = 0u32;
    // The node of RABBIT_HOST tried first: after a loss, the one after the lost one.
    let mut first = 0usize;
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        let consumed = consume(global, state_dir, &jobs, &stop, &mut attempt, &mut first, &metrics).await;
        metrics.set_broker_connected(false);
        match consumed {
            Ok(()) => return Ok(()),
            Err(Lost::Fatal(e)) => return Err(e),
            Err(lost) => {
                let pause = reconnect_pause(global.rabbit.retry_delay, attempt);
                match &lost {
                    Lost::Unreachable(e) => tracing::warn!(
                        "RabbitMQ at {endpoint} unreachable: {e}; no new requests until it is back \
                         (journaled jobs still build); reconnecting to channel in {pause:?}"
                    ),
                    // The node lost is the one before `first` (see `consume`).
                    Lost::Broken(e) if global.rabbit.nodes.len() > 1 => {
                        let count = global.rabbit.nodes.len();
                        tracing::warn!(
                            "RabbitMQ at {}: {e}; reconnecting to channel in {pause:?}, trying {} first",
                            rabbit::node_endpoint(&global.rabbit, (first + count - 1) % count),
                            rabbit::node_endpoint(&global.rabbit, first)
                        )
                    }
                    Lost::Broken(e) => {
                        tracing::warn!("RabbitMQ at {endpoint}: {e}; reconnecting to channel in {pause:?}")
                    }
                    // Said by the site journal (see `Site::reached`).
                    Lost::Database => {}
                    Lost::Fatal(_) => unreachable!("returned above"),
                }
                let database_lost = matches!(lost, Lost::Database);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.cancelled() => return Ok(()),
                }
                // No deliveries until the site journal can take them.
                if let (true, Jobs::Site(site)) = (database_lost, &jobs) {
                    tokio::select! {
                        _ = site.wait_reachable() => {}
                        _ = stop.cancelled() => return Ok(()),
                    }
                }
            }
        }
    }
}

async fn consume(
    global: &GlobalConfig,
    state_dir: &Path,
    jobs: &Jobs,
    stop: &CancellationToken,
    attempt: &mut u32,
    first: &mut usize,
    metrics: &crate::metrics::Metrics,
) -> Result<(), Lost> {
    let rabbit::Connected { connection: conn, node } = tokio::select! {
        c = rabbit::connect_once(&global.rabbit, *first, "rabbit2packer") => c.map_err(|e| Lost::Unreachable(match e {
            rabbit::RabbitError::Amqp { source, .. } => source,
            other => lapin::Error::from(std::io::Error::other(other.to_string())),
        }))?,
        _ = stop.cancelled() => return Ok(()),
    };
    // Should this connection be lost, the next node is tried first.
    *first = node + 1;
    let endpoint = rabbit::node_endpoint(&global.rabbit, node);
    let channel = conn.create_channel().await?;
    channel.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    rabbit::declare_queue(&channel, &global.queue, global.queue_type, &endpoint)
        .await
        .map_err(declare_failed)?;
    // Rejected messages go out on a channel of their own, in confirm mode.
    let rejects = Rejects::open(&conn, global, &endpoint).await?;
    let mut consumer = channel
        .basic_consume(
            global.queue.as_str().into(),
            "rabbit2packer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!("Consuming from queue {}", global.queue);
    metrics.set_broker_connected(true);
    *attempt = 0;
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => d,
            _ = stop.cancelled() => {
                // Unacked deliveries go back to the queue; journaled ones are acked already.
                let _ = channel.close(200, "rabbit2packer stopping".into()).await;
                let _ = conn.close(200, "rabbit2packer stopping".into()).await;
                return Ok(());
            }
        };
        let mut delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e.into()),
            None => {
                return Err(Lost::Broken(lapin::Error::from(std::io::Error::other(
                    "consumer cancelled by the broker",
                ))))
            }
        };
        // The body moves into the job: a large message is not copied.
        let body = std::mem::take(&mut delivery.data);
        match handle(state_dir, jobs, body, &delivery.properties, delivery.redelivered).await {
            Ok(Handled::Rejected { reason, body }) => {
                metrics.message_rejected();
                rejects.publish(&body, &delivery.properties, &reason).await;
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Ok(Handled::Journaled) => {
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Err(NotAcked::Journal(e)) if e.is_fatal() => {
                // Acking now would lose the message at the next start: it goes
                // back to the queue, with every other unacked one, and the
                // daemon exits for systemd to restart it on the journal on disk.
                give_back_all(&delivery, &channel, &conn, "rabbit2packer: job journal lost").await;
                return Err(Lost::Fatal(Fatal::Journal(JournalLost(e))));
            }
            Err(NotAcked::Site(e)) if e.is_transient() => {
                // Consuming pauses: this delivery and every unacked one go
                // back to the queue (redelivered, a duplicate is recognised),
                // and `run` connects again after a pause.
                give_back_all(&delivery, &channel, &conn, "rabbit2packer: site journal unreachable").await;
                tracing::debug!("{e}: message returned to the queue");
                return Err(Lost::Database);
            }
            Err(e) => {
                // Not journaled, or not saved: the message stays the broker's.
                tracing::error!("{e}; message returned to the queue");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => {}
                }
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await?;
            }
        }
    }
}

/// Returns `delivery` and, by closing the channel and connection, every
/// other unacked one to the queue (nothing is acked unjournaled).
async fn give_back_all(
    delivery: &lapin::message::Delivery,
    channel: &lapin::Channel,
    conn: &lapin::Connection,
    why: &str,
) {
    let _ = delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await;
    let _ = channel.close(200, why.into()).await;
    let _ = conn.close(200, why.into()).await;
}

/// `<QUEUE>.rejected`: where rejected messages are published, with their
/// reason, so that a site sees them all and can replay them.
struct Rejects {
    channel: Channel,
    queue: String,
    /// PUBLISH_TIMEOUT: the longest a publish waits for its confirm.
    timeout: Duration,
    host: String,
}

impl Rejects {
    /// A channel in confirm mode, with `<QUEUE>.rejected` declared as QUEUE is.
    async fn open(conn: &lapin::Connection, global: &GlobalConfig, endpoint: &str) -> Result<Rejects, Lost> {
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let queue = format!("{}{REJECTED_SUFFIX}", global.queue);
        rabbit::declare_queue(&channel, &queue, global.queue_type, endpoint)
            .await
            .map_err(declare_failed)?;
        Ok(Rejects {
            channel,
            queue,
            timeout: global.publish_timeout,
            host: packuilon_common::config::host_name(),
        })
    }

    /// Publishes a rejected body (persistent, with the original's
    /// properties and the reason in a header) and waits for the broker's
    /// confirm. A failure is logged, not returned: the copy in
    /// `STATE_DIR/rejected/` is on disk already, so the message is acked
    /// all the same (requeueing it would reject it again, and write another
    /// local copy, until the rejected queue takes it).
    async fn publish(&self, body: &[u8], original: &BasicProperties, reason: &str) {
        let mut headers = original.headers().clone().unwrap_or_default();
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(bounded_reason(reason))),
        );
        headers.insert(
            REJECTED_BY_HEADER.into(),
            AMQPValue::LongString(LongString::from(self.host.as_str())),
        );
        let properties = original.clone().with_delivery_mode(2).with_headers(headers);
        let publish = async {
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    properties,
                )
                .await
                .map_err(|e| e.to_string())?;
            match confirm.await.map_err(|e| e.to_string())? {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)) => {
                    Err(format!("returned: {} {}", r.reply_code, r.reply_text))
                }
                Confirmation::Nack(None) => Err("refused (nack)".to_string()),
                Confirmation::NotRequested => Err("not confirmed".to_string()),
            }
        };
        let id = original
            .message_id()
            .as_ref()
            .map_or_else(|| "(none)".to_string(), |m| m.to_string());
        match tokio::time::timeout(self.timeout, publish).await {
            Ok(Ok(())) => tracing::info!("Message {id} published to queue {} with its reason", self.queue),
            Ok(Err(e)) => tracing::error!(
                "Message {id} could not be published to queue {}: {e}; only its copy in STATE_DIR/rejected is kept",
                self.queue
            ),
            Err(_) => tracing::error!(
                "Message {id} was not confirmed by queue {} within {:?} (PUBLISH_TIMEOUT); \
                 only its copy in STATE_DIR/rejected is sure to be kept",
                self.queue,
                self.timeout
            ),
        }
    }
}

/// The reason, cut to [`REASON_MAX_CHARS`] characters (a header is bounded).
fn bounded_reason(reason: &str) -> String {
    match reason.char_indices().nth(REASON_MAX_CHARS) {
        Some((end, _)) => format!("{}...", &reason[..end]),
        None => reason.to_string(),
    }
}

/// What became of a delivery that may be acked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Handled {
    /// A job (new, or the one it duplicates) is in the journal.
    Journaled,
    /// It named no image and was saved to `STATE_DIR/rejected/`.
    Rejected {
        /// Why, naming the message and the field.
        reason: String,
        /// The body, handed back for `<QUEUE>.rejected`.
        body: Vec<u8>,
    },
}

/// Journals (or rejects) one delivery. Ok means: ack it.
pub(crate) async fn handle(
    state_dir: &Path,
    jobs: &Jobs,
    body: Vec<u8>,
    props: &lapin::BasicProperties,
    redelivered: bool,
) -> Result<Handled, NotAcked> {
    let message_id = props.message_id().as_ref().map(|m| m.to_string());
    let sha = hex::encode(Sha256::digest(&body));
    let shown_id = message_id.clone().unwrap_or_else(|| format!("(none; sha256 {sha})"));
    let parsed = Fields::parse(&body)
        .map_err(|e| ProfileError::NotJson(e.to_string()))
        .and_then(|f| Ok((f.names()?, f)));
    let (names, fields) = match parsed {
        Ok(n) => n,
        Err(e) => {
            // README promises the body is kept whole: until it is, the broker keeps it.
            let path = save_rejected(state_dir, message_id.as_deref(), &sha, &body).map_err(|err| {
                NotAcked::NotSaved(format!(
                    "could not decode profile, malformed json? Continuing: message {shown_id}: {e}; \
                     it could not be saved to {}/rejected: {err}",
                    state_dir.display()
                ))
            })?;
            tracing::error!(
                "could not decode profile, malformed json? Continuing: message {shown_id}: {e}; saved whole to {}",
                path.display()
            );
            return Ok(Handled::Rejected {
                reason: format!("message {shown_id}: {e}"),
                body,
            });
        }
    };
    let profile = header_profile(props).or_else(|| fields.host_name());
    let job = NewJob {
        message_id,
        body_sha256: sha,
        profile,
        image_key: names.image_key(),
        body,
    };
    let key = job.image_key.clone();
    match jobs.accept(job, redelivered).await? {
        Accepted::New { id, superseded } => match superseded {
            Some(old) => tracing::info!("Job {id} for {key} queued (message {shown_id}); supersedes waiting job {old}"),
            None => tracing::info!("Job {id} for {key} queued (message {shown_id})"),
        },
        Accepted::Duplicate(id) => {
            tracing::info!("Message {shown_id} is already job {id}: acked, not built again")
        }
    }
    Ok(Handled::Journaled)
}

/// The `profile` header, when the publisher set one.
fn header_profile(props: &lapin::BasicProperties) -> Option<String> {
    for (k, v) in props.headers().as_ref()?.inner() {
        if k.as_str() == "profile" {
            match v {
                AMQPValue::LongString(s) => return Some(s.to_string()),
                AMQPValue::ShortString(s) => return Some(s.to_string()),
                _ => {}
            }
        }
    }
    None
}

/// The parts of a profile that rabbit2packer reads, and nothing else: a
/// profile can be tens of megabytes, and a whole `serde_json::Value` of it
/// costs several times that (the rest is skipped without being kept).
/// Where the whole profile's lookups find something else than an object
/// on the way (`"system": "x"`), the field is simply absent, as there.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct Fields {
    #[serde(default)]
    system: Lenient<SystemFields>,
    #[serde(default)]
    metadata: Lenient<MetadataFields>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct SystemFields {
    #[serde(default)]
    personality: Option<Value>,
    #[serde(default)]
    archetype: Option<Value>,
    #[serde(default)]
    os: Option<Value>,
    #[serde(default)]
    network: Option<Value>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct MetadataFields {
    #[serde(default)]
    template: Lenient<TemplateFields>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct TemplateFields {
    #[serde(default)]
    branch: Option<Value>,
}

/// An object read as `T`; anything else (a string, a list, null) read as
/// nothing, and skipped without being kept.
#[derive(Debug)]
struct Lenient<T>(Option<T>);

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Lenient(None)
    }
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Lenient<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(|t| Lenient(Some(t)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Lenient(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

impl Fields {
    /// Reads the fields from a profile as published (JSON).
    pub(crate) fn parse(body: &[u8]) -> Result<Fields, serde_json::Error> {
        let fields: Lenient<Fields> = serde_json::from_slice(body)?;
        Ok(fields.0.unwrap_or_default())
    }

    /// The image names, as [`ImageNames::from_json`] takes them from the whole profile.
    pub(crate) fn names(&self) -> Result<ImageNames, ProfileError> {
        let mut system = serde_json::Map::new();
        if let Some(s) = &self.system.0 {
            for (k, v) in [
                ("personality", &s.personality),
                ("archetype", &s.archetype),
                ("os", &s.os),
            ] {
                if let Some(v) = v {
                    system.insert(k.into(), v.clone());
                }
            }
        }
        let mut v = serde_json::json!({ "system": system });
        if let Some(branch) = self
            .metadata
            .0
            .as_ref()
            .and_then(|m| m.template.0.as_ref()?.branch.clone())
        {
            v["metadata"] = serde_json::json!({ "template": { "branch": branch } });
        }
        ImageNames::from_json(&v)
    }

    /// `<hostname>.<domainname>` from the profile.
    fn host_name(&self) -> Option<String> {
        let net = self.system.0.as_ref()?.network.as_ref()?;
        let host = net.get("hostname")?.as_str()?;
        Some(match net.get("domainname").and_then(|d| d.as_str()) {
            Some(d) if !d.is_empty() => format!("{host}.{d}"),
            _ => host.to_string(),
        })
    }
}

/// Image names of a profile (reads only the fields that make them).
pub(crate) fn image_names(body: &[u8]) -> Result<ImageNames, ProfileError> {
    Fields::parse(body)
        .map_err(|e| ProfileError::NotJson(e.to_string()))?
        .names()
}

/// `STATE_DIR/rejected/<epoch>-<message id or sha256>.msg`, the body as received.
fn save_rejected(state_dir: &Path, message_id: Option<&str>, sha: &str, body: &[u8]) -> std::io::Result<PathBuf> {
    let dir = state_dir.join("rejected");
    std::fs::create_dir_all(&dir)?;
    let id: String = message_id
        .unwrap_or(sha)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    let epoch = chrono::Utc::now().timestamp();
    let path = dir.join(format!("{epoch}-{id}.msg"));
    // The broker forgets the message once acked: this copy must be on disk first.
    let mut tmp = tempfile::Builder::new().prefix(".rejected-").tempfile_in(&dir)?;
    std::io::Write::write_all(&mut tmp, body)?;
    tmp.as_file().sync_all()?;
    tmp.persist(&path).map_err(|e| e.error)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fields_read_give_the_names_and_errors_of_the_whole_profile() {
        let good = r#"{"software": {"big": [1, 2, {"x": "y"}]},
            "system": {"personality": {"name": "inv"}, "archetype": {"name": "a"}, "filesystems": [],
                       "os": {"distribution": {"name": "sl"}, "version": {"name": "7x"}, "architecture": "x86_64"},
                       "network": {"hostname": "h", "domainname": "d.org"}},
            "metadata": {"template": {"branch": {"name": "s", "type": "sandbox", "author": "me"}}}}"#;
        let bodies = [
            good.to_string(),
            good.replace(r#""architecture": "x86_64""#, r#""architecture": 5"#),
            good.replace(r#"{"name": "inv"}"#, r#""inv""#),
            good.replace(r#"{"name": "inv"}"#, r#"{"name": "../x"}"#),
            good.replace(r#""type": "sandbox", "#, ""),
            good.replace(r#"{"template": {"branch""#, r#"{"template": {"nobranch""#),
            good.replace(r#""metadata": {"#, r#""metadata": "x", "unused": {"#),
            r#"{"system": "x"}"#.to_string(),
            r#"{"system": null, "metadata": [1]}"#.to_string(),
            "[1, 2]".to_string(),
            "\"just a string\"".to_string(),
            "{ not json".to_string(),
        ];
        for body in bodies {
            let whole = ImageNames::from_slice(body.as_bytes());
            let read = image_names(body.as_bytes());
            match (&whole, &read) {
                (Err(ProfileError::NotJson(_)), Err(ProfileError::NotJson(_))) => {}
                _ => assert_eq!(read, whole, "{body}"),
            }
        }
        let fields = Fields::parse(good.as_bytes()).unwrap();
        assert_eq!(fields.host_name().as_deref(), Some("h.d.org"));
        assert_eq!(fields.names().unwrap().image_key(), "inv-sl7x-x86_64");
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        assert_eq!(bounded_reason("short"), "short");
        let long = "é".repeat(REASON_MAX_CHARS + 5);
        let cut = bounded_reason(&long);
        assert_eq!(cut.chars().count(), REASON_MAX_CHARS + 3);
        assert!(cut.ends_with("é..."));
    }

    #[test]
    fn reconnect_pause_doubles_from_retry_delay_up_to_the_cap() {
        let p: Vec<u64> = (0..7)
            .map(|a| reconnect_pause(Duration::from_secs(2), a).as_secs())
            .collect();
        assert_eq!(p, vec![2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(reconnect_pause(Duration::from_secs(2), 40), MAX_BACKOFF);
    }
}
