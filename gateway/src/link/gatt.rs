//! GATT access on Bluetooth LE links: what contract 0.2's `link.gatt-*` calls
//! reach, beyond the byte stream of the family's default characteristic.
//!
//! A BLE transport implements [`GattLink`] and offers it through
//! [`Transport::gatt`](super::Transport::gatt); every other transport offers
//! none, and the calls answer `unsupported`. Characteristics are named by
//! [`Uuid`]; [`parse_uuid`] reads the text forms the contract allows.
//!
//! What it is not: a Bluetooth stack. Scanning, connecting, MTU exchange and
//! service discovery belong to the transport.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use super::Transport;

pub use uuid::Uuid;

/// A future a [`GattLink`] returns (trait objects cannot have `async fn`).
pub type GattFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, GattError>> + Send + 'a>>;

/// Why a GATT operation failed, in the contract's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GattError {
    /// The device has no such characteristic or service.
    #[error("no characteristic {0}")]
    NotFound(String),
    /// The request is wrong for this characteristic (cannot be written,
    /// subscribed; too long).
    #[error("{0}")]
    Invalid(String),
    /// The device did not acknowledge in time.
    #[error("{0}")]
    Timeout(String),
    /// The connection is gone.
    #[error("disconnected")]
    Closed,
    /// The Bluetooth stack's own words.
    #[error("{0}")]
    Io(String),
}

/// A value a subscribed characteristic sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GattValue {
    pub characteristic: Uuid,
    pub data: Vec<u8>,
}

/// The characteristics of a connected BLE peripheral, beyond the default one.
pub trait GattLink: Send {
    /// Write `data` to a characteristic; `with_response` waits for the
    /// peripheral's acknowledgement.
    fn write<'a>(
        &'a mut self,
        characteristic: Uuid,
        data: &'a [u8],
        with_response: bool,
    ) -> GattFuture<'a, ()>;
    /// Read a characteristic's current value.
    fn read(&mut self, characteristic: Uuid) -> GattFuture<'_, Vec<u8>>;
    /// Subscribe to notifications (`indicate` false) or indications.
    fn subscribe(&mut self, characteristic: Uuid, indicate: bool) -> GattFuture<'_, ()>;
    /// Stop a subscription; values already received stay.
    fn unsubscribe(&mut self, characteristic: Uuid) -> GattFuture<'_, ()>;
    /// The next value of a subscribed characteristic, waiting at most
    /// `timeout`; `None` when the time ran out.
    fn receive(&mut self, timeout: Duration) -> GattFuture<'_, Option<GattValue>>;
}

/// The Bluetooth base UUID, into which 16- and 32-bit assigned numbers go.
const BASE: u128 = 0x0000_0000_0000_1000_8000_0080_5f9b_34fb;

/// Read a UUID as the contract writes it: the 128-bit form in any case, or a
/// 16- or 32-bit assigned number in hex (`fe59`, `0xFE59`, `0000fe59`).
pub fn parse_uuid(text: &str) -> Result<Uuid, String> {
    let t = text.trim();
    let short = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if matches!(short.len(), 4 | 8) && short.bytes().all(|b| b.is_ascii_hexdigit()) {
        let n = u32::from_str_radix(short, 16).map_err(|e| e.to_string())?;
        return Ok(Uuid::from_u128(BASE | (u128::from(n) << 96)));
    }
    if t.len() == 36
        && let Ok(u) = Uuid::parse_str(t)
    {
        return Ok(u);
    }
    Err(format!(
        "{:?} is not a Bluetooth UUID (128-bit like 8d53dc1d-1db7-4cd3-868b-8a527460aa84, \
         or 16/32-bit like fe59)",
        t.chars().take(64).collect::<String>()
    ))
}

/// A BLE link over `first`, connected again by `reconnect` when the device
/// went away (after its reset); what `reconnect` holds (the adapter's
/// connection permit) stays with the link. Both backends make theirs so.
pub(crate) fn ble_link<F, Fut>(url: &str, first: Channel, reconnect: F) -> super::Link
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Channel, super::LinkError>> + Send + 'static,
{
    let mtu = first.mtu;
    let reopener: super::Reopener = Box::new(move || {
        let again = reconnect();
        Box::pin(async move {
            again
                .await
                .map(|c| Box::new(c) as Box<dyn Transport>)
                .map_err(|e| e.to_string())
        })
    });
    super::Link::new(url.to_string(), super::LinkKind::Ble, mtu, Box::new(first))
        .with_reopener(reopener)
}

/// A request to one connection's task, from its [`Channel`].
pub(crate) enum Request {
    /// A piece of the default characteristic's byte stream.
    Write(Vec<u8>),
    GattWrite {
        uuid: Uuid,
        data: Vec<u8>,
        with_response: bool,
        reply: oneshot::Sender<Result<(), GattError>>,
    },
    GattRead {
        uuid: Uuid,
        reply: oneshot::Sender<Result<Vec<u8>, GattError>>,
    },
    Subscribe {
        uuid: Uuid,
        indicate: bool,
        reply: oneshot::Sender<Result<(), GattError>>,
    },
    Unsubscribe {
        uuid: Uuid,
        reply: oneshot::Sender<Result<(), GattError>>,
    },
}

/// The gateway's side of one BLE connection whose GATT client runs in a
/// task of its own (one per backend): the default characteristic's byte
/// stream and the other characteristics, through channels.
pub(crate) struct Channel {
    pub(crate) mtu: u32,
    pub(crate) requests: mpsc::UnboundedSender<Request>,
    pub(crate) stream: mpsc::UnboundedReceiver<Vec<u8>>,
    pub(crate) values: mpsc::UnboundedReceiver<GattValue>,
    /// The rest of a notification a read did not take.
    pub(crate) unread: Vec<u8>,
}

impl AsyncRead for Channel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.unread.is_empty() {
            match self.stream.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                // Disconnected: end of stream.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(v)) => self.unread = v,
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        self.unread.drain(..n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Channel {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = buf.len().min(self.mtu as usize);
        match self.requests.send(Request::Write(buf[..n].to_vec())) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Transport for Channel {
    fn gatt(&mut self) -> Option<&mut dyn GattLink> {
        Some(self)
    }
}

impl Channel {
    fn ask<'a, T: Send + 'a>(
        &'a mut self,
        make: impl FnOnce(oneshot::Sender<Result<T, GattError>>) -> Request,
    ) -> GattFuture<'a, T> {
        let (reply, answer) = oneshot::channel();
        let sent = self.requests.send(make(reply));
        Box::pin(async move {
            sent.map_err(|_| GattError::Closed)?;
            answer.await.map_err(|_| GattError::Closed)?
        })
    }
}

impl GattLink for Channel {
    fn write<'a>(
        &'a mut self,
        characteristic: Uuid,
        data: &'a [u8],
        with_response: bool,
    ) -> GattFuture<'a, ()> {
        let data = data.to_vec();
        self.ask(move |reply| Request::GattWrite {
            uuid: characteristic,
            data,
            with_response,
            reply,
        })
    }

    fn read(&mut self, characteristic: Uuid) -> GattFuture<'_, Vec<u8>> {
        self.ask(move |reply| Request::GattRead {
            uuid: characteristic,
            reply,
        })
    }

    fn subscribe(&mut self, characteristic: Uuid, indicate: bool) -> GattFuture<'_, ()> {
        self.ask(move |reply| Request::Subscribe {
            uuid: characteristic,
            indicate,
            reply,
        })
    }

    fn unsubscribe(&mut self, characteristic: Uuid) -> GattFuture<'_, ()> {
        self.ask(move |reply| Request::Unsubscribe {
            uuid: characteristic,
            reply,
        })
    }

    fn receive(&mut self, timeout: Duration) -> GattFuture<'_, Option<GattValue>> {
        Box::pin(async move {
            match tokio::time::timeout(timeout, self.values.recv()).await {
                Err(_) => Ok(None),
                Ok(Some(v)) => Ok(Some(v)),
                Ok(None) => Err(GattError::Closed),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_in_every_form_the_contract_allows() {
        let smp = parse_uuid("8D53DC1D-1DB7-4CD3-868B-8A527460AA84").unwrap();
        assert_eq!(smp.to_string(), "8d53dc1d-1db7-4cd3-868b-8a527460aa84");
        let dfu = parse_uuid("fe59").unwrap();
        assert_eq!(dfu.to_string(), "0000fe59-0000-1000-8000-00805f9b34fb");
        assert_eq!(parse_uuid("0xFE59").unwrap(), dfu);
        assert_eq!(parse_uuid("0000fe59").unwrap(), dfu);
        assert_eq!(
            parse_uuid("0000fe59-0000-1000-8000-00805f9b34fb").unwrap(),
            dfu
        );
        for bad in [
            "",
            "fe5",
            "fe59a",
            "zz59",
            "8d53dc1d1db74cd3868b8a527460aa84x",
            "é",
        ] {
            assert!(parse_uuid(bad).is_err(), "{bad:?}");
        }
    }
}
