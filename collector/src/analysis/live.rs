//! The live set of one process image and the counters derived from it, updated event by event
//! in merged order.
//!
//! Definitions (what the report's numbers mean):
//! * a *call* is any hooked call, failed ones and `free(NULL)` included;
//! * an *allocation* is a call that returned a new block: malloc, calloc, the memalign family,
//!   valloc, pvalloc, and every successful realloc/reallocarray with a non-zero size (whether it
//!   moved or not: the old block ends, a new one of the new size begins);
//! * a *free* ends a block: free of a live pointer, realloc to size 0, and the old block of a
//!   successful realloc of a non-null pointer;
//! * *live bytes* are the requested sizes of live blocks (`calloc`: nmemb × size).

use mtrace_protocol::event::{chunk, Event, EventKind};
use rustc_hash::FxHashMap;

/// One live block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub size: u64,
    /// glibc chunk header word (size | flags), 0 if unknown.
    pub chunk: u64,
    /// Offset of an mmapped chunk in its mapping.
    pub prev_size: u64,
    pub time_ns: u64,
    pub stream: u32,
    pub kind: EventKind,
    /// Allocation site (stack id, 0 = none).
    pub stack: u64,
    /// Its stream's allocation count right after it (see `sites`: temporaries).
    pub nth: u64,
}

impl Block {
    /// Bytes of address space an mmapped chunk occupies (0 for heap chunks).
    pub fn mmapped_bytes(&self) -> u64 {
        if chunk::is_mmapped(self.chunk) { chunk::size(self.chunk).saturating_add(self.prev_size) } else { 0 }
    }

    /// Bytes beyond the request that the block costs: chunk size − request for heap chunks,
    /// mapping − request for mmapped ones (0 when the chunk header is unknown).
    pub fn overhead(&self) -> u64 {
        if self.chunk == 0 {
            0
        } else if chunk::is_mmapped(self.chunk) {
            self.mmapped_bytes().saturating_sub(self.size)
        } else {
            chunk::size(self.chunk).saturating_sub(self.size)
        }
    }

    fn info(&self) -> super::sites::BlockInfo {
        super::sites::BlockInfo { stack: self.stack, size: self.size, overhead: self.overhead(), stream: self.stream, nth: self.nth }
    }
}

/// Counters of one image. `Clone` so a fork child can start from its parent's state.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub calls: FxHashMap<EventKind, u64>,
    pub alloc_count: u64,
    pub free_count: u64,
    pub failed_allocs: u64,
    pub bytes_allocated_total: u64,
    pub live_bytes: u64,
    pub live_blocks: u64,
    pub peak_live_bytes: u64,
    pub peak_live_time_ns: u64,
    /// Frees (or realloc sources) of addresses never seen allocated.
    pub unmatched_frees: u64,
    /// Allocations admitted while another block of the same address was still live, to break a
    /// cycle of cross-thread constraints the merger could not order (see `merge`). Each block is
    /// still ended by the free whose chunk header matches it; live bytes count both for a while.
    pub reordered: u64,
    pub lost_events: u64,
    /// Sum of mapping sizes of live mmapped chunks.
    pub mmapped_bytes: u64,
    pub brk: u64,
}

/// The live set plus counters plus what is known of the OS-held heap.
#[derive(Clone, Debug, Default)]
pub struct LiveModel {
    pub live: FxHashMap<u64, Block>,
    /// Further blocks at an address that `live` already holds (rare: see `Counters::reordered`).
    pub extra: FxHashMap<u64, Vec<Block>>,
    /// The heap chunks of the live blocks (glibc's headers known, not mmapped): chunk start →
    /// (chunk end, user pointer), for [`LiveModel::overlapped`]. Kept only once a second thread
    /// allocates or frees ([`LiveModel::index_chunks`]): one thread's events need no such order.
    pub chunks: std::collections::BTreeMap<u64, (u64, u64)>,
    pub chunks_indexed: bool,
    pub c: Counters,
    /// Where the brk heap starts.
    pub heap_start: u64,
    /// Thread-arena heaps: base → (arena, size).
    pub arena_heaps: FxHashMap<u64, (u64, u64)>,
    /// Time of the last applied event.
    pub now_ns: u64,
    /// Live bytes per allocation site, the peak's, leaks, temporaries, snapshots.
    pub sites: super::sites::Sites,
}

/// What the merger needs to know from an event before applying it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Applicable now.
    Ok,
    /// Waits until `addr` becomes live (a free or realloc source whose allocation is pending).
    Live(u64),
    /// Waits until `addr` is no longer live (an allocation of an address not yet freed).
    Dead(u64),
    /// The block live at `addr` is not the one this event ends (its chunk differs): waits for
    /// that block to end and the event's own block to begin.
    Other(u64),
}

/// The heap chunk `[start, end)` of the block at `ptr` with header `chunk` (`None`: unknown
/// header, or an mmapped chunk).
fn heap_chunk(ptr: u64, chunk: u64) -> Option<(u64, u64)> {
    (chunk != 0 && !chunk::is_mmapped(chunk) && ptr >= 16).then(|| (ptr - 16, (ptr - 16).saturating_add(chunk::size(chunk))))
}

/// Could chunk header words `a` and `b` describe the same block? (Unknown headers match
/// anything; the PREV_INUSE bit is rewritten by neighbours and ignored.)
pub fn same_chunk(a: u64, b: u64) -> bool {
    a == 0 || b == 0 || (a & !chunk::PREV_INUSE & !chunk::NON_MAIN_ARENA) == (b & !chunk::PREV_INUSE & !chunk::NON_MAIN_ARENA)
}

impl LiveModel {
    pub fn is_live(&self, addr: u64) -> bool {
        self.live.contains_key(&addr)
    }

    /// Brk heap bytes plus thread-arena heap bytes held from the OS.
    pub fn heap_bytes(&self) -> u64 {
        let main = if self.heap_start != 0 && self.c.brk > self.heap_start { self.c.brk - self.heap_start } else { 0 };
        main + self.arena_heaps.values().map(|&(_, s)| s).sum::<u64>()
    }

    /// Is `ev` applicable in the current state?
    pub fn need(&self, ev: &Event) -> Need {
        let ends = |ptr: u64, chunk: u64| match self.live.get(&ptr) {
            None => Need::Live(ptr),
            Some(b) if !same_chunk(b.chunk, chunk) => {
                if self.extra.get(&ptr).is_some_and(|v| v.iter().any(|b| same_chunk(b.chunk, chunk))) { Need::Ok } else { Need::Other(ptr) }
            }
            Some(_) => Need::Ok,
        };
        match *ev {
            Event::Alloc { ptr, .. } if ptr != 0 && self.is_live(ptr) => Need::Dead(ptr),
            Event::Free { ptr, chunk, .. } if ptr != 0 => ends(ptr, chunk),
            Event::Realloc { old_ptr, new_ptr, size, old_chunk, .. } => {
                let frees_old = old_ptr != 0 && !(new_ptr == 0 && size > 0);
                if frees_old && ends(old_ptr, old_chunk) != Need::Ok {
                    ends(old_ptr, old_chunk)
                } else if new_ptr != 0 && new_ptr != old_ptr && self.is_live(new_ptr) {
                    Need::Dead(new_ptr)
                } else {
                    Need::Ok
                }
            }
            _ => Need::Ok,
        }
    }

    /// A live block whose heap chunk overlaps the one `ev` allocates (an allocation, or a realloc's
    /// new or grown block), other than the block `ev` itself ends. Chunks live at the same time
    /// never overlap, so such an allocation happened after that block ended — glibc merged, split
    /// or took back its memory at another address — though nothing in the trace says so for
    /// certain: the merger takes it as a preference (see `merge`).
    pub fn overlapped(&self, ev: &Event) -> Option<u64> {
        let (ptr, chunk, except) = match *ev {
            Event::Alloc { ptr, chunk, .. } => (ptr, chunk, ptr),
            Event::Realloc { old_ptr, new_ptr, chunk, .. } => (new_ptr, chunk, old_ptr),
            _ => return None,
        };
        if !self.chunks_indexed {
            return None;
        }
        let (start, end) = heap_chunk(ptr, chunk)?;
        // Live chunks do not overlap one another: the one starting last before `end` is the only
        // one that can reach into the range.
        let (_, &(e, q)) = self.chunks.range(..end).next_back()?;
        (e > start && q != ptr && q != except).then_some(q)
    }

    /// Start keeping `chunks` (from the blocks live now).
    pub fn index_chunks(&mut self) {
        if self.chunks_indexed {
            return;
        }
        self.chunks_indexed = true;
        self.chunks = self.live.iter().filter_map(|(&p, b)| heap_chunk(p, b.chunk).map(|(s, e)| (s, (e, p)))).collect();
    }

    /// Keep `chunks` in step with the block now live at `ptr` (if any); `old`: the header of the
    /// block that was.
    fn index_chunk(&mut self, ptr: u64, old: Option<u64>) {
        if !self.chunks_indexed {
            return;
        }
        if let Some((start, _)) = old.and_then(|c| heap_chunk(ptr, c)) {
            if self.chunks.get(&start).is_some_and(|&(_, q)| q == ptr) {
                self.chunks.remove(&start);
            }
        }
        if let Some((start, end)) = self.live.get(&ptr).and_then(|b| heap_chunk(ptr, b.chunk)) {
            self.chunks.insert(start, (end, ptr));
        }
    }

    fn add_block(&mut self, ptr: u64, mut b: Block) {
        b.nth = self.sites.on_alloc(ptr, b.stack, b.size, b.overhead(), b.stream, b.time_ns, self.c.live_bytes);
        self.c.alloc_count += 1;
        self.c.bytes_allocated_total = self.c.bytes_allocated_total.saturating_add(b.size);
        let replaced = self.live.insert(ptr, b);
        if let Some(old) = replaced {
            // Forced: the address is still live. Keep both; frees tell them apart by chunk.
            self.c.reordered += 1;
            self.extra.entry(ptr).or_default().push(old);
        }
        self.index_chunk(ptr, replaced.map(|o| o.chunk));
        // Saturating sums (here and in `end_block`): only a damaged trace comes near 2^64.
        self.c.live_bytes = self.c.live_bytes.saturating_add(b.size);
        self.c.live_blocks += 1;
        self.c.mmapped_bytes = self.c.mmapped_bytes.saturating_add(b.mmapped_bytes());
        if self.c.live_bytes > self.c.peak_live_bytes {
            self.c.peak_live_bytes = self.c.live_bytes;
            self.c.peak_live_time_ns = b.time_ns;
            self.sites.on_peak();
        }
    }

    /// End the block at `ptr` whose chunk header matches `chunk` (the most recent one when several
    /// blocks share the address); `None` if none is live (an unmatched free).
    /// `freed_by`: the stream of a free (or realloc to 0); `None` for a moving realloc.
    fn end_block(&mut self, ptr: u64, chunk: u64, freed_by: Option<u32>) -> Option<Block> {
        let removed = match self.extra.get_mut(&ptr) {
            None => self.live.remove(&ptr),
            Some(extra) => {
                let live_matches = self.live.get(&ptr).is_some_and(|b| same_chunk(b.chunk, chunk));
                let r = if live_matches {
                    let b = self.live.remove(&ptr);
                    if let Some(next) = extra.pop() {
                        self.live.insert(ptr, next);
                    }
                    b
                } else if let Some(i) = extra.iter().rposition(|b| same_chunk(b.chunk, chunk)) {
                    Some(extra.remove(i))
                } else {
                    None
                };
                if extra.is_empty() {
                    self.extra.remove(&ptr);
                }
                r
            }
        };
        if let Some(b) = &removed {
            self.index_chunk(ptr, Some(b.chunk));
        }
        match removed {
            Some(b) => {
                self.sites.on_free(ptr, b.info(), freed_by, self.now_ns, self.c.live_bytes);
                self.c.free_count += 1;
                self.c.live_bytes = self.c.live_bytes.saturating_sub(b.size);
                self.c.live_blocks -= 1;
                self.c.mmapped_bytes = self.c.mmapped_bytes.saturating_sub(b.mmapped_bytes());
                Some(b)
            }
            None => {
                self.c.unmatched_frees += 1;
                None
            }
        }
    }

    /// The first step of a realloc that moved its block (see `merge`): its old block ends. The
    /// realloc itself is applied later without it.
    pub fn end_realloc_source(&mut self, ptr: u64, chunk: u64) {
        self.end_block(ptr, chunk, None);
    }

    /// Apply one event (in merged order). Non-applicable events (see [`LiveModel::need`]) are
    /// applied as forced: an unmatched free, or a displaced block.
    pub fn apply(&mut self, ev: &Event, time_ns: u64, stream: u32) {
        self.now_ns = self.now_ns.max(time_ns);
        match *ev {
            Event::Alloc { kind, ptr, size, chunk, prev_size, stack, .. } => {
                self.count(kind);
                if ptr == 0 {
                    self.c.failed_allocs += 1;
                } else {
                    self.add_block(ptr, Block { size, chunk, prev_size, time_ns, stream, kind, stack, nth: 0 });
                }
            }
            Event::Free { kind, ptr, chunk, .. } => {
                self.count(kind);
                if ptr != 0 {
                    self.end_block(ptr, chunk, Some(stream));
                }
            }
            Event::Realloc { kind, old_ptr, new_ptr, size, chunk, old_chunk, prev_size, stack, .. } => {
                self.count(kind);
                if new_ptr == 0 {
                    if size == 0 && old_ptr != 0 {
                        // realloc(p, 0) freed p.
                        self.end_block(old_ptr, old_chunk, Some(stream));
                    } else {
                        self.c.failed_allocs += 1;
                    }
                    return;
                }
                if old_ptr != 0 {
                    self.end_block(old_ptr, old_chunk, None);
                }
                self.add_block(new_ptr, Block { size, chunk, prev_size, time_ns, stream, kind, stack, nth: 0 });
            }
            Event::UsableSize { .. } => self.count(EventKind::UsableSize),
            Event::Mmap { kind, .. } => self.count(kind),
            Event::Munmap { .. } => self.count(EventKind::Munmap),
            Event::Mremap { .. } => self.count(EventKind::Mremap),
            Event::Brk { .. } => self.count(EventKind::Brk),
            Event::Sbrk { .. } => self.count(EventKind::Sbrk),
            Event::MallocTrim { .. } => self.count(EventKind::MallocTrim),
            Event::Mallopt { .. } => self.count(EventKind::Mallopt),
            Event::ProgramBreak { brk, .. } => self.c.brk = brk,
            Event::ArenaHeap { heap, ar_ptr, size, .. } => {
                self.arena_heaps.insert(heap, (ar_ptr, size));
            }
            Event::HeapSize { heap, size, .. } => {
                self.arena_heaps.entry(heap).or_insert((0, 0)).1 = size;
            }
            Event::Lost { events, .. } => self.c.lost_events = self.c.lost_events.saturating_add(events),
            Event::Time { .. }
            | Event::ThreadExit
            | Event::Fork { .. }
            | Event::Mallinfo { .. }
            | Event::Stack { .. }
            | Event::Module { .. }
            | Event::ModuleUnload { .. }
            | Event::Unknown { .. } => {}
        }
    }

    fn count(&mut self, k: EventKind) {
        *self.c.calls.entry(k).or_insert(0) += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(ptr: u64, size: u64) -> Event {
        Event::Alloc { kind: EventKind::Malloc, ptr, size, align: 0, chunk: 0, prev_size: 0, stack: 0, after: None }
    }
    fn free(ptr: u64) -> Event {
        Event::Free { kind: EventKind::Free, ptr, chunk: 0, after: None }
    }
    fn realloc(old_ptr: u64, new_ptr: u64, size: u64) -> Event {
        Event::Realloc { kind: EventKind::Realloc, old_ptr, new_ptr, size, old_chunk: 0, chunk: 0, prev_size: 0, stack: 0, after_old: None, after: None }
    }

    #[test]
    fn counts_follow_the_documented_definitions() {
        let mut m = LiveModel::default();
        for (i, ev) in [
            alloc(0x10, 100),
            alloc(0x20, 50),
            free(0),              // free(NULL): a call, not a free
            realloc(0x10, 0x30, 300), // moved
            realloc(0x30, 0x30, 10),  // in place
            realloc(0, 0x40, 7),  // realloc(NULL, n) = malloc
            realloc(0x20, 0, 0),  // realloc(p, 0) = free
            realloc(0x40, 0, 99), // failed: 0x40 stays
            alloc(0, 1 << 60),    // failed malloc
        ]
        .iter()
        .enumerate()
        {
            m.apply(ev, i as u64, 1);
        }
        assert_eq!(m.c.calls[&EventKind::Malloc], 3);
        assert_eq!(m.c.calls[&EventKind::Free], 1);
        assert_eq!(m.c.calls[&EventKind::Realloc], 5);
        assert_eq!(m.c.alloc_count, 2 + 3);
        assert_eq!(m.c.free_count, 3);
        assert_eq!(m.c.failed_allocs, 2);
        assert_eq!(m.c.bytes_allocated_total, 100 + 50 + 300 + 10 + 7);
        assert_eq!(m.c.live_bytes, 10 + 7);
        assert_eq!(m.c.live_blocks, 2);
        // Peak: 100+50 → 50+300 = 350.
        assert_eq!(m.c.peak_live_bytes, 350);
        assert_eq!(m.c.peak_live_time_ns, 3);
        assert_eq!(m.c.unmatched_frees, 0);
    }

    #[test]
    fn needs_express_causality() {
        let mut m = LiveModel::default();
        assert_eq!(m.need(&free(0x10)), Need::Live(0x10));
        assert_eq!(m.need(&free(0)), Need::Ok);
        m.apply(&alloc(0x10, 1), 0, 1);
        assert_eq!(m.need(&alloc(0x10, 5)), Need::Dead(0x10));
        assert_eq!(m.need(&realloc(0x10, 0x20, 5)), Need::Ok);
        assert_eq!(m.need(&realloc(0x30, 0x20, 5)), Need::Live(0x30));
        assert_eq!(m.need(&realloc(0x20, 0x10, 5)), Need::Live(0x20));
        assert_eq!(m.need(&realloc(0, 0x10, 5)), Need::Dead(0x10));
        // A failed realloc needs nothing.
        assert_eq!(m.need(&realloc(0x99, 0, 5)), Need::Ok);
    }

    #[test]
    fn mmapped_chunks_count_their_mapping() {
        let mut m = LiveModel::default();
        let ev = Event::Alloc { kind: EventKind::Memalign, ptr: 0x7000_1000, size: 200_000, align: 4096, chunk: 200_720 | chunk::IS_MMAPPED, prev_size: 4080, stack: 0, after: None };
        m.apply(&ev, 0, 1);
        assert_eq!(m.c.mmapped_bytes, 204_800);
        m.apply(&free(0x7000_1000), 1, 1);
        assert_eq!(m.c.mmapped_bytes, 0);
    }
}
