//! How the daemon answers a failure of the library: one HTTP status and one
//! `mu2_requests_total` outcome per [`FailureKind`], so that the same failure gives the same
//! status from `POST /images/{name}/invoke`, from a dispatcher route and from `PUT`.
//!
//! The daemon's own refusals (400 for a malformed request or setting, 404, 405, 409, 411, 413,
//! 431, 429 for `--max-vms`, 503 while shutting down) are not failures of the library: their
//! statuses stay where the daemon decides them.

use super::metrics::Outcome;
use crate::error::FailureKind;

/// The HTTP status of a library failure of this kind.
pub(super) fn status(kind: FailureKind) -> u16 {
    match kind {
        FailureKind::BadInput => 400,
        // The guest is the upstream the daemon answers for.
        FailureKind::GuestCrash | FailureKind::GuestProtocol => 502,
        // The function itself failed: the daemon relays its message.
        FailureKind::FunctionError => 500,
        FailureKind::Timeout => 504,
        // The same request may succeed later, or on another host.
        FailureKind::KvmUnavailable | FailureKind::ResourceExhausted => 503,
        FailureKind::Internal => 500,
    }
}

/// The `outcome` label of a request that failed with this kind.
pub(super) fn outcome(kind: FailureKind) -> Outcome {
    match kind {
        FailureKind::Timeout => Outcome::Timeout,
        FailureKind::GuestCrash | FailureKind::GuestProtocol => Outcome::GuestError,
        FailureKind::FunctionError => Outcome::FunctionError,
        FailureKind::BadInput
        | FailureKind::KvmUnavailable
        | FailureKind::ResourceExhausted
        | FailureKind::Internal => Outcome::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_status_and_outcome() {
        let table = [
            (FailureKind::BadInput, 400, Outcome::Error),
            (FailureKind::GuestCrash, 502, Outcome::GuestError),
            (FailureKind::GuestProtocol, 502, Outcome::GuestError),
            (FailureKind::FunctionError, 500, Outcome::FunctionError),
            (FailureKind::Timeout, 504, Outcome::Timeout),
            (FailureKind::KvmUnavailable, 503, Outcome::Error),
            (FailureKind::ResourceExhausted, 503, Outcome::Error),
            (FailureKind::Internal, 500, Outcome::Error),
        ];
        assert_eq!(table.map(|(kind, ..)| kind), FailureKind::ALL, "the table lists every kind once");
        for (kind, want_status, want_outcome) in table {
            assert_eq!((status(kind), outcome(kind)), (want_status, want_outcome), "{kind}");
        }
    }
}
