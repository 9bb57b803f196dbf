//! A blocking client for the control API, std only: programs that embed mu2 drive a daemon
//! with it, and the tests use it.
//!
//! ```no_run
//! use mu2_vmm::api::client::Client;
//! let client = Client::new("/run/mu2.sock");
//! client.put_image("echo2", &serde_json::json!({ "function": "echo" }))?;
//! let out = client.invoke("echo2", b"hello")?;
//! assert_eq!(out.body, b"hello");
//! # Ok::<(), mu2_vmm::api::client::ClientError>(())
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::http::{self, ResponseError, ResponseLimits};

/// What the client accepts from a daemon: the dispatcher relays up to [`http::MAX_HEADERS`]
/// guest headers and adds its own; the body is bounded by the daemon's own limits.
const LIMITS: ResponseLimits =
    ResponseLimits { max_head: http::MAX_HEAD, max_headers: 2 * http::MAX_HEADERS, max_body: usize::MAX };

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached or broke.
    #[error("talking to {path}")]
    Io {
        /// The socket or address.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not an HTTP response.
    #[error("malformed response")]
    Malformed(#[source] ResponseError),
    /// The body is not the JSON the call expects.
    #[error("the response body is not JSON")]
    Json(#[source] serde_json::Error),
    /// The daemon answered with an error status.
    #[error("HTTP {status}: {message}")]
    Status {
        /// The status.
        status: u16,
        /// The `error` field of the body (or the body).
        message: String,
    },
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        serde_json::from_slice(&self.body).map_err(ClientError::Json)
    }

    fn ok(self) -> Result<Response, ClientError> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        let message = self
            .json()
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned());
        Err(ClientError::Status { status: self.status, message })
    }
}

/// Sends one request on `stream` (with `connection: close`) and reads the whole response.
pub fn roundtrip<S: Read + Write>(
    stream: &mut S,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Result<Response, ResponseError>> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nhost: mu2\r\nconnection: close\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes)?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    Ok(parse_response(&raw, method == "HEAD"))
}

/// Parses a complete response (the connection closed after it). Header names are
/// lower-cased.
pub fn parse_response(raw: &[u8], head_only: bool) -> Result<Response, ResponseError> {
    let parsed = http::parse_response(raw, &LIMITS, head_only)?;
    let headers = parsed
        .headers
        .into_iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), String::from_utf8_lossy(&value).into_owned()))
        .collect();
    Ok(Response { status: parsed.status, headers, body: parsed.body })
}

/// A control-API client. Each call uses a connection of its own.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Option<Duration>,
}

impl Client {
    /// A client of the daemon listening on `path`.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Client { path: path.as_ref().to_path_buf(), timeout: Some(Duration::from_secs(120)) }
    }

    /// Sets the read timeout of each call (None: wait forever).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Any request; the status is not checked.
    pub fn request(&self, method: &str, target: &str, body: &[u8]) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io { path: self.path.display().to_string(), source };
        let mut stream = UnixStream::connect(&self.path).map_err(io)?;
        stream.set_read_timeout(self.timeout).map_err(io)?;
        roundtrip(&mut stream, method, target, &[], body).map_err(io)?.map_err(ClientError::Malformed)
    }

    /// `PUT /images/{name}` with a spec such as `{"function": "echo"}`.
    pub fn put_image(&self, name: &str, spec: &serde_json::Value) -> Result<serde_json::Value, ClientError> {
        self.request("PUT", &format!("/images/{name}"), spec.to_string().as_bytes())?.ok()?.json()
    }

    /// `GET /images`.
    pub fn list_images(&self) -> Result<serde_json::Value, ClientError> {
        self.request("GET", "/images", b"")?.ok()?.json()
    }

    /// `GET /images/{name}`.
    pub fn get_image(&self, name: &str) -> Result<serde_json::Value, ClientError> {
        self.request("GET", &format!("/images/{name}"), b"")?.ok()?.json()
    }

    /// `DELETE /images/{name}`.
    pub fn delete_image(&self, name: &str) -> Result<(), ClientError> {
        self.request("DELETE", &format!("/images/{name}"), b"")?.ok().map(drop)
    }

    /// `POST /images/{name}/invoke`: the function's response, with the timing headers.
    pub fn invoke(&self, name: &str, request: &[u8]) -> Result<Response, ClientError> {
        self.request("POST", &format!("/images/{name}/invoke"), request)?.ok()
    }

    /// `GET /metrics`.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let r = self.request("GET", "/metrics", b"")?.ok()?;
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// `GET /health`.
    pub fn health(&self) -> Result<serde_json::Value, ClientError> {
        self.request("GET", "/health", b"")?.ok()?.json()
    }
}

/// The value of an unlabelled metric (or the sum over a metric's label sets matching
/// `labels`, e.g. `image="echo"`) in a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (metric, rest) = key.split_once('{').unwrap_or((key, ""));
            (metric == name && rest.contains(labels)).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses_and_metrics() {
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 15\r\n\r\n{\"error\":\"no\"}\n", false)
            .expect("parses");
        assert_eq!(r.status, 404);
        assert!(matches!(r.ok(), Err(ClientError::Status { status: 404, message }) if message == "no"));
        let text = "# x\nmu2_a{image=\"echo\",outcome=\"ok\"} 3\nmu2_a{image=\"sha\",outcome=\"ok\"} 2\nmu2_b 7\n";
        assert_eq!(metric_value(text, "mu2_a", "image=\"echo\""), 3.0);
        assert_eq!(metric_value(text, "mu2_a", ""), 5.0);
        assert_eq!(metric_value(text, "mu2_b", ""), 7.0);
    }
}
