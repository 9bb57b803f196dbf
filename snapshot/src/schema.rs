//! The compile-time tripwire: a payload type describes its schema in a string, records the
//! fingerprint of that string together with the [`FORMAT_VERSION`] it was recorded at, and the
//! build fails when the two drift apart.
//!
//! The payload types belong to the VMM, so this crate cannot see them change. Instead each payload
//! implements [`Versioned`]; [`check_schema`] runs in a `const` (via
//! [`assert_schema!`](crate::assert_schema), and again inside [`write_image`](crate::write_image)
//! and [`read_state`](crate::read_state)), so editing the schema without bumping
//! [`FORMAT_VERSION`] — or bumping it without reviewing the schema — is a compile error that says
//! what to do.

use crate::FORMAT_VERSION;

/// A payload type whose encoding is covered by a recorded schema fingerprint.
///
/// `SCHEMA` describes every type and field that reaches the encoding, in encoding order (postcard
/// has no field names or tags: order and types *are* the format). Whitespace is ignored, so
/// reformatting the description does not trip the wire.
///
/// ```
/// use mu2_snapshot::{assert_schema, fingerprint, Versioned};
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct VmState { ram_size: u64, regs: [u64; 4] }
///
/// impl Versioned for VmState {
///     const SCHEMA: &'static str = "VmState { ram_size: u64, regs: [u64; 4] }";
///     const RECORDED_VERSION: u32 = 2;
///     const RECORDED_FINGERPRINT: u64 = 0xee68_61f5_527d_49a9;
/// }
/// assert_schema!(VmState);
/// # assert_eq!(fingerprint(VmState::SCHEMA), VmState::RECORDED_FINGERPRINT);
/// ```
///
/// Adding a field to the schema without re-recording fails the build:
///
/// ```compile_fail
/// use mu2_snapshot::{assert_schema, Versioned};
///
/// struct VmState;
/// impl Versioned for VmState {
///     const SCHEMA: &'static str = "VmState { ram_size: u64, regs: [u64; 4], tsc: u64 }";
///     const RECORDED_VERSION: u32 = 2;
///     const RECORDED_FINGERPRINT: u64 = 0xee68_61f5_527d_49a9;
/// }
/// assert_schema!(VmState); // error: "the payload schema changed (fingerprint 0x…, recorded …)"
/// ```
pub trait Versioned {
    /// The schema description (see the trait docs). Change it whenever the type's encoding changes.
    const SCHEMA: &'static str;
    /// The [`FORMAT_VERSION`] at which [`Self::RECORDED_FINGERPRINT`] was recorded.
    const RECORDED_VERSION: u32;
    /// `fingerprint(SCHEMA)` as recorded at [`Self::RECORDED_VERSION`].
    const RECORDED_FINGERPRINT: u64;
}

/// FNV-1a (64-bit) over the bytes of `schema`, skipping ASCII whitespace.
///
/// FNV-1a is not a cryptographic hash; it only has to notice edits, and it is a `const fn`.
pub const fn fingerprint(schema: &str) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = schema.as_bytes();
    let mut hash = OFFSET_BASIS;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if !b.is_ascii_whitespace() {
            hash ^= b as u64;
            hash = hash.wrapping_mul(PRIME);
        }
        i += 1;
    }
    hash
}

/// Panics (at compile time, when used in a `const`) unless `T`'s recorded fingerprint matches its
/// schema and was recorded at the current [`FORMAT_VERSION`]. Use it through
/// [`assert_schema!`](crate::assert_schema).
pub const fn check_schema<T: Versioned>() {
    let actual = fingerprint(T::SCHEMA);
    if actual != T::RECORDED_FINGERPRINT {
        let mut msg = Msg::new();
        msg.push("mu2-snapshot tripwire: the payload schema changed (fingerprint ");
        msg.hex(actual);
        msg.push(", recorded ");
        msg.hex(T::RECORDED_FINGERPRINT);
        msg.push(" at format version ");
        msg.dec(T::RECORDED_VERSION);
        msg.push("). Bump mu2_snapshot::FORMAT_VERSION (currently ");
        msg.dec(FORMAT_VERSION);
        msg.push("), then set RECORDED_VERSION to it and RECORDED_FINGERPRINT = ");
        msg.hex(actual);
        msg.push("; see docs/image-format.md");
        msg.panic();
    }
    if T::RECORDED_VERSION != FORMAT_VERSION {
        let mut msg = Msg::new();
        msg.push("mu2-snapshot tripwire: the payload schema was recorded at format version ");
        msg.dec(T::RECORDED_VERSION);
        msg.push(" but mu2_snapshot::FORMAT_VERSION is ");
        msg.dec(FORMAT_VERSION);
        msg.push(". Review the schema, then set RECORDED_VERSION = ");
        msg.dec(FORMAT_VERSION);
        msg.push("; see docs/image-format.md");
        msg.panic();
    }
}

/// Checks a payload type's schema record at compile time (in `cargo check` too).
///
/// Put `mu2_snapshot::assert_schema!(MyState);` next to each payload type.
#[macro_export]
macro_rules! assert_schema {
    ($t:ty) => {
        const _: () = $crate::check_schema::<$t>();
    };
}

/// A fixed-capacity message built in a `const fn`, since `const` panics cannot format numbers.
struct Msg {
    buf: [u8; 512],
    len: usize,
}

impl Msg {
    const fn new() -> Msg {
        Msg { buf: [0; 512], len: 0 }
    }

    const fn byte(&mut self, b: u8) {
        // Truncating is fine: the message is advice, and all its pieces are short.
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    const fn push(&mut self, s: &str) {
        let bytes = s.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            self.byte(bytes[i]);
            i += 1;
        }
    }

    const fn hex(&mut self, v: u64) {
        self.push("0x");
        let mut shift = 64;
        while shift > 0 {
            shift -= 4;
            let nibble = ((v >> shift) & 0xf) as u8;
            self.byte(if nibble < 10 { b'0' + nibble } else { b'a' + nibble - 10 });
            if shift % 16 == 0 && shift != 0 {
                self.byte(b'_');
            }
        }
    }

    const fn dec(&mut self, v: u32) {
        let mut digits = [0u8; 10];
        let mut n = 0;
        let mut v = v;
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.byte(digits[n]);
        }
    }

    const fn panic(&self) -> ! {
        let (used, _) = self.buf.split_at(self.len);
        // Only ASCII is ever pushed, so this cannot fail; the fallback keeps it panic-free anyway.
        match core::str::from_utf8(used) {
            Ok(s) => panic!("{}", s),
            Err(_) => panic!("mu2-snapshot tripwire: the payload schema record does not match"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_whitespace_only() {
        assert_eq!(fingerprint("A { x: u32 }"), fingerprint("A{x:u32}"));
        assert_eq!(fingerprint("A {\n    x: u32,\n}"), fingerprint("A{x:u32,}"));
        assert_ne!(fingerprint("A { x: u32 }"), fingerprint("A { x: u64 }"));
        assert_ne!(fingerprint("A { x: u32, y: u8 }"), fingerprint("A { y: u8, x: u32 }"));
        // FNV-1a 64 reference value for "a".
        assert_eq!(fingerprint("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fingerprint(""), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn message_formatting() {
        let mut m = Msg::new();
        m.hex(0x0123_4567_89ab_cdef);
        m.push(" ");
        m.dec(0);
        m.push(" ");
        m.dec(u32::MAX);
        assert_eq!(core::str::from_utf8(&m.buf[..m.len]).unwrap(), "0x0123_4567_89ab_cdef 0 4294967295");
    }

    #[test]
    #[should_panic(expected = "Bump mu2_snapshot::FORMAT_VERSION")]
    fn changed_schema_trips() {
        struct Drifted;
        impl Versioned for Drifted {
            const SCHEMA: &'static str = "Drifted { a: u32, b: u64 }";
            const RECORDED_VERSION: u32 = FORMAT_VERSION;
            const RECORDED_FINGERPRINT: u64 = fingerprint("Drifted { a: u32 }");
        }
        // At run time here so the test can observe it; in a `const` it is a build error.
        check_schema::<Drifted>();
    }

    #[test]
    #[should_panic(expected = "Review the schema")]
    fn bumped_version_trips() {
        struct Old;
        impl Versioned for Old {
            const SCHEMA: &'static str = "Old { a: u32 }";
            const RECORDED_VERSION: u32 = FORMAT_VERSION + 1;
            const RECORDED_FINGERPRINT: u64 = fingerprint("Old { a: u32 }");
        }
        check_schema::<Old>();
    }
}
