//! The `refundgate` binary: subcommands over the library (see `refundgate --help`).

/// mimalloc: the request path allocates and frees many small buffers from several threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    refundgate::cli::run()
}
