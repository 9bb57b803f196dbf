//! A small closed-loop HTTP/1.1 load generator for `scripts/test-cluster` and `scripts/soak`:
//! a fixed number of requests over keep-alive connections at a fixed concurrency, bounded in
//! time, with every request's outcome counted — status, or the connection error that stood in
//! for one — and latency percentiles. The connection is opened again after a
//! `connection: close` or an error; no request is retried (retrying is the load balancer's
//! job, and is what is tested).
//!
//! ```sh
//! cargo run --release -p mu2 --example loadgen -- --addr 127.0.0.1:8080 --path /echo \
//!     --requests 20000 --concurrency 8 --check-echo
//! # 1 % of the requests, chosen at random, to a route whose guest crashes: each must be a 502
//! loadgen --addr 127.0.0.1:8080 --path /echo --check-echo --crash-path /crash --crash-percent 1
//! # while the server shuts down: a 503 or a refused connection is `refused`, not `failed`
//! loadgen --addr 127.0.0.1:8080 --path /echo --check-echo --allow-refused
//! ```
//!
//! Prints one JSON object: `requests`, `ok` (2xx with the right body), `failed` (everything
//! else but what `--allow-refused` lets pass and the crash requests answered
//! `--crash-status`), `refused`, `crash_requests` (sent to `--crash-path`) and `crash_ok` (of
//! them, those answered `--crash-status`),
//! `statuses`, `errors` (by kind: `connect: …`, `new connection: …` or `kept-alive
//! connection: …`, then what happened), `servers` (counts by the value of
//! `--server-header`), `seconds`, `rps`, `p50_us`, `p90_us`, `p99_us`, `max_us` (over every
//! request), `seed`. Exits 0 whatever the outcomes; the caller judges.
//!
//! `--allow-refused` counts as `refused` a 503 answer and a connection the server refused
//! (ECONNREFUSED: no listener; or reset before `connect` returned), where the request was
//! never sent; nothing else: once the request is sent, a reset, an end of stream without an
//! answer or a truncated answer stays a failure. A connection reset before a byte of the answer came,
//! on a connection opened for that request, is counted apart in `reset_before_answer` (it is
//! also in `failed`): the sign of a connection the kernel had queued for a listener that was
//! closed before accepting it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use mu2_vmm::api::client::parse_response;

/// Largest response head or body accepted: the test's responses are a few hundred bytes.
const MAX_RESPONSE: usize = 1 << 20;
/// How many distinct error messages are kept.
const MAX_ERROR_KINDS: usize = 32;

#[derive(Parser, Debug)]
struct Args {
    /// The server, HOST:PORT.
    #[arg(long)]
    addr: String,
    /// Request path; repeat to send to several in turn.
    #[arg(long = "path", default_value = "/echo")]
    paths: Vec<String>,
    /// Requests in all.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Requests in flight at once (one connection each).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Stop after this many seconds even if requests are left (they count as not sent).
    #[arg(long, default_value_t = 120.0)]
    max_seconds: f64,
    /// Count a 2xx as ok only if its body is the request's body (an echo function).
    #[arg(long)]
    check_echo: bool,
    /// Count responses by the value of this header (e.g. the load balancer's server name).
    #[arg(long)]
    server_header: Option<String>,
    /// Write the number of completed requests to this file every 50 ms.
    #[arg(long)]
    progress_file: Option<PathBuf>,
    /// Send a random share of the requests (`--crash-percent`) to this path instead: a route
    /// whose guest crashes. Each must be answered `--crash-status`.
    #[arg(long)]
    crash_path: Option<String>,
    /// The share of requests sent to `--crash-path`, percent.
    #[arg(long, default_value_t = 1.0)]
    crash_percent: f64,
    /// The status every request to `--crash-path` must get.
    #[arg(long, default_value_t = 502)]
    crash_status: u16,
    /// Seed of the choice of crash requests (default: from the clock); the report has it.
    #[arg(long)]
    seed: Option<u64>,
    /// Count a 503 answer and a refused connection as `refused`, not `failed`: a server
    /// shutting down may refuse, but not drop what it accepted.
    #[arg(long)]
    allow_refused: bool,
}

#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    failed: usize,
    refused: usize,
    reset_before_answer: usize,
    crash_requests: usize,
    crash_ok: usize,
    statuses: BTreeMap<u16, usize>,
    errors: BTreeMap<String, usize>,
    servers: BTreeMap<String, usize>,
    latencies_us: Vec<u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.refused += other.refused;
        self.reset_before_answer += other.reset_before_answer;
        self.crash_requests += other.crash_requests;
        self.crash_ok += other.crash_ok;
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            if self.errors.len() < MAX_ERROR_KINDS || self.errors.contains_key(&k) {
                *self.errors.entry(k).or_default() += v;
            }
        }
        for (k, v) in other.servers {
            *self.servers.entry(k).or_default() += v;
        }
        self.latencies_us.extend(other.latencies_us);
    }

    fn error(&mut self, message: String) {
        self.failed += 1;
        self.note(message);
    }

    fn note(&mut self, message: String) {
        if self.errors.len() < MAX_ERROR_KINDS || self.errors.contains_key(&message) {
            *self.errors.entry(message).or_default() += 1;
        }
    }
}

/// Why a request got no answer.
#[derive(Debug)]
enum NoAnswer {
    /// The connection could not be opened; `refused` if the server refused or reset it.
    Connect { refused: bool, message: String },
    /// The connection failed after it was open. `reset_first` if it was opened for this
    /// request and reset (or broken) before a byte of the answer came.
    Stream { fresh: bool, reset_first: bool, message: String },
}

/// A deterministic pseudo-random 64-bit value of `x` (splitmix64's finaliser), for choosing
/// requests at random but reproducibly from a seed.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Whether request `i` goes to the crash path: `percent` % of the indices, by the seed.
fn is_crash(seed: u64, i: usize, percent: f64) -> bool {
    let threshold = (percent.clamp(0.0, 100.0) / 100.0 * u64::MAX as f64) as u64;
    mix(seed ^ mix(i as u64)) < threshold
}

/// One complete response read off a keep-alive connection.
struct Answer {
    status: u16,
    body: Vec<u8>,
    close: bool,
    server: Option<String>,
}

/// A failure to read a response: what happened, and whether it was a reset (or a broken
/// pipe) before any byte of it came.
struct ReadError {
    message: String,
    reset_first: bool,
}

impl From<String> for ReadError {
    fn from(message: String) -> Self {
        ReadError { message, reset_first: false }
    }
}

impl From<&str> for ReadError {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

fn is_reset(kind: std::io::ErrorKind) -> bool {
    matches!(kind, std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
}

/// Reads one response: the head up to the blank line, then `content-length` bytes.
fn read_answer(stream: &mut TcpStream, buf: &mut Vec<u8>, server_header: Option<&str>) -> Result<Answer, ReadError> {
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > MAX_RESPONSE {
            return Err("response head too large".into());
        }
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err("closed without a response".into()),
            Ok(0) => return Err("closed inside the response head".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                let reset_first = buf.is_empty() && is_reset(e.kind());
                let at = if buf.is_empty() { "before the response" } else { "inside the response head" };
                return Err(ReadError { message: format!("reading {at}: {}", e.kind()), reset_first });
            }
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let header = |name: &str| {
        head.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')).map(|v| v.trim().to_string()))
    };
    let length: usize = match header("content-length") {
        Some(v) => v.parse().map_err(|_| "bad content-length".to_string())?,
        None => return Err("response without content-length".into()),
    };
    if length > MAX_RESPONSE {
        return Err("response body too large".into());
    }
    while buf.len() < head_end + length {
        match stream.read(&mut chunk) {
            Ok(0) => return Err("closed inside the response body".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("reading inside the response body: {}", e.kind()).into()),
        }
    }
    let whole: Vec<u8> = buf.drain(..head_end + length).collect();
    let parsed = parse_response(&whole, false).map_err(|e| format!("malformed response: {e}"))?;
    let close = header("connection").is_some_and(|v| v.contains("close"));
    let server = server_header.and_then(|h| parsed.header(&h.to_ascii_lowercase()).map(str::to_string));
    Ok(Answer { status: parsed.status, body: parsed.body, close, server })
}

fn connect(addr: SocketAddr) -> Result<TcpStream, NoAnswer> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| NoAnswer::Connect {
        // Refused, or reset before the connection was established: the request was not sent.
        refused: matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset),
        message: format!("connect: {}", e.kind()),
    })?;
    let setup = |e: std::io::Error| NoAnswer::Connect { refused: false, message: format!("connect: setting up: {e}") };
    stream.set_nodelay(true).map_err(setup)?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(setup)?;
    Ok(stream)
}

fn worker(
    args: &Args,
    seed: u64,
    addr: SocketAddr,
    next: &AtomicUsize,
    done: &AtomicUsize,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::new();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= args.requests || Instant::now() >= deadline {
            break;
        }
        let crash = args.crash_path.as_ref().filter(|_| is_crash(seed, i, args.crash_percent));
        let path = crash.unwrap_or(&args.paths[i % args.paths.len()]);
        let body = format!("request {i}");
        let request =
            format!("POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n\r\n{body}", args.addr, body.len());
        let start = Instant::now();
        let result = (|| {
            let fresh = conn.is_none();
            let stream = match conn.as_mut() {
                Some(s) => s,
                None => {
                    buf.clear();
                    conn.insert(connect(addr)?)
                }
            };
            let stream_error =
                |e: ReadError| NoAnswer::Stream { fresh, reset_first: e.reset_first, message: e.message };
            stream.write_all(request.as_bytes()).map_err(|e| {
                stream_error(ReadError { message: format!("writing: {}", e.kind()), reset_first: is_reset(e.kind()) })
            })?;
            read_answer(stream, &mut buf, args.server_header.as_deref()).map_err(stream_error)
        })();
        let elapsed = start.elapsed();
        if crash.is_some() {
            tally.crash_requests += 1;
        }
        match result {
            Ok(answer) => {
                *tally.statuses.entry(answer.status).or_default() += 1;
                if let Some(server) = answer.server {
                    *tally.servers.entry(server).or_default() += 1;
                }
                if crash.is_some() {
                    if answer.status == args.crash_status {
                        tally.crash_ok += 1;
                    } else if args.allow_refused && answer.status == 503 {
                        tally.refused += 1;
                    } else {
                        tally.error(format!("{path}: status {} instead of {}", answer.status, args.crash_status));
                    }
                } else {
                    let good_body = !args.check_echo || answer.body == body.as_bytes();
                    if (200..300).contains(&answer.status) && good_body {
                        tally.ok += 1;
                    } else if (200..300).contains(&answer.status) {
                        tally.error("2xx with a wrong body".into());
                    } else if args.allow_refused && answer.status == 503 {
                        tally.refused += 1;
                    } else {
                        tally.failed += 1;
                    }
                }
                if answer.close {
                    conn = None;
                }
            }
            Err(NoAnswer::Connect { refused, message }) => {
                if refused && args.allow_refused {
                    tally.refused += 1;
                    tally.note(message);
                } else {
                    tally.error(message);
                }
                conn = None;
            }
            Err(NoAnswer::Stream { fresh, reset_first, message }) => {
                if fresh && reset_first {
                    tally.reset_before_answer += 1;
                }
                let which = if fresh { "new connection" } else { "kept-alive connection" };
                tally.error(format!("{which}: {message}"));
                conn = None;
            }
        }
        tally.latencies_us.push(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
        done.fetch_add(1, Ordering::Relaxed);
    }
    tally
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    if args.concurrency == 0 || args.paths.is_empty() {
        return Err("--concurrency and --path need at least one".into());
    }
    if !(0.0..=100.0).contains(&args.crash_percent) {
        return Err("--crash-percent must be from 0 to 100".into());
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    let addr = args
        .addr
        .to_socket_addrs()
        .map_err(|e| format!("{}: {e}", args.addr))?
        .next()
        .ok_or_else(|| format!("{}: no address", args.addr))?;
    let args = Arc::new(args);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.max_seconds.clamp(0.0, 3600.0));
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (args, next, done, total) = (args.clone(), next.clone(), done.clone(), total.clone());
            std::thread::spawn(move || {
                let tally = worker(&args, seed, addr, &next, &done, deadline);
                total.lock().unwrap_or_else(|p| p.into_inner()).merge(tally);
            })
        })
        .collect();
    if let Some(path) = &args.progress_file {
        while !workers.iter().all(|w| w.is_finished()) {
            let _ = std::fs::write(path, format!("{}\n", done.load(Ordering::Relaxed)));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for w in workers {
        w.join().map_err(|_| "a worker panicked".to_string())?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut tally = std::mem::take(&mut *total.lock().unwrap_or_else(|p| p.into_inner()));
    if let Some(path) = &args.progress_file {
        let _ = std::fs::write(path, format!("{}\n", done.load(Ordering::Relaxed)));
    }
    tally.latencies_us.sort_unstable();
    let completed = tally.latencies_us.len();
    let report = serde_json::json!({
        "requests": completed,
        "not_sent": args.requests.saturating_sub(completed),
        "ok": tally.ok,
        "failed": tally.failed,
        "refused": tally.refused,
        "reset_before_answer": tally.reset_before_answer,
        "crash_requests": tally.crash_requests,
        "crash_ok": tally.crash_ok,
        "statuses": tally.statuses.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
        "errors": tally.errors,
        "servers": tally.servers,
        "seconds": seconds,
        "rps": completed as f64 / seconds.max(1e-9),
        "p50_us": percentile(&tally.latencies_us, 50.0),
        "p90_us": percentile(&tally.latencies_us, 90.0),
        "p99_us": percentile(&tally.latencies_us, 99.0),
        "max_us": tally.latencies_us.last().copied().unwrap_or(0),
        "seed": seed,
    });
    println!("{report}");
    Ok(())
}
