//! systemd's readiness protocol (`sd_notify`): a unit with `Type=notify`
//! learns that the service is ready, or stopping, from a datagram on the
//! socket named by `NOTIFY_SOCKET` (each binary's config reads it). Outside
//! such a unit there is no socket and [`ServiceManager::notify`] does
//! nothing, so the binaries call it unconditionally.
//! A failure to notify is the caller's to log: readiness is a courtesy to
//! systemd, never a reason to stop serving.

use std::os::unix::net::UnixDatagram;

/// The service is up and serving (`READY=1`).
pub const READY: &str = "READY=1";
/// The service began shutting down (`STOPPING=1`).
pub const STOPPING: &str = "STOPPING=1";

/// The service manager a binary was started by, if it listens.
#[derive(Debug, Clone, Default)]
pub struct ServiceManager {
    socket: Option<std::ffi::OsString>,
}

impl ServiceManager {
    /// The manager listening on `socket` (the value of `NOTIFY_SOCKET`), or
    /// none.
    pub fn new(socket: Option<std::ffi::OsString>) -> ServiceManager {
        ServiceManager {
            socket: socket.filter(|socket| !socket.is_empty()),
        }
    }

    /// Sends `state` (one or more `KEY=value` lines), if a manager listens.
    ///
    /// # Errors
    /// When the socket cannot be reached.
    pub fn notify(&self, state: &str) -> std::io::Result<()> {
        match &self.socket {
            Some(socket) => send(socket, state),
            None => Ok(()),
        }
    }
}

/// `STATUS=<text>`: one line for `systemctl status`, newlines removed.
pub fn status_line(text: &str) -> String {
    format!("STATUS={}", text.replace('\n', " "))
}

fn send(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let datagram = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    // A leading '@' names a socket in the abstract namespace.
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        datagram.send_to_addr(state.as_bytes(), &address)?;
    } else {
        datagram.send_to(state.as_bytes(), socket)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_socket_receives_the_state() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).expect("bind");
        send(path.as_os_str(), READY).expect("send");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn an_abstract_socket_receives_the_state() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("hobotnica-notify-test-{}", std::process::id());
        let address =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let receiver = UnixDatagram::bind_addr(&address).expect("bind");
        send(std::ffi::OsStr::new(&format!("@{name}")), STOPPING).expect("send");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
