/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/sha256-32a47ce4d78fadc9.d: src/bin/sha256.rs Cargo.toml

/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/libsha256-32a47ce4d78fadc9.rmeta: src/bin/sha256.rs Cargo.toml

src/bin/sha256.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
