//! Worker processes: VMs sharded across processes, each with its own address space.
//!
//! Many VMs in one process share its address space, and what KVM does per address space grows
//! with them: every copy-on-write fault runs the MMU-notifier callbacks of every VM registered
//! on it, KVM_CREATE_VM takes all of its locks, VM creation and page faults contend for its
//! mmap lock. A [`Workers`] pool runs N worker processes instead, each with its own engine
//! (VMs, builders, resetter, reaper), and sends each request to one with spare capacity over a
//! Unix socket, the request bytes written once; the reply comes back the same way. A worker
//! that dies fails only the requests it had in flight and is restarted; one that does not
//! answer past its request's deadline is killed and restarted.
//!
//! The supervisor side is [`Workers`] (`start`, `serve`, `settle`); the worker side is
//! [`serve_requests`], which a worker process runs with a [`Handler`] (a `fork::Engine`, or
//! anything that serves a request) on the socket it got as its standard input. The frames are
//! in `protocol`.

mod child;
mod protocol;
mod supervisor;

use crate::error::{Classify, FailureKind};

pub use child::{serve_requests, Handler};
pub use supervisor::{Spawn, WorkerConfig, Workers};

/// Why a request through the workers failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A worker process could not be started.
    #[error("starting worker {worker}")]
    Spawn {
        /// Which worker.
        worker: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A worker started but did not become ready.
    #[error("worker {worker} did not become ready: {reason}")]
    Start {
        /// Which worker.
        worker: usize,
        /// What went wrong, as seen from the supervisor.
        reason: String,
    },
    /// The worker serving the request died before answering.
    #[error("worker {worker} died while serving the request")]
    Died {
        /// Which worker.
        worker: usize,
    },
    /// The worker did not answer past the request's deadline and was killed.
    #[error("worker {worker} did not answer in time and was restarted")]
    Hung {
        /// Which worker.
        worker: usize,
    },
    /// Every worker was busy until the request's deadline.
    #[error("no worker had room for the request before its deadline")]
    Busy,
    /// The request is larger than a worker accepts.
    #[error("a request of {len} bytes is over the workers' limit of {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The request failed in its worker; the kind is the worker's error's (the message is its
    /// whole chain of causes, which cannot cross the process boundary as values).
    #[error("{message}")]
    Failed {
        /// The failure's kind.
        kind: FailureKind,
        /// The worker's error chain.
        message: String,
    },
    /// The pool is shutting down.
    #[error("the workers are shutting down")]
    Stopped,
}

impl Classify for WorkerError {
    fn kind(&self) -> FailureKind {
        match self {
            WorkerError::Spawn { source, .. } => crate::error::io_kind(source),
            WorkerError::Failed { kind, .. } => *kind,
            WorkerError::Hung { .. } => FailureKind::Timeout,
            WorkerError::Busy => FailureKind::ResourceExhausted,
            WorkerError::TooLarge { .. } => FailureKind::BadInput,
            WorkerError::Start { .. } | WorkerError::Died { .. } | WorkerError::Stopped => FailureKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    //! The supervisor against real worker processes: this test binary started again with
    //! `MU2_TEST_WORKER` set and only `worker_process` selected, serving with [`Echo`].

    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::fork::Served;

    /// Echoes the request, except: `die` exits the process, `slow…` answers after 300 ms,
    /// `hang` never answers, `fail` fails as a guest crash.
    struct Echo;

    #[derive(Debug, thiserror::Error)]
    #[error("the guest crashed on purpose")]
    struct Crashed;

    impl Classify for Crashed {
        fn kind(&self) -> FailureKind {
            FailureKind::GuestCrash
        }
    }

    impl Handler for Echo {
        type Error = Crashed;
        fn serve(&self, request: &[u8], _timeout: Duration) -> Result<Served, Crashed> {
            match request {
                b"die" => std::process::exit(3),
                b"hang" => std::thread::sleep(Duration::from_secs(3600)),
                b"fail" => return Err(Crashed),
                slow if slow.starts_with(b"slow") => std::thread::sleep(Duration::from_millis(300)),
                _ => {}
            }
            Ok(Served {
                response: request.to_vec(),
                fork_us: 1.0,
                run_us: 2.0,
                vm_id: u64::from(std::process::id()),
                response_charge: None,
            })
        }
        fn settle(&self, _timeout: Duration) {}
    }

    #[test]
    fn worker_process() {
        if std::env::var_os("MU2_TEST_WORKER").is_none() {
            return;
        }
        let stdin = std::io::stdin().as_fd().try_clone_to_owned().expect("the socket on stdin");
        let result = serve_requests(UnixStream::from(stdin), &Echo, 2, 1 << 16);
        std::process::exit(i32::from(result.is_err()));
    }

    fn start(workers: usize, capacity: usize) -> Workers {
        let config = WorkerConfig {
            workers,
            capacity,
            max_request: 1 << 16,
            max_response: 1 << 16,
            start_timeout: Duration::from_secs(20),
            reply_grace: Duration::from_millis(300),
        };
        let spawn = |_index: usize| {
            let mut command = Command::new(std::env::current_exe().expect("the test binary"));
            command.args(["--exact", "worker::tests::worker_process", "--nocapture", "--test-threads=1"]);
            command.env("MU2_TEST_WORKER", "1");
            command
        };
        Workers::start(config, Box::new(spawn)).expect("the workers start")
    }

    fn serve(workers: &Workers, body: &[u8]) -> Result<Served, WorkerError> {
        workers.serve(body, Duration::from_secs(5))
    }

    #[test]
    fn requests_spread_over_workers_and_failures_keep_their_kind() {
        let workers = start(2, 1);
        let pids = workers.pids();
        assert!(pids.iter().all(|&p| p != 0) && pids[0] != pids[1], "{pids:?}");
        let served = serve(&workers, b"hello").expect("served");
        assert_eq!(served.response, b"hello");
        // Two slow requests at once go to the two workers (capacity 1 each).
        let seen: Vec<u64> = std::thread::scope(|s| {
            let a = s.spawn(|| serve(&workers, b"slow").map(|r| r.vm_id));
            let b = s.spawn(|| serve(&workers, b"slow").map(|r| r.vm_id));
            [a.join().unwrap().unwrap(), b.join().unwrap().unwrap()].into()
        });
        assert_ne!(seen[0], seen[1], "one request on each worker");
        match serve(&workers, b"fail") {
            Err(e @ WorkerError::Failed { .. }) => {
                assert_eq!(e.kind(), FailureKind::GuestCrash);
                assert!(e.to_string().contains("crashed on purpose"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(workers.serve(&[0; 70_000], Duration::from_secs(1)), Err(WorkerError::TooLarge { .. })));
        assert_eq!(workers.restarts(), 0);
    }

    #[test]
    fn replies_reach_their_own_callers_when_a_worker_serves_several_at_once() {
        let workers = start(1, 2);
        let bodies: [&[u8]; 4] = [b"slow-1", b"fast-2", b"slow-3", b"fast-4"];
        std::thread::scope(|s| {
            let workers = &workers;
            let handles: Vec<_> = bodies.iter().map(|&b| s.spawn(move || (b, serve(workers, b)))).collect();
            for handle in handles {
                let (body, served) = handle.join().unwrap();
                assert_eq!(served.expect("served").response, body);
            }
        });
    }

    #[test]
    fn a_dead_worker_fails_only_its_requests_and_comes_back() {
        let workers = start(2, 1);
        let (slow, died) = std::thread::scope(|s| {
            let slow = s.spawn(|| serve(&workers, b"slow"));
            std::thread::sleep(Duration::from_millis(50));
            let died = s.spawn(|| serve(&workers, b"die"));
            (slow.join().unwrap(), died.join().unwrap())
        });
        assert_eq!(slow.expect("the other worker's request is served").response, b"slow");
        assert!(matches!(died, Err(WorkerError::Died { .. })), "{died:?}");
        let until = Instant::now() + Duration::from_secs(20);
        while workers.pids().contains(&0) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(workers.restarts(), 1);
        for _ in 0..4 {
            assert_eq!(serve(&workers, b"again").expect("served after the restart").response, b"again");
        }
    }

    #[test]
    fn a_hung_worker_is_killed_after_the_grace_and_restarted() {
        let workers = start(1, 2);
        let pid = workers.pids()[0];
        let started = Instant::now();
        let hung = workers.serve(b"hang", Duration::from_millis(100));
        assert!(matches!(hung, Err(WorkerError::Hung { .. })), "{hung:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let until = Instant::now() + Duration::from_secs(20);
        while workers.pids()[0] == pid || workers.pids()[0] == 0 {
            assert!(Instant::now() < until, "restarted");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(serve(&workers, b"back").expect("served").response, b"back");
    }
}
