//! The trace file (`.mtr`) format: what `mtracer record` writes and every offline command reads.
//!
//! This module is the specification (layout, constants, record codes). The reader and writer
//! live in the collector (`mtrace_collector::trace`), the only side that touches files.
//!
//! ```text
//! file    := file_header frame*
//! file_header (16 B) := magic "\x89MTRACE\n" | version u32 (= 5) | header_len u32 (= 16)
//! frame   := frame_header payload
//! frame_header (24 B) := "MTFR" | raw_len u32 | stored_len u32 | crc32 u32 | seq u64
//! crc32   := CRC-32 (IEEE) of raw_len, stored_len and seq as the header holds them (header
//!            bytes 4..12 and 16..24), then of the stored payload
//! payload := one zstd frame of raw_len bytes, stored_len bytes long (version 4: an lz4 block,
//!            lz4_flex `block` format)
//! raw     := record*
//! record  := type u8 | 0 u8 | 0 u16 | body_len u32 | body | zero padding to 8 bytes
//! ```
//!
//! Frames are self-contained (each decompresses alone) and appended (and flushed) as the
//! recording goes, so a file whose writer was killed is readable up to its last whole frame.
//! `seq` is the frame's position in the file: 0 for the first frame, then one more for each. A
//! reader checks it, so a frame duplicated, moved or missing (a file spliced or copied wrong) is
//! an error at that frame's offset, not a silently different history; the checksum covers it, so
//! a damaged `seq` is a checksum error. Frames cannot be told from a complete file's end: a file
//! cut at a frame boundary reads as a recording that stopped there (it has no `SessionEnd`).
//! Readers report a truncated or corrupt frame with its byte offset and never panic, and never
//! hold more than one frame (at most [`MAX_FRAME_RAW`] bytes) in memory for it.
//!
//! Record bodies (little-endian):
//!
//! | type | record | body |
//! |---|---|---|
//! | 1 | `Session` | TLVs (see [`session_tag`]) |
//! | 2 | `ProcessStart` | image u32, pid u32, ppid u32, parent_image u32 (`u32::MAX`: none), origin u32, 0 u32, fork_seq u64, time_ns u64, hello bytes (see [`crate::control`]) |
//! | 3 | `Chunk` | image u32, stream u32, tid u32, block_seq u32, offset u32 (bytes into the block), encoding u32, payload (see [`chunk_encoding`]) |
//! | 4 | `Rss` | image u32, 0 u32, time_ns u64, rss_bytes u64 |
//! | 5 | `ProcessEnd` | image u32, reason u32, time_ns u64, rss_bytes u64, hwm_bytes u64, dropped_events u64, dropped_blocks u64, status i64 |
//! | 6 | `SessionEnd` | time_ns u64, exit_status i64 |
//! | 7 | `Note` | image u32 (`u32::MAX`: session), 0 u32, UTF-8 text |
//! | 8 | `Sync` | image u32, 0 u32, pass_start_ns u64 |
//! | 9 | `Smaps` | image u32, count u32, time_ns u64, then `count` mappings of 3 × u64: start \| kind (in the 12 low bits, see [`map_kind`]), end, rss_bytes |
//! | 10 | `TracingStopped` | image u32, reason u32 (see [`crate::ring::detach_reason`]), time_ns u64, untraced_calls u64, timeout_ms u32, 0 u32 |
//!
//! A `Chunk`'s payload is, as the recorder writes it, the number of event words (u32) followed by
//! their compact encoding ([`chunk_encoding::COMPACT`], see `mtrace_collector::trace::compact`):
//! the events with what a model of the stream predicts taken out, a few bytes each, which the
//! frame's zstd then compresses. Readers also take the event words themselves
//! ([`chunk_encoding::WORDS`]), and, from version 4 files, raw_len u32 followed by an lz4 block
//! of those `raw_len` bytes ([`chunk_encoding::LZ4`]).
//!
//! `Sync` marks the end of one pass of the collector over an image's ring: every event published
//! before that pass began appears in the file before the record. An event read in a pass has all
//! the events that causally precede it (published before it) in the file by the end of the next
//! pass, so the analysis treats an event as complete-in-context two `Sync`s after it.
//! `pass_start_ns` is the clock the collector wrote into the ring as that pass began: an event
//! time-marked with it or later was written after every event read in earlier passes.
//!
//! `TracingStopped` says that the process stopped tracing on its own before it ended — the
//! recorder did not answer (its ring full, its clock still) for the detach timeout — when (the
//! process's clock), why, and how many calls it counted after that (a lower bound: threads still
//! running at exit are not counted). The image's events end there; its `ProcessEnd` follows.
//!
//! `Smaps` is a sample of `/proc/<pid>/smaps` taken by the recorder (the resident bytes of each
//! mapping, `Rss:`), at the time its reading began: every mapping with resident bytes, and every
//! `[heap]` and unnamed anonymous mapping even when nothing of it is resident; the trace ring's
//! own mapping is left out. A mapping's start is page-aligned: its 12 low bits hold its
//! [`map_kind`] (a reader maps a code it does not know to `OTHER`). A record whose length does
//! not match its count, or a mapping that ends before it starts, is corruption.
//!
//! Times are CLOCK_MONOTONIC nanoseconds of the recording machine (the same clock as the events'
//! `Time` records). A stream is one thread of one process image; its chunks appear in order and
//! concatenate to the thread's event words (see [`crate::event`]).


pub const FILE_MAGIC: [u8; 8] = *b"\x89MTRACE\n";
/// The version written.
pub const FORMAT_VERSION: u32 = 5;
/// The oldest version readers accept. Version 3 replaced the free stamps of versions 1 and 2
/// (words the preload left inside freed chunks) with ordering cells (`after` words, see
/// [`crate::order`]): the events' flag bits and words changed meaning, and the analysis no longer
/// has the search that ordered threads from stamps. Version 4 gave frames their sequence number
/// (`seq`, covered by the checksum) and grew the frame header from 16 to 24 bytes. Older files
/// are named, not misread. Version 5 compresses frames with zstd instead of lz4 and writes
/// chunks in the compact encoding; version 4 files are read as they are.
pub const MIN_FORMAT_VERSION: u32 = 4;
/// The last version whose frames are lz4 blocks.
pub const LAST_LZ4_VERSION: u32 = 4;
/// The last version without frame sequence numbers (16-byte frame headers).
pub const LAST_UNSEQUENCED_VERSION: u32 = 3;
pub const FILE_HEADER_LEN: usize = 16;
pub const FRAME_MAGIC: [u8; 4] = *b"MTFR";
pub const FRAME_HEADER_LEN: usize = 24;
/// Upper bound on a frame's raw size; larger claims are corruption.
pub const MAX_FRAME_RAW: usize = 64 << 20;
/// `image` value meaning "no process image" (session-level notes, roots without parent).
pub const NO_IMAGE: u32 = u32::MAX;

/// How a `Chunk` record carries its event words (the u32 after `offset`).
pub mod chunk_encoding {
    /// The words, little-endian.
    pub const WORDS: u32 = 0;
    /// raw_len u32, then an lz4 block (lz4_flex `block` format) of the words' `raw_len` bytes.
    pub const LZ4: u32 = 1;
    /// Largest `raw_len` a reader accepts (a ring block is at most 128 KiB).
    pub const MAX_RAW: u32 = 16 << 20;
    /// words u32, then the words' compact encoding (at most `MAX_RAW / 8` words).
    pub const COMPACT: u32 = 2;
}

/// Session TLV tags (record type 1).
pub mod session_tag {
    pub const MTRACER_VERSION: u16 = 1;
    /// One per argument of the traced command.
    pub const COMMAND_ARG: u16 = 2;
    pub const START_REALTIME_NS: u16 = 3;
    pub const START_MONOTONIC_NS: u16 = 4;
    pub const SAMPLE_PERIOD_NS: u16 = 5;
    pub const LOSSY: u16 = 6;
    pub const HOSTNAME: u16 = 7;
    /// Period of the `Smaps` samples in ns (0: none were taken).
    pub const SMAPS_PERIOD_NS: u16 = 8;
}

/// Why a process image's connection ended (`ProcessEnd::reason`).
pub mod end_reason {
    /// The image said Bye (normal exit) and then closed its connection.
    pub const EXITED: u32 = 1;
    /// The connection closed without Bye: killed, crashed, or `exec` replaced the image.
    pub const VANISHED: u32 = 2;
    /// The recording stopped while the image was still running.
    pub const DETACHED: u32 = 3;
    /// The process exec'd: a new image with the same pid replaced this one.
    pub const EXECED: u32 = 4;
}

pub mod record_type {
    pub const SESSION: u8 = 1;
    pub const PROCESS_START: u8 = 2;
    pub const CHUNK: u8 = 3;
    pub const RSS: u8 = 4;
    pub const PROCESS_END: u8 = 5;
    pub const SESSION_END: u8 = 6;
    pub const NOTE: u8 = 7;
    pub const SYNC: u8 = 8;
    pub const SMAPS: u8 = 9;
    pub const TRACING_STOPPED: u8 = 10;
}

/// Bytes per mapping in a `Smaps` record.
pub const SMAPS_ENTRY_LEN: usize = 24;
/// The low bits of a `Smaps` mapping's first word that hold its kind.
pub const SMAPS_KIND_MASK: u64 = 0xfff;

/// Kinds of mappings in `Smaps` records, from the mapping's name in `/proc/<pid>/smaps`.
pub mod map_kind {
    /// `[heap]`.
    pub const HEAP: u64 = 1;
    /// Anonymous, no name.
    pub const ANON: u64 = 2;
    /// A path (files, libraries, memfd and shm mappings).
    pub const FILE: u64 = 3;
    /// `[stack]`.
    pub const STACK: u64 = 4;
    /// Anything else (`[vdso]`, `[vvar]`, `[anon:<name>]`, …).
    pub const OTHER: u64 = 5;
}
