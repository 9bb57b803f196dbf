//! Allocation-free number formatting for the paths that must not use `core::fmt`: the
//! ring-0 fault printer (every instruction there is emulated) and hex output.

/// Writes `value` in decimal to the front of `out`; returns the number of bytes written.
/// `out` must hold 20 bytes.
pub fn write_dec(out: &mut [u8], mut value: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (value % 10) as u8;
        n += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for (o, d) in out.iter_mut().zip(digits[..n].iter().rev()) {
        *o = *d;
    }
    n
}

/// Writes `value` in lowercase hex (no prefix, no leading zeros) to the front of `out`;
/// returns the number of bytes written. `out` must hold 16 bytes.
pub fn write_hex(out: &mut [u8], value: u64) -> usize {
    let digits = if value == 0 { 1 } else { (64 - value.leading_zeros() as usize).div_ceil(4) };
    for (i, o) in out[..digits].iter_mut().enumerate() {
        let nibble = (value >> (4 * (digits - 1 - i))) & 0xf;
        *o = HEX[nibble as usize];
    }
    digits
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of `bytes` (two characters per byte) into `out`, which must hold
/// `2 * bytes.len()` bytes.
pub fn hex_bytes(out: &mut [u8], bytes: &[u8]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// Lowercase hex of `bytes` as a new vector.
pub fn to_hex(bytes: &[u8]) -> alloc::vec::Vec<u8> {
    let mut out = alloc::vec![0u8; 2 * bytes.len()];
    hex_bytes(&mut out, bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_and_hex() {
        let mut b = [0u8; 20];
        let n = write_dec(&mut b, 0);
        assert_eq!(&b[..n], b"0");
        let n = write_dec(&mut b, u64::MAX);
        assert_eq!(&b[..n], b"18446744073709551615");
        let n = write_hex(&mut b, 0);
        assert_eq!(&b[..n], b"0");
        let n = write_hex(&mut b, 0x20_1abc);
        assert_eq!(&b[..n], b"201abc");
        let n = write_hex(&mut b, u64::MAX);
        assert_eq!(&b[..n], b"ffffffffffffffff");
        assert_eq!(to_hex(&[0x00, 0xab, 0x7f]), b"00ab7f");
    }
}
