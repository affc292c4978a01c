//! Free TCP ports on 127.0.0.1 that no other fixture of this test process
//! was handed, and counting the connections a listener has accepted.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

/// A loopback address with a port free right now and never handed out
/// before by this process (so parallel tests do not pick the same one).
pub fn free_addr() -> SocketAddr {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        if given.insert(addr.port()) {
            return addr;
        }
    }
}

/// An address nothing listens on (for "cannot reach" tests).
pub fn closed_addr() -> SocketAddr {
    free_addr()
}

/// TCP connections in state ESTABLISHED whose local port is `port` (the
/// server's side of the connections a listener on `port` accepted), from
/// `/proc/net/tcp` and `/proc/net/tcp6` of this network namespace.
pub fn established_connections(port: u16) -> usize {
    /// `st` of an established connection in `/proc/net/tcp`.
    const ESTABLISHED: &str = "01";
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|line| {
                    let mut fields = line.split_whitespace().skip(1);
                    let local_port = fields
                        .next()
                        .and_then(|local| local.rsplit_once(':'))
                        .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok());
                    let state = fields.nth(1);
                    local_port == Some(port) && state == Some(ESTABLISHED)
                })
                .count()
        })
        .sum()
}
