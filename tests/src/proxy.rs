//! A TCP proxy on loopback that the test controls: it forwards to one
//! target until told to cut every connection, to blackhole them (bytes stop
//! flowing both ways, sockets stay open: a host that vanished), or to slow
//! them down. Agents and CLIs are pointed at the proxy instead of the
//! controller, so a test decides what their connections go through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::net::free_addr;

/// What the proxy does with the bytes of its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Forward at once.
    Open,
    /// Forward nothing, either way, on old and new connections; hold the
    /// sockets open (no FIN, no RST) until the link is open again.
    Blackhole,
    /// Forward each read after this delay.
    Slow(Duration),
}

/// What every connection obeys.
#[derive(Clone, Copy, Debug)]
struct Rules {
    link: Link,
    /// Connections numbered below this are blackholed for good (see
    /// [`Proxy::stall_open_connections`]).
    stalled_below: u64,
}

impl Rules {
    fn holds(&self, connection: u64) -> bool {
        self.link == Link::Blackhole || connection < self.stalled_below
    }
}

struct Shared {
    target: SocketAddr,
    rules: watch::Sender<Rules>,
    /// Bumped by [`Proxy::cut`]: every open connection is reset.
    cuts: watch::Sender<u64>,
    open_connections: AtomicUsize,
    accepted: AtomicU64,
}

/// A running proxy; stops (resetting its connections) when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

/// Size of one forwarded read.
const CHUNK: usize = 64 * 1024;

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        Proxy::start_at(free_addr(), target).await
    }

    /// Listens on `addr` (e.g. a proxy restarted on the same port).
    pub async fn start_at(addr: SocketAddr, target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(addr).await.expect("bind the proxy");
        let shared = Arc::new(Shared {
            target,
            rules: watch::Sender::new(Rules {
                link: Link::Open,
                stalled_below: 0,
            }),
            cuts: watch::Sender::new(0),
            open_connections: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Proxy { addr, shared, task }
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Resets every open connection (RST); new ones are forwarded.
    pub fn cut(&self) {
        self.shared.cuts.send_modify(|cuts| *cuts += 1);
    }

    /// Sets what happens to the bytes from now on, on every connection.
    pub fn set_link(&self, link: Link) {
        self.shared.rules.send_modify(|rules| rules.link = link);
    }

    /// The link now.
    pub fn link(&self) -> Link {
        self.shared.rules.borrow().link
    }

    /// Blackholes every connection open now, for good, while new ones are
    /// forwarded: the host at the other end vanished, and new connections
    /// reach a live one (a load balancer, or the same controller after a
    /// network outage on one path).
    pub fn stall_open_connections(&self) {
        let accepted = self.accepted();
        self.shared
            .rules
            .send_modify(|rules| rules.stalled_below = accepted);
    }

    /// Connections forwarded (or held) right now.
    pub fn open_connections(&self) -> usize {
        self.shared.open_connections.load(Ordering::Relaxed)
    }

    /// Connections accepted since the proxy started.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Reset what is open, then stop accepting.
        self.cut();
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let number = shared.accepted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(client, number, Arc::clone(&shared)));
    }
}

/// Counts an open connection while alive.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(client: TcpStream, number: u64, shared: Arc<Shared>) {
    shared.open_connections.fetch_add(1, Ordering::Relaxed);
    let _guard = OpenGuard(Arc::clone(&shared));
    let mut cuts = shared.cuts.subscribe();
    cuts.mark_unchanged();
    // A blackholed host does not answer a connection either: hold the
    // client until the link opens (or the connection is cut).
    let mut rules = shared.rules.subscribe();
    tokio::select! {
        _ = rules.wait_for(|rules| !rules.holds(number)) => {}
        _ = cuts.changed() => {
            reset(client);
            return;
        }
    }
    let Ok(server) = TcpStream::connect(shared.target).await else {
        // The target is down: refuse, as it would.
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let upstream = pump(client_read, server_write, number, shared.rules.subscribe());
    let downstream = pump(server_read, client_write, number, shared.rules.subscribe());
    tokio::select! {
        _ = async { tokio::join!(upstream, downstream) } => {}
        _ = cuts.changed() => {
            // Dropping the pumps drops the sockets; SO_LINGER 0 was set on
            // both, so the peers see a reset rather than an orderly close.
        }
    }
}

/// Sends RST: linger zero, then close.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Copies `from` to `to` as the link allows; returns when either side
/// closes. Half-closes are forwarded (shutdown of the write side).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    number: u64,
    mut rules: watch::Receiver<Rules>,
) {
    // Reset rather than FIN when the pump is dropped by a cut.
    let _ = from.as_ref().set_zero_linger();
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(read) => read,
        };
        // Hold the bytes while blackholed; delay them while slow.
        let Ok(current) = rules
            .wait_for(|rules| !rules.holds(number))
            .await
            .map(|r| *r)
        else {
            return;
        };
        if let Link::Slow(delay) = current.link {
            tokio::time::sleep(delay).await;
            if rules.wait_for(|rules| !rules.holds(number)).await.is_err() {
                return;
            }
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
