//! HTTP/1.1 framing for the control API and the dispatcher: read one request from a
//! connection (head parsed by `httparse`, body by `content-length`), write one response.
//! Keep-alive and pipelining work; chunked request bodies are refused (411).

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

/// Most headers in a request.
pub const MAX_HEADERS: usize = 64;
/// Largest request head.
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
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
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
}

impl ReadError {
    /// The status to answer with, if the connection can still carry an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ReadError::Closed | ReadError::Io(_) => None,
            ReadError::Malformed(_) => Some(400),
            ReadError::HeadTooLarge => Some(431),
            ReadError::BodyTooLarge { .. } => Some(413),
            ReadError::LengthRequired => Some(411),
        }
    }
}

/// How long a connection may sit idle between requests before the server closes it.
pub const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// Reads one request. `buf` carries bytes already read past the previous request
/// (pipelining). The stream should have a short read timeout: whenever a read times out with
/// no request started, `stopping()` is asked whether to give up.
pub fn read_request(
    stream: &mut impl Read,
    buf: &mut Vec<u8>,
    max_body: usize,
    stopping: &dyn Fn() -> bool,
) -> Result<Request, ReadError> {
    let mut chunk = [0u8; 16 << 10];
    let mut idle_since = Instant::now();
    let (head_len, mut request, length) = loop {
        if !buf.is_empty() {
            if let Some(parsed) = parse_head(buf, max_body)? {
                break parsed;
            }
            if buf.len() > MAX_HEAD {
                return Err(ReadError::HeadTooLarge);
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(ReadError::Closed),
            Ok(0) => return Err(ReadError::Malformed("connection closed inside the request head".into())),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                idle_since = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if buf.is_empty() && (stopping() || idle_since.elapsed() > IDLE_LIMIT) {
                    return Err(ReadError::Closed);
                }
                if idle_since.elapsed() > IDLE_LIMIT {
                    return Err(ReadError::Io(e));
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
    while buf.len() < length {
        match stream.read(&mut chunk) {
            Ok(0) => return Err(ReadError::Malformed("connection closed inside the request body".into())),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                idle_since = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if idle_since.elapsed() > IDLE_LIMIT {
                    return Err(ReadError::Io(e));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    request.body = buf.drain(..length).collect();
    Ok(request)
}

/// Parses the head in `buf`: `None` if incomplete, else its length, the request without
/// body, and the body length.
fn parse_head(buf: &[u8], max_body: usize) -> Result<Option<(usize, Request, usize)>, ReadError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ReadError::Malformed(e.to_string())),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(ReadError::Malformed("incomplete request line".into()));
    };
    let headers: Vec<(String, Vec<u8>)> = req.headers.iter().map(|h| (h.name.to_string(), h.value.to_vec())).collect();
    let find = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice());
    if find("transfer-encoding").is_some() {
        return Err(ReadError::LengthRequired);
    }
    let length = match find("content-length") {
        None => 0,
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| ReadError::Malformed("bad content-length".into()))?,
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

/// Writes one response in a single write (so a small response is one TCP segment).
/// `head_only` leaves the body out (HEAD requests).
pub fn write_response(
    stream: &mut impl Write,
    status: u16,
    headers: &[(String, Vec<u8>)],
    body: &[u8],
    keep_alive: bool,
    head_only: bool,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(256 + if head_only { 0 } else { body.len() });
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(body);
    }
    stream.write_all(&out)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8], max_body: usize) -> (Result<Request, ReadError>, Vec<u8>) {
        let mut buf = Vec::new();
        let mut stream = std::io::Cursor::new(bytes.to_vec());
        (read_request(&mut stream, &mut buf, max_body, &|| false), buf)
    }

    #[test]
    fn reads_pipelined_requests() {
        let bytes = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.0\r\n\r\n";
        let mut buf = Vec::new();
        let mut stream = std::io::Cursor::new(bytes.to_vec());
        let first = read_request(&mut stream, &mut buf, 10, &|| false).expect("first");
        assert_eq!(
            (first.method.as_str(), first.target.as_str(), &first.body[..], first.keep_alive),
            ("POST", "/a", &b"abc"[..], true)
        );
        let second = read_request(&mut stream, &mut buf, 10, &|| false).expect("second");
        assert_eq!((second.target.as_str(), second.keep_alive), ("/b", false));
        assert!(matches!(read_request(&mut stream, &mut buf, 10, &|| false), Err(ReadError::Closed)));
    }

    #[test]
    fn refuses_bad_requests_with_a_status() {
        let status = |bytes: &[u8]| read(bytes, 4).0.err().and_then(|e| e.status());
        assert_eq!(status(b"NOT HTTP\r\n\r\n"), Some(400));
        assert_eq!(status(b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n12345"), Some(413));
        assert_eq!(status(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"), Some(411));
        assert_eq!(status(b"POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n"), Some(400));
        assert_eq!(status(b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\n1"), Some(400));
        assert_eq!(status(b""), None);
    }

    #[test]
    fn writes_a_response() {
        let mut out = Vec::new();
        write_response(&mut out, 404, &[("x-a".into(), b"1".to_vec())], b"{}", false, false).expect("write");
        assert_eq!(out, b"HTTP/1.1 404 Not Found\r\nx-a: 1\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
    }
}
