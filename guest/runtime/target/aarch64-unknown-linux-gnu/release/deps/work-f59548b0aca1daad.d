/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/work-f59548b0aca1daad.d: src/bin/work.rs Cargo.toml

/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/libwork-f59548b0aca1daad.rmeta: src/bin/work.rs Cargo.toml

src/bin/work.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
