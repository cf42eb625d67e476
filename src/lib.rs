//! refundgate: an ISO 8583 refund/void switch.
//!
//! # Layout
//! - [`iso8583`]: spec-driven, zero-copy codec for the `ascii1987` and `cup_pos` dialects (sans-IO).
//! - [`clock`]: the injectable time source; [`limits`]: every named bound.
//! - [`journal`]: durable, group-committed journal of ledger events; snapshots, recovery, verify.
pub mod clock;
pub mod iso8583;
pub mod journal;
pub mod limits;
