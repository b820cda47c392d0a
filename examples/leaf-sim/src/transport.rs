//! Links a simulated device is reachable on: a real pseudo-terminal ([`PtySim`], the gateway
//! opens its slave path like any serial port) and a TCP port ([`TcpSim`], like a ser2net serial
//! device server in raw mode). Each runs one [`Device`] (the XMODEM bootloader of
//! [`crate::xmodem`], the SMP device of [`crate::smp`] or the STM32 ROM bootloader of
//! [`crate::stm32`]) in one tokio task that stops on
//! [`PtySim::shutdown`] / [`TcpSim::shutdown`] or when the value is dropped.
//!
//! This module moves bytes and owns link lifetimes; it holds no protocol logic. It needs a
//! tokio runtime (with I/O and time enabled) to construct.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use rustix::fs::{Mode, OFlags};
use rustix::pty::OpenptFlags;
use rustix::termios::OptionalActions;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::pipe;
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::smp::{SmpHandle, SmpSimConfig};
use crate::stm32::{Stm32Handle, Stm32SimConfig};
use crate::xmodem::{SimHandle, XmodemSimConfig};

/// How a device session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The peer closed the link (end of file).
    PeerClosed,
    /// Reading or writing the link failed.
    LinkError(io::Error),
    /// A `disconnect_after` fault: the device wants the link closed now.
    Disconnected,
    /// The device reset and its link went with it (the SMP device with raw framing, as a
    /// Bluetooth LE peripheral drops its connection when it reboots). The device listens again.
    Reset,
    /// The cancellation token fired.
    Shutdown,
}

/// Tells how many bytes the device wrote earlier that the peer has not read yet.
pub type UnreadProbe = dyn Fn() -> usize + Send + Sync;

/// A simulated device the transports can run: the handle of its shared state (cheap to clone,
/// all clones are one device) and its session logic over any byte stream. The device's state
/// outlives sessions: a pty runs one session for its life, TCP one per connection.
pub trait Device: Clone + Send + Sync + fmt::Debug + 'static {
    /// Serves one session on `io` until the link closes, the device wants it closed or
    /// `cancel` fires. `unread`, where the link can tell, says how many bytes the peer has not
    /// read yet.
    fn serve_session<S>(
        &self,
        io: S,
        cancel: &CancellationToken,
        unread: Option<&UnreadProbe>,
    ) -> impl Future<Output = SessionEnd> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send;

    /// How often the pty transport clears a stale exclusive flag (see [`PtySim`]).
    fn housekeeping_interval(&self) -> Duration;
}

impl Device for SimHandle {
    fn serve_session<S>(
        &self,
        io: S,
        cancel: &CancellationToken,
        unread: Option<&UnreadProbe>,
    ) -> impl Future<Output = SessionEnd> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        crate::xmodem::device_serve_with(self, io, cancel, unread)
    }

    fn housekeeping_interval(&self) -> Duration {
        self.config().poll_interval
    }
}

impl Device for SmpHandle {
    fn serve_session<S>(
        &self,
        io: S,
        cancel: &CancellationToken,
        _unread: Option<&UnreadProbe>,
    ) -> impl Future<Output = SessionEnd> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        crate::smp::serve(self, io, cancel)
    }

    fn housekeeping_interval(&self) -> Duration {
        Duration::from_millis(500)
    }
}

impl Device for Stm32Handle {
    fn serve_session<S>(
        &self,
        io: S,
        cancel: &CancellationToken,
        _unread: Option<&UnreadProbe>,
    ) -> impl Future<Output = SessionEnd> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        crate::stm32::serve(self, io, cancel)
    }

    fn housekeeping_interval(&self) -> Duration {
        Duration::from_millis(500)
    }
}

/// The task of a running simulator and how to stop it.
#[derive(Debug)]
struct Running<D> {
    device: D,
    cancel: CancellationToken,
    /// Cancelled when the task has ended (shutdown, or the link died).
    ended: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl<D: Device> Running<D> {
    fn spawn<F>(device: D, run: impl FnOnce(D, CancellationToken) -> F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cancel = CancellationToken::new();
        let ended = CancellationToken::new();
        let fut = run(device.clone(), cancel.clone());
        let guard = ended.clone().drop_guard();
        let task = tokio::spawn(async move {
            let _guard = guard;
            fut.await;
        });
        Self {
            device,
            cancel,
            ended,
            task: Some(task),
        }
    }

    async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            // A panic of the device task is reported here rather than lost.
            if let Err(e) = task.await
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

impl<D> Drop for Running<D> {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A device on a pseudo-terminal. The device owns the master side; [`PtySim::path`] is the
/// slave, which any number of openers (one at a time, as with a real port) can open, close and
/// open again.
///
/// The pty is set raw (8 bit, no echo, no CR/NL translation). The simulator keeps one slave
/// descriptor of its own open for its whole life, never reads it and never sets it exclusive:
/// without it the master reads EIO whenever no one has the slave open. Because that keeps the
/// tty alive, an exclusive flag (TIOCEXCL) left by an opener that died without clearing it would
/// lock out every later opener but root; the simulator clears it whenever bytes arrive and
/// every `poll_interval`.
///
/// `D` is the device: [`SimHandle`] (XMODEM, [`PtySim::spawn`]), [`SmpHandle`] (SMP,
/// [`PtySim::spawn_smp`]) or [`Stm32Handle`] (STM32 bootloader, [`PtySim::spawn_stm32`]).
#[derive(Debug)]
pub struct PtySim<D = SimHandle> {
    path: PathBuf,
    running: Running<D>,
}

impl PtySim<SimHandle> {
    /// Opens a pty pair and runs an XMODEM device with `config` on its master side.
    pub fn spawn(config: XmodemSimConfig) -> io::Result<Self> {
        Self::spawn_device(SimHandle::new(config))
    }
}

impl PtySim<SmpHandle> {
    /// Opens a pty pair and runs an SMP device with `config` on its master side. Fails with
    /// `InvalidInput` when the configuration is invalid (e.g. a malformed version).
    pub fn spawn_smp(config: SmpSimConfig) -> io::Result<Self> {
        let device =
            SmpHandle::new(config).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Self::spawn_device(device)
    }
}

impl PtySim<Stm32Handle> {
    /// Opens a pty pair and runs an STM32 ROM bootloader with `config` on its master side
    /// (8N1: a pty cannot do the real part's even parity). Fails with `InvalidInput` when the
    /// configuration is invalid.
    pub fn spawn_stm32(config: Stm32SimConfig) -> io::Result<Self> {
        let device =
            Stm32Handle::new(config).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Self::spawn_device(device)
    }
}

impl<D: Device> PtySim<D> {
    /// Opens a pty pair and runs `device` on its master side.
    pub fn spawn_device(device: D) -> io::Result<Self> {
        let master =
            rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
        rustix::pty::grantpt(&master)?;
        rustix::pty::unlockpt(&master)?;
        let name = rustix::pty::ptsname(&master, Vec::new())?;
        let path = PathBuf::from(OsString::from_vec(name.into_bytes()));
        let slave = rustix::fs::open(
            &path,
            OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )?;
        let mut termios = rustix::termios::tcgetattr(&slave)?;
        termios.make_raw();
        rustix::termios::tcsetattr(&slave, OptionalActions::Now, &termios)?;
        rustix::fs::fcntl_setfl(
            &master,
            rustix::fs::fcntl_getfl(&master)? | OFlags::NONBLOCK,
        )?;
        let slave = Arc::new(slave);
        let link = PtyMaster::new(master, Arc::clone(&slave))?;
        let exclusive_holder = Arc::clone(&slave);
        let poll_interval = device.housekeeping_interval();
        let log_path = path.display().to_string();
        let running = Running::spawn(device, move |device, cancel| async move {
            let unread = move || {
                rustix::io::ioctl_fionread(&*slave)
                    .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX))
            };
            let serve = device.serve_session(link, &cancel, Some(&unread));
            let end = tokio::select! {
                end = serve => end,
                never = clear_exclusive(&exclusive_holder, poll_interval) => match never {},
            };
            // `link` (the master) and the held slave are closed here.
            tracing::info!(pty = %log_path, ?end, "pty device stopped");
        });
        tracing::info!(pty = %path.display(), "pty device started");
        Ok(Self { path, running })
    }

    /// The slave device path, e.g. `/dev/pts/7`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The link URL the gateway's config takes, e.g. `serial:///dev/pts/7`.
    pub fn url(&self) -> String {
        format!("serial://{}", self.path.display())
    }

    /// What tests observe of the device.
    pub fn handle(&self) -> &D {
        &self.running.device
    }

    /// Whether the device has stopped (a `disconnect_after` fault closed the master, the link
    /// failed, or it was shut down).
    pub fn is_dead(&self) -> bool {
        self.running.ended.is_cancelled()
    }

    /// Waits until the device has stopped (see [`PtySim::is_dead`]).
    pub async fn dead(&self) {
        self.running.ended.cancelled().await;
    }

    /// Stops the device and closes the pty.
    pub async fn shutdown(self) {
        self.running.shutdown().await;
    }
}

/// Clears a stale exclusive flag on the slave now and then, for openers that set it and closed
/// the port without sending a byte (see [`PtySim`]).
async fn clear_exclusive(slave: &OwnedFd, every: Duration) -> std::convert::Infallible {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let _ = rustix::termios::ioctl_tiocnxcl(slave);
    }
}

/// The master side of the pty as an async byte stream: two descriptors of the master, one
/// registered for reading and one for writing (tokio's pipe types drive any non-blocking fd).
struct PtyMaster {
    reader: pipe::Receiver,
    writer: pipe::Sender,
    slave: Arc<OwnedFd>,
}

impl PtyMaster {
    fn new(master: OwnedFd, slave: Arc<OwnedFd>) -> io::Result<Self> {
        let writer = pipe::Sender::from_owned_fd_unchecked(master.try_clone()?)?;
        let reader = pipe::Receiver::from_owned_fd_unchecked(master)?;
        Ok(Self {
            reader,
            writer,
            slave,
        })
    }
}

impl AsyncRead for PtyMaster {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match ready!(Pin::new(&mut self.reader).poll_read(cx, buf)) {
            Ok(()) => {
                if buf.filled().len() > before {
                    // See `PtySim`: a stale exclusive flag must not lock out the next opener.
                    let _ = rustix::termios::ioctl_tiocnxcl(&*self.slave);
                }
                Poll::Ready(Ok(()))
            }
            // The slave side hung up: end of file.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => {
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for PtyMaster {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A device behind a TCP port, like a serial device server in raw mode: each accepted
/// connection is one device session, one at a time (later connections wait in the backlog).
/// The device's one-shot faults and version persist across connections; each connection starts
/// in application mode (or the bootloader when there is no enter command).
///
/// For the SMP device with console framing a reset does not close the connection (the device
/// server stays up while the device behind it reboots); with raw framing (the Bluetooth LE
/// form) it does, and the next connection is accepted once the device has booted.
#[derive(Debug)]
pub struct TcpSim<D = SimHandle> {
    local_addr: SocketAddr,
    running: Running<D>,
}

impl TcpSim<SimHandle> {
    /// Binds `addr` (e.g. `127.0.0.1:0`) and serves an XMODEM device with `config` there.
    pub async fn bind(addr: impl ToSocketAddrs, config: XmodemSimConfig) -> io::Result<Self> {
        Self::from_listener(TcpListener::bind(addr).await?, config)
    }

    /// Serves an XMODEM device with `config` on an already bound listener.
    pub fn from_listener(listener: TcpListener, config: XmodemSimConfig) -> io::Result<Self> {
        Self::serve_device(listener, SimHandle::new(config))
    }
}

impl TcpSim<SmpHandle> {
    /// Binds `addr` (e.g. `127.0.0.1:0`) and serves an SMP device with `config` there.
    pub async fn bind_smp(addr: impl ToSocketAddrs, config: SmpSimConfig) -> io::Result<Self> {
        let device =
            SmpHandle::new(config).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Self::serve_device(TcpListener::bind(addr).await?, device)
    }
}

impl TcpSim<Stm32Handle> {
    /// Binds `addr` (e.g. `127.0.0.1:0`) and serves an STM32 ROM bootloader with `config`
    /// there. The part's state (sync, flash, faults) persists across connections; a command
    /// cut off by a closed connection is dropped.
    pub async fn bind_stm32(addr: impl ToSocketAddrs, config: Stm32SimConfig) -> io::Result<Self> {
        let device =
            Stm32Handle::new(config).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Self::serve_device(TcpListener::bind(addr).await?, device)
    }
}

impl<D: Device> TcpSim<D> {
    /// Serves `device` on an already bound listener.
    pub fn serve_device(listener: TcpListener, device: D) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let running = Running::spawn(device, move |device, cancel| async move {
            loop {
                let accepted = tokio::select! {
                    () = cancel.cancelled() => break,
                    r = listener.accept() => r,
                };
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                tracing::info!(%peer, "tcp device session started");
                let end = device.serve_session(stream, &cancel, None).await;
                tracing::info!(%peer, ?end, "tcp device session ended");
                if matches!(end, SessionEnd::Shutdown) {
                    break;
                }
            }
        });
        tracing::info!(%local_addr, "tcp device listening");
        Ok(Self {
            local_addr,
            running,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The link URL the gateway's config takes, e.g. `tcp://127.0.0.1:4001`.
    pub fn url(&self) -> String {
        format!("tcp://{}", self.local_addr)
    }

    /// What tests observe of the device.
    pub fn handle(&self) -> &D {
        &self.running.device
    }

    /// Stops listening and ends the current session.
    pub async fn shutdown(self) {
        self.running.shutdown().await;
    }
}
