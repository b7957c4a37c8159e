//! The merger against simulated executions: threads allocating and freeing with heavy address
//! reuse and cross-thread frees, a drain that reads the threads' blocks in passes interleaved
//! with the program, coarse time marks, and ordering cells shared by colliding addresses —
//! exactly what the preload and the recorder produce (see `mtrace_protocol::order`).

use super::*;
use mtrace_protocol::event::{self as ev, EventKind, AUX_HAS_AFTER, AUX_HAS_AFTER_OLD};
use proptest::prelude::*;
use std::collections::BTreeMap;

const BLOCK_WORDS: usize = 64;

/// One simulated thread: its published words, cut into blocks.
struct SimThread {
    stream: u32,
    blocks: Vec<Vec<u64>>,
    last_clock: u64,
    /// How many words of each block the drain has read.
    read: Vec<usize>,
}

impl SimThread {
    fn new(stream: u32) -> Self {
        SimThread { stream, blocks: vec![Vec::new()], last_clock: u64::MAX, read: vec![0] }
    }
    /// Make room for an event of up to `len` words (a new block when it does not fit, a time
    /// mark when the clock moved) and return where it goes, as the preload's `reserve` does.
    fn place(&mut self, clock: u64, len: usize) -> Pos {
        if self.blocks.last().unwrap().len() + len + 2 > BLOCK_WORDS {
            self.blocks.push(Vec::new());
            self.read.push(0);
            self.last_clock = u64::MAX;
        }
        let b = self.blocks.last_mut().unwrap();
        if clock != self.last_clock {
            b.push(ev::header(EventKind::Time, 2, 0));
            b.push(clock);
            self.last_clock = clock;
        }
        let word = b.len() as u32;
        Pos { seq: (self.blocks.len() - 1) as u64, word }
    }
    /// Write an event where [`SimThread::place`] said.
    fn write(&mut self, words: &[u64]) {
        self.blocks.last_mut().unwrap().extend_from_slice(words);
    }
    /// The ordering position of `pos` in this stream.
    fn position(&self, pos: Pos) -> u64 {
        order::position(self.stream, pos.seq as u32, pos.word)
    }
    /// What the drain reads now: unread words of each block, in order.
    fn drain(&mut self) -> Vec<Chunk> {
        let mut out = Vec::new();
        for (seq, b) in self.blocks.iter().enumerate() {
            let r = self.read[seq];
            if b.len() > r {
                out.push(Chunk {
                    image: 0,
                    stream: self.stream,
                    tid: self.stream,
                    block_seq: seq as u32,
                    offset: (r * 8) as u32,
                    words: b[r..].to_vec(),
                });
                self.read[seq] = b.len();
            }
        }
        out
    }
}

#[derive(Clone, Debug)]
enum Op {
    Malloc { t: usize, size: u64 },
    Calloc { t: usize, size: u64 },
    Free { t: usize, pick: usize },
    /// A free whose thread is preempted between the exchange of the block's cell and its event:
    /// the event (and the block's return to the allocator) come at the thread's next operation.
    FreeLate { t: usize, pick: usize },
    Realloc { t: usize, pick: usize, size: u64 },
    /// A realloc whose thread is preempted inside the real call: the old block's cell is
    /// exchanged and the block goes back to the allocator (other threads can get it), the event is
    /// written — and time-marked — at the thread's next operation, possibly passes later.
    ReallocLate { t: usize, pick: usize, size: u64 },
    /// The drain reads thread `t` (a pass visits every thread once, in the order ops say).
    DrainThread { t: usize },
    Tick,
}

fn op(threads: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..threads, 1u64..200).prop_map(|(t, size)| Op::Malloc { t, size }),
        1 => (0..threads, 1u64..200).prop_map(|(t, size)| Op::Calloc { t, size }),
        3 => (0..threads, any::<usize>()).prop_map(|(t, pick)| Op::Free { t, pick }),
        1 => (0..threads, any::<usize>()).prop_map(|(t, pick)| Op::FreeLate { t, pick }),
        1 => (0..threads, any::<usize>(), 0u64..300).prop_map(|(t, pick, size)| Op::Realloc { t, pick, size }),
        1 => (0..threads, any::<usize>(), 1u64..300).prop_map(|(t, pick, size)| Op::ReallocLate { t, pick, size }),
        2 => (0..threads).prop_map(|t| Op::DrainThread { t }),
        1 => Just(Op::Tick),
    ]
}

/// The simulated program's ordering cells: few, so that addresses collide all the time.
struct Cells {
    v: Vec<u64>,
    on: bool,
}

impl Cells {
    fn of(&mut self, p: u64) -> &mut u64 {
        let n = self.v.len() as u64;
        &mut self.v[((p >> 8) % n) as usize]
    }
    /// A free's exchange: the value replaced, kept if it names another stream.
    fn exchange(&mut self, p: u64, pos: u64) -> Option<u64> {
        if !self.on {
            return None;
        }
        let old = std::mem::replace(self.of(p), pos);
        order::foreign(old, pos).then_some(old)
    }
    /// An allocation's load, kept if it names another stream than `own`'s.
    fn load(&mut self, p: u64, own: u64) -> Option<u64> {
        if !self.on {
            return None;
        }
        let v = *self.of(p);
        order::foreign(v, own).then_some(v)
    }
}

/// A call preempted between the exchange of its cell and its event.
enum Late {
    /// The free's event, at the position it reserved; the block goes back to the allocator after.
    Free { words: Vec<u64>, p: u64 },
    /// A realloc returning: the load of the new block's cell (`new`, 0: none) and the event,
    /// placed anew (with the clock of then).
    /// The program gets the new block (`block`: address, size) only then.
    Realloc { words: Vec<u64>, new: u64, own: u64, block: Option<(u64, u64)> },
}

impl Late {
    fn complete(self, th: &mut SimThread, clock: u64, cells: &mut Cells, free_list: &mut Vec<u64>, live: &mut BTreeMap<u64, u64>) {
        match self {
            Late::Free { words, p } => {
                th.write(&words);
                free_list.push(p);
            }
            Late::Realloc { mut words, new, own, block } => {
                if let Some((p, size)) = block {
                    live.insert(p, size);
                }
                if let Some(a) = (new != 0).then(|| cells.load(new, own)).flatten() {
                    words.push(a);
                    let (_, _, aux) = ev::split_header(words[0]);
                    words[0] = ev::header(EventKind::Realloc, words.len(), aux | AUX_HAS_AFTER);
                }
                th.place(clock, words.len());
                th.write(&words);
            }
        }
    }
}

/// Run a simulated execution; returns the true final live set and the merged model. `cells`:
/// the program has ordering cells (else its events carry no `after` words).
fn simulate(threads: usize, ops: &[Op], cells: bool) -> (BTreeMap<u64, u64>, LiveModel, MergeStats) {
    let mut th: Vec<SimThread> = (0..threads).map(|i| SimThread::new(i as u32 + 1)).collect();
    // The allocator: LIFO reuse of freed addresses across threads (like bins shared by threads).
    let mut free_list: Vec<u64> = Vec::new();
    let mut next_addr = 0x1000u64;
    let mut live: BTreeMap<u64, u64> = BTreeMap::new();
    let mut cells = Cells { v: vec![0; 4], on: cells };
    // Per thread, a call whose cell was exchanged but whose event is not written yet.
    let mut late: Vec<Option<Late>> = (0..threads).map(|_| None).collect();
    let mut clock = 1u64;
    let mut pass_start = 1u64;
    let mut merger = Merger::new();
    let mut model = LiveModel::default();
    let mut drained_in_pass: Vec<bool> = vec![false; threads];
    let mut chunks_since_sync: Vec<Chunk> = Vec::new();

    let mut get_addr = |free_list: &mut Vec<u64>| {
        free_list.pop().unwrap_or_else(|| {
            next_addr += 0x100;
            next_addr
        })
    };
    let with_after = |mut words: Vec<u64>, flag: u64, after: Option<u64>| {
        if let Some(a) = after {
            words.push(a);
            let (k, _, aux) = ev::split_header(words[0]);
            words[0] = ev::header(EventKind::from_u8(k).unwrap(), words.len(), aux | flag);
        }
        words
    };
    for o in ops {
        let t = match *o {
            Op::Malloc { t, .. } | Op::Calloc { t, .. } | Op::Free { t, .. } | Op::FreeLate { t, .. } | Op::Realloc { t, .. } | Op::ReallocLate { t, .. } => {
                Some(t)
            }
            _ => None,
        };
        // A preempted free completes before its thread does anything else.
        if let Some(t) = t {
            if let Some(l) = late[t].take() {
                l.complete(&mut th[t], clock, &mut cells, &mut free_list, &mut live);
            }
        }
        match *o {
            Op::Malloc { t, size } | Op::Calloc { t, size } => {
                let kind = if matches!(o, Op::Calloc { .. }) { EventKind::Calloc } else { EventKind::Malloc };
                let p = get_addr(&mut free_list);
                let pos = th[t].place(clock, 4);
                let after = cells.load(p, th[t].position(pos));
                th[t].write(&with_after(vec![ev::header(kind, 3, 0), p, size], AUX_HAS_AFTER, after));
                live.insert(p, size);
            }
            Op::Free { t, pick } | Op::FreeLate { t, pick } => {
                if live.is_empty() {
                    continue;
                }
                let p = *live.keys().nth(pick % live.len()).unwrap();
                live.remove(&p);
                let pos = th[t].place(clock, 3);
                let after = cells.exchange(p, th[t].position(pos));
                let words = with_after(vec![ev::header(EventKind::Free, 2, 0), p], AUX_HAS_AFTER, after);
                if matches!(o, Op::FreeLate { .. }) {
                    late[t] = Some(Late::Free { words, p });
                } else {
                    th[t].write(&words);
                    free_list.push(p);
                }
            }
            Op::Realloc { t, pick, size } | Op::ReallocLate { t, pick, size } => {
                if live.is_empty() {
                    continue;
                }
                let old = *live.keys().nth(pick % live.len()).unwrap();
                // The exchange of the old block's cell names the event to come, before the call.
                let pos = th[t].place(clock, 7);
                let own = th[t].position(pos);
                let after_old = cells.exchange(old, own);
                live.remove(&old);
                // As glibc: in place (one in three here), or a new block first, then the old one
                // back to the allocator (other threads may get it before this call returns).
                let new = if size == 0 {
                    0
                } else if size % 3 == 0 {
                    old
                } else {
                    get_addr(&mut free_list)
                };
                if new != old {
                    free_list.push(old);
                }
                let words = with_after(vec![ev::header(EventKind::Realloc, 5, 0), old, new, size, 0], AUX_HAS_AFTER_OLD, after_old);
                let l = Late::Realloc { words, new: if new != old { new } else { 0 }, own, block: (new != 0).then_some((new, size)) };
                if matches!(o, Op::ReallocLate { .. }) {
                    late[t] = Some(l);
                } else {
                    l.complete(&mut th[t], clock, &mut cells, &mut free_list, &mut live);
                }
            }
            Op::DrainThread { t } => {
                // A pass starts by writing a new clock value (what the recorder does).
                if drained_in_pass.iter().all(|&d| !d) {
                    clock += 1;
                    pass_start = clock;
                }
                chunks_since_sync.extend(th[t].drain());
                drained_in_pass[t] = true;
                if drained_in_pass.iter().all(|&d| d) {
                    // End of a pass: hand the chunks to the merger, then the Sync.
                    for c in chunks_since_sync.drain(..) {
                        merger.add_chunk(&c);
                    }
                    merger.sync(pass_start);
                    merger.run(&mut model, &mut |_, _, _| {});
                    drained_in_pass.iter_mut().for_each(|d| *d = false);
                }
            }
            Op::Tick => clock += 1,
        }
    }
    for (t, l) in late.iter_mut().enumerate() {
        if let Some(l) = l.take() {
            l.complete(&mut th[t], clock, &mut cells, &mut free_list, &mut live);
        }
    }
    for c in chunks_since_sync.drain(..) {
        merger.add_chunk(&c);
    }
    for t in th.iter_mut() {
        for c in t.drain() {
            merger.add_chunk(&c);
        }
    }
    merger.end();
    merger.run(&mut model, &mut |_, _, _| {});
    assert_eq!(merger.queued(), 0, "events left unapplied");
    (live, model, merger.stats)
}

fn live_of(m: &LiveModel) -> BTreeMap<u64, u64> {
    m.live.iter().map(|(&a, b)| (a, b.size)).collect()
}

/// Nothing was lost, nothing forced, nothing reordered.
fn clean(stats: &MergeStats, model: &LiveModel) -> bool {
    stats.gaps + stats.decode_errors + stats.missing_predecessors + stats.broken_cycles + stats.forced + model.c.reordered + model.c.unmatched_frees == 0
}

proptest! {
    /// Whatever the interleaving — cross-thread frees, calloc, moving and in-place reallocs,
    /// frees preempted between their exchange and their event, reallocs preempted inside the call
    /// (their event written passes after their exchange), addresses sharing cells, a drain
    /// reading the threads in any order — the merged history is exact, byte for byte, and the
    /// merger never intervenes.
    #[test]
    fn merged_state_is_exact_whatever_the_interleaving(threads in 2usize..6, ops in proptest::collection::vec(op(5), 1..400)) {
        let ops: Vec<Op> = ops.into_iter().map(|o| clamp_thread(o, threads)).collect();
        let (truth, model, stats) = simulate(threads, &ops, true);
        prop_assert_eq!(live_of(&model), truth);
        prop_assert!(clean(&stats, &model), "{:?}, reordered {}, unmatched {}", stats, model.c.reordered, model.c.unmatched_frees);
    }
}

/// The same over 3000 longer deterministic executions: every one exact, none with an
/// intervention.
#[test]
fn merged_state_is_exact_over_many_executions() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = (2usize..8, proptest::collection::vec(op(7), 1..800));
    for _ in 0..3000 {
        let (threads, ops) = strategy.new_tree(&mut runner).unwrap().current();
        let ops: Vec<Op> = ops.into_iter().map(|o| clamp_thread(o, threads)).collect();
        let (truth, model, stats) = simulate(threads, &ops, true);
        assert_eq!(live_of(&model), truth, "inexact: {ops:?}");
        assert!(clean(&stats, &model), "{stats:?} in {ops:?}");
    }
}

fn clamp_thread(o: Op, n: usize) -> Op {
    match o {
        Op::Malloc { t, size } => Op::Malloc { t: t % n, size },
        Op::Calloc { t, size } => Op::Calloc { t: t % n, size },
        Op::Free { t, pick } => Op::Free { t: t % n, pick },
        Op::FreeLate { t, pick } => Op::FreeLate { t: t % n, pick },
        Op::Realloc { t, pick, size } => Op::Realloc { t: t % n, pick, size },
        Op::ReallocLate { t, pick, size } => Op::ReallocLate { t: t % n, pick, size },
        Op::DrainThread { t } => Op::DrainThread { t: t % n },
        Op::Tick => Op::Tick,
    }
}

/// The pattern per-thread order and "live means freed first" alone cannot resolve: A allocates
/// p, C frees it, B gets p back — all within one tick, read in an adversarial order. The cell
/// C exchanged orders B after C.
#[test]
fn a_cell_resolves_alloc_free_alloc_across_three_threads() {
    use Op::*;
    let ops = vec![
        Malloc { t: 0, size: 10 }, // A: p (10 bytes)
        Free { t: 2, pick: 0 },    // C frees p
        Malloc { t: 1, size: 20 }, // B gets p back (20 bytes)
        DrainThread { t: 1 },      // the drain reads B first,
        DrainThread { t: 2 },      // then C,
        DrainThread { t: 0 },      // then A
    ];
    let (truth, model, stats) = simulate(3, &ops, true);
    assert_eq!(truth.values().copied().collect::<Vec<_>>(), vec![20]);
    assert_eq!(live_of(&model), truth);
    assert!(clean(&stats, &model));
    // Without cells the same streams admit the wrong answer: B's block first, C frees it,
    // A's 10 bytes stay live.
    let (_, model, _) = simulate(3, &ops, false);
    assert_eq!(live_of(&model).values().copied().collect::<Vec<_>>(), vec![10]);
}

/// A position whose event has not arrived (its thread was preempted between the exchange and the
/// event) is waited for however many passes go by — nothing is forced meanwhile — and applied in
/// order when it comes. If it never comes, the image's end releases it, counted.
#[test]
fn a_position_not_yet_written_is_waited_for_not_forced() {
    let (a, b) = (1u32, 2u32);
    let free_pos = order::position(a, 0, 2);
    let mut m = Merger::new();
    let mut model = LiveModel::default();
    // Stream A allocated p long ago (applied); B frees p... no: A frees p, B reallocates it.
    m.add_chunk(&Chunk { image: 0, stream: a, tid: 1, block_seq: 0, offset: 0, words: vec![ev::header(EventKind::Time, 2, 0), 1] });
    // B got p back after A's free exchanged the cell: B's malloc names A's free, which A has not
    // written yet. (p = 0x40 was never allocated in the trace: the free is what makes it right.)
    let b_words = vec![ev::header(EventKind::Time, 2, 0), 1, ev::header(EventKind::Malloc, 4, AUX_HAS_AFTER), 0x40, 8, free_pos];
    m.add_chunk(&Chunk { image: 0, stream: b, tid: 2, block_seq: 0, offset: 0, words: b_words });
    for pass in 1..=10 {
        m.sync(100 * pass);
        m.run(&mut model, &mut |_, _, _| {});
    }
    assert_eq!(model.c.live_blocks, 0, "the malloc waits");
    assert_eq!(m.stats.missing_predecessors + m.stats.forced, 0);
    // A's free arrives (of an address allocated before tracing: unmatched, but in order).
    m.add_chunk(&Chunk { image: 0, stream: a, tid: 1, block_seq: 0, offset: 16, words: vec![ev::header(EventKind::Free, 2, 0), 0x40] });
    for pass in 11..=13 {
        m.sync(100 * pass);
        m.run(&mut model, &mut |_, _, _| {});
    }
    assert_eq!(model.c.live_bytes, 8);
    assert_eq!(m.stats.missing_predecessors, 0);

    // Never written: released at the end, and counted.
    let mut m = Merger::new();
    let mut model = LiveModel::default();
    let b_words = vec![ev::header(EventKind::Time, 2, 0), 1, ev::header(EventKind::Malloc, 4, AUX_HAS_AFTER), 0x40, 8, free_pos];
    m.add_chunk(&Chunk { image: 0, stream: b, tid: 2, block_seq: 0, offset: 0, words: b_words });
    m.end();
    m.run(&mut model, &mut |_, _, _| {});
    assert_eq!(model.c.live_bytes, 8);
    assert_eq!(m.stats.missing_predecessors, 1);
}

/// A realloc exchanges its old block's cell with the position of its event to come, and a heap
/// observation may be written there first: the position names the first call at or after it, so
/// a waiter goes after the realloc, not after the observation.
#[test]
fn a_position_names_the_first_call_at_or_after_it() {
    let (a, b) = (1u32, 2u32);
    let mut m = Merger::new();
    let mut model = LiveModel::default();
    // A: malloc(old) at word 2; the realloc's exchange named word 5, where a HeapSize (3 words)
    // went first; the realloc (old → new) is at word 8.
    let a_words = vec![
        ev::header(EventKind::Time, 2, 0),
        1,
        ev::header(EventKind::Malloc, 3, 0),
        0x100,
        10,
        ev::header(EventKind::HeapSize, 3, 0),
        0x7f00_0000_0000,
        0x21000,
        ev::header(EventKind::Realloc, 5, 0),
        0x100,
        0x200,
        30,
        0,
    ];
    // B got the old block back: its malloc names word 5 of A.
    let b_words = vec![ev::header(EventKind::Time, 2, 0), 1, ev::header(EventKind::Malloc, 4, AUX_HAS_AFTER), 0x100, 20, order::position(a, 0, 5)];
    m.add_chunk(&Chunk { image: 0, stream: b, tid: 2, block_seq: 0, offset: 0, words: b_words });
    m.add_chunk(&Chunk { image: 0, stream: a, tid: 1, block_seq: 0, offset: 0, words: a_words });
    m.end();
    let mut order = Vec::new();
    m.run(&mut model, &mut |p, stream, _| order.push((stream, p.pos.word, p.part)));
    // The moved realloc is shown in its two parts, its old block's release first.
    assert_eq!(order, vec![(a, 2, Part::Whole), (a, 5, Part::Whole), (a, 8, Part::OldBlock), (a, 8, Part::NewBlock), (b, 2, Part::Whole)]);
    assert!(clean(&m.stats, &model));
    assert_eq!(live_of(&model), BTreeMap::from([(0x100, 20), (0x200, 30)]));
}

/// A free whose allocation is in another stream that the drain has not read yet waits for it.
#[test]
fn free_waits_for_its_allocation_in_a_lagging_stream() {
    use Op::*;
    let ops = vec![
        Malloc { t: 0, size: 7 },
        Free { t: 1, pick: 0 },
        DrainThread { t: 1 },
        DrainThread { t: 0 },
        Malloc { t: 1, size: 9 },
        DrainThread { t: 1 },
        DrainThread { t: 0 },
    ];
    let (truth, model, stats) = simulate(2, &ops, true);
    assert_eq!(live_of(&model), truth);
    assert_eq!(model.c.unmatched_frees, 0);
    assert_eq!(stats.forced, 0);
}

/// A free of an address never allocated (memory from before tracing) is forced as unmatched
/// once nothing else can explain it — and does not hold up other events.
#[test]
fn genuinely_unmatched_free_is_counted_not_stuck() {
    let mut m = Merger::new();
    let mut model = LiveModel::default();
    let words = vec![ev::header(EventKind::Time, 2, 0), 5, ev::header(EventKind::Free, 2, 0), 0xdead, ev::header(EventKind::Malloc, 3, 0), 0x10, 4];
    m.add_chunk(&Chunk { image: 0, stream: 1, tid: 1, block_seq: 0, offset: 0, words });
    for pass in 1..=3 {
        m.sync(100 * pass);
        m.run(&mut model, &mut |_, _, _| {});
    }
    assert_eq!(model.c.unmatched_frees, 1);
    assert_eq!(model.c.live_bytes, 4);
    assert_eq!(m.stats.forced, 1);
    assert_eq!(m.queued(), 0);
}

/// Events are held until two Syncs have passed (their causal past may still be in flight).
#[test]
fn events_wait_for_two_syncs_unless_the_image_ended() {
    let mut m = Merger::new();
    let mut model = LiveModel::default();
    let words = vec![ev::header(EventKind::Malloc, 3, 0), 0x10, 4];
    m.add_chunk(&Chunk { image: 0, stream: 1, tid: 1, block_seq: 0, offset: 0, words: words.clone() });
    m.run(&mut model, &mut |_, _, _| {});
    assert_eq!(model.c.live_bytes, 0);
    m.sync(100);
    m.run(&mut model, &mut |_, _, _| {});
    assert_eq!(model.c.live_bytes, 0);
    m.sync(200);
    m.run(&mut model, &mut |_, _, _| {});
    assert_eq!(model.c.live_bytes, 4);
    let mut m = Merger::new();
    let mut model = LiveModel::default();
    m.add_chunk(&Chunk { image: 0, stream: 1, tid: 1, block_seq: 0, offset: 0, words });
    m.end();
    m.run(&mut model, &mut |_, _, _| {});
    assert_eq!(model.c.live_bytes, 4);
}

/// A chunk that does not continue its stream is reported.
#[test]
fn gaps_are_counted() {
    let mut m = Merger::new();
    let w = vec![ev::header(EventKind::Malloc, 3, 0), 0x10, 4];
    m.add_chunk(&Chunk { image: 0, stream: 1, tid: 1, block_seq: 0, offset: 0, words: w.clone() });
    m.add_chunk(&Chunk { image: 0, stream: 1, tid: 1, block_seq: 0, offset: 64, words: w });
    assert_eq!(m.stats.gaps, 1);
}



/// The preload's mallinfo2 sampler thread (a stream of `Periodic` checkpoints) is not an
/// application thread; a thread that takes other checkpoints (malloc_trim, exit) is.
#[test]
fn the_mallinfo_sampler_stream_is_not_counted_as_a_thread() {
    use mtrace_protocol::event::{Mallinfo2, MallinfoReason};
    let mut m = Merger::new();
    let mut model = LiveModel::default();
    let mi = Mallinfo2 { arena: 135168, ..Default::default() };
    let mut app = vec![ev::header(EventKind::Time, 2, 0), 5, ev::header(EventKind::Malloc, 3, 0), 0x10, 4];
    app.extend_from_slice(&mi.encode(MallinfoReason::BeforeTrim, 0));
    app.extend_from_slice(&[ev::header(EventKind::MallocTrim, 2, 0), 0]);
    app.extend_from_slice(&mi.encode(MallinfoReason::AfterTrim, 0));
    app.extend_from_slice(&mi.encode(MallinfoReason::Exit, 0));
    let mut sampler = vec![ev::header(EventKind::Time, 2, 0), 1];
    sampler.extend_from_slice(&mi.encode(MallinfoReason::Periodic, 0));
    m.add_chunk(&Chunk { image: 0, stream: 1, tid: 100, block_seq: 0, offset: 0, words: sampler });
    m.add_chunk(&Chunk { image: 0, stream: 2, tid: 99, block_seq: 0, offset: 0, words: app });
    m.end();
    let mut seen = Vec::new();
    m.run(&mut model, &mut |p, stream, _| {
        if let Event::Mallinfo { reason, .. } = p.ev {
            seen.push((stream, reason));
        }
    });
    assert_eq!(m.stream_count(), 1);
    assert_eq!(model.c.live_bytes, 4);
    assert_eq!(
        seen,
        vec![(1, MallinfoReason::Periodic), (2, MallinfoReason::BeforeTrim), (2, MallinfoReason::AfterTrim), (2, MallinfoReason::Exit)]
    );
}

/// One thread reusing one address over and over (a malloc/free loop): everything it queues
/// before its events are safe is held as the chunks' words, not as decoded events.
#[test]
fn queued_events_of_a_churn_loop_stay_compact() {
    const PAIRS: u64 = 50_000;
    const PER_CHUNK: u64 = 100;
    let mut m = Merger::new();
    let mut model = LiveModel::default();
    let mut words = Vec::new();
    let mut seq = 0u32;
    for k in 0..PAIRS {
        if k % 7 == 0 {
            words.extend_from_slice(&[ev::header(EventKind::Time, 2, 0), 1000 + k]);
        }
        words.extend_from_slice(&[ev::header(EventKind::Malloc, 3, 0), 0x10, 32, ev::header(EventKind::Free, 2, 0), 0x10]);
        if (k + 1) % PER_CHUNK == 0 {
            m.add_chunk(&Chunk { image: 0, stream: 1, tid: 1, block_seq: seq, offset: 0, words: std::mem::take(&mut words) });
            seq += 1;
        }
    }
    m.run(&mut model, &mut |_, _, _| {});
    assert_eq!(m.queued() as u64, 2 * PAIRS);
    assert_eq!(model.c.live_blocks, 0);
    // The chunks' words (5 per pair, plus time marks) and 8 bytes of index per event.
    let per_event = m.queued_bytes() as f64 / (2 * PAIRS) as f64;
    assert!(per_event <= 32.0, "{per_event} bytes per queued event");
    let mut applied = 0u64;
    let mut last_time = 0;
    for pass in 1..=2 {
        // Pass starts after every time mark of the chunks (all were read in the first pass).
        m.sync(1_000_000 * pass);
        m.run(&mut model, &mut |p, _, _| {
            applied += 1;
            assert!(p.time_ns >= last_time);
            last_time = p.time_ns;
        });
    }
    assert_eq!(applied, 2 * PAIRS);
    assert_eq!(last_time, 1000 + (PAIRS - 1) / 7 * 7);
    assert_eq!(m.queued(), 0);
    assert_eq!(m.queued_bytes(), 0);
    assert_eq!(model.c.live_blocks, 0);
    assert_eq!(model.c.unmatched_frees, 0);
}


/// A `Fork` event carries its cut: every event another thread had published before the fork is
/// applied before it (in the child's heap), every later one after it — whatever the time marks
/// and the order the chunks arrive in.
#[test]
fn a_fork_is_ordered_by_its_cut_not_by_time() {
    let (a, b) = (1u32, 2u32);
    let mut m = Merger::new();
    let mut model = LiveModel::default();
    // B: two mallocs published before the fork (words 2..8), one after (word 8), all marked late.
    let b_words = vec![
        ev::header(EventKind::Time, 2, 0),
        900,
        ev::header(EventKind::Malloc, 3, 0),
        0x100,
        1,
        ev::header(EventKind::Malloc, 3, 0),
        0x200,
        2,
        ev::header(EventKind::Malloc, 3, 0),
        0x300,
        3,
    ];
    // A forks early (time 5), with B's cut at word 8.
    let a_words = vec![ev::header(EventKind::Time, 2, 0), 5, ev::header(EventKind::Fork, 3, 0), 1, order::position(b, 0, 8)];
    m.add_chunk(&Chunk { image: 0, stream: b, tid: 2, block_seq: 0, offset: 0, words: b_words });
    m.add_chunk(&Chunk { image: 0, stream: a, tid: 1, block_seq: 0, offset: 0, words: a_words });
    m.end();
    let mut seen = Vec::new();
    m.run(&mut model, &mut |p, stream, model| seen.push((stream, p.pos.word, model.c.live_blocks)));
    assert_eq!(seen, vec![(b, 2, 1), (b, 5, 2), (a, 2, 2), (b, 8, 3)]);
    assert!(clean(&m.stats, &model));
}

/// A realloc published after a fork's cut whose old block another thread got back — and
/// published — before the cut: the realloc happened before the fork too, and goes first (no cycle
/// between the fork, its cut and the realloc).
#[test]
fn an_event_a_pre_fork_event_needs_passes_the_cut() {
    let (f, k, j) = (1u32, 2u32, 3u32);
    let mut m = Merger::new();
    let mut model = LiveModel::default();
    let t = |c: u64| [ev::header(EventKind::Time, 2, 0), c];
    let mut kw = t(5).to_vec();
    kw.extend_from_slice(&[ev::header(EventKind::Malloc, 3, 0), 0x100, 8]);
    kw.extend_from_slice(&[ev::header(EventKind::Realloc, 5, 0), 0x100, 0x300, 40, 0]);
    let mut jw = t(6).to_vec();
    jw.extend_from_slice(&[ev::header(EventKind::Malloc, 4, AUX_HAS_AFTER), 0x100, 16, order::position(k, 0, 5)]);
    let mut fw = t(7).to_vec();
    fw.extend_from_slice(&[ev::header(EventKind::Fork, 4, 0), 1, order::position(k, 0, 5), order::position(j, 0, 6)]);
    m.add_chunk(&Chunk { image: 0, stream: f, tid: 1, block_seq: 0, offset: 0, words: fw });
    m.add_chunk(&Chunk { image: 0, stream: j, tid: 3, block_seq: 0, offset: 0, words: jw });
    m.add_chunk(&Chunk { image: 0, stream: k, tid: 2, block_seq: 0, offset: 0, words: kw });
    m.end();
    let mut seen = Vec::new();
    m.run(&mut model, &mut |p, stream, _| seen.push((stream, p.pos.word, p.part)));
    assert!(clean(&m.stats, &model), "{:?}", m.stats);
    let fork_at = seen.iter().position(|&(s, ..)| s == f).unwrap();
    assert!(seen[..fork_at].contains(&(j, 2, Part::Whole)), "{seen:?}");
    assert!(seen[..fork_at].iter().any(|&(s, w, _)| s == k && w == 5), "{seen:?}");
    assert_eq!(live_of(&model), BTreeMap::from([(0x100, 16), (0x300, 40)]));
}

/// Damage the merger meets in a forged or corrupted trace is counted and left out: a chunk that
/// cannot lie in a ring block, an event no process could have produced.
#[test]
fn chunks_outside_a_block_and_implausible_events_are_counted_and_left_out() {
    let mut m = Merger::new();
    let mut model = LiveModel::default();
    let chunk = |offset: u32, words: Vec<u64>| Chunk { image: 0, stream: 1, tid: 1, block_seq: 0, offset, words };
    let malloc = |ptr: u64, size: u64| [ev::header(EventKind::Malloc, 3, 0x31), ptr, size];
    m.add_chunk(&chunk(u32::MAX - 7, malloc(0x1000, 16).to_vec()));
    m.add_chunk(&chunk(4, malloc(0x1000, 16).to_vec()));
    let mut words = malloc(0x1000, u64::MAX).to_vec();
    words.extend(malloc(0x2000, 24));
    m.add_chunk(&chunk(0, words));
    m.end();
    m.run(&mut model, &mut |_, _, _| {});
    assert_eq!((m.stats.decode_errors, m.stats.implausible), (2, 1));
    assert_eq!((model.c.alloc_count, model.c.live_bytes), (1, 24));
}
