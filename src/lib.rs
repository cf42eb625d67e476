//! refundgate: an ISO 8583 refund/void switch.
//!
//! # Layout
//! - [`iso8583`]: spec-driven, zero-copy codec for the `ascii1987` and `cup_pos` dialects (sans-IO).
//! - [`cli`]: the command line (`decode`, `encode`, `serve`, …).
//! - [`clock`]: the injectable time source; [`limits`]: every named bound.
//! - [`load`]: the load generator (`refundgate load`): scenario replay over TLS, every answer verified.
pub mod cli;
pub mod clock;
pub mod iso8583;
pub mod limits;
pub mod load;
