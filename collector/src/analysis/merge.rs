//! Merging the per-thread event streams of one process image into one causally consistent order.
//!
//! Each thread's stream is ordered; threads are not ordered against each other. The merger
//! applies events to the [`LiveModel`] in time-mark order (the collector's clock, ~1 ms
//! resolution), but never applies an event before what must precede it:
//!
//! * an event that carries `after` positions (see `mtrace_protocol::order`) waits until the event
//!   each one names has been applied: the other thread's free (or realloc) whose exchange of the
//!   address's ordering cell this event read or replaced. A position names "the first *call* of
//!   that stream at or after it" (a realloc exchanges before its event is written, and a heap
//!   observation or a `Time` may come in between), so each stream keeps a *call frontier*: the
//!   end of the last call applied;
//! * a free (or realloc source) of an address that is not live waits for its allocation;
//! * an allocation of an address that is still live waits for the free of the old block;
//! * a realloc that moved its block is applied in two steps (see [`Merger::step`]);
//! * a `Fork` event waits until every other stream has been applied up to its cut (what that
//!   thread had published when the fork happened: what the child's heap holds), and their events
//!   after the cut wait for the fork — so that the child starts from the parent's heap at the fork.
//!
//! With the ordering cells these waits are exact by construction: every allocation of an
//! address comes after the free of the block before it, and every free after the allocation of
//! its own block — the argument is in `mtrace_protocol::order`. There is no search and no guess.
//! What is left under [`MergeStats`] means lost data: a position that names an event which never
//! arrived (the program was killed between a free's exchange and its event), a free whose block
//! was never recorded (lossy mode, or a block allocated before tracing), a stream gap.
//!
//! Publication order: the collector writes its clock into the ring as each drain pass starts,
//! and `Sync` records carry that pass-start clock. An event time-marked at or after pass k's
//! start was written after every event read in passes before k was published — so it is applied
//! only after all of those. This keeps unrelated events of different threads (the glibc model's
//! view of the heap) in the order they happened to the resolution of one pass.
//!
//! Completeness: events come in chunks between `Sync` records. An event read in one drain pass
//! has the events that causally precede it through the program (a block handed to another
//! thread was recorded before the program got it) in the trace by the end of the next pass, so an
//! event becomes *safe* two `Sync`s after its chunk (or when the image ended), and only safe
//! events are applied. A position in a cell is the exception — a thread exchanges before it
//! writes its event and can be preempted in between — so a wait on a position lasts until the
//! named event arrives, however long. When nothing can be applied and nothing that could unblock
//! it is still on its way, a blocked event that is safe with one more `Sync` of margin (or the
//! image ended) can never have its precondition met: it is forced (an unmatched free, a
//! displaced block, a missing predecessor) and counted.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use mtrace_protocol::event::{Event, Events, MallinfoReason};
use mtrace_protocol::order;
use crate::trace::Chunk;
use rustc_hash::FxHashMap;

use super::glibc::Part;
use super::live::{LiveModel, Need};

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
    /// Its `after` positions were forced past (they named events that cannot come).
    ignore_after: bool,
    /// A realloc that moved its block: its old block is released already (see [`Merger::step`]).
    released: bool,
    /// What of it `on_applied` is shown now.
    pub part: Part,
    /// A preference for the end of an overlapped block was let go.
    ignore_overlap: bool,
    /// Past a fork's cut, but happened before the fork (see [`Merger::fork_wait`]).
    before_fork: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    None,
    /// Until the address's liveness changes (see [`Need`]).
    Addr(u64),
    /// Until the first call of `stream` at or after `pos` has been applied.
    After { stream: usize, pos: Pos },
    /// Until every event of `stream` before `pos` has arrived and been applied (a fork's cut).
    Drained { stream: usize, pos: Pos },
    /// A preference, not a precondition: until the live block at this address, whose chunk the
    /// head's allocation overlaps, has ended (see [`LiveModel::overlapped`]). Let go, uncounted,
    /// whenever the merger would otherwise be stuck.
    Prefer(u64),
}

/// Events of `stream` at or after `pos` happened after the fork whose event ends at `fork_end`
/// in stream `fork`: they wait for it (so that the fork child's heap is the parent's at the
/// fork, not later).
#[derive(Clone, Copy, Debug)]
struct ForkBarrier {
    stream: usize,
    pos: Pos,
    fork: usize,
    fork_end: Pos,
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
    /// Time marks in force in this chunk, in order.
    times: Vec<u64>,
    /// Per queued event: word offset in `words`, index in `times`.
    events: Vec<(u32, u32)>,
    /// Events before this one are applied.
    next: usize,
}

impl Batch {
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
            ignore_after: false,
            released: false,
            part: Part::Whole,
            ignore_overlap: false,
            before_fork: false,
        }
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
    /// Every call event before this position has been applied (the end of the last one).
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

    fn queued(&self) -> usize {
        self.batches.iter().map(|b| b.events.len() - b.next).sum()
    }

    /// Has every word up to `pos` been received (so the event there, if any, is queued or
    /// applied)?
    fn received(&self, pos: Pos) -> bool {
        self.expect.is_some_and(|(seq, off)| Pos { seq, word: off / 8 } > pos)
    }

    /// Has every event before `pos` arrived and been applied? A position at the start of a block
    /// (a fork's cut of a thread whose block was full) is reached once the block before it is
    /// being read: it was complete when the cut was taken, and the fork's own event — applied only
    /// two `Sync`s after it arrived — was published after it.
    fn drained(&self, pos: Pos) -> bool {
        let received = self.expect.is_some_and(|(seq, off)| Pos { seq, word: off / 8 } >= pos || (pos.word == 0 && seq + 1 == pos.seq));
        received && self.head.as_ref().is_none_or(|h| h.pos >= pos)
    }
}

/// Anomalies the merger met (all zero in a healthy trace; each means lost data).
#[derive(Clone, Copy, Debug, Default)]
pub struct MergeStats {
    /// Chunks that did not continue their stream where the previous one ended.
    pub gaps: u64,
    /// Chunks whose words do not decode.
    pub decode_errors: u64,
    /// Ordering positions that named an event the trace never got (the program was killed
    /// between a free's exchange of its ordering cell and its event): released at the end.
    pub missing_predecessors: u64,
    /// Ordering positions released to break a cycle of waits (never expected: every position is
    /// a real happens-before).
    pub broken_cycles: u64,
    /// Frees applied although their block never appeared (unmatched).
    pub forced: u64,
    /// Events whose values no real process has (see [`super::sanity`]): left out.
    pub implausible: u64,
}

#[derive(Default)]
pub struct Merger {
    streams: Vec<Stream>,
    by_id: FxHashMap<u32, usize>,
    syncs: u32,
    /// Pass-start clock of each Sync, in order.
    pass_starts: Vec<u64>,
    ended: bool,
    ready: BinaryHeap<Reverse<(u64, usize)>>,
    addr_waiters: FxHashMap<u64, Vec<usize>>,
    /// Per target stream: (position, waiting stream).
    after_waiters: Vec<Vec<(Pos, usize)>>,
    /// Per stream: (position, waiting stream) of [`Wait::Drained`].
    drain_waiters: Vec<Vec<(Pos, usize)>>,
    /// Forks not applied yet: their cuts, by (forking stream, position of the `Fork` event) …
    fork_cuts: FxHashMap<(usize, Pos), Vec<(usize, Pos)>>,
    /// … and what waits for them.
    fork_barriers: Vec<ForkBarrier>,
    /// The first stream that allocated or freed (until a second one does, no overlap can be out
    /// of order: see `LiveModel::index_chunks`).
    heap_stream: Option<usize>,
    queued: usize,
    pub stats: MergeStats,
    /// Stack and module definitions, collected as chunks are decoded (they need no ordering).
    pub stacks: super::stacks::StackTable,
}

impl Merger {
    pub fn new() -> Merger {
        Merger::default()
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
        self.after_waiters.push(Vec::new());
        self.drain_waiters.push(Vec::new());
        self.by_id.insert(id, i);
        i
    }

    /// Decode a chunk and queue its events. A chunk that cannot lie in a ring block (past its
    /// end, or not at a word) is damage: counted as undecodable and left out.
    pub fn add_chunk(&mut self, c: &Chunk) {
        let fits = (c.words.len() as u64 * 8).checked_add(c.offset as u64).is_some_and(|end| end <= mtrace_protocol::ring::MAX_BLOCK_SIZE as u64);
        if !fits || !c.offset.is_multiple_of(8) {
            self.stats.decode_errors += 1;
            return;
        }
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
        let mut forks = Vec::new();
        let mut batch = Batch {
            words: Vec::new(),
            seq,
            base_word,
            epoch,
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
                Ok((_, ev)) if !super::sanity::plausible(&ev) => self.stats.implausible += 1,
                Ok((at, ev)) => {
                    if let Event::Mallinfo { reason: MallinfoReason::Periodic, .. } = ev {
                        s.internal = true;
                    }
                    if let Event::Fork { cut, .. } = ev
                        && cut > 0
                    {
                        let pos = Pos { seq, word: base_word + at as u32 };
                        forks.push((pos, 2 + cut as u32, mtrace_protocol::event::fork_cut(&c.words[at..]).to_vec()));
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
        for (pos, len, cut) in forks {
            let fork_end = Pos { seq: pos.seq, word: pos.word + len };
            let mut list = Vec::new();
            for r in cut.into_iter().filter_map(order::decode) {
                if r.stream == self.streams[i].id {
                    continue;
                }
                let j = self.stream_index(r.stream);
                let t = &self.streams[j];
                let at = Pos { seq: order::resolve_seq(r.seq_low, t.max_seq.max(t.frontier.seq)), word: r.word };
                list.push((j, at));
                self.fork_barriers.push(ForkBarrier { stream: j, pos: at, fork: i, fork_end });
            }
            self.fork_cuts.insert((i, pos), list);
        }
        self.wake_drained(i);
        if was_empty {
            self.push_if_ready(i);
        }
    }

    /// Streams waiting for stream `i` to be drained to a position it has now reached.
    fn wake_drained(&mut self, i: usize) {
        if self.drain_waiters[i].is_empty() {
            return;
        }
        let waiters = std::mem::take(&mut self.drain_waiters[i]);
        self.drain_waiters[i] = self.release(waiters, |m, pos| m.streams[i].drained(pos), |pos| Wait::Drained { stream: i, pos });
    }

    /// Of `waiters` (position, waiting stream), let go those whose position is `done` and that
    /// still wait for it (`wait`); return the others.
    fn release(&mut self, waiters: Vec<(Pos, usize)>, done: impl Fn(&Merger, Pos) -> bool, wait: impl Fn(Pos) -> Wait) -> Vec<(Pos, usize)> {
        let mut keep = Vec::new();
        for (pos, w) in waiters {
            if !done(self, pos) {
                keep.push((pos, w));
            } else if self.streams[w].wait == wait(pos) {
                self.streams[w].wait = Wait::None;
                self.push_if_ready(w);
            }
        }
        keep
    }

    /// Stream `i`'s head must wait for a fork: the fork's own cut not drained yet, or the head is
    /// past a cut of a fork not applied yet. `Err(())`: it is past a cut, but an event from
    /// before that fork waits for it — it happened before the fork too (the cut is what each
    /// thread had *published*: a realloc whose old block went to another thread inside the call,
    /// or a free another thread read, can be published after the cut), and goes first.
    fn fork_wait(&self, i: usize, head: &Pending) -> Result<Option<Wait>, ()> {
        if let Event::Fork { cut, .. } = head.ev
            && cut > 0
        {
            for &(j, pos) in self.fork_cuts.get(&(i, head.pos)).into_iter().flatten() {
                if !self.streams[j].drained(pos) {
                    return Ok(Some(Wait::Drained { stream: j, pos }));
                }
            }
        }
        if head.before_fork {
            return Ok(None);
        }
        for b in self.fork_barriers.iter().filter(|b| b.stream == i && head.pos >= b.pos && !self.streams[b.fork].drained(b.fork_end)) {
            let needed = self.after_waiters[i]
                .iter()
                .any(|&(pos, w)| pos <= head.pos && self.streams[w].wait == (Wait::After { stream: i, pos }) && self.before_fork(w, b));
            if !needed {
                return Ok(Some(Wait::Drained { stream: b.fork, pos: b.fork_end }));
            }
            return Err(());
        }
        Ok(None)
    }

    /// Did stream `w`'s head happen before the fork of barrier `b`?
    fn before_fork(&self, w: usize, b: &ForkBarrier) -> bool {
        let Some(h) = self.streams[w].head.as_ref() else { return false };
        if h.before_fork {
            return true;
        }
        if w == b.fork {
            return h.pos < b.fork_end;
        }
        self.fork_barriers.iter().any(|c| c.stream == w && c.fork == b.fork && c.fork_end == b.fork_end && h.pos < c.pos)
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

    /// Smallest epoch among the heads that could go now (not waiting). A waiting head holds no
    /// other one back by publication order: what it waits for can have been written in a later
    /// pass than itself (a realloc exchanges its old block's cell before the call and writes its
    /// event, time-marked, after it; a head can wait on an address whose allocation waits on
    /// such a position), and that real edge overrides publication order, a mere preference for
    /// unrelated events, which would otherwise hold it behind them forever.
    fn min_queued_epoch(&self) -> u32 {
        self.streams.iter().filter(|s| s.wait == Wait::None).filter_map(|s| s.head.as_ref().map(|p| p.epoch)).min().unwrap_or(u32::MAX)
    }

    /// May `p` go now as far as publication order is concerned: is every event read in a pass
    /// before the one it was written in applied?
    fn published_in_order(&self, p: &Pending, min_epoch: u32) -> bool {
        if self.pass_starts.is_empty() || p.time_ns < self.pass_starts[0] {
            return true;
        }
        self.pass_of(p.time_ns) <= min_epoch
    }

    /// More events became safe: queue every stream whose head is now safe.
    fn reconsider(&mut self) {
        for i in 0..self.streams.len() {
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

    /// Threads of the application that wrote events. Not counted: streams an ordering position
    /// named but that never appeared, and the preload's mallinfo2 sampler thread — recognised by the
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
            let mut forced = self.force_one(model, on_applied);
            if !forced && self.ended && self.queued > 0 {
                // Everything has arrived and nothing can go: never leave events unapplied.
                self.release_oldest(model, on_applied);
                forced = true;
            }
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
    ///
    /// A realloc that moved its block is applied in two steps, as it happened: its old block was
    /// released inside the call — another thread may have got it back, and named this realloc's
    /// exchange, before the call returned — and its new block was obtained inside the call too,
    /// possibly after a free that named this same exchange (addresses sharing a cell). So the
    /// release goes first, once the old block's predecessors are applied (`after_old`), and moves
    /// the call frontier to the event; the new block follows once its own (`after`, and the end
    /// of the block before it at that address) are. As one step the two would wait for each other.
    fn step(&mut self, i: usize, model: &mut LiveModel, on_applied: &mut impl FnMut(&Pending, u32, &LiveModel)) {
        let head = self.streams[i].head.as_ref().expect("step on an empty stream");
        if !self.safe(head, 2) {
            return;
        }
        let ignore = head.ignore_after;
        if !ignore {
            match self.fork_wait(i, head) {
                Ok(Some(w)) => {
                    let Wait::Drained { stream: j, pos } = w else { unreachable!() };
                    self.streams[i].wait = w;
                    self.drain_waiters[j].push((pos, i));
                    return;
                }
                Ok(None) => {}
                Err(()) => self.streams[i].head.as_mut().unwrap().before_fork = true,
            }
        }
        let head = self.streams[i].head.as_ref().expect("step on an empty stream");
        let moved = moved_realloc(&head.ev);
        if let Some((old, old_chunk)) = moved.filter(|_| !head.released) {
            let after_old = afters_of(&head.ev)[0];
            if !ignore && self.wait_after(i, after_old) {
                return;
            }
            let release = Event::Free { kind: mtrace_protocol::event::EventKind::Free, ptr: old, chunk: old_chunk, after: None };
            if let Need::Live(a) | Need::Dead(a) | Need::Other(a) = model.need(&release) {
                self.streams[i].wait = Wait::Addr(a);
                self.addr_waiters.entry(a).or_default().push(i);
                return;
            }
            model.end_realloc_source(old, old_chunk);
            let h = self.streams[i].head.as_mut().unwrap();
            h.released = true;
            let mut shown = h.clone();
            shown.part = Part::OldBlock;
            on_applied(&shown, self.streams[i].id, model);
            let h = self.streams[i].head.as_mut().unwrap();
            let at = Pos { seq: h.pos.seq, word: h.pos.word + 1 };
            self.wake_address(old);
            self.advance_frontier(i, at);
        }
        let head = self.streams[i].head.as_ref().expect("step on an empty stream");
        let afters = if moved.is_some() { [afters_of(&head.ev)[1], None] } else { afters_of(&head.ev) };
        if !ignore {
            for v in afters {
                if self.wait_after(i, v) {
                    return;
                }
            }
        }
        let head = self.streams[i].head.as_ref().expect("step on an empty stream");
        let ev = for_model(head);
        match model.need(&ev) {
            Need::Ok => {
                // Memory another block of another address still holds: that block's end goes
                // first, if it can (see `Wait::Prefer`).
                if !head.ignore_overlap && let Some(q) = model.overlapped(&ev) {
                    self.streams[i].wait = Wait::Prefer(q);
                    self.addr_waiters.entry(q).or_default().push(i);
                    return;
                }
                self.apply_head(i, model, on_applied)
            }
            Need::Live(a) | Need::Dead(a) | Need::Other(a) => {
                self.streams[i].wait = Wait::Addr(a);
                self.addr_waiters.entry(a).or_default().push(i);
            }
        }
    }

    /// Make stream `i` wait for the event the `after` word `v` names, if it is not applied yet.
    fn wait_after(&mut self, i: usize, v: Option<u64>) -> bool {
        let Some((j, pos)) = v.and_then(|v| self.after_target(i, v)) else { return false };
        if self.streams[j].frontier > pos {
            return false;
        }
        self.streams[i].wait = Wait::After { stream: j, pos };
        self.after_waiters[j].push((pos, i));
        // If that stream is held at a fork's cut, this wait may be what lets it through.
        if let Wait::Drained { .. } = self.streams[j].wait
            && !self.fork_barriers.is_empty()
        {
            self.streams[j].wait = Wait::None;
            self.push_if_ready(j);
        }
        true
    }

    /// Streams waiting for `a`'s liveness to change may go.
    fn wake_address(&mut self, a: u64) {
        if let Some(ws) = self.addr_waiters.remove(&a) {
            for w in ws {
                if self.streams[w].wait == Wait::Addr(a) || self.streams[w].wait == Wait::Prefer(a) {
                    self.streams[w].wait = Wait::None;
                    self.push_if_ready(w);
                }
            }
        }
    }

    /// Stream `i`'s calls are applied up to `frontier`: wake what waited for them.
    fn advance_frontier(&mut self, i: usize, frontier: Pos) {
        self.streams[i].frontier = self.streams[i].frontier.max(frontier);
        if self.after_waiters[i].is_empty() {
            return;
        }
        let frontier = self.streams[i].frontier;
        let waiters = std::mem::take(&mut self.after_waiters[i]);
        self.after_waiters[i] = self.release(waiters, |_, pos| pos < frontier, |pos| Wait::After { stream: i, pos });
    }

    /// Bytes held for queued events (their words, per-event entries, time marks): what a test can
    /// bound per queued event.
    #[cfg(test)]
    fn queued_bytes(&self) -> usize {
        self.streams.iter().flat_map(|s| &s.batches).map(|b| 8 * (b.words.capacity() + b.times.capacity() + b.events.capacity())).sum()
    }

    /// The stream and position an `after` word of stream `i`'s head names. `None`: nothing to
    /// wait for (its own stream: program order already has it).
    fn after_target(&mut self, i: usize, v: u64) -> Option<(usize, Pos)> {
        let r = order::decode(v)?;
        if r.stream == self.streams[i].id {
            return None;
        }
        let j = self.stream_index(r.stream);
        let s = &self.streams[j];
        let seq = order::resolve_seq(r.seq_low, s.max_seq.max(s.frontier.seq));
        Some((j, Pos { seq, word: r.word }))
    }

    fn apply_head(&mut self, i: usize, model: &mut LiveModel, on_applied: &mut impl FnMut(&Pending, u32, &LiveModel)) {
        let mut p = self.streams[i].pop_head();
        if p.released {
            p.part = Part::NewBlock;
        }
        if !model.chunks_indexed && touched(&p.ev).iter().any(Option::is_some) && *self.heap_stream.get_or_insert(i) != i {
            model.index_chunks();
        }
        self.queued -= 1;
        let id = self.streams[i].id;
        model.apply(&for_model(&p), p.time_ns, id);
        on_applied(&p, id, model);
        if let Event::Fork { cut, .. } = p.ev
            && cut > 0
            && self.fork_cuts.remove(&(i, p.pos)).is_some()
        {
            let end = Pos { seq: p.pos.seq, word: p.pos.word + p.len };
            self.fork_barriers.retain(|b| !(b.fork == i && b.fork_end == end));
        }
        self.wake_drained(i);
        for a in touched(&p.ev).into_iter().flatten() {
            self.wake_address(a);
        }
        // Positions name calls (see the module docs): only a call moves the frontier.
        if is_call(&p.ev) {
            self.advance_frontier(i, Pos { seq: p.pos.seq, word: p.pos.word + p.len });
        }
        self.push_if_ready(i);
    }

    /// May stream `i`'s wait still be met without forcing anything? A wait on a position is,
    /// while the event it names has not arrived (the image still running), or while the stream
    /// that has it can still move by itself (its head is not blocked). Then nothing may be
    /// forced: it may unblock everything.
    fn may_resolve(&self, i: usize) -> bool {
        match self.streams[i].wait {
            Wait::After { stream, pos } | Wait::Drained { stream, pos } => {
                let t = &self.streams[stream];
                match &t.head {
                    None => !self.ended,
                    Some(_) => !(self.ended || t.received(pos)) || t.wait == Wait::None,
                }
            }
            _ => false,
        }
    }

    /// Nothing is ready: force the oldest blocked event whose precondition can no longer be met.
    fn force_one(&mut self, model: &mut LiveModel, on_applied: &mut impl FnMut(&Pending, u32, &LiveModel)) -> bool {
        // Only a stall that more data cannot resolve is broken: while any blocked head is
        // younger than the margin, or waits for an event still on its way, what it waits for (or
        // what waits for it) may still arrive.
        let settled = |m: &Merger, i: usize| m.streams[i].head.as_ref().is_none_or(|h| m.safe(h, 3)) && !m.may_resolve(i);
        if !(0..self.streams.len()).filter(|&i| self.streams[i].wait != Wait::None).all(|i| settled(self, i)) {
            return false;
        }
        // Preferences are let go first, without a count: they are no preconditions.
        let mut let_go = false;
        for i in 0..self.streams.len() {
            if let Wait::Prefer(_) = self.streams[i].wait {
                self.streams[i].head.as_mut().unwrap().ignore_overlap = true;
                self.streams[i].wait = Wait::None;
                self.push_if_ready(i);
                let_go = true;
            }
        }
        if let_go {
            return true;
        }
        // Break the stall where it can be repaired: first admit a blocked allocation beside the
        // block still live at its address (its free was lost; a later free tells the two apart by
        // chunk header); then release an ordering position whose event never came; then give up
        // on a free; only then break a cycle.
        let mut best: Option<(u8, u64, usize)> = None;
        for (i, s) in self.streams.iter().enumerate() {
            if s.wait == Wait::None {
                continue;
            }
            let Some(h) = s.head.as_ref() else { continue };
            let rank = match s.wait {
                Wait::Addr(_) if matches!(model.need(&for_model(h)), Need::Dead(_)) => 0,
                // The named event never came (the image ended without it).
                Wait::After { stream, pos } if !(self.streams[stream].received(pos) && self.streams[stream].head.is_some()) => 1,
                Wait::Addr(_) => 2,
                // A cycle (the named event is there, blocked; or a fork's cut): a last resort.
                Wait::After { .. } | Wait::Drained { .. } => 3,
                Wait::None | Wait::Prefer(_) => continue,
            };
            if best.is_none_or(|b| (rank, h.time_ns, i) < b) {
                best = Some((rank, h.time_ns, i));
            }
        }
        let Some((_, _, i)) = best else { return false };
        if std::env::var_os("MTRACE_DEBUG_MERGE").is_some() {
            self.debug_stall(i);
            for (k, st) in self.streams.iter().enumerate() {
                let w = match st.wait {
                    Wait::Addr(a) => {
                        let mut who = Vec::new();
                        for (kk, t) in self.streams.iter().enumerate() {
                            for b in &t.batches {
                                for e in b.next..b.events.len() {
                                    let p = b.pending(e);
                                    if touched(&p.ev).contains(&Some(a)) {
                                        who.push((t.id, p.pos.seq, p.pos.word, kk));
                                        break;
                                    }
                                }
                            }
                        }
                        format!("addr {a:#x} live {:?} touched next by {:?}", model.live.get(&a).map(|b| (b.chunk, b.stream)), who.iter().take(3).collect::<Vec<_>>())
                    }
                    Wait::After { stream, pos } => format!("after stream {} {:?}", self.streams[stream].id, pos),
                    Wait::Drained { stream, pos } => format!("drained stream {} {:?}", self.streams[stream].id, pos),
                    Wait::Prefer(a) => format!("prefer the end of {a:#x}"),
                    Wait::None => "none".into(),
                };
                let _ = k;
                eprintln!("   W stream {} at {:?}: {w}", st.id, st.head.as_ref().map(|h| h.pos));
            }
        }
        match self.streams[i].wait {
            Wait::After { stream, pos } => {
                if self.streams[stream].received(pos) && self.streams[stream].head.is_some() {
                    self.stats.broken_cycles += 1;
                } else {
                    self.stats.missing_predecessors += 1;
                }
                self.streams[i].head.as_mut().unwrap().ignore_after = true;
                self.streams[i].wait = Wait::None;
                self.push_if_ready(i);
            }
            Wait::Drained { .. } => {
                self.stats.broken_cycles += 1;
                self.streams[i].head.as_mut().unwrap().ignore_after = true;
                self.streams[i].wait = Wait::None;
                self.push_if_ready(i);
            }
            Wait::Addr(_) => {
                // An allocation of a still-live address is admitted beside the live block (the
                // model counts it as reordered); a free whose block never appeared is forced.
                let head = for_model(self.streams[i].head.as_ref().unwrap());
                if !matches!(model.need(&head), Need::Dead(_)) {
                    self.stats.forced += 1;
                }
                self.streams[i].wait = Wait::None;
                self.apply_head(i, model, on_applied);
            }
            Wait::None | Wait::Prefer(_) => unreachable!(),
        }
        true
    }

    /// The image ended and every head is stuck behind a wait nothing else could break (never
    /// expected): apply the oldest head as it is, counted as a broken cycle.
    fn release_oldest(&mut self, model: &mut LiveModel, on_applied: &mut impl FnMut(&Pending, u32, &LiveModel)) {
        let Some(i) = (0..self.streams.len()).filter(|&i| self.streams[i].head.is_some()).min_by_key(|&i| self.streams[i].head.as_ref().map(|h| h.time_ns)) else { return };
        if std::env::var_os("MTRACE_DEBUG_MERGE").is_some() {
            self.debug_stall(i);
        }
        self.stats.broken_cycles += 1;
        self.streams[i].wait = Wait::None;
        self.apply_head(i, model, on_applied);
    }

    /// `MTRACE_DEBUG_MERGE`: events are left at the end.
    pub fn debug_dump(&self) {
        eprintln!("merge: {} events left, ended {}", self.queued, self.ended);
        if let Some(i) = (0..self.streams.len()).find(|&i| self.streams[i].head.is_some()) {
            self.debug_stall(i);
        }
    }

    /// `MTRACE_DEBUG_MERGE`: what every stream was doing when stream `i`'s head was forced.
    fn debug_stall(&self, i: usize) {
        let h = self.streams[i].head.as_ref().unwrap();
        eprintln!("force: stream {} wait {:?} head {:?} at {:?} epoch {} syncs {} ended {}", self.streams[i].id, self.streams[i].wait, h.ev, h.pos, h.epoch, self.syncs, self.ended);
        for s in &self.streams {
            eprintln!(
                "   stream {} wait {:?} frontier {:?} expect {:?} queued {} head {:?}",
                s.id,
                s.wait,
                s.frontier,
                s.expect,
                s.queued(),
                s.head.as_ref().map(|p| (p.ev, p.pos, p.epoch, p.time_ns))
            );
        }
    }
}

/// A realloc that moved its block (its old block and chunk header), applied in two steps.
fn moved_realloc(ev: &Event) -> Option<(u64, u64)> {
    match *ev {
        Event::Realloc { old_ptr, new_ptr, old_chunk, .. } if old_ptr != 0 && new_ptr != 0 && new_ptr != old_ptr => Some((old_ptr, old_chunk)),
        _ => None,
    }
}

/// The event as the live model applies it: a moved realloc whose old block was released already
/// only begins its new block (as `realloc(NULL, n)` does).
fn for_model(p: &Pending) -> Event {
    match p.ev {
        Event::Realloc { .. } if p.released => {
            let mut ev = p.ev;
            if let Event::Realloc { old_ptr, .. } = &mut ev {
                *old_ptr = 0;
            }
            ev
        }
        ev => ev,
    }
}

/// The `after` positions of an event (see `mtrace_protocol::order`).
fn afters_of(ev: &Event) -> [Option<u64>; 2] {
    match *ev {
        Event::Alloc { after, .. } | Event::Free { after, .. } => [after, None],
        Event::Realloc { after_old, after, .. } => [after_old, after],
        _ => [None, None],
    }
}

/// A call of the application (what ordering positions name), as opposed to an observation.
fn is_call(ev: &Event) -> bool {
    matches!(
        ev,
        Event::Alloc { .. }
            | Event::Free { .. }
            | Event::Realloc { .. }
            | Event::UsableSize { .. }
            | Event::Mmap { .. }
            | Event::Munmap { .. }
            | Event::Mremap { .. }
            | Event::Brk { .. }
            | Event::Sbrk { .. }
            | Event::MallocTrim { .. }
            | Event::Mallopt { .. }
    )
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
