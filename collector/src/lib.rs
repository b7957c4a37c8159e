//! `mtracer`: the collector side of mtrace.
//!
//! * [`record`] — launching a command under `libmtrace.so` (or serving a standalone preload),
//!   moving events from shared-memory rings into a trace file, sampling RSS.
//! * [`analysis`] — rebuilding each process image's history from a trace: merging per-thread
//!   streams exactly, the live set, counters and the timeline. Knows nothing of presentation.
//! * [`report`] — the summary (`mtracer report`) as text or JSON, built from analysis results.
//! * [`dashboard`] — `mtracer view`: the terminal dashboard on the report's numbers.
//! * [`symbols`] — symbolisation of allocation stacks (blazesym), once per distinct address.
//! * [`export`] — massif, folded stacks, flamegraph SVG and CSV exports.
//! * [`files`] — creating the files mtracer writes: `0600`, never through a symbolic link.
//! * [`cli`] — command-line parsing and dispatch.

pub mod analysis;
pub mod cli;
pub mod clock;
pub mod dashboard;
pub mod export;
pub mod files;
pub mod progress;
pub mod record;
pub mod report;
pub mod symbols;
pub mod trace;
