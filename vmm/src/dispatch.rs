//! The µ²services HTTP dispatcher's pure parts: which route a path takes, and the HTTP
//! framing between the dispatcher and a guest (see docs/guest-abi.md, "HTTP framing").
//!
//! A guest that announced `ready_flags::HTTP` gets the client's request as an HTTP/1.1
//! message and answers with one. Any other guest gets the request body as its input and its
//! output becomes a `200 application/octet-stream` response.

/// Headers that describe one connection, not the request: never forwarded either way.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// Most headers accepted in a guest's response.
const MAX_HEADERS: usize = 64;

/// Why a guest's answer is not an HTTP response.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DispatchError {
    /// Not an HTTP/1.x response head.
    #[error("the guest's response is not an HTTP response: {0}")]
    Malformed(String),
    /// The body is shorter than the guest's content-length.
    #[error("the guest's response body has {got} bytes, its content-length says {want}")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes announced.
        want: usize,
    },
}

/// Path-prefix routes to image names.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    // Longest prefix first.
    routes: Vec<(String, String)>,
}

impl Routes {
    /// Routes from `(prefix, image)` pairs. A prefix is normalised to start with `/` and not
    /// end with one (except `/` itself).
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut routes: Vec<(String, String)> = pairs
            .into_iter()
            .map(|(p, image)| {
                let trimmed = p.trim_end_matches('/');
                let prefix = if trimmed.starts_with('/') { trimmed.to_string() } else { format!("/{trimmed}") };
                (prefix, image)
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        Routes { routes }
    }

    /// Parses `/PATH=IMAGE`.
    pub fn parse_arg(arg: &str) -> Result<(String, String), String> {
        let (prefix, image) = arg.split_once('=').ok_or_else(|| format!("route `{arg}` is not /PATH=IMAGE"))?;
        if !prefix.starts_with('/') || image.is_empty() {
            return Err(format!("route `{arg}` is not /PATH=IMAGE"));
        }
        Ok((prefix.to_string(), image.to_string()))
    }

    /// The route prefix and image for a request target: the longest prefix that matches
    /// whole path segments (`/hello` matches `/hello` and `/hello/x`, not `/helloworld`).
    pub fn find(&self, target: &str) -> Option<(&str, &str)> {
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        self.routes
            .iter()
            .find(|(prefix, _)| {
                prefix == "/"
                    || path == prefix
                    || (path.starts_with(prefix.as_str()) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
            })
            .map(|(p, i)| (p.as_str(), i.as_str()))
    }

    /// The routes, longest prefix first.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.routes.iter().map(|(p, i)| (p.as_str(), i.as_str()))
    }
}

fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The request message an HTTP guest receives.
pub fn encode_request(method: &str, target: &str, headers: &[(String, Vec<u8>)], route: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if is_hop_by_hop(name) || name.eq_ignore_ascii_case("x-mu2-route") {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("x-mu2-route: {route}\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

/// A guest's HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestResponse {
    /// The status.
    pub status: u16,
    /// End-to-end headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

/// Parses an HTTP guest's answer. The body runs to its content-length, or to the end.
pub fn decode_response(bytes: &[u8]) -> Result<GuestResponse, DispatchError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw);
    let head = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(DispatchError::Malformed("incomplete head".into())),
        Err(e) => return Err(DispatchError::Malformed(e.to_string())),
    };
    let status = resp.code.ok_or_else(|| DispatchError::Malformed("no status".into()))?;
    if !(200..=599).contains(&status) {
        // 1xx would need another response to follow; a dispatcher answer is final.
        return Err(DispatchError::Malformed(format!("status {status}")));
    }
    let rest = &bytes[head..];
    let mut length = None;
    let mut headers = Vec::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| DispatchError::Malformed("bad content-length".into()))?;
            length = Some(n);
        } else if !is_hop_by_hop(h.name) {
            headers.push((h.name.to_string(), h.value.to_vec()));
        }
    }
    let body = match length {
        Some(want) if want > rest.len() => return Err(DispatchError::Truncated { got: rest.len(), want }),
        Some(want) => rest[..want].to_vec(),
        None => rest.to_vec(),
    };
    Ok(GuestResponse { status, headers, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_longest_whole_segment_prefix() {
        let routes = Routes::new([
            ("/hello".into(), "h".into()),
            ("/hello/deep/".into(), "d".into()),
            ("/".into(), "root".into()),
        ]);
        assert_eq!(routes.find("/hello"), Some(("/hello", "h")));
        assert_eq!(routes.find("/hello/x?q=1"), Some(("/hello", "h")));
        assert_eq!(routes.find("/hello?q"), Some(("/hello", "h")));
        assert_eq!(routes.find("/hello/deep/x"), Some(("/hello/deep", "d")));
        assert_eq!(routes.find("/helloworld"), Some(("/", "root")));
        let routes = Routes::new([("/echo".into(), "echo".into())]);
        assert_eq!(routes.find("/other"), None);
        assert_eq!(Routes::parse_arg("/a=b"), Ok(("/a".into(), "b".into())));
        assert!(Routes::parse_arg("a=b").is_err() && Routes::parse_arg("/a").is_err());
    }

    #[test]
    fn frames_requests_and_responses() {
        let headers = vec![("Host".to_string(), b"x".to_vec()), ("Connection".to_string(), b"keep-alive".to_vec())];
        let req = encode_request("POST", "/h/a?b=1", &headers, "/h", b"body");
        assert_eq!(req, b"POST /h/a?b=1 HTTP/1.1\r\nHost: x\r\nx-mu2-route: /h\r\ncontent-length: 4\r\n\r\nbody");
        let resp =
            decode_response(b"HTTP/1.1 201 Created\r\nx-a: 1\r\nconnection: close\r\ncontent-length: 2\r\n\r\nokEXTRA")
                .expect("parses");
        assert_eq!(
            resp,
            GuestResponse { status: 201, headers: vec![("x-a".into(), b"1".to_vec())], body: b"ok".to_vec() }
        );
        assert_eq!(decode_response(b"HTTP/1.1 200 OK\r\n\r\nto the end").map(|r| r.body), Ok(b"to the end".to_vec()));
        assert!(matches!(decode_response(b"garbage"), Err(DispatchError::Malformed(_))));
        assert!(matches!(
            decode_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nab"),
            Err(DispatchError::Truncated { .. })
        ));
        assert!(decode_response(b"HTTP/1.1 101 Switching\r\n\r\n").is_err());
    }
}
