//! CPU features of aarch64 images: none are recorded yet, and the only template is `host`.
//!
//! The guest's view of the CPU is its ID registers (ID_AA64ISAR0_EL1 and the like). They are
//! part of the saved register set, and KVM refuses through ONE_REG an ID register value the
//! host cannot present, so an image from an incompatible host fails when a VM is restored from
//! it, not when it is loaded. Comparing them field by field (each field has its own ordering)
//! is left for when aarch64 images move between hosts.

use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::{ArchError, CpuId, VcpuState};
use crate::cpu::CpuTemplate;

/// The CPU features an image records: nothing on aarch64 (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {}

impl CpuFeatures {
    /// Every feature, by name: none recorded.
    pub fn names(&self) -> Vec<String> {
        Vec::new()
    }

    /// The features these need that `host` lacks: none can be told.
    pub fn missing_on(&self, _host: &CpuFeatures) -> Vec<String> {
        Vec::new()
    }

    /// The features outside what `template` shows a guest: none recorded.
    pub fn beyond(&self, _template: CpuTemplate) -> Vec<String> {
        Vec::new()
    }

    /// These features without the named ones: no name is known on aarch64.
    pub fn without(&self, names: &[&str]) -> Result<CpuFeatures, ArchError> {
        match names.first() {
            Some(name) => Err(ArchError::UnknownFeature((*name).to_string())),
            None => Ok(*self),
        }
    }
}

/// The CPU features a vCPU configuration lists: none recorded.
pub fn table_features(_cpuid: &CpuId) -> CpuFeatures {
    CpuFeatures {}
}

/// The CPU features a vCPU's guest sees: none recorded.
pub fn vcpu_features(_vcpu: &VcpuFd) -> Result<CpuFeatures, kvm_ioctls::Error> {
    Ok(CpuFeatures {})
}

/// The CPU features a saved vCPU's guest saw: none recorded.
pub fn guest_features(_vcpu: &VcpuState) -> CpuFeatures {
    CpuFeatures {}
}

/// Only the `host` template exists on aarch64.
pub fn apply_template(_cpuid: &mut CpuId, template: CpuTemplate) -> Result<(), ArchError> {
    match template {
        CpuTemplate::Host => Ok(()),
        other => Err(ArchError::TemplateUnsupported(other)),
    }
}

/// Checks an image's record as untrusted input: only the `host` template exists here.
pub fn check_recorded(_recorded: &CpuFeatures, template: CpuTemplate, _vcpus: &[VcpuState]) -> Result<(), ArchError> {
    match template {
        CpuTemplate::Host => Ok(()),
        other => Err(ArchError::BadState(format!("the {other} CPU template does not exist on aarch64"))),
    }
}

/// No feature can be removed: none is named on aarch64.
#[cfg(feature = "inspect")]
pub fn remove_features(_cpuid: &mut CpuId, names: &[&str]) -> Result<(), ArchError> {
    match names.first() {
        Some(name) => Err(ArchError::UnknownFeature((*name).to_string())),
        None => Ok(()),
    }
}
