//! The analysis of one process image: its metadata, the merger over its thread streams, its live
//! model, its RSS samples and the timeline that pairs them.

use std::collections::VecDeque;

use mtrace_protocol::control::Origin;
use mtrace_protocol::event::Event;
use crate::trace::{Chunk, ProcessEnd, ProcessStart};
use rustc_hash::FxHashMap;

use super::glibc::GlibcModel;
use super::live::LiveModel;
use super::merge::{MergeStats, Merger};
use super::meta::ProcessMeta;

/// How an image came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Relation {
    /// The launched command (or a process whose parent was not traced).
    Root,
    /// Started by a traced process (posix_spawn, fork + exec).
    Spawn,
    /// `fork()` of a traced image: starts with its parent's heap.
    Fork,
    /// `exec` in a traced process: a new image with the same pid.
    Exec,
}

/// The state of the heap at one sampling time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TimelinePoint {
    #[serde(skip)]
    pub time_ns: u64,
    pub live_bytes: u64,
    pub heap_bytes: u64,
    pub mmapped_bytes: u64,
    pub rss_bytes: u64,
    pub categories: super::glibc::breakdown::Categories,
    /// Calls so far per hooked function, indexed by [`call_index`].
    #[serde(skip)]
    pub calls: [u64; CALL_KINDS],
}

/// Hooked functions: the event kinds below 32 (see `EventKind::is_call`).
pub const CALL_KINDS: usize = 31;

/// The index of a call kind in [`TimelinePoint::calls`].
pub fn call_index(k: mtrace_protocol::event::EventKind) -> Option<usize> {
    let i = k as usize;
    (k.is_call() && i >= 1).then(|| i - 1)
}

fn call_counts(model: &LiveModel) -> [u64; CALL_KINDS] {
    let mut a = [0u64; CALL_KINDS];
    for (k, n) in &model.c.calls {
        if let Some(i) = call_index(*k) {
            a[i] = *n;
        }
    }
    a
}

enum Phase {
    /// A fork child waiting for its parent's heap at the fork.
    AwaitingSnapshot { parent: u32, seq: u64 },
    Running,
}

/// When and why a process stopped tracing on its own, and what it missed (see
/// `Record::TracingStopped`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracingStopped {
    /// `mtrace_protocol::ring::detach_reason`.
    pub reason: u32,
    pub time_ns: u64,
    /// At least this many calls after that are not in the trace.
    pub untraced_calls: u64,
    pub timeout_ms: u32,
}

pub struct ImageAnalysis {
    pub id: u32,
    pub pid: u32,
    pub ppid: u32,
    pub parent: Option<u32>,
    pub relation: Relation,
    pub meta: ProcessMeta,
    /// Monotonic time the image started (its constructor ran).
    pub start_ns: u64,
    pub end: Option<ProcessEnd>,
    /// The process stopped tracing before it ended (a `TracingStopped` record).
    pub tracing_stopped: Option<TracingStopped>,
    pub model: LiveModel,
    /// glibc's arenas, bins and thresholds, fed the same merged events.
    pub glibc: GlibcModel,
    merger: Merger,
    phase: Phase,
    held: Vec<Held>,
    last_sync_ns: u64,
    /// RSS samples waiting for the merged history to reach them, and the points made of them.
    pub samples: Samples,
    pub rss_samples: u64,
    pub peak_rss_sample: u64,
    pub last_rss_sample: u64,
    /// Heaps at each of this image's fork events, for its children.
    /// (with the glibc model and the stream that forked).
    pub fork_snapshots: FxHashMap<u64, (LiveModel, (GlibcModel, u32))>,
    pub inherited_bytes: u64,
    /// Request sizes of this image's allocations.
    pub sizes: super::sizes::SizeHistogram,
}

/// RSS samples in time order, turned into timeline points as the merged history passes them.
#[derive(Default)]
pub struct Samples {
    pending: VecDeque<(u64, u64)>,
    /// `/proc/<pid>/smaps` samples (time, mappings) not reached yet.
    pending_smaps: VecDeque<(u64, Vec<crate::trace::Mapping>)>,
    /// Each smaps sample classified by what the glibc model knows, with its estimate.
    pub resident: Vec<super::glibc::breakdown::Resident>,
    pub timeline: Vec<TimelinePoint>,
    /// The glibc model's breakdown and causes at the highest RSS sample so far.
    pub peak_retention: Option<(u64, super::glibc::breakdown::Breakdown, Vec<super::glibc::explain::Cause>)>,
    /// At that sample, the chunk right under each arena's heap top when it is a live block or a
    /// cached free one.
    pub peak_pins: Vec<PinAt>,
    peak_rss: u64,
    /// The causes right before each `malloc_trim` call (in the order of the model's trims).
    pub before_trims: Vec<Vec<super::glibc::explain::Cause>>,
    start_ns: u64,
}

impl Samples {
    /// Points for the samples taken before `time_ns`, with the models as they are now.
    fn emit_before(&mut self, time_ns: u64, model: &LiveModel, glibc: &GlibcModel) {
        while self.pending_smaps.front().is_some_and(|(t, _)| *t < time_ns) {
            let (t, maps) = self.pending_smaps.pop_front().unwrap();
            if glibc.enabled {
                self.resident.push(glibc.classify(t, &maps));
            }
        }
        while let Some(&(t, rss)) = self.pending.front() {
            if t >= time_ns {
                break;
            }
            self.pending.pop_front();
            self.timeline.push(TimelinePoint {
                time_ns: t,
                live_bytes: model.c.live_bytes,
                heap_bytes: model.heap_bytes(),
                mmapped_bytes: model.c.mmapped_bytes,
                rss_bytes: rss,
                categories: glibc.categories(),
                calls: call_counts(model),
            });
            // The last sample of the peak's plateau (within 1 % of the highest so far): there,
            // the most of it is no longer live.
            self.peak_rss = self.peak_rss.max(rss);
            // A sample whose model state holds less than half of the stored one while RSS has
            // not moved was taken while glibc was still giving the memory back (the model is
            // a few ms ahead of the kernel there): it does not describe the peak.
            let held = glibc.heap_held() + glibc.mmapped_bytes;
            let consistent = self.peak_retention.as_ref().is_none_or(|(_, b, _)| held * 2 >= b.os_held_bytes);
            if glibc.enabled && consistent && rss as u128 * 100 >= self.peak_rss as u128 * 99 {
                let b = glibc.breakdown(t);
                let causes = super::glibc::explain::causes(glibc, model, &b, self.start_ns);
                self.peak_retention = Some((rss, b, causes));
                self.peak_pins = pins(glibc, model);
            }
        }
    }
}

/// A chunk pinning a heap top at some moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinAt {
    /// "main" or the arena's address.
    pub arena: String,
    /// The user address of the block.
    pub address: u64,
    /// Requested bytes of a live block; chunk size of a freed one.
    pub size: u64,
    /// Stack id of the block that is (or was, for a freed chunk) there.
    pub stack: u64,
    pub live: bool,
}

/// The chunks right under each arena's top that pin it (live blocks, and freed chunks a tcache
/// or a fastbin holds), with the allocation sites of their blocks. (The live model may be one
/// event ahead of the glibc model here — a free of the pin itself: its stack is then among the
/// freed addresses.)
fn pins(glibc: &GlibcModel, model: &LiveModel) -> Vec<PinAt> {
    use super::glibc::arena::State;
    let stack_of = |ptr: u64| model.live.get(&ptr).map(|b| b.stack).or_else(|| model.sites.freed_stack.get(&ptr).copied()).unwrap_or(0);
    glibc
        .arenas
        .iter()
        .filter_map(|a| a.top_neighbour().map(|t| (a, t)))
        .filter_map(|(a, (addr, c))| {
            let ptr = addr + 16;
            let arena = if a.is_main() { "main".to_string() } else { format!("{:#x}", a.id) };
            match c.state {
                State::InUse { req } => Some(PinAt { arena, address: ptr, size: req, stack: stack_of(ptr), live: true }),
                State::Tcache { .. } | State::Fast => {
                    Some(PinAt { arena, address: ptr, size: c.size, stack: model.sites.freed_stack.get(&ptr).copied().unwrap_or(0), live: false })
                }
                _ => None,
            }
        })
        .collect()
}

/// Fork snapshots kept for children that have not taken theirs yet. A child registers right
/// after its fork, so only a child that never registers (it exec'd or exited first) leaves one
/// behind; the bound keeps a trace with many forks (or a forged one) from holding a copy of the
/// heap per fork.
pub const MAX_FORK_SNAPSHOTS: usize = 64;

/// Drop the snapshots of the lowest fork sequence numbers (the oldest forks) beyond
/// [`MAX_FORK_SNAPSHOTS`]: a child that comes for one later starts from an empty heap, as one
/// whose parent is not in the trace does.
fn forget_oldest_snapshots<T>(snaps: &mut FxHashMap<u64, T>) {
    while snaps.len() > MAX_FORK_SNAPSHOTS {
        let Some(&oldest) = snaps.keys().min() else { return };
        snaps.remove(&oldest);
    }
}

enum Held {
    Chunk(Chunk),
    Sync(u64),
}

impl ImageAnalysis {
    pub fn new(ps: &ProcessStart, meta: ProcessMeta, relation: Relation) -> ImageAnalysis {
        let phase = match (ps.origin == Origin::Fork as u32, ps.parent_image) {
            (true, Some(parent)) => Phase::AwaitingSnapshot { parent, seq: ps.fork_seq },
            _ => Phase::Running,
        };
        let start_ns = if meta.start_monotonic_ns != 0 { meta.start_monotonic_ns } else { ps.time_ns };
        let mut model = LiveModel::default();
        model.heap_start = if meta.start_brk != 0 { meta.start_brk } else { meta.brk_at_init };
        model.sites.start_ns = start_ns;
        let glibc = GlibcModel::new(&meta, model.heap_start, start_ns);
        ImageAnalysis {
            id: ps.image,
            pid: ps.pid,
            ppid: ps.ppid,
            parent: ps.parent_image,
            relation,
            meta,
            start_ns,
            end: None,
            tracing_stopped: None,
            model,
            glibc,
            merger: Merger::new(),
            phase,
            held: Vec::new(),
            last_sync_ns: 0,
            samples: Samples { start_ns, ..Default::default() },
            rss_samples: 0,
            peak_rss_sample: 0,
            last_rss_sample: 0,
            fork_snapshots: FxHashMap::default(),
            inherited_bytes: 0,
            sizes: Default::default(),
        }
    }

    /// The parent image and fork sequence this image still waits for, if any.
    pub fn awaiting(&self) -> Option<(u32, u64)> {
        match self.phase {
            Phase::AwaitingSnapshot { parent, seq } => Some((parent, seq)),
            Phase::Running => None,
        }
    }

    /// Start from the parent's heap at the fork (or from nothing if it cannot be had).
    pub fn start_from(&mut self, snapshot: Option<(LiveModel, (GlibcModel, u32))>) {
        if let Some((mut s, g)) = snapshot {
            self.glibc = g.0.fork_child(g.1, self.start_ns);
            s.now_ns = self.start_ns;
            // Counters describe this image's own calls; the heap is inherited.
            let live = s.c.live_bytes;
            s.c = super::live::Counters {
                live_bytes: s.c.live_bytes,
                live_blocks: s.c.live_blocks,
                peak_live_bytes: s.c.live_bytes,
                peak_live_time_ns: self.start_ns,
                mmapped_bytes: s.c.mmapped_bytes,
                brk: s.c.brk,
                ..Default::default()
            };
            self.inherited_bytes = live;
            s.sites.start_child(self.start_ns);
            self.model = s;
        }
        self.phase = Phase::Running;
        for h in std::mem::take(&mut self.held) {
            match h {
                Held::Chunk(c) => self.merger.add_chunk(&c),
                Held::Sync(t) => self.sync(t),
            }
        }
        if let Some(e) = self.end.clone() {
            self.merger.end();
            let _ = e;
        }
        self.run();
    }

    pub fn add_chunk(&mut self, c: Chunk) {
        match self.phase {
            Phase::AwaitingSnapshot { .. } => self.held.push(Held::Chunk(c)),
            Phase::Running => self.merger.add_chunk(&c),
        }
    }

    pub fn sync(&mut self, time_ns: u64) {
        if let Phase::AwaitingSnapshot { .. } = self.phase {
            self.held.push(Held::Sync(time_ns));
            return;
        }
        self.last_sync_ns = self.last_sync_ns.max(time_ns);
        self.merger.sync(time_ns);
        self.run();
    }

    pub fn add_rss(&mut self, time_ns: u64, rss: u64) {
        self.samples.pending.push_back((time_ns, rss));
        self.rss_samples += 1;
        self.peak_rss_sample = self.peak_rss_sample.max(rss);
        self.last_rss_sample = rss;
    }

    pub fn add_smaps(&mut self, time_ns: u64, maps: Vec<crate::trace::Mapping>) {
        self.samples.pending_smaps.push_back((time_ns, maps));
    }

    pub fn set_tracing_stopped(&mut self, t: TracingStopped) {
        self.tracing_stopped = Some(t);
    }

    pub fn set_end(&mut self, e: ProcessEnd) {
        self.end = Some(e);
        if let Phase::Running = self.phase {
            self.merger.end();
            self.run();
        }
    }

    /// Apply what can be applied; take fork snapshots; emit timeline points.
    pub fn run(&mut self) {
        if let Phase::AwaitingSnapshot { .. } = self.phase {
            return;
        }
        let snaps = &mut self.fork_snapshots;
        let glibc = &mut self.glibc;
        let samples = &mut self.samples;
        let sizes = &mut self.sizes;
        self.merger.run(&mut self.model, &mut |p, stream, model| {
            // RSS samples taken before this event see the state before it (to one event).
            samples.emit_before(p.time_ns, model, glibc);
            if let Event::MallocTrim { .. } = p.ev {
                if glibc.enabled {
                    // What the call is about to change, in words.
                    let b = glibc.breakdown(p.time_ns);
                    samples.before_trims.push(super::glibc::explain::causes(glibc, model, &b, samples.start_ns));
                }
            }
            glibc.apply_part(&p.ev, p.part, p.time_ns, stream);
            match p.ev {
                Event::Alloc { ptr, size, .. } if ptr != 0 => sizes.record(size),
                Event::Realloc { new_ptr, size, .. } if new_ptr != 0 && p.part != super::glibc::Part::OldBlock => sizes.record(size),
                _ => {}
            }
            if let Event::Fork { seq, .. } = p.ev {
                snaps.insert(seq, (model.clone(), (glibc.clone(), stream)));
                forget_oldest_snapshots(snaps);
            }
        });
        self.emit_timeline();
    }

    /// Timeline points for RSS samples whose time the merged history has fully passed.
    fn emit_timeline(&mut self) {
        let bound = if self.merger.ended() {
            u64::MAX
        } else {
            let synced = self.last_sync_ns.saturating_sub(20_000_000);
            self.merger.min_queued_time().map_or(synced, |t| t.min(synced))
        };
        self.samples.emit_before(bound, &self.model, &self.glibc);
    }

    /// Stack and module definitions of this image (a fork child's include its parent's once the
    /// analysis is finished).
    pub fn stacks(&self) -> &super::stacks::StackTable {
        &self.merger.stacks
    }

    pub fn stacks_mut(&mut self) -> &mut super::stacks::StackTable {
        &mut self.merger.stacks
    }

    pub fn merge_stats(&self) -> MergeStats {
        self.merger.stats
    }

    pub fn threads(&self) -> usize {
        self.merger.stream_count()
    }

    /// Finish whatever is left (end of the trace).
    pub fn finish(&mut self) {
        if let Phase::AwaitingSnapshot { .. } = self.phase {
            self.start_from(None);
        }
        self.merger.end();
        self.run();
        if std::env::var_os("MTRACE_DEBUG_MERGE").is_some() && self.merger.queued() > 0 {
            self.merger.debug_dump();
        }
        self.glibc.finish();
    }
}
