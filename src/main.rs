//! The `refundgate` binary: subcommands over the library.
fn main() {}
