//! The devicetree the guest finds at X0: memory, CPUs (PSCI), the serial console, the mu2
//! system device, the virtio-mmio device and `/chosen/bootargs`.

use super::ArchError;
use mu2_abi::layout;
use vm_fdt::FdtWriter;

/// The 8250's input clock, as QEMU and Firecracker describe it.
const UART_CLOCK: u32 = 1_843_200;

/// Builds the blob for a VM of `mem_size` bytes with `vcpus` vCPUs and this command line.
pub fn build(mem_size: u64, vcpus: u8, cmdline: &str) -> Result<Vec<u8>, ArchError> {
    build_inner(mem_size, vcpus, cmdline).map_err(ArchError::Devicetree)
}

fn build_inner(mem_size: u64, vcpus: u8, cmdline: &str) -> Result<Vec<u8>, vm_fdt::Error> {
    let serial = format!("/uart@{:x}", layout::SERIAL_MMIO);
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "mu2,virt")?;
    fdt.property_string("model", "mu2 micro-VM")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;

    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", cmdline)?;
    fdt.property_string("stdout-path", &serial)?;
    fdt.end_node(chosen)?;

    let memory = fdt.begin_node("memory@0")?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[0, mem_size])?;
    fdt.end_node(memory)?;

    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 1)?;
    fdt.property_u32("#size-cells", 0)?;
    for i in 0..u32::from(vcpus) {
        let cpu = fdt.begin_node(&format!("cpu@{i}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u32("reg", i)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list("compatible", vec!["arm,psci-0.2".into(), "arm,psci".into()])?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    let uart = fdt.begin_node(&serial[1..])?;
    fdt.property_string("compatible", "ns16550a")?;
    fdt.property_array_u64("reg", &[layout::SERIAL_MMIO, 8])?;
    fdt.property_u32("clock-frequency", UART_CLOCK)?;
    fdt.end_node(uart)?;

    let sysdev = fdt.begin_node(&format!("mu2-sysdev@{:x}", layout::SYSDEV))?;
    fdt.property_string("compatible", "mu2,sysdev")?;
    fdt.property_array_u64("reg", &[layout::SYSDEV, layout::MMIO_DEVICE_SIZE])?;
    fdt.end_node(sysdev)?;

    // mu2 guests poll: no interrupt controller, so no `interrupts` property.
    let virtio = fdt.begin_node(&format!("virtio_mmio@{:x}", layout::VIRTIO_MMIO_BASE))?;
    fdt.property_string("compatible", "virtio,mmio")?;
    fdt.property_array_u64("reg", &[layout::VIRTIO_MMIO_BASE, layout::MMIO_DEVICE_SIZE])?;
    fdt.property_null("dma-coherent")?;
    fdt.end_node(virtio)?;

    fdt.end_node(root)?;
    fdt.finish()
}

#[cfg(test)]
mod tests {
    #[test]
    fn blob_holds_the_command_line() {
        let blob = super::build(64 << 20, 1, "mu2.sysdev=0xd0000000 quiet").unwrap();
        assert_eq!(&blob[..4], &0xd00d_feedu32.to_be_bytes());
        assert!(blob.windows(5).any(|w| w == b"quiet"));
    }
}
