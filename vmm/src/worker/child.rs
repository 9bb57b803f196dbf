//! The worker's side: read requests from the supervisor, serve each on this process's VMs,
//! write the replies back.

use std::io::{self, BufReader};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use super::protocol::{self, Outcome, Reply, Request, RequestKind};
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
/// the supervisor sends with up to `capacity` requests at once (each on its own thread), a
/// request body being at most `max_request` bytes. Returns when the supervisor closes the
/// connection; an error when it sends something that is not a frame.
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
    let capacity = capacity.max(1);
    // Bounded: the supervisor sends at most `capacity` requests at once; one more waits in
    // the socket, not in memory.
    let (tx, rx) = mpsc::sync_channel::<Request>(capacity);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        let mut servers = 0;
        for i in 0..capacity {
            let (rx, send) = (&rx, &send);
            let spawned =
                std::thread::Builder::new().name(format!("mu2-worker-{i}")).spawn_scoped(scope, move || loop {
                    let next = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(request) = next else { return };
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
                    if send(&Reply { id: request.id, outcome }).is_err() {
                        // The supervisor is gone; the reader sees the end of the stream too.
                        return;
                    }
                });
            match spawned {
                Ok(_) => servers += 1,
                Err(e) => log::warn!("worker thread {i} could not start: {e}"),
            }
        }
        if servers == 0 {
            return Err(io::Error::other("no worker thread could start"));
        }
        let mut reader = BufReader::new(&stream);
        let result = loop {
            match protocol::read_request(&mut reader, max_request) {
                Ok(Some(request)) => {
                    if tx.send(request).is_err() {
                        break Ok(());
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        drop(tx);
        result
    })
}
