//! What a load balancer and a service manager rely on, with the real daemon binary, real
//! sockets and real guests: `/healthz` through warm-up and drain, metrics on the dispatcher's
//! port as Prometheus text, and socket activation (listeners the test opens itself and passes
//! with `LISTEN_FDS`, as systemd does), including a restart that loses no connection.

mod common;
use common::Scratch;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mu2_vmm::api::client::{self, metric_value, Client};

/// A `mu2 serve` process, killed if the test ends before it stopped.
struct Serve {
    child: Option<Child>,
}

/// Descriptors handed to the daemon as fds 3, 4, … with `LISTEN_FDS` (at most two).
struct Passed {
    fds: Vec<OwnedFd>,
    names: Option<&'static str>,
    pid: Pid,
}

/// The `LISTEN_PID` the daemon gets.
#[derive(Clone, Copy)]
enum Pid {
    /// Its own, as a service manager sets it.
    Own,
    /// Another process's.
    Other,
}

impl Serve {
    /// Starts `mu2 serve` with `args`.
    fn start(args: &[&str]) -> Serve {
        let child = Command::new(env!("CARGO_BIN_EXE_mu2"))
            .arg("serve")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting mu2 serve");
        Serve { child: Some(child) }
    }

    /// Starts `mu2 serve` with `args` and `passed` as its inherited listeners. The descriptors
    /// reach the shell as stdin and stdout (the one way std passes a descriptor to a child);
    /// the shell moves them to 3 and 4, sets `LISTEN_PID` to its own pid, which `exec` keeps,
    /// and becomes the daemon.
    fn activated(args: &[&str], passed: Passed) -> Serve {
        let Passed { fds, names, pid } = passed;
        assert!((1..=2).contains(&fds.len()));
        let moves = if fds.len() == 2 { "3<&0 4>&1 0</dev/null 1>/dev/null" } else { "3<&0 0</dev/null" };
        let listen_pid = match pid {
            Pid::Own => "$$",
            Pid::Other => "1",
        };
        let names = names.map(|n| format!("export LISTEN_FDNAMES={n}; ")).unwrap_or_default();
        let script =
            format!("exec {moves}; export LISTEN_PID={listen_pid} LISTEN_FDS={}; {names}exec \"$@\"", fds.len());
        let mut fds = fds.into_iter();
        let mut command = Command::new("sh");
        command.arg("-c").arg(script).arg("sh").arg(env!("CARGO_BIN_EXE_mu2")).arg("serve").args(args);
        command.stdin(Stdio::from(fds.next().expect("one descriptor")));
        command.stdout(fds.next().map_or_else(Stdio::null, Stdio::from));
        let child = command.stderr(Stdio::inherit()).spawn().expect("starting mu2 serve through sh");
        Serve { child: Some(child) }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.pid().to_string()]).status().expect("kill");
        assert!(status.success(), "kill {signal}");
    }

    /// Waits for the process to exit by itself.
    fn exit_status(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let until = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < until, "the daemon did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One request on a new connection; `Err` if no complete response came back.
fn request(addr: SocketAddr, method: &str, target: &str, body: &[u8]) -> Result<client::Response, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    match client::roundtrip(&mut stream, method, target, &[], body) {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(format!("malformed response: {e}")),
        Err(e) => Err(format!("i/o: {e}")),
    }
}

fn healthz(addr: SocketAddr) -> Result<client::Response, String> {
    request(addr, "GET", "/healthz", b"")
}

/// Polls `/healthz` until it answers `status`, for at most `within`.
fn wait_healthz(addr: SocketAddr, status: u16, within: Duration) -> client::Response {
    let until = Instant::now() + within;
    loop {
        let last = healthz(addr);
        if let Ok(r) = &last {
            if r.status == status {
                return r.clone();
            }
        }
        assert!(Instant::now() < until, "/healthz never answered {status}; last: {last:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port")
}

fn fd(listener: impl Into<OwnedFd>) -> OwnedFd {
    listener.into()
}

fn text(r: &client::Response) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

#[test]
fn healthz_is_503_until_the_routes_pools_are_full_then_200() {
    kvm_or_skip!();
    let scratch = Scratch::new("lifecycle", "warm");
    // The test holds the listener before the daemon exists, so its very first probe is
    // answered as soon as the daemon accepts, before the pool of 200 VMs can be full.
    let tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = tcp.local_addr().expect("addr");
    let sock = scratch.path("api.sock");
    let passed = Passed { fds: vec![fd(tcp)], names: Some("http"), pid: Pid::Own };
    let _serve = Serve::activated(
        &["--api-sock", sock.to_str().expect("utf-8"), "--route", "/echo=echo", "--pool-size", "200"],
        passed,
    );
    let first = healthz(addr).expect("first probe");
    assert_eq!(first.status, 503, "{}", text(&first));
    let body = first.json().expect("json");
    assert_eq!(body["status"], "starting", "{body}");
    assert!(
        body["waiting_for"]
            .as_array()
            .is_some_and(|w| w.iter().any(|x| x.as_str().is_some_and(|s| s.contains("echo")))),
        "{body}"
    );
    let metrics = request(addr, "GET", "/metrics", b"").expect("metrics");
    assert_eq!(metric_value(&text(&metrics), "mu2_ready", ""), 0.0);

    let ready = wait_healthz(addr, 200, Duration::from_secs(120));
    assert_eq!(ready.json().expect("json")["status"], "ready");
    // Ready means the pool was full: no request has taken a VM yet.
    let metrics = text(&request(addr, "GET", "/metrics", b"").expect("metrics"));
    assert_eq!(metric_value(&metrics, "mu2_pool_depth", "image=\"echo\""), 200.0, "{metrics}");
    assert_eq!(metric_value(&metrics, "mu2_ready", ""), 1.0);
    // HEAD works too, without a body; other methods are refused.
    let head = request(addr, "HEAD", "/healthz", b"").expect("HEAD");
    assert_eq!((head.status, head.body.len()), (200, 0));
    assert_eq!(request(addr, "POST", "/healthz", b"x").expect("POST").status, 405);
    // Readiness stays once reached, while requests drain the pool.
    for i in 0..20 {
        let r = request(addr, "POST", "/echo", format!("r{i}").as_bytes()).expect("echo");
        assert_eq!((r.status, r.body), (200, format!("r{i}").into_bytes()));
    }
    assert_eq!(healthz(addr).expect("probe").status, 200);
}

#[test]
fn during_the_drain_period_healthz_is_503_while_requests_still_succeed() {
    kvm_or_skip!();
    let scratch = Scratch::new("lifecycle", "drain");
    let sock = scratch.path("api.sock");
    let addr = free_addr();
    let http = addr.to_string();
    let args = ["--api-sock", sock.to_str().expect("utf-8"), "--http", &http, "--route", "/echo=echo"];
    let mut serve = Serve::start(&[&args[..], &["--mode", "fresh", "--drain-period", "3s"]].concat());
    wait_healthz(addr, 200, Duration::from_secs(120));

    let signalled = Instant::now();
    serve.signal("-TERM");
    let probe = wait_healthz(addr, 503, Duration::from_secs(2));
    assert_eq!(probe.json().expect("json")["status"], "draining");
    let health = Client::new(&sock).health().expect("API health");
    assert_eq!(health["status"], "draining", "{health}");
    let mut served = 0;
    while signalled.elapsed() < Duration::from_secs(2) {
        let r = request(addr, "POST", "/echo", b"still here").expect("a request while draining");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"still here"[..]), "{}", text(&r));
        // Each response ends its connection, so keep-alive clients move elsewhere.
        assert_eq!(r.header("connection"), Some("close"));
        served += 1;
    }
    assert!(served > 0);
    assert!(serve.exit_status(Duration::from_secs(30)).success());
    let took = signalled.elapsed();
    assert!(took >= Duration::from_millis(2900), "the drain period was cut short: {took:?}");
    assert!(TcpStream::connect(addr).is_err(), "nothing listens after the exit");
    assert!(!sock.exists(), "the daemon's own socket is removed");

    // A second signal cuts a long drain period short.
    let mut serve = Serve::start(&[&args[..], &["--mode", "fresh", "--drain-period", "10m"]].concat());
    wait_healthz(addr, 200, Duration::from_secs(120));
    serve.signal("-TERM");
    wait_healthz(addr, 503, Duration::from_secs(2));
    serve.signal("-TERM");
    assert!(serve.exit_status(Duration::from_secs(30)).success());
}

#[test]
fn metrics_on_the_dispatcher_port_are_prometheus_text() {
    kvm_or_skip!();
    let scratch = Scratch::new("lifecycle", "metrics");
    let sock = scratch.path("api.sock");
    let addr = free_addr();
    let http = addr.to_string();
    let _serve = Serve::start(&[
        "--api-sock",
        sock.to_str().expect("utf-8"),
        "--http",
        &http,
        "--route",
        "/echo=echo",
        "--route",
        "/crash=crash",
        "--mode",
        "fresh",
    ]);
    wait_healthz(addr, 200, Duration::from_secs(120));
    for _ in 0..7 {
        assert_eq!(request(addr, "POST", "/echo", b"x").expect("echo").status, 200);
    }
    assert_eq!(request(addr, "POST", "/crash", b"ud").expect("crash").status, 502);
    let r = request(addr, "GET", "/metrics", b"").expect("metrics");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let exposition = text(&r);
    if let Err(e) = check_prometheus_text(&exposition) {
        panic!("{e}\n{exposition}");
    }
    // Probes and scrapes are not requests to an image.
    assert_eq!(metric_value(&exposition, "mu2_requests_total", "image=\"echo\",outcome=\"ok\""), 7.0);
    assert_eq!(metric_value(&exposition, "mu2_requests_total", "image=\"crash\",outcome=\"guest_error\""), 1.0);
    assert_eq!(metric_value(&exposition, "mu2_request_duration_seconds_count", "image=\"echo\""), 7.0);
    assert_eq!(metric_value(&exposition, "mu2_http_responses_total", "listener=\"http\",status=\"502\""), 1.0);
    // The same exposition on the control API.
    let api = Client::new(&sock).metrics().expect("API metrics");
    assert_eq!(metric_value(&api, "mu2_requests_total", "outcome=\"ok\""), 7.0);
    assert!(check_prometheus_text(&api).is_ok());
}

#[test]
fn a_route_under_the_daemons_own_paths_is_refused() {
    // Refused before KVM is opened, so this needs none.
    let scratch = Scratch::new("lifecycle", "reserved");
    let sock = scratch.path("api.sock");
    let http = free_addr().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_mu2"))
        .args(["serve", "--api-sock", sock.to_str().expect("utf-8"), "--http", &http, "--route", "/healthz=echo"])
        .output()
        .expect("mu2 serve");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/healthz"), "{out:?}");
}

#[test]
fn a_socket_activated_daemon_serves_on_the_passed_listeners() {
    kvm_or_skip!();
    let scratch = Scratch::new("lifecycle", "activated");
    let sock = scratch.path("passed.sock");
    let unix = UnixListener::bind(&sock).expect("bind unix");
    let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    let addr = tcp.local_addr().expect("addr");
    // By kind, in the order Unix then TCP, and with --http naming another address: the
    // passed socket wins. --api-sock names a path nobody binds.
    let unused = scratch.path("unused.sock");
    let elsewhere = free_addr().to_string();
    let passed = Passed { fds: vec![fd(unix), fd(tcp)], names: None, pid: Pid::Own };
    let args = [
        "--api-sock",
        unused.to_str().expect("utf-8"),
        "--http",
        &elsewhere,
        "--route",
        "/echo=echo",
        "--mode",
        "fresh",
        "--drain-period",
        "0",
    ];
    let mut serve = Serve::activated(&args, passed);
    wait_healthz(addr, 200, Duration::from_secs(120));
    assert_eq!(request(addr, "POST", "/echo", b"passed").expect("echo").body, b"passed");
    assert_eq!(Client::new(&sock).invoke("echo", b"over the passed unix socket").expect("invoke").body.len(), 27);
    assert!(!unused.exists(), "--api-sock is not bound when a Unix listener is passed");
    assert!(TcpStream::connect(&elsewhere).is_err(), "--http is not bound when a TCP listener is passed");
    serve.signal("-TERM");
    assert!(serve.exit_status(Duration::from_secs(30)).success());
    assert!(sock.exists(), "a passed socket's file belongs to whoever made it");
}

#[test]
fn a_restart_on_passed_listeners_loses_no_connection() {
    kvm_or_skip!();
    let scratch = Scratch::new("lifecycle", "restart");
    let sock = scratch.path("api.sock");
    // The test plays the service manager: it keeps the listeners across the restart.
    let unix = UnixListener::bind(&sock).expect("bind unix");
    let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    let addr = tcp.local_addr().expect("addr");
    let passed = || Passed {
        fds: vec![fd(tcp.try_clone().expect("dup")), fd(unix.try_clone().expect("dup"))],
        names: Some("http:api"),
        pid: Pid::Own,
    };
    let args = [
        "--api-sock",
        sock.to_str().expect("utf-8"),
        "--route",
        "/echo=echo",
        "--mode",
        "fresh",
        "--drain-period",
        "0",
    ];
    let mut first = Serve::activated(&args, passed());
    wait_healthz(addr, 200, Duration::from_secs(120));

    // Four clients sending requests one after the other, each on a new connection, throughout.
    const CLIENTS: usize = 4;
    const REQUESTS: usize = 400;
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let done = done.clone();
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(120);
                let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
                let mut last = String::new();
                for i in 0..REQUESTS / CLIENTS {
                    if Instant::now() > until {
                        break;
                    }
                    let body = format!("c{c} n{i}");
                    let outcome = match request(addr, "POST", "/echo", body.as_bytes()) {
                        Ok(r) if r.status == 200 && r.body == body.as_bytes() => "200".to_string(),
                        Ok(r) => format!("status {}", r.status),
                        Err(e) => e,
                    };
                    last.clone_from(&outcome);
                    *outcomes.entry(outcome).or_default() += 1;
                    done.fetch_add(1, Ordering::SeqCst);
                }
                (outcomes, last)
            })
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::SeqCst) < REQUESTS / 4 {
        assert!(Instant::now() < until, "the client made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    first.signal("-TERM");
    assert!(first.exit_status(Duration::from_secs(30)).success());
    let at_restart = done.load(Ordering::SeqCst);
    let _second = Serve::activated(&args, passed());
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut lasts = Vec::new();
    for client in clients {
        let (theirs, last) = client.join().expect("client thread");
        for (outcome, n) in theirs {
            *outcomes.entry(outcome).or_default() += n;
        }
        lasts.push(last);
    }
    let total: usize = outcomes.values().sum();
    assert_eq!(total, REQUESTS, "{outcomes:?}");
    // Every connection got an answer: served, or refused with a retryable 503 by the
    // daemon that was stopping. None was refused, reset or closed unanswered.
    assert!(outcomes.keys().all(|k| k == "200" || k == "status 503"), "{outcomes:?}");
    assert!(
        at_restart < REQUESTS && lasts.iter().all(|l| l == "200"),
        "the second daemon served the rest: {outcomes:?}"
    );
    let served_by_second =
        metric_value(&Client::new(&sock).metrics().expect("metrics"), "mu2_requests_total", "outcome=\"ok\"");
    assert!(served_by_second >= 1.0 && served_by_second <= (REQUESTS - at_restart + 1) as f64, "{served_by_second}");
}

#[test]
fn passed_descriptors_are_checked() {
    // A regular file where a listener should be: a clear error, exit code 2 (bad input).
    let scratch = Scratch::new("lifecycle", "notsock");
    let sock = scratch.path("api.sock");
    let file = std::fs::File::create(scratch.path("plain-file")).expect("file");
    let args = ["--api-sock", sock.to_str().expect("utf-8"), "--drain-period", "0"];
    let mut serve = Serve::activated(&args, Passed { fds: vec![fd(file)], names: None, pid: Pid::Own });
    let status = serve.exit_status(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{status:?}");

    // A UDP socket: a socket, but not a listening stream socket.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let mut serve = Serve::activated(&args, Passed { fds: vec![fd(udp)], names: None, pid: Pid::Own });
    assert_eq!(serve.exit_status(Duration::from_secs(30)).code(), Some(2));

    // Descriptors meant for another process are ignored: the daemon binds its own.
    kvm_or_skip!();
    let tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = free_addr();
    let http = addr.to_string();
    let args = ["--api-sock", sock.to_str().expect("utf-8"), "--http", &http, "--mode", "fresh", "--drain-period", "0"];
    let _serve = Serve::activated(&args, Passed { fds: vec![fd(tcp)], names: None, pid: Pid::Other });
    wait_healthz(addr, 200, Duration::from_secs(120));
    assert!(Path::new(&sock).exists(), "it bound --api-sock itself");
}

/// Checks an exposition strictly against the Prometheus text format (0.0.4) and the naming
/// conventions mu2 follows: every sample's family has one TYPE before it, and families do not
/// interleave; names and labels are well-formed, label values properly quoted; counters end
/// in `_total`; durations are in seconds; histogram buckets are cumulative, end with `+Inf`
/// equal to `_count`, and have a `_sum`.
fn check_prometheus_text(text: &str) -> Result<(), String> {
    let valid_name = |n: &str, colon: bool| {
        let mut chars = n.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut finished: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    // Histogram series: (family, labels without le) -> [(le, count)], count, has sum.
    let mut buckets: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts: BTreeMap<(String, String), f64> = BTreeMap::new();
    let mut sums: BTreeMap<(String, String), f64> = BTreeMap::new();
    if !text.ends_with('\n') {
        return Err("the exposition does not end with a newline".into());
    }
    for (n, line) in text.lines().enumerate() {
        let at = |msg: String| format!("line {}: {msg}: {line:?}", n + 1);
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (kind, name, rest) = (parts.next(), parts.next(), parts.next());
            let name = name.filter(|n| valid_name(n, true)).ok_or_else(|| at("bad metric name".into()))?;
            match kind {
                Some("HELP") if rest.is_some_and(|h| !h.is_empty()) => {}
                Some("TYPE") => {
                    let kind = rest.ok_or_else(|| at("TYPE without a type".into()))?;
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("unknown type {kind}")));
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(at("second TYPE for a family".into()));
                    }
                    if kind == "counter" && !name.ends_with("_total") {
                        return Err(at("a counter's name ends in _total".into()));
                    }
                    if name.contains("duration") && !name.ends_with("_seconds") {
                        return Err(at("a duration is in seconds".into()));
                    }
                    if !name.starts_with("mu2_") {
                        return Err(at("mu2's metrics are prefixed mu2_".into()));
                    }
                }
                _ => return Err(at("only HELP and TYPE comments".into())),
            }
            continue;
        }
        // A sample: name, optional {labels}, value.
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name, true) {
            return Err(at("bad metric name".into()));
        }
        let mut rest = &line[name_end..];
        let mut labels: Vec<(String, String)> = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let bytes = inner.as_bytes();
            let mut i = 0;
            loop {
                if bytes.get(i) == Some(&b'}') {
                    rest = &inner[i + 1..];
                    break;
                }
                let eq = inner[i..].find('=').ok_or_else(|| at("label without =".into()))? + i;
                let label = &inner[i..eq];
                if !valid_name(label, false) || label.starts_with("__") {
                    return Err(at(format!("bad label name {label:?}")));
                }
                if bytes.get(eq + 1) != Some(&b'"') {
                    return Err(at("unquoted label value".into()));
                }
                let mut value = String::new();
                let mut j = eq + 2;
                loop {
                    match inner[j..].chars().next() {
                        None => return Err(at("unterminated label value".into())),
                        Some('"') => break,
                        Some('\\') => {
                            match bytes.get(j + 1) {
                                Some(b'\\') => value.push('\\'),
                                Some(b'"') => value.push('"'),
                                Some(b'n') => value.push('\n'),
                                _ => return Err(at("bad escape".into())),
                            }
                            j += 2;
                        }
                        Some(c) => {
                            value.push(c);
                            j += c.len_utf8();
                        }
                    }
                }
                labels.push((label.to_string(), value));
                match bytes.get(j + 1) {
                    Some(b',') => i = j + 2,
                    Some(b'}') => i = j + 1,
                    _ => return Err(at("labels are separated by commas".into())),
                }
            }
        }
        let value = rest.strip_prefix(' ').ok_or_else(|| at("no space before the value".into()))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| at("the value is not a number".into()))?,
        };
        // Which family the sample belongs to.
        let family = [("_bucket", "histogram"), ("_sum", "histogram"), ("_count", "histogram")]
            .iter()
            .find_map(|(suffix, kind)| {
                let base = name.strip_suffix(suffix)?;
                (types.get(base).map(String::as_str) == Some(*kind)).then(|| base.to_string())
            })
            .unwrap_or_else(|| name.to_string());
        let kind = types.get(&family).ok_or_else(|| at("a sample before its family's TYPE".into()))?;
        if current.as_deref() != Some(family.as_str()) {
            if finished.contains(&family) {
                return Err(at("a family's samples are not together".into()));
            }
            if let Some(previous) = current.replace(family.clone()) {
                finished.push(previous);
            }
        }
        if kind == "counter" && (value.is_nan() || value < 0.0) {
            return Err(at("a counter is not negative".into()));
        }
        if kind == "histogram" {
            let le = labels.iter().find(|(k, _)| k == "le").map(|(_, v)| v.clone());
            let key_labels: Vec<String> =
                labels.iter().filter(|(k, _)| k != "le").map(|(k, v)| format!("{k}={v:?}")).collect();
            let key = (family.clone(), key_labels.join(","));
            if name.ends_with("_bucket") {
                let le = le.ok_or_else(|| at("a bucket without le".into()))?;
                let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().map_err(|_| at("bad le".into()))? };
                buckets.entry(key).or_default().push((bound, value));
            } else if name.ends_with("_count") {
                counts.insert(key, value);
            } else {
                sums.insert(key, value);
            }
        }
    }
    for (key, series) in &buckets {
        if series.windows(2).any(|w| w[1].0 <= w[0].0 || w[1].1 < w[0].1) {
            return Err(format!("{key:?}: buckets are not increasing and cumulative"));
        }
        if series.last().map(|b| b.0) != Some(f64::INFINITY) {
            return Err(format!("{key:?}: no +Inf bucket"));
        }
        if counts.get(key) != series.last().map(|b| &b.1) || !sums.contains_key(key) {
            return Err(format!("{key:?}: _count differs from the +Inf bucket, or no _sum"));
        }
    }
    Ok(())
}

#[test]
fn the_checker_refuses_what_prometheus_would() {
    let good = "# HELP mu2_a_total A.\n# TYPE mu2_a_total counter\nmu2_a_total{image=\"e\\\"x\"} 3\n\
                # TYPE mu2_d_seconds histogram\nmu2_d_seconds_bucket{le=\"0.1\"} 1\nmu2_d_seconds_bucket{le=\"+Inf\"} 2\n\
                mu2_d_seconds_sum 0.3\nmu2_d_seconds_count 2\n";
    assert_eq!(check_prometheus_text(good), Ok(()));
    for bad in [
        "mu2_a_total 1\n",
        "# TYPE mu2_a counter\nmu2_a 1\n",
        "# TYPE mu2_a_total counter\nmu2_a_total{image=unquoted} 1\n",
        "# TYPE mu2_a_total counter\nmu2_a_total one\n",
        "# TYPE mu2_d histogram\nmu2_d_bucket{le=\"1\"} 2\nmu2_d_bucket{le=\"+Inf\"} 1\nmu2_d_sum 1\nmu2_d_count 1\n",
        "# TYPE mu2_d_duration histogram\n",
        "# TYPE mu2_a gauge\n# TYPE mu2_b gauge\nmu2_a 1\nmu2_b 1\nmu2_a 2\n",
        "# TYPE mu2_a gauge\nmu2_a 1",
    ] {
        assert!(check_prometheus_text(bad).is_err(), "accepted: {bad:?}");
    }
}
