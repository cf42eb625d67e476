//! Test-only switch of the simulator's `reversal-applied-twice` mutation (issue 17: the
//! simulator must catch a reversal that gives money back twice). Compiled only with the
//! `sim-mutations` feature, which the test builds turn on and no user build does.
//!
//! The ledger makes a reversal idempotent by the state of its target (a reversed refund is
//! not given back again), so no wrong use of its API can apply a reversal twice; the bug has
//! to be put back here, where the state check is. The switch is per thread, so a mutated run
//! never leaks into a test running beside it.

use std::cell::Cell;

thread_local! {
    static REVERSAL_APPLIED_TWICE: Cell<bool> = const { Cell::new(false) };
}

/// Turns the mutation on or off for the ledgers used on this thread.
pub fn set_reversal_applied_twice(on: bool) {
    REVERSAL_APPLIED_TWICE.with(|c| c.set(on));
}

/// Whether a reversal of an already reversed transaction undoes it again (the bug).
pub(crate) fn reversal_applied_twice() -> bool {
    REVERSAL_APPLIED_TWICE.with(Cell::get)
}
