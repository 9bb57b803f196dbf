/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/cfg_if-e066d25bd162eac1.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cfg-if-1.0.5/src/lib.rs

/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/libcfg_if-e066d25bd162eac1.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cfg-if-1.0.5/src/lib.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cfg-if-1.0.5/src/lib.rs:
