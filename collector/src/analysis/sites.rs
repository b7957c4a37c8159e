//! Allocation sites: live bytes and blocks per stack id over time, kept by the live model as
//! blocks begin and end (one hash lookup per allocation and per free; frames are never looked at
//! here — symbolisation comes after the analysis, once per distinct address).
//!
//! What it answers, per stack id (0 = the allocation carried no stack):
//! * live bytes/blocks now (at the end: *leaked* — still live when the image ended);
//! * live bytes/blocks at the exact moment of the image's peak of live bytes (kept lazily: a
//!   site's value is copied aside only when it changes after a new peak);
//! * allocations, bytes allocated, allocations by size class;
//! * *temporary* allocations, defined like heaptrack's but per thread: a block freed (by `free`,
//!   or realloc to size 0) by the thread that allocated it, directly after its allocation — that
//!   thread made no other allocation and no other free in between (other threads may have).
//!   A realloc that moves a block is not a free of its data and never counts;
//! * the stack that last owned each freed address, so that free chunks glibc keeps (tcache,
//!   fastbins, bins) can be attributed to the site whose block they were.
//!
//! It also keeps two massif-like series of snapshots ([`Series`]): about 100 points evenly spaced
//! in time, and as many evenly spaced in bytes allocated (for runs shorter than the trace's time
//! resolution); the spacing doubles as the run goes on; every 10th point has the bytes per stack.

use rustc_hash::FxHashMap;

/// Upper bounds (inclusive) of the size classes of requested sizes; the last class is open.
pub const SIZE_CLASSES: [u64; 9] = [16, 64, 256, 1024, 4096, 16384, 65536, 131072, u64::MAX];

pub fn size_class(size: u64) -> usize {
    SIZE_CLASSES.iter().position(|&b| size <= b).unwrap_or(SIZE_CLASSES.len() - 1)
}

/// Counters of one stack id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteStats {
    pub live_bytes: u64,
    pub live_blocks: u64,
    /// Chunk overhead of the live blocks (chunk size − request; mmapped: mapping − request).
    pub live_overhead: u64,
    pub allocs: u64,
    pub allocated_bytes: u64,
    pub temporary: u64,
    pub temporary_bytes: u64,
    /// Allocations per [`SIZE_CLASSES`] entry.
    pub size_classes: [u64; SIZE_CLASSES.len()],
    /// The site's own highest live bytes.
    pub max_live_bytes: u64,
    snap_bytes: u64,
    snap_blocks: u64,
    snap_serial: u64,
}

/// Bytes and blocks of one site in a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteAmount {
    pub stack: u64,
    pub bytes: u64,
    pub blocks: u64,
}

/// One point of the snapshot series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapPoint {
    pub time_ns: u64,
    /// The series' clock at the point: ns since the start, or bytes allocated before it.
    pub clock: u64,
    /// The number of changes to the sites before it (orders it against the peak).
    pub serial: u64,
    pub live_bytes: u64,
    pub overhead: u64,
    /// Bytes per site (non-zero ones), for detailed points.
    pub detail: Option<Vec<SiteAmount>>,
}

/// Snapshots evenly spaced on a clock (time, or bytes allocated): slot `k` is taken at the first
/// change at or after clock `k·dt`, with the state before that change. When [`Series::MAX`]
/// points are held, every other one is dropped and `dt` doubles. Points whose slot is a multiple
/// of 10 are detailed.
#[derive(Clone, Debug)]
pub struct Series {
    /// Clock units per slot.
    pub dt: u64,
    pub points: Vec<(u64, SnapPoint)>,
    next_slot: u64,
}

impl Series {
    pub const MAX: usize = 100;
    pub const DETAIL_EVERY: u64 = 10;
    /// First spacing of the time series (ns) and of the bytes series (B).
    pub const FIRST_DT_NS: u64 = 100_000;
    pub const FIRST_DT_BYTES: u64 = 1024;

    pub fn new(dt: u64) -> Series {
        Series { dt, points: Vec::new(), next_slot: 0 }
    }

    /// Is a point due at `clock`?
    fn due(&self, clock: u64) -> bool {
        clock >= self.next_slot.saturating_mul(self.dt)
    }

    fn push(&mut self, clock: u64, mut p: SnapPoint, detail: impl FnOnce() -> Vec<SiteAmount>) {
        let slot = clock / self.dt.max(1);
        p.clock = clock;
        p.detail = (slot % Series::DETAIL_EVERY == 0).then(detail);
        self.points.push((slot, p));
        self.next_slot = slot.saturating_add(1);
        if self.points.len() >= Series::MAX {
            self.points.retain(|(k, _)| k % 2 == 0);
            for (k, p) in &mut self.points {
                *k /= 2;
                if *k % Series::DETAIL_EVERY != 0 {
                    p.detail = None;
                }
            }
            // (Saturating: a clock near 2^64 — bytes allocated by a damaged trace — must not
            // wrap the spacing to 0.)
            self.dt = self.dt.saturating_mul(2);
            self.next_slot = self.next_slot.div_ceil(2);
        }
    }
}

impl Default for Series {
    fn default() -> Self {
        Series::new(Series::FIRST_DT_NS)
    }
}

/// Per-stack aggregation of one image (part of the live model).
#[derive(Clone, Debug)]
pub struct Sites {
    pub by_stack: FxHashMap<u64, SiteStats>,
    /// Allocations that carried a stack id.
    pub with_stack: u64,
    pub live_overhead: u64,
    /// Overhead and serial at the latest peak of live bytes.
    pub peak_overhead: u64,
    peak_serial: u64,
    serial: u64,
    /// Allocations per stream so far, and whether the stream's last call since was that
    /// allocation (no free after it): for temporaries.
    allocs_per_stream: FxHashMap<u32, (u64, bool)>,
    /// Stack id of the block that last lived at each freed address (removed when reused).
    pub freed_stack: FxHashMap<u64, u64>,
    /// Evenly spaced in time (ns since `start_ns`).
    pub series: Series,
    /// Evenly spaced in bytes allocated.
    pub series_bytes: Series,
    /// Bytes allocated so far (requested), and when the latest peak was reached.
    pub allocated: u64,
    pub peak_allocated: u64,
    pub start_ns: u64,
}

impl Default for Sites {
    fn default() -> Self {
        Sites {
            by_stack: FxHashMap::default(),
            with_stack: 0,
            live_overhead: 0,
            peak_overhead: 0,
            peak_serial: 0,
            serial: 0,
            allocs_per_stream: FxHashMap::default(),
            freed_stack: FxHashMap::default(),
            series: Series::new(Series::FIRST_DT_NS),
            series_bytes: Series::new(Series::FIRST_DT_BYTES),
            allocated: 0,
            peak_allocated: 0,
            start_ns: 0,
        }
    }
}

/// What the sites model needs to know of a block (see `live::Block`).
#[derive(Clone, Copy, Debug)]
pub struct BlockInfo {
    pub stack: u64,
    pub size: u64,
    pub overhead: u64,
    pub stream: u32,
    /// The stream's allocation count right after this block's allocation.
    pub nth: u64,
}

impl Sites {
    /// Bring `st`'s value at the latest peak aside before it changes.
    fn touch(serial: u64, peak_serial: u64, st: &mut SiteStats) {
        let _ = serial;
        if st.snap_serial != peak_serial {
            st.snap_bytes = st.live_bytes;
            st.snap_blocks = st.live_blocks;
            st.snap_serial = peak_serial;
        }
    }

    /// A block begins. Returns the stream's allocation count (stored in the block).
    pub fn on_alloc(&mut self, ptr: u64, stack: u64, size: u64, overhead: u64, stream: u32, time_ns: u64, live_bytes_before: u64) -> u64 {
        self.sample(time_ns, live_bytes_before);
        self.serial += 1;
        if stack != 0 {
            self.with_stack += 1;
        }
        self.freed_stack.remove(&ptr);
        let nth = {
            let n = self.allocs_per_stream.entry(stream).or_insert((0, false));
            n.0 += 1;
            n.1 = true;
            n.0
        };
        let st = self.by_stack.entry(stack).or_default();
        Self::touch(self.serial, self.peak_serial, st);
        st.live_bytes = st.live_bytes.saturating_add(size);
        st.live_blocks += 1;
        st.live_overhead = st.live_overhead.saturating_add(overhead);
        st.allocs += 1;
        st.allocated_bytes = st.allocated_bytes.saturating_add(size);
        st.size_classes[size_class(size)] += 1;
        st.max_live_bytes = st.max_live_bytes.max(st.live_bytes);
        self.live_overhead = self.live_overhead.saturating_add(overhead);
        self.allocated = self.allocated.saturating_add(size);
        nth
    }

    /// A block ends; `freed`: by a free (or realloc to 0) on `stream`, not by a moving realloc.
    pub fn on_free(&mut self, ptr: u64, b: BlockInfo, freed_by: Option<u32>, time_ns: u64, live_bytes_before: u64) {
        self.sample(time_ns, live_bytes_before);
        self.serial += 1;
        let temporary = freed_by == Some(b.stream) && self.allocs_per_stream.get(&b.stream) == Some(&(b.nth, true));
        if let Some(s) = freed_by.and_then(|s| self.allocs_per_stream.get_mut(&s)) {
            s.1 = false;
        }
        let st = self.by_stack.entry(b.stack).or_default();
        Self::touch(self.serial, self.peak_serial, st);
        st.live_bytes = st.live_bytes.saturating_sub(b.size);
        st.live_blocks = st.live_blocks.saturating_sub(1);
        st.live_overhead = st.live_overhead.saturating_sub(b.overhead);
        if temporary {
            st.temporary += 1;
            st.temporary_bytes = st.temporary_bytes.saturating_add(b.size);
        }
        self.live_overhead = self.live_overhead.saturating_sub(b.overhead);
        self.freed_stack.insert(ptr, b.stack);
    }

    /// The live model reached a new peak of live bytes with the last change.
    pub fn on_peak(&mut self) {
        self.peak_serial = self.serial;
        self.peak_allocated = self.allocated;
        self.peak_overhead = self.live_overhead;
    }

    /// The number of changes up to and including the one that reached the latest peak.
    pub fn peak_serial(&self) -> u64 {
        self.peak_serial
    }

    /// Bytes and blocks per site at the latest peak (non-zero ones).
    pub fn at_peak(&self) -> Vec<SiteAmount> {
        self.by_stack
            .iter()
            .map(|(&stack, st)| {
                let (bytes, blocks) = if st.snap_serial == self.peak_serial { (st.snap_bytes, st.snap_blocks) } else { (st.live_bytes, st.live_blocks) };
                SiteAmount { stack, bytes, blocks }
            })
            .filter(|a| a.blocks > 0 || a.bytes > 0)
            .collect()
    }

    /// Bytes and blocks per site now (non-zero ones).
    pub fn live_now(&self) -> Vec<SiteAmount> {
        self.by_stack
            .iter()
            .filter(|(_, st)| st.live_blocks > 0)
            .map(|(&stack, st)| SiteAmount { stack, bytes: st.live_bytes, blocks: st.live_blocks })
            .collect()
    }

    /// A fork child: the inherited heap stays, the counts of calls start afresh, and the peak is
    /// the inherited state.
    pub fn start_child(&mut self, start_ns: u64) {
        for st in self.by_stack.values_mut() {
            let (b, n, o) = (st.live_bytes, st.live_blocks, st.live_overhead);
            *st = SiteStats { live_bytes: b, live_blocks: n, live_overhead: o, max_live_bytes: b, ..Default::default() };
        }
        self.by_stack.retain(|_, st| st.live_blocks > 0);
        self.with_stack = 0;
        self.allocs_per_stream.clear();
        self.serial += 1;
        self.peak_serial = self.serial;
        self.peak_overhead = self.live_overhead;
        self.series = Series::default();
        self.series_bytes = Series::new(Series::FIRST_DT_BYTES);
        self.allocated = 0;
        self.peak_allocated = 0;
        self.start_ns = start_ns;
    }

    /// Take the series' points due at `time_ns` (and at the bytes allocated so far), with the
    /// state before the change.
    fn sample(&mut self, time_ns: u64, live_bytes: u64) {
        let t = time_ns.saturating_sub(self.start_ns);
        let point = SnapPoint { time_ns, clock: 0, serial: self.serial, live_bytes, overhead: self.live_overhead, detail: None };
        if self.series.due(t) {
            let by_stack = &self.by_stack;
            self.series.push(t, point.clone(), || live_sorted(by_stack));
        }
        if self.series_bytes.due(self.allocated) {
            let by_stack = &self.by_stack;
            self.series_bytes.push(self.allocated, point, || live_sorted(by_stack));
        }
    }

}

/// Bytes and blocks per site live now, by stack id.
fn live_sorted(by_stack: &FxHashMap<u64, SiteStats>) -> Vec<SiteAmount> {
    let mut v: Vec<SiteAmount> = by_stack.iter().filter(|(_, st)| st.live_blocks > 0).map(|(&stack, st)| SiteAmount { stack, bytes: st.live_bytes, blocks: st.live_blocks }).collect();
    v.sort_unstable_by_key(|a| a.stack);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes() {
        assert_eq!(size_class(0), 0);
        assert_eq!(size_class(16), 0);
        assert_eq!(size_class(17), 1);
        assert_eq!(size_class(200_000), SIZE_CLASSES.len() - 1);
    }

    use crate::analysis::live::LiveModel;
    use mtrace_protocol::event::{Event, EventKind};

    fn alloc(ptr: u64, size: u64, stack: u64) -> Event {
        // A heap chunk: 16-byte granularity, header included.
        let chunk = mtrace_protocol::event::chunk::request2size(size) | 1;
        Event::Alloc { kind: EventKind::Malloc, ptr, size, align: 0, chunk, prev_size: 0, stack, after: None }
    }
    fn free(ptr: u64) -> Event {
        Event::Free { kind: EventKind::Free, ptr, chunk: 0, after: None }
    }
    fn realloc(old_ptr: u64, new_ptr: u64, size: u64, stack: u64) -> Event {
        Event::Realloc { kind: EventKind::Realloc, old_ptr, new_ptr, size, old_chunk: 0, chunk: 0, prev_size: 0, stack, after_old: None, after: None }
    }
    fn amounts(v: Vec<SiteAmount>) -> Vec<(u64, u64, u64)> {
        let mut v: Vec<_> = v.into_iter().map(|a| (a.stack, a.bytes, a.blocks)).collect();
        v.sort();
        v
    }

    #[test]
    fn peak_leaked_and_temporaries_are_exact() {
        let mut m = LiveModel::default();
        let evs = [
            (alloc(0x10, 100, 1), 1),  // temporary: freed right after on stream 1
            (free(0x10), 1),
            (alloc(0x20, 50, 2), 1),
            (alloc(0x30, 70, 2), 2),   // other thread
            (free(0x20), 2),           // freed by another thread: not temporary
            (alloc(0x40, 1000, 3), 1),
            (alloc(0x50, 500, 4), 1),  // peak: 70 + 1000 + 500 = 1570
            (free(0x40), 1),           // not temporary: 0x50 came after it
            (alloc(0x60, 8, 5), 1),
            (alloc(0x70, 9, 5), 1),
            (free(0x60), 1),           // not temporary: 0x70 came after
            (free(0x70), 1),           // not temporary: a free came in between
            (realloc(0x50, 0x80, 600, 6), 1), // moved: the old block is not a temporary
            (alloc(0x90, 16, 0), 1),   // no stack
        ];
        for (i, (ev, stream)) in evs.iter().enumerate() {
            m.apply(ev, 1_000 * i as u64, *stream);
        }
        assert_eq!(m.c.peak_live_bytes, 1570);
        assert_eq!(amounts(m.sites.at_peak()), vec![(2, 70, 1), (3, 1000, 1), (4, 500, 1)]);
        assert_eq!(amounts(m.sites.live_now()), vec![(0, 16, 1), (2, 70, 1), (6, 600, 1)]);
        let temp: Vec<(u64, u64, u64)> = {
            let mut v: Vec<_> = m.sites.by_stack.iter().filter(|(_, s)| s.temporary > 0).map(|(&k, s)| (k, s.temporary, s.temporary_bytes)).collect();
            v.sort();
            v
        };
        assert_eq!(temp, vec![(1, 1, 100)]);
        assert_eq!(m.sites.with_stack, 8);
        let s2 = &m.sites.by_stack[&2];
        assert_eq!((s2.allocs, s2.allocated_bytes, s2.max_live_bytes), (2, 120, 120));
        // Chunk overhead: request2size(70) = 80 → 10 B for the block of stack 2 still live.
        assert_eq!(s2.live_overhead, 10);
        // request2size(1000) = 1008, request2size(500) = 512.
        assert_eq!(m.sites.peak_overhead, 10 + 8 + 12);
        // Freed addresses remember their last site.
        assert_eq!(m.sites.freed_stack.get(&0x40), Some(&3));
        assert_eq!(m.sites.freed_stack.get(&0x50), Some(&4));
        assert_eq!(m.sites.freed_stack.get(&0x80), None);
    }

    #[test]
    fn a_later_higher_peak_replaces_the_earlier_one_lazily() {
        let mut m = LiveModel::default();
        let evs = [alloc(0x10, 100, 1), alloc(0x20, 100, 2), free(0x10), free(0x20), alloc(0x30, 150, 1), alloc(0x40, 100, 3), free(0x30)];
        for (i, ev) in evs.iter().enumerate() {
            m.apply(ev, i as u64, 1);
        }
        assert_eq!(m.c.peak_live_bytes, 250);
        assert_eq!(amounts(m.sites.at_peak()), vec![(1, 150, 1), (3, 100, 1)]);
        assert_eq!(amounts(m.sites.live_now()), vec![(3, 100, 1)]);
    }

    #[test]
    fn series_thins_and_keeps_details_every_tenth() {
        let mut s = Sites::default();
        let mut live = 0;
        for i in 0..10_000u64 {
            let n = s.on_alloc(i * 16 + 0x1000, 1 + i % 3, 16, 8, 1, i * 50_000, live);
            let _ = n;
            live += 16;
        }
        let pts = &s.series.points;
        assert!(pts.len() >= Series::MAX / 2 && pts.len() < Series::MAX, "{}", pts.len());
        for (k, p) in pts {
            assert_eq!(p.detail.is_some(), k % 10 == 0, "slot {k}");
        }
        // Times increase and bytes follow the history (16 B per 50 µs).
        for w in pts.windows(2) {
            assert!(w[0].1.time_ns < w[1].1.time_ns);
            assert!(w[0].1.live_bytes <= w[1].1.live_bytes);
        }
        let last = &pts.last().unwrap().1;
        assert_eq!(last.live_bytes, last.time_ns / 50_000 * 16);
        // The bytes series: 160,000 B allocated, points every dt bytes, the clock the bytes
        // allocated before the point (here: its live bytes).
        let b = &s.series_bytes;
        assert!(b.points.len() >= Series::MAX / 2 && b.points.len() < Series::MAX, "{}", b.points.len());
        for (k, p) in &b.points {
            assert_eq!(p.clock, p.live_bytes);
            assert_eq!(p.clock / b.dt, *k);
            assert_eq!(p.detail.is_some(), k % 10 == 0);
        }
    }
}
