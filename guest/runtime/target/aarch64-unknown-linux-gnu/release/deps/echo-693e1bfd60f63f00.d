/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/echo-693e1bfd60f63f00.d: src/bin/echo.rs Cargo.toml

/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/libecho-693e1bfd60f63f00.rmeta: src/bin/echo.rs Cargo.toml

src/bin/echo.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
