//! The content id: a SHA-256 over an image's state and the logical contents of its memory.
//!
//! The memory enters the hash as its non-zero pages only, each with its index, so the id
//! depends on what the memory holds and not on how the file stores it: a sparse and a dense
//! copy of the same image have the same id, and holes cost nothing to hash. The exact byte
//! stream is in `docs/image-format.md`.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};
use vmm_sys_util::seek_hole::SeekHole;

use crate::{Arch, PAGE_SIZE};

/// Opens the hashed stream; changing the stream's layout means changing this tag.
const DOMAIN: &[u8] = b"mu2 image content id\0";

/// The largest run of memory read at once while scanning a memory file (and the largest data
/// record of a pack): bounded, so scanning takes the same memory for any image size.
pub const RUN_MAX: usize = 1 << 20;

/// An image's content id: SHA-256 over its state and memory (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentId(pub [u8; 32]);

impl ContentId {
    /// The id as `sha256:` and 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        let mut text = String::with_capacity(7 + 64);
        text.push_str("sha256:");
        for byte in self.0 {
            text.push(char::from(HEX[usize::from(byte >> 4)]));
            text.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        text
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({})", self.to_hex())
    }
}

/// Computes a content id: the state first, then the non-zero pages of memory in increasing
/// order, then [`ContentHasher::finish`].
#[derive(Debug, Clone)]
pub(crate) struct ContentHasher {
    sha: Sha256,
    memory_size: u64,
    /// The page after the last one hashed: pages must come in increasing order.
    next_page: u64,
}

impl ContentHasher {
    /// Starts the hash of an image of `arch` at `version` with this payload and memory size.
    pub(crate) fn new(arch: Arch, version: u32, payload: &[u8], memory_size: u64) -> Self {
        let mut sha = Sha256::new();
        sha.update(DOMAIN);
        sha.update(arch.magic());
        sha.update(version.to_le_bytes());
        sha.update((payload.len() as u64).to_le_bytes());
        sha.update(payload);
        sha.update(memory_size.to_le_bytes());
        ContentHasher { sha, memory_size, next_page: 0 }
    }

    /// Adds the memory at `offset` (page-aligned): its non-zero pages, each with its index.
    /// All-zero pages are skipped, so it does not matter whether a caller passes them.
    pub(crate) fn memory(&mut self, offset: u64, bytes: &[u8]) {
        debug_assert_eq!(offset % PAGE_SIZE as u64, 0);
        debug_assert!(offset + bytes.len() as u64 <= self.memory_size);
        for (i, page) in bytes.chunks(PAGE_SIZE).enumerate() {
            if is_zero(page) {
                continue;
            }
            let index = offset / PAGE_SIZE as u64 + i as u64;
            debug_assert!(index >= self.next_page, "pages hashed out of order");
            self.next_page = index + 1;
            self.sha.update(index.to_le_bytes());
            self.sha.update(page);
        }
    }

    /// The id.
    pub(crate) fn finish(self) -> ContentId {
        ContentId(self.sha.finalize().into())
    }
}

/// Whether every byte of `page` is zero.
pub(crate) fn is_zero(page: &[u8]) -> bool {
    // OR-folding fixed-size chunks vectorises; a byte-wise `all` would not.
    let mut chunks = page.chunks_exact(64);
    chunks.all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0) && chunks.remainder().iter().all(|&b| b == 0)
}

/// Calls `visit(offset, bytes)` for every run of non-zero pages of the first `size` bytes of
/// `file`, in increasing order, each run at most `buf.len()` bytes (a multiple of
/// [`PAGE_SIZE`]) and read into `buf`. Holes are skipped without being read (SEEK_DATA /
/// SEEK_HOLE; on a filesystem without them the whole file is data), and all-zero pages inside
/// data are skipped after reading. Errors reading `file` become `E` through `read_error`.
pub(crate) fn for_each_data_run<E>(
    file: &mut File,
    size: u64,
    buf: &mut [u8],
    read_error: impl Fn(io::Error) -> E,
    mut visit: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let page = PAGE_SIZE as u64;
    debug_assert!(!buf.is_empty() && buf.len() % PAGE_SIZE == 0);
    let mut pos = 0u64;
    while pos < size {
        let Some(data) = file.seek_data(pos).map_err(&read_error)? else { break };
        if data >= size {
            break;
        }
        // Whole pages: from the page holding the data's first byte (not one already read) to
        // the page holding the byte before the hole.
        let start = (data / page * page).max(pos);
        let hole = file.seek_hole(data).map_err(&read_error)?.unwrap_or(size).min(size);
        let end = hole.div_ceil(page).saturating_mul(page).min(size);
        let mut at = start;
        while at < end {
            // `end - at` may exceed usize on 32-bit hosts only past the buffer's length.
            let len = usize::try_from(end - at).map_or(buf.len(), |n| n.min(buf.len()));
            let chunk = &mut buf[..len];
            file.read_exact_at(chunk, at).map_err(&read_error)?;
            visit_runs(at, chunk, &mut visit)?;
            at += len as u64;
        }
        pos = end.max(pos + 1);
    }
    Ok(())
}

/// Calls `visit` for each run of consecutive non-zero pages of `chunk`, which starts at `at`.
fn visit_runs<E>(at: u64, chunk: &[u8], visit: &mut impl FnMut(u64, &[u8]) -> Result<(), E>) -> Result<(), E> {
    let mut run: Option<usize> = None;
    for (i, page) in chunk.chunks(PAGE_SIZE).enumerate() {
        let offset = i * PAGE_SIZE;
        match (is_zero(page), run) {
            (false, None) => run = Some(offset),
            (true, Some(start)) => {
                visit(at + start as u64, &chunk[start..offset])?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        visit(at + start as u64, &chunk[start..])?;
    }
    Ok(())
}

/// The content id of an image whose memory file is `memory` (`memory_size` bytes), scanning it
/// with `buf` as the read buffer.
pub(crate) fn hash_memory_file(
    mut hasher: ContentHasher,
    memory: &mut File,
    memory_size: u64,
    buf: &mut [u8],
) -> io::Result<ContentId> {
    for_each_data_run(
        memory,
        memory_size,
        buf,
        |e| e,
        |offset, bytes| {
            hasher.memory(offset, bytes);
            Ok(())
        },
    )?;
    Ok(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of(memory: &[u8]) -> ContentId {
        let mut hasher = ContentHasher::new(Arch::X86_64, 2, b"state", memory.len() as u64);
        hasher.memory(0, memory);
        hasher.finish()
    }

    #[test]
    fn zero_pages_do_not_count_but_their_place_does() {
        let mut a = vec![0u8; 4 * PAGE_SIZE];
        a[PAGE_SIZE] = 1;
        let mut hasher = ContentHasher::new(Arch::X86_64, 2, b"state", a.len() as u64);
        hasher.memory(PAGE_SIZE as u64, &a[PAGE_SIZE..2 * PAGE_SIZE]);
        assert_eq!(hasher.finish(), id_of(&a), "passing only the data page gives the same id");
        let mut moved = vec![0u8; 4 * PAGE_SIZE];
        moved[2 * PAGE_SIZE] = 1;
        assert_ne!(id_of(&moved), id_of(&a), "the same page elsewhere is other contents");
        assert_ne!(id_of(&a[..3 * PAGE_SIZE]), id_of(&a), "so is another memory size");
    }

    #[test]
    fn the_state_and_the_architecture_count() {
        let memory = vec![0u8; PAGE_SIZE];
        let with = |arch, payload: &[u8]| {
            let mut hasher = ContentHasher::new(arch, 2, payload, PAGE_SIZE as u64);
            hasher.memory(0, &memory);
            hasher.finish()
        };
        assert_ne!(with(Arch::X86_64, b"a"), with(Arch::X86_64, b"b"));
        assert_ne!(with(Arch::X86_64, b"a"), with(Arch::Aarch64, b"a"));
    }

    #[test]
    fn shown_as_sha256_hex() {
        let id = ContentId([0xab; 32]);
        assert_eq!(id.to_string(), format!("sha256:{}", "ab".repeat(32)));
    }

    #[test]
    fn runs_split_at_zero_pages_and_at_the_buffer() {
        let mut chunk = vec![0u8; 6 * PAGE_SIZE];
        for page in [1, 2, 4] {
            chunk[page * PAGE_SIZE + 7] = 3;
        }
        let mut runs = Vec::new();
        visit_runs(0x10000, &chunk, &mut |offset, bytes| {
            runs.push((offset, bytes.len()));
            Ok::<(), ()>(())
        })
        .unwrap();
        let page = PAGE_SIZE as u64;
        assert_eq!(runs, [(0x10000 + page, 2 * PAGE_SIZE), (0x10000 + 4 * page, PAGE_SIZE)]);
    }

    #[test]
    fn holes_are_skipped_without_being_read() {
        // A 64 GiB file holding two bytes: reading its holes would take tens of seconds, seeking
        // over them takes microseconds.
        const SIZE: u64 = 64 << 30;
        let path = std::env::temp_dir().join(format!("mu2-content-holes-{}", std::process::id()));
        let mut file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(SIZE).unwrap();
        file.write_all_at(&[1], 12345).unwrap();
        file.write_all_at(&[2], SIZE - 1).unwrap();
        let started = std::time::Instant::now();
        let mut runs = Vec::new();
        let mut buf = vec![0u8; RUN_MAX];
        for_each_data_run(
            &mut file,
            SIZE,
            &mut buf,
            |e| e,
            |offset, bytes| {
                runs.push((offset, bytes.to_vec()));
                Ok(())
            },
        )
        .unwrap();
        let elapsed = started.elapsed();
        std::fs::remove_file(&path).unwrap();
        assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
        let page = PAGE_SIZE as u64;
        let offsets: Vec<u64> = runs.iter().map(|r| r.0).collect();
        assert_eq!(offsets, [12345 / page * page, SIZE - page]);
        assert_eq!(runs[0].1[12345 % PAGE_SIZE], 1);
        assert_eq!(runs[1].1[PAGE_SIZE - 1], 2);
    }
}
