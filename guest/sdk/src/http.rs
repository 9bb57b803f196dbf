//! The HTTP framing: how a guest behind the mu2 HTTP dispatcher sees a web request.
//!
//! A guest that serves with [`serve`] (or the [`crate::http_function!`] macro) announces
//! `mu2_abi::ready_flags::HTTP` when it becomes ready. The dispatcher then sends it, as the
//! request bytes of one vsock connection, an HTTP/1.1 request message: request line with the
//! client's method and target (path and query), the client's end-to-end headers, an
//! `x-mu2-route` header naming the route prefix, `content-length`, then the body. The guest
//! answers with an HTTP/1.1 response message: status line, headers, body up to the end of the
//! stream. The framing is HTTP itself so that a guest can use any HTTP parser; this module
//! parses with `httparse`.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Display;

use crate::outcome::{IntoOutcome, Outcome};

/// Most request headers a guest accepts.
pub const MAX_HEADERS: usize = 64;

/// One HTTP request as the dispatcher forwarded it.
#[derive(Debug)]
pub struct Request<'a> {
    /// The method, e.g. `GET`.
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The query string after `?` (empty if none).
    pub query: &'a str,
    /// The headers in order, names as sent.
    pub headers: Vec<(&'a str, &'a [u8])>,
    /// The body.
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }
}

/// Why request bytes are not an HTTP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// The head is malformed or cut short.
    Malformed,
    /// The body is shorter than its content-length.
    Truncated,
}

/// Parses the dispatcher's request bytes.
pub fn parse_request(bytes: &[u8]) -> Result<Request<'_>, FramingError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    let head = match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(FramingError::Malformed),
    };
    let (Some(method), Some(target)) = (req.method, req.path) else { return Err(FramingError::Malformed) };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    let headers: Vec<(&str, &[u8])> = req.headers.iter().map(|h| (h.name, h.value)).collect();
    let rest = &bytes[head..];
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| core::str::from_utf8(v).ok()?.trim().parse::<usize>().ok());
    let body = match length {
        Some(n) if n > rest.len() => return Err(FramingError::Truncated),
        Some(n) => &rest[..n],
        None => rest,
    };
    Ok(Request { method, path, query, headers, body })
}

/// An HTTP response from the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// The status code (100–999).
    pub status: u16,
    /// Headers; the dispatcher sets `content-length` and the connection headers itself.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// An empty response with `status`.
    pub fn new(status: u16) -> Self {
        Response { status, headers: Vec::new(), body: Vec::new() }
    }

    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response::new(status).header("content-type", "text/plain; charset=utf-8").body(body)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((String::from(name), value.as_ref().to_vec()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The response message in the framing: status line, headers, content-length, body.
    pub fn encode(&self) -> Vec<u8> {
        let status = if (100..=999).contains(&self.status) { self.status } else { 500 };
        let mut out = Vec::with_capacity(64 + self.body.len());
        out.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(&mut out, usize::from(status));
        out.extend_from_slice(b" ");
        out.extend_from_slice(reason(status).as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &self.headers {
            // A header with a line break would smuggle another header or end the head.
            if name.bytes().any(|b| b <= b' ' || b == b':') || value.iter().any(|&b| b == b'\r' || b == b'\n') {
                continue;
            }
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"content-length: ");
        push_decimal(&mut out, self.body.len());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A reason phrase for the status line (clients ignore it; it helps people reading traces).
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        418 => "I'm a teapot",
        500 => "Internal Server Error",
        _ => "-",
    }
}

impl IntoOutcome for Response {
    fn into_outcome(self) -> Outcome {
        Outcome::Response(self.encode())
    }
}

impl<E: Display> IntoOutcome for Result<Response, E> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(response) => response.into_outcome(),
            Err(e) => Outcome::Error(e.to_string()),
        }
    }
}

/// Serves `handler` forever with the HTTP framing announced. Request bytes that are not an
/// HTTP request get a 400 response; a handler's error is a function error (the dispatcher
/// answers 500 with its message).
pub fn serve<R: IntoOutcome>(mut handler: impl FnMut(&Request<'_>) -> R) -> ! {
    crate::serve_with_flags(mu2_abi::ready_flags::HTTP, move |bytes| match parse_request(bytes) {
        Ok(request) => handler(&request).into_outcome(),
        Err(e) => Response::text(400, alloc::format!("mu2 guest: bad request framing: {e:?}\n")).into_outcome(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_forwarded_request() {
        let bytes = b"POST /hello/x?a=1&b=2 HTTP/1.1\r\nx-mu2-route: /hello\r\ncontent-length: 3\r\n\r\nabcEXTRA";
        let r = parse_request(bytes).expect("parses");
        assert_eq!((r.method, r.path, r.query, r.body), ("POST", "/hello/x", "a=1&b=2", &b"abc"[..]));
        assert_eq!(r.header("X-MU2-ROUTE"), Some(&b"/hello"[..]));
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\ncontent-length: 9\r\n\r\nab").err(),
            Some(FramingError::Truncated)
        );
        assert_eq!(parse_request(b"not http").err(), Some(FramingError::Malformed));
    }

    #[test]
    fn encodes_a_response() {
        let r = Response::text(404, "nope").header("x-a", "1").header("bad\r\nname", "x").header("x-b", "ok\r\nx: y");
        let text = r.encode();
        assert_eq!(
            &text[..],
            &b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain; charset=utf-8\r\nx-a: 1\r\ncontent-length: 4\r\n\r\nnope"[..]
        );
    }
}
