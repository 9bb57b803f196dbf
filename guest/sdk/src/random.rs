//! Random numbers: a ChaCha20 keystream generator (RFC 8439 block function), seeded at boot
//! from `rdrand` (when CPUID offers it) and the TSC, and reseeded from the host's entropy
//! whenever the VM is restored from a frozen image, so that forks of one image diverge.

use crate::global::Global;

const SIGMA: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];

/// The ChaCha20 block function: 20 rounds over `state`, added back in.
fn chacha20_block(state: &[u32; 16]) -> [u32; 16] {
    #[inline(always)]
    fn qr(x: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
        x[a] = x[a].wrapping_add(x[b]);
        x[d] = (x[d] ^ x[a]).rotate_left(16);
        x[c] = x[c].wrapping_add(x[d]);
        x[b] = (x[b] ^ x[c]).rotate_left(12);
        x[a] = x[a].wrapping_add(x[b]);
        x[d] = (x[d] ^ x[a]).rotate_left(8);
        x[c] = x[c].wrapping_add(x[d]);
        x[b] = (x[b] ^ x[c]).rotate_left(7);
    }
    let mut x = *state;
    for _ in 0..10 {
        qr(&mut x, 0, 4, 8, 12);
        qr(&mut x, 1, 5, 9, 13);
        qr(&mut x, 2, 6, 10, 14);
        qr(&mut x, 3, 7, 11, 15);
        qr(&mut x, 0, 5, 10, 15);
        qr(&mut x, 1, 6, 11, 12);
        qr(&mut x, 2, 7, 8, 13);
        qr(&mut x, 3, 4, 9, 14);
    }
    for (out, s) in x.iter_mut().zip(state) {
        *out = out.wrapping_add(*s);
    }
    x
}

/// ChaCha20 with a 256-bit key, a 64-bit block counter and a zero nonce.
pub(crate) struct ChaCha {
    key: [u32; 8],
    counter: u64,
    block: [u8; 64],
    used: usize,
}

impl ChaCha {
    pub(crate) const fn new() -> Self {
        Self { key: [0; 8], counter: 0, block: [0; 64], used: 64 }
    }

    fn next_block(&mut self) -> [u32; 16] {
        let mut state = [0u32; 16];
        state[..4].copy_from_slice(&SIGMA);
        state[4..12].copy_from_slice(&self.key);
        state[12] = self.counter as u32;
        state[13] = (self.counter >> 32) as u32;
        self.counter = self.counter.wrapping_add(1);
        chacha20_block(&state)
    }

    /// Mixes `material` into the key: XOR it in, then replace the key by the first half of
    /// a block under that key, so the new key depends on both old state and new material.
    pub(crate) fn reseed(&mut self, material: &[u8; 32]) {
        for (k, m) in self.key.iter_mut().zip(material.chunks_exact(4)) {
            *k ^= u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
        }
        self.counter = 0;
        let block = self.next_block();
        self.key.copy_from_slice(&block[..8]);
        self.counter = 0;
        self.used = 64;
    }

    pub(crate) fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.used == 64 {
                let words = self.next_block();
                for (chunk, w) in self.block.chunks_exact_mut(4).zip(words) {
                    chunk.copy_from_slice(&w.to_le_bytes());
                }
                self.used = 0;
            }
            *b = self.block[self.used];
            self.block[self.used] = 0;
            self.used += 1;
        }
    }
}

static RNG: Global<ChaCha> = Global::new(ChaCha::new());

/// Mixes 32 bytes of seed material into the generator.
pub(crate) fn reseed(material: &[u8; 32]) {
    RNG.with(|rng| rng.reseed(material));
}

/// Fills `out` with random bytes.
pub fn fill_random(out: &mut [u8]) {
    RNG.with(|rng| rng.fill(out));
}

/// A random `u64`.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    fill_random(&mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8439_block_function() {
        // RFC 8439 §2.3.2: key 00..1f, counter 1, nonce 00:00:00:09:00:00:00:4a:00:00:00:00.
        let mut state = [0u32; 16];
        state[..4].copy_from_slice(&SIGMA);
        for i in 0..8 {
            let b = (4 * i) as u32;
            state[4 + i] = b | (b + 1) << 8 | (b + 2) << 16 | (b + 3) << 24;
        }
        state[12] = 1;
        state[13] = 0x0900_0000;
        state[14] = 0x4a00_0000;
        let out = chacha20_block(&state);
        assert_eq!(&out[..4], &[0xe4e7_f110, 0x1559_3bd1, 0x1fdd_0f50, 0xc471_20a3]);
        assert_eq!(out[15], 0x4e3c_50a2);
    }

    #[test]
    fn reseeding_diverges() {
        let (mut a, mut b) = (ChaCha::new(), ChaCha::new());
        a.reseed(&[1; 32]);
        b.reseed(&[1; 32]);
        let (mut x, mut y) = ([0u8; 40], [0u8; 40]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        b.reseed(&[2; 32]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_ne!(x, y);
    }
}
