//! The CPU features a guest observes through CPUID, as an image records them: the feature
//! words of leaves 1, 7 and 0x8000_0001 and the XSAVE state components of leaf 0xd. A guest may
//! use any of them, so an image loads only on a host whose KVM supports every one. Templates
//! narrow what a booted guest is shown, so that its image loads on more hosts.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use serde::{Deserialize, Serialize};

use super::ArchError;
use crate::cpu::CpuTemplate;

/// The CPU features of a guest (or of a host), one CPUID register per word, with the bits that
/// are not capabilities cleared (see [`NOT_FEATURES`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    /// CPUID.1:ECX.
    pub leaf1_ecx: u32,
    /// CPUID.1:EDX.
    pub leaf1_edx: u32,
    /// CPUID.(EAX=7,ECX=0):EBX.
    pub leaf7_ebx: u32,
    /// CPUID.(EAX=7,ECX=0):ECX.
    pub leaf7_ecx: u32,
    /// CPUID.(EAX=7,ECX=0):EDX.
    pub leaf7_edx: u32,
    /// CPUID.8000_0001h:ECX.
    pub ext1_ecx: u32,
    /// CPUID.8000_0001h:EDX, without the bits that repeat leaf 1's.
    pub ext1_edx: u32,
    /// CPUID.(EAX=0xD,ECX=1):EAX: XSAVEOPT, XSAVEC, XGETBV1, XSAVES, XFD.
    pub xsave_ops: u32,
    /// CPUID.(EAX=0xD,ECX=0):EDX:EAX: the state components XCR0 may enable.
    pub xsave_components: u64,
}

/// The feature words, in [`CpuFeatures`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Word {
    Leaf1Ecx,
    Leaf1Edx,
    Leaf7Ebx,
    Leaf7Ecx,
    Leaf7Edx,
    Ext1Ecx,
    Ext1Edx,
    XsaveOps,
    XsaveComponents,
}

const WORDS: [Word; 9] = [
    Word::Leaf1Ecx,
    Word::Leaf1Edx,
    Word::Leaf7Ebx,
    Word::Leaf7Ecx,
    Word::Leaf7Edx,
    Word::Ext1Ecx,
    Word::Ext1Edx,
    Word::XsaveOps,
    Word::XsaveComponents,
];

impl Word {
    /// CPUID leaf and subleaf, and for error texts the register.
    fn place(self) -> (u32, u32, &'static str) {
        match self {
            Word::Leaf1Ecx => (1, 0, "ecx"),
            Word::Leaf1Edx => (1, 0, "edx"),
            Word::Leaf7Ebx => (7, 0, "ebx"),
            Word::Leaf7Ecx => (7, 0, "ecx"),
            Word::Leaf7Edx => (7, 0, "edx"),
            Word::Ext1Ecx => (0x8000_0001, 0, "ecx"),
            Word::Ext1Edx => (0x8000_0001, 0, "edx"),
            Word::XsaveOps => (0xd, 1, "eax"),
            Word::XsaveComponents => (0xd, 0, "edx:eax"),
        }
    }

    /// The bits of this word that are not capabilities: state KVM updates at run time
    /// (OSXSAVE, OSPKE, APIC follow CR4 and the APIC base MSR), the hypervisor bit mu2 sets on
    /// every host, and the bits of 8000_0001h:EDX that only repeat leaf 1's on AMD.
    fn not_features(self) -> u64 {
        match self {
            Word::Leaf1Ecx => 1 << 27 | 1 << 31,
            Word::Leaf1Edx => 1 << 9,
            Word::Leaf7Ecx => 1 << 4,
            Word::Ext1Edx => 0x0183_f3ff,
            _ => 0,
        }
    }

    /// What the baseline template keeps (x86-64-v2 and the architectural basics every 64-bit
    /// CPU has); everything else is cleared.
    fn baseline(self) -> u64 {
        match self {
            // FPU..APIC, SEP, MTRR, PGE, MCA, CMOV, PAT, PSE36, CLFLUSH, MMX, FXSR, SSE, SSE2, HTT.
            Word::Leaf1Edx => 0x178b_fbff,
            // SSE3, SSSE3, CMPXCHG16B, SSE4.1, SSE4.2, POPCNT, and the hypervisor bit.
            Word::Leaf1Ecx => 1 | 1 << 9 | 1 << 13 | 1 << 19 | 1 << 20 | 1 << 23 | 1 << 31,
            // LAHF/SAHF in 64-bit mode.
            Word::Ext1Ecx => 1,
            // SYSCALL, NX, LM, and leaf 1's repeated bits as the baseline keeps them.
            Word::Ext1Edx => 0x0183_f3ff & 0x178b_fbff | 1 << 11 | 1 << 20 | 1 << 29,
            Word::Leaf7Ebx | Word::Leaf7Ecx | Word::Leaf7Edx | Word::XsaveOps | Word::XsaveComponents => 0,
        }
    }
}

/// Feature names (Linux's /proc/cpuinfo spellings where there is one), by word and bit.
const NAMES: &[(Word, u8, &str)] = &[
    (Word::Leaf1Ecx, 0, "sse3"),
    (Word::Leaf1Ecx, 1, "pclmulqdq"),
    (Word::Leaf1Ecx, 2, "dtes64"),
    (Word::Leaf1Ecx, 3, "monitor"),
    (Word::Leaf1Ecx, 4, "ds_cpl"),
    (Word::Leaf1Ecx, 5, "vmx"),
    (Word::Leaf1Ecx, 6, "smx"),
    (Word::Leaf1Ecx, 7, "est"),
    (Word::Leaf1Ecx, 8, "tm2"),
    (Word::Leaf1Ecx, 9, "ssse3"),
    (Word::Leaf1Ecx, 10, "cid"),
    (Word::Leaf1Ecx, 11, "sdbg"),
    (Word::Leaf1Ecx, 12, "fma"),
    (Word::Leaf1Ecx, 13, "cx16"),
    (Word::Leaf1Ecx, 14, "xtpr"),
    (Word::Leaf1Ecx, 15, "pdcm"),
    (Word::Leaf1Ecx, 17, "pcid"),
    (Word::Leaf1Ecx, 18, "dca"),
    (Word::Leaf1Ecx, 19, "sse4_1"),
    (Word::Leaf1Ecx, 20, "sse4_2"),
    (Word::Leaf1Ecx, 21, "x2apic"),
    (Word::Leaf1Ecx, 22, "movbe"),
    (Word::Leaf1Ecx, 23, "popcnt"),
    (Word::Leaf1Ecx, 24, "tsc_deadline_timer"),
    (Word::Leaf1Ecx, 25, "aes"),
    (Word::Leaf1Ecx, 26, "xsave"),
    (Word::Leaf1Ecx, 28, "avx"),
    (Word::Leaf1Ecx, 29, "f16c"),
    (Word::Leaf1Ecx, 30, "rdrand"),
    (Word::Leaf1Edx, 0, "fpu"),
    (Word::Leaf1Edx, 1, "vme"),
    (Word::Leaf1Edx, 2, "de"),
    (Word::Leaf1Edx, 3, "pse"),
    (Word::Leaf1Edx, 4, "tsc"),
    (Word::Leaf1Edx, 5, "msr"),
    (Word::Leaf1Edx, 6, "pae"),
    (Word::Leaf1Edx, 7, "mce"),
    (Word::Leaf1Edx, 8, "cx8"),
    (Word::Leaf1Edx, 11, "sep"),
    (Word::Leaf1Edx, 12, "mtrr"),
    (Word::Leaf1Edx, 13, "pge"),
    (Word::Leaf1Edx, 14, "mca"),
    (Word::Leaf1Edx, 15, "cmov"),
    (Word::Leaf1Edx, 16, "pat"),
    (Word::Leaf1Edx, 17, "pse36"),
    (Word::Leaf1Edx, 18, "pn"),
    (Word::Leaf1Edx, 19, "clflush"),
    (Word::Leaf1Edx, 21, "dts"),
    (Word::Leaf1Edx, 22, "acpi"),
    (Word::Leaf1Edx, 23, "mmx"),
    (Word::Leaf1Edx, 24, "fxsr"),
    (Word::Leaf1Edx, 25, "sse"),
    (Word::Leaf1Edx, 26, "sse2"),
    (Word::Leaf1Edx, 27, "ss"),
    (Word::Leaf1Edx, 28, "ht"),
    (Word::Leaf1Edx, 29, "tm"),
    (Word::Leaf1Edx, 31, "pbe"),
    (Word::Leaf7Ebx, 0, "fsgsbase"),
    (Word::Leaf7Ebx, 1, "tsc_adjust"),
    (Word::Leaf7Ebx, 2, "sgx"),
    (Word::Leaf7Ebx, 3, "bmi1"),
    (Word::Leaf7Ebx, 4, "hle"),
    (Word::Leaf7Ebx, 5, "avx2"),
    (Word::Leaf7Ebx, 6, "fdp_excptn_only"),
    (Word::Leaf7Ebx, 7, "smep"),
    (Word::Leaf7Ebx, 8, "bmi2"),
    (Word::Leaf7Ebx, 9, "erms"),
    (Word::Leaf7Ebx, 10, "invpcid"),
    (Word::Leaf7Ebx, 11, "rtm"),
    (Word::Leaf7Ebx, 12, "cqm"),
    (Word::Leaf7Ebx, 13, "zero_fcs_fds"),
    (Word::Leaf7Ebx, 14, "mpx"),
    (Word::Leaf7Ebx, 15, "rdt_a"),
    (Word::Leaf7Ebx, 16, "avx512f"),
    (Word::Leaf7Ebx, 17, "avx512dq"),
    (Word::Leaf7Ebx, 18, "rdseed"),
    (Word::Leaf7Ebx, 19, "adx"),
    (Word::Leaf7Ebx, 20, "smap"),
    (Word::Leaf7Ebx, 21, "avx512ifma"),
    (Word::Leaf7Ebx, 23, "clflushopt"),
    (Word::Leaf7Ebx, 24, "clwb"),
    (Word::Leaf7Ebx, 25, "intel_pt"),
    (Word::Leaf7Ebx, 26, "avx512pf"),
    (Word::Leaf7Ebx, 27, "avx512er"),
    (Word::Leaf7Ebx, 28, "avx512cd"),
    (Word::Leaf7Ebx, 29, "sha_ni"),
    (Word::Leaf7Ebx, 30, "avx512bw"),
    (Word::Leaf7Ebx, 31, "avx512vl"),
    (Word::Leaf7Ecx, 0, "prefetchwt1"),
    (Word::Leaf7Ecx, 1, "avx512vbmi"),
    (Word::Leaf7Ecx, 2, "umip"),
    (Word::Leaf7Ecx, 3, "pku"),
    (Word::Leaf7Ecx, 5, "waitpkg"),
    (Word::Leaf7Ecx, 6, "avx512_vbmi2"),
    (Word::Leaf7Ecx, 7, "shstk"),
    (Word::Leaf7Ecx, 8, "gfni"),
    (Word::Leaf7Ecx, 9, "vaes"),
    (Word::Leaf7Ecx, 10, "vpclmulqdq"),
    (Word::Leaf7Ecx, 11, "avx512_vnni"),
    (Word::Leaf7Ecx, 12, "avx512_bitalg"),
    (Word::Leaf7Ecx, 13, "tme"),
    (Word::Leaf7Ecx, 14, "avx512_vpopcntdq"),
    (Word::Leaf7Ecx, 16, "la57"),
    (Word::Leaf7Ecx, 22, "rdpid"),
    (Word::Leaf7Ecx, 23, "keylocker"),
    (Word::Leaf7Ecx, 24, "bus_lock_detect"),
    (Word::Leaf7Ecx, 25, "cldemote"),
    (Word::Leaf7Ecx, 27, "movdiri"),
    (Word::Leaf7Ecx, 28, "movdir64b"),
    (Word::Leaf7Ecx, 29, "enqcmd"),
    (Word::Leaf7Ecx, 30, "sgx_lc"),
    (Word::Leaf7Ecx, 31, "pks"),
    (Word::Leaf7Edx, 2, "avx512_4vnniw"),
    (Word::Leaf7Edx, 3, "avx512_4fmaps"),
    (Word::Leaf7Edx, 4, "fsrm"),
    (Word::Leaf7Edx, 5, "uintr"),
    (Word::Leaf7Edx, 8, "avx512_vp2intersect"),
    (Word::Leaf7Edx, 9, "srbds_ctrl"),
    (Word::Leaf7Edx, 10, "md_clear"),
    (Word::Leaf7Edx, 11, "rtm_always_abort"),
    (Word::Leaf7Edx, 13, "tsx_force_abort"),
    (Word::Leaf7Edx, 14, "serialize"),
    (Word::Leaf7Edx, 15, "hybrid_cpu"),
    (Word::Leaf7Edx, 16, "tsxldtrk"),
    (Word::Leaf7Edx, 18, "pconfig"),
    (Word::Leaf7Edx, 19, "arch_lbr"),
    (Word::Leaf7Edx, 20, "ibt"),
    (Word::Leaf7Edx, 22, "amx_bf16"),
    (Word::Leaf7Edx, 23, "avx512_fp16"),
    (Word::Leaf7Edx, 24, "amx_tile"),
    (Word::Leaf7Edx, 25, "amx_int8"),
    (Word::Leaf7Edx, 26, "spec_ctrl"),
    (Word::Leaf7Edx, 27, "intel_stibp"),
    (Word::Leaf7Edx, 28, "flush_l1d"),
    (Word::Leaf7Edx, 29, "arch_capabilities"),
    (Word::Leaf7Edx, 30, "core_capabilities"),
    (Word::Leaf7Edx, 31, "spec_ctrl_ssbd"),
    (Word::Ext1Ecx, 0, "lahf_lm"),
    (Word::Ext1Ecx, 1, "cmp_legacy"),
    (Word::Ext1Ecx, 2, "svm"),
    (Word::Ext1Ecx, 3, "extapic"),
    (Word::Ext1Ecx, 4, "cr8_legacy"),
    (Word::Ext1Ecx, 5, "abm"),
    (Word::Ext1Ecx, 6, "sse4a"),
    (Word::Ext1Ecx, 7, "misalignsse"),
    (Word::Ext1Ecx, 8, "3dnowprefetch"),
    (Word::Ext1Ecx, 9, "osvw"),
    (Word::Ext1Ecx, 10, "ibs"),
    (Word::Ext1Ecx, 11, "xop"),
    (Word::Ext1Ecx, 12, "skinit"),
    (Word::Ext1Ecx, 13, "wdt"),
    (Word::Ext1Ecx, 15, "lwp"),
    (Word::Ext1Ecx, 16, "fma4"),
    (Word::Ext1Ecx, 17, "tce"),
    (Word::Ext1Ecx, 19, "nodeid_msr"),
    (Word::Ext1Ecx, 21, "tbm"),
    (Word::Ext1Ecx, 22, "topoext"),
    (Word::Ext1Ecx, 23, "perfctr_core"),
    (Word::Ext1Ecx, 24, "perfctr_nb"),
    (Word::Ext1Ecx, 26, "bpext"),
    (Word::Ext1Ecx, 27, "ptsc"),
    (Word::Ext1Ecx, 28, "perfctr_llc"),
    (Word::Ext1Ecx, 29, "mwaitx"),
    (Word::Ext1Edx, 11, "syscall"),
    (Word::Ext1Edx, 19, "mp"),
    (Word::Ext1Edx, 20, "nx"),
    (Word::Ext1Edx, 22, "mmxext"),
    (Word::Ext1Edx, 25, "fxsr_opt"),
    (Word::Ext1Edx, 26, "pdpe1gb"),
    (Word::Ext1Edx, 27, "rdtscp"),
    (Word::Ext1Edx, 29, "lm"),
    (Word::Ext1Edx, 30, "3dnowext"),
    (Word::Ext1Edx, 31, "3dnow"),
    (Word::XsaveOps, 0, "xsaveopt"),
    (Word::XsaveOps, 1, "xsavec"),
    (Word::XsaveOps, 2, "xgetbv1"),
    (Word::XsaveOps, 3, "xsaves"),
    (Word::XsaveOps, 4, "xfd"),
    (Word::XsaveComponents, 0, "xsave.x87"),
    (Word::XsaveComponents, 1, "xsave.sse"),
    (Word::XsaveComponents, 2, "xsave.avx"),
    (Word::XsaveComponents, 3, "xsave.mpx_bndregs"),
    (Word::XsaveComponents, 4, "xsave.mpx_bndcsr"),
    (Word::XsaveComponents, 5, "xsave.avx512_opmask"),
    (Word::XsaveComponents, 6, "xsave.avx512_zmm_hi256"),
    (Word::XsaveComponents, 7, "xsave.avx512_hi16_zmm"),
    (Word::XsaveComponents, 8, "xsave.pt"),
    (Word::XsaveComponents, 9, "xsave.pkru"),
    (Word::XsaveComponents, 10, "xsave.pasid"),
    (Word::XsaveComponents, 11, "xsave.cet_u"),
    (Word::XsaveComponents, 12, "xsave.cet_s"),
    (Word::XsaveComponents, 13, "xsave.hdc"),
    (Word::XsaveComponents, 14, "xsave.uintr"),
    (Word::XsaveComponents, 15, "xsave.lbr"),
    (Word::XsaveComponents, 16, "xsave.hwp"),
    (Word::XsaveComponents, 17, "xsave.amx_tilecfg"),
    (Word::XsaveComponents, 18, "xsave.amx_tiledata"),
    (Word::XsaveComponents, 19, "xsave.apx"),
];

/// The name of bit `bit` of `word`; bits without a name are named by where they are.
fn name(word: Word, bit: u8) -> String {
    match NAMES.iter().find(|(w, b, _)| *w == word && *b == bit) {
        Some((_, _, name)) => (*name).to_string(),
        None => {
            let (leaf, subleaf, register) = word.place();
            format!("cpuid.{leaf:#x}.{subleaf}.{register}[{bit}]")
        }
    }
}

fn find(cpuid: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid.iter().find(|e| e.function == function && e.index == index)
}

impl CpuFeatures {
    /// The features a CPUID table shows (a guest's, or what KVM supports on a host).
    pub fn of(cpuid: &[kvm_cpuid_entry2]) -> CpuFeatures {
        let word = |word: Word| -> u64 {
            let (leaf, subleaf, _) = word.place();
            let Some(e) = find(cpuid, leaf, subleaf) else { return 0 };
            let raw = match word {
                Word::Leaf1Ecx | Word::Leaf7Ecx | Word::Ext1Ecx => u64::from(e.ecx),
                Word::Leaf1Edx | Word::Leaf7Edx | Word::Ext1Edx => u64::from(e.edx),
                Word::Leaf7Ebx => u64::from(e.ebx),
                Word::XsaveOps => u64::from(e.eax),
                Word::XsaveComponents => u64::from(e.eax) | u64::from(e.edx) << 32,
            };
            raw & !word.not_features()
        };
        // Leaf 7 and 0x8000_0001 exist only up to the maximum leaves leaf 0 and 0x8000_0000
        // report; past them the CPU answers with another leaf's values, not these features.
        let max_basic = find(cpuid, 0, 0).map_or(0, |e| e.eax);
        let max_ext = find(cpuid, 0x8000_0000, 0).map_or(0, |e| e.eax);
        let basic = |leaf: u32, w: Word| if max_basic >= leaf { word(w) } else { 0 };
        CpuFeatures {
            leaf1_ecx: basic(1, Word::Leaf1Ecx) as u32,
            leaf1_edx: basic(1, Word::Leaf1Edx) as u32,
            leaf7_ebx: basic(7, Word::Leaf7Ebx) as u32,
            leaf7_ecx: basic(7, Word::Leaf7Ecx) as u32,
            leaf7_edx: basic(7, Word::Leaf7Edx) as u32,
            ext1_ecx: if max_ext >= 0x8000_0001 { word(Word::Ext1Ecx) as u32 } else { 0 },
            ext1_edx: if max_ext >= 0x8000_0001 { word(Word::Ext1Edx) as u32 } else { 0 },
            xsave_ops: basic(0xd, Word::XsaveOps) as u32,
            xsave_components: basic(0xd, Word::XsaveComponents),
        }
    }

    fn word(&self, word: Word) -> u64 {
        match word {
            Word::Leaf1Ecx => self.leaf1_ecx.into(),
            Word::Leaf1Edx => self.leaf1_edx.into(),
            Word::Leaf7Ebx => self.leaf7_ebx.into(),
            Word::Leaf7Ecx => self.leaf7_ecx.into(),
            Word::Leaf7Edx => self.leaf7_edx.into(),
            Word::Ext1Ecx => self.ext1_ecx.into(),
            Word::Ext1Edx => self.ext1_edx.into(),
            Word::XsaveOps => self.xsave_ops.into(),
            Word::XsaveComponents => self.xsave_components,
        }
    }

    /// The names of the features in `bits(word)`, in word and bit order.
    fn names_where(&self, bits: impl Fn(Word) -> u64) -> Vec<String> {
        let mut names = Vec::new();
        for word in WORDS {
            let set = bits(word);
            for bit in 0..64u8 {
                if set & (1 << bit) != 0 {
                    names.push(name(word, bit));
                }
            }
        }
        names
    }

    /// Every feature, by name.
    pub fn names(&self) -> Vec<String> {
        self.names_where(|w| self.word(w))
    }

    /// The features these need that `host` lacks, by name (empty: `host` can run them).
    pub fn missing_on(&self, host: &CpuFeatures) -> Vec<String> {
        self.names_where(|w| self.word(w) & !host.word(w))
    }

    /// The features outside what `template` shows a guest (empty for `Host`): on hosts whose
    /// hypervisor shows guests the hardware's features whatever the VMM sets, a template cannot
    /// hide those.
    pub fn beyond(&self, template: CpuTemplate) -> Vec<String> {
        match template {
            CpuTemplate::Host => Vec::new(),
            CpuTemplate::Baseline => self.names_where(|w| self.word(w) & !w.baseline()),
        }
    }

    /// These features without the named ones; for tests that pretend a host lacks them.
    pub fn without(&self, names: &[&str]) -> Result<CpuFeatures, ArchError> {
        let mut features = *self;
        for &wanted in names {
            let (word, bit) = lookup(wanted)?;
            let clear = !(1u64 << bit);
            match word {
                Word::Leaf1Ecx => features.leaf1_ecx &= clear as u32,
                Word::Leaf1Edx => features.leaf1_edx &= clear as u32,
                Word::Leaf7Ebx => features.leaf7_ebx &= clear as u32,
                Word::Leaf7Ecx => features.leaf7_ecx &= clear as u32,
                Word::Leaf7Edx => features.leaf7_edx &= clear as u32,
                Word::Ext1Ecx => features.ext1_ecx &= clear as u32,
                Word::Ext1Edx => features.ext1_edx &= clear as u32,
                Word::XsaveOps => features.xsave_ops &= clear as u32,
                Word::XsaveComponents => features.xsave_components &= clear,
            }
        }
        Ok(features)
    }
}

/// The word and bit of a named feature.
fn lookup(wanted: &str) -> Result<(Word, u8), ArchError> {
    NAMES
        .iter()
        .find(|(_, _, name)| *name == wanted)
        .map(|&(word, bit, _)| (word, bit))
        .ok_or_else(|| ArchError::UnknownFeature(wanted.to_string()))
}

/// Narrows a guest's CPUID table to `template` (before it is given to a vCPU at boot).
pub fn apply_template(cpuid: &mut CpuId, template: CpuTemplate) -> Result<(), ArchError> {
    if template == CpuTemplate::Host {
        return Ok(());
    }
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ecx &= Word::Leaf1Ecx.baseline() as u32;
                entry.edx &= Word::Leaf1Edx.baseline() as u32;
            }
            // Structured extended features (every subleaf, and the subleaf count) and XSAVE's
            // leaf: none is in the baseline.
            7 | 0xd => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0x8000_0001 => {
                entry.ecx &= Word::Ext1Ecx.baseline() as u32;
                entry.edx &= Word::Ext1Edx.baseline() as u32;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks, as untrusted input, the features an image records against the CPUID tables its
/// vCPUs were saved with: the record must be what vCPU 0's table shows, and every vCPU must
/// show the same. (The template is what was asked for; the record is what the guest saw, which
/// may be more where the hypervisor adds features, see [`CpuFeatures::beyond`].)
pub fn check_recorded(
    recorded: &CpuFeatures,
    _template: CpuTemplate,
    vcpus: &[super::VcpuState],
) -> Result<(), ArchError> {
    match vcpus.iter().find(|vcpu| CpuFeatures::of(&vcpu.cpuid) != *recorded) {
        Some(vcpu) => Err(ArchError::BadState(format!(
            "the recorded CPU features are not those of vCPU {}'s CPUID table",
            vcpu.index
        ))),
        None => Ok(()),
    }
}

/// Clears the named features from a CPUID table; for tests that pretend a host lacks them.
#[cfg(any(test, feature = "inspect"))]
pub fn remove_features(cpuid: &mut CpuId, names: &[&str]) -> Result<(), ArchError> {
    for &wanted in names {
        let (word, bit) = lookup(wanted)?;
        let (leaf, subleaf, _) = word.place();
        for entry in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == leaf && e.index == subleaf) {
            let mask = !(1u64 << bit);
            match word {
                Word::Leaf1Ecx | Word::Leaf7Ecx | Word::Ext1Ecx => entry.ecx &= mask as u32,
                Word::Leaf1Edx | Word::Leaf7Edx | Word::Ext1Edx => entry.edx &= mask as u32,
                Word::Leaf7Ebx => entry.ebx &= mask as u32,
                Word::XsaveOps => entry.eax &= mask as u32,
                Word::XsaveComponents if bit < 32 => entry.eax &= mask as u32,
                Word::XsaveComponents => entry.edx &= (mask >> 32) as u32,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let [eax, ebx, ecx, edx] = regs;
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    /// A host with AVX2, BMI2, AVX state and the usual basics.
    fn host_table() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, [0xd, 0, 0, 0]),
            entry(1, 0, [0, 0, 0x80982201 | 1 << 28 | 1 << 26 | 1 << 27 | 1 << 30, 0x178b_fbff]),
            entry(7, 0, [0, 1 << 5 | 1 << 8 | 1 << 3, 0, 0]),
            entry(0xd, 0, [0x7, 0, 0, 0]),
            entry(0xd, 1, [0x1, 0, 0, 0]),
            entry(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, 1 | 1 << 5, 1 << 11 | 1 << 20 | 1 << 29 | 1 << 27]),
        ]
    }

    #[test]
    fn features_are_named_and_dynamic_bits_left_out() {
        let features = CpuFeatures::of(&host_table());
        let names = features.names();
        for expected in ["sse4_2", "popcnt", "avx", "avx2", "bmi2", "rdtscp", "lm", "xsave.avx", "xsaveopt"] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
        }
        for absent in ["osxsave", "hypervisor", "apic"] {
            assert!(!names.iter().any(|n| n.contains(absent)), "{absent} is not a capability: {names:?}");
        }
    }

    #[test]
    fn missing_features_are_named() {
        let image = CpuFeatures::of(&host_table());
        let mut host = host_table();
        host[2].ebx &= !(1 << 5 | 1 << 8);
        assert_eq!(image.missing_on(&CpuFeatures::of(&host)), ["avx2", "bmi2"]);
        assert!(image.missing_on(&image).is_empty());
        assert!(CpuFeatures::default().missing_on(&image).is_empty());
    }

    #[test]
    fn an_unnamed_bit_is_named_by_its_place() {
        assert_eq!(name(Word::Leaf7Ebx, 22), "cpuid.0x7.0.ebx[22]");
    }

    #[test]
    fn leaves_past_the_maximum_do_not_count() {
        let mut table = host_table();
        table[0].eax = 1;
        let features = CpuFeatures::of(&table);
        assert_eq!((features.leaf7_ebx, features.xsave_components), (0, 0));
    }

    #[test]
    fn the_baseline_keeps_x86_64_v2_and_drops_avx() {
        let mut cpuid = CpuId::from_entries(&host_table()).unwrap();
        apply_template(&mut cpuid, CpuTemplate::Baseline).unwrap();
        let features = CpuFeatures::of(cpuid.as_slice());
        let names = features.names();
        for kept in ["sse3", "ssse3", "cx16", "sse4_1", "sse4_2", "popcnt", "cmov", "sse2", "lahf_lm", "lm", "nx"] {
            assert!(names.iter().any(|n| n == kept), "{kept} dropped: {names:?}");
        }
        for dropped in ["avx", "avx2", "bmi1", "bmi2", "xsave", "rdrand", "abm", "rdtscp", "xsave.avx"] {
            assert!(!names.iter().any(|n| n == dropped), "{dropped} kept: {names:?}");
        }
        assert!(features.beyond(CpuTemplate::Baseline).is_empty());
        assert!(!CpuFeatures::of(&host_table()).beyond(CpuTemplate::Baseline).is_empty());
    }

    #[test]
    fn features_are_removed_by_name() {
        let mut cpuid = CpuId::from_entries(&host_table()).unwrap();
        remove_features(&mut cpuid, &["avx2", "xsave.avx", "lm"]).unwrap();
        let host = CpuFeatures::of(&host_table());
        let missing = host.missing_on(&CpuFeatures::of(cpuid.as_slice()));
        assert_eq!(missing, ["avx2", "lm", "xsave.avx"]);
        assert_eq!(host.missing_on(&host.without(&["avx2", "lm", "xsave.avx"]).unwrap()), missing);
        assert!(matches!(remove_features(&mut cpuid, &["warp_drive"]), Err(ArchError::UnknownFeature(_))));
        assert!(matches!(host.without(&["warp_drive"]), Err(ArchError::UnknownFeature(_))));
    }
}
