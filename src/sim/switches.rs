//! Test-only switches of the core simulator's mutations that need a hook in a production path
//! (`refundgate sim --core --core-mutation M`). Compiled only with the `sim-mutations` feature,
//! which the test builds turn on and no user build does. Per thread, so a mutated run never
//! leaks into a test running beside it (the core simulator drives everything, its upstream
//! links and store-and-forward queue included, on one thread).

use std::cell::Cell;

/// One re-introduced bug with a hook outside the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// `flow` applies a decline without journaling it.
    DeclinesNotJournaled,
    /// `flow` keeps a routed request's reservation when the host timed out.
    HoldNotReleased,
    /// `upstream` answers a timed-out request 91 without queuing its reversal.
    ReversalNotQueued,
    /// Store-and-forward retries leave the MTI's origin digit alone (0400 again, not 0401): the
    /// host takes each retry for a new reversal.
    RepeatsUnmarked,
}

thread_local! {
    static ON: Cell<Option<Switch>> = const { Cell::new(None) };
}

/// Turns `switch` on (or every switch off, `None`) for code running on this thread.
pub fn set(switch: Option<Switch>) {
    ON.with(|c| c.set(switch));
}

fn is_on(switch: Switch) -> bool {
    ON.with(Cell::get) == Some(switch)
}

/// Turns the declines-not-journaled mutation on or off for gateways deciding on this thread.
pub fn set_declines_not_journaled(on: bool) {
    set(on.then_some(Switch::DeclinesNotJournaled));
}

/// Whether `flow` leaves declines out of the journal (the bug).
pub(crate) fn declines_not_journaled() -> bool {
    is_on(Switch::DeclinesNotJournaled)
}

/// Whether `flow` keeps the reservation of a request whose host timed out (the bug).
pub(crate) fn hold_not_released() -> bool {
    is_on(Switch::HoldNotReleased)
}

/// Whether `upstream` skips the reversal of a timed-out request (the bug).
pub(crate) fn reversal_not_queued() -> bool {
    is_on(Switch::ReversalNotQueued)
}

/// Whether a store-and-forward retry goes out unmarked (the bug).
pub(crate) fn repeats_unmarked() -> bool {
    is_on(Switch::RepeatsUnmarked)
}
