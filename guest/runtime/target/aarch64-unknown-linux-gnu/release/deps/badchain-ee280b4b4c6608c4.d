/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/badchain-ee280b4b4c6608c4.d: /work/wt-images/guest/test-guests/src/bin/badchain.rs Cargo.toml

/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/libbadchain-ee280b4b4c6608c4.rmeta: /work/wt-images/guest/test-guests/src/bin/badchain.rs Cargo.toml

/work/wt-images/guest/test-guests/src/bin/badchain.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
