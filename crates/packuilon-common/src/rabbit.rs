//! RabbitMQ: connecting with the original's retry policy, and declaring the
//! build queue the way the original did (durable, no arguments), so a queue
//! an older installation already declared is accepted as it is; or, with
//! `QUEUE_TYPE = quorum`, as a quorum queue replicated over a cluster.
//!
//! RABBIT_HOST may list a cluster's nodes: a connection goes to the first
//! that answers, and a reconnection after a loss starts with the node after
//! the lost one (round robin), so a stopped node is not waited for.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{Channel, Connection, ConnectionProperties, Queue};

use crate::config::{QueueType, RabbitSettings};

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
    /// The queue exists with another type than QUEUE_TYPE asks for: a
    /// configuration error (exit 2), retrying cannot fix it.
    #[error("[global] QUEUE_TYPE is {wanted}, but queue {queue:?} exists on RabbitMQ at {endpoint} {}", current_note(.current, .detail))]
    QueueType {
        endpoint: String,
        queue: String,
        wanted: QueueType,
        /// The type the queue has, when the broker said.
        current: Option<String>,
        /// The broker's words.
        detail: String,
    },
}

fn current_note(current: &Option<String>, detail: &str) -> String {
    match current {
        Some(c) => format!(
            "as a {c} queue: set QUEUE_TYPE = {c}, or move its messages and delete it so that it is declared \
             again (see README, \"RabbitMQ clusters\"); the broker said: {detail}"
        ),
        None => format!("with another type; the broker said: {detail}"),
    }
}

impl RabbitError {
    /// The broker refuses the configuration (QUEUE_TYPE): exit 2, as
    /// other configuration errors; retrying will not help.
    pub fn is_config(&self) -> bool {
        matches!(self, RabbitError::QueueType { .. })
    }
}

/// The broker(s), for messages: `amqp://host:port/vhost`, or
/// `amqp://a:5672,b:5672/vhost` for several nodes.
pub fn endpoint(settings: &RabbitSettings) -> String {
    let nodes: Vec<String> = settings.nodes.iter().map(|n| host_port(&n.host, n.port)).collect();
    format!(
        "{}://{}{}",
        scheme(settings),
        nodes.join(","),
        vhost_display(&settings.vhost)
    )
}

/// One node of RABBIT_HOST (counted from 0, modulo their number), for messages.
pub fn node_endpoint(settings: &RabbitSettings, node: usize) -> String {
    let n = &settings.nodes[node % settings.nodes.len()];
    format!(
        "{}://{}{}",
        scheme(settings),
        host_port(&n.host, n.port),
        vhost_display(&settings.vhost)
    )
}

fn scheme(settings: &RabbitSettings) -> &'static str {
    if settings.tls {
        "amqps"
    } else {
        "amqp"
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn vhost_display(vhost: &str) -> String {
    if vhost.starts_with('/') {
        vhost.to_string()
    } else {
        format!("/{vhost}")
    }
}

/// The connection URI of node `node` (counted from 0, modulo their number),
/// built field by field so that no character of the user, password or
/// vhost needs escaping.
pub fn uri(settings: &RabbitSettings, node: usize, heartbeat: Option<u16>) -> AMQPUri {
    let n = &settings.nodes[node % settings.nodes.len()];
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
            host: n.host.clone(),
            port: n.port,
        },
        vhost: settings.vhost.clone(),
        query: AMQPQueryString {
            heartbeat,
            connection_timeout: Some(settings.connect_timeout.as_millis().clamp(1, u64::MAX as u128) as u64),
            ..Default::default()
        },
    }
}

/// One connection attempt to node `node`, bounded by RABBIT_CONNECT_TIMEOUT
/// from the TCP connect to the end of the AMQP handshake: a broker (or a
/// proxy or firewall in front of it) that accepts the connection and never
/// answers fails the attempt, instead of hanging it for ever.
pub async fn connect_node(
    settings: &RabbitSettings,
    node: usize,
    connection_name: &str,
) -> Result<Connection, RabbitError> {
    match tokio::time::timeout(
        settings.connect_timeout,
        connect_unbounded(settings, node, connection_name),
    )
    .await
    {
        Ok(connected) => connected,
        Err(_) => Err(RabbitError::Amqp {
            endpoint: node_endpoint(settings, node),
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

/// A connection, and the node (index into RABBIT_HOST) it is to.
pub struct Connected {
    pub connection: Connection,
    pub node: usize,
}

/// One round: each node once, starting with node `first` (modulo their
/// number); the first that answers wins and is logged. A node that does not
/// answer is logged when others are left to try; the error is the last
/// node's.
pub async fn connect_once(
    settings: &RabbitSettings,
    first: usize,
    connection_name: &str,
) -> Result<Connected, RabbitError> {
    let count = settings.nodes.len().max(1);
    let mut tried = 0;
    loop {
        let node = (first + tried) % count;
        tried += 1;
        match connect_node(settings, node, connection_name).await {
            Ok(connection) => {
                tracing::info!("Connected to RabbitMQ at {}", node_endpoint(settings, node));
                return Ok(Connected { connection, node });
            }
            Err(RabbitError::Amqp { endpoint, source }) if tried < count => {
                tracing::warn!(
                    "Could not connect to RabbitMQ at {endpoint}: {source}; trying {} next",
                    node_endpoint(settings, node + 1)
                );
            }
            Err(e) => return Err(e),
        }
    }
}

async fn connect_unbounded(
    settings: &RabbitSettings,
    node: usize,
    connection_name: &str,
) -> Result<Connection, RabbitError> {
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
        endpoint: node_endpoint(settings, node),
        source,
    })?;
    Connection::connect_uri_with_config(uri(settings, node, Some(30)), props, tls, runtime)
        .await
        .map_err(|source| RabbitError::Amqp {
            endpoint: node_endpoint(settings, node),
            source,
        })
}

/// Connects, trying RABBIT_RETRIES times RABBIT_RETRY_DELAY apart (the
/// original: 10 attempts, 2 s apart); each attempt tries every node of
/// RABBIT_HOST once, from node `first` on. Each failed attempt is logged.
pub async fn connect(settings: &RabbitSettings, first: usize, connection_name: &str) -> Result<Connected, RabbitError> {
    let attempts = settings.retries.max(1);
    let mut attempt = 1;
    loop {
        match connect_once(settings, first, connection_name).await {
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

/// Declares the build queue: with [`QueueType::Classic`] as the original
/// did (durable, no arguments); with [`QueueType::Quorum`] durable with
/// `x-queue-type: quorum` (quorum queues are never exclusive nor
/// auto-deleted). A queue that exists with the other type is a
/// [`RabbitError::QueueType`] (the broker then closes the channel).
pub async fn declare_queue(
    channel: &Channel,
    queue: &str,
    queue_type: QueueType,
    endpoint: &str,
) -> Result<Queue, RabbitError> {
    let mut arguments = FieldTable::default();
    if queue_type == QueueType::Quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(queue_type.as_str())),
        );
    }
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .map_err(|source| match type_mismatch(&source) {
            Some((current, detail)) => RabbitError::QueueType {
                endpoint: endpoint.to_string(),
                queue: queue.to_string(),
                wanted: queue_type,
                current,
                detail,
            },
            None => RabbitError::Amqp {
                endpoint: endpoint.to_string(),
                source,
            },
        })
}

/// From a declare's PRECONDITION_FAILED about `x-queue-type`: the type the
/// queue has (`None` if the broker did not say) and the broker's words.
/// RabbitMQ 3.10 says "inequivalent arg 'x-queue-type' for queue 'q' in
/// vhost '/': received none but current is the value 'quorum' of type
/// 'longstr'" (a classic queue has none: "... but current is none").
fn type_mismatch(error: &lapin::Error) -> Option<(Option<String>, String)> {
    let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else {
        return None;
    };
    let text = amqp.get_message().to_string();
    if amqp.get_id() != 406 || !text.contains("'x-queue-type'") {
        return None;
    }
    let current = text.split_once("but current is ").and_then(|(_, rest)| {
        if rest.starts_with("none") {
            Some("classic".to_string())
        } else {
            let value = rest.strip_prefix("the value '")?;
            Some(value.split('\'').next()?.to_string())
        }
    });
    Some((current, text))
}

/// Exponential backoff for reconnect loops: 1 s doubling to `max`.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let secs = 1u64.checked_shl(attempt.min(16)).unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(max)
}
