/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/crash-74f91eaa0adc9326.d: src/bin/crash.rs Cargo.toml

/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/libcrash-74f91eaa0adc9326.rmeta: src/bin/crash.rs Cargo.toml

src/bin/crash.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
