//! `mu2 serve`: the control API (HTTP/1.1 + JSON over a Unix socket) and the µ²services HTTP
//! dispatcher (TCP), on top of the fork engine. See docs/api.md.
//!
//! - [`model`]: requests and responses as plain values (unit-tested apart from sockets);
//! - [`http`]: HTTP/1.1 framing with `httparse`;
//! - [`metrics`]: Prometheus counters, histograms and gauges;
//! - [`dispatch`]: the HTTP dispatcher's routes and its HTTP framing towards guests;
//! - [`server`]: the daemon;
//! - [`client`]: a small blocking client for programs that embed mu2.

pub mod client;
pub mod dispatch;
pub mod http;
pub mod metrics;
pub mod model;
pub mod server;

pub use server::{run_until_signal, Daemon, ServeConfig, ServeError, Stopper};
