//! Packs: round trips, and every way a hostile or damaged pack is refused with nothing left
//! behind — hand-made bad packs, and every truncation and many corruptions of a real one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use mu2_snapshot::{
    pack, read_state, unpack, verify_image, write_image, Arch, ContentId, PackError, SnapshotError, Versioned,
    FORMAT_VERSION, MEMORY_FILE, PACK_HEADER_LEN, PAGE_SIZE, RUN_MAX, STATE_FILE,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Payload {
    mem_size: u64,
    name: String,
    regs: Vec<u64>,
}

impl Versioned for Payload {
    const SCHEMA: &'static str = "Payload { mem_size: u64, name: String, regs: Vec<u64> }";
    const RECORDED_VERSION: u32 = FORMAT_VERSION;
    const RECORDED_FINGERPRINT: u64 = mu2_snapshot::fingerprint(Self::SCHEMA);
}

const MAX_MEMORY: u64 = 1 << 30;

fn payload(mem_size: usize) -> Payload {
    Payload { mem_size: mem_size as u64, name: "pack".into(), regs: vec![1, 2, 3, u64::MAX] }
}

/// `size` bytes with data in a few places: a run of pages, a lone byte, the last page, and a
/// page of incompressible bytes.
fn memory(size: usize) -> Vec<u8> {
    let mut mem = vec![0u8; size];
    for (i, b) in mem[PAGE_SIZE..4 * PAGE_SIZE].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    mem[7 * PAGE_SIZE + 99] = 0x42;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in &mut mem[9 * PAGE_SIZE..10 * PAGE_SIZE] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    mem[size - 1] = 0x55;
    mem
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("mu2-pack-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// An image of `size` bytes of memory in `scratch/image`, packed into `scratch/image.pack`.
fn packed(scratch: &TempDir, size: usize) -> (PathBuf, PathBuf, ContentId) {
    let image = scratch.join("image");
    let id = write_image(&image, Arch::X86_64, &payload(size), &memory(size)).unwrap();
    let file = scratch.join("image.pack");
    let summary = pack(&image, &file).unwrap();
    assert_eq!(summary.content_id, id);
    (image, file, id)
}

fn unpack_to(file: &Path, dir: &Path) -> Result<mu2_snapshot::StateHeader, PackError> {
    unpack::<Payload>(file, dir, Arch::X86_64, MAX_MEMORY, accept)
}

fn accept(_: &mu2_snapshot::StateHeader, _: &Payload) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Ok(())
}

/// Whether `dir` holds exactly the image in `original`.
fn same_image(dir: &Path, original: &Path) -> bool {
    fs::read(dir.join(STATE_FILE)).ok() == fs::read(original.join(STATE_FILE)).ok()
        && fs::read(dir.join(MEMORY_FILE)).ok() == fs::read(original.join(MEMORY_FILE)).ok()
}

#[test]
fn an_image_survives_pack_and_unpack_sparse_and_with_its_id() {
    const SIZE: usize = 16 << 20;
    let scratch = TempDir::new("round-trip");
    let (image, file, id) = packed(&scratch, SIZE);
    let summary = pack(&image, &scratch.join("again.pack")).unwrap();
    assert_eq!(summary.memory_size, SIZE as u64);
    assert_eq!(summary.data_bytes, 6 * PAGE_SIZE as u64, "only the 6 non-zero pages are stored");
    assert_eq!(summary.pack_bytes, fs::metadata(&file).unwrap().len());
    assert!(summary.pack_bytes < 16 << 10, "{} bytes for 16 MiB of mostly holes", summary.pack_bytes);

    let out = scratch.join("out");
    let header = unpack_to(&file, &out).unwrap();
    assert_eq!(header.content_id, id);
    assert!(same_image(&out, &image));
    assert_eq!(read_state::<Payload>(&out, Arch::X86_64).unwrap().1, payload(SIZE));
    assert_eq!(verify_image(&out).unwrap(), id);
    let allocated = fs::metadata(out.join(MEMORY_FILE)).unwrap().blocks() * 512;
    assert!(allocated <= 256 << 10, "unpacked memory is sparse: {allocated} bytes allocated");
    let mut names: Vec<_> = fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, [MEMORY_FILE, STATE_FILE], "no temporaries are left");
    // No `.partial` beside the pack either.
    assert!(fs::read_dir(&scratch.0).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with("partial")));
}

#[test]
fn a_dense_copy_packs_to_the_same_image() {
    let scratch = TempDir::new("dense");
    let (image, _, id) = packed(&scratch, 1 << 20);
    let memory = fs::read(image.join(MEMORY_FILE)).unwrap();
    fs::remove_file(image.join(MEMORY_FILE)).unwrap();
    fs::write(image.join(MEMORY_FILE), &memory).unwrap();
    let dense = scratch.join("dense.pack");
    assert_eq!(pack(&image, &dense).unwrap().content_id, id);
    let out = scratch.join("out");
    unpack_to(&dense, &out).unwrap();
    assert!(same_image(&out, &image));
}

#[test]
fn packing_a_corrupt_image_is_refused() {
    let scratch = TempDir::new("corrupt-image");
    let (image, _, id) = packed(&scratch, 1 << 20);
    let memory = fs::OpenOptions::new().write(true).open(image.join(MEMORY_FILE)).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&memory, &[7], 20 * PAGE_SIZE as u64).unwrap();
    let file = scratch.join("bad.pack");
    let err = pack(&image, &file).unwrap_err();
    let PackError::Image { source: SnapshotError::ContentMismatch { recorded, .. }, .. } = err else { panic!("{err}") };
    assert_eq!(recorded, id);
    assert!(!file.exists() && !scratch.join(".bad.pack.partial").exists(), "nothing is left");
}

#[test]
fn the_destination_must_be_new_or_empty() {
    let scratch = TempDir::new("destination");
    let (image, file, _) = packed(&scratch, 1 << 20);
    let err = unpack_to(&file, &image).unwrap_err();
    assert!(matches!(err, PackError::DestinationInUse { .. }), "{err}");
    let a_file = scratch.join("a-file");
    fs::write(&a_file, b"x").unwrap();
    assert!(matches!(unpack_to(&file, &a_file).unwrap_err(), PackError::DestinationInUse { .. }));
    assert_eq!(fs::read(&a_file).unwrap(), b"x");
    let empty = scratch.join("empty");
    fs::create_dir(&empty).unwrap();
    unpack_to(&file, &empty).unwrap();
    assert!(same_image(&empty, &image));
}

#[test]
fn an_image_unpacks_only_for_its_architecture_and_within_the_memory_limit() {
    let scratch = TempDir::new("arch");
    let (_, file, _) = packed(&scratch, 1 << 20);
    let out = scratch.join("out");
    let err = unpack::<Payload>(&file, &out, Arch::Aarch64, MAX_MEMORY, accept).unwrap_err();
    assert!(matches!(err, PackError::Image { source: SnapshotError::WrongArch { .. }, .. }), "{err}");
    assert!(!out.exists());
    let err = unpack::<Payload>(&file, &out, Arch::X86_64, 1 << 19, accept).unwrap_err();
    assert!(matches!(err, PackError::MemoryTooLarge { size: 1048576, max: 524288, .. }), "{err}");
    assert!(!out.exists());
}

#[test]
fn the_callers_check_sees_the_decoded_state_and_can_refuse_it() {
    let scratch = TempDir::new("check");
    let (_, file, id) = packed(&scratch, 1 << 20);
    let out = scratch.join("out");
    let mut seen = None;
    let err = unpack::<Payload>(&file, &out, Arch::X86_64, MAX_MEMORY, |header, state| {
        seen = Some((header.content_id, state.clone()));
        Err("not this one".into())
    })
    .unwrap_err();
    assert!(matches!(err, PackError::Rejected { .. }), "{err}");
    assert_eq!(std::error::Error::source(&err).map(|e| e.to_string()).as_deref(), Some("not this one"));
    assert_eq!(seen, Some((id, payload(1 << 20))));
    assert!(!out.exists());
}

/// A pack built by hand: `header` fields, the `state` bytes, then `records` raw, all in one
/// zstd frame unless `raw_tail` adds bytes after it.
struct Forged {
    magic: [u8; 8],
    version: u32,
    flags: u32,
    state_len: u64,
    memory_size: u64,
    id: ContentId,
    body: Vec<u8>,
    raw_tail: Vec<u8>,
    window_log: u32,
}

impl Forged {
    /// A correct pack of the image in `dir`, with `records` after the state.
    fn of(dir: &Path, records: Vec<u8>) -> Forged {
        let state = fs::read(dir.join(STATE_FILE)).unwrap();
        let header = mu2_snapshot::read_header(dir).unwrap();
        let mut body = state.clone();
        body.extend_from_slice(&records);
        Forged {
            magic: mu2_snapshot::PACK_MAGIC,
            version: mu2_snapshot::PACK_VERSION,
            flags: 0,
            state_len: state.len() as u64,
            memory_size: header.memory_size,
            id: header.content_id,
            body,
            raw_tail: Vec::new(),
            window_log: 21,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.state_len.to_le_bytes());
        out.extend_from_slice(&self.memory_size.to_le_bytes());
        out.extend_from_slice(&self.id.0);
        assert_eq!(out.len(), PACK_HEADER_LEN);
        let mut encoder = zstd::stream::write::Encoder::new(out, 3).unwrap();
        encoder.include_checksum(true).unwrap();
        encoder.window_log(self.window_log).unwrap();
        encoder.write_all(&self.body).unwrap();
        let mut out = encoder.finish().unwrap();
        out.extend_from_slice(&self.raw_tail);
        out
    }
}

fn data_record(offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut r = vec![1u8];
    r.extend_from_slice(&offset.to_le_bytes());
    r.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    r.extend_from_slice(bytes);
    r
}

/// The records of `memory(size)`: its runs of non-zero pages, then the end record.
fn good_records(size: usize) -> Vec<u8> {
    let mem = memory(size);
    let mut records = data_record(PAGE_SIZE as u64, &mem[PAGE_SIZE..4 * PAGE_SIZE]);
    records.extend(data_record(7 * PAGE_SIZE as u64, &mem[7 * PAGE_SIZE..8 * PAGE_SIZE]));
    records.extend(data_record(9 * PAGE_SIZE as u64, &mem[9 * PAGE_SIZE..10 * PAGE_SIZE]));
    records.extend(data_record((size - PAGE_SIZE) as u64, &mem[size - PAGE_SIZE..]));
    records.push(0);
    records
}

/// Unpacks `bytes` into a fresh destination: the error, after checking nothing is left.
fn refused(scratch: &TempDir, bytes: &[u8]) -> PackError {
    let file = scratch.join("forged.pack");
    fs::write(&file, bytes).unwrap();
    let out = scratch.join("forged-out");
    let err = unpack_to(&file, &out).expect_err("a bad pack was accepted");
    assert!(!out.exists(), "{err}: the destination was left behind");
    err
}

#[test]
fn hand_made_bad_packs_are_refused_with_the_problem_named() {
    const SIZE: usize = 1 << 20;
    let scratch = TempDir::new("forged");
    let (image, _, _) = packed(&scratch, SIZE);
    let good = || Forged::of(&image, good_records(SIZE));
    // The forgery itself is right: unpacked, it is the image.
    let file = scratch.join("good.pack");
    fs::write(&file, good().bytes()).unwrap();
    unpack_to(&file, &scratch.join("good-out")).unwrap();
    assert!(same_image(&scratch.join("good-out"), &image));

    let err = |f: Forged| refused(&scratch, &f.bytes());
    let with = |edit: &dyn Fn(&mut Forged)| {
        let mut f = good();
        edit(&mut f);
        err(f)
    };
    let records = |r: Vec<u8>| err(Forged::of(&image, r));
    let page = PAGE_SIZE as u64;
    let one_page = vec![9u8; PAGE_SIZE];

    assert!(matches!(with(&|f| f.magic = *b"PK\x03\x04...."), PackError::NotAPack { .. }));
    assert!(matches!(with(&|f| f.version = 2), PackError::UnsupportedVersion { found: 2, .. }));
    assert!(matches!(with(&|f| f.flags = 1), PackError::UnsupportedFlags { flags: 1, .. }));
    assert!(matches!(with(&|f| f.state_len = u64::MAX), PackError::StateLength { .. }));
    assert!(matches!(with(&|f| f.state_len = 3), PackError::StateLength { .. }));
    assert!(matches!(with(&|f| f.memory_size = u64::MAX), PackError::MemoryTooLarge { .. }));
    assert!(matches!(with(&|f| f.memory_size -= page), PackError::HeaderMismatch { field: "memory size", .. }));
    assert!(matches!(with(&|f| f.id.0[0] ^= 1), PackError::HeaderMismatch { field: "content id", .. }));
    // A state length one short: the state inside fails its own checks.
    assert!(matches!(with(&|f| f.state_len -= 1), PackError::Image { .. }));

    assert!(matches!(records(vec![7]), PackError::UnknownRecord { kind: 7, .. }));
    assert!(matches!(records(vec![]), PackError::Truncated { .. }), "no end record");
    assert!(matches!(records(data_record(0, &one_page)[..5].to_vec()), PackError::Truncated { .. }));
    let bad_run = |r: Vec<u8>| match records(r) {
        PackError::BadRun { problem, .. } => problem,
        other => panic!("{other}"),
    };
    assert!(bad_run(data_record(0, &[])).contains("length"));
    let mut huge = vec![1u8];
    huge.extend_from_slice(&0u64.to_le_bytes());
    huge.extend_from_slice(&(RUN_MAX as u32 + 1).to_le_bytes());
    assert!(bad_run(huge).contains("length"), "refused before its bytes are read");
    assert!(bad_run(data_record(100, &one_page)).contains("aligned"));
    assert!(bad_run(data_record(SIZE as u64, &one_page)).contains("past"));
    assert!(bad_run(data_record(u64::MAX - page + 1, &one_page)).contains("past"), "no overflow");
    assert!(bad_run(data_record(0, &one_page[..100])).contains("whole number of pages"));
    let mut overlapping = data_record(2 * page, &one_page);
    overlapping.extend(data_record(page, &[1u8; 2 * PAGE_SIZE]));
    assert!(bad_run(overlapping).contains("overlaps"));
    let mut twice = data_record(2 * page, &one_page);
    twice.extend(data_record(2 * page, &one_page));
    assert!(bad_run(twice).contains("overlaps"), "a page stored twice");

    // Well-formed records of other contents: the id gives it away.
    let mut other = good_records(SIZE);
    other[13] ^= 1;
    assert!(matches!(records(other), PackError::ContentMismatch { .. }));
    let mut missing_page = data_record(PAGE_SIZE as u64, &memory(SIZE)[PAGE_SIZE..4 * PAGE_SIZE]);
    missing_page.push(0);
    assert!(matches!(records(missing_page), PackError::ContentMismatch { .. }));

    // Anything after the end record: inside the frame, a second frame, raw bytes.
    let mut inside = good_records(SIZE);
    inside.push(0);
    assert!(matches!(records(inside), PackError::TrailingData { .. }));
    let second_frame = good().bytes()[PACK_HEADER_LEN..].to_vec();
    assert!(matches!(with(&|f| f.raw_tail = second_frame.clone()), PackError::TrailingData { .. }));
    assert!(matches!(with(&|f| f.raw_tail = vec![0]), PackError::TrailingData { .. }));

    // A frame that asks for a 64 MiB window is refused before any is allocated.
    assert!(matches!(with(&|f| f.window_log = 26), PackError::Corrupt { .. }));
}

/// xorshift64: a fixed sequence, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn no_truncation_or_corruption_of_a_pack_is_accepted_or_leaves_anything() {
    let scratch = TempDir::new("fuzz");
    let (image, file, _) = packed(&scratch, 256 << 10);
    let good = fs::read(&file).unwrap();
    assert!(good.len() < 16 << 10, "the pack is small enough to try every truncation: {}", good.len());
    let out = scratch.join("out");
    let bad = scratch.join("bad.pack");
    let try_bytes = |bytes: &[u8]| -> bool {
        fs::write(&bad, bytes).unwrap();
        match unpack_to(&bad, &out) {
            Ok(_) => {
                // Only a change zstd ignores may pass (e.g. a larger declared window), and then
                // the image must be the original, byte for byte.
                assert!(same_image(&out, &image), "a changed pack unpacked to another image");
                fs::remove_dir_all(&out).unwrap();
                true
            }
            Err(e) => {
                assert!(!out.exists(), "{e}: the destination was left behind");
                false
            }
        }
    };
    for len in 0..good.len() {
        assert!(!try_bytes(&good[..len]), "truncated to {len} of {} bytes: accepted", good.len());
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut accepted = 0;
    for round in 0..3000 {
        let mut bytes = good.clone();
        // One to three damaged bytes; the first hundred rounds walk the header byte by byte.
        let flips = 1 + (rng.next() % 3) as usize;
        for i in 0..flips {
            let at = if round < 100 && i == 0 { round % PACK_HEADER_LEN } else { (rng.next() as usize) % bytes.len() };
            bytes[at] ^= 1u8 << (rng.next() % 8);
        }
        accepted += usize::from(try_bytes(&bytes));
    }
    assert!(accepted < 30, "{accepted} of 3000 corrupted packs unpacked (to the original image)");
    // Over-long: every number of trailing bytes up to a block's worth.
    for extra in [1usize, 2, 17, 4096] {
        let mut bytes = good.clone();
        bytes.extend(std::iter::repeat_n(0u8, extra));
        assert!(!try_bytes(&bytes), "{extra} trailing bytes accepted");
    }
}
