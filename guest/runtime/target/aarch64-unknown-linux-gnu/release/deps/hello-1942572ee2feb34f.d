/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/hello-1942572ee2feb34f.d: /work/wt-images/guest/test-guests/src/bin/hello.rs Cargo.toml

/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/libhello-1942572ee2feb34f.rmeta: /work/wt-images/guest/test-guests/src/bin/hello.rs Cargo.toml

/work/wt-images/guest/test-guests/src/bin/hello.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
