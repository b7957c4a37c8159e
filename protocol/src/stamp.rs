//! Free stamps: cheap happens-before edges between threads.
//!
//! Each thread's events are ordered, but threads are not ordered against each other: when thread
//! C frees a block that thread A allocated and thread B then gets the same address back, the
//! collector sees three streams and cannot tell `A→C→B` from `B→C→A` by per-thread order alone.
//!
//! The free hook therefore writes one keyed word, the *stamp*, into the block it is about to free,
//! at [`crate::event::chunk::stamp_front`] (and [`crate::event::chunk::stamp_end`]) — words glibc never
//! writes in a free chunk. The
//! stamp names the free event's position in its stream. An allocation hook that later finds a
//! genuine stamp in the block it returns has proof that this free happened before it, and
//! records the stamp (when it names another stream). The collector orders the allocation after
//! that free. A stamp that survived a split, a merge or a realloc copy still names a free that
//! happened earlier, so every genuine stamp is a true edge; the key makes application data that
//! looks like a stamp vanishingly unlikely, and the collector validates each reference.
//!
//! Layout before keying (`stamp ^ key`):
//!
//! ```text
//! bits 52..64  MAGIC           (12 bits: a random word passes for a stamp once in 4096)
//! bits 32..52  stream id       (20 bits)
//! bits 14..32  block sequence  (18 bits, wraps; the collector resolves it near its frontier)
//! bits  0..14  word offset of the free event in its block
//! ```
//!
//! Blocks a fork child inherits still hold its parent's stamps, made with the parent's key: the
//! magic rejects almost all, and the collector rejects references beyond what a stream wrote.

pub const MAGIC: u64 = 0xA5C;
pub const STREAM_BITS: u32 = 20;
pub const SEQ_BITS: u32 = 18;
pub const WORD_BITS: u32 = 14;
const MAGIC_SHIFT: u32 = STREAM_BITS + SEQ_BITS + WORD_BITS;

/// A decoded stamp: the position of a free event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StampRef {
    pub stream: u32,
    /// Block sequence number modulo `2^SEQ_BITS`.
    pub seq_low: u32,
    pub word: u32,
}

#[inline(always)]
pub const fn encode(key: u64, stream: u32, block_seq: u32, word: u32) -> u64 {
    let raw = (MAGIC << MAGIC_SHIFT)
        | (((stream as u64) & ((1 << STREAM_BITS) - 1)) << (SEQ_BITS + WORD_BITS))
        | (((block_seq as u64) & ((1 << SEQ_BITS) - 1)) << 14)
        | ((word as u64) & ((1 << WORD_BITS) - 1));
    raw ^ key
}

/// Does `word` look like a stamp made with `key`? (Cheap pre-filter used by the preload.)
#[inline(always)]
pub const fn looks_genuine(key: u64, word: u64) -> bool {
    (word ^ key) >> MAGIC_SHIFT == MAGIC
}

pub const fn decode(key: u64, word: u64) -> Option<StampRef> {
    let raw = word ^ key;
    if raw >> MAGIC_SHIFT != MAGIC {
        return None;
    }
    Some(StampRef {
        stream: ((raw >> (SEQ_BITS + WORD_BITS)) & ((1 << STREAM_BITS) - 1)) as u32,
        seq_low: ((raw >> 14) & ((1 << SEQ_BITS) - 1)) as u32,
        word: (raw & ((1 << WORD_BITS) - 1)) as u32,
    })
}

/// Stream ids must fit the stamp.
pub const MAX_STREAMS: u32 = 1 << STREAM_BITS;

/// The full block sequence number nearest to `frontier` whose low bits are `seq_low`.
pub const fn resolve_seq(seq_low: u32, frontier: u64) -> u64 {
    let m = 1u64 << SEQ_BITS;
    let base = frontier & !(m - 1);
    let cand = base | seq_low as u64;
    // Choose among cand - m, cand, cand + m the one closest to the frontier.
    if cand > frontier + m / 2 && cand >= m {
        cand - m
    } else if cand + m / 2 < frontier {
        cand + m
    } else {
        cand
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let key = 0x1234_5678_9abc_def0;
        let s = encode(key, 77, 123_456, 8000);
        assert!(looks_genuine(key, s));
        assert_eq!(decode(key, s), Some(StampRef { stream: 77, seq_low: 123_456 & ((1 << SEQ_BITS) - 1), word: 8000 }));
        assert_eq!(decode(key ^ 1 << 60, s), None);
    }

    #[test]
    fn seq_resolution_near_frontier() {
        let m = 1u64 << SEQ_BITS;
        assert_eq!(resolve_seq(5, 10), 5);
        assert_eq!(resolve_seq(5, 0), 5);
        assert_eq!(resolve_seq((m - 2) as u32, m + 3), m - 2);
        assert_eq!(resolve_seq(1, m - 2), m + 1);
        assert_eq!(resolve_seq(7, 3 * m + 7), 3 * m + 7);
    }
}
