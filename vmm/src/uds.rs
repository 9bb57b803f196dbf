//! Hybrid vsock over Unix sockets for long-running VMs (`mu2 run --vsock-uds PATH`), in the
//! convention Firecracker users know:
//!
//! - host-initiated: a program connects to `PATH` and writes `CONNECT <port>\n`; once the
//!   guest accepts the vsock connection it reads `OK <host-port>\n`, then the socket carries
//!   the stream both ways. A refused connection closes the socket without an `OK`;
//! - guest-initiated: a guest connection to host port `P` is forwarded to a Unix socket
//!   listening at `PATH_P` (ports are listened on for the `PATH_P` sockets that exist; the
//!   directory is looked at again every [`RESCAN`]);
//! - a fork of an image uses [`fork_path`], so each fork gets a path of its own.
//!
//! Event dispatch uses `event-manager`: the listening socket and each forwarded connection are
//! subscribers that move bytes between their socket and their buffers; between two runs of
//! the VM, [`Bridge::pump`] moves bytes between those buffers and the vsock host endpoint.
//! Half-closes travel both ways (socket EOF ⇒ vsock SHUTDOWN(send), guest end of stream ⇒
//! `shutdown(Write)` on the socket).

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps};
use mu2_devices::virtio::vsock::{CloseReason, ConnId, ConnPhase, HostEndpoint};

use crate::vm::{GuestError, RunStop, Vm};

/// How often the directory is looked at for new `PATH_P` sockets.
pub const RESCAN: Duration = Duration::from_millis(250);
/// Bytes buffered per direction per connection before the bridge stops reading (back
/// pressure instead of unbounded memory).
const BUFFER_LIMIT: usize = 256 << 10;
/// Longest `CONNECT <port>\n` line.
const MAX_HANDSHAKE: usize = 64;

/// Why the bridge failed.
#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    /// A socket could not be set up.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The event loop failed.
    #[error("the event loop")]
    Events(#[source] event_manager::Error),
    /// The guest failed.
    #[error(transparent)]
    Guest(#[from] GuestError),
}

/// The socket path of the fork `vm_id` of an image whose VMs use `base`.
pub fn fork_path(base: &Path, vm_id: u64) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!(".{vm_id}"));
    PathBuf::from(s)
}

/// The socket a guest connection to host port `port` is forwarded to.
pub fn port_path(base: &Path, port: u32) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// A connection's place in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the `CONNECT <port>` line.
    Handshake,
    /// Waiting for the guest to accept; `OK` follows.
    Connecting(ConnId),
    /// Carrying bytes.
    Bridged(ConnId),
}

/// One forwarded connection.
#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    phase: Phase,
    /// Socket → guest bytes not yet handed to the vsock endpoint (or the handshake line).
    inbound: Vec<u8>,
    /// Guest → socket bytes not yet written.
    outbound: Vec<u8>,
    /// The socket peer will send nothing more.
    socket_eof: bool,
    /// SHUTDOWN(send) went to the guest.
    eof_to_guest: bool,
    /// The socket's write side was shut down (the guest's end of stream).
    eof_to_socket: bool,
    /// The socket failed or the connection ended: remove it.
    done: bool,
    interest: EventSet,
}

impl Conn {
    fn new(stream: UnixStream, phase: Phase) -> Self {
        Conn {
            stream,
            phase,
            inbound: Vec::new(),
            outbound: Vec::new(),
            socket_eof: false,
            eof_to_guest: false,
            eof_to_socket: false,
            done: false,
            interest: EventSet::empty(),
        }
    }

    fn wanted(&self) -> EventSet {
        let mut set = EventSet::empty();
        let reading = match self.phase {
            Phase::Handshake => self.inbound.len() < MAX_HANDSHAKE,
            Phase::Connecting(_) => false,
            Phase::Bridged(_) => self.inbound.len() < BUFFER_LIMIT,
        };
        if reading && !self.socket_eof && !self.done {
            set |= EventSet::IN;
        }
        if !self.outbound.is_empty() && !self.done {
            set |= EventSet::OUT;
        }
        set
    }

    fn read_socket(&mut self) {
        let mut chunk = [0u8; 16 << 10];
        while self.wanted().contains(EventSet::IN) {
            match self.stream.read(&mut chunk) {
                Ok(0) => self.socket_eof = true,
                Ok(n) => self.inbound.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.done = true;
                    break;
                }
            }
        }
    }

    fn write_socket(&mut self) {
        while !self.outbound.is_empty() {
            match self.stream.write(&self.outbound) {
                Ok(0) => {
                    self.done = true;
                    break;
                }
                Ok(n) => {
                    self.outbound.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.done = true;
                    break;
                }
            }
        }
    }
}

/// An event-manager subscriber: the listening socket or one connection.
#[derive(Debug)]
enum Endpoint {
    Listener { listener: UnixListener, accepted: Vec<UnixStream> },
    Conn(Box<Conn>),
}

impl Endpoint {
    fn fd(&self) -> i32 {
        match self {
            Endpoint::Listener { listener, .. } => listener.as_raw_fd(),
            Endpoint::Conn(c) => c.stream.as_raw_fd(),
        }
    }

    /// Brings the epoll interest in line with what the connection wants now.
    fn sync_interest(&mut self, ops: &mut EventOps) {
        let fd = self.fd();
        if let Endpoint::Conn(c) = self {
            let wanted = c.wanted();
            if wanted != c.interest && ops.modify(Events::new_raw(fd, wanted)).is_ok() {
                c.interest = wanted;
            }
        }
    }
}

impl MutEventSubscriber for Endpoint {
    fn init(&mut self, ops: &mut EventOps) {
        let fd = self.fd();
        let set = match self {
            Endpoint::Listener { .. } => EventSet::IN,
            Endpoint::Conn(c) => {
                c.interest = c.wanted();
                c.interest
            }
        };
        if let Err(e) = ops.add(Events::new_raw(fd, set)) {
            log::warn!("vsock-uds: watching fd {fd}: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self {
            Endpoint::Listener { listener, accepted } => loop {
                match listener.accept() {
                    Ok((stream, _)) => accepted.push(stream),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            },
            Endpoint::Conn(c) => {
                let set = events.event_set();
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
                    c.read_socket();
                }
                if set.contains(EventSet::OUT) {
                    c.write_socket();
                }
                if set.contains(EventSet::ERROR) || (set.contains(EventSet::HANG_UP) && c.socket_eof) {
                    c.done = c.done || set.contains(EventSet::ERROR) || c.eof_to_socket;
                }
            }
        }
        self.sync_interest(ops);
    }
}

/// The Unix-socket side of one VM's vsock device.
pub struct Bridge {
    em: EventManager<Endpoint>,
    listener: SubscriberId,
    conns: Vec<SubscriberId>,
    base: PathBuf,
    listened: BTreeSet<u32>,
    last_scan: Option<Instant>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge").field("base", &self.base).field("conns", &self.conns.len()).finish_non_exhaustive()
    }
}

impl Bridge {
    /// Listens on `base` (a stale socket file there is replaced).
    pub fn new(base: &Path) -> Result<Bridge, UdsError> {
        let io = |what| move |source| UdsError::Io { what, path: base.to_path_buf(), source };
        if base.exists() {
            std::fs::remove_file(base).map_err(io("removing the old socket"))?;
        }
        let listener = UnixListener::bind(base).map_err(io("binding"))?;
        listener.set_nonblocking(true).map_err(io("configuring"))?;
        let mut em = EventManager::new().map_err(UdsError::Events)?;
        let listener = em.add_subscriber(Endpoint::Listener { listener, accepted: Vec::new() });
        Ok(Bridge {
            em,
            listener,
            conns: Vec::new(),
            base: base.to_path_buf(),
            listened: BTreeSet::new(),
            last_scan: None,
        })
    }

    fn add(&mut self, conn: Conn) {
        if conn.stream.set_nonblocking(true).is_err() {
            return;
        }
        let id = self.em.add_subscriber(Endpoint::Conn(Box::new(conn)));
        self.conns.push(id);
    }

    /// Listens on the vsock ports for which a `PATH_P` socket exists.
    fn scan(&mut self, vsock: &mut HostEndpoint) {
        if self.last_scan.is_some_and(|t| t.elapsed() < RESCAN) {
            return;
        }
        self.last_scan = Some(Instant::now());
        let (Some(dir), Some(name)) = (self.base.parent(), self.base.file_name()) else { return };
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        let prefix = format!("{}_", name.to_string_lossy());
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.filter_map(Result::ok) {
            let file = entry.file_name();
            let port = file.to_string_lossy().strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok());
            if let Some(port) = port {
                if self.listened.insert(port) {
                    vsock.listen(port);
                }
            }
        }
    }

    /// Moves bytes between the connections and the vsock endpoint, takes new connections
    /// from both sides. Returns whether anything went to the guest (the VM should run).
    pub fn pump(&mut self, vsock: &mut HostEndpoint, credit: u32) -> bool {
        let mut to_guest = false;
        // New host-side connections.
        let accepted = match self.em.subscriber_mut(self.listener) {
            Ok(Endpoint::Listener { accepted, .. }) => std::mem::take(accepted),
            _ => Vec::new(),
        };
        for stream in accepted {
            self.add(Conn::new(stream, Phase::Handshake));
        }
        // New guest-side connections.
        self.scan(vsock);
        while let Some((id, port)) = vsock.accept() {
            match UnixStream::connect(port_path(&self.base, port)) {
                Ok(stream) => self.add(Conn::new(stream, Phase::Bridged(id))),
                Err(e) => {
                    log::info!("vsock-uds: guest connection to port {port} not forwarded: {e}");
                    vsock.abort(id);
                    to_guest = true;
                }
            }
        }
        let mut finished = Vec::new();
        for sub in self.conns.clone() {
            let Ok(Endpoint::Conn(c)) = self.em.subscriber_mut(sub) else { continue };
            to_guest |= pump_conn(c, vsock, credit);
            if c.done {
                finished.push(sub);
            }
            self.sync(sub);
        }
        for sub in finished {
            self.conns.retain(|s| *s != sub);
            if let Ok(Endpoint::Conn(c)) = self.em.remove_subscriber(sub) {
                if let Phase::Connecting(id) | Phase::Bridged(id) = c.phase {
                    vsock.remove(id);
                    to_guest = true;
                }
            }
        }
        to_guest
    }

    fn sync(&mut self, sub: SubscriberId) {
        let wanted = match self.em.subscriber_mut(sub) {
            Ok(Endpoint::Conn(c)) => (c.wanted(), c.interest, c.stream.as_raw_fd()),
            _ => return,
        };
        let (wanted, current, fd) = wanted;
        if wanted == current {
            return;
        }
        let ok = self.em.event_ops(sub).is_ok_and(|ops| ops.modify(Events::new_raw(fd, wanted)).is_ok());
        if ok {
            if let Ok(Endpoint::Conn(c)) = self.em.subscriber_mut(sub) {
                c.interest = wanted;
            }
        }
    }

    /// Waits up to `timeout` for socket events and handles them.
    pub fn wait(&mut self, timeout: Duration) -> Result<(), UdsError> {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        self.em.run_with_timeout(ms).map(drop).map_err(UdsError::Events)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.base);
    }
}

/// One connection's exchange with the vsock endpoint. Returns whether the guest has news.
fn pump_conn(c: &mut Conn, vsock: &mut HostEndpoint, credit: u32) -> bool {
    let mut to_guest = false;
    if c.phase == Phase::Handshake {
        if let Some(end) = c.inbound.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = c.inbound.drain(..=end).collect();
            let port = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.trim().strip_prefix("CONNECT "))
                .and_then(|p| p.trim().parse::<u32>().ok());
            match port.map(|p| vsock.connect(p, credit)) {
                Some(Ok(id)) => {
                    c.phase = Phase::Connecting(id);
                    to_guest = true;
                }
                _ => c.done = true,
            }
        } else if c.inbound.len() >= MAX_HANDSHAKE || c.socket_eof {
            c.done = true;
        }
    }
    if let Phase::Connecting(id) = c.phase {
        match vsock.state(id).map(|s| (s.phase, s.host_port)) {
            Some((ConnPhase::Established, host_port)) => {
                c.outbound.extend_from_slice(format!("OK {host_port}\n").as_bytes());
                c.phase = Phase::Bridged(id);
            }
            Some((ConnPhase::Connecting, _)) => {}
            _ => c.done = true,
        }
    }
    if let Phase::Bridged(id) = c.phase {
        let Some(state) = vsock.state(id) else {
            c.done = true;
            return to_guest;
        };
        if !c.inbound.is_empty() && state.unsent < BUFFER_LIMIT && !state.guest_recv_closed {
            if vsock.send(id, &c.inbound).is_ok() {
                to_guest = true;
            }
            c.inbound.clear();
        }
        if c.socket_eof && c.inbound.is_empty() && !c.eof_to_guest {
            let _ = vsock.shutdown_send(id);
            c.eof_to_guest = true;
            to_guest = true;
        }
        if c.outbound.len() < BUFFER_LIMIT && vsock.recv(id, &mut c.outbound).is_ok_and(|n| n > 0) {
            // Receiving frees guest credit: the device may owe it a CREDIT_UPDATE.
            to_guest = true;
        }
        c.write_socket();
        let state = vsock.state(id);
        let guest_done = state.is_none_or(|s| s.guest_eof && s.readable == 0);
        if guest_done && c.outbound.is_empty() && !c.eof_to_socket {
            let _ = c.stream.shutdown(Shutdown::Write);
            c.eof_to_socket = true;
        }
        let closed = state.is_none_or(|s| matches!(s.phase, ConnPhase::Closed(_)));
        let reset = state.is_some_and(|s| {
            matches!(
                s.phase,
                ConnPhase::Closed(CloseReason::GuestReset | CloseReason::ProtocolError | CloseReason::Refused)
            )
        });
        if (c.eof_to_socket && (c.socket_eof || closed)) || (reset && c.outbound.is_empty()) {
            c.done = true;
        }
    }
    to_guest
}

/// Runs `vm` with its vsock device bridged to Unix sockets at `base` until the guest exits
/// (its exit code) or fails, or `deadline` passes.
pub fn run(vm: &mut Vm, base: &Path, deadline: Option<Instant>) -> Result<u32, UdsError> {
    let mut bridge = Bridge::new(base)?;
    loop {
        let entries = vm.stats().entries;
        match vm.run(deadline)? {
            RunStop::Exited(code) => return Ok(code),
            RunStop::Ready(info) => log::info!("guest ready: listening on vsock port {}", info.port),
            RunStop::Idle => {}
        }
        let credit = vm.ready_info().map_or(0, |r| r.buf_alloc);
        let mut moved = bridge.pump(vm.vsock(), credit);
        if !moved && vm.stats().entries == entries {
            // Neither side had anything: sleep on the sockets (and wake for rescans).
            let mut wait = RESCAN;
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(UdsError::Guest(GuestError::Timeout));
                }
                wait = wait.min(left);
            }
            bridge.wait(wait)?;
            moved = bridge.pump(vm.vsock(), credit);
        }
        // Whether or not bytes moved, the next `run` polls the device and returns at once
        // when the guest has nothing new.
        let _ = moved;
    }
}

impl crate::error::Classify for UdsError {
    fn kind(&self) -> crate::error::FailureKind {
        use crate::error::FailureKind;
        match self {
            UdsError::Io { source, .. } => crate::error::io_kind(source),
            UdsError::Events(_) => FailureKind::Internal,
            UdsError::Guest(e) => e.kind(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(fork_path(Path::new("/tmp/v.sock"), 7), PathBuf::from("/tmp/v.sock.7"));
        assert_eq!(port_path(Path::new("/tmp/v.sock"), 52), PathBuf::from("/tmp/v.sock_52"));
    }
}
