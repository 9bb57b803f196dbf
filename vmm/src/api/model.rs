//! The control API's model: requests and responses as plain values, apart from the HTTP
//! framing, so that routing and validation are unit-testable without sockets or KVM.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use super::http;
use crate::arch::EntryMode;
use crate::fork::Mode;
use crate::source::GuestSettings;

/// Longest image name.
pub const MAX_NAME: usize = 64;

/// What a control-API request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `PUT /images/{name}`: create or register an image.
    PutImage {
        /// The image's name.
        name: String,
        /// Where it comes from (and how its guest boots).
        spec: ImageSpec,
        /// How its requests are served.
        serve: ServeSettings,
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
        /// How it boots; `cmdline` is the caller's, which the daemon appends to its own.
        guest: GuestSettings,
    },
    /// A guest ELF on the daemon's file system, booted and frozen.
    Kernel {
        /// The ELF file.
        kernel: PathBuf,
        /// How it boots, as for [`ImageSpec::Function`].
        guest: GuestSettings,
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

/// How one image's requests are served (`PUT /images/{name}` body); a setting left out is the
/// daemon's flag of the same name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeSettings {
    /// `mode`: fresh, pool or reuse.
    pub mode: Option<Mode>,
    /// `pool_size`: VMs kept ready (pool), or the most VMs kept (reuse).
    pub pool_size: Option<usize>,
    /// `timeout`: one request's deadline in its VM.
    pub timeout: Option<Duration>,
    /// `max_response`: the largest response accepted from the guest, bytes.
    pub max_response: Option<usize>,
}

/// Every field `PUT /images/{name}` takes.
pub const PUT_FIELDS: [&str; 12] = [
    "function",
    "kernel",
    "path",
    "http",
    "mem_mib",
    "vcpus",
    "cmdline",
    "entry",
    "mode",
    "pool_size",
    "timeout",
    "max_response",
];
/// The fields that say how a guest boots: only for `function` and `kernel`.
const BOOT_FIELDS: [&str; 4] = ["mem_mib", "vcpus", "cmdline", "entry"];
/// Allowed `vcpus` (the host's own maximum is checked when the guest boots).
pub const VCPUS: RangeInclusive<u64> = 1..=255;
/// Longest `cmdline`: it shares the guest's 4 KiB command line with the VMM's own keys.
pub const MAX_CMDLINE: usize = 1024;
/// Allowed `pool_size` (in pool mode also below `--max-vms`).
pub const POOL_SIZE: RangeInclusive<u64> = 1..=1024;
/// Allowed `timeout`.
pub const TIMEOUT: RangeInclusive<Duration> = Duration::from_millis(1)..=Duration::from_secs(600);
/// Allowed `max_response`, bytes.
pub const MAX_RESPONSE: RangeInclusive<u64> = 1..=1 << 30;

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
    /// A field is unknown, or its value is of the wrong type or out of range.
    #[error("bad image spec: `{field}` {rule}")]
    BadField {
        /// The field.
        field: String,
        /// What it must be.
        rule: String,
    },
}

impl ModelError {
    /// The methods the endpoint allows, for the `allow` header a 405 must carry (RFC 9110).
    pub fn allowed_methods(&self) -> Option<&'static str> {
        match self {
            ModelError::MethodNotAllowed { allowed, .. } => Some(allowed),
            _ => None,
        }
    }

    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            ModelError::NotFound(_) => 404,
            ModelError::MethodNotAllowed { .. } => 405,
            ModelError::BadName(_) | ModelError::BadJson(_) | ModelError::BadSpec(_) | ModelError::BadField { .. } => {
                400
            }
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

/// The fields of a `PUT` body, each read with a check that names it.
struct Fields<'a>(&'a Map<String, Value>);

fn bad_field(field: &str, rule: impl Into<String>) -> ModelError {
    ModelError::BadField { field: field.to_string(), rule: rule.into() }
}

impl<'a> Fields<'a> {
    /// The field's value; JSON `null` counts as absent.
    fn get(&self, field: &str) -> Option<&'a Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    fn has(&self, field: &str) -> bool {
        self.get(field).is_some()
    }

    fn string(&self, field: &str) -> Result<Option<&'a str>, ModelError> {
        self.get(field).map(|v| v.as_str().ok_or_else(|| bad_field(field, "must be a string"))).transpose()
    }

    fn boolean(&self, field: &str) -> Result<Option<bool>, ModelError> {
        self.get(field).map(|v| v.as_bool().ok_or_else(|| bad_field(field, "must be true or false"))).transpose()
    }

    /// An integer within `range`; `rule` says what the field must be.
    fn integer(&self, field: &str, range: RangeInclusive<u64>, rule: &str) -> Result<Option<u64>, ModelError> {
        let Some(value) = self.get(field) else { return Ok(None) };
        match value.as_u64() {
            Some(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(bad_field(field, format!("must be {rule}, not {value}"))),
        }
    }

    /// A string from `choices`, parsed by `parse`.
    fn choice<T>(
        &self,
        field: &str,
        choices: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, ModelError> {
        let Some(text) = self.string(field)? else { return Ok(None) };
        parse(text).map(Some).ok_or_else(|| bad_field(field, format!("must be {choices}, not `{text}`")))
    }
}

fn parse_guest(fields: &Fields<'_>) -> Result<GuestSettings, ModelError> {
    let defaults = GuestSettings::default();
    let (min_mib, max_mib) = (mu2_abi::layout::MIN_MEM >> 20, mu2_abi::layout::MAX_MEM >> 20);
    let mem_rule = format!("an even number of MiB from {min_mib} to {max_mib}");
    let mem_mib = match fields.integer("mem_mib", min_mib..=max_mib, &mem_rule)? {
        Some(n) if n % 2 != 0 => return Err(bad_field("mem_mib", format!("must be {mem_rule}, not {n}"))),
        n => n.unwrap_or(DEFAULT_MEM_MIB),
    };
    let vcpu_rule = format!("an integer from {} to {}", VCPUS.start(), VCPUS.end());
    let vcpus = fields.integer("vcpus", VCPUS, &vcpu_rule)?.map_or(defaults.vcpus, |n| n as u8);
    let cmdline = fields.string("cmdline")?.unwrap_or_default();
    if cmdline.len() > MAX_CMDLINE || !cmdline.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(bad_field("cmdline", format!("must be at most {MAX_CMDLINE} printable ASCII characters")));
    }
    let entry = fields.choice("entry", "native or linux", |s| match s {
        "native" => Some(EntryMode::Native),
        "linux" => Some(EntryMode::Linux),
        _ => None,
    })?;
    Ok(GuestSettings { mem_mib, vcpus, cmdline: cmdline.to_string(), entry: entry.unwrap_or(defaults.entry) })
}

fn parse_serve(fields: &Fields<'_>) -> Result<ServeSettings, ModelError> {
    let mode = fields.choice("mode", "fresh, pool or reuse", |s| s.parse().ok())?;
    let pool_rule = format!("an integer from {} to {}", POOL_SIZE.start(), POOL_SIZE.end());
    let pool_size = fields.integer("pool_size", POOL_SIZE, &pool_rule)?.map(|n| n as usize);
    let timeout_rule = format!(
        "a duration from {} to {} such as \"2s\" or \"500ms\"",
        crate::duration::format(*TIMEOUT.start()),
        crate::duration::format(*TIMEOUT.end())
    );
    let timeout = match fields.get("timeout") {
        None => None,
        Some(value) => match value.as_str().map(crate::duration::parse) {
            Some(Ok(d)) if TIMEOUT.contains(&d) => Some(d),
            _ => return Err(bad_field("timeout", format!("must be {timeout_rule}, not {value}"))),
        },
    };
    let response_rule = format!("a number of bytes from {} to {}", MAX_RESPONSE.start(), MAX_RESPONSE.end());
    let max_response = fields.integer("max_response", MAX_RESPONSE, &response_rule)?.map(|n| n as usize);
    Ok(ServeSettings { mode, pool_size, timeout, max_response })
}

fn parse_spec(body: &[u8]) -> Result<(ImageSpec, ServeSettings), ModelError> {
    let value: Value = serde_json::from_slice(body).map_err(ModelError::BadJson)?;
    let Some(map) = value.as_object() else { return Err(ModelError::BadSpec("the body must be a JSON object")) };
    if let Some(unknown) = map.keys().find(|k| !PUT_FIELDS.contains(&k.as_str())) {
        return Err(bad_field(unknown, format!("is not a setting (known: {})", PUT_FIELDS.join(", "))));
    }
    let fields = Fields(map);
    let serve = parse_serve(&fields)?;
    let booted = |fields: &Fields<'_>| {
        if fields.has("http") {
            return Err(bad_field("http", "applies only to an existing image (a booted guest announces it)"));
        }
        parse_guest(fields)
    };
    let spec = match (fields.string("function")?, fields.string("kernel")?, fields.string("path")?) {
        (Some(function), None, None) => ImageSpec::Function { function: function.to_string(), guest: booted(&fields)? },
        (None, Some(kernel), None) => ImageSpec::Kernel { kernel: kernel.into(), guest: booted(&fields)? },
        (None, None, Some(path)) => {
            if let Some(field) = BOOT_FIELDS.iter().find(|f| fields.has(f)) {
                return Err(bad_field(field, "does not apply to an existing image"));
            }
            ImageSpec::Path { path: path.into(), http: fields.boolean("http")? }
        }
        _ => return Err(ModelError::BadSpec("give exactly one of `function`, `kernel` or `path`")),
    };
    Ok((spec, serve))
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
        (["health"], _) => Err(not_allowed("GET, HEAD")),
        (["metrics"], "GET" | "HEAD") => Ok(ApiRequest::Metrics),
        (["metrics"], _) => Err(not_allowed("GET, HEAD")),
        (["images"], "GET" | "HEAD") => Ok(ApiRequest::ListImages),
        (["images"], _) => Err(not_allowed("GET, HEAD")),
        (["images", name], "GET" | "HEAD") => Ok(ApiRequest::GetImage { name: image_name(name)? }),
        (["images", name], "DELETE") => Ok(ApiRequest::DeleteImage { name: image_name(name)? }),
        (["images", name], "PUT") => {
            let name = image_name(name)?;
            let (spec, serve) = parse_spec(&body)?;
            Ok(ApiRequest::PutImage { name, spec, serve })
        }
        (["images", _], _) => Err(not_allowed("GET, HEAD, PUT, DELETE")),
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
    /// What the body holds of a byte budget until it is written (not part of its value).
    pub held: http::Held,
}

impl ApiResponse {
    /// A JSON response.
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        ApiResponse {
            status,
            headers: Vec::new(),
            content_type: "application/json".into(),
            body: format!("{value}\n").into_bytes(),
            held: http::Held::default(),
        }
    }

    /// The error shape every endpoint uses: `{"error": "…"}`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Self {
        Self::json(status, &serde_json::json!({ "error": message.to_string() }))
    }

    /// Raw bytes.
    pub fn bytes(status: u16, content_type: &str, body: Vec<u8>) -> Self {
        ApiResponse {
            status,
            headers: Vec::new(),
            content_type: content_type.into(),
            body,
            held: http::Held::default(),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: impl ToString) -> Self {
        self.headers.push((name.into(), value.to_string()));
        self
    }

    /// The same response, holding `held` until it is written.
    pub fn holding(mut self, held: http::Held) -> Self {
        self.held = held;
        self
    }
}

impl From<ApiResponse> for http::Response {
    fn from(r: ApiResponse) -> Self {
        let mut headers = Vec::with_capacity(1 + r.headers.len());
        headers.push(("content-type".to_string(), r.content_type.into_bytes()));
        headers.extend(r.headers.into_iter().map(|(name, value)| (name, value.into_bytes())));
        http::Response { status: r.status, headers, body: r.body, held: r.held }
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
        let guest = GuestSettings::default();
        assert_eq!(
            parsed("PUT", "/images/e", br#"{"function":"echo"}"#.to_vec()),
            ApiRequest::PutImage {
                name: "e".into(),
                spec: ImageSpec::Function { function: "echo".into(), guest: guest.clone() },
                serve: ServeSettings::default(),
            }
        );
        assert_eq!(
            parsed("PUT", "/images/k", br#"{"kernel":"/g.elf","mem_mib":32}"#.to_vec()),
            ApiRequest::PutImage {
                name: "k".into(),
                spec: ImageSpec::Kernel { kernel: "/g.elf".into(), guest: GuestSettings { mem_mib: 32, ..guest } },
                serve: ServeSettings::default(),
            }
        );
        assert_eq!(
            parsed("PUT", "/images/p", br#"{"path":"/img","http":true}"#.to_vec()),
            ApiRequest::PutImage {
                name: "p".into(),
                spec: ImageSpec::Path { path: "/img".into(), http: Some(true) },
                serve: ServeSettings::default(),
            }
        );
    }

    #[test]
    fn takes_every_setting_the_cli_has() {
        let body = br#"{"function":"work","mem_mib":128,"vcpus":2,"cmdline":"x=1","entry":"linux",
            "mode":"reuse","pool_size":3,"timeout":"1500ms","max_response":4096}"#;
        let ApiRequest::PutImage { spec, serve, .. } = parsed("PUT", "/images/w", body.to_vec()) else {
            panic!("not a PUT")
        };
        let guest = GuestSettings { mem_mib: 128, vcpus: 2, cmdline: "x=1".into(), entry: EntryMode::Linux };
        assert_eq!(spec, ImageSpec::Function { function: "work".into(), guest });
        let want = ServeSettings {
            mode: Some(Mode::Reuse),
            pool_size: Some(3),
            timeout: Some(Duration::from_millis(1500)),
            max_response: Some(4096),
        };
        assert_eq!(serve, want);
        // Serving settings apply to an existing image too; null is the same as absent.
        let body = br#"{"path":"/img","mode":"fresh","timeout":"2s","vcpus":null}"#;
        let ApiRequest::PutImage { serve, .. } = parsed("PUT", "/images/p", body.to_vec()) else { panic!("not a PUT") };
        assert_eq!((serve.mode, serve.timeout), (Some(Mode::Fresh), Some(Duration::from_secs(2))));
    }

    #[test]
    fn a_bad_setting_is_named_with_what_it_must_be() {
        let refusal = |body: &str| match parse("PUT", "/images/e", body.as_bytes().to_vec()) {
            Err(e @ ModelError::BadField { .. }) => (e.status(), e.to_string()),
            other => panic!("{body}: {other:?}"),
        };
        for (body, field, rule) in [
            (r#"{"function":"echo","vcpus":0}"#, "vcpus", "from 1 to 255"),
            (r#"{"function":"echo","vcpus":"2"}"#, "vcpus", "from 1 to 255"),
            (r#"{"function":"echo","mem_mib":7}"#, "mem_mib", "from 8 to 3328"),
            (r#"{"function":"echo","mem_mib":65}"#, "mem_mib", "even"),
            (r#"{"function":"echo","entry":"uefi"}"#, "entry", "native or linux"),
            (r#"{"function":"echo","mode":"warm"}"#, "mode", "fresh, pool or reuse"),
            (r#"{"function":"echo","pool_size":0}"#, "pool_size", "from 1 to 1024"),
            (r#"{"function":"echo","timeout":"0s"}"#, "timeout", "from 1ms to 600000ms"),
            (r#"{"function":"echo","timeout":2000}"#, "timeout", "such as \"2s\""),
            (r#"{"function":"echo","timeout":"11m"}"#, "timeout", "from 1ms"),
            (r#"{"function":"echo","max_response":0}"#, "max_response", "from 1 to 1073741824"),
            (r#"{"function":"echo","cmdline":"a\nb"}"#, "cmdline", "printable ASCII"),
            (r#"{"function":"echo","http":true}"#, "http", "existing image"),
            (r#"{"path":"/i","entry":"native"}"#, "entry", "does not apply"),
            (r#"{"function":"echo","vpcus":2}"#, "vpcus", "is not a setting (known: function, kernel"),
        ] {
            let (status, message) = refusal(body);
            assert_eq!(status, 400, "{body}");
            assert!(message.contains(&format!("`{field}`")) && message.contains(rule), "{body}: {message}");
        }
        let long = format!(r#"{{"function":"echo","cmdline":"{}"}}"#, "x".repeat(MAX_CMDLINE + 1));
        assert!(refusal(&long).1.contains("at most 1024"));
    }

    #[test]
    fn refuses_what_it_must() {
        assert_eq!(parse("GET", "/nope", vec![]).map_err(|e| e.status()), Err(404));
        assert_eq!(parse("POST", "/health", vec![]).map_err(|e| e.status()), Err(405));
        assert_eq!(parse("TRACE", "/images/e", vec![]).unwrap_err().allowed_methods(), Some("GET, HEAD, PUT, DELETE"));
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
