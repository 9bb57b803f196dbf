//! The listeners: one accept loop for the control API's Unix socket and the dispatcher's TCP
//! socket, a thread per connection reading requests and writing responses, and the daemon's
//! lifecycle (serving, draining, stopping) they and the handlers look at.
//!
//! I/O is blocking, one thread per connection: a request runs its VM on its connection's
//! thread, so the response leaves as soon as the guest's last byte arrives, with no hand-off
//! between threads. Every resource that model spends is bounded: connections per listener
//! (`--max-connections`; the next one is answered 503 at once by the accept loop and closed),
//! so threads too; a request's read time from its first byte (`--read-timeout`, 408), its
//! body (`--max-body`, 413) and the bodies buffered at once across connections
//! (`--max-buffered`, 503); a response's write (`WRITE_TIMEOUT`); `--max-vms` bounds the
//! connections that hold a VM. An idle connection costs a parked thread, and notices the stop
//! flag within [`POLL`]. The accept loop waits for a connection at most [`POLL`] at a time, so
//! it stops without being woken and without taking a connection it would not serve: a socket
//! passed by a service manager keeps those for the next daemon. When accept fails (out of
//! descriptors, say) it backs off, and says so once per [`ACCEPT_LOG_INTERVAL`] with the count.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::http::{self, Request, Response};
use super::metrics::Metrics;
use super::model::ApiResponse;
use crate::error::error_chain;
use crate::sandbox::ThreadClass;
use mu2_devices::throttle::Throttled;

/// Read timeout of client sockets: how often an idle connection looks at the stop flag; also
/// how long the accept loop waits between looks at it.
const POLL: Duration = Duration::from_millis(200);
/// Pause after a failed accept, so that running out of descriptors does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// How often a listener's failing accepts are logged (once, with the count since).
pub(super) const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How long writing one response may take, in all: a client that does not read, or reads a
/// little now and then, holds its thread and its response no longer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one write call may block (the socket's send timeout), so that the whole write
/// ends within [`WRITE_TIMEOUT`] and this.
const WRITE_STALL: Duration = Duration::from_secs(1);
/// The answer to a connection over `--max-connections`, written by the accept loop.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
content-length: 51\r\nretry-after: 1\r\nconnection: close\r\n\r\n\
{\"error\":\"too many connections; retry in a moment\"}";
/// How long a connection accepted just before the shutdown may take to send its first
/// request: it is answered (503) rather than closed unanswered, so a client or load balancer
/// learns it may retry elsewhere.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Locks, ignoring poisoning: the guarded data are counters and maps that stay consistent.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the daemon is draining or stopping, and how many client connections are open.
#[derive(Debug, Default)]
pub(super) struct Lifecycle {
    draining: AtomicBool,
    stopping: AtomicBool,
    open: Mutex<usize>,
    closed: Condvar,
}

impl Lifecycle {
    /// Whether the drain period has begun: `/healthz` answers 503 and responses close their
    /// connections, while requests are still served.
    pub(super) fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Begins the drain period.
    pub(super) fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the shutdown has begun: no new request is served.
    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Begins the shutdown.
    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Open client connections.
    pub(super) fn connections(&self) -> usize {
        *lock(&self.open)
    }

    /// Waits until every connection has closed, or until `until`. Returns how many are still
    /// open.
    pub(super) fn drain(&self, until: Instant) -> usize {
        let mut open = lock(&self.open);
        while *open > 0 && Instant::now() < until {
            open = self.closed.wait_timeout(open, POLL).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        *open
    }
}

/// Counts one open connection, in the daemon's count and its listener's, for as long as it
/// lives (a connection thread that panics still gives its slot back).
struct OpenConnection(Arc<Endpoint>);

impl OpenConnection {
    fn new(endpoint: &Arc<Endpoint>) -> Self {
        *lock(&endpoint.lifecycle.open) += 1;
        endpoint.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(endpoint.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        *lock(&self.0.lifecycle.open) -= 1;
        self.0.lifecycle.closed.notify_all();
    }
}

/// A listening socket: the Unix socket or the TCP socket.
pub(super) trait Listen: AsFd + Send + 'static {
    /// A connection.
    type Stream: Read + Write + Send + 'static;
    /// Makes `accept_next` return `WouldBlock` instead of waiting.
    fn make_nonblocking(&self) -> std::io::Result<()>;
    /// Takes the next connection.
    fn accept_next(&self) -> std::io::Result<Self::Stream>;
    /// Sets the socket options a connection is served with.
    fn configure(stream: &Self::Stream) -> std::io::Result<()>;
}

impl Listen for UnixListener {
    type Stream = UnixStream;

    fn make_nonblocking(&self) -> std::io::Result<()> {
        UnixListener::set_nonblocking(self, true)
    }

    fn accept_next(&self) -> std::io::Result<UnixStream> {
        self.accept().map(|(stream, _)| stream)
    }

    fn configure(stream: &UnixStream) -> std::io::Result<()> {
        // Served blocking, with a read timeout, whatever the listener's own mode (by fcntl,
        // which every thread's seccomp filter allows, not std's ioctl).
        crate::sys::set_blocking(stream.as_fd())?;
        stream.set_write_timeout(Some(WRITE_STALL))?;
        stream.set_read_timeout(Some(POLL))
    }
}

impl Listen for TcpListener {
    type Stream = TcpStream;

    fn make_nonblocking(&self) -> std::io::Result<()> {
        TcpListener::set_nonblocking(self, true)
    }

    fn accept_next(&self) -> std::io::Result<TcpStream> {
        self.accept().map(|(stream, _)| stream)
    }

    fn configure(stream: &TcpStream) -> std::io::Result<()> {
        // Served blocking, with a read timeout, whatever the listener's own mode (by fcntl,
        // which every thread's seccomp filter allows, not std's ioctl).
        crate::sys::set_blocking(stream.as_fd())?;
        // Responses leave in one write; do not hold them back.
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(WRITE_STALL))?;
        stream.set_read_timeout(Some(POLL))
    }
}

/// Answers one request.
pub(super) type Handler = dyn Fn(Request) -> Response + Send + Sync;

/// What the connections of one listener share.
pub(super) struct Endpoint {
    /// The `listener` label of `mu2_http_responses_total`: `api` or `http`.
    pub label: &'static str,
    /// Answers its requests.
    pub handler: Arc<Handler>,
    /// What reading a request may take.
    pub limits: http::ReadLimits,
    /// Most connections open at once on this listener.
    pub max_connections: usize,
    /// Connections open on this listener.
    pub open: AtomicUsize,
    /// The stop flag and the connection count.
    pub lifecycle: Arc<Lifecycle>,
    /// Where responses are counted.
    pub metrics: Arc<Metrics>,
    /// Failing accepts, logged once per interval.
    pub accept_failures: Throttled,
    /// Whether the accept loop, when the daemon stops, takes the connections still queued
    /// and answers them (503) before the listener closes: for a listener the daemon bound,
    /// whose queue would otherwise be reset. A listener passed by a service manager keeps its
    /// queue for the next daemon.
    pub answer_backlog_on_stop: bool,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("label", &self.label)
            .field("limits", &self.limits)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// Starts the accept loop of `listener` on a thread of its own. It ends within [`POLL`] of
/// the daemon stopping, and drops (closes) its listener then.
pub(super) fn spawn_acceptor<L: Listen>(listener: L, endpoint: Endpoint) -> std::io::Result<JoinHandle<()>> {
    listener.make_nonblocking()?;
    let endpoint = Arc::new(endpoint);
    crate::sandbox::spawn(ThreadClass::Acceptor, format!("mu2-{}-accept", endpoint.label), move || {
        while !endpoint.lifecycle.stopping() {
            match crate::sys::wait_readable(listener.as_fd(), POLL) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    endpoint.accept_failures.warn(format_args!("waiting on the {} listener: {e}", endpoint.label));
                    std::thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            }
            // Checked again: a connection that came with the stop stays queued for whoever
            // holds the socket next.
            if endpoint.lifecycle.stopping() {
                break;
            }
            if let Err(e) = accept_one(&listener, &endpoint) {
                endpoint.accept_failures.warn(format_args!("accepting on the {} listener: {e}", endpoint.label));
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
        if endpoint.answer_backlog_on_stop {
            // Each queued connection's first request is answered 503 (its thread reads it
            // first, so the close is not a reset); the caps still apply, and so does a bound,
            // so that clients connecting on and on cannot hold the shutdown.
            let until = Instant::now() + FIRST_REQUEST_GRACE;
            let mut taken = 0;
            while taken < endpoint.max_connections && Instant::now() < until {
                match accept_one(&listener, &endpoint) {
                    Ok(true) => taken += 1,
                    Ok(false) | Err(_) => break,
                }
            }
        }
    })
}

/// Takes one queued connection and hands it to a thread, or refuses it over the cap. Returns
/// whether there was one.
fn accept_one<L: Listen>(listener: &L, endpoint: &Arc<Endpoint>) -> std::io::Result<bool> {
    match listener.accept_next().and_then(|stream| L::configure(&stream).map(|()| stream)) {
        Ok(stream) if endpoint.open.load(Ordering::Relaxed) >= endpoint.max_connections => {
            refuse_over_capacity(endpoint, stream);
            Ok(true)
        }
        Ok(stream) => {
            spawn_connection(endpoint, stream);
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// Answers a connection over `--max-connections` with a 503 from the accept loop and closes
/// it: a short write into an empty socket buffer, which cannot block for long (and the write
/// timeout bounds it).
fn refuse_over_capacity<S: Write>(endpoint: &Endpoint, mut stream: S) {
    let _ = stream.write_all(OVER_CAPACITY);
    endpoint.metrics.response(endpoint.label, 503);
}

fn spawn_connection<S: Read + Write + Send + 'static>(endpoint: &Arc<Endpoint>, stream: S) {
    let open = OpenConnection::new(endpoint);
    let spawned = crate::sandbox::spawn(ThreadClass::Connection, "mu2-conn".into(), move || {
        serve_connection(&open.0, stream);
        drop(open);
    });
    if let Err(e) = spawned {
        endpoint.accept_failures.warn(format_args!("no thread for a new connection: {e}"));
    }
}

/// Serves requests on one connection until the client or the daemon closes it.
fn serve_connection<S: Read + Write>(endpoint: &Endpoint, mut stream: S) {
    let mut buf = Vec::new();
    let lifecycle = &endpoint.lifecycle;
    let accepted = Instant::now();
    let mut answered = 0u64;
    loop {
        // An idle connection closes once the daemon stops; a new one first gets its answer.
        let give_up = || lifecycle.stopping() && (answered > 0 || accepted.elapsed() > FIRST_REQUEST_GRACE);
        let (request, body_charge) = match http::read_request(&mut stream, &mut buf, &endpoint.limits, &give_up) {
            Ok(read) => read,
            Err(e) => {
                if let Some(status) = e.status() {
                    let _ = http::write_response(
                        &mut stream,
                        &ApiResponse::error(status, error_chain(&e)).into(),
                        false,
                        false,
                    );
                    endpoint.metrics.response(endpoint.label, status);
                }
                return;
            }
        };
        let head_only = request.method == "HEAD";
        let client_keeps_alive = request.keep_alive;
        let response = if lifecycle.stopping() {
            ApiResponse::error(503, "the daemon is shutting down").into()
        } else {
            (endpoint.handler)(request)
        };
        // The handler has consumed the body: its share of `--max-buffered` goes back now.
        drop(body_charge);
        // While draining, each connection ends after its response, so that a keep-alive client
        // reconnects, and a load balancer then picks a host that is not draining.
        let keep_alive = client_keeps_alive && !lifecycle.stopping() && !lifecycle.draining();
        answered += 1;
        endpoint.metrics.response(endpoint.label, response.status);
        let mut timed = Deadline { inner: &mut stream, until: Instant::now() + WRITE_TIMEOUT };
        if http::write_response(&mut timed, &response, keep_alive, head_only).is_err() || !keep_alive {
            return;
        }
    }
}

/// A writer that fails once its deadline has passed: each write call blocks at most the
/// socket's send timeout, so a whole response takes at most the deadline and that.
struct Deadline<'a, W> {
    inner: &'a mut W,
    until: Instant,
}

impl<W: Write> Deadline<'_, W> {
    fn check(&self) -> std::io::Result<()> {
        if Instant::now() > self.until {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not read its response in time",
            ));
        }
        Ok(())
    }
}

impl<W: Write> Write for Deadline<'_, W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.check()?;
        self.inner.write(data)
    }

    fn write_vectored(&mut self, data: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.check()?;
        self.inner.write_vectored(data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Binds the Unix socket with mode 0600 from the start: the umask covers the bind, so the
/// socket never exists with wider permissions. Only a stale socket is replaced: anything else
/// at the path (a file, a directory, a symbolic link) is refused and left alone.
pub(super) fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A socket left by a daemon that died can go; one that answers cannot.
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another daemon listens there"));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "something other than a socket is there; refusing to replace it",
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The daemon has no other thread creating files while it binds.
    let result = crate::sys::with_umask(0o177, || UnixListener::bind(path));
    let listener = result?;
    // Belt and braces: a umask cannot widen, but say the mode explicitly.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
