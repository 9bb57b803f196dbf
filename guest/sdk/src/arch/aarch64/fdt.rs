//! Just enough of a flattened-devicetree reader for boot: `/chosen/bootargs` and the RAM
//! region (`/memory*/reg`, two address and two size cells as the mu2 VMM writes them).
//! Every offset is checked: a malformed blob gives `None`, never a fault.

const MAGIC: u32 = 0xd00d_feed;
const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const NOP: u32 = 4;
const END: u32 = 9;
/// Largest blob accepted (the VMM's is about 1 KiB plus the command line).
pub const MAX_SIZE: usize = 64 << 10;

fn be32(blob: &[u8], off: usize) -> Option<u32> {
    let b = blob.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be64(b: &[u8]) -> Option<u64> {
    let b: [u8; 8] = b.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

fn cstr(blob: &[u8], off: usize) -> Option<&[u8]> {
    let rest = blob.get(off..)?;
    let len = rest.iter().position(|&b| b == 0)?;
    Some(&rest[..len])
}

/// The blob's total size from its header, if it is a devicetree.
pub fn total_size(header: &[u8]) -> Option<usize> {
    (be32(header, 0)? == MAGIC).then_some(())?;
    Some(be32(header, 4)? as usize)
}

/// Calls `f(node name, property name, value)` for every property of every node directly
/// below the root; stops early when `f` returns `Some`.
fn find<'a, T>(blob: &'a [u8], mut f: impl FnMut(&[u8], &[u8], &'a [u8]) -> Option<T>) -> Option<T> {
    let structs = be32(blob, 8)? as usize;
    let strings = be32(blob, 12)? as usize;
    let mut off = structs;
    let mut depth = 0usize;
    let mut node: &[u8] = b"";
    loop {
        let token = be32(blob, off)?;
        off += 4;
        match token {
            BEGIN_NODE => {
                let name = cstr(blob, off)?;
                off = (off + name.len() + 1 + 3) & !3;
                depth += 1;
                if depth == 2 {
                    node = name;
                }
            }
            END_NODE => depth = depth.checked_sub(1)?,
            PROP => {
                let len = be32(blob, off)? as usize;
                let name = cstr(blob, strings.checked_add(be32(blob, off + 4)? as usize)?)?;
                let value = blob.get(off + 8..(off + 8).checked_add(len)?)?;
                off = (off + 8 + len + 3) & !3;
                if depth == 2 {
                    if let Some(found) = f(node, name, value) {
                        return Some(found);
                    }
                }
            }
            NOP => {}
            END => return None,
            _ => return None,
        }
    }
}

/// The command line: `/chosen/bootargs`, NUL-terminated in the blob.
pub fn bootargs(blob: &[u8]) -> Option<&[u8]> {
    find(blob, |node, name, value| (node == b"chosen" && name == b"bootargs").then_some(value))
}

/// The RAM region holding `[start, end)`: returns its end.
pub fn ram_end_around(blob: &[u8], start: u64, end: u64) -> Option<u64> {
    find(blob, |node, name, value| {
        if !(node == b"memory" || node.starts_with(b"memory@")) || name != b"reg" {
            return None;
        }
        value.chunks_exact(16).find_map(|cell| {
            let addr = be64(cell)?;
            let region_end = addr.checked_add(be64(&cell[8..])?)?;
            (addr <= start && end <= region_end).then_some(region_end)
        })
    })
}
