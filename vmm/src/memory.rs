//! Guest RAM: one host mapping registered with KVM as memory slot 0.
//!
//! The mapping is made here (not by vm-memory) so that it can later be a frozen image's
//! memory file mapped copy-on-write, or be replaced in place between requests.

use std::ptr::NonNull;

use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap failed.
    #[error("mapping {size} bytes of guest memory")]
    Map {
        /// Requested size.
        size: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// vm-memory refused the region.
    #[error("describing guest memory to vm-memory")]
    Region(#[source] vm_memory::mmap::MmapRegionError),
    /// vm-memory refused the region layout.
    #[error("building the guest memory map")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    /// The image's memory could not be copied into sealed memory.
    #[error("copying the image's memory into sealed memory")]
    SealedCopy(#[source] std::io::Error),
    /// The memory file changed size while it was copied.
    #[error("the memory file changed while it was copied ({expected} bytes, now {actual})")]
    Changed {
        /// The size the image's state records.
        expected: u64,
        /// The file's size after the copy.
        actual: u64,
    },
}

/// A copy of a frozen image's memory file in sealed anonymous memory (a memfd whose size and
/// contents can never change again): forks map the copy, so nothing done to the file on disk
/// afterwards — truncated (which would make a fork's access fault with SIGBUS), rewritten in
/// place — reaches a fork. Only the file's data extents are read (SEEK_DATA/SEEK_HOLE), and
/// all-zero pages are left as holes, so a sparse image costs what its data costs.
pub(crate) fn sealed_copy(source: &std::fs::File, size: u64) -> Result<std::fs::File, MemoryError> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    let io = MemoryError::SealedCopy;
    let copy = crate::sys::sealable_memfd(c"mu2-image-memory").map_err(io)?;
    copy.set_len(size).map_err(io)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    while let Some((start, end)) = crate::sys::next_data_extent(source, offset).map_err(io)? {
        let end = end.min(size);
        if start >= end {
            break;
        }
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            let chunk = &mut buf[..n];
            // A file cut short meanwhile ends the copy here with an error, not with zeros.
            source.read_exact_at(chunk, at).map_err(io)?;
            let mut run: Option<usize> = None;
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                match (page.iter().all(|&b| b == 0), run) {
                    (false, None) => run = Some(i * PAGE),
                    (true, Some(from)) => {
                        copy.write_all_at(&chunk[from..i * PAGE], at + from as u64).map_err(io)?;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(from) = run {
                copy.write_all_at(&chunk[from..], at + from as u64).map_err(io)?;
            }
            at += n as u64;
        }
        offset = end;
    }
    let actual = source.metadata().map_err(io)?.len();
    if actual != size {
        return Err(MemoryError::Changed { expected: size, actual });
    }
    crate::sys::seal_contents(&copy).map_err(io)?;
    Ok(copy)
}

/// This process's /proc/self/pagemap, opened once and kept: the sandbox opens it before the
/// daemon gives up its user id, after which the kernel would refuse to open it again (a
/// process that changed its ids is not dumpable, and pagemap then belongs to root), while the
/// open descriptor keeps working.
pub(crate) fn pagemap() -> std::io::Result<&'static std::fs::File> {
    static PAGEMAP: std::sync::OnceLock<Result<std::fs::File, i32>> = std::sync::OnceLock::new();
    let opened = PAGEMAP
        .get_or_init(|| std::fs::File::open("/proc/self/pagemap").map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)));
    opened.as_ref().map_err(|&errno| std::io::Error::from_raw_os_error(errno))
}

/// A host mapping owned by mu2, unmapped on drop.
#[derive(Debug)]
struct HostMapping {
    host: NonNull<u8>,
    size: usize,
}

fn map_file(file: &std::fs::File, size: usize, at: Option<NonNull<u8>>) -> Result<NonNull<u8>, MemoryError> {
    use std::os::fd::AsRawFd;
    let (addr, fixed) = match at {
        Some(p) => (p.as_ptr().cast(), libc::MAP_FIXED),
        None => (std::ptr::null_mut(), 0),
    };
    // SAFETY: maps `size` bytes of an open file privately; with MAP_FIXED, `addr` is the start
    // of a mapping of `size` bytes owned by the caller, which it replaces whole. The result is
    // checked.
    let ptr = unsafe {
        libc::mmap(
            addr,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE | fixed,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(MemoryError::Map { size, source: std::io::Error::last_os_error() });
    }
    NonNull::new(ptr.cast::<u8>())
        .ok_or_else(|| MemoryError::Map { size, source: std::io::ErrorKind::AddrNotAvailable.into() })
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created for this value and is unmapped exactly once; every
        // user (vm-memory's view, KVM's memory slot) is gone before it is dropped.
        unsafe { libc::munmap(self.host.as_ptr().cast(), self.size) };
    }
}

/// Guest RAM at guest-physical address 0.
#[derive(Debug)]
pub struct GuestRam {
    // Declared before `mapping`, so the view is dropped before the memory it describes.
    mem: GuestMemoryMmap,
    mapping: HostMapping,
}

// SAFETY: the mapping is plain memory owned by this value; it is not tied to a thread.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// Zero-filled private anonymous memory; pages are allocated when first touched.
    pub fn anonymous(size: usize) -> Result<Self, MemoryError> {
        let map_error = |source| MemoryError::Map { size, source };
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; the result
        // is checked below and the mapping is owned by the returned value.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(map_error(std::io::Error::last_os_error()));
        }
        let host =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| map_error(std::io::ErrorKind::AddrNotAvailable.into()))?;
        Self::over(HostMapping { host, size })
    }

    /// A frozen image's memory file mapped copy-on-write (MAP_PRIVATE): pages are read from
    /// the file (page cache, shared by every fork) until the guest writes them.
    pub fn from_file(file: &std::fs::File, size: usize) -> Result<Self, MemoryError> {
        let host = map_file(file, size, None)?;
        Self::over(HostMapping { host, size })
    }

    /// Replaces the whole mapping in place with a fresh copy-on-write view of `file`
    /// (MAP_FIXED over the same host range): every page the guest wrote is dropped and KVM's
    /// MMU notifier invalidates its mappings, with no memory-slot change.
    pub fn remap_file(&mut self, file: &std::fs::File) -> Result<(), MemoryError> {
        map_file(file, self.mapping.size, Some(self.mapping.host))?;
        Ok(())
    }

    fn over(mapping: HostMapping) -> Result<Self, MemoryError> {
        // SAFETY: `mapping` is readable and writable for `size` bytes and outlives the view,
        // which does not unmap it (build_raw regions are not owned).
        let region = unsafe {
            MmapRegion::build_raw(
                mapping.host.as_ptr(),
                mapping.size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
            )
        }
        .map_err(MemoryError::Region)?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| MemoryError::Map { size: mapping.size, source: std::io::ErrorKind::InvalidInput.into() })?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(MemoryError::Layout)?;
        Ok(GuestRam { mem, mapping })
    }

    /// Registers this RAM as memory slot 0 of `vm`, at guest-physical address 0. The one place
    /// a memory slot is made.
    ///
    /// # Safety
    /// KVM keeps the host address and writes guest memory through it until the VM is gone, and
    /// the VM lives as long as any of its file descriptors: the caller must keep this mapping
    /// alive until `vm` and every vCPU made from it are closed.
    pub unsafe fn register(&self, vm: &kvm_ioctls::VmFd) -> Result<(), kvm_ioctls::Error> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: self.mapping.size as u64,
            userspace_addr: self.host_address(),
        };
        // SAFETY: the region is this mapping, whole, and the caller keeps it alive for as long
        // as the VM can use it (this function's contract).
        unsafe { vm.set_user_memory_region(region) }
    }

    /// Guest memory, as vm-memory sees it.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.mapping.size
    }

    /// Guest RAM as host bytes (for writing a frozen image's memory file).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is readable for its whole size while `self` lives; the VMM only
        // calls this while no vCPU runs, so the guest does not change it underneath.
        unsafe { std::slice::from_raw_parts(self.mapping.host.as_ptr(), self.mapping.size) }
    }

    /// KiB of guest RAM this process holds privately for this VM: pages written since the
    /// mapping was made (copied from the file, or zero-filled). Reads /proc/self/smaps.
    pub fn private_kib(&self) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let start = format!("{:x}-", self.host_address());
        let mut in_vma = false;
        let mut total = 0;
        for line in smaps.lines() {
            if line.contains('-')
                && line.split_whitespace().next().is_some_and(|r| r.contains('-') && !r.ends_with(':'))
            {
                in_vma = line.starts_with(&start);
                continue;
            }
            if in_vma {
                if let Some(rest) = line.strip_prefix("Private_Dirty:") {
                    total += rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
                }
            }
        }
        Some(total)
    }

    /// Guest-physical addresses of the pages that are mapped into this process: for a
    /// copy-on-write mapping made fresh before a request, the pages the guest touched (KVM
    /// faults each one in on first access). Reads /proc/self/pagemap; for measurements.
    #[cfg(feature = "inspect")]
    pub fn touched_pages(&self) -> std::io::Result<Vec<u64>> {
        // Bit 63: present; bit 62: swapped.
        Ok(self.pagemap_entries()?.filter(|&(_, entry)| entry & (3 << 62) != 0).map(|(addr, _)| addr).collect())
    }

    /// Guest-physical addresses of the pages this process holds a private copy of: in a
    /// copy-on-write mapping of an image, the pages written since the mapping was made (by
    /// the guest or by the VMM). Reads /proc/self/pagemap: present, and not a file page.
    pub fn private_pages(&self) -> std::io::Result<Vec<u64>> {
        match self.private_pages_by_scan() {
            Ok(pages) => Ok(pages),
            // Kernels before 6.7 have no PAGEMAP_SCAN: read every page's entry instead (its
            // cost grows with guest memory: ~1 ms for 1 GiB here).
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => Ok(self
                .pagemap_entries()?
                .filter(|&(_, entry)| entry & (1 << 63) != 0 && entry & (1 << 61) == 0)
                .map(|(addr, _)| addr)
                .collect()),
            Err(e) => Err(e),
        }
    }

    /// [`GuestRam::private_pages`] through the PAGEMAP_SCAN ioctl, which walks only the page
    /// tables that exist and returns matching ranges, not an entry per page.
    fn private_pages_by_scan(&self) -> std::io::Result<Vec<u64>> {
        use std::os::fd::AsRawFd;
        const PAGE: u64 = 4096;
        const PAGE_IS_FILE: u64 = 1 << 2;
        const PAGE_IS_PRESENT: u64 = 1 << 3;
        // _IOWR('f', 16, struct pm_scan_arg): the argument is 12 u64 (96 bytes).
        const PAGEMAP_SCAN: u64 = (3 << 30) | (96 << 16) | ((b'f' as u64) << 8) | 16;
        #[repr(C)]
        #[derive(Default, Clone, Copy)]
        struct PageRegion {
            start: u64,
            end: u64,
            categories: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct PmScanArg {
            size: u64,
            flags: u64,
            start: u64,
            end: u64,
            walk_end: u64,
            vec: u64,
            vec_len: u64,
            max_pages: u64,
            category_inverted: u64,
            category_mask: u64,
            category_anyof_mask: u64,
            return_mask: u64,
        }
        let file = pagemap()?;
        let base = self.host_address();
        let end = base + self.mapping.size as u64;
        let mut regions = [PageRegion::default(); 256];
        let mut pages = Vec::new();
        let mut start = base;
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                start,
                end,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                // Present, and not a file page: a private copy.
                category_inverted: PAGE_IS_FILE,
                category_mask: PAGE_IS_FILE | PAGE_IS_PRESENT,
                return_mask: PAGE_IS_FILE | PAGE_IS_PRESENT,
                ..Default::default()
            };
            // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points at `regions`, writable for
            // `vec_len` entries; both outlive the call and the kernel touches nothing else.
            let found = unsafe { libc::ioctl(file.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg as *mut PmScanArg) };
            if found < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for region in regions.iter().take(found as usize) {
                let mut page = region.start.max(base);
                while page < region.end.min(end) {
                    pages.push(page - base);
                    page += PAGE;
                }
            }
            // The walk stops early when the region buffer is full; go on from there.
            if arg.walk_end <= start || arg.walk_end >= end {
                break;
            }
            start = arg.walk_end;
        }
        Ok(pages)
    }

    fn pagemap_entries(&self) -> std::io::Result<impl Iterator<Item = (u64, u64)>> {
        use std::os::unix::fs::FileExt;
        const PAGE: u64 = 4096;
        let pages = self.mapping.size as u64 / PAGE;
        let file = pagemap()?;
        let mut raw = vec![0u8; pages as usize * 8];
        file.read_exact_at(&mut raw, self.host_address() / PAGE * 8)?;
        Ok((0..pages as usize).map(move |i| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&raw[i * 8..i * 8 + 8]);
            (i as u64 * PAGE, u64::from_le_bytes(word))
        }))
    }

    /// Copies the given pages back from `file` (the image's memory) into guest RAM, in place:
    /// the pages stay mapped, so neither the host nor the hypervisor faults on them again.
    /// The caller guarantees that no vCPU runs.
    pub fn restore_pages(&mut self, file: &std::fs::File, pages: &[u64]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        const PAGE: usize = 4096;
        for &addr in pages {
            let offset = addr as usize;
            if offset.checked_add(PAGE).is_none_or(|end| end > self.mapping.size) {
                return Err(std::io::ErrorKind::InvalidInput.into());
            }
            // SAFETY: the page lies inside the mapping (checked above), which is writable and
            // owned by `self`; `&mut self` means no slice from `as_slice` or view from `memory`
            // is alive, and no vCPU runs (the caller's guarantee), so nothing aliases it.
            let page = unsafe { std::slice::from_raw_parts_mut(self.mapping.host.as_ptr().add(offset), PAGE) };
            file.read_exact_at(page, addr)?;
        }
        Ok(())
    }

    /// Makes this process's private copy of each given page now, so that neither the host nor
    /// the hypervisor has to copy it on the guest's first write. Each run of adjacent pages is
    /// one `madvise(MADV_POPULATE_WRITE)`: the kernel breaks copy-on-write for the whole run in
    /// one call, with no user-space page fault per page. Where the kernel lacks it (before
    /// 5.14), each page is written instead (a fault each). The caller guarantees that no vCPU
    /// runs. Pages outside the mapping are skipped.
    pub fn copy_in_advance(&mut self, pages: &[u64]) {
        const PAGE: u64 = 4096;
        let size = self.mapping.size as u64;
        let mut sorted: Vec<u64> = pages
            .iter()
            .copied()
            .filter(|&a| a % PAGE == 0 && a.checked_add(PAGE).is_some_and(|end| end <= size))
            .collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut i = 0;
        while i < sorted.len() {
            let start = sorted[i];
            let mut end = start + PAGE;
            while i + 1 < sorted.len() && sorted[i + 1] == end {
                end += PAGE;
                i += 1;
            }
            i += 1;
            if self.populate_write(start, end - start).is_err() {
                self.write_each_page(start, end);
            }
        }
    }

    /// `madvise(MADV_POPULATE_WRITE)` over `len` bytes at guest-physical `offset`.
    fn populate_write(&self, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: the range lies inside the mapping (the caller checked it), which is owned by
        // `self`; MADV_POPULATE_WRITE only faults pages in as writable (for a private mapping,
        // copying them from the file) and changes no byte of their contents.
        let rc = unsafe {
            libc::madvise(
                self.mapping.host.as_ptr().add(offset as usize).cast(),
                len as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Forces the private copy of each page in `[start, end)` by writing one of its bytes back.
    fn write_each_page(&mut self, start: u64, end: u64) {
        for offset in (start..end).step_by(4096) {
            // SAFETY: the byte lies inside the mapping (checked by the caller), which is
            // readable and writable and owned by `self`, borrowed mutably so no other view of
            // it is alive; no vCPU runs. Writing back the value just read changes nothing but
            // forces the copy.
            unsafe {
                let byte = self.mapping.host.as_ptr().add(offset as usize);
                byte.write_volatile(byte.read_volatile());
            }
        }
    }

    /// Turns off the kernel's fault-around for this mapping (MADV_RANDOM), so that
    /// [`GuestRam::touched_pages`] counts exactly the pages the guest touched rather than the
    /// 64 KiB blocks around them. For measurements.
    #[cfg(feature = "inspect")]
    pub fn disable_fault_around(&self) -> std::io::Result<()> {
        // SAFETY: advice on a mapping owned by `self`; it changes no memory contents.
        let rc = unsafe { libc::madvise(self.mapping.host.as_ptr().cast(), self.mapping.size, libc::MADV_RANDOM) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Host address of guest-physical address 0.
    pub fn host_address(&self) -> u64 {
        self.mapping.host.as_ptr() as u64
    }
}

impl crate::error::Classify for MemoryError {
    fn kind(&self) -> crate::error::FailureKind {
        match self {
            MemoryError::Map { source, .. } | MemoryError::SealedCopy(source) => crate::error::io_kind(source),
            // A file that changes while it is loaded is not a usable image.
            MemoryError::Changed { .. } => crate::error::FailureKind::BadInput,
            MemoryError::Region(_) | MemoryError::Layout(_) => crate::error::FailureKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::GuestRam;

    #[test]
    fn copies_in_advance_make_exactly_those_pages_private_and_keep_their_bytes() {
        use std::io::Write;
        let mut file = crate::sys::memfd(c"mu2-test").expect("a memfd");
        let contents: Vec<u8> = (0..16 * 4096).map(|i| (i / 4096) as u8 + 1).collect();
        file.write_all(&contents).expect("writing the file");
        let mut ram = GuestRam::from_file(&file, contents.len()).expect("mapping it");
        // Two runs (0-1 and 5), a duplicate, an unaligned and an out-of-range address ignored.
        ram.copy_in_advance(&[4096, 0, 5 * 4096, 4096, 7 * 4096 + 1, 16 * 4096, u64::MAX - 4095]);
        assert_eq!(ram.private_pages().expect("pagemap"), [0, 4096, 5 * 4096]);
        assert_eq!(ram.as_slice(), contents.as_slice(), "contents unchanged");
    }
}
