//! What the VMM writes into low guest memory for an aarch64 guest: identity-mapped page
//! tables and the EL1 vector table whose stubs report faults.
//!
//! | address | what |
//! |---|---|
//! | 0x1000 | level-1 table (TTBR0_EL1): four 1 GiB entries, [0, 4 GiB) |
//! | 0x2000..0x6000 | four level-2 tables of 2 MiB blocks: RAM Normal write-back, the MMIO window Device-nGnRE, nothing else |
//! | 0x6000 | level-3 table of the first 2 MiB in 4 KiB pages, page 0 unmapped (null pointers fault) |
//! | 0x7000 | vector table (VBAR_EL1): 16 stubs of 0x80 bytes |
//! | 0xc000 | the devicetree (`layout::BOOT_PARAMS`, up to `layout::HOST_INFO`) |
//!
//! The access flag is preset and hardware dirty-bit management stays off, so the CPU never
//! writes the tables: a forked VM does not copy those pages.

use super::ArchError;
use mu2_abi::{layout, sysdev};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const L1: u64 = 0x1000;
const L2: u64 = 0x2000;
const L3_LOW: u64 = 0x6000;
pub const VECTORS: u64 = 0x7000;
/// Each vector table entry is 32 instructions.
pub const VECTOR_STRIDE: u64 = 0x80;

/// MAIR_EL1: attribute 0 Normal write-back read/write-allocate, attribute 1 Device-nGnRE.
pub const MAIR: u64 = 0x04ff;
/// TCR_EL1: T0SZ 25 (39-bit addresses, walks start at level 1), write-back inner and outer,
/// inner shareable, 4 KiB granule, TTBR1 walks disabled (EPD1), 36-bit physical addresses.
pub const TCR: u64 = 25 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (1 << 32);
/// SCTLR_EL1: the RES1 bits of ARMv8.0, MMU (M), data cache (C) and instruction cache (I) on;
/// no alignment checking.
pub const SCTLR: u64 = 0x30d0_0800 | 1 | (1 << 2) | (1 << 12);
/// CPACR_EL1: FP/SIMD accessible at EL1 and EL0 (compiled Rust uses NEON freely).
pub const CPACR: u64 = 3 << 20;
/// PSTATE at entry: EL1 with SP_EL1, interrupts (D, A, I, F) masked.
pub const PSTATE: u64 = 0x3c5;

const VALID: u64 = 1;
const TABLE: u64 = 3; // table (levels 1-2) or page (level 3)
const ATTR_NORMAL: u64 = 0 << 2;
const ATTR_DEVICE: u64 = 1 << 2;
const INNER_SHAREABLE: u64 = 3 << 8;
const AF: u64 = 1 << 10;
const PXN: u64 = 1 << 53;
const UXN: u64 = 1 << 54;
const RAM: u64 = ATTR_NORMAL | INNER_SHAREABLE | AF;
const DEVICE: u64 = ATTR_DEVICE | AF | PXN | UXN;

/// One vector table stub: `mrs x0, esr_el1; movz x1, #lo; movk x1, #hi, lsl 16;
/// str w0, [x1]; b .` — writes ESR_EL1 (exception class and syndrome) to the FAULT register.
/// The VMM reads ELR_EL1, FAR_EL1 and the stub's position from the stopped vCPU.
pub fn stub() -> [u32; 5] {
    let fault = layout::SYSDEV + sysdev::FAULT;
    assert!(fault >> 32 == 0, "the FAULT register is below 4 GiB");
    let lo = (fault & 0xffff) as u32;
    let hi = ((fault >> 16) & 0xffff) as u32;
    [
        0xd538_5200,                 // mrs x0, esr_el1
        0xd280_0000 | (lo << 5) | 1, // movz x1, #lo
        0xf2a0_0000 | (hi << 5) | 1, // movk x1, #hi, lsl #16
        0xb900_0020,                 // str w0, [x1]
        0x1400_0000,                 // b .
    ]
}

fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn quads(q: &[u64]) -> Vec<u8> {
    q.iter().flat_map(|q| q.to_le_bytes()).collect()
}

fn put(mem: &GuestMemoryMmap, what: &'static str, addr: u64, bytes: &[u8]) -> Result<(), ArchError> {
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|source| ArchError::Memory { what, source })
}

/// Writes the page tables and the vector table.
pub fn write(mem: &GuestMemoryMmap, mem_size: u64) -> Result<(), ArchError> {
    let l1: Vec<u64> = (0..512u64).map(|i| if i < 4 { (L2 + i * 0x1000) | TABLE } else { 0 }).collect();
    put(mem, "page tables", L1, &quads(&l1))?;
    let mut l2 = vec![0u64; 4 * 512];
    for (i, entry) in l2.iter_mut().enumerate() {
        let addr = (i as u64) << 21;
        if addr + (1 << 21) <= mem_size {
            *entry = addr | VALID | RAM;
        } else if (layout::MMIO_BASE..layout::MMIO_BASE + layout::MMIO_SIZE).contains(&addr) {
            *entry = addr | VALID | DEVICE;
        }
    }
    l2[0] = L3_LOW | TABLE;
    put(mem, "page tables", L2, &quads(&l2))?;
    let l3: Vec<u64> = (0..512u64).map(|i| if i == 0 { 0 } else { (i << 12) | TABLE | RAM }).collect();
    put(mem, "page tables", L3_LOW, &quads(&l3))?;
    let mut vectors = Vec::with_capacity(16 * VECTOR_STRIDE as usize);
    for _ in 0..16 {
        let mut entry = words(&stub());
        entry.resize(VECTOR_STRIDE as usize, 0);
        vectors.extend(entry);
    }
    put(mem, "vector table", VECTORS, &vectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_writes_to_the_fault_register() {
        let s = stub();
        let lo = u64::from((s[1] >> 5) & 0xffff);
        let hi = u64::from((s[2] >> 5) & 0xffff);
        assert_eq!(lo | (hi << 16), layout::SYSDEV + sysdev::FAULT);
    }
}
