/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/mu2_guest-777628ce6f9e79eb.d: src/lib.rs src/arch/mod.rs src/arch/aarch64/mod.rs src/arch/aarch64/fdt.rs src/arch/aarch64/mem.rs src/cmdline.rs src/console.rs src/fault.rs src/fmt.rs src/global.rs src/heap.rs src/http.rs src/mem.rs src/random.rs src/serve.rs src/sysdev.rs src/sysdev_addr.rs src/time.rs src/virtio/mod.rs src/virtio/mmio.rs src/virtio/queue.rs src/vsock.rs Cargo.toml

/work/wt-images/guest/runtime/target/aarch64-unknown-linux-gnu/release/deps/libmu2_guest-777628ce6f9e79eb.rmeta: src/lib.rs src/arch/mod.rs src/arch/aarch64/mod.rs src/arch/aarch64/fdt.rs src/arch/aarch64/mem.rs src/cmdline.rs src/console.rs src/fault.rs src/fmt.rs src/global.rs src/heap.rs src/http.rs src/mem.rs src/random.rs src/serve.rs src/sysdev.rs src/sysdev_addr.rs src/time.rs src/virtio/mod.rs src/virtio/mmio.rs src/virtio/queue.rs src/vsock.rs Cargo.toml

src/lib.rs:
src/arch/mod.rs:
src/arch/aarch64/mod.rs:
src/arch/aarch64/fdt.rs:
src/arch/aarch64/mem.rs:
src/cmdline.rs:
src/console.rs:
src/fault.rs:
src/fmt.rs:
src/global.rs:
src/heap.rs:
src/http.rs:
src/mem.rs:
src/random.rs:
src/serve.rs:
src/sysdev.rs:
src/sysdev_addr.rs:
src/time.rs:
src/virtio/mod.rs:
src/virtio/mmio.rs:
src/virtio/queue.rs:
src/vsock.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
