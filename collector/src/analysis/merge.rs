//! Merging the per-thread event streams of one process image into one causally consistent order.
//!
//! Each thread's stream is ordered; threads are not ordered against each other. The merger
//! applies events to the [`LiveModel`] in time-mark order (the collector's clock, ~1 ms
//! resolution), but never applies an event before what must precede it:
//!
//! * a free (or realloc source) of an address that is not live waits for its allocation;
//! * an allocation of an address that is still live waits for the free of the old block;
//! * an allocation that found a free *stamp* (see `mtrace_protocol::stamp`) waits until the
//!   stamped free — an event at a known stream position — has been applied;
//! * when other threads also have pending allocations or frees of the same address, an event
//!   goes first only if the pending uses of that address, across all threads, can still be
//!   interleaved into a valid history (alternating allocation and free, each thread in its
//!   order, stamps respected) that starts with it. A small search over that one address
//!   decides; it orders reuse that left no stamp (calloc zeroes the block it returns; a block
//!   freed inside realloc cannot be stamped) and frees whose block is ambiguous.
//!
//! What stays undecidable: two unstamped allocations of one address in different threads that
//! could each go first (e.g. a third thread frees the address in between), within one time
//! mark. The merger then follows time and stream order and counts the choice in
//! [`MergeStats::ambiguous`]; counts stay exact, the attributed sizes of the two blocks may be
//! swapped.
//!
//! Publication order: the collector writes its clock into the ring as each drain pass starts,
//! and `Sync` records carry that pass-start clock. An event time-marked at or after pass k's
//! start was written after every event read in passes before k was published — so it is applied
//! only after all of those. This orders cross-thread reuse to the resolution of one pass (tens of
//! µs under load) even where nothing else does.
//!
//! Completeness: events come in chunks between `Sync` records. An event read in one drain pass
//! has everything that causally precedes it in the trace by the end of the next pass, so an event
//! becomes *safe* two `Sync`s after its chunk (or when the image ended). Only safe events are
//! applied. If nothing can be applied, deferrals behind pairs are released first; then a blocked
//! event that is safe with one more `Sync` of margin (or the image ended) can never have its
//! precondition met: it is forced (an unmatched free, a displaced block, or an ignored stamp) and
//! counted.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use mtrace_protocol::event::{Event, Events, MallinfoReason};
use mtrace_protocol::stamp;
use crate::trace::Chunk;
use rustc_hash::FxHashMap;

use super::live::{same_chunk, LiveModel, Need};

/// Position of an event in its stream: block sequence number and word offset in the block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub seq: u64,
    pub word: u32,
}

/// A decoded event waiting to be applied.
#[derive(Clone, Debug)]
pub struct Pending {
    pub ev: Event,
    pub pos: Pos,
    pub len: u32,
    pub time_ns: u64,
    /// Number of Sync records seen before its chunk.
    pub epoch: u32,
    serial: u64,
    ignore_stamp: bool,
    ignore_pairs: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    None,
    Addr(u64),
    /// Behind another thread's self-contained pair at this address.
    Pair(u64),
    Stamp { stream: usize, pos: Pos },
}

/// The events of one chunk that are not applied yet. Queued events are kept as the chunk's words
/// (2–5 words an event) and decoded when they reach the head of their stream, not as decoded
/// [`Pending`]s: a stream may hold millions of events until they are safe (two `Sync`s), and a
/// decoded event is several times larger.
struct Batch {
    words: Vec<u64>,
    seq: u64,
    /// Word offset of `words[0]` in its block.
    base_word: u32,
    epoch: u32,
    /// Serial of `events[0]` (the events of one chunk have consecutive serials).
    first_serial: u64,
    /// Time marks in force in this chunk, in order.
    times: Vec<u64>,
    /// Per queued event: word offset in `words`, index in `times`.
    events: Vec<(u32, u32)>,
    /// Events before this one are applied.
    next: usize,
}

impl Batch {
    fn end_serial(&self) -> u64 {
        self.first_serial + self.events.len() as u64
    }

    /// The `k`th queued event, decoded.
    #[inline]
    fn pending(&self, k: usize) -> Pending {
        let (at, t) = self.events[k];
        let (ev, _) = mtrace_protocol::event::decode(&self.words, at as usize).expect("queued events were decoded before");
        let len = mtrace_protocol::event::split_header(self.words[at as usize]).1 as u32;
        Pending {
            ev,
            pos: Pos { seq: self.seq, word: self.base_word + at },
            len,
            time_ns: self.times[t as usize],
            epoch: self.epoch,
            serial: self.first_serial + k as u64,
            ignore_stamp: false,
            ignore_pairs: false,
        }
    }
}

/// Pending uses of one address by one stream: runs of consecutive serials `(first, count)`.
type UseRuns = VecDeque<(u64, u32)>;

fn runs_push(q: &mut UseRuns, serial: u64) {
    if let Some((first, n)) = q.back_mut() {
        if *first + *n as u64 == serial {
            *n += 1;
            return;
        }
    }
    q.push_back((serial, 1));
}

fn runs_remove(q: &mut UseRuns, serial: u64) {
    if let Some((first, n)) = q.front_mut() {
        if *first == serial {
            *first += 1;
            *n -= 1;
            if *n == 0 {
                q.pop_front();
            }
            return;
        }
    }
    let Some(k) = q.iter().position(|&(f, n)| f <= serial && serial < f + n as u64) else { return };
    let (f, n) = q[k];
    let before = (serial - f) as u32;
    let after = n - before - 1;
    q.remove(k);
    if after > 0 {
        q.insert(k, (serial + 1, after));
    }
    if before > 0 {
        q.insert(k, (f, before));
    }
}

struct Stream {
    id: u32,
    tid: u32,
    /// Queued events, oldest first; `head` is the first of them, decoded.
    batches: VecDeque<Batch>,
    head: Option<Pending>,
    /// Time mark of the events being decoded (last `Time` event).
    time_ns: u64,
    /// Where the next chunk should start: (block seq, byte offset).
    expect: Option<(u64, u32)>,
    /// Everything before this position has been applied.
    frontier: Pos,
    max_seq: u64,
    wait: Wait,
    /// The preload's own mallinfo2 sampler thread, not a thread of the application: its stream
    /// carries `Mallinfo(Periodic)` checkpoints, which no other thread writes (see
    /// [`Merger::stream_count`]).
    internal: bool,
}

impl Stream {
    /// Decode the first queued event into `head` if it is not there yet.
    fn load_head(&mut self) {
        if self.head.is_some() {
            return;
        }
        while let Some(b) = self.batches.front() {
            if b.next < b.events.len() {
                self.head = Some(b.pending(b.next));
                return;
            }
            self.batches.pop_front();
        }
    }

    /// Remove the head (the first queued event) and decode the next one.
    #[inline]
    fn pop_head(&mut self) -> Pending {
        let b = self.batches.front_mut().expect("pop on an empty stream");
        b.next += 1;
        let p = if b.next < b.events.len() {
            // Decode the next head in the place of this one.
            std::mem::replace(self.head.as_mut().expect("pop on an empty stream"), b.pending(b.next))
        } else {
            self.batches.pop_front();
            let p = self.head.take().expect("pop on an empty stream");
            self.load_head();
            p
        };
        p
    }

    /// The queued event with this serial (`None` if applied or not queued).
    fn find(&self, serial: u64) -> Option<(&Batch, usize)> {
        let k = self.batches.partition_point(|b| b.end_serial() <= serial);
        let b = self.batches.get(k)?;
        let idx = serial.checked_sub(b.first_serial)? as usize;
        (idx >= b.next && idx < b.events.len()).then_some((b, idx))
    }

    fn queued(&self) -> usize {
        self.batches.iter().map(|b| b.events.len() - b.next).sum()
    }
}

/// Anomalies the merger met (all zero in a healthy trace).
#[derive(Clone, Copy, Debug, Default)]
pub struct MergeStats {
    /// Chunks that did not continue their stream where the previous one ended.
    pub gaps: u64,
    /// Chunks whose words do not decode.
    pub decode_errors: u64,
    /// Stamps that named no reachable free, ignored.
    pub ignored_stamps: u64,
    /// Words that passed the stamp magic but name nothing this image could have written
    /// (application data, or a stamp whose low bytes the program overwrote): not stamps, and not
    /// an anomaly.
    pub rejected_stamps: u64,
    /// Frees applied although their block never appeared (unmatched).
    pub forced: u64,
    /// Unstamped allocations whose order against another thread's allocation of the same
    /// address could not be decided (see the module documentation).
    pub ambiguous: u64,
}

/// What an event does to an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UseKind {
    /// Makes it live.
    Alloc,
    /// Ends its block.
    Free,
    /// An in-place realloc: needs it live, leaves it live (one atomic event, not free + alloc).
    Keep,
}

/// The state of an address in the search: `None` dead, `Some(chunk)` live with that header.
type AddrState = Option<u64>;

impl Use {
    /// Can this use happen in `state`? What is the state after it?
    fn step(&self, state: AddrState) -> Option<AddrState> {
        match (self.kind, state) {
            (UseKind::Alloc, None) => Some(Some(self.new_chunk)),
            (UseKind::Free, Some(c)) if same_chunk(c, self.chunk) => Some(None),
            (UseKind::Keep, Some(c)) if same_chunk(c, self.chunk) => Some(Some(self.new_chunk)),
            _ => None,
        }
    }
}

/// A pending event's use of an address, for the per-address search.
#[derive(Clone, Copy, Debug)]
struct Use {
    serial: u64,
    kind: UseKind,
    /// Header of the block a Free or Keep ends (0: unknown).
    chunk: u64,
    /// Header of the block an Alloc or Keep begins.
    new_chunk: u64,
    /// The stamp of an allocation carrying one (ordered after that free).
    stamp: Option<u64>,
    pos: Pos,
    epoch: u32,
}

pub struct Merger {
    streams: Vec<Stream>,
    by_id: FxHashMap<u32, usize>,
    stamp_key: Option<u64>,
    syncs: u32,
    /// Pass-start clock of each Sync, in order.
    pass_starts: Vec<u64>,
    ended: bool,
    ready: BinaryHeap<Reverse<(u64, usize)>>,
    addr_waiters: FxHashMap<u64, Vec<usize>>,
    /// Per target stream: (position, waiting stream).
    stamp_waiters: Vec<Vec<(Pos, usize)>>,
    queued: usize,
    serial: u64,
    /// Pending (not applied) allocations and frees per address: per stream that has any, its
    /// uses in stream order (pushed at the back as chunks arrive, popped at the front as applied).
    /// Kept as runs of serials; the uses themselves are read from the queued events when needed.
    uses: FxHashMap<u64, Vec<(usize, UseRuns)>>,
    pub stats: MergeStats,
    /// Stack and module definitions, collected as chunks are decoded (they need no ordering).
    pub stacks: super::stacks::StackTable,
}

impl Merger {
    /// `stamp_key`: the image's stamp key when it writes stamps.
    pub fn new(stamp_key: Option<u64>) -> Merger {
        Merger {
            streams: Vec::new(),
            by_id: FxHashMap::default(),
            stamp_key,
            syncs: 0,
            pass_starts: Vec::new(),
            ended: false,
            ready: BinaryHeap::new(),
            addr_waiters: FxHashMap::default(),
            stamp_waiters: Vec::new(),
            queued: 0,
            serial: 0,
            uses: FxHashMap::default(),
            stats: MergeStats::default(),
            stacks: Default::default(),
        }
    }

    fn stream_index(&mut self, id: u32) -> usize {
        if let Some(&i) = self.by_id.get(&id) {
            return i;
        }
        let i = self.streams.len();
        self.streams.push(Stream {
            id,
            tid: 0,
            batches: VecDeque::new(),
            head: None,
            time_ns: 0,
            expect: None,
            frontier: Pos::default(),
            max_seq: 0,
            wait: Wait::None,
            internal: false,
        });
        self.stamp_waiters.push(Vec::new());
        self.by_id.insert(id, i);
        i
    }

    /// Decode a chunk and queue its events.
    pub fn add_chunk(&mut self, c: &Chunk) {
        let i = self.stream_index(c.stream);
        let epoch = self.syncs;
        let s = &mut self.streams[i];
        s.tid = c.tid;
        let seq = c.block_seq as u64;
        let continues = match s.expect {
            None => c.offset == 0,
            Some((eseq, eoff)) => (seq == eseq && c.offset == eoff) || (seq == eseq + 1 && c.offset == 0),
        };
        if !continues {
            self.stats.gaps += 1;
        }
        s.expect = Some((seq, c.offset + (c.words.len() * 8) as u32));
        s.max_seq = s.max_seq.max(seq);
        let base_word = c.offset / 8;
        let was_empty = s.head.is_none();
        let mut batch = Batch {
            words: Vec::new(),
            seq,
            base_word,
            epoch,
            first_serial: self.serial + 1,
            times: vec![s.time_ns],
            events: Vec::new(),
            next: 0,
        };
        for r in Events::new(&c.words) {
            match r {
                Ok((at, Event::Time { clock_ns })) => {
                    let _ = at;
                    s.time_ns = s.time_ns.max(clock_ns);
                    if *batch.times.last().unwrap() != s.time_ns {
                        batch.times.push(s.time_ns);
                    }
                }
                Ok((at, Event::Stack { id, .. })) => self.stacks.define_stack(id, &c.words[at..], s.time_ns),
                Ok((at, Event::Module { bias, lo, hi, .. })) => self.stacks.define_module(bias, lo, hi, &c.words[at..], s.time_ns),
                Ok((_, Event::ModuleUnload { bias })) => self.stacks.unload_module(bias, s.time_ns),
                Ok((at, ev)) => {
                    if let Event::Mallinfo { reason: MallinfoReason::Periodic, .. } = ev {
                        s.internal = true;
                    }
                    self.serial += 1;
                    for (addr, ..) in uses_of(&ev).into_iter().flatten() {
                        let per_stream = self.uses.entry(addr).or_default();
                        let k = match per_stream.iter().position(|(st, _)| *st == i) {
                            Some(k) => k,
                            None => {
                                per_stream.push((i, VecDeque::new()));
                                per_stream.len() - 1
                            }
                        };
                        runs_push(&mut per_stream[k].1, self.serial);
                    }
                    batch.events.push((at as u32, (batch.times.len() - 1) as u32));
                    self.queued += 1;
                }
                Err(_) => {
                    self.stats.decode_errors += 1;
                    break;
                }
            }
        }
        if !batch.events.is_empty() {
            batch.words = c.words.clone();
            batch.events.shrink_to_fit();
            batch.times.shrink_to_fit();
            s.batches.push_back(batch);
            s.load_head();
        }
        if was_empty {
            self.push_if_ready(i);
        }
    }

    /// A Sync record for this image (with its pass-start clock): events two syncs old become safe.
    pub fn sync(&mut self, pass_start_ns: u64) {
        self.syncs += 1;
        self.pass_starts.push(pass_start_ns);
        self.reconsider();
    }

    /// The pass during which an event time-marked `t` was written (it was read in that pass or
    /// later): the last pass whose start clock is ≤ `t`.
    fn pass_of(&self, t: u64) -> u32 {
        self.pass_starts.partition_point(|&s| s <= t).saturating_sub(1) as u32
    }

    /// Smallest epoch among events not applied yet.
    fn min_queued_epoch(&self) -> u32 {
        self.streams.iter().filter_map(|s| s.head.as_ref().map(|p| p.epoch)).min().unwrap_or(u32::MAX)
    }

    /// May `p` go now as far as publication order is concerned: is every event read in a pass
    /// before the one it was written in applied?
    fn published_in_order(&self, p: &Pending, min_epoch: u32) -> bool {
        if self.pass_starts.is_empty() || p.time_ns < self.pass_starts[0] {
            return true;
        }
        self.pass_of(p.time_ns) <= min_epoch
    }

    /// More events became safe: re-examine deferrals (they were decided on less data) and queue
    /// every stream whose head is now safe.
    fn reconsider(&mut self) {
        for i in 0..self.streams.len() {
            if let Wait::Pair(_) = self.streams[i].wait {
                self.streams[i].wait = Wait::None;
            }
            self.push_if_ready(i);
        }
    }

    /// The image ended: every queued event is safe.
    pub fn end(&mut self) {
        self.ended = true;
        self.reconsider();
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Events decoded but not applied yet.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Smallest time mark among events not applied yet.
    pub fn min_queued_time(&self) -> Option<u64> {
        self.streams.iter().filter_map(|s| s.head.as_ref().map(|p| p.time_ns)).min()
    }

    /// Thread id of a stream.
    pub fn tid_of(&self, stream_id: u32) -> Option<u32> {
        self.by_id.get(&stream_id).map(|&i| self.streams[i].tid)
    }

    /// Threads of the application that wrote events. Not counted: streams a stamp named but that
    /// never appeared, and the preload's mallinfo2 sampler thread — recognised by the
    /// `Mallinfo(Periodic)` checkpoints it writes: only that thread writes them, and it writes
    /// nothing else (see `preload/src/mallinfo.rs`). Its stream needs no mark of its own in the
    /// ring or the trace, and a trace without periodic checkpoints counts as before.
    pub fn stream_count(&self) -> usize {
        self.streams.iter().filter(|s| s.tid != 0 && !s.internal).count()
    }

    fn safe(&self, p: &Pending, margin: u32) -> bool {
        self.ended || p.epoch + margin <= self.syncs
    }

    fn push_if_ready(&mut self, i: usize) {
        let s = &self.streams[i];
        if s.wait != Wait::None {
            return;
        }
        if let Some(h) = s.head.as_ref() {
            if self.safe(h, 2) {
                self.ready.push(Reverse((h.time_ns, i)));
            }
        }
    }

    /// Apply every event that can be applied now. `on_applied` sees each event after the model
    /// applied it, with the stream id it came from.
    pub fn run(&mut self, model: &mut LiveModel, on_applied: &mut impl FnMut(&Pending, u32, &LiveModel)) {
        loop {
            let mut held = Vec::new();
            let mut min_epoch = self.min_queued_epoch();
            while let Some(Reverse((t, i))) = self.ready.pop() {
                let s = &self.streams[i];
                match s.head.as_ref() {
                    Some(h) if s.wait == Wait::None && h.time_ns == t => {
                        if !self.published_in_order(h, min_epoch) {
                            held.push(i);
                            continue;
                        }
                    }
                    _ => continue,
                }
                self.step(i, model, on_applied);
                min_epoch = self.min_queued_epoch();
            }
            // Heads held back by publication order: retry those that earlier-read events no
            // longer hold back.
            let me = self.min_queued_epoch();
            let mut retried = false;
            for &i in &held {
                if self.streams[i].head.as_ref().is_some_and(|h| self.published_in_order(h, me)) {
                    self.push_if_ready(i);
                    retried = true;
                }
            }
            if retried {
                continue;
            }
            let forced = self.force_one(model, on_applied);
            // Every stream goes back in the heap: held heads stay candidates (after a force, or
            // for the next run, after the next chunk or Sync).
            for i in 0..self.streams.len() {
                self.push_if_ready(i);
            }
            if !forced {
                return;
            }
        }
    }

    /// Try to apply the head of stream `i`; block it if it must wait.
    fn step(&mut self, i: usize, model: &mut LiveModel, on_applied: &mut impl FnMut(&Pending, u32, &LiveModel)) {
        let head = self.streams[i].head.as_ref().expect("step on an empty stream");
        if !self.safe(head, 2) {
            return;
        }
        let stamp = if head.ignore_stamp { None } else { stamp_of(&head.ev) };
        if let Some(st) = stamp {
            if let Some(w) = self.stamp_target(i, st) {
                let (j, pos) = w;
                if self.streams[j].frontier <= pos {
                    self.streams[i].wait = Wait::Stamp { stream: j, pos };
                    self.stamp_waiters[j].push((pos, i));
                    return;
                }
            }
        }
        let head = self.streams[i].head.as_ref().expect("step on an empty stream");
        match model.need(&head.ev) {
            Need::Ok => {
                if !head.ignore_pairs {
                    let serial = head.serial;
                    let mut ambiguous = false;
                    let t = touched(&head.ev);
                    for a in t.into_iter().flatten().take(if t[0] == t[1] { 1 } else { 2 }) {
                        match self.address_order(i, a, serial, model.live.get(&a).map(|b| b.chunk)) {
                            Order::Defer => {
                                self.streams[i].wait = Wait::Pair(a);
                                self.addr_waiters.entry(a).or_default().push(i);
                                return;
                            }
                            Order::Ambiguous => ambiguous = true,
                            Order::Clear => {}
                        }
                    }
                    if ambiguous {
                        self.stats.ambiguous += 1;
                    }
                }
                self.apply_head(i, model, on_applied)
            }
            Need::Live(a) | Need::Dead(a) | Need::Other(a) => {
                self.streams[i].wait = Wait::Addr(a);
                self.addr_waiters.entry(a).or_default().push(i);
            }
        }
    }

    /// May the use of `addr` by stream `i`'s head (serial `serial`) go first? Searches the pending
    /// uses of `addr` (safe ones) for a valid interleaving that starts with it.
    fn address_order(&self, i: usize, addr: u64, serial: u64, live: AddrState) -> Order {
        let Some(uses) = self.uses.get(&addr) else { return Order::Clear };
        if uses.iter().all(|(st, _)| *st == i) {
            return Order::Clear;
        }
        // Per stream, its first pending uses of `addr` in order (a bounded horizon: the search is
        // about who goes next, not about the far future). Safe uses are mandatory (their causal
        // pasts are present); newer ones are an optional suffix (their pasts may still be on the
        // way) that histories take as far as they can go.
        const HORIZON: usize = 12;
        let streams: Vec<usize> = uses.iter().map(|(st, _)| *st).collect();
        let seqs: Vec<Vec<Use>> = uses.iter().map(|(st, q)| self.first_uses(*st, addr, q, HORIZON)).collect();
        let Some(me) = streams.iter().position(|&s| s == i) else { return Order::Clear };
        if seqs[me].first().is_none_or(|u| u.serial != serial) {
            // Not this stream's first use of the address (cannot happen for a head).
            return Order::Clear;
        }
        let mut search = AddrSearch::new(self, &seqs, &streams);
        let mut start = vec![0usize; seqs.len()];
        start[me] = 1;
        let mine = &seqs[me][0];
        let Some(after) = mine.step(live) else { return Order::Clear };
        if !search.feasible(&mut start, after) {
            return if search.budget == 0 { Order::Clear } else { Order::Defer };
        }
        // A guess is a choice that rules out final outcomes the pending uses still allowed.
        let mut search = AddrSearch::new(self, &seqs, &streams);
        let all = search.outcomes(&mut vec![0usize; seqs.len()], live, Outcome::Current);
        let mut start = vec![0usize; seqs.len()];
        start[me] = 1;
        let outcome = if after.is_some() { Outcome::Block(mine.serial) } else { Outcome::Dead };
        let mine_only = search.outcomes(&mut start, after, outcome);
        if search.budget == 0 || mine_only.len() < all.len() {
            return Order::Ambiguous;
        }
        Order::Clear
    }

    /// Bytes held for queued events (their words, per-event entries, time marks, use runs):
    /// what a test can bound per queued event.
    #[cfg(test)]
    fn queued_bytes(&self) -> usize {
        let batches: usize = self
            .streams
            .iter()
            .flat_map(|s| &s.batches)
            .map(|b| 8 * (b.words.capacity() + b.times.capacity() + b.events.capacity()))
            .sum();
        let runs: usize = self.uses.values().flat_map(|v| v.iter()).map(|(_, q)| 16 * q.capacity()).sum();
        batches + runs
    }

    /// The first `n` pending uses of `addr` by stream `st` (serials `runs`), read from its queue.
    fn first_uses(&self, st: usize, addr: u64, runs: &UseRuns, n: usize) -> Vec<Use> {
        let s = &self.streams[st];
        let mut out = Vec::new();
        for serial in runs.iter().flat_map(|&(f, k)| f..f + k as u64).take(n) {
            let Some((b, idx)) = s.find(serial) else { continue };
            let p = b.pending(idx);
            let stamp = stamp_of(&p.ev);
            let is_free = matches!(p.ev, Event::Free { .. });
            for (a, kind, chunk, new_chunk) in uses_of(&p.ev).into_iter().flatten() {
                if a != addr {
                    continue;
                }
                // A realloc's stamp belongs to its new block; a free's to the freed one.
                let stamp = if kind != UseKind::Free || is_free { stamp } else { None };
                out.push(Use { serial, kind, chunk, new_chunk, stamp, pos: p.pos, epoch: p.epoch });
            }
        }
        out
    }

    /// The stream and position a stamp names, if it names another known-or-future stream.
    fn stamp_target(&mut self, i: usize, word: u64) -> Option<(usize, Pos)> {
        let key = self.stamp_key?;
        let r = stamp::decode(key, word)?;
        if r.stream == 0 || r.stream == self.streams[i].id {
            return None;
        }
        let known = self.by_id.get(&r.stream).copied();
        let (max_seq, frontier) = known.map_or((0, 0), |j| (self.streams[j].max_seq, self.streams[j].frontier.seq));
        let seq = stamp::resolve_seq(r.seq_low, max_seq.max(frontier));
        // A reference far beyond anything the stream wrote is not a stamp of this image (e.g. a
        // parent's stamp in memory a fork child inherited, decoded with the child's key). A
        // stream not seen yet must be at its very beginning. Only then is a stream made for it.
        let plausible = if known.is_some() { seq <= max_seq + 2 } else { seq <= 2 };
        if !plausible {
            self.stats.rejected_stamps += 1;
            return None;
        }
        let j = self.stream_index(r.stream);
        Some((j, Pos { seq, word: r.word }))
    }

    fn apply_head(&mut self, i: usize, model: &mut LiveModel, on_applied: &mut impl FnMut(&Pending, u32, &LiveModel)) {
        let p = self.streams[i].pop_head();
        self.queued -= 1;
        for (addr, ..) in uses_of(&p.ev).into_iter().flatten() {
            if let Some(per_stream) = self.uses.get_mut(&addr) {
                if let Some(k) = per_stream.iter().position(|(st, _)| *st == i) {
                    // Applied in stream order: it is at the front.
                    let q = &mut per_stream[k].1;
                    runs_remove(q, p.serial);
                    if q.is_empty() {
                        per_stream.swap_remove(k);
                    }
                }
                if per_stream.is_empty() {
                    self.uses.remove(&addr);
                }
            }
        }
        let id = self.streams[i].id;
        model.apply(&p.ev, p.time_ns, id);
        on_applied(&p, id, model);
        let frontier = Pos { seq: p.pos.seq, word: p.pos.word + p.len };
        self.streams[i].frontier = frontier;
        for a in touched(&p.ev).into_iter().flatten() {
            if let Some(ws) = self.addr_waiters.remove(&a) {
                for w in ws {
                    if self.streams[w].wait == Wait::Addr(a) || self.streams[w].wait == Wait::Pair(a) {
                        self.streams[w].wait = Wait::None;
                        self.push_if_ready(w);
                    }
                }
            }
        }
        if !self.stamp_waiters[i].is_empty() {
            let waiters = std::mem::take(&mut self.stamp_waiters[i]);
            let mut keep = Vec::new();
            for (pos, w) in waiters {
                if pos < frontier {
                    if self.streams[w].wait == (Wait::Stamp { stream: i, pos }) {
                        self.streams[w].wait = Wait::None;
                        self.push_if_ready(w);
                    }
                } else {
                    keep.push((pos, w));
                }
            }
            self.stamp_waiters[i] = keep;
        }
        self.push_if_ready(i);
    }

    /// Nothing is ready: force the oldest blocked event whose precondition can no longer be met.
    fn force_one(&mut self, model: &mut LiveModel, on_applied: &mut impl FnMut(&Pending, u32, &LiveModel)) -> bool {
        // Only a stall that more data cannot resolve is broken: while any blocked head is
        // younger than the margin, what it waits for (or what waits for it) may still arrive
        // or be re-decided at the next Sync, and forcing an older event would act on a guess.
        let all_settled = self
            .streams
            .iter()
            .filter(|s| s.wait != Wait::None)
            .all(|s| s.head.as_ref().is_none_or(|h| self.safe(h, 3)));
        if !all_settled {
            return false;
        }
        // Deferrals behind pairs are a preference, not a precondition: release them first.
        let mut released = false;
        for i in 0..self.streams.len() {
            if let Wait::Pair(_) = self.streams[i].wait {
                // As for forcing: only once whatever could justify the wait must have arrived.
                if self.streams[i].head.as_ref().is_some_and(|h| self.safe(h, 3)) {
                    self.streams[i].head.as_mut().unwrap().ignore_pairs = true;
                    self.streams[i].wait = Wait::None;
                    self.push_if_ready(i);
                    self.stats.ambiguous += 1;
                    released = true;
                }
            }
        }
        if released {
            return true;
        }
        // Break the stall where it can be repaired: first admit a blocked allocation beside the
        // block still live at its address (a later free tells the two apart by chunk header);
        // then drop a stamp edge (stamps are true edges: a last resort); then give up on a free.
        let mut best: Option<(u8, u64, usize)> = None;
        for (i, s) in self.streams.iter().enumerate() {
            if s.wait == Wait::None {
                continue;
            }
            let Some(h) = s.head.as_ref() else { continue };
            if !self.safe(h, 3) {
                continue;
            }
            let rank = match s.wait {
                Wait::Addr(_) if matches!(model.need(&h.ev), Need::Dead(_)) => 0,
                Wait::Stamp { .. } => 1,
                _ => 2,
            };
            if best.is_none_or(|b| (rank, h.time_ns, i) < b) {
                best = Some((rank, h.time_ns, i));
            }
        }
        let Some((_, _, i)) = best else { return false };
        if std::env::var_os("MTRACE_DEBUG_MERGE").is_some() {
            let h = self.streams[i].head.as_ref().unwrap();
            eprintln!("force: stream {} wait {:?} head {:?} at {:?} epoch {} syncs {} ended {}", self.streams[i].id, self.streams[i].wait, h.ev, h.pos, h.epoch, self.syncs, self.ended);
            let me = self.min_queued_epoch();
            eprintln!("   min_epoch {me} pass_starts tail {:?}", &self.pass_starts[self.pass_starts.len().saturating_sub(4)..]);
            for s in &self.streams {
                eprintln!(
                    "   stream {} wait {:?} frontier {:?} queued {} head {:?} time {:?} pass_of {:?}",
                    s.id,
                    s.wait,
                    s.frontier,
                    s.queued(),
                    s.head.as_ref().map(|p| (p.ev, p.pos, p.epoch)),
                    s.head.as_ref().map(|p| p.time_ns),
                    s.head.as_ref().map(|p| self.pass_of(p.time_ns))
                );
            }
        }
        match self.streams[i].wait {
            Wait::Stamp { .. } => {
                self.stats.ignored_stamps += 1;
                self.streams[i].head.as_mut().unwrap().ignore_stamp = true;
                self.streams[i].wait = Wait::None;
                self.push_if_ready(i);
            }
            Wait::Addr(_) => {
                // An allocation of a still-live address is admitted beside the live block (the
                // model counts it as reordered); a free whose block never appeared is forced.
                let head = &self.streams[i].head.as_ref().unwrap().ev;
                if !matches!(model.need(head), Need::Dead(_)) {
                    self.stats.forced += 1;
                }
                self.streams[i].wait = Wait::None;
                self.apply_head(i, model, on_applied);
            }
            Wait::Pair(_) | Wait::None => unreachable!(),
        }
        true
    }
}

enum Order {
    Clear,
    Defer,
    Ambiguous,
}

/// The state an address is left in after its pending uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Outcome {
    /// Not live.
    Dead,
    /// The block live before the pending uses is still live.
    Current,
    /// The block allocated by the use with this serial is live.
    Block(u64),
}

/// Depth-first search for a valid history of one address's pending uses.
struct AddrSearch<'a> {
    merger: &'a Merger,
    seqs: &'a [Vec<Use>],
    streams: &'a [usize],
    /// Per stream, how many of its uses must be consumed.
    mandatory: Vec<usize>,
    visited: FxHashMap<(Vec<usize>, AddrState), ()>,
    memo: FxHashMap<(Vec<usize>, AddrState), Vec<Outcome>>,
    budget: u32,
}

impl<'a> AddrSearch<'a> {
    fn new(merger: &'a Merger, seqs: &'a [Vec<Use>], streams: &'a [usize]) -> Self {
        let mandatory = seqs
            .iter()
            .map(|s| if merger.ended { s.len() } else { s.iter().take_while(|u| u.epoch + 2 <= merger.syncs).count() })
            .collect();
        AddrSearch { merger, seqs, streams, mandatory, visited: FxHashMap::default(), memo: FxHashMap::default(), budget: 20_000 }
    }

    /// Every mandatory use consumed?
    fn done(&self, pos: &[usize]) -> bool {
        pos.iter().zip(&self.mandatory).all(|(&p, &m)| p >= m)
    }

    /// From positions `pos` (uses consumed per stream) with the address `live` or not, can every
    /// mandatory use be consumed? Gives up (answering yes) when the budget runs out.
    fn feasible(&mut self, pos: &mut Vec<usize>, live: AddrState) -> bool {
        if self.done(pos) {
            return true;
        }
        if self.budget == 0 {
            return true;
        }
        self.budget -= 1;
        if self.visited.insert((pos.clone(), live), ()).is_some() {
            return false;
        }
        for k in 0..self.seqs.len() {
            let Some(u) = self.seqs[k].get(pos[k]) else { continue };
            let Some(next) = u.step(live) else { continue };
            if !self.stamp_allows(u, pos) {
                continue;
            }
            pos[k] += 1;
            let ok = self.feasible(pos, next);
            pos[k] -= 1;
            if ok {
                return true;
            }
        }
        false
    }

    /// Every final state a maximal valid history of the remaining uses (all mandatory ones
    /// consumed, optional ones as far as they go) can end in. Empty: none is valid.
    fn outcomes(&mut self, pos: &mut Vec<usize>, live: AddrState, now: Outcome) -> Vec<Outcome> {
        if pos.iter().zip(self.seqs).all(|(&p, s)| p >= s.len()) {
            return vec![now];
        }
        if let Some(o) = self.memo.get(&(pos.clone(), live)) {
            return o.clone();
        }
        if self.budget == 0 {
            return Vec::new();
        }
        self.budget -= 1;
        let mut out: Vec<Outcome> = Vec::new();
        for k in 0..self.seqs.len() {
            let Some(u) = self.seqs[k].get(pos[k]) else { continue };
            let Some(next_state) = u.step(live) else { continue };
            if !self.stamp_allows(u, pos) {
                continue;
            }
            pos[k] += 1;
            let next = if next_state.is_some() { Outcome::Block(u.serial) } else { Outcome::Dead };
            for o in self.outcomes(pos, next_state, next) {
                if !out.contains(&o) {
                    out.push(o);
                }
            }
            pos[k] -= 1;
        }
        if !out.is_empty() {
            // Only what the continuations give is independent of how we got here.
            self.memo.insert((pos.clone(), live), out.clone());
        } else if self.done(pos) {
            // Stuck: a maximal history, valid since every mandatory use was consumed.
            out.push(now);
        }
        out
    }

    /// A stamped use may only come after the free its stamp names: if that free is one of the
    /// pending uses here, it must have been consumed.
    fn stamp_allows(&self, u: &Use, pos: &[usize]) -> bool {
        let Some(st) = u.stamp else { return true };
        let Some(r) = self.merger.stamp_key.and_then(|k| stamp::decode(k, st)) else { return true };
        let Some(&j) = self.merger.by_id.get(&r.stream) else { return true };
        let Some(k) = self.streams.iter().position(|&s| s == j) else { return true };
        let s = &self.merger.streams[j];
        let target = Pos { seq: stamp::resolve_seq(r.seq_low, s.max_seq.max(s.frontier.seq)), word: r.word };
        // Every use of stream k at or before the target must be consumed.
        self.seqs[k].iter().take_while(|v| v.pos <= target).count() <= pos[k]
    }
}

/// What an event does to which addresses: (address, kind, header ended, header begun).
fn uses_of(ev: &Event) -> [Option<(u64, UseKind, u64, u64)>; 2] {
    match *ev {
        Event::Alloc { ptr, chunk, .. } if ptr != 0 => [Some((ptr, UseKind::Alloc, 0, chunk)), None],
        Event::Free { ptr, chunk, .. } if ptr != 0 => [Some((ptr, UseKind::Free, chunk, 0)), None],
        Event::Realloc { old_ptr, new_ptr, old_chunk, chunk, .. } if old_ptr != 0 && new_ptr == old_ptr => {
            [Some((old_ptr, UseKind::Keep, old_chunk, chunk)), None]
        }
        Event::Realloc { old_ptr, new_ptr, size, old_chunk, chunk, .. } => {
            let frees_old = old_ptr != 0 && (new_ptr != 0 || size == 0);
            [frees_old.then_some((old_ptr, UseKind::Free, old_chunk, 0)), (new_ptr != 0).then_some((new_ptr, UseKind::Alloc, 0, chunk))]
        }
        _ => [None, None],
    }
}

fn stamp_of(ev: &Event) -> Option<u64> {
    match *ev {
        Event::Alloc { stamp, .. } | Event::Realloc { stamp, .. } | Event::Free { stamp, .. } => stamp,
        _ => None,
    }
}

/// Addresses whose liveness `ev` changes.
fn touched(ev: &Event) -> [Option<u64>; 2] {
    let nz = |a: u64| (a != 0).then_some(a);
    match *ev {
        Event::Alloc { ptr, .. } | Event::Free { ptr, .. } => [nz(ptr), None],
        Event::Realloc { old_ptr, new_ptr, .. } => [nz(old_ptr), nz(new_ptr)],
        _ => [None, None],
    }
}

#[cfg(test)]
mod tests;
