/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/hang-dc7429172b7753cc.d: /work/wt-images/guest/test-guests/src/bin/hang.rs Cargo.toml

/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/libhang-dc7429172b7753cc.rmeta: /work/wt-images/guest/test-guests/src/bin/hang.rs Cargo.toml

/work/wt-images/guest/test-guests/src/bin/hang.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
