//! x86_64: the two entry paths, the Linux-entry boot tables, the fault stubs, and the few
//! privileged-looking instructions the runtime uses (all legal at CPL 3 with IOPL 3).
//!
//! **mu2 native entry (CPL 3)**: the VMM built page tables, GDT, TSS and an IDT whose stubs
//! report faults; `_start` only calls Rust. The VMM loads the ELF into zeroed memory, so
//! `.bss` is already zero (ELF semantics) and is not touched here: zeroing it would fault in
//! every `.bss` page, ~8 µs each on PVM.
//!
//! **Linux 64-bit boot protocol (CPL 0)**: under PVM every ring-0 instruction is emulated
//! (~1 µs each), so the ring-0 part is short hand-written assembly: enable SSE, fill in the
//! TSS descriptor and the 32 IDT gates, load GDT/IDT/TR/CR3, `iretq` to CPL 3. The page
//! tables are assembled at build time (`.data.mu2boot`), the GDT is static too; `.bss` is
//! zeroed after the switch to CPL 3, at native speed.
//!
//! **PVH (32-bit protected mode, paging off)**: how QEMU loads an ELF kernel, and how
//! Firecracker boots one that carries the PVH note (`.note.Xen`, XEN_ELFNOTE_PHYS32_ENTRY).
//! `mu2_pvh_start` turns on long mode with the same page tables and GDT, copies the command
//! line pointer and the memory map of the `hvm_start_info` (EBX) into a zero page, and joins
//! the Linux path.

#[path = "../../bootparams.rs"]
mod bootparams;

use core::arch::asm;
#[cfg(not(test))]
use core::arch::global_asm;
#[cfg(not(test))]
use mu2_abi::layout;

/// Ring-0 stack of the Linux entry path (exception handlers run on it).
const KSTACK_SIZE: usize = 16 << 10;
/// Ring-3 stack of the Linux entry path (the mu2 VMM provides its own, 1 MiB).
const USTACK_SIZE: usize = 256 << 10;

// Page-table entry bits: present, writable, user, write-through, cache-disable, accessed,
// dirty, 2 MiB page.
const PTE_TABLE: u64 = 0x27; // P | RW | US | A
const PDE_RAM: u64 = 0xe7; // P | RW | US | A | D | PS
const PDE_MMIO: u64 = 0xff; // the same plus PWT | PCD
const PTE_4K: u64 = 0x67; // P | RW | US | A | D

/// `hvm_start_info.magic`, which a PVH loader passes in EBX.
const PVH_START_INFO_MAGIC: u32 = 0x336e_c578;

/// Bit `v` set: exception `v` pushes an error code (`mu2_abi::exception_has_error_code`).
const ERROR_CODE_VECTORS: u32 = 0x0022_7d00;

#[cfg(not(test))]
global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "    mov eax, cs",
    "    test al, 3",
    "    jz 10f",
    // mu2 native: CPL 3, RSP = STACK_TOP, RSI = boot_params.
    "    xor ebp, ebp",
    "    and rsp, -16",
    "    mov rdi, rsi",
    "    xor esi, esi",
    "    call {rust_start}",
    "    ud2",
    // Linux 64-bit boot protocol: CPL 0, RSI = boot_params. SSE first: CR0.EM and TS off,
    // MP on; CR4.OSFXSR | OSXMMEXCPT.
    "mu2_linux_entry:",
    "10: mov rax, cr0",
    "    and rax, -13",
    "    or eax, 2",
    "    mov cr0, rax",
    "    mov rax, cr4",
    "    or eax, 0x600",
    "    mov cr4, rax",
    "    mov r15, rsi",
    "    lea rsp, [rip + mu2_boot_kstack + {kstack_size}]",
    // TSS: RSP0 = the ring-0 stack; I/O map base 104: the zero bitmap right behind it allows
    // every port at CPL 3 (PVM ignores an IOPL of 3 set by iretq, it honours the bitmap).
    "    mov [rip + mu2_boot_tss + 4], rsp",
    "    mov word ptr [rip + mu2_boot_tss + 102], 104",
    // 64-bit TSS descriptor at GDT 0x28: limit 104 + 8192 (TSS + bitmap), type 0x89, base
    // split across fields.
    "    lea rax, [rip + mu2_boot_tss]",
    "    mov edx, eax",
    "    and edx, 0xffffff",
    "    shl rdx, 16",
    "    mov ecx, eax",
    "    shr ecx, 24",
    "    shl rcx, 56",
    "    or rdx, rcx",
    "    movabs rcx, 0x0000890000002068",
    "    or rdx, rcx",
    "    mov [rip + mu2_boot_gdt + 0x28], rdx",
    "    shr rax, 32",
    "    mov [rip + mu2_boot_gdt + 0x30], rax",
    // 32 interrupt gates (selector 0x08, type 0x8e) to the 16-byte stubs.
    "    lea rsi, [rip + mu2_boot_stubs]",
    "    lea rdi, [rip + mu2_boot_idt]",
    "    movabs r8, 0x00008e0000080000",
    "    mov ecx, 32",
    "11: mov eax, esi",
    "    and eax, 0xffff",
    "    mov rdx, rsi",
    "    shr rdx, 16",
    "    shl rdx, 48",
    "    or rax, rdx",
    "    or rax, r8",
    "    mov [rdi], rax",
    "    mov rax, rsi",
    "    shr rax, 32",
    "    mov [rdi + 8], rax",
    "    add rsi, 16",
    "    add rdi, 16",
    "    dec ecx",
    "    jnz 11b",
    "    lgdt [rip + mu2_boot_gdtr]",
    "    lidt [rip + mu2_boot_idtr]",
    "    mov eax, 0x28",
    "    ltr ax",
    "    lea rax, [rip + mu2_boot_pml4]",
    "    mov cr3, rax",
    // To CPL 3 with IOPL 3, interrupts off, on the ring-3 stack.
    "    push 0x23",
    "    lea rax, [rip + mu2_boot_ustack + {ustack_size}]",
    "    push rax",
    "    push 0x3002",
    "    push 0x1b",
    "    lea rax, [rip + 12f]",
    "    push rax",
    "    iretq",
    // CPL 3 from here on: data segments, then zero .bss natively, then Rust.
    "12: mov eax, 0x23",
    "    mov ds, eax",
    "    mov es, eax",
    "    lea rdi, [rip + __bss_start]",
    "    lea rcx, [rip + __bss_end]",
    "    sub rcx, rdi",
    "    shr rcx, 3",
    "    xor eax, eax",
    "    rep stosq",
    "    xor ebp, ebp",
    "    mov rdi, r15",
    "    mov esi, 1",
    "    call {rust_start}",
    "    ud2",
    // Exception stubs (Linux entry only; the mu2 VMM has its own IDT). Each is 16 bytes.
    // RSP points at the CPU's frame; keep it there for the FAULT write, which the VMM
    // reads the frame from.
    ".balign 16",
    "mu2_boot_stubs:",
    ".set mu2_vector, 0",
    ".rept 32",
    ".balign 16",
    "    mov ebx, mu2_vector",
    "    jmp mu2_boot_fault_common",
    ".set mu2_vector, mu2_vector + 1",
    ".endr",
    "mu2_boot_fault_common:",
    // The printer is assembly: PVM's ring-0 emulator cannot run SSE instructions, which
    // compiled Rust uses freely. Registers only, so RSP stays at the frame.
    "    mov dx, 0x3f8",
    "    lea rsi, [rip + mu2_boot_fault_msg]",
    "20: mov al, [rsi]",
    "    inc rsi",
    "    test al, al",
    "    jz 21f",
    "    out dx, al",
    "    jmp 20b",
    // Vector in decimal (< 32: at most two digits).
    "21: mov ecx, ebx",
    "    xor r8d, r8d",
    "22: cmp ecx, 10",
    "    jb 23f",
    "    sub ecx, 10",
    "    inc r8d",
    "    jmp 22b",
    "23: test r8d, r8d",
    "    jz 24f",
    "    lea eax, [r8d + 48]",
    "    out dx, al",
    "24: lea eax, [ecx + 48]",
    "    out dx, al",
    "    lea rsi, [rip + mu2_boot_fault_at]",
    "25: mov al, [rsi]",
    "    inc rsi",
    "    test al, al",
    "    jz 26f",
    "    out dx, al",
    "    jmp 25b",
    // RIP follows the error code for the vectors that push one (bit set in the mask).
    "26: mov r9, [rsp]",
    "    mov eax, {error_code_vectors}",
    "    bt eax, ebx",
    "    jnc 27f",
    "    mov r9, [rsp + 8]",
    "27: mov ecx, 16",
    "28: rol r9, 4",
    "    mov eax, r9d",
    "    and eax, 15",
    "    cmp eax, 10",
    "    jb 29f",
    "    add eax, 39",
    "29: add eax, 48",
    "    out dx, al",
    "    dec ecx",
    "    jnz 28b",
    "    mov al, 10",
    "    out dx, al",
    "    mov rax, [rip + {sysdev}]",
    "    test rax, rax",
    "    jz 13f",
    "    mov [rax + {fault_reg}], ebx",
    "13: cli",
    "    hlt",
    "    jmp 13b",
    // Boot data: GDT (null, kernel code 0x08, kernel data 0x10, user code 0x1b, user data
    // 0x23, TSS 0x28) and the page tables mapping [0, 4 GiB) with 2 MiB pages.
    ".section .data.mu2boot, \"aw\"",
    ".balign 4096",
    "mu2_boot_pml4:",
    "    .quad mu2_boot_pdpt + {pte_table}",
    "    .fill 511, 8, 0",
    "mu2_boot_pdpt:",
    "    .quad mu2_boot_pd + {pte_table}",
    "    .quad mu2_boot_pd + 0x1000 + {pte_table}",
    "    .quad mu2_boot_pd + 0x2000 + {pte_table}",
    "    .quad mu2_boot_pd + 0x3000 + {pte_table}",
    "    .fill 508, 8, 0",
    "mu2_boot_pd:",
    // The first 2 MiB through 4 KiB pages, so that page 0 stays unmapped (null faults).
    "    .quad mu2_boot_pt + {pte_table}",
    ".set mu2_addr, 0x200000",
    ".rept 2047",
    ".if (mu2_addr >= {mmio_base}) && (mu2_addr < {mmio_end})",
    "    .quad mu2_addr + {pde_mmio}",
    ".else",
    "    .quad mu2_addr + {pde_ram}",
    ".endif",
    ".set mu2_addr, mu2_addr + 0x200000",
    ".endr",
    "mu2_boot_pt:",
    "    .quad 0",
    ".set mu2_addr, 0x1000",
    ".rept 511",
    "    .quad mu2_addr + {pte_4k}",
    ".set mu2_addr, mu2_addr + 0x1000",
    ".endr",
    "mu2_boot_fault_msg: .asciz \"guest fault: \"",
    "mu2_boot_fault_at: .asciz \" at 0x\"",
    ".balign 16",
    "mu2_boot_gdt:",
    "    .quad 0",
    "    .quad 0x00af9a000000ffff",
    "    .quad 0x00cf92000000ffff",
    "    .quad 0x00affa000000ffff",
    "    .quad 0x00cff2000000ffff",
    "    .quad 0, 0",
    "mu2_boot_gdtr:",
    "    .word 7 * 8 - 1",
    "    .quad mu2_boot_gdt",
    "mu2_boot_idtr:",
    "    .word 32 * 16 - 1",
    "    .quad mu2_boot_idt",
    ".section .mu2boot, \"aw\", @nobits",
    ".balign 4096",
    // The zero page the PVH entry builds; only the fields the runtime reads are written.
    "mu2_pvh_zero_page: .skip 4096",
    "mu2_boot_kstack: .skip {kstack_size}",
    "mu2_boot_ustack: .skip {ustack_size}",
    "mu2_boot_idt: .skip 32 * 16",
    // TSS, then an all-zero I/O permission bitmap (every port allowed) and its 0xff end
    // byte (zero too here: harmless, ports past 0xffff do not exist).
    "mu2_boot_tss: .skip 104 + 8192 + 1",
    // PVH entry: 32-bit protected mode, paging off, EBX = hvm_start_info, no stack.
    ".section .text.pvh, \"ax\"",
    ".code32",
    "mu2_pvh_start:",
    "    cmp dword ptr [ebx], {pvh_magic}",
    "    jne 49f",
    "    mov esp, offset mu2_boot_kstack + {kstack_size}",
    "    mov esi, ebx",
    "    lgdt [mu2_boot_gdtr]",
    "    mov eax, cr4",
    "    or eax, 0x20",
    "    mov cr4, eax",
    "    mov eax, offset mu2_boot_pml4",
    "    mov cr3, eax",
    "    mov ecx, 0xc0000080",
    "    rdmsr",
    "    or eax, 0x100",
    "    wrmsr",
    "    mov eax, cr0",
    "    or eax, 0x80000001",
    "    mov cr0, eax",
    // Long mode is on (compatibility mode): a far return into the 64-bit code segment.
    "    mov eax, 0x08",
    "    push eax",
    "    mov eax, offset mu2_pvh_long",
    "    push eax",
    "    retf",
    "49: hlt",
    "    jmp 49b",
    ".code64",
    "mu2_pvh_long:",
    "    mov eax, 0x10",
    "    mov ds, eax",
    "    mov es, eax",
    "    mov ss, eax",
    "    mov esi, esi",
    "    lea rdi, [rip + mu2_pvh_zero_page]",
    // cmdline_paddr (offset 24) into cmd_line_ptr (0x228) and ext_cmd_line_ptr (0xc8).
    "    mov rax, [rsi + 24]",
    "    mov [rdi + 0x228], eax",
    "    shr rax, 32",
    "    mov [rdi + 0xc8], eax",
    // The memory map (version 1 on: memmap_paddr at 40, memmap_entries at 48), at most 128
    // entries of 24 bytes, into the e820 table (0x2d0, 20-byte entries; count at 0x1e8).
    "    xor ecx, ecx",
    "    cmp dword ptr [rsi + 4], 1",
    "    jb 42f",
    "    mov ecx, [rsi + 48]",
    "    cmp ecx, 128",
    "    jbe 41f",
    "    mov ecx, 128",
    "41: mov r8, [rsi + 40]",
    "    lea r9, [rdi + 0x2d0]",
    "    mov edx, ecx",
    "43: test edx, edx",
    "    jz 42f",
    "    mov rax, [r8]",
    "    mov [r9], rax",
    "    mov rax, [r8 + 8]",
    "    mov [r9 + 8], rax",
    "    mov eax, [r8 + 16]",
    "    mov [r9 + 16], eax",
    "    add r8, 24",
    "    add r9, 20",
    "    dec edx",
    "    jmp 43b",
    "42: mov [rdi + 0x1e8], cl",
    "    mov rsi, rdi",
    "    jmp mu2_linux_entry",
    // The PVH note: where a PVH loader enters (XEN_ELFNOTE_PHYS32_ENTRY, 18).
    ".section .note.Xen, \"a\", @note",
    ".balign 4",
    "    .long 4",
    "    .long 4",
    "    .long 18",
    "    .asciz \"Xen\"",
    ".balign 4",
    "    .long mu2_pvh_start",
    ".text",
    rust_start = sym crate::rust_start,
    error_code_vectors = const ERROR_CODE_VECTORS,
    sysdev = sym crate::sysdev_addr::MU2_SYSDEV_BASE,
    fault_reg = const mu2_abi::sysdev::FAULT,
    kstack_size = const KSTACK_SIZE,
    ustack_size = const USTACK_SIZE,
    pte_table = const PTE_TABLE,
    pde_ram = const PDE_RAM,
    pte_4k = const PTE_4K,
    pde_mmio = const PDE_MMIO,
    mmio_base = const layout::MMIO_BASE,
    mmio_end = const layout::MMIO_BASE + layout::MMIO_SIZE,
    pvh_magic = const PVH_START_INFO_MAGIC,
);

/// Writes one byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port output has no memory effects; the VMM grants IOPL 3 (and the Linux path
    // sets it), so it is legal at CPL 3.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

/// Reads the time-stamp counter (allowed at CPL 3: CR4.TSD is clear).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Executes `cpuid` (a VM exit: call it at boot only). Returns (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    // SAFETY: cpuid is always available in long mode and only reads CPU information.
    // (`__cpuid_count` is safe from Rust 1.87 on; the MSRV is older.)
    #[allow(unused_unsafe)]
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) };
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Whether the CPU has `rdrand` (CPUID.1:ECX bit 30). One exit.
pub fn has_rdrand() -> bool {
    cpuid(1, 0).2 & (1 << 30) != 0
}

/// One `rdrand` value, retried a few times as Intel recommends; `None` if it keeps failing.
pub fn rdrand() -> Option<u64> {
    for _ in 0..10 {
        let value: u64;
        let ok: u8;
        // SAFETY: only called after CPUID reported rdrand; it writes a register and CF.
        unsafe { asm!("rdrand {v}", "setc {ok}", v = out(reg) value, ok = out(reg_byte) ok, options(nomem, nostack)) };
        if ok != 0 {
            return Some(value);
        }
    }
    None
}

/// Writes one byte to the console: COM1's transmit register.
#[inline(always)]
pub fn console_byte(value: u8) {
    outb(0x3f8, value);
}

/// Stops the machine without a system device: the i8042 reset line (Firecracker stops the
/// VM on it).
pub fn power_off() {
    outb(0x64, 0xfe);
}

/// The zero page at `boot_params`. Page 0 is not mapped: a zero pointer means "none".
fn zero_page(boot_params: u64) -> Option<&'static [u8; bootparams::SIZE]> {
    (boot_params >= 4096).then(|| {
        // SAFETY: both entry paths pass the address of a 4 KiB boot_params in RAM.
        unsafe { &*(boot_params as *const [u8; bootparams::SIZE]) }
    })
}

/// Address of the NUL-terminated command line, or 0 if there is none.
pub fn cmdline_addr(boot_params: u64) -> u64 {
    zero_page(boot_params).map_or(0, bootparams::cmdline_addr)
}

/// The heap: from the image's end to the end of the e820 RAM region holding the image.
pub fn heap_range(boot_params: u64, image_start: u64, image_end: u64) -> Option<(u64, u64)> {
    zero_page(boot_params).and_then(|zp| bootparams::heap_range(zp, image_start, image_end))
}

/// TSC frequency from CPUID leaf 0x15 (crystal ratio) or 0x16 (base MHz): a few exits.
pub fn counter_khz() -> Option<u64> {
    let max = cpuid(0, 0).0;
    if max >= 0x15 {
        let (den, num, crystal_hz, _) = cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal_hz != 0 {
            return Some(u64::from(crystal_hz) * u64::from(num) / u64::from(den) / 1000);
        }
    }
    if max >= 0x16 {
        let mhz = cpuid(0x16, 0).0 & 0xffff;
        if mhz != 0 {
            return Some(u64::from(mhz) * 1000);
        }
    }
    None
}

/// Reads a 32-bit device register.
///
/// # Safety
/// `addr` is a mapped MMIO register.
#[inline(always)]
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the caller guarantees a mapped register; x86 orders device accesses itself.
    unsafe { (addr as *const u32).read_volatile() }
}

/// Writes a 32-bit device register.
///
/// # Safety
/// `addr` is a mapped MMIO register.
#[inline(always)]
pub unsafe fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: as for `mmio_read32`.
    unsafe { (addr as *mut u32).write_volatile(value) }
}

/// Writes a 64-bit device register.
///
/// # Safety
/// `addr` is a mapped MMIO register.
#[inline(always)]
pub unsafe fn mmio_write64(addr: u64, value: u64) {
    // SAFETY: as for `mmio_read32`.
    unsafe { (addr as *mut u64).write_volatile(value) }
}

/// Copies `n` bytes upwards (`rep movsb`).
///
/// # Safety
/// Both ranges valid for `n` bytes; if they overlap, `dest` must not be above `src`.
pub unsafe fn copy_forward(dest: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller guarantees both ranges.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
}

/// Copies `n` bytes downwards, with the direction flag set and restored before returning.
///
/// # Safety
/// Both ranges valid for `n` bytes.
pub unsafe fn copy_backward(dest: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller guarantees both ranges; the copy starts at their last bytes.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dest.wrapping_add(n).wrapping_sub(1) => _,
             inout("rsi") src.wrapping_add(n).wrapping_sub(1) => _, options(nostack));
    }
}

/// Sets `n` bytes at `dest` to `c` (`rep stosb`).
///
/// # Safety
/// `dest` valid for `n` bytes.
pub unsafe fn fill(dest: *mut u8, c: u8, n: usize) {
    // SAFETY: the caller guarantees the range.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c,
             options(nostack, preserves_flags));
    }
}

/// Raises #UD (`ud2`) on purpose.
pub fn fault_invalid_opcode() {
    // SAFETY: raises #UD on purpose; the VMM stops the guest.
    unsafe { asm!("ud2", options(nomem, nostack)) }
}

/// Raises #GP (`hlt` at CPL 3) on purpose.
pub fn fault_privileged() {
    // SAFETY: `hlt` at CPL 3 raises #GP on purpose.
    unsafe { asm!("hlt", options(nomem, nostack)) }
}

/// Raises #DE (divide by zero) on purpose.
pub fn fault_divide() {
    // SAFETY: divides by zero on purpose (#DE); no memory is touched.
    unsafe {
        asm!("xor edx, edx", "xor ecx, ecx", "mov eax, 1", "div ecx", out("eax") _, out("ecx") _, out("edx") _, options(nomem, nostack))
    }
}

/// Writes to address 0, which is not mapped: #PF on purpose.
pub fn fault_null_write() {
    // SAFETY: writes to address 0, which is not mapped, raising #PF on purpose. In asm: a
    // null write in Rust would be undefined behaviour, not a fault.
    unsafe { asm!("mov byte ptr [{0}], 1", in(reg) 0usize, options(nostack)) }
}

/// Spins forever at CPL 3 (`hlt` would fault there): where a stop request went unanswered.
pub fn spin_forever() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_code_mask_matches_the_abi() {
        for v in 0..32 {
            assert_eq!(super::ERROR_CODE_VECTORS & (1 << v) != 0, mu2_abi::exception_has_error_code(v), "vector {v}");
        }
    }
}
