//! What a call of a function comes to: a response, or an error whose message goes back to the
//! caller as an outcome of its own (`mu2_abi::frame::outcome::FUNCTION_ERROR`), neither a crash
//! nor a success.
//!
//! A function may return its response as it is (`Vec<u8>`, or an [`http::Response`]) or in a
//! `Result` whose error implements `Display`; [`IntoOutcome`] turns each into an [`Outcome`].
//!
//! [`http::Response`]: crate::http::Response

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Display;

use mu2_abi::frame::outcome;

/// What one call of a function came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The response bytes.
    Response(Vec<u8>),
    /// The function failed; this is its message.
    Error(String),
}

impl Outcome {
    /// The outcome code and the bytes that follow it on the wire.
    pub(crate) fn into_frame(self) -> (u32, Vec<u8>) {
        match self {
            Outcome::Response(bytes) => (outcome::OK, bytes),
            Outcome::Error(message) => (outcome::FUNCTION_ERROR, message.into_bytes()),
        }
    }
}

/// What a function may return.
pub trait IntoOutcome {
    /// The outcome this return value stands for.
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Outcome {
        self
    }
}

impl IntoOutcome for Vec<u8> {
    fn into_outcome(self) -> Outcome {
        Outcome::Response(self)
    }
}

impl<E: Display> IntoOutcome for Result<Vec<u8>, E> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(bytes) => Outcome::Response(bytes),
            Err(e) => Outcome::Error(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_become_outcomes() {
        assert_eq!(b"ok".to_vec().into_outcome().into_frame(), (outcome::OK, b"ok".to_vec()));
        let failed: Result<Vec<u8>, &str> = Err("bad argument");
        assert_eq!(failed.into_outcome().into_frame(), (outcome::FUNCTION_ERROR, b"bad argument".to_vec()));
        let fine: Result<Vec<u8>, &str> = Ok(b"x".to_vec());
        assert_eq!(fine.into_outcome(), Outcome::Response(b"x".to_vec()));
    }
}
