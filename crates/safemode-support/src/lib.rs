//! Small helpers that every safemode crate shares and none of them owns, in
//! the spirit of rust-analyzer's `stdx`: nothing of the domain, the wire or
//! the store lives here.
//!
//! - [`backoff`]: jittered exponential backoff for every reconnect loop.
//! - [`errors`]: error chains rendered for people.
//! - [`files`]: files written whole, atomically and durably.
//! - [`pem`]: certificate and key files read and checked up front.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod errors;
pub mod files;
pub mod pem;
