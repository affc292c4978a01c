//! Free TCP ports on 127.0.0.1 that no other fixture of this test process
//! was handed.

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
