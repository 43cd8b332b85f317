//! systemd's notification protocol (`sd_notify(3)`), for `Type=notify` units: one
//! datagram per state change to the socket named by `$NOTIFY_SOCKET`. Without the
//! variable (lbd not started by systemd) every call does nothing.

use std::{os::unix::net::UnixDatagram, time::Duration};

/// Sends `state` (e.g. "READY=1", "WATCHDOG=1", "STOPPING=1"); false if there is no
/// notification socket or the send failed (systemd then acts on its own timeouts).
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket: '@' stands for the leading NUL byte.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    sent.is_ok()
}

/// How often to send WATCHDOG=1: half the unit's `WatchdogSec` (`$WATCHDOG_USEC`), if
/// the watchdog is meant for this process (`$WATCHDOG_PID`, when set, is our pid).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim() != std::process::id().to_string() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
