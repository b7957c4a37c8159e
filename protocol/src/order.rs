//! Ordering cells: the happens-before edges that make the history of every address exact.
//!
//! Each thread's events are ordered; threads are not ordered against each other. When thread A
//! allocates an address, thread C frees it and thread B gets it back, the collector sees three
//! streams and must know that B's allocation came after C's free (and that C's free ended A's
//! block, not B's). Time marks cannot say so (a few µs of resolution, and a thread can be
//! preempted between a call and its event); anything written *inside* the freed chunk cannot
//! either (calloc zeroes it, glibc's tcache, fastbin and bin pointers overwrite it, the program
//! refills it). So the facts live outside every chunk.
//!
//! ## The cells
//!
//! Each traced process image has a private side table of 64-bit *cells*, indexed by a hash of
//! the block's address ([`cell_index`]), in anonymous memory of the preload's own (wiped in a
//! fork child). A cell holds the stream [`position`] of the last event that wrote it, or 0.
//!
//! * A **free** (or a `realloc` of a non-null block, before it calls the real `realloc`) swaps
//!   its own position into the cell with one atomic exchange (`xchg`), *before* the real `free`
//!   runs, and records the value it replaced.
//! * An **allocation** (malloc, calloc, realloc's new block, the memalign family, valloc,
//!   pvalloc) loads the cell of the address it returns, *after* the real call returned, and
//!   records the value it found.
//!
//! A recorded value is only written into the event when it names *another* stream ([`foreign`]):
//! a thread's own earlier events precede it anyway. The event then carries it as an `after`
//! word (see [`crate::event`]).
//!
//! ## Why the history is exact
//!
//! All exchanges and loads of one cell are totally ordered (cache coherence; an exchange reads
//! the value it replaces atomically), so the exchanges of a cell form a chain: every one names its
//! predecessor. An allocation's load sits between two consecutive exchanges of that chain: after
//! the one it read, before the next.
//!
//! For one address `a` with lifetimes `alloc₁ free₁ alloc₂ free₂ …`:
//! * `freeₖ(a)` exchanges before glibc gets the block back, and `allocₖ₊₁(a)` loads after glibc
//!   handed it out again; glibc's own synchronisation (arena lock, or the same thread's tcache)
//!   orders the two. So `allocₖ₊₁(a)` read `freeₖ(a)` or a later exchange of the same cell (a
//!   free of another address that hashes there).
//! * The merger applies every exchange after its predecessor and every allocation after the
//!   exchange it read. So once `allocₖ₊₁(a)` is applied, everything up to `freeₖ(a)` in the
//!   chain is: the allocation never comes before the free of the previous block.
//! * `freeₖ₊₁(a)` exchanges after `allocₖ₊₁(a)` loaded (the program had to get the block first),
//!   so it comes after `freeₖ(a)` in the chain: it never ends the previous block. It waits until
//!   `a` is live again, and the only allocation that can make it live is `allocₖ₊₁(a)` (a later
//!   one waits for `freeₖ₊₁(a)` itself).
//!
//! A realloc that moves its block is two calls in one: glibc takes the new block and releases
//! the old one inside it, so another thread can get the old block back (and read the realloc's
//! exchange) before the realloc returns, and the realloc's load of its new block's cell can read
//! a free that itself came after its exchange. The merger therefore applies a moved realloc in two
//! steps: the old block's release after `after_old`, the new block after `after`.
//!
//! Collisions (two addresses sharing a cell) only add true edges: the merger waits a little more,
//! never guesses. The atomic exchange is what makes them harmless — a plain load and store would
//! let two frees of colliding addresses both name the same predecessor and lose one of them
//! (measured: see `preload/src/order.rs`). Every edge is a real happens-before, so in a complete
//! trace the waits form no cycle (the merger still breaks one if lost data makes it, and counts
//! it).
//!
//! What the cells order is each *address*: its allocations and frees, so every block's lifetime
//! and the live set at every moment are exact. They do not order two different addresses whose
//! chunks glibc carves from the same memory (a freed block coalesced and split again at another
//! address): that matters only to the glibc model of chunks, which orders such pairs by time
//! marks and prefers to apply an allocation after the end of a live block its chunk overlaps (a
//! preference let go when nothing else can move; the stress fixtures measured 3–21 chunk
//! conflicts in 10^5–10^6 calls).
//!
//! A value can name an event the collector has not read yet: a thread exchanges before it
//! publishes the free's event, and may be preempted in between. The merger waits for it; it can
//! only be missing for good if the process was killed in that window (counted, and then it is
//! lost data, not a guess).
//!
//! ## Positions
//!
//! ```text
//! bits 40..64  stream id       (24 bits; stream 0 is never used, so 0 means "none")
//! bits 14..40  block sequence  (26 bits, wraps; resolved near the stream's frontier)
//! bits  0..14  word offset of the event in its block
//! ```
//!
//! A thread whose stream id does not fit (beyond 2^24 threads in one image) writes no positions:
//! its events are ordered by liveness and time marks alone.

/// Bits of a position.
pub const STREAM_BITS: u32 = 24;
pub const SEQ_BITS: u32 = 26;
pub const WORD_BITS: u32 = 14;
const SEQ_SHIFT: u32 = WORD_BITS;
const STREAM_SHIFT: u32 = WORD_BITS + SEQ_BITS;

/// Stream ids that fit a position: `1..MAX_STREAMS`.
pub const MAX_STREAMS: u32 = 1 << STREAM_BITS;

/// The position of the event at word `word` of block `seq` of stream `stream`.
#[inline(always)]
pub const fn position(stream: u32, seq: u32, word: u32) -> u64 {
    ((stream as u64) << STREAM_SHIFT) | (((seq as u64) & ((1 << SEQ_BITS) - 1)) << SEQ_SHIFT) | ((word as u64) & ((1 << WORD_BITS) - 1))
}

/// Does the cell value `v` name an event of another stream than the one whose block's position
/// base is `own` (any position of the thread's stream)?
#[inline(always)]
pub const fn foreign(v: u64, own: u64) -> bool {
    // Its stream is neither 0 nor ours: the product of two 24-bit numbers is 0 only if one is.
    (v >> STREAM_SHIFT).wrapping_mul((v ^ own) >> STREAM_SHIFT) != 0
}

/// A decoded position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ref {
    pub stream: u32,
    /// Block sequence number modulo `2^SEQ_BITS`.
    pub seq_low: u32,
    pub word: u32,
}

/// Decode a position (`None` for 0, "no event").
pub const fn decode(v: u64) -> Option<Ref> {
    let stream = (v >> STREAM_SHIFT) as u32;
    if stream == 0 {
        return None;
    }
    Some(Ref { stream, seq_low: ((v >> SEQ_SHIFT) & ((1 << SEQ_BITS) - 1)) as u32, word: (v & ((1 << WORD_BITS) - 1)) as u32 })
}

/// The full block sequence number whose low bits are `seq_low`, nearest to `frontier` (the
/// highest block of that stream known so far).
pub const fn resolve_seq(seq_low: u32, frontier: u64) -> u64 {
    let m = 1u64 << SEQ_BITS;
    let base = frontier & !(m - 1);
    let cand = base | seq_low as u64;
    if cand > frontier + m / 2 && cand >= m {
        cand - m
    } else if cand + m / 2 < frontier {
        cand + m
    } else {
        cand
    }
}

/// Bytes of address space per cell: glibc's chunks are 16-byte aligned and at least 32 bytes
/// long, so two blocks live at the same time never share a 32-byte granule (their user pointers
/// differ by 32 or more) and map to different cells within one table span.
pub const GRANULE_SHIFT: u32 = 5;

/// The cell of the block at `addr` in a table of `2^bits` cells. Consecutive granules map to
/// consecutive cells (so a heap's neighbouring blocks share cache lines of the table, as they
/// share the heap's); the number of the 64 MiB region an address lies in (glibc's thread-arena
/// heaps are 64 MiB aligned) is XORed in from bit 9 up, which moves a whole region by a multiple
/// of a page of cells, so that the heaps of different arenas — different threads — do not land
/// on the same cells (or cache lines). Three ALU operations, no multiplication.
#[inline(always)]
pub const fn cell_index(addr: u64, bits: u32) -> usize {
    cell_index_masked(addr, (1u64 << bits) - 1)
}

/// [`cell_index`] with the table's mask (`2^bits - 1`) at hand.
#[inline(always)]
pub const fn cell_index_masked(addr: u64, mask: u64) -> usize {
    (((addr >> GRANULE_SHIFT) ^ ((addr >> 17) & !0x1ff)) & mask) as usize
}

/// Default table: 2^18 cells — 2 MiB reserved, resident only where blocks are freed (a page of
/// cells per 128 KiB of heap; an allocation's load of a cell never written maps the kernel's
/// shared zero page, which no RSS counts), so at most 2 MiB resident however large the heap. Blocks 8 MiB
/// apart share cells: harmless (see the module docs), a little more waiting in the merger and an
/// occasional `after` word. Larger tables (`MTRACE_ORDER_CELLS`) trade memory for fewer shared
/// cache lines between threads.
pub const DEFAULT_CELL_BITS: u32 = 18;
/// Accepted sizes of the table (`MTRACE_ORDER_CELLS`, log2 of the number of cells).
pub const MIN_CELL_BITS: u32 = 10;
pub const MAX_CELL_BITS: u32 = 28;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip() {
        let v = position(77, 123_456, 8000);
        assert_eq!(decode(v), Some(Ref { stream: 77, seq_low: 123_456, word: 8000 }));
        assert_eq!(decode(0), None);
        let top = position(MAX_STREAMS - 1, (1 << SEQ_BITS) + 5, (1 << WORD_BITS) - 1);
        assert_eq!(decode(top), Some(Ref { stream: MAX_STREAMS - 1, seq_low: 5, word: (1 << WORD_BITS) - 1 }));
    }

    #[test]
    fn foreign_means_another_stream() {
        let own = position(3, 9, 0);
        assert!(!foreign(0, own), "an empty cell names nothing");
        assert!(!foreign(position(3, 1, 77), own), "the thread's own earlier block");
        assert!(foreign(position(4, 9, 0), own));
        assert!(foreign(position(MAX_STREAMS - 1, 0, 0), own));
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

    #[test]
    fn live_blocks_of_one_span_never_share_a_cell() {
        // Blocks 32 bytes apart (the smallest chunks), over one 64 MiB region.
        let bits = DEFAULT_CELL_BITS;
        let base = (0x5555_5555_0000u64 & !((1 << 26) - 1)) + 16;
        let n = 1usize << bits;
        let mut seen = vec![false; n];
        for i in 0..n as u64 {
            let c = cell_index(base + 32 * i, bits);
            assert!(!seen[c], "block {i} shares a cell");
            seen[c] = true;
        }
        // Two thread-arena heaps (64 MiB aligned): the same offset lands on different cells.
        assert_ne!(cell_index(0x7f00_0400_0010, bits), cell_index(0x7f00_0800_0010, bits));
    }
}
