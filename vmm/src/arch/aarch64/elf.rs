//! Loading a static ELF64 guest for aarch64 (linux-loader's ELF loader is x86-only): each
//! PT_LOAD segment copied to its physical address, the rest of its memory size zero. Every
//! header field is checked against the file and guest memory.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Why an image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// Not an ELF64 little-endian aarch64 executable.
    #[error("not a 64-bit little-endian aarch64 ELF executable")]
    NotAarch64Elf,
    /// A header points outside the file.
    #[error("a header or segment lies outside the file")]
    Truncated,
    /// A segment lies outside guest memory.
    #[error("segment at {addr:#x} ({size} bytes) does not fit in guest memory")]
    Placement {
        /// Physical load address.
        addr: u64,
        /// Size in memory.
        size: u64,
    },
    /// Nothing to load.
    #[error("no loadable segment")]
    Empty,
}

const PT_LOAD: u32 = 1;
const EM_AARCH64: u16 = 183;

fn u16_at(b: &[u8], off: usize) -> Result<u16, ElfError> {
    let s = b.get(off..off + 2).ok_or(ElfError::Truncated)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, ElfError> {
    let s = b.get(off..off + 4).ok_or(ElfError::Truncated)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, ElfError> {
    let s: [u8; 8] = b.get(off..off + 8).ok_or(ElfError::Truncated)?.try_into().map_err(|_| ElfError::Truncated)?;
    Ok(u64::from_le_bytes(s))
}

/// Loads `image`; returns (entry point, lowest load address, end of the highest segment).
pub fn load(mem: &GuestMemoryMmap, image: &[u8], mem_size: u64) -> Result<(u64, u64, u64), ElfError> {
    if image.get(..4) != Some(b"\x7fELF".as_slice()) || image.get(4) != Some(&2) || image.get(5) != Some(&1) {
        return Err(ElfError::NotAarch64Elf);
    }
    if u16_at(image, 18)? != EM_AARCH64 {
        return Err(ElfError::NotAarch64Elf);
    }
    let entry = u64_at(image, 24)?;
    let phoff = usize::try_from(u64_at(image, 32)?).map_err(|_| ElfError::Truncated)?;
    let phentsize = usize::from(u16_at(image, 54)?);
    let phnum = usize::from(u16_at(image, 56)?);
    if phentsize < 56 {
        return Err(ElfError::Truncated);
    }
    let (mut low, mut high) = (u64::MAX, 0u64);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize).ok_or(ElfError::Truncated)?).ok_or(ElfError::Truncated)?;
        if u32_at(image, ph)? != PT_LOAD {
            continue;
        }
        let offset = usize::try_from(u64_at(image, ph + 8)?).map_err(|_| ElfError::Truncated)?;
        let paddr = u64_at(image, ph + 24)?;
        let filesz = usize::try_from(u64_at(image, ph + 32)?).map_err(|_| ElfError::Truncated)?;
        let memsz = u64_at(image, ph + 40)?;
        let end = paddr.checked_add(memsz).filter(|&e| e <= mem_size);
        let end = end.ok_or(ElfError::Placement { addr: paddr, size: memsz })?;
        if (filesz as u64) > memsz {
            return Err(ElfError::Truncated);
        }
        let data =
            image.get(offset..offset.checked_add(filesz).ok_or(ElfError::Truncated)?).ok_or(ElfError::Truncated)?;
        mem.write_slice(data, GuestAddress(paddr)).map_err(|_| ElfError::Placement { addr: paddr, size: memsz })?;
        // The rest of the segment (.bss) is zero already: guest RAM starts zeroed.
        low = low.min(paddr);
        high = high.max(end);
    }
    if high == 0 {
        return Err(ElfError::Empty);
    }
    Ok((entry, low, high))
}
