//! Links the test guests as static, freestanding guests, with the arguments the SDK's
//! build script hands on (its `links` metadata).
fn main() {
    let args = std::env::var("DEP_MU2_GUEST_LINK_ARGS").expect("mu2-guest's build script passes its link arguments");
    for arg in args.split('\x1f') {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
