//! `mu2 serve` as users run it: the real daemon binary on a temporary socket and a free
//! loopback port, real /dev/kvm, real guests.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mu2_vmm::api::client::{self, metric_value, Client};
use serde_json::json;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A daemon started for one test; killed if the test fails before stopping it.
struct Daemon {
    child: Option<Child>,
    sock: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl Daemon {
    fn start(tag: &str, extra: &[&str]) -> Daemon {
        let dir = std::env::temp_dir().join(format!("mu2-api-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        // The sandboxed daemon runs as nobody and reads what the test registers from here.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let sock = dir.join("api.sock");
        let port = free_port();
        let http = format!("127.0.0.1:{port}");
        let images = dir.join("images");
        let child = Command::new(env!("CARGO_BIN_EXE_mu2"))
            .arg("serve")
            .arg("--api-sock")
            .arg(&sock)
            .args(["--http", &http, "--images-dir"])
            .arg(&images)
            // What a test registers by path lies in its directory.
            .arg("--allow-dir")
            .arg(&dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting mu2 serve");
        let daemon = Daemon { child: Some(child), sock, dir, port };
        let until = Instant::now() + Duration::from_secs(120);
        while Instant::now() < until {
            if daemon.client().health().is_ok() {
                return daemon;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the daemon did not answer /health");
    }

    fn client(&self) -> Client {
        Client::new(&self.sock)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// One request to the dispatcher.
    fn http(&self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> client::Response {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to the dispatcher");
        stream.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        client::roundtrip(&mut stream, method, target, headers, body).expect("roundtrip").expect("an HTTP response")
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
        assert!(status.success());
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < until, "the daemon did not stop after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first: the sandbox's supervisor removes the daemon's cgroup and
            // directories only when it is not killed outright.
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let until = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn status_of(r: Result<client::Response, client::ClientError>) -> u16 {
    match r {
        Ok(r) => r.status,
        Err(e) => panic!("request failed: {e}"),
    }
}

#[test]
fn images_are_created_invoked_listed_and_deleted_and_metrics_move() {
    kvm_or_skip!();
    let d = Daemon::start("images", &["--pool-size", "2", "--timeout", "2s", "--max-body", "4096"]);
    let c = d.client();
    let mode = std::fs::metadata(&d.sock).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");

    let created = c.put_image("e2", &json!({ "function": "echo" })).expect("PUT");
    assert_eq!(created["name"], "e2");
    assert_eq!(created["http"], false);
    assert_eq!(status_of(c.request("PUT", "/images/e2", br#"{"function":"echo"}"#)), 409);
    let list = c.list_images().expect("list");
    assert!(list["images"].as_array().is_some_and(|a| a.iter().any(|i| i["name"] == "e2")), "{list}");
    assert_eq!(c.get_image("e2").expect("get")["ready"], true);

    let before = c.metrics().expect("metrics");
    let out = c.invoke("e2", b"hello mu2").expect("invoke");
    assert_eq!(out.body, b"hello mu2");
    for h in ["x-mu2-vm-id", "x-mu2-fork-us", "x-mu2-run-us", "x-mu2-total-us"] {
        assert!(out.header(h).is_some_and(|v| v.parse::<f64>().is_ok()), "header {h}: {:?}", out.headers);
    }
    let after = c.metrics().expect("metrics");
    let ok = |t: &str| metric_value(t, "mu2_requests_total", "image=\"e2\",outcome=\"ok\"");
    assert_eq!(ok(&after), ok(&before) + 1.0, "{after}");
    assert!(metric_value(&after, "mu2_request_duration_seconds_count", "image=\"e2\"") >= 1.0);
    assert!(metric_value(&after, "mu2_forks_total", "") >= 1.0);

    // A built-in function is an image without a PUT.
    assert_eq!(c.invoke("sha256", b"abc").expect("sha256").body.len(), 64);

    // Errors, each with its status, while other requests keep succeeding.
    let busy = {
        let c = c.clone();
        std::thread::spawn(move || {
            (0..10).map(|i| c.invoke("e2", format!("req {i}").as_bytes()).map(|r| r.body)).collect::<Vec<_>>()
        })
    };
    assert_eq!(status_of(c.request("PUT", "/images/bad", b"{not json")), 400);
    assert_eq!(status_of(c.request("PUT", "/images/bad", br#"{"function":"nope"}"#)), 400);
    assert_eq!(status_of(c.request("POST", "/images/missing/invoke", b"x")), 404);
    assert_eq!(status_of(c.request("GET", "/nope", b"")), 404);
    assert_eq!(status_of(c.request("POST", "/images/e2/invoke", &[b'x'; 5000])), 413);
    let crash = c.request("POST", "/images/crash/invoke", b"pf").expect("crash");
    assert_eq!(crash.status, 502, "{}", String::from_utf8_lossy(&crash.body));
    assert!(crash.json().expect("json")["error"].as_str().is_some_and(|e| e.contains("fault")));
    let hang = c.request("POST", "/images/hang/invoke", b"x").expect("hang");
    assert_eq!(hang.status, 504, "{}", String::from_utf8_lossy(&hang.body));
    let mut raw = std::os::unix::net::UnixStream::connect(&d.sock).expect("connect");
    raw.write_all(b"GARBAGE\r\n\r\n").expect("write");
    let mut answer = Vec::new();
    std::io::Read::read_to_end(&mut raw, &mut answer).expect("read");
    assert_eq!(client::parse_response(&answer, false).map(|r| r.status), Ok(400));
    for (i, r) in busy.join().expect("busy thread").into_iter().enumerate() {
        assert_eq!(r.expect("concurrent invoke"), format!("req {i}").into_bytes());
    }
    let m = c.metrics().expect("metrics");
    assert_eq!(metric_value(&m, "mu2_requests_total", "image=\"hang\",outcome=\"timeout\""), 1.0);
    assert_eq!(metric_value(&m, "mu2_requests_total", "image=\"crash\",outcome=\"guest_error\""), 1.0);

    c.delete_image("e2").expect("DELETE");
    assert_eq!(status_of(c.request("GET", "/images/e2", b"")), 404);
    assert_eq!(status_of(c.request("DELETE", "/images/e2", b"")), 404);
}

/// What a `PUT` sets is what its image gets: boot settings in the frozen guest, serving
/// settings in its engine, a pool within `--max-vms` beside the other images' pools.
#[test]
fn per_image_settings_are_applied_and_validated() {
    kvm_or_skip!();
    let d = Daemon::start("settings", &["--mode", "fresh", "--max-vms", "5", "--timeout", "10s"]);
    let c = d.client();
    let body_of = |r: &client::Response| String::from_utf8_lossy(&r.body).into_owned();

    let booted = c
        .put_image("booted", &json!({ "function": "echo", "mem_mib": 32, "vcpus": 2, "cmdline": "mu2.port=6000" }))
        .expect("PUT with boot settings");
    assert_eq!(
        (&booted["mem_mib"], &booted["vcpus"], &booted["port"]),
        (&json!(32), &json!(2), &json!(6000)),
        "{booted}"
    );
    assert_eq!(c.invoke("booted", b"on port 6000").expect("invoke").body, b"on port 6000");

    // The image's own deadline, not the daemon's 10 s.
    c.put_image("quick", &json!({ "function": "work", "timeout": "100ms" })).expect("PUT quick");
    let start = Instant::now();
    let r = c.request("POST", "/images/quick/invoke", b"spin_us=5000000").expect("invoke quick");
    assert_eq!(r.status, 504, "{}", body_of(&r));
    assert!(start.elapsed() < Duration::from_secs(3), "the 100 ms deadline held: {:?}", start.elapsed());

    c.put_image("small", &json!({ "function": "echo", "max_response": 8 })).expect("PUT small");
    assert_eq!(c.invoke("small", b"8 bytes!").expect("fits").body, b"8 bytes!");
    let r = c.request("POST", "/images/small/invoke", b"nine byte").expect("invoke small");
    assert_eq!(r.status, 502, "{}", body_of(&r));
    assert!(body_of(&r).contains("8-byte limit"), "{}", body_of(&r));

    // Pools count against --max-vms 5: each must leave room for a request, beside the others.
    let pool = |size: u64| json!({ "function": "echo", "mode": "pool", "pool_size": size });
    let r = c.request("PUT", "/images/p5", pool(5).to_string().as_bytes()).expect("PUT p5");
    assert_eq!(r.status, 400, "{}", body_of(&r));
    assert!(body_of(&r).contains("`pool_size` must be below --max-vms 5"), "{}", body_of(&r));
    let p3 = c.put_image("p3", &pool(3)).expect("PUT p3");
    assert_eq!((&p3["mode"], &p3["pool_size"]), (&json!("pool"), &json!(3)));
    let r = c.request("PUT", "/images/p2", pool(2).to_string().as_bytes()).expect("PUT p2");
    assert_eq!(r.status, 409, "{}", body_of(&r));
    assert!(body_of(&r).contains("hold 3 of --max-vms 5"), "{}", body_of(&r));
    assert_eq!(c.invoke("p3", b"pooled").expect("invoke p3").body, b"pooled");
    c.delete_image("p3").expect("DELETE p3");
    c.put_image("p2", &pool(2)).expect("PUT p2 once p3 is gone");
}

/// A failure gives the same status and message whichever way the request came in.
#[test]
fn a_guest_crash_is_502_through_invoke_and_through_a_route() {
    kvm_or_skip!();
    let d = Daemon::start("crash", &["--route", "/crash=crash", "--mode", "fresh", "--timeout", "5s"]);
    let c = d.client();
    let invoked = c.request("POST", "/images/crash/invoke", b"pf").expect("invoke");
    let routed = d.http("POST", "/crash", &[], b"pf");
    let message = |r: &client::Response| {
        let body = r.json().unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)));
        body["error"].as_str().map(str::to_string).unwrap_or_else(|| panic!("no error field: {body}"))
    };
    let (invoked_message, routed_message) = (message(&invoked), message(&routed));
    assert_eq!((invoked.status, routed.status), (502, 502), "{invoked_message} / {routed_message}");
    assert!(invoked_message.starts_with("image `crash`: ") && invoked_message.contains("fault"), "{invoked_message}");
    assert_eq!(invoked_message, routed_message);
    let m = c.metrics().expect("metrics");
    assert_eq!(metric_value(&m, "mu2_requests_total", "image=\"crash\",outcome=\"guest_error\""), 2.0, "{m}");
}

/// A function's error is its own outcome: 500 with the function's message, through invoke and
/// through a route, counted as `function_error`; a request larger than the guest can hold is
/// refused with 413 before a VM is made for it, both ways.
#[test]
fn a_function_error_is_500_and_a_request_too_large_is_413_both_ways() {
    kvm_or_skip!();
    let d = Daemon::start(
        "outcomes",
        &["--route", "/work=work", "--route", "/echo=echo", "--mode", "fresh", "--max-body", "41943040"],
    );
    let c = d.client();
    let error_of = |r: &client::Response| {
        let body = r.json().unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)));
        body["error"].as_str().map(str::to_string).unwrap_or_else(|| panic!("no error field: {body}"))
    };
    let invoked = c.request("POST", "/images/work/invoke", b"spin_us=soon").expect("invoke");
    let routed = d.http("POST", "/work", &[], b"spin_us=soon");
    assert_eq!((invoked.status, routed.status), (500, 500), "{}", error_of(&invoked));
    let message = error_of(&invoked);
    assert_eq!(
        message,
        "image `work`: the function failed: cannot parse \"spin_us=soon\": the request is `pages=N spin_us=M`, both optional"
    );
    assert_eq!(error_of(&routed), message);
    assert_eq!(c.invoke("work", b"spin_us=1").expect("a good request").body, b"pages=0 spin_us=1");

    // An 8 MiB guest: a request at its limit goes through, one byte more is refused.
    let small = c.put_image("small", &json!({ "function": "echo", "mem_mib": 8 })).expect("PUT small");
    let limit = small["max_request"].as_u64().expect("max_request shown");
    assert!(limit > 1 << 20 && limit < 4 << 20, "half of an 8 MiB guest's free heap: {limit}");
    let fits = vec![7u8; limit as usize];
    assert_eq!(c.invoke("small", &fits).expect("a request at the limit").body.len(), fits.len());
    let forks_before = metric_value(&c.metrics().expect("metrics"), "mu2_forks_total", "");
    let over = vec![7u8; limit as usize + 1];
    let invoked = c.request("POST", "/images/small/invoke", &over).expect("invoke");
    assert_eq!(invoked.status, 413, "{}", error_of(&invoked));
    let message = error_of(&invoked);
    let start = format!("image `small`: a request of {} bytes is larger than the {limit} bytes", over.len());
    assert!(message.starts_with(&start), "{message}");
    assert!(message.contains("8 MiB") && message.contains("--mem-mib") && message.contains("`mem_mib`"), "{message}");
    // The dispatcher's echo route: a default 64 MiB guest.
    let echo_limit = c.get_image("echo").expect("GET echo")["max_request"].as_u64().expect("max_request");
    let routed = d.http("POST", "/echo", &[], &vec![7u8; echo_limit as usize + 1]);
    assert_eq!(routed.status, 413, "{}", error_of(&routed));
    assert!(error_of(&routed).contains("with 64 MiB of memory"), "{}", error_of(&routed));

    let m = c.metrics().expect("metrics");
    assert_eq!(metric_value(&m, "mu2_forks_total", ""), forks_before, "no VM for a refused request: {m}");
    assert_eq!(metric_value(&m, "mu2_requests_total", "image=\"work\",outcome=\"function_error\""), 2.0, "{m}");
    assert_eq!(metric_value(&m, "mu2_requests_total", "image=\"small\",outcome=\"rejected\""), 1.0, "{m}");
    assert_eq!(metric_value(&m, "mu2_requests_total", "image=\"echo\",outcome=\"rejected\""), 1.0, "{m}");
}

#[test]
fn max_vms_answers_429_while_full() {
    kvm_or_skip!();
    let d = Daemon::start("limit", &["--mode", "fresh", "--max-vms", "1", "--timeout", "3s"]);
    let c = d.client();
    assert_eq!(c.invoke("echo", b"warm").expect("echo").body, b"warm");
    let hang = {
        let c = c.clone();
        std::thread::spawn(move || c.request("POST", "/images/hang/invoke", b"").map(|r| r.status))
    };
    // Wait until the hanging request holds the only VM.
    let until = Instant::now() + Duration::from_secs(30);
    while c.health().expect("health")["in_flight"] != 1 {
        assert!(Instant::now() < until, "the hang request never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let refused = c.request("POST", "/images/echo/invoke", b"x").expect("refused");
    assert_eq!(refused.status, 429);
    assert_eq!(hang.join().expect("hang thread").expect("hang"), 504);
    assert_eq!(c.invoke("echo", b"again").expect("echo").body, b"again");
    // DELETE is refused while in use: checked through the count, not a race.
    let m = c.metrics().expect("metrics");
    assert_eq!(metric_value(&m, "mu2_requests_total", "image=\"echo\",outcome=\"rejected\""), 1.0);
}

#[test]
fn dispatcher_serves_200_concurrent_requests_and_shutdown_is_clean() {
    kvm_or_skip!();
    let mut d = Daemon::start(
        "dispatch",
        &[
            "--route",
            "/hello=hello-http",
            "--route",
            "/echo=echo",
            "--pool-size",
            "4",
            "--timeout",
            "5s",
            // The drain period has tests of its own.
            "--drain-period",
            "0",
            // 200 VMs of 64 MiB at once, whatever this machine's memory (--max-memory's
            // default): its bound has tests of its own.
            "--max-memory",
            "16G",
        ],
    );
    let r = d.http("GET", "/hello/world?status=201&a=b", &[("x-echo", "ping")], b"");
    assert_eq!(r.status, 201);
    assert_eq!(r.header("x-echo"), Some("ping"));
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(text.contains("method: GET\npath: /hello/world\nquery: status=201&a=b\n"), "{text}");
    let r = d.http("POST", "/echo/anything", &[], b"raw bytes");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"raw bytes"[..]));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(d.http("GET", "/unknown", &[], b"").status, 404);

    let port = d.port;
    let threads: Vec<_> = (0..200)
        .map(|i| {
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(("127.0.0.1", port))?;
                stream.set_read_timeout(Some(Duration::from_secs(120)))?;
                let body = format!("body {i}");
                let r = client::roundtrip(&mut stream, "PUT", &format!("/hello/{i}?n={i}"), &[], body.as_bytes())?
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>((i, r))
            })
        })
        .collect();
    for t in threads {
        let (i, r) = t.join().expect("client thread").expect("request");
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 200, "request {i}: {text}");
        let want = format!("method: PUT\npath: /hello/{i}\nquery: n={i}\n");
        assert!(text.contains(&want) && text.ends_with(&format!("body {i}")), "request {i}: {text}");
    }
    let c = d.client();
    let m = c.metrics().expect("metrics");
    assert!(metric_value(&m, "mu2_requests_total", "image=\"hello-http\",outcome=\"ok\"") >= 201.0, "{m}");
    assert_eq!(metric_value(&m, "mu2_requests_in_flight", ""), 0.0);

    // Draining: with the images gone, no VM is left in the process.
    for image in ["hello-http", "echo"] {
        c.delete_image(image).expect("DELETE");
    }
    let health = c.health().expect("health");
    assert_eq!(health["live_vms"], 0, "{health}");
    assert_eq!(health["in_flight"], 0);

    let pid = d.pid();
    let status = d.stop();
    assert!(status.success(), "exit status {status:?}");
    assert!(!d.sock.exists(), "the socket is removed");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the process is gone");
}

#[test]
fn an_image_from_mu2_snapshot_is_served_as_its_guest_announced_and_shows_its_content_id() {
    kvm_or_skip!();
    // Routes name built-in guests only (they are fixed at start), so the route names
    // `hello-http`, and the built image is then replaced by one registered from a directory
    // under the same name: what the dispatcher does with it comes from the registration.
    let d = Daemon::start("snapshot-http", &["--route", "/web=hello-http", "--pool-size", "1"]);
    let image = d.dir.join("hello-http.img");
    let out = Command::new(env!("CARGO_BIN_EXE_mu2"))
        .args(["snapshot", "--function", "hello-http", "--out"])
        .arg(&image)
        .output()
        .expect("mu2 snapshot");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info = Command::new(env!("CARGO_BIN_EXE_mu2")).args(["image", "info", "--json"]).arg(&image).output();
    let info: serde_json::Value = serde_json::from_slice(&info.expect("mu2 image info").stdout).expect("JSON");
    assert_eq!(info["ready_flags"], json!(["http"]));
    // The sandboxed daemon runs as nobody: the image must be readable by it.
    for (path, mode) in [(image.clone(), 0o755), (image.join("state"), 0o644), (image.join("memory"), 0o644)] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    // Registered without `http`: the image's own flags say it speaks HTTP.
    let c = d.client();
    c.delete_image("hello-http").expect("DELETE the built-in");
    let created = c.put_image("hello-http", &json!({ "path": image })).expect("PUT");
    assert_eq!(created["source"]["path"], json!(image));
    assert_eq!(created["http"], true);
    assert_eq!(created["content_id"], info["content_id"]);
    assert_eq!(c.get_image("hello-http").expect("GET")["content_id"], info["content_id"]);
    let r = d.http("GET", "/web/world?status=201", &[], b"");
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("path: /web/world\n"));

    // The request's `http` still wins.
    c.delete_image("hello-http").expect("DELETE");
    let created = c.put_image("hello-http", &json!({ "path": image, "http": false })).expect("PUT");
    assert_eq!(created["http"], false);
    let r = d.http("GET", "/web/world?status=201", &[], b"");
    assert_eq!(r.status, 200, "the guest's answer passed through as an opaque body");
    assert!(String::from_utf8_lossy(&r.body).starts_with("HTTP/1.1 "), "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn openapi_document_matches_the_server() {
    kvm_or_skip!();
    let doc: serde_json::Value = serde_json::from_str(include_str!("../../docs/openapi.json")).expect("openapi.json");
    let d = Daemon::start("openapi", &["--mode", "fresh"]);
    let c = d.client();
    // In an order that makes every call meaningful: create, read, use, delete.
    let calls: &[(&str, &str, &[u8])] = &[
        ("get", "/health", b""),
        ("get", "/metrics", b""),
        ("put", "/images/{name}", br#"{"function":"echo"}"#),
        ("get", "/images", b""),
        ("get", "/images/{name}", b""),
        ("post", "/images/{name}/invoke", b"hi"),
        ("delete", "/images/{name}", b""),
    ];
    let paths = doc["paths"].as_object().expect("paths");
    let documented: usize =
        paths.values().map(|p| p.as_object().map_or(0, |o| o.keys().filter(|k| *k != "parameters").count())).sum();
    assert_eq!(documented, calls.len(), "every documented operation is exercised");
    for (method, path, body) in calls {
        let responses =
            doc["paths"][path][method]["responses"].as_object().unwrap_or_else(|| panic!("{method} {path}"));
        let target = path.replace("{name}", "oa-echo");
        let r = c.request(&method.to_uppercase(), &target, body).expect("request");
        assert!(responses.contains_key(&r.status.to_string()), "{method} {path}: {} not documented", r.status);
        assert!((200..300).contains(&r.status), "{method} {path}: {}", r.status);
    }
    // A documented error: invoking what was just deleted.
    let r = c.request("POST", "/images/oa-echo/invoke", b"x").expect("request");
    assert!(doc["paths"]["/images/{name}/invoke"]["post"]["responses"].get(r.status.to_string()).is_some());
    assert_eq!(r.status, 404);

    // The PUT fields documented are the ones the server takes, and an image made with every
    // one that applies to a built-in shows only documented fields, with the values given.
    let spec = doc["components"]["schemas"]["ImageSpec"]["properties"].as_object().expect("ImageSpec");
    let mut documented: Vec<&str> = spec.keys().map(String::as_str).collect();
    let mut accepted = mu2_vmm::api::model::PUT_FIELDS.to_vec();
    documented.sort_unstable();
    accepted.sort_unstable();
    assert_eq!(documented, accepted, "ImageSpec lists every PUT field");
    let body = json!({ "function": "echo", "mem_mib": 32, "vcpus": 1, "cmdline": "mu2.x=1", "entry": "native",
                       "mode": "reuse", "pool_size": 2, "timeout": "3s", "max_response": 4096 });
    let created = c.put_image("oa-all", &body).expect("PUT with every setting");
    let shown = doc["components"]["schemas"]["Image"]["properties"].as_object().expect("Image");
    for key in created.as_object().expect("an object").keys() {
        assert!(shown.contains_key(key), "GET shows `{key}`, which the Image schema does not document");
    }
    for (key, want) in [
        ("mem_mib", json!(32)),
        ("vcpus", json!(1)),
        ("cmdline", json!("mu2.x=1")),
        ("entry", json!("native")),
        ("mode", json!("reuse")),
        ("pool_size", json!(2)),
        ("timeout", json!("3000ms")),
        ("max_response", json!(4096)),
    ] {
        assert_eq!(created[key], want, "{key} in {created}");
    }
    let r = c.request("PUT", "/images/oa-bad", br#"{"function":"echo","pool_size":0}"#).expect("request");
    assert!(doc["paths"]["/images/{name}"]["put"]["responses"].get(r.status.to_string()).is_some());
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("`pool_size` must be an integer from 1 to 1024"));
}

#[test]
fn run_bridges_vsock_to_a_unix_socket() {
    kvm_or_skip!();
    let dir = std::env::temp_dir().join(format!("mu2-uds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("v.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mu2"))
        .args(["run", "--function", "echo", "--timeout", "60s", "--vsock-uds"])
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .expect("mu2 run");
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let back = echo_over_vsock_uds(&path, &payload);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(back == payload, "echoed {} of {} bytes", back.len(), payload.len());
}

/// Each fork of an image gets its own socket path: PATH.<pid>, announced on stderr.
#[test]
fn a_forked_long_running_vm_gets_its_own_vsock_socket() {
    if !common::kvm_available("a_forked_long_running_vm_gets_its_own_vsock_socket") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("mu2-api-fork-uds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let image = dir.join("echo.img");
    let status = Command::new(env!("CARGO_BIN_EXE_mu2"))
        .args(["snapshot", "--function", "echo", "--out"])
        .arg(&image)
        .status()
        .expect("mu2 snapshot");
    assert!(status.success());
    let base = dir.join("v.sock");
    let mut forks = Vec::new();
    for _ in 0..2 {
        let child = Command::new(env!("CARGO_BIN_EXE_mu2"))
            .args(["run", "--timeout", "60s", "--image"])
            .arg(&image)
            .arg("--vsock-uds")
            .arg(&base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mu2 run --image");
        let path = mu2_vmm::uds::fork_path(&base, u64::from(child.id()));
        forks.push((child, path));
    }
    assert_ne!(forks[0].1, forks[1].1, "two forks, two paths");
    for (i, (_, path)) in forks.iter().enumerate() {
        let payload = format!("fork {i}");
        assert_eq!(echo_over_vsock_uds(path, payload.as_bytes()), payload.as_bytes());
    }
    for (mut child, _) in forks {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Connects to a VM's vsock-over-UDS socket (waiting for it to appear), opens guest port 5000
/// with `CONNECT`, sends `payload` framed (its length first), and returns the response the
/// guest framed back. Nothing is shut down: the frame says where each message ends.
fn echo_over_vsock_uds(path: &std::path::Path, payload: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let until = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(path) {
            break s;
        }
        assert!(Instant::now() < until, "no socket at {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    };
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    stream.write_all(b"CONNECT 5000\n").expect("connect line");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        assert_eq!(stream.read(&mut byte).expect("handshake"), 1);
        line.push(byte[0]);
    }
    assert!(line.starts_with(b"OK "), "{}", String::from_utf8_lossy(&line));
    let header = mu2_abi::frame::RequestHeader { len: payload.len() as u32 };
    stream.write_all(&header.encode()).expect("frame header");
    stream.write_all(payload).expect("payload");
    let mut head = [0u8; mu2_abi::frame::ResponseHeader::SIZE];
    stream.read_exact(&mut head).expect("response frame header");
    let header = mu2_abi::frame::ResponseHeader::decode(head).expect("a known outcome");
    assert_eq!(header.outcome, mu2_abi::frame::outcome::OK);
    let mut back = vec![0u8; header.len as usize];
    stream.read_exact(&mut back).expect("echo");
    back
}

/// Lines of a child's stderr as they come, read on a thread.
fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("piped stderr");
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

#[test]
fn serve_says_where_it_listens_with_the_port_it_bound() {
    kvm_or_skip!();
    let dir = std::env::temp_dir().join(format!("mu2-api-announce-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sock = dir.join("api.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mu2"))
        .arg("serve")
        .arg("--api-sock")
        .arg(&sock)
        .args(["--http", "127.0.0.1:0", "--route", "/echo=echo", "--mode", "fresh"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting mu2 serve");
    let lines = stderr_lines(&mut child);
    let mut seen = Vec::new();
    while !seen.last().is_some_and(|l: &String| l.starts_with("mu2 serve: mode")) {
        match lines.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => seen.push(line),
            Err(e) => panic!("no startup lines ({e}): {seen:?}"),
        }
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let text = seen.join("\n");
    assert!(text.contains(&format!("control API on unix socket {}", sock.display())), "{text}");
    assert!(text.contains("route /echo -> image echo"), "{text}");
    assert!(text.contains("mode fresh, at most 256 VMs, 10s per request"), "{text}");
    let port = text
        .split("HTTP dispatcher on http://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("the bound port: {text}"));
    assert_ne!(port, 0, "{text}");
}

#[test]
fn serve_refuses_routes_it_cannot_serve_as_bad_input() {
    let sock = std::env::temp_dir().join(format!("mu2-api-refuse-{}.sock", std::process::id()));
    let sock_arg = sock.to_str().expect("utf-8 path");
    for (args, expected) in [
        (&["--http", "127.0.0.1:0", "--route", "/x=no-such-image"][..], "no built-in guest `no-such-image`"),
        (&["--route", "/echo=echo"], "--route /echo=echo without --http"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_mu2"))
            .args(["serve", "--api-sock", sock_arg])
            .args(args)
            .output()
            .expect("running mu2 serve");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!sock.exists(), "no socket left by a refused start");
    }
}

#[test]
fn a_failed_http_bind_leaves_no_socket_or_directory_behind() {
    kvm_or_skip!();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = taken.local_addr().expect("address").to_string();
    // The daemon makes its images directory in TMPDIR: one of the test's own, to see it go.
    let tmp = std::env::temp_dir().join(format!("mu2-api-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let sock = tmp.join("api.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_mu2"))
        .arg("serve")
        .arg("--api-sock")
        .arg(&sock)
        .args(["--http", &addr])
        .env("TMPDIR", &tmp)
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting mu2 serve");
    let out = child.wait_with_output().expect("waiting for mu2 serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("binding {addr}")), "{err}");
    assert!(!sock.exists(), "the API socket is removed");
    let left: Vec<_> = std::fs::read_dir(&tmp).expect("temp dir").filter_map(Result::ok).map(|e| e.path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir_all(&tmp).expect("removing the temp dir");
}
