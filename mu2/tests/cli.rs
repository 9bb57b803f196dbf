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
fn guests_lists_the_examples() {
    let out = mu2(&["guests"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["echo", "sha256", "work", "crash"] {
        assert!(text.contains(name), "{text}");
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
