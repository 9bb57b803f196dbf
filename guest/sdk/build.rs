//! Hands the link arguments of a guest (a static, freestanding ELF placed by `linker.ld`) on
//! to the packages that build guests on the SDK, such as `guest/examples` and
//! `guest/test-guests`, through the `links` metadata (`DEP_MU2_GUEST_LINK_ARGS`).
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
    // Separated by the ASCII unit separator: the script's path may hold spaces.
    println!("cargo:link_args={}", args.join("\x1f"));
}
