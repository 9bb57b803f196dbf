//! HTTP function guest for the mu2 dispatcher: answers with what it was asked (method, path,
//! query, header count, body). `?status=N` picks the response status; an `x-echo` request
//! header comes back as an `x-echo` response header.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use mu2_guest::http::{Request, Response};

mu2_guest::http_function!(hello);

fn hello(req: &Request<'_>) -> Response {
    let status = req
        .query
        .split('&')
        .find_map(|kv| kv.strip_prefix("status="))
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (200..=599).contains(s))
        .unwrap_or(200);
    let mut body = format!(
        "hello from mu2\nmethod: {}\npath: {}\nquery: {}\nheaders: {}\nbody: {} bytes\n",
        req.method,
        req.path,
        req.query,
        req.headers.len(),
        req.body.len()
    )
    .into_bytes();
    body.extend_from_slice(req.body);
    let mut response = Response::text(status, body);
    if let Some(v) = req.header("x-echo") {
        response = response.header("x-echo", v);
    }
    response
}
