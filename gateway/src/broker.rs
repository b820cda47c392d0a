//! The embedded MQTT broker (rumqttd), for standalone mode and for leaves on
//! the LAN. Confined to this module: rumqttd binds from its config, never
//! reports the bound address, logs (rather than returns) bind errors and cannot
//! be stopped. So we check the address is free ourselves, resolve port 0 to a
//! concrete free port first, wait until it accepts connections, and let its
//! threads live as long as the process.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the embedded MQTT broker cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the embedded MQTT broker did not come up on {addr}")]
    NotUp { addr: SocketAddr },
}

/// A running embedded broker.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Start the broker on `listen` (port 0 picks a free port) and wait until
    /// it accepts connections.
    pub async fn start(listen: SocketAddr) -> Result<EmbeddedBroker, BrokerError> {
        // Check the address is ours to take, and learn the port for port 0.
        let probe = TcpListener::bind(listen).map_err(|source| BrokerError::Bind {
            addr: listen,
            source,
        })?;
        let addr = probe.local_addr().map_err(|source| BrokerError::Bind {
            addr: listen,
            source,
        })?;
        drop(probe);

        let config = rumqttd::Config {
            id: 0,
            router: rumqttd::RouterConfig {
                max_connections: 10_000,
                max_outgoing_packet_count: 200,
                max_segment_size: 100 << 20,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            v4: Some(HashMap::from([(
                "otagw".to_string(),
                rumqttd::ServerSettings {
                    name: "otagw-local".into(),
                    listen: addr,
                    tls: None,
                    next_connection_delay_ms: 1,
                    connections: rumqttd::ConnectionSettings {
                        connection_timeout_ms: 60_000,
                        max_payload_size: 1 << 20,
                        max_inflight_count: 200,
                        auth: None,
                        external_auth: None,
                        dynamic_filters: true,
                    },
                },
            )])),
            v5: None,
            ws: None,
            cluster: None,
            console: None,
            bridge: None,
            prometheus: None,
            metrics: None,
        };
        std::thread::Builder::new()
            .name("otagw-broker".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!("embedded MQTT broker stopped: {e}");
                }
            })
            .map_err(|source| BrokerError::Bind { addr, source })?;

        // rumqttd does not say when it is listening: ask it, bounded.
        for _ in 0..500 {
            if answers_mqtt(addr).await {
                tracing::info!(%addr, "embedded MQTT broker listening");
                return Ok(EmbeddedBroker { addr });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(BrokerError::NotUp { addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL a client connects with.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}

/// Whether an MQTT 3.1.1 broker at `addr` accepts a connection: CONNECT,
/// CONNACK "accepted", DISCONNECT (a bare TCP probe makes rumqttd log an error).
async fn answers_mqtt(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CONNECT: &[u8] = &[
        0x10, 23, // CONNECT, remaining length
        0, 4, b'M', b'Q', b'T', b'T', 4, // protocol name and level 3.1.1
        0x02, 0, 10, // clean session, keep alive 10 s
        0, 11, b'o', b't', b'a', b'g', b'w', b'-', b'p', b'r', b'o', b'b', b'e',
    ];
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(CONNECT).await?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await?;
        s.write_all(&[0xE0, 0]).await?;
        // Let the broker hang up first: a probe that closes its end first
        // makes rumqttd log `ERROR router-drop` at every start.
        let mut rest = [0u8; 16];
        while s.read(&mut rest).await? > 0 {}
        std::io::Result::Ok(ack == [0x20, 2, 0, 0])
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), probe).await,
        Ok(Ok(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_on_a_free_port_and_refuses_a_taken_one() {
        let b = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        assert_ne!(b.addr().port(), 0);
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = EmbeddedBroker::start(taken.local_addr().unwrap())
            .await
            .unwrap_err();
        assert!(matches!(err, BrokerError::Bind { .. }), "{err}");
    }
}
