//! Builds the guest binaries and embeds them in the VMM.
//!
//! The guests are bare-metal programs with their own target flags and profile, so they are a
//! workspace of their own (`guest/`: the SDK, the examples, the test guests) built by nested
//! cargo invocations into OUT_DIR: one for the example functions (`guest/examples/src/bin`),
//! one for the VMM's test guests (`guest/test-guests/src/bin`). Separate invocations keep the test guests' feature
//! (`test-hooks`) out of the examples: cargo unifies features within one build. The result is
//! `guests.rs`: one `(name, bytes)` entry per binary of either package, used by
//! `mu2_vmm::guests`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest packages, by cargo name and directory below `guest/`, each built by its own
/// cargo invocation.
const PACKAGES: [(&str, &str); 2] = [("mu2-examples", EXAMPLES), ("mu2-test-guests", "test-guests")];

/// The package whose binaries are offered to users as examples; the others' are test guests.
const EXAMPLES: &str = "examples";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("set by cargo");
    let guests_dir = manifest_dir.join("../guest");
    let workspace_dir = guests_dir.clone();
    let abi_dir = guests_dir.join("abi");
    for dir in PACKAGES.iter().map(|(_, dir)| *dir).chain(["sdk"]) {
        for file in ["src", "Cargo.toml", "build.rs", "cargo-config.toml"] {
            println!("cargo:rerun-if-changed={}", guests_dir.join(dir).join(file).display());
        }
    }
    for path in [
        workspace_dir.join("Cargo.toml"),
        workspace_dir.join("Cargo.lock"),
        abi_dir.join("src"),
        abi_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-env-changed=MU2_GUEST_CARGO_ARGS");

    let triple = format!("{arch}-unknown-linux-gnu");
    let target_dir = out_dir.join("guest-target");
    for (package, _) in PACKAGES {
        build_guests(&workspace_dir, package, &triple, &arch, &target_dir);
    }

    let bin_dir = target_dir.join(&triple).join("release");
    let examples = binaries(&guests_dir.join(EXAMPLES));
    let mut names: Vec<String> = PACKAGES.iter().flat_map(|(_, dir)| binaries(&guests_dir.join(dir))).collect();
    names.sort();
    if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
        panic!("two guest packages have a binary called {:?}", twice[0]);
    }
    let mut code = String::from("/// Guest binaries built from guest/examples and guest/test-guests, by name.\n");
    code.push_str("pub static EMBEDDED: &[(&str, &[u8])] = &[\n");
    for name in &names {
        let path: &Path = &bin_dir.join(name);
        assert!(path.exists(), "guest binary {} missing", path.display());
        code.push_str(&format!("    ({name:?}, include_bytes!({:?})),\n", path.display().to_string()));
    }
    code.push_str("];\n");
    code.push_str("/// The example functions offered to users (guest/examples), by name.\n");
    code.push_str(&format!("pub const EXAMPLES: &[&str] = &{examples:?};\n"));
    fs::write(out_dir.join("guests.rs"), code).expect("writing guests.rs");
}

/// The names of a guest package's binaries (`src/bin/*.rs`), sorted.
fn binaries(package_dir: &Path) -> Vec<String> {
    let src = package_dir.join("src/bin");
    let entries = fs::read_dir(&src).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "rs").then(|| p.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    names.sort();
    names
}

/// Builds the binaries of one package of the guest workspace at `workspace_dir`.
fn build_guests(workspace_dir: &Path, package: &str, triple: &str, arch: &str, target_dir: &Path) {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_dir)
        .args(["build", "--release", "--locked", "--bins", "--package", package, "--target", triple])
        .arg("--target-dir")
        .arg(target_dir)
        // The SDK's flags and profile for guests, as `mu2 build` passes them.
        .arg("--config")
        .arg(workspace_dir.join("sdk/cargo-config.toml"));
    if let Ok(extra) = env::var("MU2_GUEST_CARGO_ARGS") {
        cmd.args(extra.split_whitespace());
    }
    // The outer build's flags and wrappers (clippy, coverage, cross settings) are for the
    // VMM, not for a bare-metal guest.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let linker_var = format!("CARGO_TARGET_{}_LINKER", triple.to_uppercase().replace('-', "_"));
    if arch != env::consts::ARCH && env::var_os(&linker_var).is_none() {
        cmd.env(&linker_var, format!("{arch}-linux-gnu-gcc"));
    }
    let status = cmd.status().expect("running cargo to build the guests");
    assert!(status.success(), "building the guest package {package} failed ({status})");
}
