//! The worker's side: read requests from the supervisor, serve each on this process's VMs,
//! write the replies back.

use std::io::{self, BufReader};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use super::protocol::{self, Outcome, Reply, RequestKind};
use crate::error::{error_chain, Classify};
use crate::fork::Served;

/// What a worker process serves requests with: usually a `fork::Engine`.
pub trait Handler: Sync {
    /// The request's error.
    type Error: std::error::Error + Classify;
    /// Serves one request on a VM of its own.
    fn serve(&self, request: &[u8], timeout: Duration) -> Result<Served, Self::Error>;
    /// Returns once this worker's VMs are ready again (a full pool, every reset done), or
    /// `timeout` passed.
    fn settle(&self, timeout: Duration);
}

impl Handler for crate::fork::Engine {
    type Error = crate::fork::ForkError;

    fn serve(&self, request: &[u8], timeout: Duration) -> Result<Served, Self::Error> {
        crate::fork::Engine::serve(self, request, timeout)
    }

    fn settle(&self, timeout: Duration) {
        match self.mode() {
            crate::fork::Mode::Pool => {
                self.wait_for_pool(self.config().pool_size, timeout);
            }
            crate::fork::Mode::Reuse => {
                self.wait_for_resets(timeout);
            }
            crate::fork::Mode::Fresh => {}
        }
    }
}

/// The worker's loop, once its VMs are ready: announces itself on `stream`, then serves what
/// the supervisor sends with up to `capacity` requests at once, a request body being at most
/// `max_request` bytes. Each of `capacity` threads takes its turn reading the next request
/// and then serves it itself, so a request wakes exactly the thread that serves it. Returns
/// when the supervisor closes the connection; an error when it sends something that is not a
/// frame.
pub fn serve_requests<H: Handler>(
    stream: UnixStream,
    handler: &H,
    capacity: usize,
    max_request: usize,
) -> io::Result<()> {
    let writer = Mutex::new(stream.try_clone()?);
    let send = |reply: &Reply| -> io::Result<()> {
        let mut w = writer.lock().map_err(|_| io::Error::other("reply writer poisoned"))?;
        protocol::write_reply(&mut *w, reply)
    };
    send(&Reply { id: 0, outcome: Outcome::Ready })?;
    let reader = Mutex::new(BufReader::new(stream));
    // The first broken frame, which ends every thread's loop.
    let broken: Mutex<Option<io::Error>> = Mutex::new(None);
    let serve_next = || -> bool {
        let next = match reader.lock() {
            Ok(mut reader) => protocol::read_request(&mut *reader, max_request),
            Err(_) => return false,
        };
        let request = match next {
            Ok(Some(request)) => request,
            // The supervisor closed the connection: every thread ends (each reads the end).
            Ok(None) => return false,
            Err(e) => {
                if let Ok(mut broken) = broken.lock() {
                    broken.get_or_insert(e);
                }
                // Unblock the other readers: nothing more can be read from this stream.
                if let Ok(reader) = reader.lock() {
                    let _ = reader.get_ref().shutdown(std::net::Shutdown::Read);
                }
                return false;
            }
        };
        let outcome = match request.kind {
            RequestKind::Serve => match handler.serve(&request.body, request.timeout) {
                Ok(served) => Outcome::Served {
                    fork_us: served.fork_us,
                    run_us: served.run_us,
                    vm_id: served.vm_id,
                    response: served.response,
                },
                Err(e) => Outcome::Failed { kind: e.kind(), message: error_chain(&e) },
            },
            RequestKind::Settle => {
                handler.settle(request.timeout);
                Outcome::Settled
            }
        };
        // A failed write means the supervisor is gone; the next read sees the end too.
        send(&Reply { id: request.id, outcome }).is_ok()
    };
    std::thread::scope(|scope| {
        let mut servers = 0;
        for i in 1..capacity.max(1) {
            let serve_next = &serve_next;
            let spawned = std::thread::Builder::new()
                .name(format!("mu2-worker-{i}"))
                .spawn_scoped(scope, move || while serve_next() {});
            match spawned {
                Ok(_) => servers += 1,
                Err(e) => log::warn!("worker thread {i} could not start: {e}"),
            }
        }
        log::debug!("serving with {} threads", servers + 1);
        // This thread is one of the servers.
        while serve_next() {}
    });
    match broken.into_inner().ok().flatten() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
