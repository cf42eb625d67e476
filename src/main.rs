//! The `refundgate` binary: subcommands over the library (see `refundgate --help`).
fn main() -> std::process::ExitCode {
    refundgate::cli::run()
}
