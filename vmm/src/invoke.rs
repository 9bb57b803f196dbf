//! One request over vsock: connect to the guest's port, send the framed request, collect the
//! framed response (see `mu2_abi::frame`).
//!
//! The request's frame header and the request are queued together, up to the receive buffer
//! the guest announced when it became ready, so a small request reaches the guest in one batch
//! and the guest answers in one go: one exit for the whole exchange. The frame, not a
//! shutdown, says where each message ends, so nothing more is sent.

use std::sync::Arc;
use std::time::Instant;

use mu2_abi::frame::{outcome, RequestHeader, ResponseHeader};
use mu2_abi::ReadyInfo;
use mu2_devices::virtio::vsock::{CloseReason, ConnId, ConnPhase, HostEndpoint, VsockError};

use crate::budget::{ByteBudget, ByteCharge};
use crate::error::{Classify, FailureKind};

/// The most response buffer reserved on a guest's announcement alone.
const INITIAL_BODY_RESERVE: usize = 1 << 20;
use crate::vm::{printable, GuestError, RunStop, Vm};

/// Largest response accepted unless the caller says otherwise.
pub const DEFAULT_MAX_RESPONSE: usize = 64 << 20;
/// Most bytes of a function's error message shown; the rest is cut.
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// A request larger than the guest announced it can hold: refused before the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a request of {len} bytes is larger than the {limit} bytes this guest can hold with {mem_mib} MiB of \
     memory; give it more with --mem-mib (the API's `mem_mib`)"
)]
pub struct RequestTooLarge {
    /// The request's length.
    pub len: usize,
    /// The largest request the guest announced.
    pub limit: u32,
    /// The guest's memory, MiB.
    pub mem_mib: u64,
}

impl RequestTooLarge {
    /// Refuses a request of `len` bytes to a guest of `mem_size` bytes that announced
    /// `max_request`.
    pub fn check(len: usize, max_request: u32, mem_size: u64) -> Result<(), RequestTooLarge> {
        if u64::try_from(len).is_ok_and(|len| len <= u64::from(max_request)) {
            Ok(())
        } else {
            Err(RequestTooLarge { len, limit: max_request, mem_mib: mem_size >> 20 })
        }
    }
}

impl Classify for RequestTooLarge {
    fn kind(&self) -> FailureKind {
        FailureKind::BadInput
    }
}

/// Why an invocation failed.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The guest failed (fault, panic, timeout, …).
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// The request is larger than the guest can hold.
    #[error(transparent)]
    RequestTooLarge(#[from] RequestTooLarge),
    /// The function returned an error.
    #[error("the function failed: {}", printable(message))]
    Function {
        /// Its message, at most [`MAX_ERROR_MESSAGE`] bytes of it.
        message: String,
    },
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
    /// The guest closed its side before its response frame was complete.
    #[error("guest closed the connection after {received} bytes of a {expected}-byte response frame")]
    Truncated {
        /// Bytes of the frame received.
        received: usize,
        /// Bytes the frame has (its header's only, while the header is incomplete).
        expected: usize,
    },
    /// The response frame names an outcome that does not exist.
    #[error("guest answered with unknown outcome {0} in its response frame")]
    UnknownOutcome(u32),
    /// The guest sent more than its response frame.
    #[error("guest sent {0} bytes past its response frame")]
    PastTheFrame(usize),
    /// The response does not fit the bytes the daemon buffers for responses at once.
    #[error("no room for the guest's response")]
    ResponseBudget(#[source] crate::budget::BytesSpent),
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

/// How much more of the response budget a response takes before each read from the guest.
const RESPONSE_CHARGE_STEP: usize = 64 << 10;

/// The response frame as it arrives: its header apart, so the body lands in its own buffer
/// without being moved again.
#[derive(Debug)]
struct ResponseFrame<'a> {
    max_response: usize,
    /// Where the response's bytes are counted, with the other responses buffered at once.
    responses: Option<&'a Arc<ByteBudget>>,
    charge: Option<ByteCharge>,
    head: Vec<u8>,
    header: Option<ResponseHeader>,
    body: Vec<u8>,
}

impl<'a> ResponseFrame<'a> {
    fn new(max_response: usize, responses: Option<&'a Arc<ByteBudget>>) -> Self {
        ResponseFrame {
            max_response,
            responses,
            charge: None,
            head: Vec::with_capacity(ResponseHeader::SIZE),
            header: None,
            body: Vec::new(),
        }
    }

    /// Takes what the guest sent of the frame, and no more.
    fn take(&mut self, vsock: &mut HostEndpoint, conn: ConnId) -> Result<(), InvokeError> {
        if self.header.is_none() {
            let missing = ResponseHeader::SIZE - self.head.len();
            vsock.recv_up_to(conn, &mut self.head, missing).map_err(InvokeError::Device)?;
            let Ok(head) = <[u8; ResponseHeader::SIZE]>::try_from(&self.head[..]) else { return Ok(()) };
            let header = ResponseHeader::decode(head)
                .ok_or_else(|| InvokeError::UnknownOutcome(u32::from_le_bytes([head[0], head[1], head[2], head[3]])))?;
            let len = usize::try_from(header.len).unwrap_or(usize::MAX);
            if len > self.max_response {
                return Err(InvokeError::ResponseTooLarge { limit: self.max_response });
            }
            if let Some(responses) = self.responses {
                self.charge = Some(responses.charge(0).map_err(InvokeError::ResponseBudget)?);
            }
            // The announced length is the guest's word: reserve at most a little up front and
            // let the buffer grow with the bytes that actually arrive.
            self.body.reserve_exact(len.min(INITIAL_BODY_RESERVE));
            self.header = Some(header);
        }
        // Charged as the bytes arrive, a step at a time: a length the guest announces and does
        // not send holds nothing of the budget.
        loop {
            let missing = self.expected() - self.received();
            if missing == 0 {
                return Ok(());
            }
            let step = missing.min(RESPONSE_CHARGE_STEP);
            if let Some(charge) = &mut self.charge {
                charge.grow_to(self.body.len() + step).map_err(InvokeError::ResponseBudget)?;
            }
            if vsock.recv_up_to(conn, &mut self.body, step).map_err(InvokeError::Device)? == 0 {
                return Ok(());
            }
        }
    }

    fn received(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// The frame's length as far as known: its header's alone until the header is whole.
    fn expected(&self) -> usize {
        ResponseHeader::SIZE + self.header.map_or(0, |h| h.len as usize)
    }

    fn is_complete(&self) -> bool {
        self.header.is_some() && self.received() == self.expected()
    }

    /// The outcome of a complete frame, with the bytes it holds of the response budget.
    fn finish(self) -> Result<(Vec<u8>, Option<ByteCharge>), InvokeError> {
        match self.header {
            Some(h) if h.outcome == outcome::FUNCTION_ERROR => {
                let mut message = self.body;
                message.truncate(MAX_ERROR_MESSAGE);
                Err(InvokeError::Function { message: String::from_utf8_lossy(&message).into_owned() })
            }
            _ => Ok((self.body, self.charge)),
        }
    }
}

/// Sends `request` to guest port `port` and returns the guest's whole response; a function
/// error is [`InvokeError::Function`].
pub fn invoke(
    vm: &mut Vm,
    port: u32,
    request: &[u8],
    max_response: usize,
    deadline: Option<Instant>,
) -> Result<Vec<u8>, InvokeError> {
    invoke_counted(vm, port, request, max_response, None, deadline).map(|(response, _)| response)
}

/// [`invoke`], counting the response's bytes against `responses` (from its header, before
/// they arrive) until the returned charge is dropped.
pub(crate) fn invoke_counted(
    vm: &mut Vm,
    port: u32,
    request: &[u8],
    max_response: usize,
    responses: Option<&Arc<ByteBudget>>,
    deadline: Option<Instant>,
) -> Result<(Vec<u8>, Option<ByteCharge>), InvokeError> {
    let ready = vm.ready_info().ok_or(InvokeError::NeverReady)?;
    RequestTooLarge::check(request.len(), ready.max_request, vm.mem_size())?;
    // Within max_request, a u32.
    let header = RequestHeader { len: request.len() as u32 };
    let vsock = vm.vsock();
    let conn = vsock.connect(port, ready.buf_alloc).map_err(InvokeError::Device)?;
    let result =
        send(vsock, conn, &header, request).and_then(|()| answer(vm, conn, port, max_response, responses, deadline));
    vm.vsock().abort(conn);
    vm.vsock().remove(conn);
    result
}

fn send(vsock: &mut HostEndpoint, conn: ConnId, header: &RequestHeader, request: &[u8]) -> Result<(), InvokeError> {
    vsock.send(conn, &header.encode()).map_err(InvokeError::Device)?;
    vsock.send(conn, request).map_err(InvokeError::Device)
}

/// Runs the VM until the response frame on `conn` is complete.
fn answer(
    vm: &mut Vm,
    conn: ConnId,
    port: u32,
    max_response: usize,
    responses: Option<&Arc<ByteBudget>>,
    deadline: Option<Instant>,
) -> Result<(Vec<u8>, Option<ByteCharge>), InvokeError> {
    let mut frame = ResponseFrame::new(max_response, responses);
    loop {
        let entries_before = vm.stats().entries;
        let stop = vm.run(deadline)?;
        frame.take(vm.vsock(), conn)?;
        if let Some(e) = device_error(vm) {
            return Err(InvokeError::Device(e));
        }
        let state = vm.vsock().state(conn);
        if frame.is_complete() {
            let extra = state.map_or(0, |s| s.readable);
            if extra > 0 {
                return Err(InvokeError::PastTheFrame(extra));
            }
            return frame.finish();
        }
        if let RunStop::Exited(code) = stop {
            return Err(InvokeError::ExitedDuringRequest(code));
        }
        let received = frame.received();
        let Some(state) = state else {
            return Err(InvokeError::Reset { received });
        };
        match state.phase {
            ConnPhase::Closed(CloseReason::Refused) => return Err(InvokeError::Refused { port }),
            ConnPhase::Closed(CloseReason::GuestReset | CloseReason::ProtocolError) => {
                return Err(InvokeError::Reset { received })
            }
            _ if state.guest_eof && state.readable == 0 => {
                return Err(InvokeError::Truncated { received, expected: frame.expected() })
            }
            _ => {}
        }
        // `run` returns Idle without entering the guest when the devices have nothing for
        // it: then nothing will ever change.
        if stop == RunStop::Idle && vm.stats().entries == entries_before {
            return Err(InvokeError::Stalled { received });
        }
    }
}

impl Classify for InvokeError {
    fn kind(&self) -> FailureKind {
        match self {
            InvokeError::Guest(e) => e.kind(),
            InvokeError::RequestTooLarge(e) => e.kind(),
            InvokeError::Function { .. } => FailureKind::FunctionError,
            InvokeError::ExitedBeforeReady(_) | InvokeError::ExitedDuringRequest(_) => FailureKind::GuestCrash,
            InvokeError::NeverReady
            | InvokeError::Device(_)
            | InvokeError::Refused { .. }
            | InvokeError::Reset { .. }
            | InvokeError::Truncated { .. }
            | InvokeError::UnknownOutcome(_)
            | InvokeError::PastTheFrame(_)
            | InvokeError::ResponseTooLarge { .. }
            | InvokeError::Stalled { .. } => FailureKind::GuestProtocol,
            InvokeError::ResponseBudget(e) => e.kind(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_over_the_announced_limit_names_it_and_the_memory() {
        assert_eq!(RequestTooLarge::check(10, 10, 64 << 20), Ok(()));
        let e = RequestTooLarge::check(11, 10, 64 << 20).unwrap_err();
        assert_eq!(e.kind(), FailureKind::BadInput);
        let text = e.to_string();
        assert!(text.contains("11 bytes") && text.contains("10 bytes") && text.contains("64 MiB"), "{text}");
        assert!(text.contains("--mem-mib"), "{text}");
    }

    #[test]
    fn a_function_error_shows_no_control_characters() {
        let e = InvokeError::Function { message: "bad\u{1b}[2Jinput\n".into() };
        assert_eq!(e.to_string(), "the function failed: bad\u{fffd}[2Jinput\u{fffd}");
        assert_eq!(e.kind(), FailureKind::FunctionError);
    }
}
