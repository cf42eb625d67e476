//! refundgate: an ISO 8583 refund/void switch.
//!
//! # Layout
//! - [`iso8583`]: spec-driven, zero-copy codec for the `ascii1987` and `cup_pos` dialects (sans-IO).
//! - [`frame`]: length headers (`binary2`, `ascii4`, `bcd2`) and the `cup_pos` TPDU + header,
//!   as tokio-util codecs.
//! - [`server`]: TLS listeners, pipelined connections, graceful shutdown, admin HTTP; talks to
//!   the message layer only through the [`server::Dispatch`] seam.
//! - [`config`]: the one validated configuration struct; [`telemetry`]: logging and metrics.
//! - [`clock`]: the injectable time source; [`limits`]: every named bound.
pub mod clock;
pub mod config;
pub mod frame;
pub mod iso8583;
pub mod limits;
pub mod server;
pub mod telemetry;
