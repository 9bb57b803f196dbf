//! The daemon against hostile files and its own compromise: images immutable once loaded,
//! planted links not followed, the socket path not clobbered, and the sandbox (seccomp per
//! thread class, user, mount namespace, landlock) in force. Real daemon, real KVM.

mod common;
use common::Scratch;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mu2_vmm::api::client::Client;

/// `mu2 serve` on a socket in `scratch`, killed if the test ends without stopping it.
struct Daemon {
    child: Option<Child>,
    sock: PathBuf,
}

impl Daemon {
    fn start(scratch: &Scratch, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let sock = scratch.path("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_mu2"))
            .arg("serve")
            .arg("--api-sock")
            .arg(&sock)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting mu2 serve");
        let mut daemon = Daemon { child: Some(child), sock };
        let until = Instant::now() + Duration::from_secs(120);
        while Instant::now() < until {
            if daemon.client().health().is_ok() {
                return daemon;
            }
            if let Some(status) = daemon.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("mu2 serve exited with {status} before answering: {}", daemon.stderr());
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

    fn invoke(&self, image: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let r = self.client().request("POST", &format!("/images/{image}/invoke"), body).expect("invoke");
        (r.status, r.body)
    }

    /// Waits for the daemon to exit by itself.
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let until = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < until, "the daemon is still running");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = self.pid().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
        self.wait_exit(Duration::from_secs(60))
    }

    /// What it wrote on stderr (once it has exited).
    fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut text = String::new();
        if let Some(err) = self.child.as_mut().and_then(|c| c.stderr.as_mut()) {
            let _ = err.read_to_string(&mut text);
        }
        text
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
    }
}

fn mu2(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mu2")).args(args).output().expect("running mu2")
}

/// An echo image made by `mu2 snapshot` in `dir`.
fn echo_image(dir: &Path) {
    let out = mu2(&["snapshot", "--function", "echo", "--out", dir.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_loaded_image_is_immune_to_its_files_changing() {
    kvm_or_skip!();
    let scratch = Scratch::new("hardening", "immutable");
    let image = scratch.path("echo.img");
    echo_image(&image);
    // The daemon runs as nobody: what it registers must be readable by it.
    for (path, mode) in [(image.clone(), 0o755), (image.join("state"), 0o644), (image.join("memory"), 0o644)] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let allowed = scratch.path("");
    let d = Daemon::start(&scratch, &["--mode", "fresh", "--allow-dir", allowed.to_str().expect("utf-8")], &[]);
    let put = d.client().request("PUT", "/images/e", format!(r#"{{"path": "{}"}}"#, image.display()).as_bytes());
    let put = put.expect("PUT");
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));
    assert_eq!(d.invoke("e", b"before"), (200, b"before".to_vec()));
    let memory = image.join("memory");
    let size = std::fs::metadata(&memory).expect("memory file").len();
    // Cut to nothing: a fork mapping the file itself would die of SIGBUS on its first page.
    std::fs::OpenOptions::new().write(true).open(&memory).and_then(|f| f.set_len(0)).expect("truncate");
    for i in 0..5 {
        let body = format!("after truncation {i}");
        assert_eq!(d.invoke("e", body.as_bytes()), (200, body.into_bytes()));
    }
    // Rewritten in place with other bytes, as `cp other memory` would.
    let garbage: Vec<u8> = (0..size).map(|i| (i * 7 + 13) as u8).collect();
    std::fs::write(&memory, &garbage).expect("rewrite");
    for i in 0..5 {
        let body = format!("after rewriting {i}");
        assert_eq!(d.invoke("e", body.as_bytes()), (200, body.into_bytes()));
    }
    let health = d.client().health().expect("health");
    assert_eq!(health["status"], "ok");
}

#[test]
fn a_link_planted_in_the_images_directory_is_not_followed() {
    kvm_or_skip!();
    let scratch = Scratch::new("hardening", "planted");
    let images = scratch.path("images");
    let victim = scratch.path("victim");
    std::fs::create_dir(&victim).expect("victim dir");
    std::fs::create_dir(&images).expect("images dir");
    std::fs::set_permissions(&images, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    // The names the daemon gives its first images, each a link to the victim.
    for n in 1..=3 {
        std::os::unix::fs::symlink(&victim, images.join(format!("echo.{n}"))).expect("plant");
    }
    let d = Daemon::start(&scratch, &["--mode", "fresh", "--images-dir", images.to_str().expect("utf-8")], &[]);
    assert_eq!(d.invoke("echo", b"hi"), (200, b"hi".to_vec()));
    assert_eq!(std::fs::read_dir(&victim).expect("victim").count(), 0, "nothing was written through a link");
    for n in 1..=3 {
        let link = images.join(format!("echo.{n}"));
        assert!(std::fs::symlink_metadata(&link).expect("link").file_type().is_symlink(), "{} kept", link.display());
    }
    let made = images.join("echo.4");
    assert!(made.join("state").is_file(), "the image went to a name of its own");
    for file in ["state", "memory"] {
        let mode = std::fs::metadata(made.join(file)).expect("image file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
}

#[test]
fn the_default_images_directory_is_private() {
    kvm_or_skip!();
    let scratch = Scratch::new("hardening", "private");
    let tmp = scratch.path("tmp");
    std::fs::create_dir(&tmp).expect("tmp");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let mut d = Daemon::start(&scratch, &["--mode", "fresh"], &[("TMPDIR", tmp.to_str().expect("utf-8"))]);
    assert_eq!(d.invoke("echo", b"hi"), (200, b"hi".to_vec()));
    let dirs: Vec<PathBuf> = std::fs::read_dir(&tmp)
        .expect("tmp")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("mu2-serve-")))
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let name = dirs[0].file_name().and_then(|n| n.to_str()).expect("name");
    assert_ne!(name, format!("mu2-serve-{}", d.pid()), "the name is not the predictable one");
    assert_eq!(std::fs::metadata(&dirs[0]).expect("dir").permissions().mode() & 0o777, 0o700);
    assert!(d.stop().success());
    assert!(!dirs[0].exists(), "removed at shutdown");
}

#[test]
fn api_sock_does_not_replace_a_regular_file() {
    kvm_or_skip!();
    let scratch = Scratch::new("hardening", "sockfile");
    let file = scratch.path("precious");
    std::fs::write(&file, b"keep me").expect("write");
    let out = mu2(&["serve", "--api-sock", file.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("refusing to replace it"), "{err}");
    assert_eq!(std::fs::read(&file).expect("the file survives"), b"keep me");
}

/// The pid of the sandboxed daemon: the supervisor's one child.
fn daemon_pid(supervisor: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children")).expect("children");
    let pids: Vec<u32> = children.split_whitespace().filter_map(|p| p.parse().ok()).collect();
    assert_eq!(pids.len(), 1, "the supervisor has one child: {pids:?}");
    pids[0]
}

fn status_field(pid: u32, task: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{task}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix(field)).map(|v| v.trim().to_string()).unwrap_or_default()
}

#[test]
fn every_thread_of_a_running_daemon_is_filtered_and_unprivileged() {
    kvm_or_skip!();
    let scratch = Scratch::new("hardening", "filtered");
    let args = ["--http", "127.0.0.1:0", "--route", "/echo=echo", "--pool-size", "2"];
    let d = Daemon::start(&scratch, &args, &[]);
    assert_eq!(d.invoke("echo", b"hi"), (200, b"hi".to_vec()));
    // A connection held open, so that a connection thread is among them.
    let held = std::os::unix::net::UnixStream::connect(&d.sock).expect("connect");
    std::thread::sleep(Duration::from_millis(300));
    let pid = daemon_pid(d.pid());
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let names: Vec<String> = tasks
        .iter()
        .map(|t| std::fs::read_to_string(format!("/proc/{pid}/task/{t}/comm")).unwrap_or_default().trim().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.is_empty()), "every thread is still there: {names:?}");
    for wanted in ["mu2", "mu2-spawner", "mu2-api-accept", "mu2-http-accept", "mu2-conn", "mu2-pool-0", "mu2-reaper"] {
        assert!(names.iter().any(|n| n == wanted), "no {wanted} thread among {names:?}");
    }
    for (task, name) in tasks.iter().zip(&names) {
        assert_eq!(status_field(pid, task, "Seccomp:"), "2", "thread {task} ({name}) runs without a filter");
        assert_eq!(status_field(pid, task, "NoNewPrivs:"), "1", "thread {task} ({name})");
        assert_eq!(status_field(pid, task, "CapEff:"), "0000000000000000", "thread {task} ({name})");
        let uid = status_field(pid, task, "Uid:");
        assert!(uid.split_whitespace().all(|id| id == "65534"), "thread {task} ({name}) runs as {uid}");
    }
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).expect("mount namespace");
    assert_ne!(ns(&pid.to_string()), ns("self"), "the daemon has its own mount namespace");
    drop(held);
}

#[test]
fn the_sandboxed_daemon_reads_nothing_outside_its_tree() {
    kvm_or_skip!();
    let scratch = Scratch::new("hardening", "tree");
    let allowed = scratch.path("allowed");
    std::fs::create_dir(&allowed).expect("allowed dir");
    std::fs::set_permissions(&allowed, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Inside the allowed directory, but pointing out of it.
    std::os::unix::fs::symlink("/etc/passwd", allowed.join("passwd")).expect("link");
    let d = Daemon::start(&scratch, &["--mode", "fresh", "--allow-dir", allowed.to_str().expect("utf-8")], &[]);
    let put = |name: &str, body: String| {
        let r = d.client().request("PUT", &format!("/images/{name}"), body.as_bytes()).expect("PUT");
        (r.status, String::from_utf8_lossy(&r.body).into_owned())
    };
    let (status, body) = put("a", r#"{"kernel": "/etc/passwd"}"#.to_string());
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("outside the directories the daemon may read"), "{body}");
    let (status, body) = put("b", format!(r#"{{"kernel": "{}/../../../etc/passwd"}}"#, allowed.display()));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("outside the directories the daemon may read"), "{body}");
    // Allowed by name; the file it leads to does not exist in the daemon's root.
    let (status, body) = put("c", format!(r#"{{"kernel": "{}"}}"#, allowed.join("passwd").display()));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("No such file or directory"), "{body}");
    assert_eq!(d.client().health().expect("health")["status"], "ok");
}

/// Starts a daemon whose threads of `class` make a forbidden system call (the test hook),
/// drives it until they have, and returns its exit status, its stderr and whether its socket
/// is still there.
fn daemon_with_forbidden_call(class: &str, extra: &[&str]) -> (std::process::ExitStatus, String, bool) {
    let scratch = Scratch::new("hardening", &format!("forbidden-{class}"));
    let sock = scratch.path("api.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mu2"))
        .arg("serve")
        .arg("--api-sock")
        .arg(&sock)
        .args(["--http", "127.0.0.1:0", "--route", "/echo=echo", "--pool-size", "2"])
        .args(extra)
        .env("MU2_TEST_FORBIDDEN_SYSCALL", class)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting mu2 serve");
    let until = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < until, "the {class} thread's forbidden call did not end the daemon");
        // Connections, for the classes that need a request to run.
        let _ = Client::new(&sock).request("POST", "/images/echo/invoke", b"x");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    use std::io::Read;
    let _ = child.stderr.take().expect("stderr").read_to_string(&mut stderr);
    (status, stderr, sock.exists())
}

#[test]
fn a_forbidden_system_call_in_any_thread_class_kills_the_daemon() {
    kvm_or_skip!();
    for class in ["main", "acceptor", "connection", "pool-builder", "recycler", "spawner"] {
        let (status, stderr, socket_left) = daemon_with_forbidden_call(class, &[]);
        assert_eq!(status.code(), Some(1), "{class}: {stderr}");
        assert!(stderr.contains("was killed by signal 31 (SIGSYS"), "{class}: {stderr}");
        assert!(!socket_left, "{class}: the supervisor removes the socket");
    }
}

#[test]
fn without_the_sandbox_the_hooked_call_goes_through() {
    kvm_or_skip!();
    // The control: the hook really makes the call (execve of /bin/true, which exits 0).
    let (status, stderr, _) = daemon_with_forbidden_call("acceptor", &["--no-sandbox"]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("mu2 serve: sandbox: none (--no-sandbox)") || stderr.is_empty(), "{stderr}");
}

/// Reads what the daemon sends on `stream` until it closes it or `within` passes.
fn read_answer(stream: &mut std::os::unix::net::UnixStream, within: Duration) -> String {
    use std::io::Read;
    stream.set_read_timeout(Some(within)).expect("read timeout");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = stream.read(&mut chunk) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

#[test]
fn connections_beyond_the_cap_are_answered_503_and_threads_stay_bounded() {
    kvm_or_skip!();
    let scratch = Scratch::new("hardening", "conn-cap");
    let d = Daemon::start(&scratch, &["--mode", "fresh", "--max-connections", "4"], &[]);
    let daemon = daemon_pid(d.pid());
    let before = threads_of(daemon);
    // Four idle connections take every slot...
    let idle: Vec<_> = (0..4).map(|_| std::os::unix::net::UnixStream::connect(&d.sock).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(300));
    // ...so each of the next 200 is answered 503 at once and closed, and no thread is made
    // for any of them.
    for i in 0..200 {
        let mut extra = std::os::unix::net::UnixStream::connect(&d.sock).expect("connect beyond the cap");
        let answer = read_answer(&mut extra, Duration::from_secs(10));
        assert!(answer.starts_with("HTTP/1.1 503"), "connection {i} beyond the cap: {answer:?}");
        assert!(answer.contains("too many connections"), "{answer}");
    }
    let during = threads_of(daemon);
    assert!(during <= before + 4 + 2, "threads {before} before, {during} with 4 idle connections and 200 refused");
    drop(idle);
    // Slots free again once the idle connections close.
    let until = Instant::now() + Duration::from_secs(10);
    while d.client().health().is_err() {
        assert!(Instant::now() < until, "the daemon answers again once connections close");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.invoke("echo", b"after the flood"), (200, b"after the flood".to_vec()));
}

#[test]
fn a_request_trickling_in_is_answered_408_at_the_read_timeout() {
    use std::io::Write;
    kvm_or_skip!();
    let scratch = Scratch::new("hardening", "slow-body");
    let d = Daemon::start(&scratch, &["--mode", "fresh", "--read-timeout", "1s"], &[]);
    let mut slow = std::os::unix::net::UnixStream::connect(&d.sock).expect("connect");
    slow.write_all(b"POST /images/echo/invoke HTTP/1.1\r\ncontent-length: 1000\r\n\r\n").expect("head");
    // A byte every 100 ms would take 100 s; the read timeout ends it after 1 s.
    let writer = {
        let mut slow = slow.try_clone().expect("clone");
        std::thread::spawn(move || {
            for _ in 0..100 {
                if slow.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let answer = read_answer(&mut slow, Duration::from_secs(30));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("read timeout"), "{answer}");
    drop(slow);
    let _ = writer.join();
    assert_eq!(d.invoke("echo", b"still serving"), (200, b"still serving".to_vec()));
}

#[test]
fn request_bodies_beyond_the_buffered_budget_are_answered_503() {
    use std::io::Write;
    kvm_or_skip!();
    let scratch = Scratch::new("hardening", "buffered");
    let d = Daemon::start(&scratch, &["--mode", "fresh", "--max-body", "1048576", "--max-buffered", "1M"], &[]);
    // A body of the whole budget, sent but for its last 10 bytes: what arrived is charged
    // (bodies are charged as they arrive, so the head alone would hold nothing).
    let mut holder = std::os::unix::net::UnixStream::connect(&d.sock).expect("connect");
    holder.write_all(b"POST /images/echo/invoke HTTP/1.1\r\ncontent-length: 1048576\r\n\r\n").expect("head");
    holder.write_all(&vec![b'x'; 1048576 - 10]).expect("most of the body");
    std::thread::sleep(Duration::from_millis(300));
    let r = d.client().request("POST", "/images/echo/invoke", &[b'y'; 1000]).expect("a second body");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("no room for the request body"), "{:?}", r.body);
    drop(holder);
    // Given back once that connection is gone.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = d.invoke("echo", &[b'z'; 1000]);
        if status == 200 {
            assert_eq!(body, vec![b'z'; 1000]);
            break;
        }
        assert!(Instant::now() < until, "the budget was not given back: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// KVM VMs the process `pid` holds now.
fn kvm_vms_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| {
        dir.filter_map(Result::ok)
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:kvm-vm"))
            .count()
    })
}

#[test]
fn max_vms_bounds_every_live_vm_under_load_and_max_memory_bounds_guest_memory() {
    kvm_or_skip!();
    let scratch = Scratch::new("hardening", "max-vms");
    let d = Daemon::start(&scratch, &["--mode", "fresh", "--max-vms", "2", "--max-memory", "160M"], &[]);
    let daemon = daemon_pid(d.pid());
    // VMs finished with wait for the reaper; they count until it has destroyed them.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(kvm_vms_of(daemon));
                std::thread::sleep(Duration::from_millis(1));
            }
            peak
        })
    };
    let load: Vec<_> = (0..4)
        .map(|_| {
            let client = d.client();
            std::thread::spawn(move || {
                let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
                for _ in 0..50 {
                    let r = client.request("POST", "/images/echo/invoke", b"load").expect("invoke");
                    *statuses.entry(r.status).or_default() += 1;
                }
                statuses
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for thread in load {
        for (status, n) in thread.join().expect("load thread") {
            *statuses.entry(status).or_default() += n;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");
    assert!(statuses.keys().all(|s| [200, 429, 503].contains(s)), "{statuses:?}");
    assert!(statuses.get(&200).copied().unwrap_or(0) >= 50, "most requests are served: {statuses:?}");
    assert!(peak <= 2, "at most --max-vms 2 KVM VMs at any time, saw {peak} ({statuses:?})");

    // Guest memory: a pool of one 96 MiB VM and one more for a request do not fit 160 MiB,
    // and an image larger than the whole budget is refused before it is built.
    let c = d.client();
    let body = |r: &mu2_vmm::api::client::Response| String::from_utf8_lossy(&r.body).into_owned();
    let pool = serde_json::json!({ "function": "echo", "mode": "pool", "pool_size": 1, "mem_mib": 96 });
    let r = c.request("PUT", "/images/pooled", pool.to_string().as_bytes()).expect("PUT pooled");
    assert_eq!(r.status, 409, "{}", body(&r));
    assert!(body(&r).contains("--max-memory 160 MiB"), "{}", body(&r));
    let big = serde_json::json!({ "function": "echo", "mem_mib": 192 });
    let r = c.request("PUT", "/images/big", big.to_string().as_bytes()).expect("PUT big");
    assert_eq!(r.status, 409, "{}", body(&r));
    assert!(body(&r).contains("192 MiB of guest memory exceed --max-memory 160 MiB"), "{}", body(&r));
    assert_eq!(d.invoke("echo", b"fits"), (200, b"fits".to_vec()));
}
