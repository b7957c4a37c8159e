//! One glibc arena as the model sees it: every chunk between its first chunk and its top, each in
//! one state (in use, cached in a thread's tcache, in a fastbin, free in the bins, arena
//! metadata), the top chunk, its heaps, and running byte totals per state.
//!
//! Placement is never simulated where it can be observed: an allocation event says where glibc
//! put the chunk, and [`Arena::take`] carves it out of whatever the model held there. What cannot
//! be observed is simulated with glibc 2.36's rules: where a free goes (tcache, fastbin, bins with
//! coalescing, top), `malloc_consolidate`, the tcache refill from fastbins and small bins, heap
//! trimming of thread arenas, and `malloc_trim`'s page release.

use std::collections::{BTreeMap, BTreeSet};

use super::params::{CONSOLIDATION_THRESHOLD, MINSIZE};

pub const PAGE: u64 = 4096;
/// `sizeof(heap_info)` on glibc ≥ 2.35.
pub const HEAP_INFO: u64 = 48;
/// Offset of an arena's first chunk in its first heap (`heap_info` + `malloc_state`, aligned).
pub const FIRST_CHUNK_OFFSET: u64 = 0x8d0;
/// The chunk of a thread's `tcache_perthread_struct`.
pub const TCACHE_STRUCT_CHUNK: u64 = 0x290;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Handed to the application: `req` requested bytes.
    InUse { req: u64 },
    /// In use by glibc itself (tcache structs, fenceposts).
    Meta,
    /// Heap the trace has not explained yet: chunks allocated before recording started, or
    /// carved by another thread whose event comes later in the merged order. Allocations may
    /// take it without contradiction.
    Unseen,
    /// In thread `tid`'s tcache.
    Tcache { tid: u32 },
    Fast,
    /// Free in the unsorted, small or large bins.
    Free,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub size: u64,
    pub state: State,
    /// A page-aligned range inside a `Free` chunk that `malloc_trim` returned with
    /// `MADV_DONTNEED` (empty when `start == end`).
    pub released: (u64, u64),
}

impl Chunk {
    fn new(size: u64, state: State) -> Chunk {
        Chunk { size, state, released: (0, 0) }
    }
    pub fn released_bytes(&self) -> u64 {
        self.released.1 - self.released.0
    }
}

/// Running byte totals of an arena, by chunk state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub live_req: u64,
    pub inuse: u64,
    pub inuse_count: u64,
    pub meta: u64,
    pub tcache: u64,
    pub fast: u64,
    pub fast_count: u64,
    pub free: u64,
    pub free_count: u64,
    pub released: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heap {
    pub base: u64,
    pub size: u64,
}

/// Thread caches: per thread, per tcache bin, chunk addresses (most recent last).
pub type Tcaches = rustc_hash::FxHashMap<u32, Vec<Vec<u64>>>;

#[derive(Clone, Debug)]
pub struct Arena {
    /// 0 for the main arena, else the `malloc_state` address.
    pub id: u64,
    /// Main: one pseudo-heap `[heap_start, brk)`. Thread arenas: their heaps, oldest first.
    pub heaps: Vec<Heap>,
    pub chunks: BTreeMap<u64, Chunk>,
    /// Free chunks by (size, address), for best fits.
    pub bins: BTreeSet<(u64, u64)>,
    /// Fastbins by chunk size class: addresses, most recently freed last.
    pub fastbins: Vec<Vec<u64>>,
    /// Start of the top chunk; it runs to the end of the last heap.
    pub top: u64,
    pub t: Totals,
    /// Bytes at the start of heaps that are not chunks (heap_info, malloc_state).
    pub header_meta: u64,
    /// Highest address the process has touched in the last heap (for residency estimates).
    pub touched: u64,
    /// Streams that allocated from this arena most recently.
    pub threads: BTreeSet<u32>,
    /// Times the observed trace contradicted the model here (see [`Arena::take`]).
    pub conflicts: u64,
    /// The first few contradictions, described.
    pub conflict_log: Vec<String>,
    /// Tcache structs whose place was guessed (see `GlibcModel::init_tcache`): an allocation
    /// may overlap one without contradiction — the guess was wrong, and it moves.
    pub guesses: BTreeSet<u64>,
    /// Guesses the last [`Arena::take`] overlapped.
    pub displaced: Vec<u64>,
    /// The space between the old top and the chunk the last [`Arena::take`] carved from the top.
    pub last_gap: Option<(u64, u64)>,
}

fn fast_index(size: u64) -> usize {
    ((size >> 4).saturating_sub(2)) as usize
}

impl Arena {
    pub fn new_main(heap_start: u64) -> Arena {
        Arena::new(0, Heap { base: heap_start, size: 0 }, heap_start, 0)
    }

    /// A thread arena whose first heap is `heap` (its `malloc_state` sits at `heap + 48`).
    pub fn new_thread(id: u64, heap: Heap) -> Arena {
        Arena::new(id, heap, heap.base + FIRST_CHUNK_OFFSET, FIRST_CHUNK_OFFSET)
    }

    fn new(id: u64, heap: Heap, top: u64, header_meta: u64) -> Arena {
        Arena {
            id,
            heaps: vec![heap],
            chunks: BTreeMap::new(),
            bins: BTreeSet::new(),
            fastbins: vec![Vec::new(); 10],
            top,
            t: Totals::default(),
            header_meta,
            touched: top + 16,
            threads: BTreeSet::new(),
            conflicts: 0,
            conflict_log: Vec::new(),
            guesses: BTreeSet::new(),
            displaced: Vec::new(),
            last_gap: None,
        }
    }

    /// Count a contradiction between the trace and the model, keeping the first few described.
    pub fn conflict(&mut self, what: impl FnOnce() -> String) {
        self.conflicts += 1;
        if self.conflict_log.len() < 8 {
            self.conflict_log.push(what());
        }
    }

    pub fn is_main(&self) -> bool {
        self.id == 0
    }

    /// End of the last heap (the main arena: the program break).
    pub fn end(&self) -> u64 {
        let h = self.heaps.last().expect("an arena has a heap");
        h.base + h.size
    }

    pub fn held(&self) -> u64 {
        self.heaps.iter().map(|h| h.size).sum()
    }

    pub fn top_size(&self) -> u64 {
        self.end().saturating_sub(self.top)
    }

    /// Does `addr` lie in one of this arena's heaps?
    pub fn contains(&self, addr: u64) -> bool {
        self.heaps.iter().any(|h| addr >= h.base && addr < h.base + h.size.max(1))
    }

    // ---- bookkeeping -----------------------------------------------------------------------

    fn account(&mut self, c: &Chunk, sign: i64) {
        let add = |x: &mut u64, v: u64| {
            if sign > 0 {
                *x += v
            } else {
                *x = x.saturating_sub(v)
            }
        };
        let s = c.size;
        match c.state {
            State::InUse { req } => {
                add(&mut self.t.live_req, req);
                add(&mut self.t.inuse, s);
                add(&mut self.t.inuse_count, 1);
            }
            State::Meta | State::Unseen => add(&mut self.t.meta, s),
            State::Tcache { .. } => add(&mut self.t.tcache, s),
            State::Fast => {
                add(&mut self.t.fast, s);
                add(&mut self.t.fast_count, 1);
            }
            State::Free => {
                add(&mut self.t.free, s);
                add(&mut self.t.free_count, 1);
                add(&mut self.t.released, c.released_bytes());
            }
        }
    }

    fn insert(&mut self, addr: u64, c: Chunk) {
        if c.size == 0 {
            return;
        }
        self.account(&c, 1);
        if c.state == State::Free {
            self.bins.insert((c.size, addr));
        }
        if c.state == State::Fast {
            if let Some(v) = self.fastbins.get_mut(fast_index(c.size)) {
                v.push(addr);
            }
        }
        if let Some(old) = self.chunks.insert(addr, c) {
            // Never expected: callers remove first.
            self.account(&old, -1);
            self.conflict(|| format!("insert over {addr:#x}: {old:?} replaced by {c:?}"));
        }
    }

    fn remove(&mut self, addr: u64, tcaches: &mut Tcaches) -> Option<Chunk> {
        let c = self.chunks.remove(&addr)?;
        self.account(&c, -1);
        match c.state {
            State::Free => {
                self.bins.remove(&(c.size, addr));
            }
            State::Fast => {
                if let Some(v) = self.fastbins.get_mut(fast_index(c.size)) {
                    if let Some(i) = v.iter().rposition(|&a| a == addr) {
                        v.remove(i);
                    }
                }
            }
            State::Tcache { tid } => {
                if let Some(bins) = tcaches.get_mut(&tid) {
                    for b in bins.iter_mut() {
                        if let Some(i) = b.iter().rposition(|&a| a == addr) {
                            b.remove(i);
                            break;
                        }
                    }
                }
            }
            _ => {}
        }
        Some(c)
    }

    /// Chunks overlapping `[lo, hi)`, by address.
    fn overlapping(&self, lo: u64, hi: u64) -> Vec<u64> {
        let mut v = Vec::new();
        if let Some((&a, c)) = self.chunks.range(..lo).next_back() {
            if a + c.size > lo {
                v.push(a);
            }
        }
        v.extend(self.chunks.range(lo..hi).map(|(&a, _)| a));
        v
    }

    /// The process wrote up to `addr` in the last heap.
    fn touch(&mut self, addr: u64) {
        if addr > self.touched && addr <= self.end() {
            self.touched = addr;
        }
    }

    /// Does `addr` lie in the reservation of the last heap (where the top is)? Always for the
    /// main arena (one heap); a thread arena's next heap may be mapped below its earlier ones.
    fn in_last_heap(&self, addr: u64) -> bool {
        self.is_main() || self.heaps.last().is_some_and(|h| addr >= h.base && addr < h.base.saturating_add(super::params::HEAP_MAX_SIZE))
    }

    // ---- what allocations do ------------------------------------------------------------

    /// The application got chunk `[c, c + size)` holding `req` bytes. Whatever the model held
    /// there (a cached, fast or free chunk, part of a free chunk, the top) is carved out; pieces
    /// left over stay in their state. Overlapping in-use or metadata chunks are contradictions
    /// (counted in `conflicts`) and are dropped. Returns the state the chunk was taken from.
    ///
    /// `gap_is_free`: a gap between the old top and `c` was given back by glibc (memalign's
    /// leading fragment) rather than used by glibc itself (a tcache struct, unseen chunks).
    pub fn take(&mut self, c: u64, size: u64, req: u64, gap_is_free: bool, tcaches: &mut Tcaches) -> Taken {
        let end = c.saturating_add(size);
        let mut from = Taken::Top;
        self.last_gap = None;
        let from_top = end > self.top && self.in_last_heap(c);
        // The top was too small: before growing the heap, `_int_malloc` consolidates the
        // fastbins (and retries).
        if from_top && end.saturating_add(MINSIZE) > self.end() && self.t.fast_count > 0 {
            self.consolidate(tcaches);
        }
        // Fast chunks are not where glibc carves from: if the chunk overlaps fast chunks other
        // than an exact one, a consolidation happened first.
        let ov = self.overlapping(c, end);
        let exact = ov.len() == 1 && ov[0] == c && self.chunks[&c].size == size;
        if !exact && ov.iter().any(|a| self.chunks[a].state == State::Fast) {
            self.consolidate(tcaches);
        }
        let ov = self.overlapping(c, end);
        // Pieces of wrongly guessed structs: free space the guess had taken.
        let mut unguessed = Vec::new();
        for a in ov {
            let Some(old) = self.remove(a, tcaches) else { continue };
            let was_guess = old.state == State::Meta && self.guesses.contains(&a);
            from = match old.state {
                State::Tcache { .. } => Taken::Tcache,
                State::Fast => Taken::Fast,
                State::Free if a == c && old.size == size => Taken::FreeExact,
                State::Free => Taken::FreeSplit,
                State::Unseen => Taken::Top,
                State::Meta if self.guesses.remove(&a) => {
                    self.displaced.push(a);
                    Taken::Top
                }
                State::InUse { .. } | State::Meta => {
                    self.conflict(|| format!("allocation [{c:#x}+{size}] overlaps {:?} chunk [{a:#x}+{}]", old.state, old.size));
                    Taken::Conflict
                }
            };
            let keep = |lo: u64, hi: u64| -> Option<(u64, Chunk)> {
                (hi > lo).then(|| {
                    let mut k = Chunk::new(hi - lo, old.state);
                    if old.state == State::Free {
                        let r0 = old.released.0.max((lo + 48).next_multiple_of(PAGE));
                        let r1 = old.released.1.min(hi);
                        if r1 > r0 {
                            k.released = (r0, r0 + ((r1 - r0) & !(PAGE - 1)));
                        }
                    }
                    if !matches!(old.state, State::Free | State::Meta) {
                        // A piece of a cached/fast/in-use chunk is not that chunk any more.
                        k.state = State::Unseen;
                    }
                    (lo, k)
                })
            };
            for (lo, hi) in [(a, c.min(a + old.size)), (end.max(a), a + old.size)] {
                if let Some((lo, k)) = keep(lo, hi) {
                    self.insert(lo, k);
                    if was_guess {
                        unguessed.push(lo);
                    }
                }
            }
        }
        if from_top && end > self.top {
            if c > self.top {
                // Space between the old top and the chunk.
                let gap = Chunk::new(c - self.top, if gap_is_free { State::Free } else { State::Unseen });
                let at = self.top;
                self.top = c;
                if gap_is_free {
                    self.free_region(at, gap.size, tcaches);
                } else {
                    self.last_gap = Some((at, gap.size));
                    self.insert(at, gap);
                }
            }
            if c >= self.top {
                from = Taken::Top;
            }
            self.top = self.top.max(end);
            // The program break (or heap size) is reported right after the event that moved it.
            if let Some(h) = self.heaps.last_mut() {
                if h.base + h.size < self.top + MINSIZE {
                    h.size = self.top + MINSIZE - h.base;
                }
            }
        }
        self.insert(c, Chunk::new(size, State::InUse { req }));
        for lo in unguessed {
            self.free_to_bins(lo, tcaches);
        }
        self.touch(end.min(self.end()));
        self.touch(self.top + 16);
        from
    }

    /// A region given back by glibc itself (not through a hooked free): it goes to the bins,
    /// coalescing, or to the top.
    fn free_region(&mut self, at: u64, size: u64, tcaches: &mut Tcaches) {
        self.insert(at, Chunk::new(size, State::Meta));
        self.free_to_bins(at, tcaches);
    }

    /// Change the state of the chunk at `addr` (the caller keeps tcache lists right).
    pub fn restate(&mut self, addr: u64, state: State, tcaches: &mut Tcaches) {
        if let Some(c) = self.remove(addr, tcaches) {
            self.insert(addr, Chunk::new(c.size, state));
        }
    }

    /// A metadata chunk (about to be freed by glibc itself, or glibc's own).
    pub fn insert_meta(&mut self, addr: u64, size: u64) {
        let mut tc = Tcaches::default();
        for a in self.overlapping(addr, addr + size) {
            let old = self.remove(a, &mut tc);
            self.conflict(|| format!("metadata [{addr:#x}+{size}] overlaps {old:?} at {a:#x}"));
        }
        self.insert(addr, Chunk::new(size, State::Meta));
    }

    /// Heap the trace has not explained (see [`State::Unseen`]).
    pub fn insert_unseen(&mut self, addr: u64, size: u64) {
        self.insert(addr, Chunk::new(size, State::Unseen));
    }

    /// The chunk at `c` is now `size` bytes holding `req`: whatever the model had inside
    /// `[c, c + size)` becomes that one chunk (realloc in place).
    pub fn join_in_use(&mut self, c: u64, size: u64, req: u64, tcaches: &mut Tcaches) {
        for a in self.overlapping(c, c + size) {
            self.remove(a, tcaches);
        }
        self.insert(c, Chunk::new(size, State::InUse { req }));
    }

    /// Where `_int_malloc` would put a chunk of `size` that the trace cannot show (a tcache
    /// struct): an exact fit in the bins, else the best fit, else the top.
    pub fn place(&self, size: u64) -> u64 {
        match self.bins.range((size, 0)..).next() {
            Some(&(s, a)) if s == size || s >= size + MINSIZE => a,
            _ => self.top,
        }
    }

    /// `_int_malloc`'s tcache refill after taking a chunk of `size` from a fastbin (`fast`) or a
    /// small bin: up to `room` more chunks of that size move to `tid`'s tcache (bin `bin`).
    pub fn stash(&mut self, size: u64, bin: usize, room: u64, fast: bool, tid: u32, tcaches: &mut Tcaches) {
        let mut moved = Vec::new();
        if fast {
            let Some(v) = self.fastbins.get_mut(fast_index(size)) else { return };
            while (moved.len() as u64) < room {
                let Some(a) = v.pop() else { break };
                moved.push(a);
            }
        } else {
            moved.extend(self.bins.range((size, 0)..(size + 1, 0)).take(room as usize).map(|&(_, a)| a));
        }
        for &a in &moved {
            // In place: a fast chunk's fastbin entry is already popped; a free chunk leaves
            // its bin index.
            let Some(c) = self.chunks.get(&a).copied() else { continue };
            self.account(&c, -1);
            if c.state == State::Free {
                self.bins.remove(&(c.size, a));
            }
            let k = Chunk::new(c.size, State::Tcache { tid });
            self.account(&k, 1);
            self.chunks.insert(a, k);
        }
        tcaches.entry(tid).or_insert_with(|| vec![Vec::new(); 64])[bin].extend(moved);
    }

    // ---- what frees do --------------------------------------------------------------------

    /// Mark the chunk at `addr` free the way `_int_free` would: into the tcache of `tid` when
    /// `tcache` says there is room (`Some(bin)`), else a fastbin, else the bins with coalescing
    /// (possibly into the top). Returns the size of the merged chunk when it went to the bins.
    pub fn free(&mut self, addr: u64, tid: u32, tcache_bin: Option<usize>, is_fast: bool, tcaches: &mut Tcaches) -> Freed {
        let Some(c) = self.chunks.get(&addr).copied() else {
            self.conflict(|| format!("free of {addr:#x}: no chunk there"));
            return Freed::Unknown;
        };
        if !matches!(c.state, State::InUse { .. } | State::Meta | State::Unseen) {
            // A double free in the model's eyes: the trace and the model disagree.
            self.conflict(|| format!("free of {addr:#x}: the chunk is {:?} already", c.state));
            return Freed::Unknown;
        }
        if let Some(bin) = tcache_bin {
            self.remove(addr, tcaches);
            self.insert(addr, Chunk::new(c.size, State::Tcache { tid }));
            tcaches.entry(tid).or_insert_with(|| vec![Vec::new(); 64])[bin].push(addr);
            return Freed::Tcache;
        }
        if is_fast {
            self.remove(addr, tcaches);
            self.insert(addr, Chunk::new(c.size, State::Fast));
            return Freed::Fast;
        }
        let merged = self.free_to_bins(addr, tcaches);
        if merged >= CONSOLIDATION_THRESHOLD && self.t.fast_count > 0 {
            self.consolidate(tcaches);
        }
        Freed::Bins { merged }
    }

    /// Turn the chunk at `addr` into a free chunk merged with free neighbours (and the top).
    /// Returns the merged size.
    fn free_to_bins(&mut self, addr: u64, tcaches: &mut Tcaches) -> u64 {
        let Some(c) = self.remove(addr, tcaches) else { return 0 };
        let mut lo = addr;
        let mut hi = addr + c.size;
        let mut released = (0u64, 0u64);
        // A free chunk keeps one released range: of its neighbours', the larger (never their
        // hull, which would cover the resident pages of the chunk freed between them).
        let mut join = |r: (u64, u64)| {
            if r.1 - r.0 > released.1 - released.0 {
                released = r;
            }
        };
        if let Some((&pa, pc)) = self.chunks.range(..addr).next_back() {
            if pc.state == State::Free && pa + pc.size == addr {
                let pc = *pc;
                self.remove(pa, tcaches);
                lo = pa;
                join(pc.released);
            }
        }
        if let Some(nc) = self.chunks.get(&hi).copied() {
            if nc.state == State::Free {
                self.remove(hi, tcaches);
                join(nc.released);
                hi += nc.size;
            }
        }
        if hi == self.top {
            self.top = lo;
            return self.top_size();
        }
        let mut k = Chunk::new(hi - lo, State::Free);
        k.released = released;
        self.insert(lo, k);
        hi - lo
    }

    /// `malloc_consolidate`: every fast chunk is merged with its free neighbours into the bins or
    /// the top.
    pub fn consolidate(&mut self, tcaches: &mut Tcaches) {
        let mut fast: Vec<u64> = std::mem::take(&mut self.fastbins).into_iter().flatten().collect();
        self.fastbins = vec![Vec::new(); 10];
        fast.sort_unstable();
        for a in fast {
            let Some(c) = self.chunks.get_mut(&a) else { continue };
            if c.state != State::Fast {
                continue;
            }
            // Out of the fastbin (its index is already cleared), then through the bins.
            c.state = State::Meta;
            let size = c.size;
            self.t.fast = self.t.fast.saturating_sub(size);
            self.t.fast_count = self.t.fast_count.saturating_sub(1);
            self.t.meta += size;
            self.free_to_bins(a, tcaches);
        }
    }

    /// The last heap of this thread arena is now `size` bytes (0: deleted), below the model's
    /// top: as [`Arena::cut_to`]. A deleted heap's predecessor's fenceposts and free tail become
    /// the top again (glibc's `heap_trim`).
    pub fn cut_heap(&mut self, base: u64, size: u64, tcaches: &mut Tcaches) -> u64 {
        if size > 0 {
            return self.cut_to(base + size, tcaches);
        }
        if self.heaps.len() < 2 || self.heaps.last().is_none_or(|h| h.base != base) {
            return 0;
        }
        let dropped = self.cut_to(base + HEAP_INFO + MINSIZE, tcaches);
        self.heaps.pop();
        self.header_meta = self.header_meta.saturating_sub(HEAP_INFO);
        // The previous heap ended with fenceposts (Meta) after its old top.
        let end = self.end();
        let mut top = end;
        while let Some((a, c)) = self.chunks.range(..top).next_back().map(|(&a, c)| (a, *c)) {
            let fence = c.state == State::Meta && a + c.size == end && c.size < 2 * MINSIZE;
            if (fence || c.state == State::Free) && a + c.size == top {
                self.remove(a, tcaches);
                top = a;
            } else {
                break;
            }
        }
        self.top = top;
        self.touched = self.touched.min(end);
        dropped
    }

    /// The main heap now ends at `brk`, below the model's top: glibc trimmed after frees the
    /// trace did not show. Everything at or above `brk − MINSIZE` was free; free chunks right
    /// below it were part of the top. Returns the bytes the model held in use (not free) there.
    pub fn cut_to(&mut self, brk: u64, tcaches: &mut Tcaches) -> u64 {
        let limit = brk - MINSIZE;
        let mut dropped = 0;
        let above: Vec<u64> = self.chunks.range(limit..).map(|(&a, _)| a).collect();
        for a in above {
            if let Some(c) = self.remove(a, tcaches) {
                if !matches!(c.state, State::Free | State::Fast) {
                    dropped += c.size;
                }
            }
        }
        // A chunk straddling the limit ends there; free chunks at the end join the top.
        let mut top = limit;
        if let Some((a, c)) = self.chunks.range(..limit).next_back().map(|(&a, c)| (a, *c)) {
            if a + c.size > limit {
                self.remove(a, tcaches);
                let mut k = Chunk::new(limit - a, c.state);
                k.released = (0, 0);
                self.insert(a, k);
            }
        }
        while let Some((a, c)) = self.chunks.range(..top).next_back().map(|(&a, c)| (a, *c)) {
            if c.state == State::Free && a + c.size == top {
                self.remove(a, tcaches);
                top = a;
            } else {
                break;
            }
        }
        if self.chunks.range(..top).next_back().is_none_or(|(&a, c)| a + c.size <= top) {
            self.top = top.min(self.top);
        }
        if let Some(h) = self.heaps.last_mut() {
            h.size = brk.saturating_sub(h.base);
        }
        self.touched = self.touched.min(brk);
        dropped
    }

    /// After a free that merged ≥ 64 KiB in a thread arena: `heap_trim`. Returns bytes returned.
    pub fn heap_trim(&mut self, top_pad: u64, trim_threshold: u64) -> u64 {
        let mut returned = 0;
        // Can the last heap go away completely?
        while self.heaps.len() > 1 && self.top == self.heaps.last().map_or(0, |h| h.base + HEAP_INFO) {
            let h = *self.heaps.last().unwrap();
            let prev = self.heaps[self.heaps.len() - 2];
            // The free tail of the previous heap (fenceposts and the free chunk before them).
            let prev_end = prev.base + prev.size;
            let tail = match self.chunks.range(..prev_end).next_back().map(|(&a, c)| (a, *c)) {
                Some((fa, fc)) if fc.state == State::Meta && fa + fc.size == prev_end => {
                    let before = self.chunks.range(..fa).next_back().map(|(&a, c)| (a, *c));
                    match before {
                        Some((pa, pc)) if pc.state == State::Free && pa + pc.size == fa => prev_end - pa,
                        _ => fc.size,
                    }
                }
                _ => 0,
            };
            if tail + super::params::HEAP_MAX_SIZE.saturating_sub(prev.size) < top_pad + MINSIZE + PAGE {
                break;
            }
            self.heaps.pop();
            returned += h.size;
            self.header_meta = self.header_meta.saturating_sub(HEAP_INFO);
            // The old heap ended with fenceposts after its old top (a free chunk, if any).
            let prev_end = self.end();
            let fence = self.chunks.range(..prev_end).next_back().map(|(&a, c)| (a, *c));
            let mut new_top = prev_end;
            if let Some((fa, fc)) = fence {
                if fc.state == State::Meta && fa + fc.size == prev_end && fc.size < 2 * MINSIZE {
                    let mut tc = Tcaches::default();
                    self.remove(fa, &mut tc);
                    new_top = fa;
                    if let Some((pa, pc)) = self.chunks.range(..fa).next_back().map(|(&a, c)| (a, *c)) {
                        if pc.state == State::Free && pa + pc.size == fa {
                            self.remove(pa, &mut tc);
                            new_top = pa;
                        }
                    }
                }
            }
            self.top = new_top;
            self.touched = self.touched.min(prev_end);
        }
        let top_size = self.top_size();
        if top_size < trim_threshold {
            return returned;
        }
        let top_area = top_size.saturating_sub(MINSIZE + 1);
        if top_area <= top_pad {
            return returned;
        }
        let extra = (top_area - top_pad) & !(PAGE - 1);
        if extra == 0 {
            return returned;
        }
        if let Some(h) = self.heaps.last_mut() {
            h.size = h.size.saturating_sub(extra);
        }
        self.touched = self.touched.min(self.end());
        returned + extra
    }

    /// A new heap of this (thread) arena: the old top is cut off behind fenceposts and freed, and
    /// the top moves to the new heap.
    pub fn add_heap(&mut self, heap: Heap, tid: u32, tcache_bin: impl Fn(u64) -> (Option<usize>, bool), tcaches: &mut Tcaches) {
        let old_top = self.top;
        let old_end = self.end();
        self.heaps.push(heap);
        self.header_meta += HEAP_INFO;
        self.top = heap.base + HEAP_INFO;
        self.touched = self.top + 16;
        if old_end > old_top {
            let old_size = (old_end - old_top).saturating_sub(MINSIZE) & !15;
            let fence_at = old_top + if old_size >= MINSIZE { old_size } else { 0 };
            self.insert(fence_at, Chunk::new(old_end - fence_at, State::Meta));
            if old_size >= MINSIZE {
                self.insert(old_top, Chunk::new(old_size, State::Meta));
                let (bin, fast) = tcache_bin(old_size);
                self.free(old_top, tid, bin, fast, tcaches);
            }
        }
    }

    /// `mtrim`'s page release: every whole page inside a free chunk (past its first 48 bytes) is
    /// returned with `MADV_DONTNEED`. Returns the bytes newly released.
    pub fn release_free_pages(&mut self) -> u64 {
        let mut newly = 0;
        let addrs: Vec<u64> = self.chunks.iter().filter(|(_, c)| c.state == State::Free).map(|(&a, _)| a).collect();
        for a in addrs {
            let c = self.chunks.get_mut(&a).unwrap();
            let r = releasable(a, c.size);
            if r.1 > r.0 {
                let before = c.released_bytes();
                c.released = r;
                let after = c.released_bytes();
                newly += after.saturating_sub(before);
                self.t.released = self.t.released + after - before;
            }
        }
        newly
    }

    /// What `malloc_trim(pad)` would give back now, without changing anything: fast chunks are
    /// consolidated with their free neighbours, whole pages inside free chunks are released, and
    /// (main arena) the top is cut down to `pad`. Returns (bytes released with madvise, bytes
    /// given back by shrinking the heap), not counting pages already released or never touched.
    pub fn predict_trim(&self, pad: u64) -> (u64, u64) {
        let mut madvised = 0;
        let mut run: Option<(u64, u64, u64)> = None; // (start, end, already released)
        let mut runs = Vec::new();
        for (&a, c) in &self.chunks {
            let freeish = matches!(c.state, State::Fast | State::Free);
            match (&mut run, freeish) {
                (Some((_, e, r)), true) if *e == a => {
                    *e = a + c.size;
                    *r += c.released_bytes();
                }
                (_, true) => {
                    if let Some(x) = run.take() {
                        runs.push(x);
                    }
                    run = Some((a, a + c.size, c.released_bytes()));
                }
                (_, false) => {
                    if let Some(x) = run.take() {
                        runs.push(x);
                    }
                }
            }
        }
        if let Some(x) = run.take() {
            runs.push(x);
        }
        let mut top = self.top;
        for (s, e, already) in runs {
            if e == self.top {
                top = s;
                continue;
            }
            let r = releasable(s, e - s);
            let touched_end = self.touched.next_multiple_of(PAGE);
            let r1 = r.1.min(touched_end.max(r.0));
            madvised += (r1 - r.0).saturating_sub(already);
        }
        let mut shrink = 0;
        if self.is_main() {
            let top_size = self.end().saturating_sub(top);
            let top_area = top_size.saturating_sub(MINSIZE + 1);
            if top_area > pad {
                let extra = (top_area - pad) & !(PAGE - 1);
                // Only pages that were touched are resident.
                let untouched = self.end().saturating_sub(self.touched.next_multiple_of(PAGE));
                shrink = extra.saturating_sub(untouched);
            }
        }
        (madvised, shrink)
    }

    /// The chunk right below the top (what keeps the top from coming down), if any.
    pub fn top_neighbour(&self) -> Option<(u64, Chunk)> {
        self.chunks.range(..self.top).next_back().map(|(&a, c)| (a, *c)).filter(|(a, c)| a + c.size == self.top)
    }

    /// Bytes of the heap never touched (above the touched high-water mark of the last heap).
    pub fn untouched(&self) -> u64 {
        self.end().saturating_sub(self.touched.next_multiple_of(PAGE).max(self.top.min(self.end())))
    }
}

/// The page range `mtrim` releases inside a free chunk at `a` of `size` bytes.
fn releasable(a: u64, size: u64) -> (u64, u64) {
    let start = (a + 48).next_multiple_of(PAGE);
    let end = a + size;
    if end <= start || end - start < PAGE {
        return (0, 0);
    }
    (start, start + ((end - start) & !(PAGE - 1)))
}

/// Where an allocation came from, as far as the model can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    Tcache,
    Fast,
    FreeExact,
    FreeSplit,
    Top,
    Conflict,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freed {
    Tcache,
    Fast,
    Bins { merged: u64 },
    Unknown,
}
