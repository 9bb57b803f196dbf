/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/crypto_common-3b159fc2ad4ad46c.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/crypto-common-0.1.7/src/lib.rs

/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/libcrypto_common-3b159fc2ad4ad46c.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/crypto-common-0.1.7/src/lib.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/crypto-common-0.1.7/src/lib.rs:
