//! Puts the linker script of the target's architecture on the linker's search path as
//! `mu2-guest.ld`, for every binary that depends on the SDK: cargo hands a dependency's search
//! paths on to its dependents' links, and `cargo-config.toml` names the script (`-T`).
use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let script = dir.join("src/arch").join(&arch).join("linker.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
    if let Err(e) = std::fs::copy(&script, out.join("mu2-guest.ld")) {
        panic!("no linker script for {arch} at {}: {e}", script.display());
    }
    println!("cargo:rustc-link-search=native={}", out.display());
}
