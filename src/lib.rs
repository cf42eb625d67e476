//! refundgate: an ISO 8583 refund/void switch.
//!
//! # Layout
//! - [`iso8583`]: spec-driven, zero-copy codec for the `ascii1987` and `cup_pos` dialects (sans-IO).
//! - [`mac`]: DE64/DE128 MACs (CUP POS, ANSI X9.19, AES-CMAC) and CUP sign-on key recovery.
//! - [`ledger`]: sans-IO merchant ledger and refund/void policy engine (DOMAIN §3–§6, §9).
//! - [`explain`]: a reason and its figures as one English and one Chinese sentence.
//! - [`cli`]: the command line (`decode`, `encode`, `serve`, …).
//! - [`clock`]: the injectable time source; [`limits`]: every named bound.
<<<<<<< HEAD
pub mod cli;
=======
//! - [`journal`]: durable, group-committed journal of ledger events; snapshots, recovery, verify.
>>>>>>> journal
pub mod clock;
pub mod explain;
pub mod iso8583;
<<<<<<< HEAD
pub mod ledger;
=======
pub mod journal;
>>>>>>> journal
pub mod limits;
pub mod mac;
