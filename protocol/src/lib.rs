//! What `libmtrace.so` (the preload) and `mtracer` (the collector) share.
//!
//! * [`event`] — the event records a traced thread writes, word by word.
//! * [`order`] — ordering cells, the happens-before edges that make cross-thread reconstruction exact.
//! * [`ring`] — the shared-memory ring that carries events from threads to the collector.
//! * [`control`] — the handshake over the control socket (Hello / Welcome / Bye).
//! * [`tracefile`] — the `.mtr` trace file format (its reader and writer are in the collector).
//!
//! The crate is `no_std` and allocation-free: the preload uses it from inside `malloc`.
#![cfg_attr(not(test), no_std)]

pub mod control;
pub mod event;
pub mod ring;
pub mod order;
pub mod tracefile;
