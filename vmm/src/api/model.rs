//! The control API's model: requests and responses as plain values, apart from the HTTP
//! framing, so that routing and validation are unit-testable without sockets or KVM.

use std::path::PathBuf;

use serde::Deserialize;

use super::http;

/// Longest image name.
pub const MAX_NAME: usize = 64;

/// What a control-API request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `PUT /images/{name}`: create or register an image.
    PutImage {
        /// The image's name.
        name: String,
        /// Where it comes from.
        spec: ImageSpec,
    },
    /// `GET /images`.
    ListImages,
    /// `GET /images/{name}`.
    GetImage {
        /// The image's name.
        name: String,
    },
    /// `DELETE /images/{name}`.
    DeleteImage {
        /// The image's name.
        name: String,
    },
    /// `POST /images/{name}/invoke`: the body is the request.
    Invoke {
        /// The image's name.
        name: String,
        /// The request bytes.
        body: Vec<u8>,
    },
    /// `GET /metrics`.
    Metrics,
    /// `GET /health`.
    Health,
}

/// Where an image comes from (`PUT /images/{name}` body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSpec {
    /// A built-in guest, booted and frozen.
    Function {
        /// Its name (see `mu2 guests`).
        function: String,
        /// Guest memory, MiB.
        mem_mib: u64,
    },
    /// A guest ELF on the daemon's file system, booted and frozen.
    Kernel {
        /// The ELF file.
        kernel: PathBuf,
        /// Guest memory, MiB.
        mem_mib: u64,
    },
    /// An image directory that exists already (`mu2 snapshot`), registered as it is.
    Path {
        /// The image directory.
        path: PathBuf,
        /// Whether its guest speaks the HTTP framing; by default what the image records (the
        /// flags its guest announced when it became ready).
        http: Option<bool>,
    },
}

/// Default guest memory of images made through the API, MiB.
pub const DEFAULT_MEM_MIB: u64 = 64;

/// Why a request was refused before it reached the daemon's state.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// No such endpoint.
    #[error("no endpoint {0}")]
    NotFound(String),
    /// The endpoint exists, the method does not.
    #[error("method {method} not allowed on {path} (allowed: {allowed})")]
    MethodNotAllowed {
        /// The method.
        method: String,
        /// The path.
        path: String,
        /// What is allowed.
        allowed: &'static str,
    },
    /// A name outside `[A-Za-z0-9._-]{1,64}` (not starting with `.`).
    #[error("invalid image name `{0}`: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with .)")]
    BadName(String),
    /// The body is not the JSON the endpoint takes.
    #[error("bad JSON body")]
    BadJson(#[source] serde_json::Error),
    /// The JSON names no image source, several, or a setting that does not apply.
    #[error("bad image spec: {0}")]
    BadSpec(&'static str),
}

impl ModelError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            ModelError::NotFound(_) => 404,
            ModelError::MethodNotAllowed { .. } => 405,
            ModelError::BadName(_) | ModelError::BadJson(_) | ModelError::BadSpec(_) => 400,
        }
    }
}

/// Whether `name` is a valid image name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    function: Option<String>,
    kernel: Option<PathBuf>,
    path: Option<PathBuf>,
    mem_mib: Option<u64>,
    http: Option<bool>,
}

fn parse_spec(body: &[u8]) -> Result<ImageSpec, ModelError> {
    let put: PutBody = serde_json::from_slice(body).map_err(ModelError::BadJson)?;
    let mem_mib = put.mem_mib.unwrap_or(DEFAULT_MEM_MIB);
    match (put.function, put.kernel, put.path) {
        (Some(function), None, None) => Ok(ImageSpec::Function { function, mem_mib }),
        (None, Some(kernel), None) => Ok(ImageSpec::Kernel { kernel, mem_mib }),
        (None, None, Some(path)) if put.mem_mib.is_none() => Ok(ImageSpec::Path { path, http: put.http }),
        (None, None, Some(_)) => Err(ModelError::BadSpec("`mem_mib` does not apply to an existing image")),
        _ => Err(ModelError::BadSpec("give exactly one of `function`, `kernel` or `path`")),
    }
}

fn image_name(raw: &str) -> Result<String, ModelError> {
    if valid_name(raw) {
        Ok(raw.to_string())
    } else {
        Err(ModelError::BadName(raw.chars().take(80).collect()))
    }
}

/// Maps a method, a request target and a body to a request.
pub fn parse(method: &str, target: &str, body: Vec<u8>) -> Result<ApiRequest, ModelError> {
    // The query string is not used by any endpoint; it is ignored.
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let not_allowed = |allowed| ModelError::MethodNotAllowed { method: method.into(), path: path.into(), allowed };
    match (segments.as_slice(), method) {
        (["health"], "GET" | "HEAD") => Ok(ApiRequest::Health),
        (["health"], _) => Err(not_allowed("GET")),
        (["metrics"], "GET" | "HEAD") => Ok(ApiRequest::Metrics),
        (["metrics"], _) => Err(not_allowed("GET")),
        (["images"], "GET" | "HEAD") => Ok(ApiRequest::ListImages),
        (["images"], _) => Err(not_allowed("GET")),
        (["images", name], "GET" | "HEAD") => Ok(ApiRequest::GetImage { name: image_name(name)? }),
        (["images", name], "DELETE") => Ok(ApiRequest::DeleteImage { name: image_name(name)? }),
        (["images", name], "PUT") => {
            let name = image_name(name)?;
            Ok(ApiRequest::PutImage { name, spec: parse_spec(&body)? })
        }
        (["images", _], _) => Err(not_allowed("GET, PUT, DELETE")),
        (["images", name, "invoke"], "POST") => Ok(ApiRequest::Invoke { name: image_name(name)?, body }),
        (["images", _, "invoke"], _) => Err(not_allowed("POST")),
        _ => Err(ModelError::NotFound(path.chars().take(200).collect())),
    }
}

/// A response as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers beyond content-type, content-length and connection.
    pub headers: Vec<(String, String)>,
    /// Content type.
    pub content_type: String,
    /// Body.
    pub body: Vec<u8>,
}

impl ApiResponse {
    /// A JSON response.
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        ApiResponse {
            status,
            headers: Vec::new(),
            content_type: "application/json".into(),
            body: format!("{value}\n").into_bytes(),
        }
    }

    /// The error shape every endpoint uses: `{"error": "…"}`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Self {
        Self::json(status, &serde_json::json!({ "error": message.to_string() }))
    }

    /// Raw bytes.
    pub fn bytes(status: u16, content_type: &str, body: Vec<u8>) -> Self {
        ApiResponse { status, headers: Vec::new(), content_type: content_type.into(), body }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: impl ToString) -> Self {
        self.headers.push((name.into(), value.to_string()));
        self
    }
}

impl From<ApiResponse> for http::Response {
    fn from(r: ApiResponse) -> Self {
        let mut headers = Vec::with_capacity(1 + r.headers.len());
        headers.push(("content-type".to_string(), r.content_type.into_bytes()));
        headers.extend(r.headers.into_iter().map(|(name, value)| (name, value.into_bytes())));
        http::Response { status: r.status, headers, body: r.body }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(method: &str, target: &str, body: Vec<u8>) -> ApiRequest {
        parse(method, target, body).unwrap_or_else(|e| panic!("{method} {target}: {e}"))
    }

    #[test]
    fn routes_every_endpoint() {
        assert_eq!(parsed("GET", "/health", vec![]), ApiRequest::Health);
        assert_eq!(parsed("GET", "/metrics?x=1", vec![]), ApiRequest::Metrics);
        assert_eq!(parsed("GET", "/images/", vec![]), ApiRequest::ListImages);
        assert_eq!(parsed("GET", "/images/echo", vec![]), ApiRequest::GetImage { name: "echo".into() });
        assert_eq!(parsed("DELETE", "/images/a.b-c_d", vec![]), ApiRequest::DeleteImage { name: "a.b-c_d".into() });
        assert_eq!(
            parsed("POST", "/images/echo/invoke", b"hi".to_vec()),
            ApiRequest::Invoke { name: "echo".into(), body: b"hi".to_vec() }
        );
        assert_eq!(
            parsed("PUT", "/images/e", br#"{"function":"echo"}"#.to_vec()),
            ApiRequest::PutImage {
                name: "e".into(),
                spec: ImageSpec::Function { function: "echo".into(), mem_mib: DEFAULT_MEM_MIB }
            }
        );
        assert_eq!(
            parsed("PUT", "/images/k", br#"{"kernel":"/g.elf","mem_mib":32}"#.to_vec()),
            ApiRequest::PutImage { name: "k".into(), spec: ImageSpec::Kernel { kernel: "/g.elf".into(), mem_mib: 32 } }
        );
        assert_eq!(
            parsed("PUT", "/images/p", br#"{"path":"/img","http":true}"#.to_vec()),
            ApiRequest::PutImage { name: "p".into(), spec: ImageSpec::Path { path: "/img".into(), http: Some(true) } }
        );
    }

    #[test]
    fn refuses_what_it_must() {
        assert_eq!(parse("GET", "/nope", vec![]).map_err(|e| e.status()), Err(404));
        assert_eq!(parse("POST", "/health", vec![]).map_err(|e| e.status()), Err(405));
        assert_eq!(parse("GET", "/images/e/invoke", vec![]).map_err(|e| e.status()), Err(405));
        assert_eq!(parse("GET", "/images/..", vec![]).map_err(|e| e.status()), Err(400));
        assert_eq!(parse("GET", "/images/a%2Fb", vec![]).map_err(|e| e.status()), Err(400));
        for bad in [
            &b"{"[..],
            b"[]",
            br#"{"function":"echo","kernel":"/x"}"#,
            br#"{"nope":1}"#,
            b"{}",
            br#"{"path":"/i","mem_mib":2}"#,
        ] {
            assert_eq!(parse("PUT", "/images/e", bad.to_vec()).map_err(|e| e.status()), Err(400), "{bad:?}");
        }
        assert!(!valid_name(&"x".repeat(MAX_NAME + 1)));
    }

    #[test]
    fn errors_are_json() {
        let r = ApiResponse::error(404, "no image `x`");
        assert_eq!(r.status, 404);
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(v["error"], "no image `x`");
    }
}
