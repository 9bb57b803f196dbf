//! `mu2 guests`: the guests built into this binary.

use mu2_vmm::guests;

pub fn list() {
    for name in guests::names() {
        let kind = if guests::EXAMPLES.contains(&name) { "example function" } else { "test guest" };
        println!("{name:<10} {kind}");
    }
}
