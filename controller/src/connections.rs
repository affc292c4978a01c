//! The servers' connections, counted and cut when a graceful stop runs out
//! of time.
//!
//! tonic's and axum's graceful stops wait for every connection to close,
//! without a limit: a peer that stays connected but does not read (its
//! HTTP/2 flow-control window full, a response stuck in a full socket) or
//! never finishes a request would keep the controller's stop open for good.
//! Every accepted connection is wrapped in [`Tracked`]; once the grace is
//! over, [`Connections::cut`] makes each of them fail its next read or
//! write, which ends its connection task.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// After the shutdown signal, in-flight requests and streams get this long
/// to finish (log tails and agent sessions end at once on shutdown, so
/// this is for requests under way and peers that read slowly); then every
/// connection still open is cut. As long as the agent's `--kill-grace`
/// default: an agent stopping its jobs is given that much too.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// The connections of one controller's servers.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    open: Arc<AtomicUsize>,
    cut: CancellationToken,
}

impl Connections {
    /// Counts `io` as open until it is dropped, and lets [`Connections::cut`]
    /// end it.
    pub fn track<Io>(&self, io: Io) -> Tracked<Io> {
        self.open.fetch_add(1, Ordering::AcqRel);
        Tracked {
            io,
            cut: self.cut.clone(),
            cut_wait: Box::pin(self.cut.clone().cancelled_owned()),
            open: Arc::clone(&self.open),
        }
    }

    /// [`Connections::track`] on every connection of `incoming` (tonic's
    /// accept stream).
    pub fn track_incoming<Io>(
        &self,
        incoming: impl Stream<Item = io::Result<Io>> + Send + 'static,
    ) -> impl Stream<Item = io::Result<Tracked<Io>>> + Send + 'static {
        let connections = self.clone();
        incoming.map(move |io| io.map(|io| connections.track(io)))
    }

    /// Connections accepted and not yet closed.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Cuts every connection (present and future); returns how many were
    /// open.
    pub fn cut(&self) -> usize {
        let open = self.open();
        self.cut.cancel();
        open
    }
}

/// An accepted connection that fails every read and write once cut.
#[derive(Debug)]
pub struct Tracked<Io> {
    io: Io,
    cut: CancellationToken,
    /// Polled by every read and write, so a cut wakes a connection task
    /// that waits on a socket nothing will ever make ready.
    cut_wait: Pin<Box<WaitForCancellationFutureOwned>>,
    open: Arc<AtomicUsize>,
}

impl<Io> Drop for Tracked<Io> {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<Io> Tracked<Io> {
    fn check_cut(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.cut.is_cancelled() || self.cut_wait.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the controller is stopping and its grace is over",
            ));
        }
        Ok(())
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Tracked<Io> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_cut(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Tracked<Io> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_cut(cx)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_cut(cx)?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_cut(cx)?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_cut(cx)?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<Io: tonic::transport::server::Connected> tonic::transport::server::Connected for Tracked<Io> {
    type ConnectInfo = Io::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// An axum listener whose connections are [`Tracked`].
pub struct TrackedListener<L> {
    pub inner: L,
    pub connections: Connections,
}

impl<L> axum::serve::Listener for TrackedListener<L>
where
    L: axum::serve::Listener,
{
    type Io = Tracked<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        (self.connections.track(io), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
