//! RabbitMQ: connecting with the original's retry policy, and declaring the
//! build queue the way the original did (durable, no arguments), so a queue
//! an older installation already declared is accepted as it is.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::FieldTable;
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{Channel, Connection, ConnectionProperties, Queue};

use crate::config::RabbitSettings;

/// Failing to reach or use the broker. Never contains the password.
#[derive(Debug, thiserror::Error)]
pub enum RabbitError {
    #[error("cannot reach RabbitMQ at {endpoint} after {attempts} attempt(s): {last}")]
    Unreachable {
        endpoint: String,
        attempts: u32,
        last: lapin::Error,
    },
    #[error("cannot read RABBIT_CA_FILE {file}: {source}")]
    CaFile { file: String, source: std::io::Error },
    #[error("RabbitMQ at {endpoint}: {source}")]
    Amqp { endpoint: String, source: lapin::Error },
}

/// `host:port/vhost`, for messages.
pub fn endpoint(settings: &RabbitSettings) -> String {
    let scheme = if settings.tls { "amqps" } else { "amqp" };
    format!(
        "{scheme}://{}:{}{}",
        settings.host,
        settings.port,
        vhost_display(&settings.vhost)
    )
}

fn vhost_display(vhost: &str) -> String {
    if vhost.starts_with('/') {
        vhost.to_string()
    } else {
        format!("/{vhost}")
    }
}

/// The connection URI, built field by field so that no character of the
/// user, password or vhost needs escaping.
pub fn uri(settings: &RabbitSettings, heartbeat: Option<u16>) -> AMQPUri {
    AMQPUri {
        scheme: if settings.tls {
            AMQPScheme::AMQPS
        } else {
            AMQPScheme::AMQP
        },
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: settings.user.clone(),
                password: settings.password.clone(),
            },
            host: settings.host.clone(),
            port: settings.port,
        },
        vhost: settings.vhost.clone(),
        query: AMQPQueryString {
            heartbeat,
            connection_timeout: Some(settings.connect_timeout.as_millis().clamp(1, u64::MAX as u128) as u64),
            ..Default::default()
        },
    }
}

/// One connection attempt, bounded by RABBIT_CONNECT_TIMEOUT from the TCP
/// connect to the end of the AMQP handshake: a broker (or a proxy or
/// firewall in front of it) that accepts the connection and never answers
/// fails the attempt, instead of hanging it for ever.
pub async fn connect_once(settings: &RabbitSettings, connection_name: &str) -> Result<Connection, RabbitError> {
    match tokio::time::timeout(settings.connect_timeout, connect_unbounded(settings, connection_name)).await {
        Ok(connected) => connected,
        Err(_) => Err(RabbitError::Amqp {
            endpoint: endpoint(settings),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no AMQP handshake within {:?} (RABBIT_CONNECT_TIMEOUT)",
                    settings.connect_timeout
                ),
            )
            .into(),
        }),
    }
}

async fn connect_unbounded(settings: &RabbitSettings, connection_name: &str) -> Result<Connection, RabbitError> {
    let tls = match &settings.ca_file {
        Some(path) => OwnedTLSConfig {
            identity: None,
            cert_chain: Some(std::fs::read_to_string(path).map_err(|source| RabbitError::CaFile {
                file: path.display().to_string(),
                source,
            })?),
        },
        None => OwnedTLSConfig::default(),
    };
    let props = ConnectionProperties::default().with_connection_name(connection_name.into());
    let runtime = lapin::runtime::default_runtime().map_err(|source| RabbitError::Amqp {
        endpoint: endpoint(settings),
        source,
    })?;
    Connection::connect_uri_with_config(uri(settings, Some(30)), props, tls, runtime)
        .await
        .map_err(|source| RabbitError::Amqp {
            endpoint: endpoint(settings),
            source,
        })
}

/// Connects, trying RABBIT_RETRIES times RABBIT_RETRY_DELAY apart (the
/// original: 10 attempts, 2 s apart). Each failed attempt is logged.
pub async fn connect(settings: &RabbitSettings, connection_name: &str) -> Result<Connection, RabbitError> {
    let attempts = settings.retries.max(1);
    let mut attempt = 1;
    loop {
        match connect_once(settings, connection_name).await {
            Ok(conn) => return Ok(conn),
            Err(RabbitError::Amqp { source, .. }) if attempt < attempts => {
                tracing::warn!(
                    "Could not connect to RabbitMQ at {} (attempt {attempt}/{attempts}): {source}; retrying in {:?}",
                    endpoint(settings),
                    settings.retry_delay
                );
                tokio::time::sleep(settings.retry_delay).await;
                attempt += 1;
            }
            Err(RabbitError::Amqp { source, .. }) => {
                return Err(RabbitError::Unreachable {
                    endpoint: endpoint(settings),
                    attempts,
                    last: source,
                })
            }
            Err(other) => return Err(other),
        }
    }
}

/// Declares the build queue as the original did: durable, no arguments.
pub async fn declare_queue(channel: &Channel, queue: &str) -> Result<Queue, lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Exponential backoff for reconnect loops: 1 s doubling to `max`.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let secs = 1u64.checked_shl(attempt.min(16)).unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(max)
}
