//! The guest binaries built from `guest/examples` and `guest/test-guests` and embedded in the VMM, so that `mu2` runs
//! its example functions with no file arguments.

// `EMBEDDED`, every guest by name, and `EXAMPLES`, the names of the example functions offered
// to users (the others are the VMM's test guests).
include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The embedded guest called `name`, if any (examples and test guests).
pub fn find(name: &str) -> Option<&'static [u8]> {
    EMBEDDED.iter().find(|(n, _)| *n == name).map(|(_, bytes)| *bytes)
}

/// Names of every embedded guest.
pub fn names() -> impl Iterator<Item = &'static str> {
    EMBEDDED.iter().map(|(n, _)| *n)
}
