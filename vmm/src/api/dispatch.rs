//! The µ²services HTTP dispatcher's pure parts: which route a path takes, and the HTTP
//! framing between the dispatcher and a guest (see docs/guest-abi.md, "HTTP framing").
//!
//! A guest that announced `ready_flags::HTTP` gets the client's request as an HTTP/1.1
//! message and answers with one. Any other guest gets the request body as its input and its
//! output becomes a `200 application/octet-stream` response.

use super::http::{self, Response, ResponseError, ResponseLimits};
use crate::error::{Classify, FailureKind};

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

/// Why a guest's answer is not an HTTP response the dispatcher can relay.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DispatchError {
    /// Not an HTTP/1.x response, or over the limits.
    #[error("the guest's response is not an HTTP response")]
    Response(#[source] ResponseError),
    /// An interim (1xx) or out-of-range status: a dispatcher answer is final.
    #[error("the guest answered with status {0}, not a final status (200-599)")]
    Status(u16),
}

impl Classify for DispatchError {
    fn kind(&self) -> FailureKind {
        FailureKind::GuestProtocol
    }
}

/// The dispatcher's readiness probe, answered by the daemon itself (see docs/api.md).
pub const HEALTHZ_PATH: &str = "/healthz";
/// The dispatcher's Prometheus endpoint, answered by the daemon itself.
pub const METRICS_PATH: &str = "/metrics";
/// Paths the daemon answers on the dispatcher's port before any route is looked at.
pub const DAEMON_PATHS: [&str; 2] = [HEALTHZ_PATH, METRICS_PATH];

/// The daemon's own path that `target` names, if any (the query is ignored).
pub fn daemon_path(target: &str) -> Option<&'static str> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    DAEMON_PATHS.into_iter().find(|d| *d == path)
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

    /// A route whose prefix is, or is under, one of [`DAEMON_PATHS`]: it could never be
    /// reached, so the daemon refuses it.
    pub fn shadowed(&self) -> Option<(&str, &str)> {
        self.iter().find(|(prefix, _)| {
            DAEMON_PATHS.iter().any(|d| prefix == d || prefix.strip_prefix(d).is_some_and(|rest| rest.starts_with('/')))
        })
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

fn is_daemons(name: &str) -> bool {
    name.len() >= 6 && name[..6].eq_ignore_ascii_case("x-mu2-")
}

/// Parses an HTTP guest's answer, of at most `max_body` body bytes, keeping its end-to-end
/// headers. The body runs to its content-length, or to the end.
pub fn decode_response(bytes: Vec<u8>, max_body: usize) -> Result<Response, DispatchError> {
    let limits = ResponseLimits { max_head: http::MAX_HEAD, max_headers: http::MAX_HEADERS, max_body };
    let mut response = http::parse_response_owned(bytes, &limits, false).map_err(DispatchError::Response)?;
    if !(200..=599).contains(&response.status) {
        return Err(DispatchError::Status(response.status));
    }
    // The x-mu2-* headers are the daemon's to set: a guest cannot speak for it.
    response.headers.retain(|(name, _)| !is_hop_by_hop(name) && !is_daemons(name));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_cannot_set_the_daemons_headers() {
        let answer =
            b"HTTP/1.1 200 OK\r\nX-MU2-VM-ID: 7\r\nx-mu2-run-us: 1\r\nx-other: 1\r\ncontent-length: 2\r\n\r\nok";
        let response = decode_response(answer.to_vec(), 1024).unwrap();
        let names: Vec<_> = response.headers.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
        assert_eq!(names, ["x-other"]);
        assert_eq!(response.body, b"ok");
    }

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
    fn the_daemons_own_paths_are_not_routes() {
        assert_eq!(daemon_path("/healthz"), Some(HEALTHZ_PATH));
        assert_eq!(daemon_path("/metrics?x=1"), Some(METRICS_PATH));
        assert_eq!(daemon_path("/healthz/x"), None);
        assert_eq!(daemon_path("/echo"), None);
        let routes = |prefix: &str| Routes::new([(prefix.to_string(), "echo".to_string())]);
        assert_eq!(routes("/healthz/").shadowed(), Some(("/healthz", "echo")));
        assert_eq!(routes("/metrics/deep").shadowed(), Some(("/metrics/deep", "echo")));
        assert_eq!(routes("/metricsx").shadowed(), None);
        assert_eq!(routes("/").shadowed(), None, "a catch-all route leaves them to the daemon");
    }

    #[test]
    fn frames_requests_and_responses() {
        let headers = vec![("Host".to_string(), b"x".to_vec()), ("Connection".to_string(), b"keep-alive".to_vec())];
        let req = encode_request("POST", "/h/a?b=1", &headers, "/h", b"body");
        assert_eq!(req, b"POST /h/a?b=1 HTTP/1.1\r\nHost: x\r\nx-mu2-route: /h\r\ncontent-length: 4\r\n\r\nbody");
        let decode = |bytes: &[u8]| decode_response(bytes.to_vec(), 64);
        let resp = decode(b"HTTP/1.1 201 Created\r\nx-a: 1\r\nconnection: close\r\ncontent-length: 2\r\n\r\nokEXTRA")
            .expect("parses");
        let want = Response {
            status: 201,
            headers: vec![("x-a".into(), b"1".to_vec())],
            body: b"ok".to_vec(),
            held: Default::default(),
        };
        assert_eq!(resp, want);
        assert_eq!(decode(b"HTTP/1.1 200 OK\r\n\r\nto the end").map(|r| r.body), Ok(b"to the end".to_vec()));
        assert!(matches!(decode(b"garbage"), Err(DispatchError::Response(ResponseError::Malformed(_)))));
        assert!(matches!(
            decode(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nab"),
            Err(DispatchError::Response(ResponseError::Truncated { .. }))
        ));
        assert_eq!(decode(b"HTTP/1.1 101 Switching\r\n\r\n"), Err(DispatchError::Status(101)));
        assert_eq!(decode(b"garbage").map_err(|e| e.kind()).err(), Some(FailureKind::GuestProtocol));
    }
}
