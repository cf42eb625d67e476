//! refundgate: an ISO 8583 refund/void switch.
//!
//! # Layout
//! - [`iso8583`]: spec-driven, zero-copy codec for the `ascii1987`, `cup_pos` and `iso87b` dialects
//!   (sans-IO); encodings (BCD, EBCDIC, BER-TLV) are spec properties.
//! - [`dialect`]: a dialect as one value from data (`specs/NAME.toml` elements + `specs/NAME.dialect.toml`
//!   framing, classification, original keys, response-code column, echoed fields).
//! - [`frame`]: length headers and the CUP TPDU + header as tokio-util codecs.
//! - [`mac`]: DE64/DE128 MACs (CUP POS, ANSI X9.19, AES-CMAC) and CUP sign-on key recovery.
//! - [`ledger`]: sans-IO merchant ledger and refund/void policy engine (DOMAIN §3–§6, §9).
//! - [`journal`]: durable, group-committed journal of ledger events; snapshots, recovery, verify.
//! - [`flow`]: decoded message → ledger decision → response, per dialect and transaction kind.
//! - [`admin`]: the authenticated admin API (JSON): merchants, decision trails, what would pass, top-up, settlement.
//! - [`serve`]: the `serve` command: configuration, journal recovery, gateway, listeners.
//! - [`explain`]: a reason and its figures as one English and one Chinese sentence.
//! - [`server`]: TLS listeners, connections (pipelining, limits, shutdown), admin HTTP.
//! - [`config`]: the gateway's configuration, read once and validated before any bind.
//! - [`telemetry`]: logging and Prometheus metrics.
//! - [`terminal_keys`]: terminal master keys, sign-on working keys, client certificate identities.
//! - [`upstream`]: multiplexed TLS links to bank hosts, routing, persistent store-and-forward.
//! - [`host_sim`]: `refundgate host`, a stand-in bank host with run-time fault controls.
//! - [`cli`]: the command line (`decode`, `encode`, `serve`, `host`, …).
//! - [`clock`]: the injectable time source; [`limits`]: every named bound.
//! - [`replay`]: `refundgate replay`, policy what-if replay of a journal (read-only).
//! - [`ratelimit`]: fixed-window limits per key (bad-input log lines, sign-ons per terminal).
//! - [`load`]: the load generator (`refundgate load`): scenario replay over TLS, every answer verified.
pub mod admin;
pub mod at_rest;
pub mod cli;
pub mod clock;
pub mod config;
pub mod date;
pub mod dialect;
pub mod exit;
pub mod explain;
pub mod flow;
pub mod frame;
pub mod host_sim;
pub mod iso8583;
pub mod journal;
pub mod ledger;
pub mod limits;
pub mod load;
pub mod mac;
pub mod ratelimit;
pub mod replay;
pub mod serve;
pub mod server;
pub mod sim;
pub mod telemetry;
pub mod terminal_keys;
pub mod upstream;
