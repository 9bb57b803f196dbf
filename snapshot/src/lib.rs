//! mu2's frozen-image container format.
//!
//! A frozen image is a directory holding two files:
//!
//! - [`STATE_FILE`] (`state`): a 72-byte header (magic naming the architecture, format version,
//!   flags, payload length, memory size, the image's [`ContentId`], CRC-64 of header and payload)
//!   followed by the payload, a serde value encoded with postcard. The payload type is the VMM's;
//!   this crate only frames, checks and decodes it.
//! - [`MEMORY_FILE`] (`memory`): raw guest RAM, written sparse (all-zero 4 KiB pages are holes) so
//!   that each fork can `mmap` it `MAP_PRIVATE` and copy-on-write.
//!
//! The content id (SHA-256 over the state and the memory's logical contents) is computed when an
//! image is written and recorded in the header; [`read_state`] checks only the header's CRC, which
//! covers it, and [`verify_image`] and [`unpack`] recompute it. [`pack`] turns an image into one
//! compressed, sparse-aware file and [`unpack`] back.
//!
//! Every header field is checked before use, reads are capped at [`MAX_STATE_SIZE`], and every way
//! an image can be wrong is a specific [`SnapshotError`] (or [`PackError`]) variant. The byte-level
//! format, the validation rules and the versioning policy are in `docs/image-format.md`.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

mod content;
mod pack;
mod schema;

use content::ContentHasher;
pub use content::{ContentId, RUN_MAX};
pub use pack::{pack, unpack, PackError, PackSummary, PACK_HEADER_LEN, PACK_MAGIC, PACK_VERSION};
pub use schema::{check_schema, fingerprint, Versioned};

/// The version written into every header; bump it whenever the header layout, the encoding or any
/// payload schema changes (the [`Versioned`] tripwire enforces the last).
///
/// Version 2 added the memory size and the content id to the header (and the CRC now covers the
/// header too); version-1 images are not read (see `docs/image-format.md`).
pub const FORMAT_VERSION: u32 = 2;

/// The versions [`read_state`] accepts. Frozen images are caches rebuilt from the guest, so there
/// is no migration: only the current version is read.
pub const SUPPORTED_VERSIONS: &[u32] = &[FORMAT_VERSION];

/// The largest payload accepted (and written): 16 MiB. VM state (registers, device state) is a few
/// KiB; guest memory is not in the payload.
pub const MAX_STATE_SIZE: u64 = 16 << 20;

/// The largest guest memory a header may record: 1 TiB. Nothing is allocated from it; it only
/// keeps absurd values out of size arithmetic.
pub const MAX_MEMORY_SIZE: u64 = 1 << 40;

/// Length of the state file header in bytes.
pub const HEADER_LEN: usize = 72;

/// Where the checksum lies in the header; it covers the bytes before it and the payload.
const CRC_AT: usize = 64;

/// The name of the state file inside an image directory.
pub const STATE_FILE: &str = "state";

/// The name of the memory file inside an image directory.
pub const MEMORY_FILE: &str = "memory";

/// The page size used for sparse memory: an all-zero page of this size is left as a hole.
pub const PAGE_SIZE: usize = 4096;

/// Temporary names used while writing; renamed over the real names only once complete.
pub(crate) const STATE_TMP: &str = ".state.partial";
pub(crate) const MEMORY_TMP: &str = ".memory.partial";

/// The common prefix of every mu2 image's magic; the last two bytes name the architecture.
const MAGIC_PREFIX: [u8; 6] = *b"MU2IMG";

/// CRC-64/XZ (ECMA-182 polynomial, reflected; the one `xz` and `crc64fast` use).
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// The architecture an image was taken on. A frozen image holds architecture-specific vCPU state,
/// so it only restores on the same architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// x86-64; magic `MU2IMGx8`.
    X86_64,
    /// AArch64; magic `MU2IMGa8`.
    Aarch64,
}

impl Arch {
    /// The architecture this program was built for.
    #[cfg(target_arch = "x86_64")]
    pub const fn host() -> Arch {
        Arch::X86_64
    }

    /// The architecture this program was built for.
    #[cfg(target_arch = "aarch64")]
    pub const fn host() -> Arch {
        Arch::Aarch64
    }

    /// The 8-byte magic that opens this architecture's state files.
    pub const fn magic(self) -> [u8; 8] {
        match self {
            Arch::X86_64 => *b"MU2IMGx8",
            Arch::Aarch64 => *b"MU2IMGa8",
        }
    }

    /// The architecture whose magic ends in `tag`, if any.
    const fn from_tag(tag: [u8; 2]) -> Option<Arch> {
        match &tag {
            b"x8" => Some(Arch::X86_64),
            b"a8" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    /// The conventional name, as in `target_arch`.
    pub const fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes shown as an escaped string (`b"MU2IMGx8"`-style) in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Magic(pub [u8; 8]);

impl fmt::Display for Magic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

/// What a state file's header says about its image, every field checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateHeader {
    /// The architecture the image was taken on.
    pub arch: Arch,
    /// Its format version (one of [`SUPPORTED_VERSIONS`]).
    pub version: u32,
    /// Bytes of payload after the header.
    pub payload_len: u64,
    /// The memory file's size, the guest RAM size.
    pub memory_size: u64,
    /// The content id recorded when the image was written.
    pub content_id: ContentId,
}

/// Everything that can go wrong writing or reading a frozen image.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The image directory does not exist.
    #[error("image directory {path} does not exist")]
    MissingDirectory {
        /// The directory.
        path: PathBuf,
    },
    /// The image path exists but is not a directory.
    #[error("image path {path} is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// One of the image's files is missing.
    #[error("image file {path} is missing")]
    MissingFile {
        /// The missing file.
        path: PathBuf,
    },
    /// One of the image's files is not a regular file.
    #[error("image file {path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// An I/O operation failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done ("read", "create", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The state file is shorter than the header.
    #[error("{path}: truncated header: the file has {len} bytes, the header needs {HEADER_LEN}")]
    TruncatedHeader {
        /// The state file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The magic is not a mu2 image's.
    #[error("{path} is not a mu2 image (magic {found}, expected b\"MU2IMG..\")")]
    NotAnImage {
        /// The state file.
        path: PathBuf,
        /// The first 8 bytes found.
        found: Magic,
    },
    /// A mu2 image for an architecture this build does not know.
    #[error("{path}: mu2 image for an unknown architecture (magic {found})")]
    UnknownArch {
        /// The state file.
        path: PathBuf,
        /// The magic found.
        found: Magic,
    },
    /// A mu2 image of another architecture.
    #[error("{path}: image is for {image}, this host is {host}")]
    WrongArch {
        /// The state file.
        path: PathBuf,
        /// The architecture the image was taken on.
        image: Arch,
        /// The architecture it was to be restored on.
        host: Arch,
    },
    /// A format version this build does not read.
    #[error("{path}: image format version {found} is not supported (this build reads versions {supported:?})")]
    UnsupportedVersion {
        /// The state file.
        path: PathBuf,
        /// The version in the header.
        found: u32,
        /// The versions this build reads.
        supported: &'static [u32],
    },
    /// Header flags this build does not know (all are reserved and must be zero).
    #[error("{path}: unknown header flags {flags:#010x} (none are defined)")]
    UnsupportedFlags {
        /// The state file.
        path: PathBuf,
        /// The flags found.
        flags: u32,
    },
    /// The payload length field exceeds [`MAX_STATE_SIZE`].
    #[error("{path}: payload length {len} exceeds the maximum state size {max}")]
    StateTooLarge {
        /// The state file.
        path: PathBuf,
        /// The length field.
        len: u64,
        /// [`MAX_STATE_SIZE`].
        max: u64,
    },
    /// The payload length field says more than the file holds.
    #[error("{path}: truncated payload: the header says {len} bytes, the file holds {available}")]
    TruncatedPayload {
        /// The state file.
        path: PathBuf,
        /// The length field.
        len: u64,
        /// The payload bytes actually present.
        available: u64,
    },
    /// The file continues past the payload.
    #[error("{path}: {extra} bytes of trailing data after the {len}-byte payload")]
    TrailingData {
        /// The state file.
        path: PathBuf,
        /// The length field.
        len: u64,
        /// The number of bytes after the payload.
        extra: u64,
    },
    /// The header's memory size exceeds [`MAX_MEMORY_SIZE`].
    #[error("{path}: memory size {size} exceeds the maximum {max}")]
    MemoryTooLarge {
        /// The state file.
        path: PathBuf,
        /// The memory size field.
        size: u64,
        /// [`MAX_MEMORY_SIZE`].
        max: u64,
    },
    /// The CRC-64 of header and payload does not match the header's.
    #[error("{path}: checksum mismatch (header {stored:#018x}, computed {computed:#018x}): the image is corrupt")]
    ChecksumMismatch {
        /// The state file.
        path: PathBuf,
        /// The checksum in the header.
        stored: u64,
        /// The checksum of the payload read.
        computed: u64,
    },
    /// The payload does not decode as the requested type.
    #[error("{path}: the payload does not decode as the expected state")]
    Decode {
        /// The state file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: postcard::Error,
    },
    /// The payload decoded but did not use all its bytes, so it is not what the type expects.
    #[error("{path}: the payload decoded with {unused} bytes left over")]
    PayloadNotConsumed {
        /// The state file.
        path: PathBuf,
        /// The bytes left over.
        unused: usize,
    },
    /// The state could not be encoded.
    #[error("cannot encode the state")]
    Encode {
        /// The encoder's error.
        #[source]
        source: postcard::Error,
    },
    /// The encoded state exceeds [`MAX_STATE_SIZE`] (refused on write so it is never unreadable).
    #[error("the encoded state is {len} bytes, over the maximum state size {max}")]
    EncodedTooLarge {
        /// The encoded length.
        len: u64,
        /// [`MAX_STATE_SIZE`].
        max: u64,
    },
    /// The image's contents do not hash to the content id its header records.
    #[error("{path}: the contents hash to {computed}, the header records {recorded}: the image is corrupt")]
    ContentMismatch {
        /// The image directory.
        path: PathBuf,
        /// The id in the header.
        recorded: ContentId,
        /// The id of what the files hold.
        computed: ContentId,
    },
    /// The memory file's size is not the guest RAM size the state records.
    #[error("{path}: memory file is {actual} bytes, the state says guest RAM is {expected} bytes")]
    MemorySizeMismatch {
        /// The memory file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The size expected.
        expected: u64,
    },
}

pub(crate) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { op, path: path.to_owned(), source }
}

/// Encodes `state` as postcard bytes, refusing an encoding over [`MAX_STATE_SIZE`].
fn encode_payload<T: Serialize + Versioned>(state: &T) -> Result<Vec<u8>, SnapshotError> {
    const { check_schema::<T>() };
    let payload = postcard::to_stdvec(state).map_err(|source| SnapshotError::Encode { source })?;
    if payload.len() as u64 > MAX_STATE_SIZE {
        return Err(SnapshotError::EncodedTooLarge { len: payload.len() as u64, max: MAX_STATE_SIZE });
    }
    Ok(payload)
}

/// The state file: header (with `content_id`) and `payload`.
fn frame(arch: Arch, payload: &[u8], memory_size: u64, content_id: ContentId) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&arch.magic());
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&memory_size.to_le_bytes());
    out.extend_from_slice(&content_id.0);
    let crc = checksum(&out, payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// CRC-64 of the header bytes before the checksum field, then the payload.
fn checksum(header: &[u8], payload: &[u8]) -> u64 {
    let mut digest = CRC64.digest();
    digest.update(&header[..CRC_AT]);
    digest.update(payload);
    digest.finalize()
}

/// Encodes `state` as a complete state file (header and payload) for `arch`, with the content id
/// of `state` and `memory` (a host mapping of guest RAM).
///
/// [`write_image`] writes exactly these bytes; the VMM can use this for a golden test of its own
/// payload type.
pub fn encode_state<T: Serialize + Versioned>(arch: Arch, state: &T, memory: &[u8]) -> Result<Vec<u8>, SnapshotError> {
    let payload = encode_payload(state)?;
    let mut hasher = ContentHasher::new(arch, FORMAT_VERSION, &payload, memory.len() as u64);
    hasher.memory(0, memory);
    Ok(frame(arch, &payload, memory.len() as u64, hasher.finish()))
}

/// Writes a frozen image of `state` and `memory` (a host mapping of guest RAM) into `dir`, creating
/// it if needed and replacing any image already there. Returns the image's content id, computed
/// while the memory is written.
///
/// Both files are written under temporary names, fsynced, then renamed into place: first any old
/// `state` is removed, then `memory` is renamed, then `state`. `state` is the commit point, so a
/// crash at any moment leaves either the complete new image or one without a `state` file, which
/// [`read_state`] refuses — never a new state beside old memory. One writer per directory.
pub fn write_image<T: Serialize + Versioned>(
    dir: &Path,
    arch: Arch,
    state: &T,
    memory: &[u8],
) -> Result<ContentId, SnapshotError> {
    let payload = encode_payload(state)?;
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;

    // Memory first: the content id, which goes into the state's header, is computed on the way.
    let memory_tmp = dir.join(MEMORY_TMP);
    let file = create_truncated(&memory_tmp)?;
    let mut hasher = ContentHasher::new(arch, FORMAT_VERSION, &payload, memory.len() as u64);
    write_sparse(&file, memory, &mut hasher).map_err(io_err("write", &memory_tmp))?;
    file.sync_all().map_err(io_err("fsync", &memory_tmp))?;
    drop(file);
    let content_id = hasher.finish();

    let state_tmp = dir.join(STATE_TMP);
    let mut file = create_truncated(&state_tmp)?;
    file.write_all(&frame(arch, &payload, memory.len() as u64, content_id)).map_err(io_err("write", &state_tmp))?;
    file.sync_all().map_err(io_err("fsync", &state_tmp))?;
    drop(file);

    commit(dir)?;
    Ok(content_id)
}

/// Renames the fsynced `.memory.partial` and `.state.partial` of `dir` into place, `state` last.
pub(crate) fn commit(dir: &Path) -> Result<(), SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    match fs::remove_file(&state_path) {
        Ok(()) => sync_dir(dir)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", &state_path)(e)),
    }
    let memory_path = dir.join(MEMORY_FILE);
    fs::rename(dir.join(MEMORY_TMP), &memory_path).map_err(io_err("rename into place", &memory_path))?;
    sync_dir(dir)?;
    fs::rename(dir.join(STATE_TMP), &state_path).map_err(io_err("rename into place", &state_path))?;
    sync_dir(dir)
}

pub(crate) fn create_truncated(path: &Path) -> Result<File, SnapshotError> {
    // Truncate rather than create_new: a `.partial` file left by a crashed writer is garbage.
    OpenOptions::new().write(true).create(true).truncate(true).open(path).map_err(io_err("create", path))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    // Renames are only durable once the directory itself is fsynced.
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("fsync directory", dir))
}

/// Writes `memory` to the empty `file` sparsely, hashing it on the way: the file is extended to
/// the full size (a hole), then only the runs of pages holding a non-zero byte are written.
fn write_sparse(file: &File, memory: &[u8], hasher: &mut ContentHasher) -> io::Result<()> {
    file.set_len(memory.len() as u64)?;
    let mut run_start: Option<usize> = None;
    for (index, page) in memory.chunks(PAGE_SIZE).enumerate() {
        let offset = index * PAGE_SIZE;
        match (content::is_zero(page), run_start) {
            (false, None) => run_start = Some(offset),
            (true, Some(start)) => {
                hasher.memory(start as u64, &memory[start..offset]);
                file.write_all_at(&memory[start..offset], start as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        hasher.memory(start as u64, &memory[start..]);
        file.write_all_at(&memory[start..], start as u64)?;
    }
    Ok(())
}

/// Reads and checks the state file of the image in `dir`, and decodes its payload.
///
/// `arch` is the architecture the image is to be restored on, normally [`Arch::host`]. Every
/// header field is checked before it is used and the CRC covers header and payload; at most
/// `HEADER_LEN + MAX_STATE_SIZE + 1` bytes are read whatever the file's size. The content id is
/// returned as recorded, not recomputed (that is [`verify_image`]'s job).
pub fn read_state<T: DeserializeOwned + Versioned>(dir: &Path, arch: Arch) -> Result<(StateHeader, T), SnapshotError> {
    const { check_schema::<T>() };
    let path = dir.join(STATE_FILE);
    let (bytes, file_len) = read_state_file(dir, &path)?;
    let header = check_state(&path, Some(arch), &bytes, file_len)?;
    let state = decode_payload(&path, &bytes[HEADER_LEN..])?;
    Ok((header, state))
}

/// Reads and checks the header of the image in `dir`, of any architecture, without decoding the
/// payload (the CRC is still checked, so the whole state file is read).
pub fn read_header(dir: &Path) -> Result<StateHeader, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let (bytes, file_len) = read_state_file(dir, &path)?;
    check_state(&path, None, &bytes, file_len)
}

/// Recomputes the content id of the image in `dir` from its files and compares it with the one
/// its header records: reads the state and every data page of the memory (holes are skipped).
/// Returns the id, or [`SnapshotError::ContentMismatch`].
pub fn verify_image(dir: &Path) -> Result<ContentId, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let (bytes, file_len) = read_state_file(dir, &path)?;
    let header = check_state(&path, None, &bytes, file_len)?;
    let mut memory = open_memory(dir, header.memory_size)?;
    let hasher = ContentHasher::new(header.arch, header.version, &bytes[HEADER_LEN..], header.memory_size);
    let mut buf = vec![0u8; RUN_MAX];
    let memory_path = dir.join(MEMORY_FILE);
    let computed = content::hash_memory_file(hasher, &mut memory, header.memory_size, &mut buf)
        .map_err(io_err("read", &memory_path))?;
    if computed != header.content_id {
        return Err(SnapshotError::ContentMismatch { path: dir.to_owned(), recorded: header.content_id, computed });
    }
    Ok(computed)
}

/// Reads at most one byte more than the largest valid state file; returns the bytes and the
/// file's length.
pub(crate) fn read_state_file(dir: &Path, path: &Path) -> Result<(Vec<u8>, u64), SnapshotError> {
    let mut file = open_image_file(dir, path)?;
    let file_len = file.metadata().map_err(io_err("stat", path))?.len();
    // One byte past the largest valid file, so trailing data past a maximal payload is seen.
    let limit = HEADER_LEN as u64 + MAX_STATE_SIZE + 1;
    let mut bytes = Vec::with_capacity(file_len.min(limit) as usize);
    (&mut file).take(limit).read_to_end(&mut bytes).map_err(io_err("read", path))?;
    Ok((bytes, file_len))
}

/// Decodes a checked payload as `T`, all of it.
pub(crate) fn decode_payload<T: DeserializeOwned + Versioned>(path: &Path, payload: &[u8]) -> Result<T, SnapshotError> {
    const { check_schema::<T>() };
    let (value, rest) =
        postcard::take_from_bytes(payload).map_err(|source| SnapshotError::Decode { path: path.to_owned(), source })?;
    if !rest.is_empty() {
        return Err(SnapshotError::PayloadNotConsumed { path: path.to_owned(), unused: rest.len() });
    }
    Ok(value)
}

/// Checks the state file `bytes` (the first bytes of a file of `file_len` bytes): every header
/// field, then the CRC. `arch` is the architecture required, if any.
pub(crate) fn check_state(
    path: &Path,
    arch: Option<Arch>,
    bytes: &[u8],
    file_len: u64,
) -> Result<StateHeader, SnapshotError> {
    let path = || path.to_owned();
    let Some((header, rest)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(SnapshotError::TruncatedHeader { path: path(), len: bytes.len() as u64 });
    };
    let field8 = |at: usize| -> [u8; 8] { std::array::from_fn(|i| header[at + i]) };
    let field4 = |at: usize| -> [u8; 4] { std::array::from_fn(|i| header[at + i]) };

    let magic = field8(0);
    if magic[..6] != MAGIC_PREFIX {
        return Err(SnapshotError::NotAnImage { path: path(), found: Magic(magic) });
    }
    let image = Arch::from_tag([magic[6], magic[7]])
        .ok_or_else(|| SnapshotError::UnknownArch { path: path(), found: Magic(magic) })?;
    if let Some(host) = arch.filter(|&host| host != image) {
        return Err(SnapshotError::WrongArch { path: path(), image, host });
    }
    let version = u32::from_le_bytes(field4(8));
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(SnapshotError::UnsupportedVersion { path: path(), found: version, supported: SUPPORTED_VERSIONS });
    }
    let flags = u32::from_le_bytes(field4(12));
    if flags != 0 {
        return Err(SnapshotError::UnsupportedFlags { path: path(), flags });
    }
    let len = u64::from_le_bytes(field8(16));
    if len > MAX_STATE_SIZE {
        return Err(SnapshotError::StateTooLarge { path: path(), len, max: MAX_STATE_SIZE });
    }
    let memory_size = u64::from_le_bytes(field8(24));
    if memory_size > MAX_MEMORY_SIZE {
        return Err(SnapshotError::MemoryTooLarge { path: path(), size: memory_size, max: MAX_MEMORY_SIZE });
    }
    // `len` is now at most MAX_STATE_SIZE, so it fits usize and the arithmetic cannot overflow.
    let available = rest.len() as u64;
    if len > available {
        return Err(SnapshotError::TruncatedPayload { path: path(), len, available });
    }
    if available > len {
        // `rest` may have been cut at the read limit; the file length gives the true count.
        let extra = file_len.saturating_sub(HEADER_LEN as u64 + len).max(available - len);
        return Err(SnapshotError::TrailingData { path: path(), len, extra });
    }
    let stored = u64::from_le_bytes(field8(CRC_AT));
    let computed = checksum(header, rest);
    if stored != computed {
        return Err(SnapshotError::ChecksumMismatch { path: path(), stored, computed });
    }
    let content_id = ContentId(std::array::from_fn(|i| header[32 + i]));
    Ok(StateHeader { arch: image, version, payload_len: len, memory_size, content_id })
}

/// Opens the memory file of the image in `dir` read-only, for the caller to `mmap` `MAP_PRIVATE`,
/// after checking that its size is `expected_size` (the guest RAM size the state records).
pub fn open_memory(dir: &Path, expected_size: u64) -> Result<File, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let file = open_image_file(dir, &path)?;
    let actual = file.metadata().map_err(io_err("stat", &path))?.len();
    if actual != expected_size {
        return Err(SnapshotError::MemorySizeMismatch { path, actual, expected: expected_size });
    }
    Ok(file)
}

/// Opens `path` (a file of the image in `dir`) for reading, telling a missing directory, a
/// missing file and a non-file apart.
pub(crate) fn open_image_file(dir: &Path, path: &Path) -> Result<File, SnapshotError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(SnapshotError::NotADirectory { path: dir.to_owned() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SnapshotError::MissingDirectory { path: dir.to_owned() })
        }
        Err(e) => return Err(io_err("stat", dir)(e)),
    }
    // Checked before opening too, so that a FIFO in the image cannot block the open.
    match fs::metadata(path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Err(SnapshotError::NotAFile { path: path.to_owned() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SnapshotError::MissingFile { path: path.to_owned() })
        }
        Err(e) => return Err(io_err("stat", path)(e)),
    }
    // Non-blocking, so that a FIFO swapped in after the check cannot block the open either
    // (it is refused by the check on the open file below).
    let opened = {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)
    };
    let file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SnapshotError::MissingFile { path: path.to_owned() })
        }
        Err(e) => return Err(io_err("open", path)(e)),
    };
    // And again on the open file, which is what is actually read.
    if !file.metadata().map_err(io_err("stat", path))?.is_file() {
        return Err(SnapshotError::NotAFile { path: path.to_owned() });
    }
    Ok(file)
}
