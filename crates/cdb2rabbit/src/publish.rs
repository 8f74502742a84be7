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

use std::time::{SystemTime, UNIX_EPOCH};

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
}

/// An open channel in confirm mode, publishing to one queue.
pub struct Publisher {
    connection: Connection,
    channel: Channel,
    queue: String,
}

/// A published message waiting for the broker's confirm.
pub struct Pending {
    pub profile: String,
    pub message_id: String,
    confirm: PublisherConfirm,
}

impl Publisher {
    /// Connects (RABBIT_RETRIES attempts RABBIT_RETRY_DELAY apart), enables
    /// confirms and declares QUEUE as the original did (durable, no arguments).
    pub async fn connect(global: &GlobalConfig) -> Result<Publisher, PublishError> {
        let endpoint = rabbit::endpoint(&global.rabbit);
        let setup = |action| {
            let endpoint = endpoint.clone();
            move |source| PublishError::Setup {
                endpoint,
                action,
                source,
            }
        };
        let connection = rabbit::connect(&global.rabbit, "cdb2rabbit").await?;
        let channel = connection.create_channel().await.map_err(setup("opening a channel"))?;
        rabbit::declare_queue(&channel, &global.queue)
            .await
            .map_err(setup("declaring the queue"))?;
        Self::on_channel(connection, channel, &global.queue)
            .await
            .map_err(setup("enabling publisher confirms"))
    }

    /// Uses an open channel as it is (no queue declared), enabling confirms.
    pub async fn on_channel(connection: Connection, channel: Channel, queue: &str) -> Result<Publisher, lapin::Error> {
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Publisher {
            connection,
            channel,
            queue: queue.to_string(),
        })
    }

    /// Sends one profile; await [`Pending::confirmed`] for the broker's answer.
    pub async fn publish(&self, profile: &str, mtime: u64, body: &[u8]) -> Result<Pending, PublishError> {
        let message_id = uuid::Uuid::new_v4().to_string();
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
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
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

/// A publish the broker has confirmed.
#[derive(Debug, Clone)]
pub struct Confirmed {
    pub profile: String,
    pub message_id: String,
}
