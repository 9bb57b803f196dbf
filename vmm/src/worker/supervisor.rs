//! The supervisor's side: start the worker processes, send each request to a worker with spare
//! capacity, hand its reply back, and restart a worker that dies.

use std::collections::HashMap;
use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::protocol::{self, Outcome, RequestKind};
use super::WorkerError;
use crate::fork::Served;

/// How a pool of workers is run.
#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    /// Worker processes.
    pub workers: usize,
    /// Requests a worker serves at once; more wait for a free worker.
    pub capacity: usize,
    /// The largest request sent to a worker.
    pub max_request: usize,
    /// The largest response accepted from one.
    pub max_response: usize,
    /// How long a worker may take to start (load its image, fill its pool) and say so.
    pub start_timeout: Duration,
    /// How long past a request's own deadline the supervisor waits for its reply before it
    /// holds the worker for hung, kills it (failing what it had in flight) and restarts it.
    pub reply_grace: Duration,
}

/// Makes the command that starts worker `index` (its socket becomes the worker's stdin).
pub type Spawn = dyn Fn(usize) -> Command + Send + Sync;

type Pending = Mutex<HashMap<u64, SyncSender<Result<Served, WorkerError>>>>;

/// One worker process and what is in flight on it.
struct Slot {
    index: usize,
    /// The socket's writing side; `None` while the worker is down.
    writer: Mutex<Option<UnixStream>>,
    pending: Pending,
    in_flight: AtomicUsize,
    child: Mutex<Option<Child>>,
    pid: AtomicU64,
    restarts: AtomicUsize,
}

impl Slot {
    fn alive(&self) -> bool {
        self.writer.lock().is_ok_and(|w| w.is_some())
    }

    /// Kills the worker process (its reader thread then sees the end of the stream).
    fn kill(&self) {
        if let Ok(mut child) = self.child.lock() {
            if let Some(child) = child.as_mut() {
                let _ = child.kill();
            }
        }
    }

    fn fail_pending(&self, error: impl Fn() -> WorkerError) {
        let drained: Vec<_> = match self.pending.lock() {
            Ok(mut pending) => pending.drain().collect(),
            Err(_) => Vec::new(),
        };
        for (_, tx) in drained {
            let _ = tx.try_send(Err(error()));
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("index", &self.index)
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .field("restarts", &self.restarts.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Shared by the supervisor and its reader threads.
struct Shared {
    slots: Vec<Arc<Slot>>,
    /// Signalled when a worker comes up or a request ends: a waiting caller may find room.
    room: (Mutex<()>, Condvar),
    stopping: AtomicBool,
    config: WorkerConfig,
    spawn: Box<Spawn>,
}

/// Worker processes, each with VMs of its own in its own address space, serving requests sent
/// over a Unix socket: a request goes to the worker with the fewest in flight below its
/// capacity; a worker that dies fails only the requests it had in flight, and is restarted.
///
/// The worker side is [`serve_requests`](super::serve_requests), run by the program the
/// `spawn` function starts (typically this program again, in a worker mode).
pub struct Workers {
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").field("slots", &self.shared.slots).finish_non_exhaustive()
    }
}

impl Workers {
    /// Starts `config.workers` workers with the commands `spawn` makes and waits until each
    /// has said it is ready. Fails if any cannot start (its own error output says why).
    pub fn start(config: WorkerConfig, spawn: Box<Spawn>) -> Result<Workers, WorkerError> {
        let slots = (0..config.workers.max(1))
            .map(|index| {
                Arc::new(Slot {
                    index,
                    writer: Mutex::new(None),
                    pending: Mutex::new(HashMap::new()),
                    in_flight: AtomicUsize::new(0),
                    child: Mutex::new(None),
                    pid: AtomicU64::new(0),
                    restarts: AtomicUsize::new(0),
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            slots,
            room: (Mutex::new(()), Condvar::new()),
            stopping: AtomicBool::new(false),
            config,
            spawn,
        });
        let (started_tx, started_rx) = mpsc::channel();
        let mut readers = Vec::new();
        for slot in &shared.slots {
            let (shared, slot, started) = (shared.clone(), slot.clone(), started_tx.clone());
            let reader = std::thread::Builder::new()
                .name(format!("mu2-supervise-{}", slot.index))
                .spawn(move || supervise(&shared, &slot, started))
                .map_err(|source| WorkerError::Spawn { worker: 0, source })?;
            readers.push(reader);
        }
        drop(started_tx);
        let workers = Workers { shared, readers, next_id: AtomicU64::new(1) };
        for _ in 0..workers.shared.slots.len() {
            match started_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(WorkerError::Stopped),
            }
        }
        Ok(workers)
    }

    /// Serves one request on some worker's VM. Waits (until `timeout`) for a worker with room
    /// when all are busy.
    pub fn serve(&self, request: &[u8], timeout: Duration) -> Result<Served, WorkerError> {
        if request.len() > self.shared.config.max_request {
            return Err(WorkerError::TooLarge { len: request.len(), max: self.shared.config.max_request });
        }
        let deadline = Instant::now() + timeout;
        let slot = self.acquire(deadline)?;
        let result = self.exchange(&slot, RequestKind::Serve, request, timeout);
        self.release(&slot);
        result
    }

    /// Waits until every worker's VMs are ready again (full pools, resets done), or `timeout`.
    pub fn settle(&self, timeout: Duration) -> Result<(), WorkerError> {
        for slot in &self.shared.slots {
            slot.in_flight.fetch_add(1, Ordering::Relaxed);
            let result = self.exchange(slot, RequestKind::Settle, &[], timeout);
            self.release(slot);
            match result {
                Ok(_) | Err(WorkerError::Died { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends one request to `slot`'s worker and waits for its reply.
    fn exchange(&self, slot: &Slot, kind: RequestKind, body: &[u8], timeout: Duration) -> Result<Served, WorkerError> {
        let died = || WorkerError::Died { worker: slot.index };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx): (_, Receiver<Result<Served, WorkerError>>) = mpsc::sync_channel(1);
        slot.pending.lock().map_err(|_| died())?.insert(id, tx);
        let sent = match slot.writer.lock() {
            Ok(mut writer) => match writer.as_mut() {
                Some(stream) => protocol::write_request(stream, kind, id, timeout, body).is_ok(),
                None => false,
            },
            Err(_) => false,
        };
        if !sent {
            if let Ok(mut pending) = slot.pending.lock() {
                pending.remove(&id);
            }
            return Err(died());
        }
        let grace = self.shared.config.reply_grace;
        match rx.recv_timeout(timeout + grace) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Past its own deadline and the grace: the worker is stuck. Killing it fails
                // what else it had in flight, as a death would, and restarts it.
                if let Ok(mut pending) = slot.pending.lock() {
                    pending.remove(&id);
                }
                log::warn!("worker {} did not answer within {:?}; killing it", slot.index, timeout + grace);
                slot.kill();
                Err(WorkerError::Hung { worker: slot.index })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(died()),
        }
    }

    /// The live worker with the fewest requests in flight below its capacity, counted as one
    /// more; waits for one until `deadline`.
    fn acquire(&self, deadline: Instant) -> Result<Arc<Slot>, WorkerError> {
        let (lock, room) = &self.shared.room;
        let mut guard = lock.lock().map_err(|_| WorkerError::Stopped)?;
        loop {
            if self.shared.stopping.load(Ordering::Relaxed) {
                return Err(WorkerError::Stopped);
            }
            let capacity = self.shared.config.capacity.max(1);
            let best = self
                .shared
                .slots
                .iter()
                .filter(|s| s.in_flight.load(Ordering::Relaxed) < capacity && s.alive())
                .min_by_key(|s| s.in_flight.load(Ordering::Relaxed));
            if let Some(slot) = best {
                slot.in_flight.fetch_add(1, Ordering::Relaxed);
                return Ok(slot.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WorkerError::Busy);
            }
            // Woken when a request ends or a worker comes up; the timeout bounds a lost wake-up.
            let wait = (deadline - now).min(Duration::from_millis(50));
            guard = room.wait_timeout(guard, wait).map_err(|_| WorkerError::Stopped)?.0;
        }
    }

    fn release(&self, slot: &Slot) {
        slot.in_flight.fetch_sub(1, Ordering::Relaxed);
        let (lock, room) = &self.shared.room;
        let _guard = lock.lock();
        room.notify_one();
    }

    /// Times workers were restarted after dying.
    pub fn restarts(&self) -> usize {
        self.shared.slots.iter().map(|s| s.restarts.load(Ordering::Relaxed)).sum()
    }

    /// The workers' process ids (0 for one that is down).
    pub fn pids(&self) -> Vec<u32> {
        self.shared.slots.iter().map(|s| s.pid.load(Ordering::Relaxed) as u32).collect()
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.shared.slots.len()
    }

    /// Whether there are none (never: at least one is started).
    pub fn is_empty(&self) -> bool {
        self.shared.slots.is_empty()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        for slot in &self.shared.slots {
            // Closing the socket ends a healthy worker's loop; killing ends any other.
            if let Ok(mut writer) = slot.writer.lock() {
                writer.take();
            }
            slot.kill();
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// Starts one worker process on a new socket pair: the worker's end is its stdin.
fn spawn_worker(shared: &Shared, index: usize) -> Result<(Child, UnixStream), WorkerError> {
    let spawn_err = |source| WorkerError::Spawn { worker: index, source };
    let (ours, theirs) = UnixStream::pair().map_err(spawn_err)?;
    let mut command = (shared.spawn)(index);
    command.stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs))).stdout(Stdio::null());
    let child = command.spawn().map_err(spawn_err)?;
    Ok((child, ours))
}

/// Waits for the worker's first frame, which says it is ready.
fn await_ready(
    stream: &UnixStream,
    reader: &mut BufReader<UnixStream>,
    timeout: Duration,
    index: usize,
) -> Result<(), WorkerError> {
    let not_ready = |reason: String| WorkerError::Start { worker: index, reason };
    stream.set_read_timeout(Some(timeout)).map_err(|e| not_ready(e.to_string()))?;
    let first = protocol::read_reply(reader, 0);
    stream.set_read_timeout(None).map_err(|e| not_ready(e.to_string()))?;
    match first {
        Ok(Some(reply)) if reply.outcome == Outcome::Ready => Ok(()),
        Ok(Some(_)) => Err(not_ready("its first frame was not `ready`".into())),
        Ok(None) => Err(not_ready("it exited before it was ready (its error output says why)".into())),
        Err(e) => Err(not_ready(format!("no ready frame: {e}"))),
    }
}

/// One worker's life, over and over: start it, wait until it is ready, deliver its replies
/// until its stream ends, fail what it had in flight, restart it. The first start's result
/// goes to `started`.
fn supervise(shared: &Shared, slot: &Slot, started: mpsc::Sender<Result<(), WorkerError>>) {
    let mut started = Some(started);
    let mut backoff = Duration::from_millis(50);
    while !shared.stopping.load(Ordering::Relaxed) {
        let up = Instant::now();
        let session = spawn_worker(shared, slot.index).and_then(|(child, stream)| {
            slot.pid.store(u64::from(child.id()), Ordering::Relaxed);
            if let Ok(mut c) = slot.child.lock() {
                *c = Some(child);
            }
            let reader = stream.try_clone().map_err(|source| WorkerError::Spawn { worker: slot.index, source })?;
            let mut reader = BufReader::new(reader);
            await_ready(&stream, &mut reader, shared.config.start_timeout, slot.index)?;
            Ok((stream, reader))
        });
        match session {
            Ok((stream, reader)) => {
                if let Ok(mut writer) = slot.writer.lock() {
                    *writer = Some(stream);
                }
                if let Some(tx) = started.take() {
                    let _ = tx.send(Ok(()));
                }
                {
                    let (lock, room) = &shared.room;
                    let _guard = lock.lock();
                    room.notify_all();
                }
                deliver(shared, slot, reader);
            }
            Err(e) => {
                if let Some(tx) = started.take() {
                    slot.kill();
                    reap(slot);
                    let _ = tx.send(Err(e));
                    return;
                }
                log::warn!("worker {} did not come back: {}", slot.index, crate::error::error_chain(&e));
            }
        }
        // Down: no new requests, the in-flight ones fail, the process is reaped.
        if let Ok(mut writer) = slot.writer.lock() {
            writer.take();
        }
        slot.kill();
        reap(slot);
        slot.fail_pending(|| WorkerError::Died { worker: slot.index });
        if shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        slot.restarts.fetch_add(1, Ordering::Relaxed);
        log::warn!("worker {} ended; restarting it", slot.index);
        // A worker that dies at once would otherwise be restarted in a tight loop.
        backoff = if up.elapsed() < Duration::from_secs(1) {
            (backoff * 2).min(Duration::from_secs(2))
        } else {
            Duration::from_millis(50)
        };
        std::thread::sleep(backoff);
    }
}

/// Hands each reply to the request waiting for it, until the worker's stream ends or breaks.
fn deliver(shared: &Shared, slot: &Slot, mut reader: BufReader<UnixStream>) {
    loop {
        let reply = match protocol::read_reply(&mut reader, shared.config.max_response) {
            Ok(Some(reply)) => reply,
            Ok(None) => return,
            Err(e) => {
                log::warn!("worker {} sent a malformed reply ({e}); restarting it", slot.index);
                return;
            }
        };
        let waiting = slot.pending.lock().ok().and_then(|mut p| p.remove(&reply.id));
        // A reply nobody waits for (its caller gave up) is dropped.
        let Some(tx) = waiting else { continue };
        let result = match reply.outcome {
            Outcome::Served { fork_us, run_us, vm_id, response } => Ok(Served { response, fork_us, run_us, vm_id }),
            Outcome::Settled => Ok(Served { response: Vec::new(), fork_us: 0.0, run_us: 0.0, vm_id: 0 }),
            Outcome::Failed { kind, message } => Err(WorkerError::Failed { kind, message }),
            Outcome::Ready => Err(WorkerError::Start { worker: slot.index, reason: "a second ready frame".into() }),
        };
        let _ = tx.try_send(result);
    }
}

fn reap(slot: &Slot) {
    if let Ok(mut child) = slot.child.lock() {
        if let Some(mut child) = child.take() {
            let _ = child.wait();
        }
    }
    slot.pid.store(0, Ordering::Relaxed);
}
