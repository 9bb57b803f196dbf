/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/mu2_abi-e42c41202be194df.d: /work/wt-images/guest/abi/src/lib.rs

/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/libmu2_abi-e42c41202be194df.rmeta: /work/wt-images/guest/abi/src/lib.rs

/work/wt-images/guest/abi/src/lib.rs:
