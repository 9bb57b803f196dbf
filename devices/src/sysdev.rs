//! The mu2 system device: the guest's channel to the VMM outside virtio.
//!
//! It decodes register accesses (see `mu2_abi::sysdev`) into [`SysdevRequest`]s; acting on
//! them (parking a waiting vCPU, reading a panic message from guest memory, ending the VM) is
//! the VMM's job, because only the VMM knows the vCPU and the run loop.

use mu2_abi::sysdev;

/// What a guest access to the system device asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysdevRequest {
    /// The read was answered from a plain register; nothing to do.
    Answered,
    /// A WAIT read: park the vCPU until a device has work; the read completes later.
    Wait,
    /// The guest is ready; a `ReadyInfo` is at this guest-physical address.
    Ready(u64),
    /// The guest stops with this exit code.
    Exit(u32),
    /// The guest panicked; a `Text` with the message is at this address.
    Panic(u64),
    /// A ring-0 stub reports this exception vector.
    Fault(u32),
    /// A console line: a `Text` at this address.
    Log(u64),
}

/// A malformed access to the system device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SysdevError {
    /// An access of a width the register does not have.
    #[error("system device register {offset:#x} accessed with width {width}")]
    BadWidth {
        /// Register offset.
        offset: u64,
        /// Access width in bytes.
        width: usize,
    },
    /// An offset that is not a register, or not one that can be accessed that way.
    #[error("no system device register at {offset:#x} for this access")]
    NoRegister {
        /// Register offset.
        offset: u64,
    },
}

fn value_of(offset: u64, data: &[u8], width: usize) -> Result<u64, SysdevError> {
    if data.len() != width {
        return Err(SysdevError::BadWidth { offset, width: data.len() });
    }
    let mut bytes = [0u8; 8];
    bytes[..width].copy_from_slice(data);
    Ok(u64::from_le_bytes(bytes))
}

/// Decodes a guest read of `data.len()` bytes at `offset`, filling `data` where the answer is
/// immediate.
pub fn read(offset: u64, data: &mut [u8]) -> Result<SysdevRequest, SysdevError> {
    let value = match offset {
        sysdev::MAGIC => sysdev::MAGIC_VALUE,
        sysdev::VERSION => mu2_abi::ABI_VERSION,
        sysdev::WAIT => {
            if data.len() != 4 {
                return Err(SysdevError::BadWidth { offset, width: data.len() });
            }
            return Ok(SysdevRequest::Wait);
        }
        _ => return Err(SysdevError::NoRegister { offset }),
    };
    if data.len() != 4 {
        return Err(SysdevError::BadWidth { offset, width: data.len() });
    }
    data.copy_from_slice(&value.to_le_bytes());
    Ok(SysdevRequest::Answered)
}

/// Decodes a guest write of `data` at `offset`.
pub fn write(offset: u64, data: &[u8]) -> Result<SysdevRequest, SysdevError> {
    Ok(match offset {
        sysdev::READY => SysdevRequest::Ready(value_of(offset, data, 8)?),
        // 32-bit registers: the truncation is the register's width.
        sysdev::EXIT => SysdevRequest::Exit(value_of(offset, data, 4)? as u32),
        sysdev::PANIC => SysdevRequest::Panic(value_of(offset, data, 8)?),
        sysdev::FAULT => SysdevRequest::Fault(value_of(offset, data, 4)? as u32),
        sysdev::LOG => SysdevRequest::Log(value_of(offset, data, 8)?),
        _ => return Err(SysdevError::NoRegister { offset }),
    })
}

/// Writes the value a parked WAIT read returns into the pending read's data.
pub fn complete_wait(data: &mut [u8], bits: u32) {
    let bytes = bits.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&bytes[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_decode() {
        let mut d = [0u8; 4];
        assert_eq!(read(sysdev::MAGIC, &mut d), Ok(SysdevRequest::Answered));
        assert_eq!(&d, b"mu2s");
        assert_eq!(read(sysdev::WAIT, &mut d), Ok(SysdevRequest::Wait));
        assert_eq!(write(sysdev::EXIT, &7u32.to_le_bytes()), Ok(SysdevRequest::Exit(7)));
        assert_eq!(write(sysdev::READY, &0x1234u64.to_le_bytes()), Ok(SysdevRequest::Ready(0x1234)));
        assert_eq!(write(sysdev::FAULT, &14u32.to_le_bytes()), Ok(SysdevRequest::Fault(14)));
    }

    #[test]
    fn bad_accesses_are_errors() {
        let mut wide = [0u8; 8];
        assert!(matches!(read(sysdev::WAIT, &mut wide), Err(SysdevError::BadWidth { .. })));
        assert!(matches!(read(0x800, &mut [0u8; 4]), Err(SysdevError::NoRegister { .. })));
        assert!(matches!(write(sysdev::READY, &[1, 2]), Err(SysdevError::BadWidth { .. })));
        assert!(matches!(write(sysdev::MAGIC, &[0; 4]), Err(SysdevError::NoRegister { .. })));
    }
}
