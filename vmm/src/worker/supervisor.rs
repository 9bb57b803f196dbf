//! The supervisor's side: start the worker processes, send each request to a worker with spare
//! capacity, read its reply back, and restart a worker that dies.

use std::collections::{HashMap, HashSet};
use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
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

/// How often a worker's supervising thread checks that its process still runs, and how long a
/// caller reading replies blocks in one read before it looks at its deadline again.
const POLL: Duration = Duration::from_millis(20);

/// One connection to a running worker process. Callers read the replies themselves: whichever
/// caller is waiting and finds no reader takes the reader's turn, reads one reply, keeps it
/// if it is its own and hands it over otherwise — so with one request in flight the reply
/// wakes exactly the caller waiting for it, with no thread in between.
struct Conn {
    writer: Mutex<UnixStream>,
    reader: Mutex<BufReader<UnixStream>>,
    state: Mutex<ConnState>,
    changed: Condvar,
}

#[derive(Default)]
struct ConnState {
    /// Requests sent and not yet answered.
    waiting: HashSet<u64>,
    /// Replies read by another caller, for their requests.
    replies: HashMap<u64, Result<Served, WorkerError>>,
    /// A caller is reading.
    reading: bool,
    /// The stream ended or broke: the worker is down.
    closed: bool,
}

impl Conn {
    fn close(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.closed = true;
        }
        self.changed.notify_all();
    }

    fn is_closed(&self) -> bool {
        self.state.lock().map_or(true, |s| s.closed)
    }
}

/// One worker process and what is in flight on it.
struct Slot {
    index: usize,
    /// The connection to the running worker; `None` while it is down.
    conn: Mutex<Option<Arc<Conn>>>,
    in_flight: AtomicUsize,
    child: Mutex<Option<Child>>,
    pid: AtomicU64,
    restarts: AtomicUsize,
}

impl Slot {
    fn conn(&self) -> Option<Arc<Conn>> {
        self.conn.lock().ok().and_then(|c| c.clone())
    }

    /// Kills the worker process (its supervising thread then restarts it).
    fn kill(&self) {
        if let Ok(mut child) = self.child.lock() {
            if let Some(child) = child.as_mut() {
                let _ = child.kill();
            }
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

/// Shared by the supervisor and its supervising threads.
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
    supervisors: Vec<JoinHandle<()>>,
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
                    conn: Mutex::new(None),
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
        let mut workers = Workers { shared: shared.clone(), supervisors: Vec::new(), next_id: AtomicU64::new(1) };
        for slot in &shared.slots {
            let (shared, slot, started) = (shared.clone(), slot.clone(), started_tx.clone());
            let supervisor = std::thread::Builder::new()
                .name(format!("mu2-supervise-{}", slot.index))
                .spawn(move || supervise(&shared, &slot, started))
                .map_err(|source| WorkerError::Spawn { worker: 0, source })?;
            workers.supervisors.push(supervisor);
        }
        drop(started_tx);
        for _ in 0..shared.slots.len() {
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
        let (slot, conn) = self.acquire(deadline)?;
        let result = self.exchange(&slot, &conn, RequestKind::Serve, request, timeout);
        self.release(&slot);
        result
    }

    /// Waits until every worker's VMs are ready again (full pools, resets done), or `timeout`.
    pub fn settle(&self, timeout: Duration) -> Result<(), WorkerError> {
        for slot in &self.shared.slots {
            let Some(conn) = slot.conn() else { continue };
            slot.in_flight.fetch_add(1, Ordering::Relaxed);
            let result = self.exchange(slot, &conn, RequestKind::Settle, &[], timeout);
            self.release(slot);
            match result {
                Ok(_) | Err(WorkerError::Died { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends one request on `conn` (`slot`'s worker) and waits for its reply.
    fn exchange(
        &self,
        slot: &Slot,
        conn: &Conn,
        kind: RequestKind,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Served, WorkerError> {
        let died = || WorkerError::Died { worker: slot.index };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut state = conn.state.lock().map_err(|_| died())?;
            if state.closed {
                return Err(died());
            }
            state.waiting.insert(id);
        }
        let sent =
            conn.writer.lock().is_ok_and(|mut w| protocol::write_request(&mut *w, kind, id, timeout, body).is_ok());
        let deadline = Instant::now() + timeout + self.shared.config.reply_grace;
        let mut state = conn.state.lock().map_err(|_| died())?;
        if !sent {
            // A write that failed or timed out may have left part of a frame: the stream is
            // no longer usable, so the worker is restarted.
            state.waiting.remove(&id);
            state.closed = true;
            drop(state);
            conn.changed.notify_all();
            slot.kill();
            return Err(died());
        }
        loop {
            if let Some(result) = state.replies.remove(&id) {
                state.waiting.remove(&id);
                return result;
            }
            if state.closed {
                state.waiting.remove(&id);
                return Err(died());
            }
            if Instant::now() >= deadline {
                // Past its own deadline and the grace: the worker is stuck. Killing it fails
                // what else it had in flight, as a death would, and restarts it.
                state.waiting.remove(&id);
                drop(state);
                log::warn!("worker {} did not answer in time; killing it", slot.index);
                slot.kill();
                conn.close();
                return Err(WorkerError::Hung { worker: slot.index });
            }
            if state.reading {
                state = conn.changed.wait_timeout(state, POLL).map_err(|_| died())?.0;
                continue;
            }
            // This caller's turn to read.
            state.reading = true;
            drop(state);
            let read = match conn.reader.lock() {
                Ok(mut reader) => protocol::read_reply(&mut *reader, self.shared.config.max_response),
                Err(_) => Err(std::io::Error::other("reader poisoned")),
            };
            state = conn.state.lock().map_err(|_| died())?;
            state.reading = false;
            match read {
                Ok(Some(reply)) => {
                    let result = reply_result(slot.index, reply.outcome);
                    if reply.id == id {
                        state.waiting.remove(&id);
                        conn.changed.notify_all();
                        return result;
                    }
                    // Another caller's; a reply nobody waits for (its caller gave up) is dropped.
                    if state.waiting.contains(&reply.id) {
                        state.replies.insert(reply.id, result);
                    }
                }
                Err(e) if protocol::is_timeout(&e) => {}
                Ok(None) | Err(_) => {
                    // The stream ended (the worker died) or broke (a malformed reply): down.
                    if let Ok(Some(_)) | Err(_) = &read {
                        log::warn!("worker {} sent a malformed reply; restarting it", slot.index);
                        slot.kill();
                    }
                    state.closed = true;
                }
            }
            conn.changed.notify_all();
        }
    }

    /// The live worker with the fewest requests in flight below its capacity, counted as one
    /// more; waits for one until `deadline`.
    fn acquire(&self, deadline: Instant) -> Result<(Arc<Slot>, Arc<Conn>), WorkerError> {
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
                .filter(|s| s.in_flight.load(Ordering::Relaxed) < capacity)
                .filter_map(|s| s.conn().filter(|c| !c.is_closed()).map(|c| (s, c)))
                .min_by_key(|(s, _)| s.in_flight.load(Ordering::Relaxed));
            if let Some((slot, conn)) = best {
                slot.in_flight.fetch_add(1, Ordering::Relaxed);
                return Ok((slot.clone(), conn));
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
            if let Some(conn) = slot.conn.lock().ok().and_then(|mut c| c.take()) {
                conn.close();
            }
            slot.kill();
        }
        for supervisor in self.supervisors.drain(..) {
            let _ = supervisor.join();
        }
    }
}

fn reply_result(worker: usize, outcome: Outcome) -> Result<Served, WorkerError> {
    match outcome {
        Outcome::Served { fork_us, run_us, vm_id, response } => {
            Ok(Served { response, fork_us, run_us, vm_id, response_charge: None })
        }
        Outcome::Settled => {
            Ok(Served { response: Vec::new(), fork_us: 0.0, run_us: 0.0, vm_id: 0, response_charge: None })
        }
        Outcome::Failed { kind, message } => Err(WorkerError::Failed { kind, message }),
        Outcome::Ready => Err(WorkerError::Start { worker, reason: "a second ready frame".into() }),
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

/// Waits for the worker's first frame, which says it is ready; then the connection's reads
/// time out every [`POLL`], so that a reading caller looks at its deadline.
fn connect(stream: UnixStream, timeout: Duration, write_timeout: Duration, index: usize) -> Result<Conn, WorkerError> {
    let not_ready = |reason: String| WorkerError::Start { worker: index, reason };
    let reading = stream.try_clone().map_err(|e| not_ready(e.to_string()))?;
    reading.set_read_timeout(Some(timeout)).map_err(|e| not_ready(e.to_string()))?;
    let mut reader = BufReader::new(reading);
    match protocol::read_reply(&mut reader, 0) {
        Ok(Some(reply)) if reply.outcome == Outcome::Ready => {}
        Ok(Some(_)) => return Err(not_ready("its first frame was not `ready`".into())),
        Ok(None) => return Err(not_ready("it exited before it was ready (its error output says why)".into())),
        Err(e) => return Err(not_ready(format!("no ready frame: {e}"))),
    }
    reader.get_ref().set_read_timeout(Some(POLL)).map_err(|e| not_ready(e.to_string()))?;
    // A worker that stops reading must not block a caller's write for ever: a write stuck this
    // long fails, and the worker is restarted.
    stream.set_write_timeout(Some(write_timeout)).map_err(|e| not_ready(e.to_string()))?;
    Ok(Conn {
        writer: Mutex::new(stream),
        reader: Mutex::new(reader),
        state: Mutex::new(ConnState::default()),
        changed: Condvar::new(),
    })
}

/// One worker's life, over and over: start it, wait until it is ready, watch it until its
/// process ends or its connection breaks, fail what it had in flight, restart it. The first
/// start's result goes to `started`.
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
            let write_timeout = shared.config.reply_grace.max(Duration::from_secs(1));
            connect(stream, shared.config.start_timeout, write_timeout, slot.index)
        });
        match session {
            Ok(conn) => {
                let conn = Arc::new(conn);
                if let Ok(mut c) = slot.conn.lock() {
                    *c = Some(conn.clone());
                }
                if let Some(tx) = started.take() {
                    let _ = tx.send(Ok(()));
                }
                {
                    let (lock, room) = &shared.room;
                    let _guard = lock.lock();
                    room.notify_all();
                }
                // Watch: the process's end, or a caller finding the connection broken.
                while !shared.stopping.load(Ordering::Relaxed) && !conn.is_closed() {
                    let exited = slot
                        .child
                        .lock()
                        .map_or(true, |mut c| c.as_mut().is_none_or(|c| !matches!(c.try_wait(), Ok(None))));
                    if exited {
                        break;
                    }
                    std::thread::sleep(POLL);
                }
                // Down: no new requests; the in-flight ones fail.
                if let Ok(mut c) = slot.conn.lock() {
                    c.take();
                }
                conn.close();
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
        slot.kill();
        reap(slot);
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

fn reap(slot: &Slot) {
    if let Ok(mut child) = slot.child.lock() {
        if let Some(mut child) = child.take() {
            let _ = child.wait();
        }
    }
    slot.pid.store(0, Ordering::Relaxed);
}
