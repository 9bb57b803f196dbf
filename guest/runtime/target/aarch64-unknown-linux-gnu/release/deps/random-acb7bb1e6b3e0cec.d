/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/random-acb7bb1e6b3e0cec.d: src/bin/random.rs Cargo.toml

/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/librandom-acb7bb1e6b3e0cec.rmeta: src/bin/random.rs Cargo.toml

src/bin/random.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
