//! The frames between a supervisor and its worker processes, over a Unix stream socket.
//!
//! Every frame starts with a magic and carries its length, and every length is checked
//! against a limit before anything is allocated: each side treats the other's bytes as
//! untrusted (a worker runs guests; a supervisor's socket could be the wrong peer).
//!
//! - request, supervisor → worker: `"MU2Q"`, kind (u8: 0 serve, 1 settle), id (u64),
//!   timeout in ms (u32), body length (u32), body;
//! - reply, worker → supervisor: `"MU2R"`, id (u64), status (u8: 0 served, 1 failed, 2 ready,
//!   3 settled), failure kind (u8, an index into `FailureKind::ALL`), fork µs (f64), run µs
//!   (f64), VM id (u64), body length (u32), body (the response, or the failure's message).
//!
//! Integers and floats are little-endian.

use std::io::{self, Read, Write};
use std::time::Duration;

use crate::error::FailureKind;

const REQUEST_MAGIC: [u8; 4] = *b"MU2Q";
const REPLY_MAGIC: [u8; 4] = *b"MU2R";
const REQUEST_HEADER: usize = 4 + 1 + 8 + 4 + 4;
const REPLY_HEADER: usize = 4 + 8 + 1 + 1 + 8 + 8 + 8 + 4;

/// The longest failure message a reply carries (longer ones are cut).
pub(crate) const MAX_MESSAGE: usize = 16 * 1024;

/// What a request asks of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    /// Serve the body on a VM of its own.
    Serve,
    /// Answer once the worker's VMs are ready again (a full pool, every reset done).
    Settle,
}

/// A request as a worker reads it.
#[derive(Debug)]
pub(crate) struct Request {
    pub kind: RequestKind,
    pub id: u64,
    pub timeout: Duration,
    pub body: Vec<u8>,
}

/// What a reply says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// The request was served.
    Served { fork_us: f64, run_us: f64, vm_id: u64, response: Vec<u8> },
    /// It failed; the kind keeps its exit code and HTTP status across the process boundary.
    Failed { kind: FailureKind, message: String },
    /// The worker is up and serving (its first frame, id 0).
    Ready,
    /// A settle request is done.
    Settled,
}

/// A reply as a supervisor reads it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reply {
    pub id: u64,
    pub outcome: Outcome,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Whether `e` is a read timeout (`SO_RCVTIMEO`) rather than a failure.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of stream before the first byte.
/// A read timeout before the first byte is returned as it is (nothing was consumed: the
/// caller may read again); one inside the frame is a broken frame.
fn read_frame_start(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if filled > 0 && is_timeout(&e) => return Err(invalid("frame cut short")),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads a frame's body; a timeout inside it is a broken frame.
fn read_body(r: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut body = vec![0u8; len];
    match r.read_exact(&mut body) {
        Ok(()) => Ok(body),
        Err(e) if is_timeout(&e) => Err(invalid("frame cut short")),
        Err(e) => Err(e),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Writes a request: its header, then the body as it is (no copy into a frame buffer).
pub(crate) fn write_request(
    w: &mut impl Write,
    kind: RequestKind,
    id: u64,
    timeout: Duration,
    body: &[u8],
) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| invalid("request too long for a frame"))?;
    let mut header = [0u8; REQUEST_HEADER];
    header[..4].copy_from_slice(&REQUEST_MAGIC);
    header[4] = match kind {
        RequestKind::Serve => 0,
        RequestKind::Settle => 1,
    };
    header[5..13].copy_from_slice(&id.to_le_bytes());
    let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    header[13..17].copy_from_slice(&ms.to_le_bytes());
    header[17..21].copy_from_slice(&len.to_le_bytes());
    w.write_all(&header)?;
    w.write_all(body)
}

/// Reads the next request; `None` when the supervisor closed the connection between frames.
pub(crate) fn read_request(r: &mut impl Read, max_body: usize) -> io::Result<Option<Request>> {
    let mut header = [0u8; REQUEST_HEADER];
    if !read_frame_start(r, &mut header)? {
        return Ok(None);
    }
    if header[..4] != REQUEST_MAGIC {
        return Err(invalid("not a request frame"));
    }
    let kind = match header[4] {
        0 => RequestKind::Serve,
        1 => RequestKind::Settle,
        _ => return Err(invalid("unknown request kind")),
    };
    let len = u32_at(&header, 17) as usize;
    if len > max_body {
        return Err(invalid("request body over the limit"));
    }
    let body = read_body(r, len)?;
    let timeout = Duration::from_millis(u64::from(u32_at(&header, 13)));
    Ok(Some(Request { kind, id: u64_at(&header, 5), timeout, body }))
}

/// Writes a reply, header and body in one buffer (replies are written by several threads
/// under one lock; one write keeps the lock short).
pub(crate) fn write_reply(w: &mut impl Write, reply: &Reply) -> io::Result<()> {
    let (status, kind, fork_us, run_us, vm_id, body): (u8, u8, f64, f64, u64, &[u8]) = match &reply.outcome {
        Outcome::Served { fork_us, run_us, vm_id, response } => (0, 0, *fork_us, *run_us, *vm_id, response),
        Outcome::Failed { kind, message } => {
            let index = FailureKind::ALL.iter().position(|k| k == kind).unwrap_or(FailureKind::ALL.len() - 1);
            let mut end = message.len().min(MAX_MESSAGE);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            (1, index as u8, 0.0, 0.0, 0, &message.as_bytes()[..end])
        }
        Outcome::Ready => (2, 0, 0.0, 0.0, 0, &[]),
        Outcome::Settled => (3, 0, 0.0, 0.0, 0, &[]),
    };
    let len = u32::try_from(body.len()).map_err(|_| invalid("reply too long for a frame"))?;
    let mut frame = Vec::with_capacity(REPLY_HEADER + body.len());
    frame.extend_from_slice(&REPLY_MAGIC);
    frame.extend_from_slice(&reply.id.to_le_bytes());
    frame.push(status);
    frame.push(kind);
    frame.extend_from_slice(&fork_us.to_le_bytes());
    frame.extend_from_slice(&run_us.to_le_bytes());
    frame.extend_from_slice(&vm_id.to_le_bytes());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(body);
    w.write_all(&frame)
}

/// Reads the next reply; `None` when the worker closed the connection between frames.
pub(crate) fn read_reply(r: &mut impl Read, max_response: usize) -> io::Result<Option<Reply>> {
    let mut header = [0u8; REPLY_HEADER];
    if !read_frame_start(r, &mut header)? {
        return Ok(None);
    }
    if header[..4] != REPLY_MAGIC {
        return Err(invalid("not a reply frame"));
    }
    let id = u64_at(&header, 4);
    let (status, kind) = (header[12], header[13]);
    let f64_at = |at| f64::from_bits(u64_at(&header, at));
    let (fork_us, run_us, vm_id) = (f64_at(14), f64_at(22), u64_at(&header, 30));
    let len = u32_at(&header, 38) as usize;
    let limit = if status == 0 { max_response } else { MAX_MESSAGE };
    if len > limit {
        return Err(invalid("reply body over the limit"));
    }
    let body = read_body(r, len)?;
    let outcome = match status {
        0 if fork_us.is_finite() && run_us.is_finite() => Outcome::Served { fork_us, run_us, vm_id, response: body },
        1 => Outcome::Failed {
            kind: *FailureKind::ALL.get(usize::from(kind)).ok_or_else(|| invalid("unknown failure kind"))?,
            message: String::from_utf8_lossy(&body).into_owned(),
        },
        2 if len == 0 => Outcome::Ready,
        3 if len == 0 => Outcome::Settled,
        _ => return Err(invalid("malformed reply")),
    };
    Ok(Some(Reply { id, outcome }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let mut wire = Vec::new();
        write_request(&mut wire, RequestKind::Serve, 7, Duration::from_millis(1500), b"hello").unwrap();
        write_request(&mut wire, RequestKind::Settle, 8, Duration::from_secs(1), b"").unwrap();
        let mut r = wire.as_slice();
        let first = read_request(&mut r, 16).unwrap().unwrap();
        assert_eq!(
            (first.kind, first.id, first.timeout, first.body.as_slice()),
            (RequestKind::Serve, 7, Duration::from_millis(1500), &b"hello"[..])
        );
        assert_eq!(read_request(&mut r, 16).unwrap().unwrap().kind, RequestKind::Settle);
        assert!(read_request(&mut r, 16).unwrap().is_none(), "a clean end between frames");

        let replies = [
            Reply {
                id: 7,
                outcome: Outcome::Served { fork_us: 1.5, run_us: 80.0, vm_id: 3, response: b"hello".to_vec() },
            },
            Reply { id: 9, outcome: Outcome::Failed { kind: FailureKind::GuestCrash, message: "fault".into() } },
            Reply { id: 0, outcome: Outcome::Ready },
            Reply { id: 8, outcome: Outcome::Settled },
        ];
        let mut wire = Vec::new();
        for reply in &replies {
            write_reply(&mut wire, reply).unwrap();
        }
        let mut r = wire.as_slice();
        for reply in &replies {
            assert_eq!(&read_reply(&mut r, 16).unwrap().unwrap(), reply);
        }
        assert!(read_reply(&mut r, 16).unwrap().is_none());
    }

    #[test]
    fn hostile_frames_are_refused_before_allocating() {
        let mut wire = Vec::new();
        write_request(&mut wire, RequestKind::Serve, 1, Duration::ZERO, &[0u8; 100]).unwrap();
        assert!(read_request(&mut wire.as_slice(), 99).is_err(), "body over the limit");
        let mut bad = wire.clone();
        bad[0] = b'X';
        assert!(read_request(&mut bad.as_slice(), 1000).is_err(), "wrong magic");
        let mut bad = wire.clone();
        bad[4] = 9;
        assert!(read_request(&mut bad.as_slice(), 1000).is_err(), "unknown kind");
        assert!(read_request(&mut &wire[..30], 1000).is_err(), "cut short inside the body");

        let mut wire = Vec::new();
        let failed = Reply { id: 1, outcome: Outcome::Failed { kind: FailureKind::Internal, message: "x".into() } };
        write_reply(&mut wire, &failed).unwrap();
        let mut bad = wire.clone();
        bad[13] = 200;
        assert!(read_reply(&mut bad.as_slice(), 10).is_err(), "unknown failure kind");
        let mut bad = wire.clone();
        bad[12] = 2;
        assert!(read_reply(&mut bad.as_slice(), 10).is_err(), "a ready frame with a body");
        let served =
            Reply { id: 1, outcome: Outcome::Served { fork_us: 0.0, run_us: 0.0, vm_id: 0, response: vec![1; 11] } };
        let mut wire = Vec::new();
        write_reply(&mut wire, &served).unwrap();
        assert!(read_reply(&mut wire.as_slice(), 10).is_err(), "response over the limit");
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let message = "é".repeat(MAX_MESSAGE);
        let mut wire = Vec::new();
        write_reply(&mut wire, &Reply { id: 2, outcome: Outcome::Failed { kind: FailureKind::BadInput, message } })
            .unwrap();
        match read_reply(&mut wire.as_slice(), 0).unwrap().unwrap().outcome {
            Outcome::Failed { message, .. } => {
                assert!(message.len() <= MAX_MESSAGE && message.chars().all(|c| c == 'é'))
            }
            other => panic!("{other:?}"),
        }
    }
}
