//! Process exit codes of every subcommand, in one leaf module (sysexits.h where one fits), so
//! `cli`, `serve`, `host`, `load` and the journal name them without importing each other.

/// `refundgate load`: the run finished but some answers did not match.
pub const EXIT_MISMATCH: u8 = 1;
/// `refundgate load`: every answer matched, but requests failed (timeouts, broken connections).
pub const EXIT_ERRORS: u8 = 2;
/// A bad configuration or bad arguments (`EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// Bad input data (`EX_DATAERR`).
pub const EXIT_DATAERR: u8 = 65;
/// A target could not be reached, or its setup steps failed (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// The program itself failed, or a caller misused an API (`EX_SOFTWARE`).
pub const EXIT_SOFTWARE: u8 = 70;
/// An operating-system resource could not be had, e.g. a port cannot be bound (`EX_OSERR`).
pub const EXIT_OSERR: u8 = 71;
/// Storage that cannot be used (`EX_IOERR`).
pub const EXIT_IOERR: u8 = 74;
