//! CPU templates: which of the host's CPU features a guest is shown when it boots. An image
//! records the template it was frozen with and the features its guest saw (see
//! `arch::CpuFeatures`), and loads only on a host that has every one of them.

use std::fmt;

/// The CPU features a booted guest is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum CpuTemplate {
    /// Everything this host's KVM supports (and mu2 passes on): the fastest guest, whose image
    /// loads only on hosts with the same features or more.
    #[default]
    Host,
    /// A conservative set every current x86-64 host has (x86-64-v2: up to SSE4.2, POPCNT,
    /// CMPXCHG16B; no AVX, no XSAVE), so that the image moves between hosts.
    Baseline,
}

impl CpuTemplate {
    /// Every template.
    pub const ALL: [CpuTemplate; 2] = [CpuTemplate::Host, CpuTemplate::Baseline];

    /// The template's name, as the command line and reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::Baseline => "baseline",
        }
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
