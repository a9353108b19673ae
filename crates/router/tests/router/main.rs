//! Router integration tests: a real router on loopback in front of fake prefill/decode instances
//! (one test binary; the harness lives in `tests/common/`).

#![expect(
    clippy::unwrap_used,
    reason = "the harness outside #[test] functions panics on failed setup, like the tests"
)]

#[path = "../common/mod.rs"]
mod common;

mod api;
mod failures;
mod pairs;
mod policies;
mod validation;
