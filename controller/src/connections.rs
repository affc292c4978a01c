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
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
            permit: None,
        }
    }

    /// [`Connections::track`] on every connection of `incoming` (tonic's
    /// accept stream), holding at most `max_connections` open: past it, the
    /// next connection is not accepted until one closes.
    pub fn track_incoming<Io>(
        &self,
        incoming: impl Stream<Item = io::Result<Io>> + Send + 'static,
        max_connections: usize,
    ) -> impl Stream<Item = io::Result<Tracked<Io>>> + Send + 'static
    where
        Io: Send + 'static,
    {
        let permits = Arc::new(Semaphore::new(max_connections));
        let state = (Box::pin(incoming), permits, self.clone());
        futures_util::stream::unfold(
            state,
            move |(mut incoming, permits, connections)| async move {
                let permit = match Arc::clone(&permits).try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        tracing::warn!(
                            max_connections,
                            "a gRPC listener is at its connection limit; new connections wait"
                        );
                        Arc::clone(&permits).acquire_owned().await.ok()?
                    }
                };
                let accepted = incoming.next().await?.map(|io| {
                    let mut tracked = connections.track(io);
                    tracked.permit = Some(permit);
                    tracked
                });
                Some((accepted, (incoming, permits, connections)))
            },
        )
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
    /// The listener's connection-limit slot this connection holds.
    permit: Option<OwnedSemaphorePermit>,
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

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::pin::pin;

    use super::*;

    #[tokio::test]
    async fn a_listener_at_its_limit_accepts_the_next_connection_once_one_closes() {
        let connections = Connections::default();
        let incoming = futures_util::stream::iter((0..3).map(io::Result::Ok));
        let mut accepted = pin!(connections.track_incoming(incoming, 2));
        let first = accepted.next().await.unwrap().unwrap();
        let _second = accepted.next().await.unwrap().unwrap();
        assert_eq!(connections.open(), 2);
        // A third is waiting, and is not taken while two are open.
        let waiting = poll_fn(|cx| Poll::Ready(accepted.as_mut().poll_next(cx).is_pending())).await;
        assert!(waiting, "a third connection is not accepted past the limit");
        drop(first);
        let third = accepted.next().await.unwrap().unwrap();
        assert_eq!(third.io, 2);
        assert_eq!(connections.open(), 2);
    }
}
