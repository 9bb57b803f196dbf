//! CPU exceptions raised on purpose, for functions that show how the VMM reports a crashed
//! guest (the `crash` example).

/// Raises an invalid-instruction exception (x86_64 `ud2`, aarch64 `udf`).
pub fn invalid_opcode() {
    crate::arch::fault_invalid_opcode();
}

/// Raises a privilege fault (x86_64: `hlt` at CPL 3, #GP; aarch64: `brk`).
pub fn privileged() {
    crate::arch::fault_privileged();
}

/// Raises a divide error (x86_64: #DE; aarch64, whose division does not trap: `svc`).
pub fn divide() {
    crate::arch::fault_divide();
}

/// Writes to address 0, which is unmapped: a page fault (x86_64) or data abort (aarch64).
pub fn null_write() {
    crate::arch::fault_null_write();
}
