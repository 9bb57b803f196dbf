//! Builds the guest runtime's binaries and embeds them in the VMM.
//!
//! The guests are bare-metal programs with their own target flags and profile, so they are a
//! workspace of their own (`guest/runtime`) built by a nested cargo into OUT_DIR. The result
//! is `guests.rs`: one `(name, bytes)` entry per binary, used by `mu2_vmm::guests`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("set by cargo");
    let guest_dir = manifest_dir.join("../guest/runtime");
    let abi_dir = manifest_dir.join("../guest/abi");
    for path in [
        guest_dir.join("src"),
        guest_dir.join("Cargo.toml"),
        guest_dir.join("Cargo.lock"),
        guest_dir.join("build.rs"),
        abi_dir.join("src"),
        abi_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-env-changed=MU2_GUEST_CARGO_ARGS");

    let triple = format!("{arch}-unknown-linux-gnu");
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--locked", "--bins", "--target", &triple])
        .arg("--target-dir")
        .arg(&target_dir);
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
    cmd.env("CARGO_ENCODED_RUSTFLAGS", ["-Crelocation-model=static", "-Ctarget-feature=+crt-static"].join("\x1f"));
    let status = cmd.status().expect("running cargo to build the guests");
    assert!(status.success(), "building the guest runtime failed ({status})");

    let bin_dir = target_dir.join(&triple).join("release");
    let mut names: Vec<String> = fs::read_dir(guest_dir.join("src/bin"))
        .expect("guest/runtime/src/bin exists")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "rs").then(|| p.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    names.sort();
    let mut code = String::from("/// Guest binaries built from guest/runtime, by name.\n");
    code.push_str("pub static EMBEDDED: &[(&str, &[u8])] = &[\n");
    for name in &names {
        let path: &Path = &bin_dir.join(name);
        assert!(path.exists(), "guest binary {} missing", path.display());
        code.push_str(&format!("    ({name:?}, include_bytes!({:?})),\n", path.display().to_string()));
    }
    code.push_str("];\n");
    fs::write(out_dir.join("guests.rs"), code).expect("writing guests.rs");
}
