//! A function written outside the mu2 tree, as a user writes one: `mu2 new`, `mu2 build`, and
//! the guest it builds answering through `mu2 invoke` and a frozen image.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mu2_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mu2")).args(args).current_dir(dir).output().expect("running mu2")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A scratch directory outside the mu2 tree, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("mu2-sdk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_new_function_builds_answers_and_freezes_on_the_first_try() {
    kvm_or_skip!();
    let scratch = Scratch::new("new");
    let out = mu2_in(&scratch.0, &["new", "greeter"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let krate = scratch.0.join("greeter");
    for file in ["Cargo.toml", "Cargo.lock", "src/main.rs", "README.md"] {
        assert!(krate.join(file).is_file(), "mu2 new wrote {file}");
    }
    // The README's first command, in the crate's directory. `--locked --offline` proves the lock
    // file `mu2 new` wrote is complete: the build needs neither a new resolution nor a registry.
    let out = mu2_in(&krate, &["build", "--", "--locked", "--offline"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let elf = stdout.trim_end();
    assert_eq!(stdout.lines().count(), 1, "one ELF path: {stdout:?}");
    assert!(elf.ends_with("/release/greeter") && Path::new(elf).is_file(), "{elf:?}");

    let out = mu2_in(&krate, &["invoke", "--kernel", elf, "--data", "world"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello, world!\n");

    let out = mu2_in(&krate, &["snapshot", "--kernel", elf, "--out", "greeter.img"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = mu2_in(&krate, &["invoke", "--image", "greeter.img", "--data", "again"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello, again!\n");
}

#[test]
fn new_refuses_what_it_cannot_write_as_bad_input() {
    let scratch = Scratch::new("refuse");
    std::fs::create_dir(scratch.0.join("taken")).expect("dir");
    for (args, expected) in [
        (&["new", "taken"][..], "already exists"),
        (&["new", "9lives"], "must start with an ASCII letter"),
        (&["new", "mu2-guest"], "cannot name a function crate"),
        (&["new", "fine", "--sdk", "/nonexistent/sdk"], "no mu2 guest SDK at /nonexistent/sdk"),
    ] {
        let out = mu2_in(&scratch.0, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{args:?}: {}", stderr(&out));
    }
    assert!(!scratch.0.join("fine").exists(), "nothing written on a refusal");
}

#[test]
fn build_refuses_a_crate_that_is_not_on_the_sdk() {
    let scratch = Scratch::new("nosdk");
    let krate = scratch.0.join("plain");
    std::fs::create_dir_all(krate.join("src")).expect("dir");
    std::fs::write(
        krate.join("Cargo.toml"),
        "[package]\nname = \"plain\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n",
    )
    .expect("manifest");
    std::fs::write(krate.join("src/main.rs"), "fn main() {}\n").expect("main");
    let out = mu2_in(&scratch.0, &["build", "plain", "--", "--offline"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not depend on mu2-guest"), "{}", stderr(&out));
    let out = mu2_in(&scratch.0, &["build", "missing"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no Cargo.toml at missing"), "{}", stderr(&out));
}

#[test]
fn a_function_in_c_answers_like_the_rust_ones() {
    kvm_or_skip!();
    let scratch = Scratch::new("c");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/examples/c-reverse");
    // The example's own build: the SDK as a static library, then gcc.
    let build = format!("BUILD={}", scratch.0.display());
    let out = Command::new("make").arg("-C").arg(&example).arg(&build).output().expect("running make");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    let elf = scratch.0.join("c-reverse");
    let elf = elf.to_str().expect("utf-8 path");

    let out = mu2_in(&scratch.0, &["invoke", "--kernel", elf, "--data", "hello from C"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "C morf olleh");
    let out = mu2_in(&scratch.0, &["snapshot", "--kernel", elf, "--out", "c.img"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = mu2_in(&scratch.0, &["invoke", "--image", "c.img", "--data", "forked"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "dekrof");
}
