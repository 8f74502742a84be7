//! Publishing profiles to the build queue, counting only what the broker
//! confirmed.
//!
//! One connection and one channel in confirm mode. Each profile is published
//! to the default exchange with routing key QUEUE, `mandatory` (a message
//! that reaches no queue comes back as basic.return instead of vanishing),
//! persistent, `application/json`, with a message id, a timestamp, app id
//! `cdb2rabbit` and a `profile` header. [`Publisher::publish`] returns as soon
//! as the message is on the wire; [`Pending::confirmed`] resolves with the
//! broker's answer, so many publishes can be in flight at once. A nack, a
//! return or a channel error is an error for that profile only.
//!
//! Nothing here waits for ever: the connection, the handshake and the
//! channel's setup are bounded by RABBIT_CONNECT_TIMEOUT, and the caller
//! bounds each publish with PUBLISH_TIMEOUT ([`Publisher::timeout`]). A
//! broker that blocks publishers (`connection.blocked`, e.g. a memory or
//! disk alarm) is logged at once, with its reason.
//!
//! RABBIT_HOST may list a cluster's nodes: the publisher connects to the
//! first that answers. When the connection is lost mid-run (its node
//! stopped), [`Publisher::reopen`] connects again, starting with the next
//! node, and the publishes in flight go out again with their message ids,
//! so a consumer that got both copies builds once.
//!
//! The broker closes the channel when a message is larger than its
//! `max_message_size`, failing every publish in flight on it. The channel is
//! then reopened ([`Publisher::reopen`]) and the others are published again;
//! the broker's limit is learned from its error, and a profile above it
//! fails alone, without being sent (and without closing the channel again).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use lapin::{Confirmation, PublisherConfirm};
use packuilon_common::config::GlobalConfig;
use packuilon_common::rabbit::{self, RabbitError};

/// The header naming the profile a message carries.
pub const PROFILE_HEADER: &str = "profile";
/// The header carrying the profile's mtime from the index.
pub const MTIME_HEADER: &str = "profile_mtime";
/// AMQP app id of every message.
pub const APP_ID: &str = "cdb2rabbit";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Connecting, or declaring the queue (a QUEUE_TYPE mismatch).
    #[error(transparent)]
    Connect(#[from] RabbitError),
    #[error("RabbitMQ at {endpoint}: {action}: {source}")]
    Setup {
        endpoint: String,
        action: &'static str,
        source: lapin::Error,
    },
    #[error("publishing {profile} (message id {message_id}): {source}")]
    Channel {
        profile: String,
        message_id: String,
        source: lapin::Error,
    },
    #[error("broker refused (nack) {profile} (message id {message_id})")]
    Nacked { profile: String, message_id: String },
    #[error("broker returned {profile} (message id {message_id}) as unroutable: {code} {text}")]
    Returned {
        profile: String,
        message_id: String,
        code: u16,
        text: String,
    },
    #[error("broker did not confirm {profile} (message id {message_id}): confirms are off")]
    Unconfirmed { profile: String, message_id: String },
    #[error("RabbitMQ at {endpoint} did not confirm {profile} within {timeout:?} (PUBLISH_TIMEOUT){}", blocked_note(.blocked))]
    Timeout {
        endpoint: String,
        profile: String,
        timeout: Duration,
        /// The broker's reason, when it had blocked the connection.
        blocked: Option<String>,
    },
    #[error("{profile}: not confirmed before the run stopped waiting; left for the next run")]
    GaveUp { profile: String },
    #[error("{profile} is {size} bytes, larger than the broker's max_message_size ({max} bytes); not published")]
    TooLarge { profile: String, size: usize, max: usize },
}

fn blocked_note(blocked: &Option<String>) -> String {
    match blocked {
        Some(reason) => format!(": the broker blocks this connection ({reason})"),
        None => String::new(),
    }
}

impl PublishError {
    /// The broker closed the channel (or it was closed already): the
    /// publish may succeed on a new channel.
    pub fn channel_lost(&self) -> bool {
        matches!(self, PublishError::Channel { .. })
    }

    /// The broker refuses the configuration (a QUEUE_TYPE mismatch): exit 2.
    pub fn is_config(&self) -> bool {
        matches!(self, PublishError::Connect(e) if e.is_config())
    }
}

/// An open channel in confirm mode, publishing to one queue.
pub struct Publisher {
    /// The connection in use (replaced when it is lost).
    connection: RefCell<Rc<Connection>>,
    /// `[global]`, to connect again when the connection is lost (`None`
    /// for a publisher made with [`Publisher::on_channel`]).
    global: Option<GlobalConfig>,
    /// The node of RABBIT_HOST the connection is to.
    node: Cell<usize>,
    /// The channel in use, and how many times it was reopened.
    channel: RefCell<(u64, Channel)>,
    /// Held while the channel is reopened (by the first publish that finds it closed).
    reopening: tokio::sync::Mutex<()>,
    queue: String,
    /// The node in use, for messages.
    endpoint: RefCell<String>,
    /// Bounds reopening the channel.
    setup_timeout: Duration,
    /// PUBLISH_TIMEOUT.
    timeout: Duration,
    /// The broker's max_message_size, once its error told it.
    max_size: Cell<Option<usize>>,
    /// Why the broker blocks the connection, while it does.
    blocked: Arc<Mutex<Option<String>>>,
    /// A publish was not confirmed in time: the broker is not answering.
    stalled: Cell<bool>,
    watcher: RefCell<Option<tokio::task::JoinHandle<()>>>,
}

/// A published message waiting for the broker's confirm.
pub struct Pending {
    pub profile: String,
    pub message_id: String,
    confirm: PublisherConfirm,
}

impl Publisher {
    /// Connects (RABBIT_RETRIES attempts RABBIT_RETRY_DELAY apart, each
    /// trying the nodes of RABBIT_HOST in order), enables confirms and
    /// declares QUEUE as QUEUE_TYPE says (classic: as the original did).
    pub async fn connect(global: &GlobalConfig) -> Result<Publisher, PublishError> {
        let (connection, node, channel) = Self::open(global, 0).await?;
        let endpoint = rabbit::node_endpoint(&global.rabbit, node);
        let mut publisher = Self::on_channel(connection, channel, &global.queue)
            .await
            .map_err(|source| PublishError::Setup {
                endpoint: endpoint.clone(),
                action: "enabling publisher confirms",
                source,
            })?;
        publisher.endpoint = RefCell::new(endpoint);
        publisher.node.set(node);
        publisher.global = Some(global.clone());
        publisher.setup_timeout = global.rabbit.connect_timeout;
        publisher.timeout = global.publish_timeout;
        Ok(publisher)
    }

    /// A connection (to the first node from `first` on that answers) and a
    /// channel on it with QUEUE declared; confirms are not enabled yet.
    async fn open(global: &GlobalConfig, first: usize) -> Result<(Connection, usize, Channel), PublishError> {
        let rabbit::Connected { connection, node } = rabbit::connect(&global.rabbit, first, "cdb2rabbit").await?;
        let endpoint = rabbit::node_endpoint(&global.rabbit, node);
        let limit = global.rabbit.connect_timeout;
        let channel = bounded(limit, connection.create_channel())
            .await
            .map_err(|source| PublishError::Setup {
                endpoint: endpoint.clone(),
                action: "opening a channel",
                source,
            })?;
        let declared = tokio::time::timeout(
            limit,
            rabbit::declare_queue(&channel, &global.queue, global.queue_type, &endpoint),
        )
        .await;
        match declared {
            Ok(Ok(_)) => {}
            Ok(Err(RabbitError::Amqp { source, .. })) => {
                return Err(PublishError::Setup {
                    endpoint,
                    action: "declaring the queue",
                    source,
                })
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(PublishError::Setup {
                    endpoint,
                    action: "declaring the queue",
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer from the broker within {limit:?}"),
                    )
                    .into(),
                })
            }
        }
        Ok((connection, node, channel))
    }

    /// Uses an open channel as it is (no queue declared), enabling confirms.
    pub async fn on_channel(connection: Connection, channel: Channel, queue: &str) -> Result<Publisher, lapin::Error> {
        bounded(
            Duration::from_secs(30),
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        let blocked = Arc::new(Mutex::new(None));
        let endpoint = "the broker".to_string();
        let watcher = watch_blocked(&connection, blocked.clone());
        Ok(Publisher {
            connection: RefCell::new(Rc::new(connection)),
            global: None,
            node: Cell::new(0),
            channel: RefCell::new((0, channel)),
            reopening: tokio::sync::Mutex::new(()),
            queue: queue.to_string(),
            endpoint: RefCell::new(endpoint),
            setup_timeout: Duration::from_secs(30),
            timeout: Duration::from_secs(60),
            max_size: Cell::new(None),
            blocked,
            stalled: Cell::new(false),
            watcher: RefCell::new(watcher),
        })
    }

    /// PUBLISH_TIMEOUT: how long a publish may wait for its confirm.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The node in use, for messages.
    fn endpoint(&self) -> String {
        self.endpoint.borrow().clone()
    }

    /// The error for a publish of `profile` that was not confirmed in time.
    pub fn timed_out(&self, profile: &str) -> PublishError {
        self.stalled.set(true);
        PublishError::Timeout {
            endpoint: self.endpoint(),
            profile: profile.to_string(),
            timeout: self.timeout,
            blocked: self.blocked.lock().ok().and_then(|b| b.clone()),
        }
    }

    /// The channel's generation, to pass to [`Publisher::reopen`].
    pub fn generation(&self) -> u64 {
        self.channel.borrow().0
    }

    /// After a publish on channel `generation` failed with a closed
    /// channel: opens a new one in confirm mode (unless another publish did
    /// already); when the connection itself is lost, connects again first,
    /// starting with the next node of RABBIT_HOST. Learns the broker's
    /// max_message_size from `error` when it says so.
    pub async fn reopen(&self, generation: u64, error: &PublishError) -> Result<(), PublishError> {
        if let Some(max) = max_message_size(&error.to_string()) {
            self.max_size.set(Some(max));
        }
        let _guard = self.reopening.lock().await;
        if self.generation() != generation {
            return Ok(());
        }
        let connection = self.connection.borrow().clone();
        let reopened = bounded(self.setup_timeout, connection.create_channel()).await;
        let channel = match (reopened, &self.global) {
            (Ok(channel), _) => channel,
            // The connection is gone (its node stopped): another, from the next node on.
            (Err(_), Some(global)) if !connection.status().connected() => {
                tracing::warn!(
                    "Lost the connection to RabbitMQ at {}; connecting again",
                    self.endpoint()
                );
                let (connection, node, channel) = Self::open(global, self.node.get() + 1).await?;
                if let Some(w) = self.watcher.borrow_mut().take() {
                    w.abort();
                }
                *self.watcher.borrow_mut() = watch_blocked(&connection, self.blocked.clone());
                *self.connection.borrow_mut() = Rc::new(connection);
                self.node.set(node);
                *self.endpoint.borrow_mut() = rabbit::node_endpoint(&global.rabbit, node);
                channel
            }
            (Err(source), _) => {
                return Err(PublishError::Setup {
                    endpoint: self.endpoint(),
                    action: "reopening the channel",
                    source,
                })
            }
        };
        let setup = |action| {
            let endpoint = self.endpoint();
            move |source| PublishError::Setup {
                endpoint,
                action,
                source,
            }
        };
        bounded(
            self.setup_timeout,
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await
        .map_err(setup("enabling publisher confirms"))?;
        tracing::info!("Reopened the channel to RabbitMQ at {}", self.endpoint());
        *self.channel.borrow_mut() = (generation + 1, channel);
        Ok(())
    }

    /// Refuses, without sending it, a body the broker is known to refuse
    /// (it would close the channel, failing every publish in flight).
    pub fn oversized(&self, profile: &str, size: usize) -> Option<PublishError> {
        match self.max_size.get() {
            Some(max) if size > max => Some(PublishError::TooLarge {
                profile: profile.to_string(),
                size,
                max,
            }),
            _ => None,
        }
    }

    /// Sends one profile; await [`Pending::confirmed`] for the broker's answer.
    pub async fn publish(&self, profile: &str, mtime: u64, body: &[u8]) -> Result<Pending, PublishError> {
        self.publish_as(new_message_id(), profile, mtime, body).await
    }

    /// As [`Publisher::publish`], with this message id: a profile published
    /// again after its channel was lost keeps its id, so that a consumer
    /// that got the first copy too (the broker may have taken it before the
    /// channel closed) knows it for the same request.
    pub async fn publish_as(
        &self,
        message_id: String,
        profile: &str,
        mtime: u64,
        body: &[u8],
    ) -> Result<Pending, PublishError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut headers = FieldTable::default();
        headers.insert(
            PROFILE_HEADER.into(),
            AMQPValue::LongString(LongString::from(profile.as_bytes().to_vec())),
        );
        headers.insert(MTIME_HEADER.into(), AMQPValue::LongLongInt(mtime as i64));
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(message_id.clone().into())
            .with_timestamp(now)
            .with_app_id(APP_ID.into())
            .with_headers(headers);
        let channel = self.channel.borrow().1.clone();
        let confirm = channel
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
            .map_err(|source| PublishError::Channel {
                profile: profile.to_string(),
                message_id: message_id.clone(),
                source,
            })?;
        Ok(Pending {
            profile: profile.to_string(),
            message_id,
            confirm,
        })
    }

    /// Closes the channel and connection (every confirm should be in by now).
    pub async fn close(&self) {
        if let Some(w) = &*self.watcher.borrow() {
            w.abort();
        }
        let blocked = self.blocked.lock().map(|b| b.is_some()).unwrap_or(true);
        if self.stalled.get() || blocked {
            // It would not answer the close either (a blocked connection is
            // not read by the broker): the connection is simply dropped.
            return;
        }
        let channel = self.channel.borrow().1.clone();
        let connection = self.connection.borrow().clone();
        let close = async {
            let _ = channel.close(200, "done".into()).await;
            let _ = connection.close(200, "done".into()).await;
        };
        // A stalled or blocking broker may never answer the close.
        let _ = tokio::time::timeout(self.setup_timeout, close).await;
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some(w) = &*self.watcher.borrow() {
            w.abort();
        }
    }
}

/// A new message id.
pub fn new_message_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Logs at once when the broker blocks (and unblocks) the connection, and
/// keeps its reason for the errors of publishes it holds up.
fn watch_blocked(connection: &Connection, blocked: Arc<Mutex<Option<String>>>) -> Option<tokio::task::JoinHandle<()>> {
    let mut events = connection.events_listener();
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    Some(runtime.spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                lapin::Event::ConnectionBlocked(reason) => {
                    tracing::warn!(
                        "RabbitMQ blocked the publishing connection: {reason}; \
                         publishes wait for it at most PUBLISH_TIMEOUT"
                    );
                    *blocked.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                }
                lapin::Event::ConnectionUnblocked => {
                    tracing::info!("RabbitMQ unblocked the publishing connection");
                    *blocked.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                _ => {}
            }
        }
    }))
}

/// `future`, or a timed-out error after `limit`.
async fn bounded<T>(
    limit: Duration,
    future: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, lapin::Error> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from the broker within {limit:?}"),
        )
        .into()),
    }
}

/// The limit in RabbitMQ's error for a message above its max_message_size
/// ("message size 2000 is larger than configured max size 1024").
fn max_message_size(error: &str) -> Option<usize> {
    let (_, rest) = error
        .split_once("larger than configured max size ")
        .or_else(|| error.split_once("larger than max size "))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

impl Pending {
    /// The broker's answer: `Ok` only for a plain ack.
    pub async fn confirmed(self) -> Result<Confirmed, PublishError> {
        let Pending {
            profile,
            message_id,
            confirm,
        } = self;
        match confirm.await {
            Ok(Confirmation::Ack(None)) => Ok(Confirmed { profile, message_id }),
            Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
                Err(PublishError::Returned {
                    profile,
                    message_id,
                    code: returned.reply_code,
                    text: returned.reply_text.to_string(),
                })
            }
            Ok(Confirmation::Nack(None)) => Err(PublishError::Nacked { profile, message_id }),
            Ok(Confirmation::NotRequested) => Err(PublishError::Unconfirmed { profile, message_id }),
            Err(source) => Err(PublishError::Channel {
                profile,
                message_id,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_brokers_size_limit_is_read_from_its_error() {
        let text = "publishing a.json (message id x): protocol error: AMQP soft error: PRECONDITION-FAILED: \
                    PRECONDITION_FAILED - message size 100011 is larger than configured max size 65536";
        assert_eq!(super::max_message_size(text), Some(65536));
        assert_eq!(
            super::max_message_size("message size 9 is larger than max size 8"),
            Some(8)
        );
        assert_eq!(super::max_message_size("channel closed"), None);
    }
}

/// A publish the broker has confirmed.
#[derive(Debug, Clone)]
pub struct Confirmed {
    pub profile: String,
    pub message_id: String,
}
