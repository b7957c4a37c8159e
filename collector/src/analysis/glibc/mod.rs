//! The glibc malloc model: fed the merged event stream of one process image, it knows at every
//! moment each arena's heaps, chunks and top, what sits in each thread's tcache, in fastbins and
//! in the bins, the mmapped chunks, and the thresholds in force — and so why the process holds
//! more from the OS than it uses.
//!
//! * [`params`]: thresholds and limits (defaults, environment, `mallopt`, the dynamic rule);
//! * [`arena`]: one arena's chunks and the rules that move them between states;
//! * [`breakdown`]: OS-held bytes by category, the model's `mallinfo2`, residency;
//! * [`explain`]: causes in plain words and what would change them.
//!
//! The model is checked, not trusted: `mallinfo2()` checkpoints the preload takes are compared
//! field by field as they arrive ([`Checkpoint`]), and contradictions between the trace and the
//! model are counted ([`GlibcModel::conflicts`]). Rules are glibc 2.36's; see
//! [`GlibcModel::uncertain`] for settings and versions where they may not hold.

pub mod arena;
pub mod breakdown;
pub mod explain;
pub mod params;

use mtrace_protocol::event::{chunk, Event, EventKind, Mallinfo2, MallinfoReason};
use rustc_hash::FxHashMap;

use arena::{Arena, Freed, Heap, State, Taken, Tcaches, TCACHE_STRUCT_CHUNK};
use params::Params;

/// Bytes in the unit people read best (B, KiB, MiB, GiB).
pub fn human(n: u64) -> String {
    const K: f64 = 1024.0;
    let f = n as f64;
    if f < K {
        format!("{n} B")
    } else if f < K * K {
        format!("{:.1} KiB", f / K)
    } else if f < K * K * K {
        format!("{:.1} MiB", f / K / K)
    } else {
        format!("{:.2} GiB", f / K / K / K)
    }
}

/// One `mallinfo2()` checkpoint and the model's values at the same point of the event stream.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub time_ns: u64,
    pub reason: MallinfoReason,
    pub glibc: Mallinfo2,
    pub model: Mallinfo2,
    /// The checkpoint sits where the merged order is exact: every event of another thread
    /// applied before it carries an earlier time mark than the clock read before `mallinfo2`
    /// was called, and every one applied after it a later mark than its own (read after). Its
    /// own thread's events are in order anyway. `None` until known.
    pub exact_order: Option<bool>,
    /// The collector clock read right before `mallinfo2()` (0: unknown).
    pub clock_before: u64,
    stream: u32,
}

/// A `malloc_trim` call with the model's prediction of what it would return.
#[derive(Clone, Debug)]
pub struct Trim {
    /// When the call returned (its event), and when it started (the checkpoint taken right
    /// before it, else the same).
    pub time_ns: u64,
    pub start_ns: u64,
    pub pad: u64,
    pub result: i64,
    /// Resident bytes the model expected `madvise` to release and the heap shrink to return.
    pub predicted_madvise: u64,
    pub predicted_shrink: u64,
}

impl Trim {
    pub fn predicted(&self) -> u64 {
        self.predicted_madvise + self.predicted_shrink
    }
}

/// A live mmapped chunk.
#[derive(Clone, Copy, Debug)]
pub struct Mmapped {
    /// Start of its mapping.
    pub start: u64,
    /// Length of its mapping.
    pub len: u64,
    pub req: u64,
}

/// Per stream (thread): its tcache state and arena binding.
#[derive(Clone, Debug, Default)]
struct ThreadInfo {
    tcache_ready: bool,
    /// Where its `tcache_perthread_struct` is: (arena index, chunk address).
    tcache_struct: Option<(usize, u64)>,
    arena: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct GlibcModel {
    pub enabled: bool,
    pub params: Params,
    /// Arenas; index 0 is the main arena.
    pub arenas: Vec<Arena>,
    arena_index: FxHashMap<u64, usize>,
    /// Thread-arena heap base → arena index.
    heap_index: FxHashMap<u64, usize>,
    tcaches: Tcaches,
    threads: FxHashMap<u32, ThreadInfo>,
    pub mmapped: FxHashMap<u64, Mmapped>,
    pub mmapped_bytes: u64,
    pub mmapped_req: u64,
    /// The application's own mappings (mmap/mremap results), start → length.
    pub app_maps: std::collections::BTreeMap<u64, u64>,
    pub checkpoints: Vec<Checkpoint>,
    pub trims: Vec<Trim>,
    /// When the last call of each stream had taken effect at the latest (for checkpoint ordering).
    last_event: FxHashMap<u32, u64>,
    /// The time mark of each stream's last record (for checkpoint ordering).
    prev_mark: FxHashMap<u32, u64>,
    pub start_ns: u64,
    pub lost_events: u64,
    /// The most the process held from the OS for its heap and mmapped blocks, and when.
    pub peak_os_held: u64,
    pub peak_os_held_ns: u64,
    /// The `Start` checkpoint was applied (or the image was forked from a started one).
    started: bool,
    /// Checkpoints before this index have a decided order.
    first_unsettled: usize,
    /// Heap-size and program-break reports older than what the model already knew.
    pub stale_observations: u64,
    pub uncertain: Vec<String>,
    /// Stream → thread id, filled by the image analysis.
    pub tids: FxHashMap<u32, u32>,
    /// Which part of a moved realloc [`GlibcModel::apply_part`] is applying.
    part: Part,
}

/// The part of an event being applied: a realloc that moved its block is applied in two steps
/// in merged order (see `merge::Merger::step`): its old block's release, then its new block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Part {
    #[default]
    Whole,
    OldBlock,
    NewBlock,
}

impl GlibcModel {
    pub fn new(meta: &super::meta::ProcessMeta, heap_start: u64, start_ns: u64) -> GlibcModel {
        let params = Params::from_env(&meta.env, meta.ncpus);
        let mut uncertain = params.uncertain.clone();
        let enabled = meta.glibc_chunks;
        if !enabled {
            uncertain.push(if meta.allocator.contains("libc.so") {
                "glibc's chunk headers were not recorded (MTRACE_CHUNKS=0, or glibc's malloc could not be confirmed): no glibc model".to_string()
            } else {
                format!(
                    "malloc is {}, not glibc's: the glibc model does not apply",
                    if meta.allocator.is_empty() { "unknown" } else { &meta.allocator }
                )
            });
        }
        if let Some(v) = glibc_version(&meta.glibc_version) {
            if v >= (2, 42) {
                uncertain.push(format!(
                    "glibc {}: tcache rules changed in 2.42 (large tcache bins, and fastbins are gone after 2.42); the model follows 2.36",
                    meta.glibc_version
                ));
            } else if v < (2, 26) {
                uncertain.push(format!("glibc {} has no tcache; the model assumes one", meta.glibc_version));
            }
        }
        if enabled && !meta.heap_info {
            uncertain.push("thread-arena heaps were not recorded (heap_info reading disabled): thread arenas are approximate".into());
        }
        GlibcModel {
            enabled,
            params,
            arenas: vec![Arena::new_main(heap_start)],
            arena_index: [(0u64, 0usize)].into_iter().collect(),
            heap_index: FxHashMap::default(),
            tcaches: Tcaches::default(),
            threads: FxHashMap::default(),
            mmapped: FxHashMap::default(),
            mmapped_bytes: 0,
            mmapped_req: 0,
            app_maps: Default::default(),
            checkpoints: Vec::new(),
            trims: Vec::new(),
            last_event: FxHashMap::default(),
            prev_mark: FxHashMap::default(),
            start_ns,
            lost_events: 0,
            stale_observations: 0,
            started: false,
            first_unsettled: 0,
            peak_os_held: 0,
            peak_os_held_ns: 0,
            uncertain,
            tids: FxHashMap::default(),
            part: Part::Whole,
        }
    }

    fn t_s(&self, time_ns: u64) -> f64 {
        time_ns.saturating_sub(self.start_ns) as f64 / 1e9
    }

    /// The model of a fork child, from its parent's at the fork made by `forking_stream`. Only
    /// the forking thread lives on in the child, where it writes stream 1: its tcache and arena
    /// are the child's thread's; the other threads' cached chunks stay cached for good (glibc
    /// never frees them). The books (checkpoints, trims, threshold history, peaks) start over.
    pub fn fork_child(mut self, forking_stream: u32, start_ns: u64) -> GlibcModel {
        const CHILD: u32 = 1;
        const GONE: u32 = u32::MAX;
        let mut threads = FxHashMap::default();
        if let Some(t) = self.threads.remove(&forking_stream) {
            threads.insert(CHILD, t);
        }
        let mut tcaches = Tcaches::default();
        if let Some(b) = self.tcaches.remove(&forking_stream) {
            tcaches.insert(CHILD, b);
        }
        for a in &mut self.arenas {
            a.threads.clear();
            for c in a.chunks.values_mut() {
                if let State::Tcache { tid } = c.state {
                    c.state = State::Tcache { tid: if tid == forking_stream { CHILD } else { GONE } };
                }
            }
        }
        if let Some(ai) = threads.get(&CHILD).and_then(|t: &ThreadInfo| t.arena) {
            self.arenas[ai].threads.insert(CHILD);
        }
        self.threads = threads;
        self.tcaches = tcaches;
        self.start_ns = start_ns;
        self.checkpoints.clear();
        self.first_unsettled = 0;
        self.trims.clear();
        self.params.changes.clear();
        self.last_event.clear();
        self.prev_mark.clear();
        self.stale_observations = 0;
        self.lost_events = 0;
        self.tids.clear();
        self.peak_os_held = self.heap_held() + self.mmapped_bytes;
        self.peak_os_held_ns = start_ns;
        self
    }

    /// Threads whose tcache holds chunks.
    pub fn tcache_threads(&self) -> usize {
        self.tcaches.values().filter(|b| b.iter().any(|v| !v.is_empty())).count()
    }

    /// Contradictions between the trace and the model, summed over arenas.
    pub fn conflicts(&self) -> u64 {
        self.arenas.iter().map(|a| a.conflicts).sum()
    }

    /// The arena a live heap chunk belongs to (created on the fly for unknown heaps).
    fn arena_of(&mut self, ptr: u64, hdr: u64) -> usize {
        if !chunk::non_main_arena(hdr) {
            return 0;
        }
        let base = ptr & !(params::HEAP_MAX_SIZE - 1);
        if let Some(&i) = self.heap_index.get(&base) {
            return i;
        }
        // A heap never announced: model it as an arena of its own, starting at the chunk.
        let i = self.arenas.len();
        let mut a = Arena::new_thread(base, Heap { base, size: 0 });
        a.top = ptr - 16;
        a.header_meta = 0;
        self.arenas.push(a);
        self.heap_index.insert(base, i);
        self.arena_index.insert(base, i);
        if !self.uncertain.iter().any(|u| u.starts_with("a thread-arena heap")) {
            self.uncertain.push("a thread-arena heap was used before it was announced: its arena's bytes are approximate".into());
        }
        i
    }

    fn tcache_bin(&self, stream: u32, csize: u64) -> Option<usize> {
        let i = self.params.tcache_index(csize)?;
        let ready = self.threads.get(&stream).is_some_and(|t| t.tcache_ready);
        if !ready {
            return None;
        }
        let n = self.tcaches.get(&stream).map_or(0, |b| b[i].len()) as u64;
        (n < self.params.tcache_count).then_some(i)
    }

    /// `MAYBE_INIT_TCACHE`: a thread's first malloc or free allocates its tcache struct from its
    /// arena, right before the block asked for. In a fresh arena it is the first chunk. Else it
    /// shows up as a gap of exactly its size below a block carved from the top (`gap`); if not,
    /// it was placed from the bins, and the model guesses where as `_int_malloc` would (exact
    /// fit, best fit, top) — a guess that moves if a later allocation proves it wrong.
    fn init_tcache(&mut self, stream: u32, ai: usize, first_chunk: Option<u64>, gap: Option<(u64, u64)>) {
        let info = self.threads.entry(stream).or_default();
        if info.tcache_ready {
            return;
        }
        info.tcache_ready = true;
        if self.params.tcache_count == 0 {
            return;
        }
        let a = &mut self.arenas[ai];
        if let Some((at, TCACHE_STRUCT_CHUNK)) = gap {
            a.restate(at, State::Meta, &mut self.tcaches);
            self.threads.get_mut(&stream).unwrap().tcache_struct = Some((ai, at));
            return;
        }
        if a.chunks.is_empty() {
            // Fresh arena: the struct is the first chunk, at the top.
            if first_chunk.is_none_or(|c| c >= a.top + TCACHE_STRUCT_CHUNK) {
                let at = a.top;
                a.take(at, TCACHE_STRUCT_CHUNK, 0, false, &mut self.tcaches);
                a.restate(at, State::Meta, &mut self.tcaches);
                self.threads.get_mut(&stream).unwrap().tcache_struct = Some((ai, at));
            }
            return;
        }
        // Space the trace has not explained yet (another thread's blocks, applied out of order,
        // or this struct) holds it more likely than free space: right below the block first,
        // then any unexplained piece that fits.
        let fits = |(&a, ch): (&u64, &arena::Chunk)| (ch.state == State::Unseen && ch.size >= TCACHE_STRUCT_CHUNK).then_some((a, ch.size));
        let below = first_chunk.and_then(|c| a.chunks.range(..c).next_back().and_then(fits).filter(|&(u, size)| u + size == c));
        let exact = || a.chunks.iter().find(|(_, ch)| ch.state == State::Unseen && ch.size == TCACHE_STRUCT_CHUNK).map(|(&u, _)| u);
        let unseen = below.map(|(u, size)| u + size - TCACHE_STRUCT_CHUNK).or_else(exact).or_else(|| a.chunks.iter().find_map(fits).map(|(u, _)| u));
        let at = match unseen {
            Some(at) => {
                a.take(at, TCACHE_STRUCT_CHUNK, 0, false, &mut self.tcaches);
                a.restate(at, State::Meta, &mut self.tcaches);
                at
            }
            None => self.guess_struct(ai),
        };
        self.threads.get_mut(&stream).unwrap().tcache_struct = Some((ai, at));
    }

    /// Place a tcache struct where `_int_malloc` probably put it (see [`Self::init_tcache`]).
    fn guess_struct(&mut self, ai: usize) -> u64 {
        let a = &mut self.arenas[ai];
        let at = a.place(TCACHE_STRUCT_CHUNK);
        a.take(at, TCACHE_STRUCT_CHUNK, 0, false, &mut self.tcaches);
        a.restate(at, State::Meta, &mut self.tcaches);
        a.guesses.insert(at);
        at
    }

    /// A tcache-struct-sized gap showed up below a block carved from the top of arena `ai`: if a
    /// thread's struct there was only guessed, this is where it is; the guessed place is free.
    fn adopt_gap(&mut self, ai: usize, at: u64) {
        let Some((&stream, _)) = self.threads.iter().find(|(_, t)| t.tcache_struct.is_some_and(|(a, g)| a == ai && self.arenas[ai].guesses.contains(&g)))
        else {
            return;
        };
        let (_, g) = self.threads[&stream].tcache_struct.unwrap();
        let a = &mut self.arenas[ai];
        a.guesses.remove(&g);
        a.restate(at, State::Meta, &mut self.tcaches);
        let freed = a.free(g, stream, None, false, &mut self.tcaches);
        self.threads.get_mut(&stream).unwrap().tcache_struct = Some((ai, at));
        self.after_bins_free(ai, freed);
    }

    /// Guessed tcache structs an allocation landed on: they were elsewhere; guess again.
    fn move_displaced_guesses(&mut self, ai: usize) {
        for _ in 0..64 {
            let Some(g) = self.arenas[ai].displaced.pop() else { return };
            let owner = self.threads.iter().find(|(_, t)| t.tcache_struct == Some((ai, g))).map(|(&s, _)| s);
            let at = self.guess_struct(ai);
            if let Some(s) = owner {
                self.threads.get_mut(&s).unwrap().tcache_struct = Some((ai, at));
            }
        }
    }

    fn bind(&mut self, stream: u32, ai: usize) {
        let info = self.threads.entry(stream).or_default();
        if info.arena != Some(ai) {
            if let Some(old) = info.arena {
                self.arenas[old].threads.remove(&stream);
            }
            info.arena = Some(ai);
            self.arenas[ai].threads.insert(stream);
        }
    }

    /// A heap chunk handed to the application.
    fn heap_alloc(&mut self, kind: EventKind, ptr: u64, req: u64, align: u64, hdr: u64, stream: u32, via_tcache: bool) {
        let ai = self.arena_of(ptr, hdr);
        let c = ptr - 16;
        let size = chunk::size(hdr);
        let ready = self.threads.get(&stream).is_some_and(|t| t.tcache_ready);
        // In a fresh arena the struct goes first; elsewhere the block's placement tells.
        let init_after = via_tcache && !ready && !self.arenas[ai].chunks.is_empty();
        if via_tcache && !init_after {
            self.init_tcache(stream, ai, Some(c), None);
        }
        self.bind(stream, ai);
        // Requests of 1024 B or more go through the large-bin path, which consolidates first.
        let nb = if align > 16 { size + align + params::MINSIZE } else { size };
        let a = &mut self.arenas[ai];
        let in_tcache = matches!(a.chunks.get(&c), Some(ch) if matches!(ch.state, State::Tcache { .. }));
        if nb >= 1024 && !in_tcache && a.t.fast_count > 0 {
            a.consolidate(&mut self.tcaches);
        }
        let memalign = matches!(kind, EventKind::Memalign | EventKind::PosixMemalign | EventKind::AlignedAlloc | EventKind::Valloc | EventKind::Pvalloc);
        let taken = a.take(c, size, req, memalign, &mut self.tcaches);
        let gap = a.last_gap;
        if init_after {
            self.init_tcache(stream, ai, Some(c), gap);
        } else if let Some((at, TCACHE_STRUCT_CHUNK)) = gap {
            // A struct-sized gap at the top: a struct the model guessed elsewhere is here.
            self.adopt_gap(ai, at);
        }
        self.move_displaced_guesses(ai);
        self.params.note_heap_allocation(size);
        // `_int_malloc` refills the tcache with chunks of the same size it passes on the way.
        if matches!(taken, Taken::Fast | Taken::FreeExact) {
            if let Some(bin) = self.params.tcache_index(size) {
                let ready = self.threads.get(&stream).is_some_and(|t| t.tcache_ready);
                if ready {
                    let have = self.tcaches.get(&stream).map_or(0, |b| b[bin].len()) as u64;
                    let room = self.params.tcache_count.saturating_sub(have);
                    self.arenas[ai].stash(size, bin, room, taken == Taken::Fast, stream, &mut self.tcaches);
                }
            }
        }
    }

    /// A heap chunk freed through `_int_free` (tcache first).
    fn heap_free(&mut self, ptr: u64, hdr: u64, stream: u32, init_tcache: bool) {
        let ai = self.arena_of(ptr, hdr);
        if init_tcache {
            let own = self.threads.get(&stream).and_then(|t| t.arena).unwrap_or(ai);
            self.init_tcache(stream, own, None, None);
            self.move_displaced_guesses(own);
        }
        let c = ptr - 16;
        let size = chunk::size(hdr);
        let bin = self.tcache_bin(stream, size);
        let fast = self.params.is_fast(size);
        if let Some(ch) = self.arenas[ai].chunks.get(&c) {
            if ch.size != size {
                let had = ch.size;
                self.arenas[ai].conflict(|| format!("free of {c:#x}: chunk of {size} B, the model has {had} B"));
            }
        }
        let freed = self.arenas[ai].free(c, stream, bin, fast, &mut self.tcaches);
        self.after_bins_free(ai, freed);
    }

    fn mmapped_alloc(&mut self, ptr: u64, req: u64, hdr: u64, prev_size: u64) {
        let len = chunk::size(hdr) + prev_size;
        let m = Mmapped { start: ptr - 16 - prev_size, len, req };
        if let Some(old) = self.mmapped.insert(ptr, m) {
            self.mmapped_bytes -= old.len;
            self.mmapped_req -= old.req;
        }
        self.mmapped_bytes += len;
        self.mmapped_req += req;
    }

    fn mmapped_free(&mut self, ptr: u64) {
        if let Some(m) = self.mmapped.remove(&ptr) {
            self.mmapped_bytes -= m.len;
            self.mmapped_req -= m.req;
        }
    }

    /// The allocating thread's arena, when a request larger than a chunk went to mmap: it still
    /// passed through `_int_malloc` there (and consolidated its fastbins).
    fn consolidate_for_large(&mut self, stream: u32) {
        if let Some(ai) = self.threads.get(&stream).and_then(|t| t.arena) {
            if self.arenas[ai].t.fast_count > 0 {
                self.arenas[ai].consolidate(&mut self.tcaches);
            }
        }
    }

    /// Apply `part` of one event in merged order (see [`Part`]).
    pub fn apply_part(&mut self, ev: &Event, part: Part, time_ns: u64, stream: u32) {
        self.part = part;
        self.apply(ev, time_ns, stream);
        self.part = Part::Whole;
    }

    /// Apply one event in merged order. Values no glibc would produce (a misaligned block, a
    /// chunk or heap larger than the address space) are counted as contradictions and ignored.
    pub fn apply(&mut self, ev: &Event, time_ns: u64, stream: u32) {
        if self.enabled && !plausible(ev) {
            self.arenas[0].conflict(|| format!("implausible event ignored: {ev:?}"));
            return;
        }
        self.apply_event(ev, time_ns, stream);
        // What is held changes with the heap's size or an mmapped block.
        if matches!(ev, Event::ProgramBreak { .. } | Event::HeapSize { .. } | Event::ArenaHeap { .. } | Event::Alloc { .. } | Event::Realloc { .. }) {
            let held = self.heap_held() + self.mmapped_bytes;
            if held > self.peak_os_held {
                self.peak_os_held = held;
                self.peak_os_held_ns = time_ns;
            }
        }
    }

    fn apply_event(&mut self, ev: &Event, time_ns: u64, stream: u32) {
        // Only the allocator's own calls matter for a checkpoint's order (not observations).
        // The mark of this stream's previous record: every call after it began after that
        // clock read.
        let prev_mark = self.prev_mark.insert(stream, time_ns).unwrap_or(0);
        if ev_is_call(ev) {
            // When the call's effect may have happened, at the earliest:
            // * a free is recorded before glibc frees (the block must still be readable), so its
            //   effect follows its own mark;
            // * malloc_trim takes milliseconds: it began after the thread's previous call;
            // * the other calls are recorded after they returned: their effect precedes the mark,
            //   and follows the stream's previous mark. The thread may have been preempted
            //   between the two (seen under load); a whole idle stretch before the call, though,
            //   is not preemption, so more than `CALL_LAG_NS` before the mark is not assumed.
            let effect = match ev {
                Event::Free { .. } => time_ns,
                Event::MallocTrim { .. } => self.last_event.get(&stream).copied().unwrap_or(0),
                _ => prev_mark.max(time_ns.saturating_sub(CALL_LAG_NS)),
            };
            self.settle_checkpoints(stream, effect, time_ns);
            // When its effect was done, at the latest: a free's may trail its mark by a
            // preemption; count it as ending `CALL_LAG_NS` later.
            let end = if matches!(ev, Event::Free { .. }) { time_ns.saturating_add(CALL_LAG_NS) } else { time_ns };
            self.last_event.insert(stream, end);
        }
        match *ev {
            Event::Alloc { kind, ptr, size, align, chunk: hdr, prev_size, .. } => {
                if ptr == 0 || hdr == 0 || !self.enabled {
                    return;
                }
                if chunk::is_mmapped(hdr) {
                    self.consolidate_for_large(stream);
                    self.mmapped_alloc(ptr, size, hdr, prev_size);
                } else {
                    self.heap_alloc(kind, ptr, size, align, hdr, stream, kind == EventKind::Malloc);
                }
            }
            Event::Free { ptr, chunk: hdr, .. } => {
                if ptr == 0 || hdr == 0 || !self.enabled {
                    return;
                }
                self.libc_free(ptr, hdr, stream, time_ns);
            }
            Event::Realloc { old_ptr, new_ptr, size, old_chunk, chunk: hdr, prev_size, .. } => {
                if !self.enabled {
                    return;
                }
                if new_ptr == 0 {
                    if size == 0 && old_ptr != 0 && old_chunk != 0 {
                        self.libc_free(old_ptr, old_chunk, stream, time_ns);
                    }
                    return;
                }
                if hdr == 0 {
                    return;
                }
                if old_ptr == 0 {
                    // realloc(NULL, n) is malloc(n).
                    if chunk::is_mmapped(hdr) {
                        self.consolidate_for_large(stream);
                        self.mmapped_alloc(new_ptr, size, hdr, prev_size);
                    } else {
                        self.heap_alloc(EventKind::Malloc, new_ptr, size, 0, hdr, stream, true);
                    }
                    return;
                }
                self.realloc(old_ptr, new_ptr, size, old_chunk, hdr, prev_size, stream);
            }
            Event::Mmap { result, len, .. } => {
                if result != u64::MAX && result != 0 {
                    self.app_maps.insert(result, len.next_multiple_of(arena::PAGE));
                }
            }
            Event::Munmap { addr, len, result } => {
                if result == 0 {
                    self.unmap_app(addr, len.next_multiple_of(arena::PAGE));
                }
            }
            Event::Mremap { old_addr, old_len, new_len, result, .. } => {
                if result != u64::MAX {
                    self.unmap_app(old_addr, old_len.next_multiple_of(arena::PAGE));
                    self.app_maps.insert(result, new_len.next_multiple_of(arena::PAGE));
                }
            }
            Event::ProgramBreak { brk, fresh } => {
                // Threads report the break they saw at their own events; in a merged order that
                // is ambiguous within a few hundred µs, a report can be stale. The top chunk
                // always lies below the break: a report below it is stale, not news — unless it
                // is fresh (no other thread runs): then glibc trimmed what the model still holds
                // (unseen frees: a thread's exit flushes its tcache), and the model follows.
                let a = &mut self.arenas[0];
                let base = a.heaps[0].base;
                if brk >= base && brk >= a.top + params::MINSIZE.min(brk - base) {
                    a.heaps[0].size = brk - base;
                    a.touched = a.touched.min(brk);
                } else if fresh && brk >= base + params::MINSIZE {
                    self.stale_observations += 1;
                    let dropped = a.cut_to(brk, &mut self.tcaches);
                    if dropped > 0 {
                        a.conflict(|| format!("the program break fell to {brk:#x}: {dropped} B the model held in use above it were free"));
                    }
                } else {
                    self.stale_observations += 1;
                }
            }
            Event::ArenaHeap { heap, ar_ptr, size, prev } => self.arena_heap(heap, ar_ptr, size, prev, stream),
            Event::HeapSize { heap, size, fresh } => {
                if let Some(&ai) = self.heap_index.get(&heap) {
                    let a = &mut self.arenas[ai];
                    let last = a.heaps.last().is_some_and(|h| h.base == heap);
                    // As for the break: the top chunk lies inside the last heap; a report below
                    // it is stale — unless fresh, when glibc trimmed what the model holds.
                    if last && heap + size < a.top + params::MINSIZE {
                        self.stale_observations += 1;
                        if fresh {
                            let dropped = a.cut_heap(heap, size, &mut self.tcaches);
                            if dropped > 0 {
                                a.conflict(|| format!("heap {heap:#x} shrank to {size} B: {dropped} B the model held in use there were free"));
                            }
                            if size == 0 && a.heaps.last().is_none_or(|h| h.base != heap) {
                                self.heap_index.remove(&heap);
                            }
                        }
                    } else {
                        // The heap grew: the top was too small, and `_int_malloc` consolidated
                        // the fastbins before `sysmalloc` (the allocation itself comes next).
                        let grew = last && a.heaps.last().is_some_and(|h| size > h.size);
                        if grew && !fresh && a.t.fast_count > 0 {
                            a.consolidate(&mut self.tcaches);
                        }
                        if let Some(h) = a.heaps.iter_mut().find(|h| h.base == heap) {
                            h.size = size;
                        }
                        let end = a.end();
                        a.touched = a.touched.min(end);
                    }
                }
            }
            Event::MallocTrim { pad, result } => {
                if !self.enabled {
                    return;
                }
                let (mut madv, mut shrink) = (0, 0);
                for a in &self.arenas {
                    let (m, s) = a.predict_trim(pad);
                    madv += m;
                    shrink += s;
                }
                let start_ns = match self.checkpoints.last() {
                    Some(cp) if cp.reason == MallinfoReason::BeforeTrim && cp.stream == stream => cp.time_ns,
                    _ => time_ns,
                };
                self.trims.push(Trim { time_ns, start_ns, pad, result, predicted_madvise: madv, predicted_shrink: shrink });
                for a in &mut self.arenas {
                    a.consolidate(&mut self.tcaches);
                    a.release_free_pages();
                }
                // systrim's new break follows as a ProgramBreak event.
            }
            Event::Mallopt { param, value, result } => {
                self.arenas[0].consolidate(&mut self.tcaches);
                let t = self.t_s(time_ns);
                self.params.mallopt(param, value, result, time_ns, t);
            }
            Event::ThreadExit => self.thread_exit(stream),
            Event::Lost { events, .. } => {
                self.lost_events += events;
            }
            Event::Mallinfo { reason, mi, clock_before } => {
                if reason == MallinfoReason::Start {
                    self.start_from_books(stream, &mi);
                }
                let start = if clock_before != 0 { clock_before.min(time_ns) } else { time_ns };
                // Nothing of another thread applied so far may have happened after the clock
                // read `start`.
                let before_ok = self.last_event.iter().filter(|(s, _)| **s != stream).all(|(_, &t)| t < start);
                let model = self.mallinfo();
                // Before the image's `Start` checkpoint the model does not know the heap yet.
                let exact_order = if before_ok && (self.started || reason == MallinfoReason::Start) { None } else { Some(false) };
                self.started |= reason == MallinfoReason::Start;
                self.checkpoints.push(Checkpoint { time_ns, reason, glibc: mi, model, exact_order, clock_before, stream });
            }
            _ => {}
        }
    }

    /// The `Start` checkpoint: glibc's main arena as it was when recording began. What lies below
    /// its top that the model has not seen is `Unseen` (allocations before recording, or by the
    /// tracer itself), and the recording thread's tcache already exists if anything was allocated.
    fn start_from_books(&mut self, stream: u32, mi: &Mallinfo2) {
        if !self.enabled || mi.arena == 0 {
            return;
        }
        self.threads.entry(stream).or_default().tcache_ready = true;
        let a = &mut self.arenas[0];
        let end = a.end();
        if mi.keepcost > end.saturating_sub(a.heaps[0].base) {
            return;
        }
        let glibc_top = end - mi.keepcost;
        if glibc_top > a.top && a.chunks.range(a.top..).next().is_none() {
            let (at, size) = (a.top, glibc_top - a.top);
            a.top = glibc_top;
            a.insert_unseen(at, size);
            a.touched = a.touched.max(glibc_top + 16);
        }
    }

    /// `__libc_free` of a live chunk: the dynamic threshold rule for mmapped chunks, else
    /// `_int_free` after `MAYBE_INIT_TCACHE`.
    fn libc_free(&mut self, ptr: u64, hdr: u64, stream: u32, time_ns: u64) {
        if chunk::is_mmapped(hdr) {
            let t = self.t_s(time_ns);
            self.params.free_mmapped(hdr & !chunk::PREV_INUSE & !chunk::NON_MAIN_ARENA, time_ns, t);
            self.mmapped_free(ptr);
        } else {
            self.heap_free(ptr, hdr, stream, true);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn realloc(&mut self, old_ptr: u64, new_ptr: u64, req: u64, old_hdr: u64, hdr: u64, prev_size: u64, stream: u32) {
        let old_mm = chunk::is_mmapped(old_hdr);
        let new_mm = chunk::is_mmapped(hdr);
        // A moved block may come in two parts (see `Part`).
        let (release, acquire) = match self.part {
            Part::Whole => (true, true),
            Part::OldBlock => (true, false),
            Part::NewBlock => (false, true),
        };
        if old_mm {
            // mremap_chunk, or malloc + copy + munmap_chunk: no threshold update either way.
            if release {
                self.mmapped_free(old_ptr);
            }
            if !acquire {
                return;
            }
            if new_mm {
                self.mmapped_alloc(new_ptr, req, hdr, prev_size);
            } else {
                self.heap_alloc(EventKind::Realloc, new_ptr, req, 0, hdr, stream, false);
            }
            return;
        }
        if new_ptr != old_ptr {
            if acquire {
                if new_mm {
                    self.consolidate_for_large(stream);
                    self.mmapped_alloc(new_ptr, req, hdr, prev_size);
                } else {
                    self.heap_alloc(EventKind::Realloc, new_ptr, req, 0, hdr, stream, false);
                }
            }
            if release {
                self.heap_free(old_ptr, old_hdr, stream, false);
            }
            return;
        }
        // In place.
        let ai = self.arena_of(old_ptr, old_hdr);
        let c = old_ptr - 16;
        let old_size = chunk::size(old_hdr);
        let new_size = chunk::size(hdr);
        let a = &mut self.arenas[ai];
        if new_size > old_size {
            // Grown into the next chunk: a free one is taken whole and what is left of it is
            // split off and freed through _int_free (tcache, fastbin or bins); the top is cut.
            let next = c + old_size;
            let leftover = match a.chunks.get(&next) {
                Some(n) if n.state == arena::State::Free && old_size + n.size >= new_size + params::MINSIZE => Some(old_size + n.size - new_size),
                _ => None,
            };
            a.take(next, new_size - old_size, 0, false, &mut self.tcaches);
            a.join_in_use(c, new_size, req, &mut self.tcaches);
            if let Some(rest) = leftover {
                let rem = c + new_size;
                if a.chunks.get(&rem).is_some_and(|ch| ch.state == arena::State::Free && ch.size == rest) {
                    a.restate(rem, State::Meta, &mut self.tcaches);
                    let bin = self.tcache_bin(stream, rest);
                    let fast = self.params.is_fast(rest);
                    let freed = self.arenas[ai].free(rem, stream, bin, fast, &mut self.tcaches);
                    self.after_bins_free(ai, freed);
                }
            }
        } else if new_size < old_size {
            a.join_in_use(c, new_size, req, &mut self.tcaches);
            // The remainder is split off and goes through _int_free.
            let rem = c + new_size;
            a.insert_meta(rem, old_size - new_size);
            let bin = self.tcache_bin(stream, old_size - new_size);
            let fast = self.params.is_fast(old_size - new_size);
            let freed = self.arenas[ai].free(rem, stream, bin, fast, &mut self.tcaches);
            self.after_bins_free(ai, freed);
        } else {
            a.join_in_use(c, new_size, req, &mut self.tcaches);
        }
    }

    fn unmap_app(&mut self, addr: u64, len: u64) {
        let end = addr.saturating_add(len);
        let hit: Vec<(u64, u64)> = self.app_maps.range(..end).filter(|&(&s, &l)| s.saturating_add(l) > addr).map(|(&s, &l)| (s, l)).collect();
        for (s, l) in hit {
            self.app_maps.remove(&s);
            if s < addr {
                self.app_maps.insert(s, addr - s);
            }
            if s.saturating_add(l) > end {
                self.app_maps.insert(end, s.saturating_add(l) - end);
            }
        }
    }

    fn arena_heap(&mut self, heap: u64, ar_ptr: u64, size: u64, prev: u64, stream: u32) {
        if !self.enabled || self.heap_index.contains_key(&heap) {
            return;
        }
        let h = Heap { base: heap, size };
        if let Some(&ai) = self.arena_index.get(&ar_ptr) {
            // A new heap for an arena: its top was too small (consolidation came first).
            if self.arenas[ai].t.fast_count > 0 {
                self.arenas[ai].consolidate(&mut self.tcaches);
            }
            let params = &self.params;
            let max_fast = params.max_fast;
            let tcache_ready = self.threads.get(&stream).is_some_and(|t| t.tcache_ready);
            let counts: Vec<usize> = self.tcaches.get(&stream).map_or(vec![0; 64], |b| b.iter().map(|v| v.len()).collect());
            let (tc_count, tc_max) = (params.tcache_count, params.tcache_max_chunk);
            let decide = move |s: u64| {
                let bin = (tcache_ready && tc_count > 0 && s <= tc_max && s >= params::MINSIZE)
                    .then(|| ((s - params::MINSIZE) / 16) as usize)
                    .filter(|&i| (counts[i] as u64) < tc_count);
                (bin, s <= max_fast)
            };
            self.arenas[ai].add_heap(h, stream, decide, &mut self.tcaches);
            self.heap_index.insert(heap, ai);
            return;
        }
        let ai = self.arenas.len();
        let a = if ar_ptr == heap + arena::HEAP_INFO || prev == 0 {
            Arena::new_thread(ar_ptr, h)
        } else {
            let mut a = Arena::new_thread(ar_ptr, h);
            a.top = heap + arena::HEAP_INFO;
            a.header_meta = arena::HEAP_INFO;
            self.uncertain.push(format!("arena {ar_ptr:#x} was first seen in a later heap: its earlier heaps are not modelled"));
            a
        };
        self.arenas.push(a);
        self.arena_index.insert(ar_ptr, ai);
        self.heap_index.insert(heap, ai);
    }

    /// A thread exits: `tcache_thread_shutdown` frees every cached chunk (tcache off, so to the
    /// fastbins or bins), then the tcache struct; its arena goes on the free list.
    fn thread_exit(&mut self, stream: u32) {
        if let Some(bins) = self.tcaches.remove(&stream) {
            for addr in bins.into_iter().flatten() {
                let Some(ai) = self.arenas.iter().position(|a| a.chunks.get(&addr).is_some_and(|c| c.state == State::Tcache { tid: stream })) else {
                    continue;
                };
                let a = &mut self.arenas[ai];
                let size = a.chunks[&addr].size;
                a.restate(addr, State::Meta, &mut self.tcaches);
                let fast = self.params.is_fast(size);
                let freed = self.arenas[ai].free(addr, stream, None, fast, &mut self.tcaches);
                self.after_bins_free(ai, freed);
            }
        }
        if let Some(info) = self.threads.remove(&stream) {
            if let Some((ai, at)) = info.tcache_struct {
                let freed = self.arenas[ai].free(at, stream, None, false, &mut self.tcaches);
                self.after_bins_free(ai, freed);
            }
            if let Some(ai) = info.arena {
                self.arenas[ai].threads.remove(&stream);
            }
        }
    }

    /// After `_int_free` put a chunk in the bins: a merged chunk of 64 KiB or more trims — the
    /// main heap with `systrim` (its new break is also reported when a hooked call made it), a
    /// thread arena's heap with `heap_trim`.
    fn after_bins_free(&mut self, ai: usize, freed: Freed) {
        let Freed::Bins { merged } = freed else { return };
        if merged < params::CONSOLIDATION_THRESHOLD {
            return;
        }
        let (pad, thr) = (self.params.top_pad, self.params.trim_threshold);
        let a = &mut self.arenas[ai];
        if !a.is_main() {
            a.heap_trim(pad, thr);
            return;
        }
        let top = a.top_size();
        if top < thr {
            return;
        }
        let area = top.saturating_sub(params::MINSIZE + 1);
        if area > pad {
            let extra = (area - pad) & !(arena::PAGE - 1);
            a.heaps[0].size = a.heaps[0].size.saturating_sub(extra);
            let end = a.end();
            a.touched = a.touched.min(end);
        }
    }

    /// Decide the order of pending checkpoints as other threads' events come: one stamped no
    /// later than the checkpoint's own mark, applied after it, may have happened before it.
    /// Once the merged history is `2 × CALL_LAG_NS` past a checkpoint, nothing can come back
    /// before it.
    fn settle_checkpoints(&mut self, stream: u32, effect_ns: u64, time_ns: u64) {
        const SETTLED_NS: u64 = 2 * CALL_LAG_NS;
        let first = self.first_unsettled;
        for cp in self.checkpoints[first..].iter_mut() {
            if cp.exact_order.is_none() && cp.stream != stream {
                if effect_ns <= cp.time_ns {
                    cp.exact_order = Some(false);
                } else if time_ns > cp.time_ns + SETTLED_NS {
                    cp.exact_order = Some(true);
                }
            }
        }
        while self.checkpoints.get(self.first_unsettled).is_some_and(|c| c.exact_order.is_some()) {
            self.first_unsettled += 1;
        }
    }

    /// End of the stream: checkpoints nothing contradicted are exact.
    pub fn finish(&mut self) {
        for cp in &mut self.checkpoints {
            if cp.exact_order.is_none() {
                cp.exact_order = Some(true);
            }
        }
    }

    /// What `mallinfo2()` would say in the model's state.
    pub fn mallinfo(&self) -> Mallinfo2 {
        let mut m = Mallinfo2::default();
        for a in &self.arenas {
            m.arena += a.held();
            m.ordblks += a.t.free_count + 1;
            m.smblks += a.t.fast_count;
            m.fsmblks += a.t.fast;
            m.fordblks += a.t.fast + a.t.free + a.top_size();
        }
        m.hblks = self.mmapped.len() as u64;
        m.hblkhd = self.mmapped_bytes;
        m.uordblks = m.arena.saturating_sub(m.fordblks);
        m.keepcost = self.arenas[0].top_size();
        m
    }
}

/// Could glibc have produced these values? Heap pointers are 16-aligned and above their
/// 16-byte header, sizes stay far below the 47-bit address space, heaps below `HEAP_MAX_SIZE`.
fn plausible(ev: &Event) -> bool {
    const LIMIT: u64 = 1 << 47;
    let block = |ptr: u64, hdr: u64, prev: u64| {
        ptr == 0 || hdr == 0 || (ptr % 16 == 0 && ptr >= 16 + prev && chunk::size(hdr) < LIMIT && prev < LIMIT && ptr < LIMIT << 1)
    };
    match *ev {
        Event::Alloc { ptr, chunk, prev_size, .. } => block(ptr, chunk, prev_size),
        Event::Free { ptr, chunk, .. } => block(ptr, chunk, 0),
        Event::Realloc { old_ptr, new_ptr, old_chunk, chunk, prev_size, .. } => block(old_ptr, old_chunk, 0) && block(new_ptr, chunk, prev_size),
        Event::HeapSize { heap, size, .. } => size <= params::HEAP_MAX_SIZE && heap < LIMIT << 1,
        Event::ArenaHeap { heap, size, .. } => size <= params::HEAP_MAX_SIZE && heap < LIMIT << 1,
        Event::ProgramBreak { brk, .. } => brk < LIMIT << 1,
        Event::Mmap { len, .. } | Event::Munmap { len, .. } => len < LIMIT,
        Event::Mremap { old_len, new_len, .. } => old_len < LIMIT && new_len < LIMIT,
        _ => true,
    }
}

/// How far from its time mark a call's effect may lie because its thread was preempted between
/// the two (see `apply_event`): several scheduler time slices on a loaded machine.
const CALL_LAG_NS: u64 = 20_000_000;

/// A call of the application (what a checkpoint's order is judged against).
fn ev_is_call(ev: &Event) -> bool {
    matches!(ev, Event::Alloc { .. } | Event::Free { .. } | Event::Realloc { .. } | Event::MallocTrim { .. } | Event::Mallopt { .. } | Event::ThreadExit)
}

fn glibc_version(s: &str) -> Option<(u32, u32)> {
    let mut it = s.trim().split('.');
    let a = it.next()?.trim().parse().ok()?;
    let b = it.next()?.chars().take_while(|c| c.is_ascii_digit()).collect::<String>().parse().ok()?;
    Some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::meta::ProcessMeta;

    const HEAP: u64 = 0x5555_0000_0000;

    fn model() -> GlibcModel {
        let meta = ProcessMeta { glibc_chunks: true, heap_info: true, ncpus: 2, glibc_version: "2.36".into(), ..Default::default() };
        let mut g = GlibcModel::new(&meta, HEAP, 0);
        g.apply(&Event::ProgramBreak { brk: HEAP + 0x21000, fresh: false }, 0, 1);
        g
    }

    fn malloc(g: &mut GlibcModel, chunk_addr: u64, req: u64) -> u64 {
        let size = params::request2size(req);
        let ptr = chunk_addr + 16;
        g.apply(&Event::Alloc { kind: EventKind::Malloc, ptr, size: req, align: 0, chunk: size | 1, prev_size: 0, stack: 0, after: None }, 1, 1);
        ptr
    }

    fn free(g: &mut GlibcModel, ptr: u64, req: u64, stream: u32) {
        let size = params::request2size(req);
        g.apply(&Event::Free { kind: EventKind::Free, ptr, chunk: size | 1, after: None }, 2, stream);
    }

    /// `n` blocks of `req` bytes one after another from the start of the heap (after the main
    /// thread's tcache struct).
    fn fill(g: &mut GlibcModel, n: u64, req: u64) -> Vec<u64> {
        let cs = params::request2size(req);
        (0..n).map(|i| malloc(g, HEAP + TCACHE_STRUCT_CHUNK + i * cs, req)).collect()
    }

    /// A checkpoint of another thread is exact only if no call applied after it can have taken
    /// effect before it: a malloc recorded after the checkpoint's mark may have returned before
    /// it, if its thread was preempted in between (its previous record bounds how far back).
    #[test]
    fn checkpoint_order_allows_for_preemption_before_the_mark() {
        const MS: u64 = 1_000_000;
        let checkpoint = |g: &mut GlibcModel, at: u64| {
            let mi = g.mallinfo();
            g.apply(&Event::Mallinfo { reason: MallinfoReason::Start, mi, clock_before: at }, at, 9);
        };
        let alloc = |g: &mut GlibcModel, at: u64, ptr: u64| {
            g.apply(&Event::Alloc { kind: EventKind::Malloc, ptr, size: 24, align: 0, chunk: 33, prev_size: 0, stack: 0, after: None }, at, 1);
        };
        let first = HEAP + TCACHE_STRUCT_CHUNK + 16;
        // Busy thread: its previous record (100 ms) is before the checkpoint (101 ms), so its
        // malloc marked 102 ms may have taken effect before the checkpoint.
        let mut g = model();
        alloc(&mut g, 100 * MS, first);
        checkpoint(&mut g, 101 * MS);
        alloc(&mut g, 102 * MS, first + 32);
        g.finish();
        assert_eq!(g.checkpoints[0].exact_order, Some(false));
        // Idle thread: its previous record is long before, but a malloc marked more than
        // CALL_LAG_NS after the checkpoint was not preempted for that long.
        let mut g = model();
        alloc(&mut g, 100 * MS, first);
        checkpoint(&mut g, 200 * MS);
        alloc(&mut g, 200 * MS + CALL_LAG_NS + MS, first + 32);
        g.finish();
        assert_eq!(g.checkpoints[0].exact_order, Some(true));
        // ... but one marked within CALL_LAG_NS of it may have been.
        let mut g = model();
        alloc(&mut g, 100 * MS, first);
        checkpoint(&mut g, 200 * MS);
        alloc(&mut g, 205 * MS, first + 32);
        g.finish();
        assert_eq!(g.checkpoints[0].exact_order, Some(false));
        // A free is recorded before glibc frees: marked after the checkpoint, it came after it.
        let mut g = model();
        alloc(&mut g, 100 * MS, first);
        checkpoint(&mut g, 200 * MS);
        g.apply(&Event::Free { kind: EventKind::Free, ptr: first, chunk: 33, after: None }, 201 * MS, 1);
        g.finish();
        assert_eq!(g.checkpoints[0].exact_order, Some(true));
    }

    fn check_consistent(g: &GlibcModel) {
        for v in g.breakdown(0).arenas {
            assert_eq!(v.unexplained_bytes, 0, "arena {}", v.id);
        }
        assert_eq!(g.conflicts(), 0, "{:?}", g.arenas[0].conflict_log);
    }

    #[test]
    fn small_frees_fill_the_tcache_then_fastbins_until_a_large_request_consolidates() {
        let mut g = model();
        let p = fill(&mut g, 20, 100);
        let m = g.mallinfo();
        assert_eq!(m.arena, 0x21000);
        assert_eq!(m.uordblks, TCACHE_STRUCT_CHUNK + 20 * 112);
        assert_eq!(m.keepcost, 0x21000 - TCACHE_STRUCT_CHUNK - 20 * 112);
        for &q in &p {
            free(&mut g, q, 100, 1);
        }
        let m = g.mallinfo();
        assert_eq!((m.smblks, m.fsmblks), (13, 13 * 112));
        let c = g.categories();
        assert_eq!((c.tcache, c.fastbins, c.live), (7 * 112, 13 * 112, 0));
        assert_eq!(m.fordblks, 13 * 112 + m.keepcost);
        check_consistent(&g);
        // malloc(2000): the 13 fast chunks merge into the top, and the block comes from there.
        let big = malloc(&mut g, HEAP + TCACHE_STRUCT_CHUNK + 7 * 112, 2000);
        assert_eq!(g.mallinfo().smblks, 0);
        assert_eq!(g.categories().fastbins, 0);
        assert_eq!(g.arenas[0].top, big - 16 + 2016);
        check_consistent(&g);
    }

    #[test]
    fn a_fastbin_take_refills_the_tcache() {
        let mut g = model();
        let p = fill(&mut g, 20, 100);
        for &q in &p {
            free(&mut g, q, 100, 1);
        }
        // Seven come from the tcache (most recent first), the eighth from the fastbin head
        // (the last freed), which moves 7 more fast chunks to the tcache.
        for i in 0..8 {
            let addr = if i < 7 { p[6 - i] - 16 } else { p[19] - 16 };
            malloc(&mut g, addr, 100);
        }
        let c = g.categories();
        assert_eq!((c.tcache, c.fastbins), (7 * 112, 5 * 112));
        check_consistent(&g);
    }

    #[test]
    fn large_frees_coalesce_into_the_top_and_a_pin_holds_them() {
        let mut g = model();
        let p = fill(&mut g, 100, 1500);
        let pin = malloc(&mut g, HEAP + TCACHE_STRUCT_CHUNK + 100 * 1520, 100);
        for &q in &p {
            free(&mut g, q, 1500, 1);
        }
        // One free chunk of 100 × 1520 bytes below the pin.
        let a = &g.arenas[0];
        assert_eq!((a.t.free, a.t.free_count), (100 * 1520, 1));
        let b = g.breakdown(0);
        let causes = explain::causes(&g, &crate::analysis::live::LiveModel::default(), &b, 0);
        assert!(causes.iter().any(|c| c.kind == "top_pinned" && c.text.contains("live 100-byte block")), "{causes:?}");
        // malloc_trim(0) would release the whole pages inside the free chunk.
        let (madv, shrink) = explain::predict_trim(&g, 0);
        let start = (HEAP + TCACHE_STRUCT_CHUNK + 48).next_multiple_of(4096);
        let end = HEAP + TCACHE_STRUCT_CHUNK + 100 * 1520;
        assert_eq!(madv, (end - start) & !4095);
        // The top above the pin was never touched: cutting it returns nothing resident.
        assert_eq!(shrink, 0);
        check_consistent(&g);
        // Freeing the pin merges everything into the top.
        free(&mut g, pin, 100, 1);
        free(&mut g, pin, 100, 1); // a double free: a contradiction, counted
        assert_eq!(g.conflicts(), 1);
    }

    #[test]
    fn freeing_an_mmapped_chunk_raises_the_thresholds() {
        let mut g = model();
        let hdr = 1_052_672 | chunk::IS_MMAPPED;
        g.apply(&Event::Alloc { kind: EventKind::Malloc, ptr: 0x7f00_0000_0010, size: 1 << 20, align: 0, chunk: hdr, prev_size: 0, stack: 0, after: None }, 1, 1);
        assert_eq!(g.mallinfo().hblkhd, 1_052_672);
        g.apply(&Event::Free { kind: EventKind::Free, ptr: 0x7f00_0000_0010, chunk: hdr, after: None }, 2, 1);
        assert_eq!(g.params.mmap_threshold, 1_052_672);
        assert_eq!(g.params.trim_threshold, 2 * 1_052_672);
        assert_eq!(g.mallinfo().hblkhd, 0);
        // A 512 KiB block now comes from the heap: counted against the change.
        malloc(&mut g, HEAP + TCACHE_STRUCT_CHUNK, 512 << 10);
        assert_eq!(g.params.changes[0].heap_allocations_between, 1);
    }

    #[test]
    fn a_free_merging_into_a_small_top_under_64_kib_does_not_consolidate() {
        let mut g = model();
        let p = fill(&mut g, 20, 100);
        let filler_at = HEAP + TCACHE_STRUCT_CHUNK + 20 * 112;
        malloc(&mut g, filler_at, 70_000);
        let big_at = filler_at + 70_016;
        let big = malloc(&mut g, big_at, 40_000);
        for &q in &p {
            free(&mut g, q, 100, 1);
        }
        assert_eq!(g.mallinfo().smblks, 13);
        // 40 016 + the top (under 24 KiB) < 64 KiB: glibc does not consolidate.
        assert!(g.arenas[0].top_size() + 40_016 < 65_536, "{}", g.arenas[0].top_size());
        free(&mut g, big, 40_000, 1);
        assert_eq!(g.mallinfo().smblks, 13);
        assert_eq!(g.arenas[0].top, big_at);
        check_consistent(&g);
    }

    #[test]
    fn implausible_values_are_ignored_not_a_panic() {
        let mut g = model();
        g.apply(&Event::Free { kind: EventKind::Free, ptr: 8, chunk: 33, after: None }, 1, 1);
        g.apply(&Event::HeapSize { heap: 0x7f00_0000_0000, size: u64::MAX - 10, fresh: false }, 1, 1);
        g.apply(&Event::Alloc { kind: EventKind::Malloc, ptr: u64::MAX - 15, size: 1, align: 0, chunk: u64::MAX, prev_size: 0, stack: 0, after: None }, 1, 1);
        assert_eq!(g.conflicts(), 3);
        assert_eq!(g.mallinfo().arena, 0x21000);
    }

    #[test]
    fn a_fork_child_keeps_the_forking_threads_tcache_as_its_own() {
        let mut g = model();
        let p = fill(&mut g, 2, 200);
        free(&mut g, p[0], 200, 1);
        free(&mut g, p[1], 200, 3);
        let child = g.fork_child(3, 99);
        // Stream 3's cached chunk is the child's thread's (stream 1); stream 1's is orphaned.
        assert_eq!(child.tcache_threads(), 1);
        assert_eq!(child.categories().tcache, 2 * 208);
        assert!(child.checkpoints.is_empty() && child.start_ns == 99);
    }

    proptest::proptest! {
        /// Any sequence of events with values glibc could produce (and some it could not)
        /// leaves the model without a panic, with categories that add up to what it holds.
        #[test]
        fn arbitrary_event_sequences_never_panic(ops in proptest::collection::vec((0u8..10, 0u64..64, 0u64..6, 1u32..4), 0..300)) {
            let mut g = model();
            let sizes = [24u64, 100, 500, 1000, 2000, 70_000];
            let thread_heap = 0x7f00_0000_0000u64;
            for (i, &(op, slot, sz, stream)) in ops.iter().enumerate() {
                let base = if slot >= 48 { thread_heap + 0x8d0 } else { HEAP + TCACHE_STRUCT_CHUNK };
                let ptr = base + (slot % 48) * 0x1000 + 16;
                let req = sizes[sz as usize];
                let hdr = params::request2size(req) | 1 | if slot >= 48 { chunk::NON_MAIN_ARENA } else { 0 };
                let ev = match op {
                    0 | 1 => Event::Alloc { kind: EventKind::Malloc, ptr, size: req, align: 0, chunk: hdr, prev_size: 0, stack: 0, after: None },
                    2 | 3 => Event::Free { kind: EventKind::Free, ptr, chunk: hdr, after: None },
                    4 => Event::Realloc { kind: EventKind::Realloc, old_ptr: ptr, new_ptr: ptr, size: req, old_chunk: hdr, chunk: params::request2size(req / 2 + 1) | 1, prev_size: 0, stack: 0, after_old: None, after: None },
                    5 => Event::ProgramBreak { brk: HEAP + slot * 0x2000, fresh: slot % 2 == 0 },
                    6 => Event::ArenaHeap { heap: thread_heap, ar_ptr: thread_heap + 48, size: 0x21000, prev: 0 },
                    7 => Event::HeapSize { heap: thread_heap, size: slot * 0x1000, fresh: slot % 3 == 0 },
                    8 => Event::MallocTrim { pad: 0, result: 1 },
                    _ => Event::ThreadExit,
                };
                g.apply(&ev, i as u64 * 1000, stream);
            }
            let b = g.breakdown(0);
            // The per-arena books and the totals are kept by different code: they must agree.
            let arena_live: u64 = b.arenas.iter().map(|a| a.live_bytes).sum();
            proptest::prop_assert_eq!(b.categories.live, arena_live + g.mmapped_req);
            let fast: u64 = g.arenas.iter().map(|a| a.fastbins.iter().flatten().map(|&p| a.chunks[&p].size).sum::<u64>()).sum();
            proptest::prop_assert_eq!(fast, b.categories.fastbins);
            let _ = g.mallinfo();
            let _ = explain::causes(&g, &crate::analysis::live::LiveModel::default(), &b, 0);
            let _ = explain::remedies(&g, &b);
        }
    }

    #[test]
    fn thread_exit_flushes_its_tcache() {
        let mut g = model();
        let p = fill(&mut g, 3, 200);
        // Thread 2 frees them: they go to its tcache (it gets a tcache struct from the top).
        for &q in &p {
            free(&mut g, q, 200, 2);
        }
        assert_eq!(g.categories().tcache, 3 * 208);
        g.apply(&Event::ThreadExit, 3, 2);
        let c = g.categories();
        assert_eq!(c.tcache, 0);
        // Everything merged back into the top.
        assert_eq!(g.arenas[0].t.free, 0);
        assert_eq!(c.metadata, TCACHE_STRUCT_CHUNK);
        check_consistent(&g);
    }
}
