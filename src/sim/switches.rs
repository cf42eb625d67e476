//! Test-only switches of the core simulator's mutations that need a hook in a production path
//! (`refundgate sim --core --mutation declines-not-journaled`). Compiled only with the
//! `sim-mutations` feature, which the test builds turn on and no user build does. Per thread,
//! so a mutated run never leaks into a test running beside it.

use std::cell::Cell;

thread_local! {
    static DECLINES_NOT_JOURNALED: Cell<bool> = const { Cell::new(false) };
}

/// Turns the mutation on or off for gateways deciding on this thread.
pub fn set_declines_not_journaled(on: bool) {
    DECLINES_NOT_JOURNALED.with(|c| c.set(on));
}

/// Whether `flow` leaves declines out of the journal (the bug).
pub(crate) fn declines_not_journaled() -> bool {
    DECLINES_NOT_JOURNALED.with(Cell::get)
}
