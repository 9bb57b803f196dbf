//! The `mu2` command as users run it: real /dev/kvm, real guests.

mod common;

use std::process::{Command, Output};

fn mu2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mu2")).args(args).output().expect("running mu2")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn invoke_writes_the_response_and_nothing_else_to_stdout() {
    kvm_or_skip!();
    let out = mu2(&["invoke", "--function", "echo", "--data", "hello mu2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"hello mu2");
    let err = stderr(&out);
    assert!(err.contains("boot-to-ready") && err.contains("request-to-response"), "timings on stderr: {err}");
}

#[test]
fn invoke_reads_the_request_from_a_file() {
    kvm_or_skip!();
    let dir = std::env::temp_dir().join(format!("mu2-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("request.bin");
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &body).expect("write request");
    let arg = format!("@{}", file.display());
    let out = mu2(&["invoke", "--function", "echo", "--data", &arg]);
    std::fs::remove_dir_all(&dir).ok();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout == body);
}

#[test]
fn run_streams_the_console_until_the_guest_exits() {
    kvm_or_skip!();
    let out = mu2(&["run", "--function", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(console.starts_with("mu2 guest runtime:"), "boot banner first: {console:?}");
    assert!(console.ends_with("hello from the mu2 guest\n"), "{console:?}");
    let quiet = mu2(&["run", "--function", "hello", "--cmdline", "quiet"]);
    assert_eq!(String::from_utf8_lossy(&quiet.stdout), "hello from the mu2 guest\n");
}

#[test]
fn a_guest_fault_has_its_own_exit_code() {
    kvm_or_skip!();
    let out = mu2(&["invoke", "--function", "crash", "--data", "pf"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert!(err.contains("page fault") && err.contains("RIP"), "{err}");
    assert_eq!(err.lines().count(), 1, "one clear line, no backtrace: {err}");
}

#[test]
fn a_timeout_has_its_own_exit_code() {
    kvm_or_skip!();
    let out = mu2(&["invoke", "--function", "hang", "--data", "x", "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("timed out"));
}

/// A function that returns an error is neither a crash nor a success: exit code 8, its
/// message on stderr, nothing on stdout.
#[test]
fn a_function_error_has_its_own_exit_code_and_its_message() {
    kvm_or_skip!();
    let out = mu2(&["invoke", "--function", "work", "--data", "pages=lots"]);
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "no response on stdout");
    let err = stderr(&out);
    assert!(err.contains("mu2: the function failed: cannot parse \"pages=lots\""), "{err}");
    let fine = mu2(&["invoke", "--function", "work", "--data", "pages=1"]);
    assert!(fine.status.success(), "{}", stderr(&fine));
    assert_eq!(fine.stdout, b"pages=1 spin_us=0");
}

/// A request larger than the guest can hold is refused before the guest sees it, naming the
/// limit and how to raise it; with more memory the same request goes through.
#[test]
fn a_request_the_guest_cannot_hold_is_refused_as_bad_input() {
    kvm_or_skip!();
    let dir = std::env::temp_dir().join(format!("mu2-cli-large-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("request.bin");
    let body: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &body).expect("write request");
    let image = dir.join("echo8.img");
    let image_arg = image.display().to_string();
    let made = mu2(&["snapshot", "--function", "echo", "--mem-mib", "8", "--out", &image_arg]);
    assert!(made.status.success(), "{}", stderr(&made));
    let data = format!("@{}", file.display());
    let cold = mu2(&["invoke", "--function", "echo", "--mem-mib", "8", "--data", &data]);
    let forked = mu2(&["invoke", "--image", &image_arg, "--data", &data]);
    let roomy = mu2(&["invoke", "--function", "echo", "--mem-mib", "32", "--data", &data]);
    std::fs::remove_dir_all(&dir).ok();
    for out in [&cold, &forked] {
        assert_eq!(out.status.code(), Some(2), "{}", stderr(out));
        let err = stderr(out);
        assert!(err.contains("a request of 5000000 bytes is larger than the"), "{err}");
        assert!(err.contains("with 8 MiB of memory") && err.contains("--mem-mib"), "{err}");
    }
    assert!(roomy.status.success(), "{}", stderr(&roomy));
    assert!(roomy.stdout == body);
}

#[test]
fn bad_input_has_its_own_exit_code() {
    // No KVM needed: input is checked first.
    for args in [
        &["invoke", "--function", "no-such-guest", "--data", "x"][..],
        &["invoke", "--kernel", "/nonexistent/guest.elf", "--data", "x"],
        &["invoke", "--function", "echo", "--data", "@/nonexistent/request"],
        &["invoke", "--function", "echo"],
        &["invoke", "--function", "echo", "--data", "x", "--timeout", "soon"],
    ] {
        let out = mu2(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{args:?}");
    }
}

#[test]
fn a_file_that_is_not_a_guest_image_is_bad_input() {
    kvm_or_skip!();
    let path = std::env::temp_dir().join(format!("mu2-not-elf-{}", std::process::id()));
    std::fs::write(&path, b"this is not an ELF image").expect("write");
    let out = mu2(&["invoke", "--kernel", path.to_str().expect("utf-8 path"), "--data", "x"]);
    std::fs::remove_file(&path).ok();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("ELF"), "{}", stderr(&out));
}

#[test]
fn guests_lists_the_examples_and_marks_the_test_guests() {
    let out = mu2(&["guests"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let kind_of = |name: &str| {
        let line = text.lines().find(|l| l.split_whitespace().next() == Some(name));
        line.map(|l| l[name.len()..].trim().to_string())
    };
    for name in ["echo", "sha256", "work", "crash", "random", "hello-http"] {
        assert_eq!(kind_of(name).as_deref(), Some("example function"), "{name}: {text}");
    }
    for name in ["hello", "hang", "badchain"] {
        assert_eq!(kind_of(name).as_deref(), Some("test guest"), "{name}: {text}");
    }
}

/// Runs mu2 with its standard output a socket whose reader is already gone, so that its
/// first write fails with EPIPE, as under `mu2 guests | head -0`, deterministically.
fn mu2_with_reader_gone(args: &[&str]) -> Output {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    drop(ours);
    let stdout = std::process::Stdio::from(std::os::fd::OwnedFd::from(theirs));
    let child = Command::new(env!("CARGO_BIN_EXE_mu2"))
        .args(args)
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running mu2");
    child.wait_with_output().expect("waiting for mu2")
}

#[test]
fn a_reader_that_goes_away_ends_a_command_quietly() {
    let out = mu2_with_reader_gone(&["guests"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    if common::kvm_available(module_path!()) {
        let out = mu2_with_reader_gone(&["invoke", "--function", "echo", "--data", "x"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(!stderr(&out).contains("mu2:"), "no error reported: {}", stderr(&out));
    }
}

/// A scratch directory for one test, removed at the end.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("mu2-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().expect("utf-8 path").to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_guest_that_exits_before_it_is_ready_is_a_crash_in_every_command() {
    kvm_or_skip!();
    let scratch = Scratch::new("hello");
    let image = scratch.path("hello.img");
    for args in [
        &["invoke", "--function", "hello", "--data", "x"][..],
        &["snapshot", "--function", "hello", "--out", &image],
        &["bench", "--function", "hello", "--mode", "cold", "--requests", "1"],
        &["bench", "--function", "hello", "--requests", "1"],
    ] {
        let out = mu2(args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("mu2: ") && last.ends_with("guest exited with code 0 before it was ready"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn an_unreadable_kernel_is_bad_input_in_every_command() {
    let scratch = Scratch::new("kernel");
    let image = scratch.path("never.img");
    let expected = "mu2: reading guest image /nonexistent/guest.elf: No such file or directory (os error 2)\n";
    // No KVM needed: the guest is resolved before /dev/kvm is opened.
    let snapshot = ["snapshot", "--kernel", "/nonexistent/guest.elf", "--out", &image];
    let mut commands = vec![
        &["invoke", "--kernel", "/nonexistent/guest.elf", "--data", "x"][..],
        &snapshot,
        &["bench", "--kernel", "/nonexistent/guest.elf", "--mode", "cold"],
    ];
    // These open /dev/kvm first (an image argument needs it).
    if common::kvm_available(module_path!()) {
        commands.push(&["run", "--kernel", "/nonexistent/guest.elf"]);
        commands.push(&["bench", "--kernel", "/nonexistent/guest.elf", "--mode", "fresh"]);
    }
    for args in commands {
        let out = mu2(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        // One line, each cause once.
        assert_eq!(stderr(&out), expected, "{args:?}");
    }
    assert!(!std::path::Path::new(&image).exists(), "no image is written");
}

#[test]
fn image_info_shows_what_an_image_is_in_text_and_json() {
    kvm_or_skip!();
    let scratch = Scratch::new("info");
    let image = scratch.path("echo.img");
    let out = mu2(&["snapshot", "--function", "echo", "--cpu-template", "baseline", "--out", &image]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = mu2(&["image", "info", &image, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let id = info["content_id"].as_str().expect("content id").to_string();
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
    assert!(stderr(&mu2(&["image", "info", &image])).is_empty());
    assert_eq!(info["arch"], std::env::consts::ARCH);
    assert_eq!(info["format_version"], 2);
    assert_eq!(info["mem_size"], 64 << 20);
    assert_eq!(info["vcpus"], 1);
    assert_eq!(info["cpu_template"], "baseline");
    assert_eq!(info["ready_flags"], serde_json::json!([]));
    assert_eq!(info["http"], false);
    if cfg!(target_arch = "x86_64") {
        let features: Vec<&str> =
            info["cpu_features"].as_array().expect("list").iter().flat_map(|f| f.as_str()).collect();
        assert!(features.contains(&"sse4_2") && features.contains(&"lm"), "{features:?}");
    }
    let text = String::from_utf8(mu2(&["image", "info", &image]).stdout).expect("utf-8");
    for line in [format!("content id     {id}"), "format         2".into(), "memory         64 MiB".into()] {
        assert!(text.contains(&line), "{line:?} missing from\n{text}");
    }
    assert!(text.contains("cpu template   baseline"), "{text}");
    // The id `snapshot` printed, `verify` recomputes.
    let out = mu2(&["image", "verify", &image]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id);
    // Not an image: bad input.
    let out = mu2(&["image", "info", &scratch.path("nothing")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn a_packed_image_unpacks_elsewhere_and_a_damaged_pack_is_refused_with_nothing_left() {
    kvm_or_skip!();
    let scratch = Scratch::new("pack");
    let image = scratch.path("echo.img");
    assert!(mu2(&["snapshot", "--function", "echo", "--out", &image]).status.success());
    let pack = scratch.path("echo.pack");
    let out = mu2(&["image", "pack", &image, "-o", &pack]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(id.starts_with("sha256:"), "{id}");

    let moved = scratch.path("moved.img");
    let out = mu2(&["image", "unpack", &pack, &moved]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id);
    let out = mu2(&["invoke", "--image", &moved, "--data", "moved"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"moved");
    // Into an image directory that exists: refused, and it is untouched.
    let out = mu2(&["image", "unpack", &pack, &moved]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not an empty directory"), "{}", stderr(&out));

    let good = std::fs::read(&pack).expect("pack");
    let damaged = scratch.path("damaged.pack");
    let target = scratch.path("target.img");
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x08;
    let mut long = good.clone();
    long.extend_from_slice(b"tail");
    let mut other_id = good.clone();
    other_id[40] ^= 1;
    for (what, bytes, says) in [
        ("truncated", &good[..good.len() - 9], "truncated"),
        ("corrupted", &flipped[..], "corrupt"),
        ("over-long", &long[..], "after the end"),
        ("another id", &other_id[..], "content id"),
    ] {
        std::fs::write(&damaged, bytes).expect("write");
        let out = mu2(&["image", "unpack", &damaged, &target]);
        assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{what}: {}", stderr(&out));
        assert!(!std::path::Path::new(&target).exists(), "{what}: something was left behind");
    }
}

/// A running `mu2`, killed when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn run_says_that_the_guest_waits_for_requests_and_how_to_send_one() {
    kvm_or_skip!();
    let child = Command::new(env!("CARGO_BIN_EXE_mu2"))
        .args(["run", "--function", "echo"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running mu2");
    let mut running = Running(child);
    let stderr = running.0.stderr.take().expect("piped stderr");
    let (send, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            let _ = send.send(line);
        }
    });
    let line = lines.recv_timeout(std::time::Duration::from_secs(60)).expect("a line on stderr while it waits");
    assert!(line.contains("waiting for requests") && line.contains("mu2 invoke") && line.contains("Ctrl-C"), "{line}");
}

#[test]
fn run_removes_its_vsock_socket_when_a_signal_stops_it() {
    use std::os::unix::process::ExitStatusExt;
    kvm_or_skip!();
    let scratch = Scratch::new("uds");
    let socket = scratch.path("v.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_mu2"))
        .args(["run", "--function", "echo", "--vsock-uds", &socket])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("running mu2");
    let mut running = Running(child);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::path::Path::new(&socket).exists() {
        assert!(std::time::Instant::now() < until, "the socket appears");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill").args(["-TERM", &running.0.id().to_string()]).status().expect("kill");
    assert!(kill.success());
    let status = running.0.wait().expect("wait");
    assert_eq!(status.signal(), Some(15), "ended by SIGTERM, as without the cleanup: {status:?}");
    assert!(!std::path::Path::new(&socket).exists(), "the socket is removed");
}

#[test]
fn snapshot_refuses_an_image_directory_whose_parent_is_missing() {
    let out = mu2(&["snapshot", "--function", "echo", "--out", "/nonexistent-mu2-dir/sub/echo.img"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "mu2: image directory /nonexistent-mu2-dir/sub/echo.img: its directory /nonexistent-mu2-dir/sub does not exist\n"
    );
    assert!(!std::path::Path::new("/nonexistent-mu2-dir").exists(), "nothing is created");
}

#[test]
fn bench_keeps_samples_and_floors_in_every_mode_and_plot_overlays_runs() {
    kvm_or_skip!();
    let scratch = Scratch::new("bench");
    let (cold_csv, cold_svg) = (scratch.path("cold.csv"), scratch.path("cold.svg"));
    let out = mu2(&["bench", "--mode", "cold", "--requests", "3", "--csv", &cold_csv, "--plot", &cold_svg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let fresh_csv = scratch.path("fresh.csv");
    let out = mu2(&["bench", "--mode", "fresh", "--requests", "5", "--floor-samples", "4", "--csv", &fresh_csv]);
    assert!(out.status.success(), "{}", stderr(&out));

    let csv = std::fs::read_to_string(&fresh_csv).expect("the fresh CSV");
    let mut lines = csv.lines();
    let params = lines.next().unwrap_or_default();
    assert!(params.starts_with("# mu2 bench mode=fresh function=echo requests=5 concurrency=1"), "{params}");
    assert_eq!(lines.next(), Some("series,index,latency_us,fork_us,run_us,boot_us,teardown_us"));
    let count = |series: &str| csv.lines().filter(|l| l.starts_with(&format!("{series},"))).count();
    assert_eq!(
        (count("request"), count("floor_fresh"), count("floor_pool"), count("floor_reuse")),
        (5, 4, 4, 4),
        "{csv}"
    );
    let cold = std::fs::read_to_string(&cold_csv).expect("the cold CSV, which --mode cold used to skip");
    assert_eq!(cold.lines().filter(|l| l.starts_with("request,")).count(), 3, "{cold}");
    assert!(cold.lines().any(|l| l.starts_with("floor_fresh,")), "{cold}");
    let svg = std::fs::read_to_string(&cold_svg).expect("the cold plot");
    assert!(svg.contains("floor_fresh") && svg.contains("p99"), "floors and quantiles drawn");

    let png = scratch.path("cmp.png");
    let out = mu2(&["plot", &cold_csv, &fresh_csv, "-o", &png]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&png).expect("the PNG");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000, "a PNG of {} bytes", bytes.len());
    let svg_path = scratch.path("cmp.svg");
    let out = mu2(&["plot", &cold_csv, &fresh_csv, "-o", &svg_path]);
    assert!(out.status.success(), "{}", stderr(&out));
    let svg = std::fs::read_to_string(&svg_path).expect("the SVG");
    assert!(svg.contains("cold: cold") && svg.contains("fresh: fresh, concurrency 1"), "both runs in the legend");
}

#[test]
fn bench_json_reports_each_floor_and_its_steps() {
    kvm_or_skip!();
    let out = mu2(&["bench", "--mode", "reuse", "--requests", "3", "--floor-samples", "3", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let floors = &json["floors"];
    let steps = |floor: &str| -> Vec<String> {
        let map = floors[floor]["steps_p50_us"].as_object().cloned().unwrap_or_default();
        assert!(map.values().all(|v| v.as_f64().is_some_and(|us| us > 0.0)), "{floor}: {map:?}");
        map.keys().cloned().collect()
    };
    let mut fresh = steps("fresh");
    fresh.sort();
    let mut all = ["map", "create_vm", "memory_slot", "create_vcpu", "cpuid", "registers", "first_run", "teardown"]
        .map(String::from);
    all.sort();
    assert_eq!(fresh, all, "the fresh floor times every KVM step");
    assert_eq!(steps("pool").len(), 2, "the pool floor: its run and teardown");
    assert_eq!(steps("reuse").len(), 2, "the reuse floor: its register reset and run");
    // The memory file lives where the image does: the temporary image's directory.
    assert!(floors["memory_file"].as_str().is_some_and(|d| d.contains("mu2-image-")), "{floors}");
    assert_eq!(json["floor"], "floor_reuse");
    let ratio = json["p50_us"].as_f64().unwrap_or_default() / floors["reuse"]["p50_us"].as_f64().unwrap_or(1.0);
    assert!((json["ratio_p50_to_floor"].as_f64().unwrap_or_default() - ratio).abs() < 1e-9, "{json}");
    assert_eq!(json["floor_reuse_p50_us"], floors["reuse"]["p50_us"]);
}

#[test]
fn bench_open_loop_sweeps_rates_and_reports_the_curve() {
    kvm_or_skip!();
    let scratch = Scratch::new("open-loop");
    let svg = scratch.path("sweep.svg");
    let args = ["bench", "--mode", "reuse", "--rate", "400,200", "--requests", "20", "--arrivals", "constant"];
    let out = mu2(&[&args[..], &["--floor-samples", "3", "--json", "--plot", &svg]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!((json["load"].as_str(), json["arrivals"].as_str()), (Some("open"), Some("constant")));
    let rates = json["rates"].as_array().cloned().unwrap_or_default();
    let offered: Vec<f64> = rates.iter().filter_map(|r| r["rate_rps"].as_f64()).collect();
    assert_eq!(offered, [200.0, 400.0], "rates run in increasing order");
    for rate in &rates {
        assert_eq!(rate["requests"], 20, "{rate}");
        let q = |k: &str| rate[k].as_f64().unwrap_or(f64::NAN);
        assert!(q("p50_us") > 0.0 && q("p50_us") <= q("p99_us") && q("p99_us") <= q("max_us"), "{rate}");
        assert!(q("throughput_rps") > 0.0 && q("lag_p50_us") >= 0.0, "{rate}");
    }
    let knee = &json["knee"];
    assert_eq!(knee["factor"], 2.0);
    assert_eq!(knee["low_load_p99_us"], rates[0]["p99_us"], "the low-load p99 is the lowest rate's");
    let knee_rate = knee["rate_rps"].as_f64();
    let expected = (rates[1]["p99_us"].as_f64() > rates[0]["p99_us"].as_f64().map(|p| 2.0 * p)).then_some(400.0);
    assert_eq!(knee_rate, expected, "{json}");
    assert_eq!(json["floor"], "floor_reuse");
    let plot = std::fs::read_to_string(&svg).expect("the load plot");
    assert!(plot.contains("offered load") && plot.contains("floor_reuse"), "axes and floor drawn");

    // `mu2 plot` draws the sweep back from its JSON.
    let saved = scratch.path("sweep.json");
    std::fs::write(&saved, &out.stdout).expect("saving the JSON");
    let png = scratch.path("sweep.png");
    let out = mu2(&["plot", &saved, "-o", &png]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::read(&png).is_ok_and(|b| b.starts_with(b"\x89PNG")), "a PNG");
}

#[test]
fn bench_serves_from_worker_processes_in_every_fork_mode() {
    kvm_or_skip!();
    for mode in ["fresh", "pool", "reuse"] {
        let args = ["bench", "--mode", mode, "--workers", "2", "--concurrency", "2", "--pool-size", "4"];
        let out = mu2(&[&args[..], &["--requests", "12", "--floor-samples", "2", "--json"]].concat());
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        assert_eq!((json["workers"].as_u64(), json["requests"].as_u64()), (Some(2), Some(12)), "{json}");
        assert!(json["p50_us"].as_f64().is_some_and(|p| p > 0.0), "{json}");
    }
    // One worker per core unless told otherwise; 0 keeps the engine in the process.
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as u64;
    for (extra, expected) in [(&[][..], cores), (&["--workers", "0"][..], 0)] {
        let args = ["bench", "--mode", "reuse", "--requests", "3", "--floor-samples", "2", "--json"];
        let out = mu2(&[&args[..], extra].concat());
        assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        assert_eq!(json["workers"].as_u64(), Some(expected), "{extra:?}: {json}");
    }
    // Open loop through the workers.
    let args = ["bench", "--mode", "reuse", "--workers", "2", "--rate", "300", "--requests", "12", "--json"];
    let out = mu2(&[&args[..], &["--floor-samples", "2"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!((json["workers"].as_u64(), json["rates"][0]["requests"].as_u64()), (Some(2), Some(12)), "{json}");
}

#[test]
fn bench_refuses_open_loop_settings_it_cannot_run() {
    for (args, expected) in [
        (&["--mode", "cold", "--rate", "100"][..], "--rate needs a fork mode"),
        (&["--mode", "fresh", "--rate", "0"], "--rate takes rates above 0"),
        (&["--mode", "fresh", "--rate", "100,200", "--csv", "x.csv"], "--csv keeps one run's samples"),
    ] {
        let mut all = vec!["bench", "--function", "hang", "--timeout", "20s"];
        all.extend_from_slice(args);
        let out = mu2(&all);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{all:?}: {}", stderr(&out));
    }
}

#[test]
fn bench_refuses_what_it_cannot_report_before_it_runs() {
    // The hang guest would make a run end in a timeout (exit 4): refusals come first.
    for (args, expected) in [
        (&["--plot", "/nonexistent-mu2-dir/latency.svg"][..], "its directory /nonexistent-mu2-dir does not exist"),
        (&["--plot", "latency.pdf"], "a plot is .svg or .png"),
        (&["--csv", "/nonexistent-mu2-dir/samples.csv"], "its directory /nonexistent-mu2-dir does not exist"),
        (&["--floor-samples", "0"], "--floor-samples must be at least 1"),
    ] {
        for mode in ["cold", "fresh"] {
            let mut all = vec!["bench", "--function", "hang", "--timeout", "20s", "--mode", mode];
            all.extend_from_slice(args);
            let out = mu2(&all);
            assert_eq!(out.status.code(), Some(2), "{all:?}: {}", stderr(&out));
            assert!(stderr(&out).contains(expected), "{all:?}: {}", stderr(&out));
        }
    }
}
