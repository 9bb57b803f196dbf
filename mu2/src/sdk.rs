//! The function SDK seen from outside the tree: where this checkout's SDK is, the crate that
//! `mu2 new` writes, and how `mu2 build` turns a function's crate into a guest ELF.
//!
//! The SDK is not published, so a function's crate depends on it by path. Its build
//! configuration (`cargo-config.toml`: target flags and profile) is found through the crate's
//! own dependency graph, so a crate built against another checkout's SDK gets that SDK's flags.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mu2_vmm::error::{Classify, FailureKind};

/// The SDK's package name.
const SDK_PACKAGE: &str = "mu2-guest";

/// The SDK of the checkout this binary was built from.
const BUILT_IN_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../guest/sdk");

/// The target triple guests build for: the host's architecture (guests run on it under KVM).
pub fn guest_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    #[error("no mu2 guest SDK at {} (pass --sdk PATH to the SDK's directory, guest/sdk in a mu2 checkout)", path.display())]
    NoSdk { path: PathBuf },
    #[error("{} already exists", path.display())]
    Exists { path: PathBuf },
    #[error("`{name}` cannot name a function crate: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no Cargo.toml at {}", path.display())]
    NoManifest { path: PathBuf },
    #[error("running {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`cargo {step}` failed ({status})")]
    Cargo { step: &'static str, status: std::process::ExitStatus },
    #[error("reading cargo's output")]
    CargoOutput(#[source] std::io::Error),
    #[error("cargo's output is not what it documents: {0}")]
    CargoJson(#[source] serde_json::Error),
    #[error("{} does not depend on {SDK_PACKAGE}, the mu2 guest SDK", manifest.display())]
    NoSdkDependency { manifest: PathBuf },
    #[error("{} built no binary", manifest.display())]
    NoBinary { manifest: PathBuf },
}

impl Classify for SdkError {
    fn kind(&self) -> FailureKind {
        match self {
            SdkError::NoSdk { .. }
            | SdkError::Exists { .. }
            | SdkError::BadName { .. }
            | SdkError::Write { .. }
            | SdkError::NoManifest { .. }
            | SdkError::Cargo { .. }
            | SdkError::NoSdkDependency { .. }
            | SdkError::NoBinary { .. } => FailureKind::BadInput,
            SdkError::Spawn { .. } | SdkError::CargoOutput(_) | SdkError::CargoJson(_) => FailureKind::Internal,
        }
    }
}

/// The SDK directory: `explicit`, or this checkout's. Checked to hold the SDK's manifest.
pub fn find_sdk(explicit: Option<&Path>) -> Result<PathBuf, SdkError> {
    let dir = explicit.map_or_else(|| PathBuf::from(BUILT_IN_SDK), Path::to_path_buf);
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
    let is_sdk = manifest.lines().any(|l| l.trim() == format!("name = \"{SDK_PACKAGE}\""));
    match dir.canonicalize() {
        Ok(dir) if is_sdk => Ok(dir),
        _ => Err(SdkError::NoSdk { path: dir }),
    }
}

/// Writes a function crate at `dir` (which must not exist) on the SDK at `sdk`: Cargo.toml,
/// src/main.rs, README.md, .gitignore and, from the SDK's own lock file, a Cargo.lock that
/// pins the versions the SDK is tested with, so the first build needs no registry index.
/// Returns the crate's name.
pub fn new_crate(dir: &Path, sdk: &Path) -> Result<String, SdkError> {
    let name = crate_name(dir)?;
    if dir.symlink_metadata().is_ok() {
        return Err(SdkError::Exists { path: dir.to_path_buf() });
    }
    let triple = guest_triple();
    let sdk_path = sdk.display().to_string();
    let mut files = vec![
        ("Cargo.toml", fill(MANIFEST, &name, &sdk_path, &triple)),
        ("src/main.rs", MAIN.to_string()),
        ("README.md", fill(README, &name, &sdk_path, &triple)),
        (".gitignore", "/target\n*.img\n".to_string()),
    ];
    if let Some(lock) = lock_for(&name, sdk) {
        files.push(("Cargo.lock", lock));
    }
    for (file, text) in files {
        let path = dir.join(file);
        let parent = path.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent)
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|source| SdkError::Write { path, source })?;
    }
    Ok(name)
}

/// The crate name a directory gives: its last component, as cargo accepts package names.
fn crate_name(dir: &Path) -> Result<String, SdkError> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let bad = |reason| Err(SdkError::BadName { name: name.clone(), reason });
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return bad("it must start with an ASCII letter");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return bad("use only ASCII letters, digits, `-` and `_`");
    }
    let normalized = name.replace('-', "_");
    if ["mu2_guest", "mu2_abi", "core", "alloc", "std", "test", "proc_macro"].contains(&normalized.as_str()) {
        return bad("it is the name of a crate the function builds with");
    }
    Ok(name)
}

fn fill(template: &str, name: &str, sdk: &str, triple: &str) -> String {
    template.replace("{name}", name).replace("{sdk}", sdk).replace("{triple}", triple)
}

const MANIFEST: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"

[dependencies]
# The mu2 guest SDK, by path: it is not published.
mu2-guest = { path = "{sdk}" }

# A guest is a freestanding program: no unwinding (`mu2 build` makes sure of that), and small,
# since every page a request touches costs time in its fresh VM.
[profile.release]
panic = "abort"
opt-level = "s"
codegen-units = 1
lto = true

[profile.dev]
panic = "abort"

# A crate of its own, even inside another workspace's directory.
[workspace]
"#;

const MAIN: &str = r#"//! A mu2 function: the request's bytes in, the response's bytes out. Every request runs in a
//! brand-new micro-VM, so nothing is left over from the one before.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

mu2_guest::function!(greet);

/// Answers `hello, <request>!`.
fn greet(request: &[u8]) -> Vec<u8> {
    let name = String::from_utf8_lossy(request);
    alloc::format!("hello, {name}!\n").into_bytes()
}
"#;

const README: &str = r#"# {name}

A [mu2](https://example.invalid/mu2) function: `src/main.rs` turns the bytes of a request
into the bytes of its response, and every request runs in a brand-new micro-VM. It is built
on the mu2 guest SDK at `{sdk}` (see its README.md for what a function can use).

```sh
mu2 build                                        # builds the guest; prints the ELF's path
mu2 invoke --kernel target/{triple}/release/{name} --data 'world'
mu2 snapshot --kernel target/{triple}/release/{name} --out {name}.img
mu2 invoke --image {name}.img --data 'world'     # one request in a VM forked from the image
```

`mu2 build` runs `cargo build --release` for `{triple}` with the SDK's flags and
profile (a guest is a static, freestanding ELF); arguments after `--` go to cargo. A plain
`cargo build` does not link a guest. `mu2 snapshot` boots the function once and freezes it when
it is ready to serve; `mu2 serve --route /{name}={name}` with the image registered through the
control API serves it over HTTP (see mu2's docs/api.md).
"#;

/// The SDK workspace's lock file narrowed to what a crate depending only on the SDK uses, with
/// that crate added, in cargo's order; `None` if the SDK has no lock file beside it or it is
/// not in the expected form (cargo then resolves the versions itself).
fn lock_for(name: &str, sdk: &Path) -> Option<String> {
    let text =
        [sdk.join("../Cargo.lock"), sdk.join("Cargo.lock")].iter().find_map(|p| std::fs::read_to_string(p).ok())?;
    narrow_lock(&text, name)
}

/// One `[[package]]` entry of a lock file.
struct Locked<'a> {
    name: &'a str,
    version: &'a str,
    /// Each a package name, optionally followed by its version (and source).
    dependencies: Vec<&'a str>,
    text: &'a str,
}

fn narrow_lock(text: &str, name: &str) -> Option<String> {
    let mut chunks = text.split("\n\n");
    let header = chunks.next()?;
    if !header.contains("version = ") {
        return None;
    }
    let mut packages = Vec::new();
    for chunk in chunks.map(str::trim_end).filter(|c| !c.is_empty()) {
        let value =
            |key: &str| chunk.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(" = \"")?.strip_suffix('"'));
        if !chunk.starts_with("[[package]]") {
            return None;
        }
        let dependencies = chunk
            .lines()
            .skip_while(|l| !l.starts_with("dependencies = ["))
            .skip(1)
            .take_while(|l| *l != "]")
            .map(|l| l.trim().trim_end_matches(',').trim_matches('"'))
            .collect();
        packages.push(Locked { name: value("name")?, version: value("version")?, dependencies, text: chunk });
    }
    // Everything the SDK needs, found from its entry.
    let mut keep = vec![packages.iter().position(|p| p.name == SDK_PACKAGE)?];
    let mut next = 0;
    while let Some(&index) = keep.get(next) {
        next += 1;
        for dep in &packages[index].dependencies {
            let mut words = dep.split(' ');
            let (dep_name, dep_version) = (words.next()?, words.next());
            let found =
                packages.iter().position(|p| p.name == dep_name && dep_version.is_none_or(|v| v == p.version))?;
            if !keep.contains(&found) {
                keep.push(found);
            }
        }
    }
    let own = format!("[[package]]\nname = \"{name}\"\nversion = \"0.1.0\"\ndependencies = [\n \"{SDK_PACKAGE}\",\n]");
    let mut entries: Vec<(&str, &str, &str)> =
        keep.iter().map(|&i| (packages[i].name, packages[i].version, packages[i].text)).collect();
    entries.push((name, "0.1.0", &own));
    entries.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut lock = String::from(header);
    for (_, _, entry) in entries {
        lock.push_str("\n\n");
        lock.push_str(entry);
    }
    lock.push('\n');
    Some(lock)
}

/// Builds the function crate whose directory (or Cargo.toml) is `path` as a guest, with the
/// configuration of the SDK it depends on; `cargo_args` go to both cargo invocations (e.g.
/// `--offline`, `--locked`, `--bin NAME`). Returns the guest ELFs built.
pub fn build(path: &Path, cargo_args: &[String]) -> Result<Vec<PathBuf>, SdkError> {
    let manifest = if path.is_dir() { path.join("Cargo.toml") } else { path.to_path_buf() };
    if !manifest.is_file() {
        return Err(SdkError::NoManifest { path: path.to_path_buf() });
    }
    let config = sdk_of(&manifest, cargo_args)?.join("cargo-config.toml");
    let mut cargo = cargo();
    cargo
        .args(["build", "--release", "--message-format=json-render-diagnostics", "--target", &guest_triple()])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--config")
        .arg(&config)
        .args(cargo_args)
        .stdout(Stdio::piped());
    // Each of these would replace the SDK's flags.
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS"] {
        cargo.env_remove(var);
    }
    let mut child = cargo.spawn().map_err(|source| SdkError::Spawn { program: "cargo".into(), source })?;
    let mut elfs = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.map_err(SdkError::CargoOutput)?;
            let message: serde_json::Value = serde_json::from_str(&line).map_err(SdkError::CargoJson)?;
            let is_bin = message["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bin"));
            if let (Some("compiler-artifact"), Some(elf), true) =
                (message["reason"].as_str(), message["executable"].as_str(), is_bin)
            {
                elfs.push(PathBuf::from(elf));
            }
        }
    }
    let status = child.wait().map_err(|source| SdkError::Spawn { program: "cargo".into(), source })?;
    if !status.success() {
        return Err(SdkError::Cargo { step: "build", status });
    }
    if elfs.is_empty() {
        return Err(SdkError::NoBinary { manifest });
    }
    Ok(elfs)
}

/// The directory of the SDK package in the crate's dependency graph.
fn sdk_of(manifest: &Path, cargo_args: &[String]) -> Result<PathBuf, SdkError> {
    // Only the arguments that say how to resolve apply to `cargo metadata`.
    let resolve_args = cargo_args.iter().filter(|a| ["--offline", "--locked", "--frozen"].contains(&a.as_str()));
    let output = cargo()
        .args(["metadata", "--format-version", "1", "--filter-platform", &guest_triple()])
        .arg("--manifest-path")
        .arg(manifest)
        .args(resolve_args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| SdkError::Spawn { program: "cargo".into(), source })?;
    if !output.status.success() {
        return Err(SdkError::Cargo { step: "metadata", status: output.status });
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(SdkError::CargoJson)?;
    let packages = metadata["packages"].as_array().into_iter().flatten();
    let sdk = packages.filter(|p| p["name"] == SDK_PACKAGE).find_map(|p| p["manifest_path"].as_str());
    match sdk.map(Path::new).and_then(Path::parent) {
        Some(dir) => Ok(dir.to_path_buf()),
        None => Err(SdkError::NoSdkDependency { manifest: manifest.to_path_buf() }),
    }
}

/// The cargo that runs this (`CARGO`, set under cargo) or the one on PATH.
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: &str = "# This file is automatically @generated by Cargo.\n# It is not intended for manual editing.\nversion = 4\n\n\
[[package]]\nname = \"httparse\"\nversion = \"1.10.1\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\nchecksum = \"abc\"\n\n\
[[package]]\nname = \"mu2-abi\"\nversion = \"0.1.0\"\n\n\
[[package]]\nname = \"mu2-examples\"\nversion = \"0.1.0\"\ndependencies = [\n \"mu2-guest\",\n \"sha2\",\n]\n\n\
[[package]]\nname = \"mu2-guest\"\nversion = \"0.1.0\"\ndependencies = [\n \"httparse 1.10.1\",\n \"mu2-abi\",\n]\n\n\
[[package]]\nname = \"sha2\"\nversion = \"0.10.9\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\nchecksum = \"def\"\n";

    #[test]
    fn the_lock_keeps_what_the_sdk_needs_and_adds_the_crate_in_order() {
        let lock = narrow_lock(LOCK, "greeter").expect("a lock");
        let names: Vec<&str> = lock.lines().filter_map(|l| l.strip_prefix("name = ")).collect();
        assert_eq!(names, ["\"greeter\"", "\"httparse\"", "\"mu2-abi\"", "\"mu2-guest\""]);
        assert!(lock.starts_with("# This file is automatically @generated by Cargo."));
        assert!(lock.contains("name = \"greeter\"\nversion = \"0.1.0\"\ndependencies = [\n \"mu2-guest\",\n]\n\n"));
        assert!(lock.ends_with("checksum = \"abc\"\n\n[[package]]\nname = \"mu2-abi\"\nversion = \"0.1.0\"\n\n[[package]]\nname = \"mu2-guest\"\nversion = \"0.1.0\"\ndependencies = [\n \"httparse 1.10.1\",\n \"mu2-abi\",\n]\n"), "{lock}");
    }

    #[test]
    fn a_lock_without_the_sdk_gives_none() {
        assert!(narrow_lock("version = 4\n\n[[package]]\nname = \"x\"\nversion = \"1.0.0\"\n", "y").is_none());
        assert!(narrow_lock("garbage", "y").is_none());
    }

    #[test]
    fn crate_names_are_checked() {
        assert_eq!(crate_name(Path::new("/tmp/my-fn")).ok().as_deref(), Some("my-fn"));
        for bad in ["/tmp/1fn", "/tmp/my fn", "/tmp/mu2-guest", "/tmp/core", "/"] {
            assert!(crate_name(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
