//! The x86_64 boot tables the VMM writes into low guest memory: GDT, TSS, IDT with ring-0
//! exception stubs, and identity-mapped page tables.
//!
//! Low memory map (all below `mu2_abi::layout::BOOT_PARAMS`):
//!
//! | address | what |
//! |---|---|
//! | 0x1000 | GDT; the 64-bit TSS with its I/O bitmap at 0x1040; IDT (32 gates) at 0x1200; 32 exception stubs at 0x1400 |
//! | 0x4000 | ring-0 stack page (TSS.RSP0 = 0x5000) |
//! | 0x5000 | PML4; 0x6000 PDPT; 0x7000..0xb000 four PDs (4 GiB); 0xb000 PT of the first 2 MiB |

use super::{ArchError, EntryMode};
use mu2_abi::{layout, sysdev};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

// Everything the CPU consults to deliver an exception shares one page: a fork whose first
// page fault makes the hypervisor read them then touches one page, not three.
pub const GDT: u64 = 0x1000;
pub const TSS: u64 = 0x1040;
/// The 64-bit TSS (104 bytes) followed by an I/O permission bitmap for ports 0..0x400 (all
/// allowed) and its terminating byte. Ports past the bitmap are denied.
pub const TSS_SIZE: u32 = 104 + IO_BITMAP_BYTES + 1;
const IO_BITMAP_BYTES: u32 = 0x400 / 8;
pub const IDT: u64 = 0x1200;
/// Vectors with a gate: the architectural exceptions. A higher vector (there are no
/// interrupts; only a stray `int n` raises one) is past the IDT limit and arrives as #GP.
pub const IDT_VECTORS: u16 = 32;
const STUBS: u64 = 0x1400;
const STUB_SIZE: u64 = 16;
const RING0_STACK_TOP: u64 = 0x5000;
pub const RING0_STACK_PAGE: u64 = RING0_STACK_TOP - 0x1000;
pub const PML4: u64 = 0x5000;
const PDPT: u64 = 0x6000;
const PD: u64 = 0x7000;
const PT_LOW: u64 = 0xb000;

/// Native GDT: null, kernel code 0x08, kernel data 0x10, user code 0x18, user data 0x20,
/// TSS 0x28 (two slots).
const KERNEL_CS: u16 = 0x08;
pub const USER_CS: u16 = 0x18 | 3;
pub const USER_DS: u16 = 0x20 | 3;
pub const TSS_SELECTOR: u16 = 0x28;
/// Linux boot protocol GDT: __BOOT_CS 0x10, __BOOT_DS 0x18.
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;

pub const CR0: u64 = 0x8005_0033; // PG AM WP NE ET MP PE
pub const CR4: u64 = 0x620; // OSXMMEXCPT OSFXSR PAE
pub const EFER: u64 = 0x500; // LMA LME

// Page-table entry bits. Accessed and dirty are preset so that the CPU never writes page
// tables: a forked VM would otherwise copy those pages on its first memory access.
const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;

const CODE64: u64 = 0x0020_9a00_0000_0000; // present, code, readable, long mode
const DATA: u64 = 0x00c0_9200_0000_ffff; // present, data, writable, 4 GiB

pub fn gdt_limit(mode: EntryMode) -> u16 {
    match mode {
        EntryMode::Native => 7 * 8 - 1,
        EntryMode::Linux => 4 * 8 - 1,
    }
}

fn gdt(mode: EntryMode) -> Vec<u64> {
    match mode {
        EntryMode::Native => {
            let tss_low = (u64::from(TSS_SIZE) - 1)
                | ((TSS & 0xff_ffff) << 16)
                | (0x89 << 40) // present, 64-bit TSS (available)
                | (((TSS >> 24) & 0xff) << 56);
            let tss_high = TSS >> 32;
            vec![0, CODE64, DATA, CODE64 | (3 << 45), DATA | (3 << 45), tss_low, tss_high]
        }
        EntryMode::Linux => vec![0, 0, CODE64, DATA],
    }
}

/// One exception stub: `mov eax, vector; mov [SYSDEV+FAULT], eax; jmp $`. It runs at CPL 0
/// with RSP at the exception frame, which is what the VMM reads after the FAULT exit.
fn stub(vector: u8) -> [u8; STUB_SIZE as usize] {
    let mut s = [0u8; STUB_SIZE as usize];
    s[0] = 0xb8; // mov eax, imm32
    s[1] = vector;
    s[5] = 0xa3; // mov moffs64, eax
    s[6..14].copy_from_slice(&(layout::SYSDEV + sysdev::FAULT).to_le_bytes());
    s[14] = 0xeb; // jmp $
    s[15] = 0xfe;
    s
}

fn idt_gate(handler: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(KERNEL_CS) << 16)
        | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

fn put<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    value: T,
) -> Result<(), ArchError> {
    mem.write_obj(value, GuestAddress(addr)).map_err(|source| ArchError::Memory { what, source })
}

fn put_slice(mem: &GuestMemoryMmap, what: &'static str, addr: u64, bytes: &[u8]) -> Result<(), ArchError> {
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|source| ArchError::Memory { what, source })
}

fn as_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The page at [`GDT`] as the VMM writes it: GDT and, for native entry, TSS, IDT and stubs.
pub fn exception_page(mode: EntryMode) -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    let at = |addr: u64| (addr - GDT) as usize;
    let gdt = as_bytes(&gdt(mode));
    page[..gdt.len()].copy_from_slice(&gdt);
    if mode == EntryMode::Native {
        let tss = &mut page[at(TSS)..at(TSS) + TSS_SIZE as usize];
        tss[4..12].copy_from_slice(&RING0_STACK_TOP.to_le_bytes());
        // The I/O bitmap follows the TSS proper: zero bits allow, the last byte must be 0xff.
        tss[102..104].copy_from_slice(&104u16.to_le_bytes());
        tss[TSS_SIZE as usize - 1] = 0xff;
        for vector in 0..IDT_VECTORS as u8 {
            let handler = STUBS + u64::from(vector) * STUB_SIZE;
            let gate = as_bytes(&idt_gate(handler));
            let gate_at = at(IDT) + usize::from(vector) * 16;
            page[gate_at..gate_at + 16].copy_from_slice(&gate);
            let stub_at = at(handler);
            page[stub_at..stub_at + STUB_SIZE as usize].copy_from_slice(&stub(vector));
        }
    }
    page
}

pub fn write(mem: &GuestMemoryMmap, mem_size: u64, mode: EntryMode) -> Result<(), ArchError> {
    put_slice(mem, "exception structures", GDT, &exception_page(mode))?;

    // Identity map of [0, 4 GiB) for CPL 3: RAM below mem_size, the MMIO window uncached,
    // nothing else. Page 0 stays unmapped so that null pointers fault.
    put(mem, "page tables", PML4, PDPT | P | RW | US | A)?;
    let pdpt: Vec<u64> = (0..4).map(|i| (PD + i * 0x1000) | P | RW | US | A).collect();
    put_slice(mem, "page tables", PDPT, &as_bytes(&pdpt))?;
    let mut pds = vec![0u64; 4 * 512];
    for (i, entry) in pds.iter_mut().enumerate() {
        let addr = (i as u64) << 21;
        if addr + (1 << 21) <= mem_size {
            *entry = addr | P | RW | US | A | D | PS;
        } else if (layout::MMIO_BASE..layout::MMIO_BASE + layout::MMIO_SIZE).contains(&addr) {
            *entry = addr | P | RW | US | PWT | PCD | A | D | PS;
        }
    }
    pds[0] = PT_LOW | P | RW | US | A;
    put_slice(mem, "page tables", PD, &as_bytes(&pds))?;
    let pt: Vec<u64> = (0..512u64).map(|i| if i == 0 { 0 } else { (i << 12) | P | RW | US | A | D }).collect();
    put_slice(mem, "page tables", PT_LOW, &as_bytes(&pt))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exception_structures_share_one_page() {
        let end = STUBS + u64::from(IDT_VECTORS) * STUB_SIZE;
        assert!(GDT + 7 * 8 <= TSS && TSS + u64::from(TSS_SIZE) <= IDT);
        assert!(IDT + u64::from(IDT_VECTORS) * 16 <= STUBS && end <= GDT + 0x1000);
    }

    #[test]
    fn stub_reports_its_vector_to_the_fault_register() {
        let s = stub(14);
        assert_eq!(s[0..2], [0xb8, 14]);
        assert_eq!(u64::from_le_bytes(s[6..14].try_into().unwrap()), layout::SYSDEV + sysdev::FAULT);
    }

    #[test]
    fn gate_splits_the_handler_address() {
        let [low, high] = idt_gate(0x1234_5678_9abc_def0);
        assert_eq!(low & 0xffff, 0xdef0);
        assert_eq!((low >> 48) & 0xffff, 0x9abc);
        assert_eq!(high, 0x1234_5678);
        assert_eq!((low >> 16) & 0xffff, u64::from(KERNEL_CS));
    }

    #[test]
    fn user_segments_have_dpl_3() {
        let g = gdt(EntryMode::Native);
        assert_eq!((g[(USER_CS >> 3) as usize] >> 45) & 3, 3);
        assert_eq!((g[(USER_DS >> 3) as usize] >> 45) & 3, 3);
        assert_eq!((g[(KERNEL_CS >> 3) as usize] >> 45) & 3, 0);
    }
}
