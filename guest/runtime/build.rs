//! Links every guest binary as a static, freestanding ELF placed by `linker.ld`: this
//! package's binaries, and (through the `links` metadata, as `DEP_MU2_GUEST_LINK_ARGS`) those
//! of packages that build guests on the runtime, such as `guest/test-guests`.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let script = format!("{dir}/src/arch/{arch}/linker.ld");
    println!("cargo:rerun-if-changed={script}");
    let args = [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
        &format!("-Wl,-T{script}"),
    ];
    for arg in args {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    // Separated by the ASCII unit separator: the script's path may hold spaces.
    println!("cargo:link_args={}", args.join("\x1f"));
}
