//! HTTP/1.1 framing for the control API, the dispatcher and the client: read one request from
//! a connection (head parsed by `httparse`, body by `content-length`), write one response, and
//! parse one response (the daemon's, for the client; a guest's, for the dispatcher).
//! Keep-alive and pipelining work; chunked request bodies are refused (411).

use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::budget::{ByteBudget, ByteCharge, BytesSpent};

/// Most headers in a request.
pub const MAX_HEADERS: usize = 64;
/// Largest request or response head.
pub const MAX_HEAD: usize = 64 << 10;

/// A parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The method.
    pub method: String,
    /// The request target (path and query).
    pub target: String,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
    /// Whether the client keeps the connection open after the response.
    pub keep_alive: bool,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }
}

/// Why no request could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The client closed the connection (or went idle while the server stops) between
    /// requests.
    #[error("connection closed")]
    Closed,
    /// The socket failed.
    #[error("reading the request")]
    Io(#[source] std::io::Error),
    /// Not HTTP/1.x.
    #[error("malformed HTTP request")]
    Malformed(#[source] httparse::Error),
    /// The request line lacks a part.
    #[error("malformed HTTP request: incomplete request line")]
    IncompleteLine,
    /// The content-length is not a number.
    #[error("malformed HTTP request: bad content-length")]
    BadContentLength,
    /// The client closed the connection in the middle of a request.
    #[error("malformed HTTP request: connection closed inside the request {0}")]
    Cut(&'static str),
    /// The head exceeds [`MAX_HEAD`].
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The body exceeds the limit.
    #[error("request body of {length} bytes exceeds the {limit}-byte limit")]
    BodyTooLarge {
        /// Announced length.
        length: u64,
        /// The limit.
        limit: usize,
    },
    /// A body without content-length (chunked).
    #[error("request bodies need a content-length (chunked transfer encoding is not supported)")]
    LengthRequired,
    /// The request did not arrive within the read timeout.
    #[error("the request {0} did not arrive within the read timeout")]
    TooSlow(&'static str),
    /// The body does not fit the bytes the daemon buffers at once.
    #[error("no room for the request body now")]
    Busy(#[source] BytesSpent),
}

impl ReadError {
    /// The status to answer with, if the connection can still carry an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ReadError::Closed | ReadError::Io(_) => None,
            ReadError::Malformed(_) | ReadError::IncompleteLine | ReadError::BadContentLength | ReadError::Cut(_) => {
                Some(400)
            }
            ReadError::HeadTooLarge => Some(431),
            ReadError::BodyTooLarge { .. } => Some(413),
            ReadError::LengthRequired => Some(411),
            ReadError::TooSlow(_) => Some(408),
            ReadError::Busy(_) => Some(503),
        }
    }
}

/// How long a connection may sit idle between requests before the server closes it.
pub const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// What reading one request may take.
#[derive(Debug, Clone)]
pub struct ReadLimits {
    /// Largest body, bytes (413 beyond).
    pub max_body: usize,
    /// How long a request may take to arrive, head and body, from its first byte (408
    /// beyond): a client sending a byte now and then holds nothing for long.
    pub read_timeout: Duration,
    /// Where bodies are counted while they are read and served, with every other
    /// connection's (503 when they do not fit).
    pub bodies: Option<Arc<ByteBudget>>,
}

impl ReadLimits {
    /// A body limit, the default read timeout, and no shared budget.
    pub fn new(max_body: usize) -> ReadLimits {
        ReadLimits { max_body, read_timeout: DEFAULT_READ_TIMEOUT, bodies: None }
    }
}

/// The default of [`ReadLimits::read_timeout`].
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads one request, with its body's charge of `limits.bodies`, held until it is dropped.
/// `buf` carries bytes already read past the previous request (pipelining). The stream
/// should have a short read timeout: whenever a read times out with no request started,
/// `stopping()` is asked whether to give up.
pub fn read_request(
    stream: &mut impl Read,
    buf: &mut Vec<u8>,
    limits: &ReadLimits,
    stopping: &dyn Fn() -> bool,
) -> Result<(Request, Option<ByteCharge>), ReadError> {
    let mut chunk = [0u8; 16 << 10];
    let idle_since = Instant::now();
    // The request's clock starts at its first byte (now, if pipelined bytes are waiting).
    let mut started = (!buf.is_empty()).then(Instant::now);
    let late = |started: Option<Instant>| started.is_some_and(|t| t.elapsed() > limits.read_timeout);
    // Where the search for the head's end resumes: the head is parsed once it is complete,
    // not again on every read (a head sent a byte at a time must not cost its square).
    let mut searched = 0;
    let (head_len, mut request, length) = loop {
        if head_end(buf, &mut searched) {
            match parse_head(buf, limits.max_body)? {
                // Reads come in chunks, so a whole head can arrive past the limit at once.
                Some(parsed) if parsed.0 > MAX_HEAD => return Err(ReadError::HeadTooLarge),
                Some(parsed) => break parsed,
                None => {}
            }
        }
        if buf.len() > MAX_HEAD {
            return Err(ReadError::HeadTooLarge);
        }
        if late(started) {
            return Err(ReadError::TooSlow("head"));
        }
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(ReadError::Closed),
            Ok(0) => return Err(ReadError::Cut("head")),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                started.get_or_insert_with(Instant::now);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if buf.is_empty() && (stopping() || idle_since.elapsed() > IDLE_LIMIT) {
                    return Err(ReadError::Closed);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if buf.is_empty() && matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return Err(ReadError::Closed)
            }
            Err(e) => return Err(ReadError::Io(e)),
        }
    };
    buf.drain(..head_len);
    // The body is charged as it arrives, not as announced: a length that is not sent holds
    // nothing of the budget.
    let mut charge = match &limits.bodies {
        Some(bodies) if length > 0 => Some(bodies.charge(buf.len().min(length)).map_err(ReadError::Busy)?),
        _ => None,
    };
    while buf.len() < length {
        if late(started) {
            return Err(ReadError::TooSlow("body"));
        }
        // Never more than the body: what follows it is the next request's.
        let want = (length - buf.len()).min(chunk.len());
        if let Some(charge) = &mut charge {
            charge.grow_to(buf.len() + want).map_err(ReadError::Busy)?;
        }
        match stream.read(&mut chunk[..want]) {
            Ok(0) => return Err(ReadError::Cut("body")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    // The body moves out without a copy; the connection keeps only what follows it, and no
    // large buffer past the request.
    request.body = if buf.len() == length {
        std::mem::take(buf)
    } else {
        let rest = buf.split_off(length);
        std::mem::replace(buf, rest)
    };
    buf.shrink_to(KEPT_BUFFER);
    Ok((request, charge))
}

/// The most buffer capacity a connection keeps between requests.
const KEPT_BUFFER: usize = 16 << 10;

/// Whether `buf` holds a blank line ending a head (`\n\n` or `\n\r\n`, which covers
/// `\r\n\r\n`: whatever httparse accepts), searching on from `searched` (updated).
fn head_end(buf: &[u8], searched: &mut usize) -> bool {
    // Resume two bytes back: the marker may straddle two reads.
    let from = searched.saturating_sub(2);
    *searched = buf.len();
    let tail = &buf[from.min(buf.len())..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// Parses the head in `buf`: `None` if incomplete, else its length, the request without
/// body, and the body length.
fn parse_head(buf: &[u8], max_body: usize) -> Result<Option<(usize, Request, usize)>, ReadError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ReadError::Malformed(e)),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(ReadError::IncompleteLine);
    };
    let headers: Vec<(String, Vec<u8>)> = req.headers.iter().map(|h| (h.name.to_string(), h.value.to_vec())).collect();
    let find = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice());
    if find("transfer-encoding").is_some() {
        return Err(ReadError::LengthRequired);
    }
    // One content-length, digits only: a second one (even an equal one) is refused, so that
    // no proxy in front and this parser can disagree on where the body ends.
    let mut lengths = headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("content-length"));
    let length = match (lengths.next(), lengths.next()) {
        (None, _) => 0,
        (Some((_, v)), None) => content_length(v).ok_or(ReadError::BadContentLength)?,
        (Some(_), Some(_)) => return Err(ReadError::BadContentLength),
    };
    if length > max_body as u64 {
        return Err(ReadError::BodyTooLarge { length, limit: max_body });
    }
    let connection = find("connection").map(|v| String::from_utf8_lossy(v).to_ascii_lowercase());
    // HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 closes unless told.
    let keep_alive = match (version, connection.as_deref()) {
        (_, Some(c)) if c.contains("close") => false,
        (0, Some(c)) => c.contains("keep-alive"),
        (0, None) => false,
        _ => true,
    };
    let request =
        Request { method: method.to_string(), target: target.to_string(), headers, body: Vec::new(), keep_alive };
    // `length` <= max_body, a usize.
    Ok(Some((head_len, request, length as usize)))
}

/// A standard reason phrase.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        418 => "I'm a teapot",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// A content-length value: digits only (a sign or a second value is not a length).
fn content_length(value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// One HTTP response: written by the daemon, parsed by the client and the dispatcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status.
    pub status: u16,
    /// Headers in order. The parser keeps every header; the writer adds content-length and
    /// connection itself, so they are not given to it.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
    /// What the body holds of a byte budget until the response is written and dropped.
    pub held: Held,
}

/// A response body's share of a byte budget (the guest responses buffered at once), given
/// back when the last clone is dropped; not part of what the response says, so responses
/// compare equal whatever they hold.
#[derive(Debug, Clone, Default)]
pub struct Held {
    /// Kept for its drop, which gives the bytes back.
    _charge: Option<Arc<ByteCharge>>,
}

impl Held {
    /// Holds `charge`.
    pub fn new(charge: Option<Arc<ByteCharge>>) -> Held {
        Held { _charge: charge }
    }
}

impl PartialEq for Held {
    fn eq(&self, _: &Held) -> bool {
        true
    }
}

impl Eq for Held {}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }
}

/// Writes one response in a single write (so a small response is one TCP segment).
/// `head_only` leaves the body out (HEAD requests).
pub fn write_response(
    stream: &mut impl Write,
    response: &Response,
    keep_alive: bool,
    head_only: bool,
) -> std::io::Result<()> {
    let Response { status, headers, body, .. } = response;
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(*status)).as_bytes());
    for (name, value) in headers {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    if !keep_alive {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let body: &[u8] = if head_only { &[] } else { body };
    // Head and body in one vectored write (one segment for a small response), the body never
    // copied.
    write_all_vectored(stream, &head, body)?;
    stream.flush()
}

/// Writes `first` then `second`, gathering both into each write call.
fn write_all_vectored(stream: &mut impl Write, mut first: &[u8], mut second: &[u8]) -> std::io::Result<()> {
    while !first.is_empty() || !second.is_empty() {
        let parts = [std::io::IoSlice::new(first), std::io::IoSlice::new(second)];
        match stream.write_vectored(&parts) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(mut n) => {
                let from_first = n.min(first.len());
                first = &first[from_first..];
                n -= from_first;
                second = &second[n..];
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What a parsed response may hold. The client and the dispatcher differ: a daemon's
/// response relays up to [`MAX_HEADERS`] guest headers and adds its own; a guest's response
/// is bounded by the engine's response limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseLimits {
    /// Largest head, bytes.
    pub max_head: usize,
    /// Most headers.
    pub max_headers: usize,
    /// Largest body, bytes.
    pub max_body: usize,
}

/// Why bytes are not an acceptable HTTP response.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResponseError {
    /// The bytes end inside the head.
    #[error("incomplete response head")]
    IncompleteHead,
    /// Not an HTTP/1.x response head.
    #[error("malformed response head")]
    Malformed(#[source] httparse::Error),
    /// The head is over the limit.
    #[error("response head larger than {limit} bytes")]
    HeadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// More headers than the limit.
    #[error("more than {limit} response headers")]
    TooManyHeaders {
        /// The limit.
        limit: usize,
    },
    /// A content-length that is not one number.
    #[error("bad content-length")]
    BadContentLength,
    /// The body is over the limit.
    #[error("response body of {length} bytes exceeds the {limit}-byte limit")]
    BodyTooLarge {
        /// The announced or present length.
        length: u64,
        /// The limit.
        limit: usize,
    },
    /// The body is shorter than its content-length.
    #[error("response body has {got} bytes, its content-length says {want}")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes announced.
        want: u64,
    },
}

/// Parses a complete response: the bytes up to the end of the stream. The body runs to its
/// content-length (bytes past it are ignored) or, without one, to the end; `head_only` (the
/// answer to a HEAD request) has no body whatever its content-length says.
pub fn parse_response(bytes: &[u8], limits: &ResponseLimits, head_only: bool) -> Result<Response, ResponseError> {
    let (status, headers, body) = parse_response_parts(bytes, limits, head_only)?;
    Ok(Response { status, headers, body: bytes[body].to_vec(), held: Held::default() })
}

/// [`parse_response`] of bytes it may keep: the body stays where it is, not copied.
pub fn parse_response_owned(
    mut bytes: Vec<u8>,
    limits: &ResponseLimits,
    head_only: bool,
) -> Result<Response, ResponseError> {
    let (status, headers, body) = parse_response_parts(&bytes, limits, head_only)?;
    bytes.truncate(body.end);
    bytes.drain(..body.start);
    Ok(Response { status, headers, body: bytes, held: Held::default() })
}

/// A response's status, headers and where its body lies in `bytes`.
type ResponseParts = (u16, Vec<(String, Vec<u8>)>, std::ops::Range<usize>);

fn parse_response_parts(
    bytes: &[u8],
    limits: &ResponseLimits,
    head_only: bool,
) -> Result<ResponseParts, ResponseError> {
    let mut raw = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut parsed = httparse::Response::new(&mut raw);
    let head_len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if bytes.len() > limits.max_head => {
            return Err(ResponseError::HeadTooLarge { limit: limits.max_head })
        }
        Ok(httparse::Status::Partial) => return Err(ResponseError::IncompleteHead),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ResponseError::TooManyHeaders { limit: limits.max_headers })
        }
        Err(e) => return Err(ResponseError::Malformed(e)),
    };
    if head_len > limits.max_head {
        return Err(ResponseError::HeadTooLarge { limit: limits.max_head });
    }
    let status = parsed.code.ok_or(ResponseError::IncompleteHead)?;
    let mut length = None;
    let mut headers = Vec::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = content_length(h.value).ok_or(ResponseError::BadContentLength)?;
            // Two different lengths leave the body's end undecidable.
            if length.is_some_and(|m| m != n) {
                return Err(ResponseError::BadContentLength);
            }
            length = Some(n);
        }
        headers.push((h.name.to_string(), h.value.to_vec()));
    }
    let rest = bytes.len().saturating_sub(head_len);
    let body_len = match length {
        _ if head_only => 0,
        Some(n) if n > limits.max_body as u64 => {
            return Err(ResponseError::BodyTooLarge { length: n, limit: limits.max_body })
        }
        Some(n) if n > rest as u64 => return Err(ResponseError::Truncated { got: rest, want: n }),
        // `n` <= rest, a usize.
        Some(n) => n as usize,
        None if rest > limits.max_body => {
            return Err(ResponseError::BodyTooLarge { length: rest as u64, limit: limits.max_body })
        }
        None => rest,
    };
    Ok((status, headers, head_len..head_len + body_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8], max_body: usize) -> (Result<Request, ReadError>, Vec<u8>) {
        let mut buf = Vec::new();
        let mut stream = std::io::Cursor::new(bytes.to_vec());
        let read = read_request(&mut stream, &mut buf, &ReadLimits::new(max_body), &|| false);
        (read.map(|(request, _)| request), buf)
    }

    /// Reads `bytes` a byte at a time, each read taking `pause`.
    struct Trickle<'a> {
        bytes: &'a [u8],
        pause: Duration,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            std::thread::sleep(self.pause);
            let Some((&first, rest)) = self.bytes.split_first() else { return Ok(0) };
            out[0] = first;
            self.bytes = rest;
            Ok(1)
        }
    }

    #[test]
    fn a_request_trickling_in_past_the_read_timeout_gets_408() {
        let limits = |timeout| ReadLimits { read_timeout: timeout, ..ReadLimits::new(1 << 10) };
        let head = b"POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\n";
        let mut stream = Trickle { bytes: head, pause: Duration::from_millis(2) };
        let slow_head = read_request(&mut stream, &mut Vec::new(), &limits(Duration::from_millis(20)), &|| false);
        assert!(matches!(slow_head, Err(ReadError::TooSlow("head"))), "{slow_head:?}");
        assert_eq!(slow_head.err().and_then(|e| e.status()), Some(408));
        // The head in one read, the body a byte at a time: the same clock.
        let mut buf = head.to_vec();
        let mut stream = Trickle { bytes: b"abcd", pause: Duration::from_millis(15) };
        let slow_body = read_request(&mut stream, &mut buf, &limits(Duration::from_millis(20)), &|| false);
        assert!(matches!(slow_body, Err(ReadError::TooSlow("body"))), "{slow_body:?}");
        // In time, the same bytes are a request.
        let mut stream = Trickle { bytes: head, pause: Duration::ZERO };
        let mut buf = Vec::new();
        let in_time = read_request(&mut stream, &mut buf, &limits(Duration::from_secs(60)), &|| false);
        assert!(matches!(in_time, Err(ReadError::Cut("body"))), "no body sent: {in_time:?}");
    }

    #[test]
    fn bodies_are_charged_to_the_shared_budget_until_dropped() {
        let bodies = ByteBudget::new(10);
        let limits = ReadLimits { bodies: Some(bodies.clone()), ..ReadLimits::new(100) };
        let request = |len: usize| {
            let mut bytes = format!("POST / HTTP/1.1\r\ncontent-length: {len}\r\n\r\n").into_bytes();
            bytes.resize(bytes.len() + len, b'x');
            std::io::Cursor::new(bytes)
        };
        let (_, held) = read_request(&mut request(8), &mut Vec::new(), &limits, &|| false).expect("fits");
        assert_eq!(bodies.used(), 8);
        let refused = read_request(&mut request(3), &mut Vec::new(), &limits, &|| false);
        assert!(matches!(refused, Err(ReadError::Busy(_))), "{refused:?}");
        assert_eq!(refused.err().and_then(|e| e.status()), Some(503));
        drop(held);
        assert_eq!(bodies.used(), 0);
        assert!(read_request(&mut request(10), &mut Vec::new(), &limits, &|| false).is_ok());
    }

    #[test]
    fn an_announced_body_holds_only_the_bytes_that_arrived() {
        let bodies = ByteBudget::new(64 << 10);
        let limits = ReadLimits { bodies: Some(bodies.clone()), ..ReadLimits::new(1 << 20) };
        // A head announcing a megabyte and 10 bytes of it, then the connection ends.
        let mut stream = std::io::Cursor::new(b"POST / HTTP/1.1\r\ncontent-length: 1048576\r\n\r\n0123456789".to_vec());
        let cut = read_request(&mut stream, &mut Vec::new(), &limits, &|| false);
        assert!(matches!(cut, Err(ReadError::Cut("body"))), "not refused for what it only announced: {cut:?}");
        assert_eq!(bodies.used(), 0, "given back");
    }

    #[test]
    fn a_head_ending_in_a_bare_newline_and_crlf_is_complete() {
        let (request, _) = read(b"GET / HTTP/1.1\nHost: a\n\r\n", 0);
        assert_eq!(request.expect("a head httparse accepts").header("host"), Some(&b"a"[..]));
    }

    #[test]
    fn the_connection_keeps_no_large_buffer_after_a_request() {
        let mut bytes = b"POST / HTTP/1.1\r\ncontent-length: 1000000\r\n\r\n".to_vec();
        bytes.resize(bytes.len() + 1_000_000, b'x');
        bytes.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
        let mut buf = Vec::new();
        let (request, _) =
            read_request(&mut std::io::Cursor::new(bytes), &mut buf, &ReadLimits::new(1 << 20), &|| false)
                .expect("read");
        assert_eq!(request.body.len(), 1_000_000);
        assert!(buf.capacity() <= KEPT_BUFFER, "kept {} bytes of capacity", buf.capacity());
    }

    #[test]
    fn a_head_sent_a_byte_at_a_time_is_parsed_once_complete() {
        let head = format!("GET / HTTP/1.1\r\nx-pad: {}\r\n\r\n", "a".repeat(40 << 10));
        let mut stream = Trickle { bytes: head.as_bytes(), pause: Duration::ZERO };
        let (request, _) = read_request(&mut stream, &mut Vec::new(), &ReadLimits::new(0), &|| false).expect("head");
        assert_eq!(request.header("x-pad").map(<[u8]>::len), Some(40 << 10));
    }

    #[test]
    fn reads_pipelined_requests() {
        let bytes = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.0\r\n\r\n";
        let mut buf = Vec::new();
        let mut stream = std::io::Cursor::new(bytes.to_vec());
        let limits = ReadLimits::new(10);
        let (first, _) = read_request(&mut stream, &mut buf, &limits, &|| false).expect("first");
        assert_eq!(
            (first.method.as_str(), first.target.as_str(), &first.body[..], first.keep_alive),
            ("POST", "/a", &b"abc"[..], true)
        );
        let (second, _) = read_request(&mut stream, &mut buf, &limits, &|| false).expect("second");
        assert_eq!((second.target.as_str(), second.keep_alive), ("/b", false));
        assert!(matches!(read_request(&mut stream, &mut buf, &limits, &|| false), Err(ReadError::Closed)));
    }

    #[test]
    fn a_head_over_the_limit_is_refused_however_it_arrives() {
        // A head of `len` bytes: request line, one header padded to fit, blank line.
        let head = |len: usize| {
            let fixed = "GET / HTTP/1.1\r\nx-pad: \r\n\r\n".len();
            format!("GET / HTTP/1.1\r\nx-pad: {}\r\n\r\n", "a".repeat(len - fixed)).into_bytes()
        };
        let status = |bytes: &[u8]| read(bytes, 4).0.err().and_then(|e| e.status());
        assert!(read(&head(MAX_HEAD), 4).0.is_ok(), "a head of exactly the limit is read");
        for len in [MAX_HEAD + 1, MAX_HEAD + 6 * 1024, MAX_HEAD + 16 * 1024] {
            assert_eq!(status(&head(len)), Some(431), "{len} bytes");
        }
    }

    #[test]
    fn refuses_bad_requests_with_a_status() {
        let status = |bytes: &[u8]| read(bytes, 4).0.err().and_then(|e| e.status());
        assert_eq!(status(b"NOT HTTP\r\n\r\n"), Some(400));
        assert_eq!(status(b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n12345"), Some(413));
        assert_eq!(status(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"), Some(411));
        assert_eq!(status(b"POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n"), Some(400));
        for lengths in [
            "content-length: +3",
            "content-length: 3, 3",
            "content-length: 3\r\nContent-Length: 3",
            "content-length: 3\r\ncontent-length: 4",
        ] {
            let request = format!("POST / HTTP/1.1\r\n{lengths}\r\n\r\nabcd");
            assert_eq!(status(request.as_bytes()), Some(400), "{lengths}");
        }
        assert_eq!(status(b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\n1"), Some(400));
        assert_eq!(status(b""), None);
    }

    #[test]
    fn writes_a_response() {
        let mut out = Vec::new();
        let response = Response {
            status: 404,
            headers: vec![("x-a".into(), b"1".to_vec())],
            body: b"{}".to_vec(),
            held: Held::default(),
        };
        write_response(&mut out, &response, false, false).expect("write");
        assert_eq!(out, b"HTTP/1.1 404 Not Found\r\nx-a: 1\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
        // What the writer writes, the parser reads back.
        let limits = ResponseLimits { max_head: MAX_HEAD, max_headers: 8, max_body: 16 };
        assert_eq!(parse_response(&out, &limits, false).map(|r| (r.status, r.body)), Ok((404, b"{}".to_vec())));
    }

    const LIMITS: ResponseLimits = ResponseLimits { max_head: 128, max_headers: 4, max_body: 8 };

    #[test]
    fn parses_a_response_to_its_content_length_or_the_end() {
        let r = parse_response(b"HTTP/1.1 201 Created\r\nx-a: 1\r\nContent-Length: 2\r\n\r\nokEXTRA", &LIMITS, false)
            .expect("parses");
        let headers = vec![("x-a".into(), b"1".to_vec()), ("Content-Length".into(), b"2".to_vec())];
        assert_eq!(r, Response { status: 201, headers, body: b"ok".to_vec(), held: Held::default() });
        assert_eq!(r.header("X-A"), Some(&b"1"[..]));
        let r = parse_response(b"HTTP/1.1 200 OK\r\n\r\nto the end", &LIMITS, false);
        assert_eq!(r.map(|r| r.body), Err(ResponseError::BodyTooLarge { length: 10, limit: 8 }));
        let r = parse_response(b"HTTP/1.1 200 OK\r\n\r\nthe end", &LIMITS, false);
        assert_eq!(r.map(|r| r.body), Ok(b"the end".to_vec()));
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", &LIMITS, true);
        assert_eq!(r.map(|r| r.body), Ok(Vec::new()));
    }

    #[test]
    fn refuses_responses_over_its_limits_or_malformed() {
        let parse = |bytes: &[u8]| parse_response(bytes, &LIMITS, false).map(|r| r.status);
        assert!(matches!(parse(b"garbage\r\n\r\n"), Err(ResponseError::Malformed(_))));
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\n"), Err(ResponseError::IncompleteHead));
        assert_eq!(parse(&[b'x'; 200]), Err(ResponseError::Malformed(httparse::Error::Version)));
        let long = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(200));
        assert_eq!(parse(long.as_bytes()), Err(ResponseError::HeadTooLarge { limit: 128 }));
        let many = "HTTP/1.1 200 OK\r\na: 1\r\nb: 1\r\nc: 1\r\nd: 1\r\ne: 1\r\n\r\n";
        assert_eq!(parse(many.as_bytes()), Err(ResponseError::TooManyHeaders { limit: 4 }));
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n"), Err(ResponseError::BadContentLength));
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab"),
            Err(ResponseError::BadContentLength)
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n"),
            Err(ResponseError::BodyTooLarge { length: 99, limit: 8 })
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab"),
            Err(ResponseError::Truncated { got: 2, want: 4 })
        );
    }
}
