//! Reading the Linux `boot_params` (zero page) both entry paths hand over in RSI: the
//! command line and the e820 memory map.

use mu2_abi::layout;

const CMD_LINE_PTR: usize = 0x228;
const EXT_CMD_LINE_PTR: usize = 0x0c8;
const E820_ENTRIES: usize = 0x1e8;
const E820_TABLE: usize = 0x2d0;
const E820_ENTRY_SIZE: usize = 20;
const E820_MAX: usize = 128;
const E820_RAM: u32 = 1;
/// Size of `boot_params`.
pub const SIZE: usize = 4096;

/// The address of the command line recorded in a zero page (0 if none).
pub fn cmdline_addr(zero_page: &[u8; SIZE]) -> u64 {
    let lo = u32_at(zero_page, CMD_LINE_PTR);
    let hi = u32_at(zero_page, EXT_CMD_LINE_PTR);
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The end of the e820 RAM region that holds `[start, end)`, if one does.
pub fn ram_end_around(zero_page: &[u8; SIZE], start: u64, end: u64) -> Option<u64> {
    let count = usize::from(zero_page[E820_ENTRIES]).min(E820_MAX);
    (0..count).find_map(|i| {
        let off = E820_TABLE + i * E820_ENTRY_SIZE;
        let addr = u64_at(zero_page, off);
        let size = u64_at(zero_page, off + 8);
        let kind = u32_at(zero_page, off + 16);
        let region_end = addr.checked_add(size)?;
        (kind == E820_RAM && addr <= start && end <= region_end).then_some(region_end)
    })
}

/// The heap: from `image_end` to the end of its RAM region, kept below the MMIO window
/// (and so within the identity-mapped 4 GiB).
pub fn heap_range(zero_page: &[u8; SIZE], image_start: u64, image_end: u64) -> Option<(u64, u64)> {
    let end = ram_end_around(zero_page, image_start, image_end)?.min(layout::MMIO_BASE);
    (end > image_end).then_some((image_end, end))
}

fn u32_at(b: &[u8; SIZE], off: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8; SIZE], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zero_page(regions: &[(u64, u64, u32)]) -> [u8; SIZE] {
        let mut zp = [0u8; SIZE];
        zp[E820_ENTRIES] = regions.len() as u8;
        for (i, &(addr, size, kind)) in regions.iter().enumerate() {
            let off = E820_TABLE + i * E820_ENTRY_SIZE;
            zp[off..off + 8].copy_from_slice(&addr.to_le_bytes());
            zp[off + 8..off + 16].copy_from_slice(&size.to_le_bytes());
            zp[off + 16..off + 20].copy_from_slice(&kind.to_le_bytes());
        }
        zp[CMD_LINE_PTR..CMD_LINE_PTR + 4].copy_from_slice(&0xd000u32.to_le_bytes());
        zp
    }

    #[test]
    fn finds_the_heap_in_the_region_holding_the_image() {
        let zp = zero_page(&[(0, 0x9fc00, 1), (0x9fc00, 0x400, 2), (0x10_0000, 0x3ff0_0000, 1)]);
        assert_eq!(cmdline_addr(&zp), 0xd000);
        assert_eq!(heap_range(&zp, 0x20_0000, 0x30_0000), Some((0x30_0000, 0x4000_0000)));
        // Reserved memory does not count; neither does a region the image does not fit in.
        let zp = zero_page(&[(0, 0x9fc00, 1), (0x10_0000, 0x3ff0_0000, 2)]);
        assert_eq!(heap_range(&zp, 0x20_0000, 0x30_0000), None);
        // RAM reaching into the MMIO window is cut at its start.
        let zp = zero_page(&[(0, 0x1_0000_0000, 1)]);
        assert_eq!(heap_range(&zp, 0x20_0000, 0x30_0000), Some((0x30_0000, layout::MMIO_BASE)));
    }
}
