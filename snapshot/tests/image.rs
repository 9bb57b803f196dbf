//! Frozen-image tests: round trip, every bad-image error, sparse memory, the content id, the
//! golden image.
//!
//! Regenerate the golden image (after an intended format change and FORMAT_VERSION bump) with
//! `MU2_BLESS=1 cargo test -p mu2-snapshot --test image golden`.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use mu2_snapshot::{
    assert_schema, encode_state, fingerprint, open_memory, read_header, read_state, verify_image, write_image, Arch,
    SnapshotError, Versioned, FORMAT_VERSION, HEADER_LEN, MAX_MEMORY_SIZE, MAX_STATE_SIZE, MEMORY_FILE, PAGE_SIZE,
    STATE_FILE,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TestState {
    ram_size: u64,
    regs: [u64; 4],
    name: String,
    mode: Mode,
    devices: Vec<Device>,
    irq: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Mode {
    Real,
    Long { cr0: u64, efer: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Device {
    id: u16,
    data: Vec<u8>,
}

// The tripwire as the VMM uses it: edit a field above, and the SCHEMA with it, and this no longer
// compiles until FORMAT_VERSION is bumped and the record updated.
impl Versioned for TestState {
    const SCHEMA: &'static str = "
        TestState { ram_size: u64, regs: [u64; 4], name: String, mode: Mode, devices: Vec<Device>, irq: Option<u32> }
        Mode { Real, Long { cr0: u64, efer: u64 } }
        Device { id: u16, data: Vec<u8> }";
    const RECORDED_VERSION: u32 = 2;
    const RECORDED_FINGERPRINT: u64 = 0xe991_dc81_c13a_198c;
}
assert_schema!(TestState);

/// A different payload type, to read a `TestState` image as something it is not.
#[derive(Debug, Serialize, Deserialize)]
struct OtherState {
    a: u64,
}

impl Versioned for OtherState {
    const SCHEMA: &'static str = "OtherState { a: u64 }";
    const RECORDED_VERSION: u32 = FORMAT_VERSION;
    const RECORDED_FINGERPRINT: u64 = fingerprint(Self::SCHEMA);
}

const GOLDEN_RAM: usize = 64 << 10;

fn sample_state() -> TestState {
    TestState {
        ram_size: GOLDEN_RAM as u64,
        regs: [0, 1, 0xffff_ffff_ffff_ffff, 0x1234_5678_9abc_def0],
        name: "golden".to_owned(),
        mode: Mode::Long { cr0: 0x8000_0011, efer: 0x500 },
        devices: vec![Device { id: 1, data: vec![1, 2, 3] }, Device { id: 0x4000, data: vec![] }],
        irq: Some(300),
    }
}

/// 64 KiB with holes (pages 0, 2–7, 9–14) and data (page 1, page 8 with one byte, the last page).
fn sample_memory() -> Vec<u8> {
    let mut mem = vec![0u8; GOLDEN_RAM];
    for (i, b) in mem[PAGE_SIZE..2 * PAGE_SIZE].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    mem[8 * PAGE_SIZE + 100] = 0xaa;
    mem[GOLDEN_RAM - 1] = 0x55;
    mem
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("mu2-snapshot-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// A fresh image written with the sample state and memory.
    fn with_image(name: &str) -> TempDir {
        let dir = TempDir::new(name);
        write_image(&dir.0, Arch::X86_64, &sample_state(), &sample_memory()).unwrap();
        dir
    }

    fn state(&self) -> PathBuf {
        self.0.join(STATE_FILE)
    }

    fn read(&self) -> Result<TestState, SnapshotError> {
        read_state(&self.0, Arch::X86_64).map(|(_, state)| state)
    }

    /// Rewrites the state file through `f`.
    fn edit_state(&self, f: impl FnOnce(&mut Vec<u8>)) {
        let mut bytes = fs::read(self.state()).unwrap();
        f(&mut bytes);
        fs::write(self.state(), bytes).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A state file with the given header fields around `payload`, with a correct checksum (over the
/// header's first 64 bytes and the payload).
fn frame(magic: &[u8; 8], version: u32, flags: u32, memory_size: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&memory_size.to_le_bytes());
    out.extend_from_slice(&[0x5a; 32]);
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
    let mut digest = crc.digest();
    digest.update(&out);
    digest.update(payload);
    out.extend_from_slice(&digest.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Rewrites the checksum of a state file whose header was edited, so that a field's own check
/// is what refuses it.
fn fix_crc(bytes: &mut [u8]) {
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
    let mut digest = crc.digest();
    digest.update(&bytes[..64]);
    digest.update(&bytes[HEADER_LEN..]);
    let sum = digest.finalize();
    bytes[64..72].copy_from_slice(&sum.to_le_bytes());
}

fn set_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn set_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn round_trip() {
    let dir = TempDir::with_image("round-trip");
    assert_eq!(dir.read().unwrap(), sample_state());
    let mut file = open_memory(&dir.0, GOLDEN_RAM as u64).unwrap();
    let mut mem = Vec::new();
    file.read_to_end(&mut mem).unwrap();
    assert_eq!(mem, sample_memory());

    // Writing over an existing image replaces it and leaves no temporaries behind.
    let mut changed = sample_state();
    changed.irq = None;
    write_image(&dir.0, Arch::X86_64, &changed, &[7u8; 3 * PAGE_SIZE + 5]).unwrap();
    assert_eq!(dir.read().unwrap(), changed);
    assert_eq!(fs::read(dir.0.join(MEMORY_FILE)).unwrap(), vec![7u8; 3 * PAGE_SIZE + 5]);
    let mut names: Vec<_> = fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, [MEMORY_FILE, STATE_FILE]);
}

#[test]
fn write_creates_the_directory_and_aarch64_round_trips() {
    let parent = TempDir::new("create");
    let dir = parent.0.join("a/b");
    write_image(&dir, Arch::Aarch64, &sample_state(), &[]).unwrap();
    assert_eq!(&fs::read(dir.join(STATE_FILE)).unwrap()[..8], b"MU2IMGa8");
    assert_eq!(read_state::<TestState>(&dir, Arch::Aarch64).unwrap().1, sample_state());
    assert_eq!(open_memory(&dir, 0).unwrap().metadata().unwrap().len(), 0);
    // The header reads whatever the architecture.
    assert_eq!(read_header(&dir).unwrap().arch, Arch::Aarch64);
}

#[test]
fn missing_directory() {
    let parent = TempDir::new("missing-dir");
    let dir = parent.0.join("nope");
    let err = read_state::<TestState>(&dir, Arch::X86_64).unwrap_err();
    assert!(matches!(err, SnapshotError::MissingDirectory { ref path } if *path == dir), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = open_memory(&dir, 0).unwrap_err();
    assert!(matches!(err, SnapshotError::MissingDirectory { .. }), "{err}");
}

#[test]
fn not_a_directory() {
    let dir = TempDir::with_image("not-dir");
    let err = read_state::<TestState>(&dir.state(), Arch::X86_64).unwrap_err();
    assert!(matches!(err, SnapshotError::NotADirectory { .. }), "{err}");
}

#[test]
fn missing_state_file() {
    let dir = TempDir::with_image("missing-state");
    fs::remove_file(dir.state()).unwrap();
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::MissingFile { ref path } if *path == dir.state()), "{err}");
}

#[test]
fn state_not_a_file() {
    let dir = TempDir::with_image("state-dir");
    fs::remove_file(dir.state()).unwrap();
    fs::create_dir(dir.state()).unwrap();
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::NotAFile { .. }), "{err}");
}

#[test]
fn missing_memory_file() {
    let dir = TempDir::with_image("missing-memory");
    fs::remove_file(dir.0.join(MEMORY_FILE)).unwrap();
    let err = open_memory(&dir.0, GOLDEN_RAM as u64).unwrap_err();
    assert!(matches!(err, SnapshotError::MissingFile { ref path } if path.ends_with(MEMORY_FILE)), "{err}");
}

#[test]
fn wrong_memory_size() {
    let dir = TempDir::with_image("memory-size");
    let err = open_memory(&dir.0, 1 << 30).unwrap_err();
    assert!(matches!(err, SnapshotError::MemorySizeMismatch { actual: 65536, expected: 1073741824, .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("65536") && msg.contains("1073741824"), "{msg}");
}

#[test]
fn truncated_header() {
    let dir = TempDir::with_image("truncated-header");
    dir.edit_state(|b| b.truncate(10));
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::TruncatedHeader { len: 10, .. }), "{err}");
    dir.edit_state(|b| b.clear());
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::TruncatedHeader { len: 0, .. }), "{err}");
}

#[test]
fn wrong_magic() {
    let dir = TempDir::with_image("magic");
    dir.edit_state(|b| b[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00"));
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::NotAnImage { .. }), "{err}");
    assert!(err.to_string().contains("is not a mu2 image (magic b\"\\x7fELF\\x02\\x01\\x01\\x00\""), "{err}");
}

#[test]
fn unknown_architecture() {
    let dir = TempDir::with_image("unknown-arch");
    dir.edit_state(|b| b[..8].copy_from_slice(b"MU2IMGrv"));
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::UnknownArch { .. }), "{err}");
}

#[test]
fn other_architecture() {
    let dir = TempDir::new("other-arch");
    write_image(&dir.0, Arch::Aarch64, &sample_state(), &sample_memory()).unwrap();
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::WrongArch { image: Arch::Aarch64, host: Arch::X86_64, .. }), "{err}");
    assert!(err.to_string().ends_with("image is for aarch64, this host is x86_64"), "{err}");
}

#[test]
fn future_version() {
    let dir = TempDir::with_image("version");
    dir.edit_state(|b| set_u32(b, 8, FORMAT_VERSION + 1));
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::UnsupportedVersion { found, .. } if found == FORMAT_VERSION + 1), "{err}");
    assert!(err.to_string().contains("this build reads versions [2]"), "{err}");
    // A version-1 image (the header before memory size and content id) is refused the same way.
    dir.edit_state(|b| set_u32(b, 8, 1));
    assert!(matches!(dir.read().unwrap_err(), SnapshotError::UnsupportedVersion { found: 1, .. }));
}

#[test]
fn unknown_flags() {
    let dir = TempDir::with_image("flags");
    dir.edit_state(|b| set_u32(b, 12, 1));
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::UnsupportedFlags { flags: 1, .. }), "{err}");
}

#[test]
fn huge_memory_size() {
    let dir = TempDir::with_image("huge-memory");
    dir.edit_state(|b| {
        set_u64(b, 24, MAX_MEMORY_SIZE + 1);
        fix_crc(b);
    });
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::MemoryTooLarge { size, .. } if size == MAX_MEMORY_SIZE + 1), "{err}");
}

#[test]
fn huge_length() {
    let dir = TempDir::with_image("huge-length");
    dir.edit_state(|b| set_u64(b, 16, u64::MAX));
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::StateTooLarge { len: u64::MAX, max: MAX_STATE_SIZE, .. }), "{err}");
    dir.edit_state(|b| set_u64(b, 16, MAX_STATE_SIZE + 1));
    assert!(matches!(dir.read().unwrap_err(), SnapshotError::StateTooLarge { .. }));
}

#[test]
fn length_beyond_file() {
    let dir = TempDir::with_image("length-beyond");
    let payload_len = fs::metadata(dir.state()).unwrap().len() - HEADER_LEN as u64;
    // Within the cap but past the end of the file: refused without reading or allocating it.
    dir.edit_state(|b| set_u64(b, 16, MAX_STATE_SIZE));
    let err = dir.read().unwrap_err();
    let SnapshotError::TruncatedPayload { len, available, .. } = err else { panic!("{err}") };
    assert_eq!((len, available), (MAX_STATE_SIZE, payload_len));
}

#[test]
fn truncated_payload() {
    let dir = TempDir::with_image("truncated-payload");
    dir.edit_state(|b| {
        b.pop();
    });
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::TruncatedPayload { .. }), "{err}");
}

#[test]
fn trailing_garbage() {
    let dir = TempDir::with_image("trailing");
    dir.edit_state(|b| b.extend_from_slice(b"xyz"));
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::TrailingData { extra: 3, .. }), "{err}");
}

#[test]
fn trailing_garbage_past_the_read_cap() {
    // A file far larger than any valid state: read up to the cap only, and report the true excess.
    let dir = TempDir::with_image("trailing-big");
    let extra = MAX_STATE_SIZE + 12345;
    let file = fs::OpenOptions::new().write(true).open(dir.state()).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len + extra).unwrap();
    drop(file);
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::TrailingData { extra: e, .. } if e == extra), "{err}");
}

#[test]
fn corrupt_payload_byte() {
    let dir = TempDir::with_image("corrupt");
    dir.edit_state(|b| b[HEADER_LEN + 5] ^= 0x10);
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::ChecksumMismatch { .. }), "{err}");
    assert!(err.to_string().contains("corrupt"), "{err}");
    // A corrupted checksum field is the same error, and so are a corrupted content id and a
    // corrupted memory size: the checksum covers the header.
    for at in [64, 40, 24] {
        let dir = TempDir::with_image("corrupt-crc");
        dir.edit_state(|b| b[at] ^= 1);
        assert!(matches!(dir.read().unwrap_err(), SnapshotError::ChecksumMismatch { .. }), "byte {at}");
    }
}

#[test]
fn payload_that_does_not_decode() {
    let dir = TempDir::with_image("decode");
    // A valid frame around bytes that are not a TestState: a u64 varint that never ends.
    fs::write(dir.state(), frame(b"MU2IMGx8", FORMAT_VERSION, 0, 0, &[0xff; 3])).unwrap();
    let err = dir.read().unwrap_err();
    assert!(matches!(err, SnapshotError::Decode { .. }), "{err}");
    let source = std::error::Error::source(&err).expect("the decoder's error is chained");
    assert!(!source.to_string().is_empty());
}

#[test]
fn payload_with_bytes_left_over() {
    let dir = TempDir::with_image("left-over");
    // A TestState image read as a smaller type decodes a prefix: refused, not silently accepted.
    let err = read_state::<OtherState>(&dir.0, Arch::X86_64).unwrap_err();
    assert!(matches!(err, SnapshotError::PayloadNotConsumed { .. }), "{err}");
}

#[test]
fn no_corruption_or_truncation_panics_or_is_accepted() {
    let good = encode_state(Arch::X86_64, &sample_state(), &sample_memory()).unwrap();
    let dir = TempDir::new("exhaustive");
    for len in 0..good.len() {
        fs::write(dir.state(), &good[..len]).unwrap();
        assert!(dir.read().is_err(), "truncated to {len} bytes accepted");
    }
    for at in 0..good.len() {
        for bit in [0x01, 0x80] {
            let mut bad = good.clone();
            bad[at] ^= bit;
            fs::write(dir.state(), &bad).unwrap();
            assert!(dir.read().is_err(), "flip {bit:#x} at byte {at} accepted");
        }
    }
}

#[test]
fn encoded_state_over_the_cap_is_refused_on_write() {
    #[derive(Serialize)]
    struct Big(Vec<u8>);
    impl Versioned for Big {
        const SCHEMA: &'static str = "Big(Vec<u8>)";
        const RECORDED_VERSION: u32 = FORMAT_VERSION;
        const RECORDED_FINGERPRINT: u64 = fingerprint(Self::SCHEMA);
    }
    let dir = TempDir::new("too-big");
    let big = Big(vec![1; MAX_STATE_SIZE as usize]);
    let err = write_image(&dir.0, Arch::X86_64, &big, &[]).unwrap_err();
    assert!(matches!(err, SnapshotError::EncodedTooLarge { .. }), "{err}");
    assert!(!dir.state().exists());
}

#[test]
fn sparse_memory() {
    const SIZE: usize = 64 << 20;
    let mut mem = vec![0u8; SIZE];
    let data_pages = [0, 1, 1000, 8191, SIZE / PAGE_SIZE - 1];
    for &page in &data_pages {
        mem[page * PAGE_SIZE + 17] = page as u8 | 1;
    }
    let dir = TempDir::new("sparse");
    write_image(&dir.0, Arch::X86_64, &sample_state(), &mem).unwrap();

    let file = open_memory(&dir.0, SIZE as u64).unwrap();
    let meta = file.metadata().unwrap();
    assert_eq!(meta.len(), SIZE as u64);
    // `blocks` counts 512-byte units. Allow for filesystem allocation granularity and metadata;
    // a dense file would be 64 MiB.
    let allocated = meta.blocks() * 512;
    assert!(allocated <= (1 << 20), "{allocated} bytes allocated for {} data pages", data_pages.len());
    assert_eq!(fs::read(dir.0.join(MEMORY_FILE)).unwrap(), mem);
}

#[test]
fn sparse_memory_with_a_partial_last_page() {
    let mut mem = vec![0u8; 5 * PAGE_SIZE + 123];
    mem[5 * PAGE_SIZE + 122] = 9;
    mem[2 * PAGE_SIZE] = 1;
    mem[3 * PAGE_SIZE + 4095] = 2;
    let dir = TempDir::new("partial-page");
    write_image(&dir.0, Arch::X86_64, &sample_state(), &mem).unwrap();
    assert_eq!(fs::read(dir.0.join(MEMORY_FILE)).unwrap(), mem);
    // All zeros, not page-aligned: the file is all hole, still of full length.
    write_image(&dir.0, Arch::X86_64, &sample_state(), &vec![0u8; 3 * PAGE_SIZE + 1]).unwrap();
    assert_eq!(fs::read(dir.0.join(MEMORY_FILE)).unwrap(), vec![0u8; 3 * PAGE_SIZE + 1]);
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn blessing() -> bool {
    std::env::var_os("MU2_BLESS").is_some_and(|v| v == "1")
}

#[test]
fn golden_image_reads() {
    if blessing() {
        write_image(&golden_dir(), Arch::X86_64, &sample_state(), &sample_memory()).unwrap();
    }
    let (header, state) = read_state::<TestState>(&golden_dir(), Arch::X86_64).unwrap();
    assert_eq!(state, sample_state());
    assert_eq!(header.memory_size, GOLDEN_RAM as u64);
    assert_eq!(verify_image(&golden_dir()).unwrap(), header.content_id, "the golden id is its contents' id");
    let mut mem = Vec::new();
    open_memory(&golden_dir(), GOLDEN_RAM as u64).unwrap().read_to_end(&mut mem).unwrap();
    assert_eq!(mem, sample_memory());
}

#[test]
fn golden_image_is_what_we_write() {
    if blessing() {
        return; // golden_image_reads rewrites it.
    }
    let dir = TempDir::with_image("golden");
    let golden = fs::read(golden_dir().join(STATE_FILE)).unwrap();
    let written = fs::read(dir.state()).unwrap();
    assert_eq!(
        written, golden,
        "the state encoding changed: if intended, bump FORMAT_VERSION and regenerate with MU2_BLESS=1 \
         (see docs/image-format.md)"
    );
    assert_eq!(fs::read(dir.0.join(MEMORY_FILE)).unwrap(), fs::read(golden_dir().join(MEMORY_FILE)).unwrap());
}

#[test]
fn the_content_id_is_recorded_and_read_back() {
    let dir = TempDir::new("id");
    let written = write_image(&dir.0, Arch::X86_64, &sample_state(), &sample_memory()).unwrap();
    let (header, _) = read_state::<TestState>(&dir.0, Arch::X86_64).unwrap();
    assert_eq!(header.content_id, written);
    assert_eq!(read_header(&dir.0).unwrap(), header);
    assert_eq!(verify_image(&dir.0).unwrap(), written);
    assert!(written.to_string().starts_with("sha256:") && written.to_string().len() == 7 + 64, "{written}");
}

#[test]
fn the_content_id_depends_on_contents_not_on_holes() {
    let dir = TempDir::with_image("dense");
    let sparse_id = verify_image(&dir.0).unwrap();
    // A dense copy (every zero page written out, as `cp --sparse=never` would) has the same id.
    let memory = fs::read(dir.0.join(MEMORY_FILE)).unwrap();
    fs::remove_file(dir.0.join(MEMORY_FILE)).unwrap();
    fs::write(dir.0.join(MEMORY_FILE), &memory).unwrap();
    let allocated = fs::metadata(dir.0.join(MEMORY_FILE)).unwrap().blocks() * 512;
    assert!(allocated >= GOLDEN_RAM as u64, "the copy is dense ({allocated} bytes allocated)");
    assert_eq!(verify_image(&dir.0).unwrap(), sparse_id);

    // Any other contents give another id, and a changed byte in memory is found.
    let mut changed = sample_memory();
    changed[3 * PAGE_SIZE + 9] = 1;
    let other = TempDir::new("other-contents");
    assert_ne!(write_image(&other.0, Arch::X86_64, &sample_state(), &changed).unwrap(), sparse_id);
    let mut changed_state = sample_state();
    changed_state.irq = Some(301);
    assert_ne!(write_image(&other.0, Arch::X86_64, &changed_state, &sample_memory()).unwrap(), sparse_id);

    let memory_file = fs::OpenOptions::new().write(true).open(dir.0.join(MEMORY_FILE)).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&memory_file, &[0xee], 5 * PAGE_SIZE as u64).unwrap();
    let err = verify_image(&dir.0).unwrap_err();
    assert!(matches!(err, SnapshotError::ContentMismatch { recorded, .. } if recorded == sparse_id), "{err}");
    assert!(err.to_string().contains("corrupt"), "{err}");
}
