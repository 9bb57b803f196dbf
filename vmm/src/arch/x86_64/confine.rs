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
    pages.extend(paging_structures(sregs.cr3 & ADDRESS, read_page)?);
    if pages.len() > MAX_STRUCTURAL_PAGES {
        return None;
    }
    Some(pages.into_iter().collect())
}

/// A guest-controlled table can hold any number of entries; a real hierarchy over 4 GiB has a
/// few dozen pages at most.
const MAX_STRUCTURAL_PAGES: usize = 4096;

/// The pages of the 4-level paging hierarchy rooted at `pml4`; `None` if a table cannot be
/// read or the hierarchy is implausibly large.
fn paging_structures(pml4: u64, read_page: &mut dyn FnMut(u64) -> Option<Vec<u8>>) -> Option<BTreeSet<u64>> {
    let mut pages = BTreeSet::new();
    let mut tables_to_walk = vec![(pml4, 4u8)];
    // A page can serve as a table at several levels at once (the guest controls the entries),
    // and each level reads it differently: walk it once per level it is reached at.
    let mut walked = BTreeSet::new();
    while let Some((table, level)) = tables_to_walk.pop() {
        pages.insert(table);
        if !walked.insert((table, level)) {
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
        if pages.len() > MAX_STRUCTURAL_PAGES {
            return None;
        }
    }
    Some(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(usize, u64)]) -> Vec<u8> {
        let mut page = vec![0u8; PAGE as usize];
        for &(index, value) in entries {
            page[index * 8..index * 8 + 8].copy_from_slice(&value.to_le_bytes());
        }
        page
    }

    #[test]
    fn a_page_reached_at_two_levels_is_walked_at_both() {
        // PML4 0x1000 → PDPT 0x2000 → PD 0x3000 → PT 0x5000 (whose entries are leaves). The
        // PML4 also points at 0x3000 as a PDPT: read at level 3, its entry leads to 0x5000 as
        // a page directory, whose entry leads to the page table 0x6000. The walk meets 0x3000
        // at level 2 first; walking it only at the level it was first met at misses 0x6000.
        let p = PRESENT;
        let mut memory = std::collections::HashMap::from([
            (0x1000u64, table(&[(0, 0x3000 | p), (1, 0x2000 | p)])),
            (0x2000, table(&[(0, 0x3000 | p)])),
            (0x3000, table(&[(0, 0x5000 | p)])),
            (0x5000, table(&[(0, 0x6000 | p)])),
            (0x6000, table(&[])),
        ]);
        let mut read = |addr: u64| memory.get_mut(&addr).map(|page| page.clone());
        let pages = paging_structures(0x1000, &mut read).expect("readable");
        for page in [0x1000, 0x2000, 0x3000, 0x5000, 0x6000] {
            assert!(pages.contains(&page), "{page:#x} missing from {pages:x?}");
        }
    }

    #[test]
    fn an_unreadable_table_or_a_huge_hierarchy_allows_no_fast_reset() {
        let mut none = |_| None;
        assert!(paging_structures(0x1000, &mut none).is_none());
        // Every entry of every table points at a new page: far more than a real hierarchy.
        let mut fanout = |addr: u64| {
            let entries: Vec<_> =
                (0..512).map(|i| (i, (addr + 0x1000 * (i as u64 + 1)) << 9 & ADDRESS | PRESENT)).collect();
            Some(table(&entries))
        };
        assert!(paging_structures(0x1000, &mut fanout).is_none());
    }
}
