//! The link to this node's parent tier: one QUIC connection (re-dialled when it breaks),
//! one stream per request session, and the wire encoding used on this link.

use std::net::SocketAddr;

use flow_protocol::transport::{ConnStats, Endpoint, PeerConnection, SessionStream};
use flow_protocol::{Encoding, Hello};
use tokio::sync::Mutex;

use crate::error::{NodeError, Result};

/// A parent tier this node escalates to.
#[derive(Debug)]
pub struct ParentLink {
    endpoint: Endpoint,
    addr: SocketAddr,
    server_name: String,
    encoding: Encoding,
    conn: Mutex<Option<PeerConnection>>,
}

impl ParentLink {
    /// Connect to `addr` (certificate name `server_name`) and exchange `Hello`s.
    pub async fn connect(
        endpoint: Endpoint,
        addr: SocketAddr,
        server_name: String,
        encoding: Encoding,
    ) -> Result<Self> {
        let link = Self {
            endpoint,
            addr,
            server_name,
            encoding,
            conn: Mutex::new(None),
        };
        link.dial().await?;
        Ok(link)
    }

    async fn dial(&self) -> Result<()> {
        let c = self
            .endpoint
            .connect(self.addr, &self.server_name)
            .await
            .map_err(|e| NodeError::Parent {
                addr: self.addr.to_string(),
                msg: e.to_string(),
            })?;
        tracing::info!(parent = %self.addr, node = %c.peer_hello().node_id, role = %c.peer_hello().role, "connected to parent");
        *self.conn.lock().await = Some(c);
        Ok(())
    }

    /// The parent's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Wire encoding of hidden states on this link.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The parent's `Hello`, if connected.
    pub async fn hello(&self) -> Option<Hello> {
        self.conn
            .lock()
            .await
            .as_ref()
            .map(|c| c.peer_hello().clone())
    }

    /// Live QUIC statistics (RTT, cwnd, bytes, losses) for the planner.
    pub async fn stats(&self) -> Option<ConnStats> {
        self.conn.lock().await.as_ref().map(|c| c.stats())
    }

    /// A new request session; re-dials once if the connection is gone.
    pub async fn open_session(&self) -> Result<SessionStream> {
        for attempt in 0..2 {
            let stream = {
                let guard = self.conn.lock().await;
                match guard.as_ref() {
                    Some(c) => Some(c.open_session().await),
                    None => None,
                }
            };
            match stream {
                Some(Ok(s)) => return Ok(s),
                Some(Err(e)) if attempt == 1 => {
                    return Err(NodeError::Parent {
                        addr: self.addr.to_string(),
                        msg: e.to_string(),
                    })
                }
                _ => {
                    *self.conn.lock().await = None;
                    self.dial().await?;
                }
            }
        }
        Err(NodeError::Parent {
            addr: self.addr.to_string(),
            msg: "could not open a session".into(),
        })
    }

    /// Close the connection.
    pub async fn close(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            c.close("shutdown");
        }
    }
}
