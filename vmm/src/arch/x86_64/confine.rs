//! Which guest pages decide what runs at CPL 0 and how the guest translates addresses.
//!
//! Reuse mode may reset a VM by copying back only the pages a request wrote, keeping the
//! hypervisor's mappings of everything else (each mapping costs a page fault on the next
//! request otherwise). That is sound only if the request could not have changed how memory is
//! translated or run code at CPL 0 that could: a guest at CPL 3 can reach CPL 0 only through
//! the exception structures, SYSCALL or SYSENTER, and can change translations only by writing
//! page tables. So the fast reset needs an image that uses the VMM's own exception structures
//! (whose stubs stop the VM and never return), has SYSCALL and SYSENTER off, and a request
//! that wrote none of the pages listed here.

use std::collections::BTreeSet;

use super::state::VcpuState;
use super::{tables, EntryMode};

const PAGE: u64 = 4096;
const PRESENT: u64 = 1;
const LARGE: u64 = 1 << 7;
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;
const EFER_SCE: u64 = 1;
const IA32_SYSENTER_CS: u32 = 0x174;

/// The pages whose modification forbids the fast reset, if the image is confined to CPL 3
/// (see the module documentation); `None` if it is not, or a table cannot be read.
/// `read_page` reads a 4 KiB page of the image's memory.
pub fn structural_pages(state: &VcpuState, read_page: &mut dyn FnMut(u64) -> Option<Vec<u8>>) -> Option<Vec<u64>> {
    let sregs = &state.sregs;
    if sregs.efer & EFER_SCE != 0 || state.msrs.iter().any(|&(i, v)| i == IA32_SYSENTER_CS && v != 0) {
        return None;
    }
    if sregs.cs.dpl != 3
        || sregs.gdt.base != tables::GDT
        || sregs.idt.base != tables::IDT
        || sregs.tr.base != tables::TSS
        || sregs.idt.limit != tables::IDT_VECTORS * 16 - 1
    {
        return None;
    }
    // The exception structures must be exactly what the VMM writes.
    let page = read_page(tables::GDT & !(PAGE - 1))?;
    if page != tables::exception_page(EntryMode::Native) {
        return None;
    }
    let mut pages = BTreeSet::from([tables::GDT & !(PAGE - 1), tables::RING0_STACK_PAGE]);
    // Every paging structure reachable from CR3.
    let pml4 = sregs.cr3 & ADDRESS;
    let mut tables_to_walk = vec![(pml4, 4u8)];
    while let Some((table, level)) = tables_to_walk.pop() {
        if !pages.insert(table) && level != 4 {
            continue;
        }
        let bytes = read_page(table)?;
        for entry in bytes.chunks_exact(8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(entry);
            let entry = u64::from_le_bytes(word);
            if entry & PRESENT == 0 || level == 1 || (level <= 3 && entry & LARGE != 0) {
                continue;
            }
            tables_to_walk.push((entry & ADDRESS, level - 1));
        }
        // A guest-controlled table can hold any number of entries; a real hierarchy over
        // 4 GiB has a few dozen pages at most.
        if pages.len() > 4096 {
            return None;
        }
    }
    Some(pages.into_iter().collect())
}
