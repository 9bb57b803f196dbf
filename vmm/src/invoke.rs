//! One request over vsock: connect to the guest's port, send the request, collect the
//! response until the guest closes its side.
//!
//! The request and its end (a half-close) are queued together, up to the receive buffer the
//! guest announced when it became ready, so a small request reaches the guest in one batch
//! and the guest answers in one go: one exit for the whole exchange.

use std::time::Instant;

use mu2_abi::ReadyInfo;
use mu2_devices::virtio::vsock::{CloseReason, ConnPhase, VsockError};

use crate::vm::{GuestError, RunStop, Vm};

/// Largest response accepted unless the caller says otherwise.
pub const DEFAULT_MAX_RESPONSE: usize = 64 << 20;

/// Why an invocation failed.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The guest failed (fault, panic, timeout, …).
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// The guest stopped before it became ready.
    #[error("guest exited with code {0} before it was ready")]
    ExitedBeforeReady(u32),
    /// The guest stopped while a request was in flight.
    #[error("guest exited with code {0} before answering")]
    ExitedDuringRequest(u32),
    /// The guest waits for nothing before it said it was ready.
    #[error("guest is idle but never signalled readiness")]
    NeverReady,
    /// The guest mishandled the vsock device or the connection.
    #[error("vsock device error")]
    Device(#[source] VsockError),
    /// Nothing listens on the guest port.
    #[error("guest refused the connection: nothing listens on vsock port {port}")]
    Refused {
        /// The port.
        port: u32,
    },
    /// The guest reset the connection before the response was complete.
    #[error("guest reset the connection after {received} response bytes")]
    Reset {
        /// Bytes received before the reset.
        received: usize,
    },
    /// The response exceeds the limit.
    #[error("response exceeds the {limit}-byte limit")]
    ResponseTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The guest waits with the response incomplete and nothing left to wake it.
    #[error("guest stopped answering: it waits with the response incomplete ({received} bytes so far)")]
    Stalled {
        /// Bytes received so far.
        received: usize,
    },
}

impl InvokeError {
    /// Whether the failure is the guest running out of time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, InvokeError::Guest(GuestError::Timeout))
    }

    /// Whether the guest crashed (fault, panic, triple fault, …) rather than misbehaving on
    /// the wire.
    pub fn is_guest_crash(&self) -> bool {
        matches!(
            self,
            InvokeError::Guest(
                GuestError::Fault(_)
                    | GuestError::Panic(_)
                    | GuestError::TripleFault { .. }
                    | GuestError::Halted { .. }
                    | GuestError::Internal { .. }
                    | GuestError::FailEntry { .. }
                    | GuestError::SystemEvent(_)
            )
        )
    }
}

/// Runs a freshly booted VM until the guest reports readiness.
pub fn run_until_ready(vm: &mut Vm, deadline: Option<Instant>) -> Result<ReadyInfo, InvokeError> {
    match vm.run(deadline)? {
        RunStop::Ready(info) => Ok(info),
        RunStop::Exited(code) => Err(InvokeError::ExitedBeforeReady(code)),
        RunStop::Idle => Err(InvokeError::NeverReady),
    }
}

fn device_error(vm: &mut Vm) -> Option<VsockError> {
    vm.vsock().take_errors().into_iter().next()
}

/// Sends `request` to guest port `port` and returns the guest's whole response.
pub fn invoke(
    vm: &mut Vm,
    port: u32,
    request: &[u8],
    max_response: usize,
    deadline: Option<Instant>,
) -> Result<Vec<u8>, InvokeError> {
    let credit = vm.ready_info().map_or(0, |r| r.buf_alloc);
    let vsock = vm.vsock();
    let conn = vsock.connect(port, credit).map_err(InvokeError::Device)?;
    vsock.send(conn, request).map_err(InvokeError::Device)?;
    vsock.shutdown_send(conn).map_err(InvokeError::Device)?;

    let mut response = Vec::new();
    let result = loop {
        let entries_before = vm.stats().entries;
        let stop = match vm.run(deadline) {
            Ok(stop) => stop,
            Err(e) => break Err(e.into()),
        };
        if let Err(e) = vm.vsock().recv(conn, &mut response) {
            break Err(InvokeError::Device(e));
        }
        if response.len() > max_response {
            break Err(InvokeError::ResponseTooLarge { limit: max_response });
        }
        if let Some(e) = device_error(vm) {
            break Err(InvokeError::Device(e));
        }
        if let RunStop::Exited(code) = stop {
            break Err(InvokeError::ExitedDuringRequest(code));
        }
        let Some(state) = vm.vsock().state(conn) else {
            break Err(InvokeError::Reset { received: response.len() });
        };
        match state.phase {
            ConnPhase::Closed(CloseReason::Refused) => break Err(InvokeError::Refused { port }),
            ConnPhase::Closed(CloseReason::GuestReset | CloseReason::ProtocolError) => {
                break Err(InvokeError::Reset { received: response.len() })
            }
            _ if state.guest_eof && state.readable == 0 => break Ok(()),
            _ => {}
        }
        // `run` returns Idle without entering the guest when the devices have nothing for
        // it: then nothing will ever change.
        if stop == RunStop::Idle && vm.stats().entries == entries_before {
            break Err(InvokeError::Stalled { received: response.len() });
        }
    };
    vm.vsock().abort(conn);
    vm.vsock().remove(conn);
    result.map(|()| response)
}

impl crate::error::Classify for InvokeError {
    fn kind(&self) -> crate::error::FailureKind {
        use crate::error::FailureKind;
        match self {
            InvokeError::Guest(e) => e.kind(),
            InvokeError::ExitedBeforeReady(_) | InvokeError::ExitedDuringRequest(_) => FailureKind::GuestCrash,
            InvokeError::NeverReady
            | InvokeError::Device(_)
            | InvokeError::Refused { .. }
            | InvokeError::Reset { .. }
            | InvokeError::ResponseTooLarge { .. }
            | InvokeError::Stalled { .. } => FailureKind::GuestProtocol,
        }
    }
}
