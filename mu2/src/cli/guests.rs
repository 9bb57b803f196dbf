//! `mu2 guests`: the guests built into this binary.

use mu2_vmm::guests;

use crate::failure::Failure;

pub fn list() -> Result<(), Failure> {
    let mut text = String::new();
    for name in guests::names() {
        let kind = if guests::EXAMPLES.contains(&name) { "example function" } else { "test guest" };
        text.push_str(&format!("{name:<10} {kind}\n"));
    }
    crate::out::print(text)
}
