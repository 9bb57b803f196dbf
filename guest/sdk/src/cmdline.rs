//! Kernel command-line parsing: the keys of [`mu2_abi::cmdline`].

use mu2_abi::cmdline as key;

/// Most virtio-mmio devices the runtime records.
pub const MAX_DEVICES: usize = 16;

/// A `virtio_mmio.device=<size>@<addr>:<irq>` entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MmioDevice {
    /// Base address of the register window.
    pub addr: u64,
    /// Size of the register window.
    pub size: u64,
}

/// What the command line says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Config {
    /// `mu2.sysdev=`: the system device's address.
    pub sysdev: Option<u64>,
    /// `mu2.tsc_khz=`.
    pub tsc_khz: Option<u64>,
    /// `mu2.port=`.
    pub port: Option<u32>,
    /// `quiet`.
    pub quiet: bool,
    /// The virtio-mmio devices, in command-line order.
    pub devices: [MmioDevice; MAX_DEVICES],
    /// How many of `devices` are valid.
    pub device_count: usize,
}

impl Config {
    /// The virtio-mmio devices.
    pub fn devices(&self) -> &[MmioDevice] {
        &self.devices[..self.device_count]
    }
}

/// Parses a command line; unknown or malformed words are ignored.
pub fn parse(line: &[u8]) -> Config {
    let mut config = Config::default();
    for word in line.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty()) {
        let (name, value) = match word.iter().position(|&b| b == b'=') {
            Some(i) => (&word[..i], Some(&word[i + 1..])),
            None => (word, None),
        };
        match (name, value) {
            (n, None) if n == key::QUIET.as_bytes() => config.quiet = true,
            (n, Some(v)) if n == key::SYSDEV.as_bytes() => config.sysdev = parse_number(v),
            (n, Some(v)) if n == key::TSC_KHZ.as_bytes() => config.tsc_khz = parse_number(v),
            (n, Some(v)) if n == key::PORT.as_bytes() => {
                config.port = parse_number(v).and_then(|p| u32::try_from(p).ok());
            }
            (n, Some(v)) if n == key::VIRTIO_MMIO_DEVICE.as_bytes() => {
                if let (Some(dev), true) = (parse_device(v), config.device_count < MAX_DEVICES) {
                    config.devices[config.device_count] = dev;
                    config.device_count += 1;
                }
            }
            _ => {}
        }
    }
    config
}

/// `<size>@<addr>[:<irq>]`, sizes and addresses in Linux `memparse` form.
fn parse_device(v: &[u8]) -> Option<MmioDevice> {
    let at = v.iter().position(|&b| b == b'@')?;
    let size = parse_number(&v[..at])?;
    let rest = &v[at + 1..];
    let addr_end = rest.iter().position(|&b| b == b':').unwrap_or(rest.len());
    let addr = parse_number(&rest[..addr_end])?;
    Some(MmioDevice { addr, size })
}

/// A decimal or `0x` hex number with an optional K/M/G suffix (Linux `memparse`).
pub fn parse_number(v: &[u8]) -> Option<u64> {
    let (digits, shift) = match v.last()? {
        b'k' | b'K' => (&v[..v.len() - 1], 10),
        b'm' | b'M' => (&v[..v.len() - 1], 20),
        b'g' | b'G' => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    let (digits, radix) = match digits {
        [b'0', b'x' | b'X', hex @ ..] => (hex, 16),
        _ => (digits, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &d in digits {
        let digit = char::from(d).to_digit(radix)?;
        n = n.checked_mul(u64::from(radix))?.checked_add(u64::from(digit))?;
    }
    n.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let c = parse(
            b"console=ttyS0 virtio_mmio.device=4K@0xd0001000:5 quiet mu2.sysdev=0xd0000000 \
              mu2.tsc_khz=2994372 mu2.port=5001 virtio_mmio.device=0x1000@3489669120:6",
        );
        assert_eq!(c.sysdev, Some(0xd000_0000));
        assert_eq!(c.tsc_khz, Some(2_994_372));
        assert_eq!(c.port, Some(5001));
        assert!(c.quiet);
        assert_eq!(
            c.devices(),
            &[MmioDevice { addr: 0xd000_1000, size: 4096 }, MmioDevice { addr: 0xd000_2000, size: 4096 }]
        );
    }

    #[test]
    fn ignores_malformed_words() {
        let c = parse(b"mu2.port=99999999999 mu2.sysdev=zz virtio_mmio.device=4K quiet=1 =");
        assert_eq!(c, Config::default());
        assert_eq!(parse_number(b"0x"), None);
        assert_eq!(parse_number(b"18446744073709551615G"), None);
        assert_eq!(parse_number(b"2M"), Some(2 << 20));
    }
}
