/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/hello_http-7cf75d3dc3cd2dbd.d: src/bin/hello-http.rs Cargo.toml

/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/libhello_http-7cf75d3dc3cd2dbd.rmeta: src/bin/hello-http.rs Cargo.toml

src/bin/hello-http.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
