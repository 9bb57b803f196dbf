//! Packs: an image as one file, to move it between hosts.
//!
//! A pack is a 64-byte header (magic, pack version, flags, the state file's length, the memory
//! size, the content id) followed by one zstd frame holding the state file and then the memory's
//! non-zero runs as records (offset, length, bytes), and an end record. Holes and zero pages are
//! not stored. Both directions stream through buffers of bounded size (at most [`RUN_MAX`] of
//! memory plus zstd's window), whatever the image's size.
//!
//! [`unpack`] treats every byte as hostile: each length is bounded before anything is read or
//! allocated from it, runs must lie inside the memory in increasing order, the state is checked
//! and decoded, nothing may follow the end record, and the content id is recomputed from what
//! arrived. Until all of that has passed, nothing is at the destination's real names; on any
//! failure what was written is removed. The byte layout is in `docs/image-format.md`.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::content::{self, ContentHasher, ContentId, RUN_MAX};
use crate::{
    check_state, commit, create_truncated, decode_payload, open_memory, read_state_file, sync_dir, Arch, Magic,
    SnapshotError, StateHeader, Versioned, HEADER_LEN, MAX_STATE_SIZE, MEMORY_TMP, PAGE_SIZE, STATE_FILE, STATE_TMP,
};

/// The magic that opens every pack.
pub const PACK_MAGIC: [u8; 8] = *b"MU2PACK\0";
/// The pack layout's version; packs of other versions are refused.
pub const PACK_VERSION: u32 = 1;
/// Length of the uncompressed pack header.
pub const PACK_HEADER_LEN: usize = 64;

/// Record kinds in the compressed stream.
const RECORD_END: u8 = 0;
const RECORD_DATA: u8 = 1;
/// zstd's default level: fast, and memory pages compress well enough at it.
const LEVEL: i32 = 3;
/// The window the encoder uses (2 MiB) and the largest a pack may ask the decoder for (8 MiB),
/// which bounds the decoder's memory whatever the file says.
const WINDOW_LOG: u32 = 21;
const MAX_WINDOW_LOG: u32 = 23;

/// What [`pack`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackSummary {
    /// The image's content id, checked against its files while packing.
    pub content_id: ContentId,
    /// The guest memory size.
    pub memory_size: u64,
    /// Bytes of memory stored (the non-zero pages), before compression.
    pub data_bytes: u64,
    /// The pack file's size.
    pub pack_bytes: u64,
}

/// Everything that can go wrong packing or unpacking.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// The image being packed, or the state inside a pack, is not a valid image.
    #[error("image {path}")]
    Image {
        /// The image directory or the pack file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: SnapshotError,
    },
    /// A file or directory operation failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file does not start with [`PACK_MAGIC`].
    #[error("{path} is not a mu2 image pack (magic {found}, expected b\"MU2PACK\\x00\")")]
    NotAPack {
        /// The file.
        path: PathBuf,
        /// The first 8 bytes found.
        found: Magic,
    },
    /// A pack version this build does not read.
    #[error("{path}: pack version {found} is not supported (this build reads version {PACK_VERSION})")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// Header flags (none are defined).
    #[error("{path}: unknown pack flags {flags:#010x} (none are defined)")]
    UnsupportedFlags {
        /// The file.
        path: PathBuf,
        /// The flags found.
        flags: u32,
    },
    /// The state length in the header is not that of a possible state file.
    #[error("{path}: state length {len} is outside {HEADER_LEN}..={max}", max = HEADER_LEN as u64 + MAX_STATE_SIZE)]
    StateLength {
        /// The file.
        path: PathBuf,
        /// The length found.
        len: u64,
    },
    /// The memory size exceeds what the caller accepts.
    #[error("{path}: guest memory of {size} bytes exceeds the maximum {max}")]
    MemoryTooLarge {
        /// The file.
        path: PathBuf,
        /// The size in the header.
        size: u64,
        /// The caller's limit.
        max: u64,
    },
    /// The file ends before the pack does.
    #[error("{path}: truncated: the file ends inside the pack")]
    Truncated {
        /// The file.
        path: PathBuf,
    },
    /// The compressed stream does not decode (a corrupt byte, a bad checksum, an oversized
    /// window), or the file cannot be read.
    #[error("{path}: the compressed stream is corrupt or unreadable")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// zstd's or the reader's error.
        #[source]
        source: io::Error,
    },
    /// The pack header disagrees with the state file it carries.
    #[error("{path}: the pack header's {field} does not match the state it carries")]
    HeaderMismatch {
        /// The file.
        path: PathBuf,
        /// Which field.
        field: &'static str,
    },
    /// A record kind that does not exist.
    #[error("{path}: unknown record kind {kind}")]
    UnknownRecord {
        /// The file.
        path: PathBuf,
        /// The kind byte.
        kind: u8,
    },
    /// A data record that is empty, too long, misaligned, out of order or past the memory.
    #[error("{path}: data record at {offset:#x} of {len} bytes: {problem}")]
    BadRun {
        /// The file.
        path: PathBuf,
        /// The record's offset.
        offset: u64,
        /// The record's length.
        len: u32,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// Bytes follow the end record.
    #[error("{path}: data after the end of the pack")]
    TrailingData {
        /// The file.
        path: PathBuf,
    },
    /// What arrived does not hash to the content id it claims.
    #[error("{path}: the contents hash to {computed}, the pack records {recorded}: the pack is corrupt")]
    ContentMismatch {
        /// The file.
        path: PathBuf,
        /// The id the pack records.
        recorded: ContentId,
        /// The id of what it holds.
        computed: ContentId,
    },
    /// The caller's own check of the decoded state refused it.
    #[error("{path}: the image it carries is refused")]
    Rejected {
        /// The file.
        path: PathBuf,
        /// The caller's reason.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The destination exists and is not an empty directory.
    #[error("{path} exists and is not an empty directory")]
    DestinationInUse {
        /// The destination.
        path: PathBuf,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PackError + 'a {
    move |source| PackError::Io { op, path: path.to_owned(), source }
}

/// Packs the image in `dir` into the file `out` (written as `.NAME.partial` beside it, then
/// renamed). The image's content id is recomputed on the way and a mismatch is refused, so a
/// pack never carries an image that does not match its id.
pub fn pack(dir: &Path, out: &Path) -> Result<PackSummary, PackError> {
    let image = |source| PackError::Image { path: dir.to_owned(), source };
    let state_path = dir.join(STATE_FILE);
    let (state, file_len) = read_state_file(dir, &state_path).map_err(image)?;
    let header = check_state(&state_path, None, &state, file_len).map_err(image)?;
    let mut memory = open_memory(dir, header.memory_size).map_err(image)?;

    let name = out.file_name().ok_or_else(|| PackError::Io {
        op: "create",
        path: out.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
    })?;
    let partial = out.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    match write_pack(dir, &partial, &header, &state, &mut memory) {
        Ok((data_bytes, pack_bytes)) => {
            fs::rename(&partial, out).map_err(io_err("rename into place", out))?;
            if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent).map_err(|source| PackError::Image { path: parent.to_owned(), source })?;
            }
            Ok(PackSummary { content_id: header.content_id, memory_size: header.memory_size, data_bytes, pack_bytes })
        }
        Err(e) => {
            let _ = fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// Writes the pack of the checked image `state` + `memory` to `path`; returns the memory bytes
/// stored and the file's size.
fn write_pack(
    dir: &Path,
    path: &Path,
    header: &StateHeader,
    state: &[u8],
    memory: &mut File,
) -> Result<(u64, u64), PackError> {
    let write = |source| PackError::Io { op: "write", path: path.to_owned(), source };
    let file = create_truncated(path).map_err(|source| PackError::Image { path: path.to_owned(), source })?;
    let mut out = BufWriter::with_capacity(1 << 16, file);
    out.write_all(&pack_header(header, state.len() as u64)).map_err(write)?;
    let mut encoder = zstd::stream::write::Encoder::new(out, LEVEL).map_err(write)?;
    encoder.include_checksum(true).map_err(write)?;
    encoder.window_log(WINDOW_LOG).map_err(write)?;
    encoder.write_all(state).map_err(write)?;

    let mut hasher = ContentHasher::new(header.arch, header.version, &state[HEADER_LEN..], header.memory_size);
    let mut buf = vec![0u8; RUN_MAX];
    let mut data_bytes = 0u64;
    let memory_path = dir.join(crate::MEMORY_FILE);
    let read = |source| PackError::Io { op: "read", path: memory_path.clone(), source };
    content::for_each_data_run(memory, header.memory_size, &mut buf, read, |offset, bytes| {
        hasher.memory(offset, bytes);
        data_bytes += bytes.len() as u64;
        // Runs are at most RUN_MAX bytes, so the length fits u32.
        let len = bytes.len() as u32;
        encoder.write_all(&[RECORD_DATA]).map_err(write)?;
        encoder.write_all(&offset.to_le_bytes()).map_err(write)?;
        encoder.write_all(&len.to_le_bytes()).map_err(write)?;
        encoder.write_all(bytes).map_err(write)
    })?;
    encoder.write_all(&[RECORD_END]).map_err(write)?;
    let out = encoder.finish().map_err(write)?;
    let file = out.into_inner().map_err(|e| write(e.into_error()))?;
    file.sync_all().map_err(io_err("fsync", path))?;

    let computed = hasher.finish();
    if computed != header.content_id {
        let source = SnapshotError::ContentMismatch { path: dir.to_owned(), recorded: header.content_id, computed };
        return Err(PackError::Image { path: dir.to_owned(), source });
    }
    let pack_bytes = file.metadata().map_err(io_err("stat", path))?.len();
    Ok((data_bytes, pack_bytes))
}

fn pack_header(header: &StateHeader, state_len: u64) -> [u8; PACK_HEADER_LEN] {
    let mut out = [0u8; PACK_HEADER_LEN];
    out[0..8].copy_from_slice(&PACK_MAGIC);
    out[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&0u32.to_le_bytes());
    out[16..24].copy_from_slice(&state_len.to_le_bytes());
    out[24..32].copy_from_slice(&header.memory_size.to_le_bytes());
    out[32..64].copy_from_slice(&header.content_id.0);
    out
}

/// The pack header's fields, checked.
struct PackHeader {
    state_len: u64,
    memory_size: u64,
    content_id: ContentId,
}

/// Unpacks the pack `file` into the image directory `dir`, which must not exist or be empty.
///
/// The image must be for `arch` and its memory at most `max_memory` bytes; its payload is decoded
/// as `T` and given to `check`, the caller's own validation, before any memory is read. The
/// memory file is written sparse. On success `dir` holds the image and its header is returned;
/// on any failure `dir` is as it was (a directory this call created is removed again).
pub fn unpack<T: DeserializeOwned + Versioned>(
    file: &Path,
    dir: &Path,
    arch: Arch,
    max_memory: u64,
    check: impl FnOnce(&StateHeader, &T) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<StateHeader, PackError> {
    let input = File::open(file).map_err(io_err("open", file))?;
    let mut input = BufReader::with_capacity(1 << 16, input);
    let pack = read_pack_header(file, &mut input, max_memory)?;
    let created = prepare_destination(dir)?;
    let result = unpack_into::<T>(file, &mut input, &pack, dir, arch, check);
    if result.is_err() {
        let _ = fs::remove_file(dir.join(MEMORY_TMP));
        let _ = fs::remove_file(dir.join(STATE_TMP));
        if created {
            let _ = fs::remove_dir(dir);
        }
    }
    result
}

fn read_pack_header(path: &Path, input: &mut impl Read, max_memory: u64) -> Result<PackHeader, PackError> {
    let mut header = [0u8; PACK_HEADER_LEN];
    read_exact(path, input, &mut header)?;
    let field8 = |at: usize| -> [u8; 8] { std::array::from_fn(|i| header[at + i]) };
    let field4 = |at: usize| -> [u8; 4] { std::array::from_fn(|i| header[at + i]) };
    let magic = field8(0);
    if magic != PACK_MAGIC {
        return Err(PackError::NotAPack { path: path.to_owned(), found: Magic(magic) });
    }
    let version = u32::from_le_bytes(field4(8));
    if version != PACK_VERSION {
        return Err(PackError::UnsupportedVersion { path: path.to_owned(), found: version });
    }
    let flags = u32::from_le_bytes(field4(12));
    if flags != 0 {
        return Err(PackError::UnsupportedFlags { path: path.to_owned(), flags });
    }
    let state_len = u64::from_le_bytes(field8(16));
    if !(HEADER_LEN as u64..=HEADER_LEN as u64 + MAX_STATE_SIZE).contains(&state_len) {
        return Err(PackError::StateLength { path: path.to_owned(), len: state_len });
    }
    let memory_size = u64::from_le_bytes(field8(24));
    if memory_size > max_memory {
        return Err(PackError::MemoryTooLarge { path: path.to_owned(), size: memory_size, max: max_memory });
    }
    let content_id = ContentId(std::array::from_fn(|i| header[32 + i]));
    Ok(PackHeader { state_len, memory_size, content_id })
}

/// Makes sure `dir` is an empty directory; returns whether it was created here.
fn prepare_destination(dir: &Path) -> Result<bool, PackError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(false),
            Some(_) => Err(PackError::DestinationInUse { path: dir.to_owned() }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir(dir).map_err(io_err("create directory", dir))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => Err(PackError::DestinationInUse { path: dir.to_owned() }),
        Err(e) => Err(io_err("read directory", dir)(e)),
    }
}

fn unpack_into<T: DeserializeOwned + Versioned>(
    path: &Path,
    input: &mut BufReader<File>,
    pack: &PackHeader,
    dir: &Path,
    arch: Arch,
    check: impl FnOnce(&StateHeader, &T) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<StateHeader, PackError> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(input)
        .map_err(|source| PackError::Corrupt { path: path.to_owned(), source })?
        .single_frame();
    decoder.window_log_max(MAX_WINDOW_LOG).map_err(|source| PackError::Corrupt { path: path.to_owned(), source })?;

    // The state file, bounded by the header's checked length; grown as it arrives.
    let mut state = Vec::with_capacity(HEADER_LEN);
    (&mut decoder).take(pack.state_len).read_to_end(&mut state).map_err(|e| read_error(path, e))?;
    if state.len() as u64 != pack.state_len {
        return Err(PackError::Truncated { path: path.to_owned() });
    }
    let image = |source| PackError::Image { path: path.to_owned(), source };
    let header = check_state(path, Some(arch), &state, pack.state_len).map_err(image)?;
    let decoded = decode_payload::<T>(path, &state[HEADER_LEN..]).map_err(image)?;
    if header.memory_size != pack.memory_size {
        return Err(PackError::HeaderMismatch { path: path.to_owned(), field: "memory size" });
    }
    if header.content_id != pack.content_id {
        return Err(PackError::HeaderMismatch { path: path.to_owned(), field: "content id" });
    }
    check(&header, &decoded).map_err(|source| PackError::Rejected { path: path.to_owned(), source })?;
    drop(decoded);

    let memory_tmp = dir.join(MEMORY_TMP);
    let memory = create_truncated(&memory_tmp).map_err(image)?;
    memory.set_len(header.memory_size).map_err(io_err("extend", &memory_tmp))?;
    let mut hasher = ContentHasher::new(header.arch, header.version, &state[HEADER_LEN..], header.memory_size);
    let mut buf = vec![0u8; RUN_MAX];
    let mut next_free = 0u64;
    loop {
        let mut kind = [0u8; 1];
        read_exact(path, &mut decoder, &mut kind)?;
        match kind[0] {
            RECORD_END => break,
            RECORD_DATA => {}
            kind => return Err(PackError::UnknownRecord { path: path.to_owned(), kind }),
        }
        let mut fields = [0u8; 12];
        read_exact(path, &mut decoder, &mut fields)?;
        let offset = u64::from_le_bytes(std::array::from_fn(|i| fields[i]));
        let len = u32::from_le_bytes(std::array::from_fn(|i| fields[8 + i]));
        check_run(path, offset, len, next_free, header.memory_size)?;
        let data = &mut buf[..len as usize];
        read_exact(path, &mut decoder, data)?;
        hasher.memory(offset, data);
        write_nonzero(&memory, offset, data).map_err(io_err("write", &memory_tmp))?;
        next_free = offset + u64::from(len);
    }
    // Nothing may follow the end record, inside the frame (the probe also makes zstd check the
    // frame's checksum) or after it.
    let mut probe = [0u8; 1];
    if decoder.read(&mut probe).map_err(|e| read_error(path, e))? != 0 {
        return Err(PackError::TrailingData { path: path.to_owned() });
    }
    let rest = decoder.finish();
    if !rest.fill_buf().map_err(|e| read_error(path, e))?.is_empty() {
        return Err(PackError::TrailingData { path: path.to_owned() });
    }
    let computed = hasher.finish();
    if computed != header.content_id {
        return Err(PackError::ContentMismatch { path: path.to_owned(), recorded: header.content_id, computed });
    }

    memory.sync_all().map_err(io_err("fsync", &memory_tmp))?;
    drop(memory);
    let state_tmp = dir.join(STATE_TMP);
    let mut file = create_truncated(&state_tmp).map_err(image)?;
    file.write_all(&state).map_err(io_err("write", &state_tmp))?;
    file.sync_all().map_err(io_err("fsync", &state_tmp))?;
    drop(file);
    commit(dir).map_err(|source| PackError::Image { path: dir.to_owned(), source })?;
    Ok(header)
}

/// Checks a data record against the memory and the previous record, before reading its bytes.
fn check_run(path: &Path, offset: u64, len: u32, next_free: u64, memory_size: u64) -> Result<(), PackError> {
    let bad = |problem| Err(PackError::BadRun { path: path.to_owned(), offset, len, problem });
    let page = PAGE_SIZE as u64;
    if len == 0 || len as usize > RUN_MAX {
        return bad("the length is 0 or over 1 MiB");
    }
    if offset % page != 0 {
        return bad("the offset is not page-aligned");
    }
    if offset < next_free {
        return bad("it overlaps or precedes the previous record");
    }
    let Some(end) = offset.checked_add(u64::from(len)).filter(|&end| end <= memory_size) else {
        return bad("it ends past the guest memory");
    };
    if end != memory_size && u64::from(len) % page != 0 {
        return bad("it is not a whole number of pages and does not end the memory");
    }
    Ok(())
}

/// Writes the non-zero pages of `data` (at `offset`), leaving zero pages as holes.
fn write_nonzero(file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut run: Option<usize> = None;
    for (i, page) in data.chunks(PAGE_SIZE).enumerate() {
        let at = i * PAGE_SIZE;
        match (content::is_zero(page), run) {
            (false, None) => run = Some(at),
            (true, Some(start)) => {
                file.write_all_at(&data[start..at], offset + start as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        file.write_all_at(&data[start..], offset + start as u64)?;
    }
    Ok(())
}

fn read_exact(path: &Path, input: &mut impl Read, buf: &mut [u8]) -> Result<(), PackError> {
    input.read_exact(buf).map_err(|e| read_error(path, e))
}

/// An end of input is a truncated pack; anything else a corrupt (or unreadable) one.
fn read_error(path: &Path, e: io::Error) -> PackError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => PackError::Truncated { path: path.to_owned() },
        _ => PackError::Corrupt { path: path.to_owned(), source: e },
    }
}
