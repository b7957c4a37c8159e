//! OS-held bytes by category (per arena and in total), and the model's estimate of what is
//! resident. Computed from the model's running totals: cheap enough for every timeline point.
//!
//! Categories partition what the process holds from the OS for its heap:
//! * `live`: requested bytes of live blocks (heap and mmapped);
//! * `overhead`: the rest of in-use heap chunks (headers, rounding to 16 B);
//! * `tcache`, `fastbins`, `bins`: freed chunks in threads' caches, in fastbins, free in the bins
//!   (whatever pages of them were not released);
//! * `top`: each arena's top chunk;
//! * `released`: pages inside free chunks returned with `MADV_DONTNEED` (`malloc_trim`): still
//!   part of the heap (and of `mallinfo2().arena`), no longer resident;
//! * `metadata`: glibc's own: heap and arena headers, tcache structs, fenceposts, and chunks the
//!   trace never showed being allocated;
//! * `mmapped_rounding`: page rounding and headers of mmapped chunks.

use super::arena::Arena;
use super::GlibcModel;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Categories {
    pub live: u64,
    pub overhead: u64,
    pub tcache: u64,
    pub fastbins: u64,
    pub bins: u64,
    pub top: u64,
    pub released: u64,
    pub metadata: u64,
    pub mmapped_rounding: u64,
}

impl Categories {
    pub fn sum(&self) -> u64 {
        self.pairs().iter().map(|(_, v)| v).sum()
    }

    pub fn pairs(&self) -> [(&'static str, u64); 9] {
        [
            ("live", self.live),
            ("overhead", self.overhead),
            ("tcache", self.tcache),
            ("fastbins", self.fastbins),
            ("bins", self.bins),
            ("top", self.top),
            ("released", self.released),
            ("metadata", self.metadata),
            ("mmapped_rounding", self.mmapped_rounding),
        ]
    }

    fn add(&mut self, o: &Categories) {
        self.live += o.live;
        self.overhead += o.overhead;
        self.tcache += o.tcache;
        self.fastbins += o.fastbins;
        self.bins += o.bins;
        self.top += o.top;
        self.released += o.released;
        self.metadata += o.metadata;
        self.mmapped_rounding += o.mmapped_rounding;
    }

    fn of_arena(a: &Arena) -> Categories {
        let t = &a.t;
        Categories {
            live: t.live_req,
            overhead: t.inuse - t.live_req.min(t.inuse),
            tcache: t.tcache,
            fastbins: t.fast,
            bins: t.free - t.released.min(t.free),
            top: a.top_size(),
            released: t.released,
            metadata: t.meta + a.header_meta,
            mmapped_rounding: 0,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ArenaView {
    /// "main", or the address of the arena's `malloc_state`.
    pub id: String,
    pub main: bool,
    pub heaps: usize,
    pub os_held_bytes: u64,
    pub live_bytes: u64,
    /// Free bytes: tcache + fastbins + bins + top (released pages included).
    pub free_bytes: u64,
    pub top_bytes: u64,
    /// The part of the top above the trim threshold: what a trim would cut (glibc trims only
    /// after a free that merges 64 KiB or more, or on `malloc_trim`).
    pub top_above_trim_threshold_bytes: u64,
    /// Threads bound to the arena (that allocated from it last).
    pub threads: usize,
    pub thread_ids: Vec<u32>,
    pub categories: Categories,
    /// Heap bytes never touched (the top's tail after growth): held, not resident.
    pub untouched_bytes: u64,
    pub resident_estimate_bytes: u64,
    /// OS-held bytes minus the categories: non-zero means the model lost track.
    pub unexplained_bytes: i64,
    pub conflicts: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Breakdown {
    #[serde(skip)]
    pub time_ns: u64,
    pub t_s: f64,
    /// Heap bytes held (brk heap + thread-arena heaps) plus mmapped chunk mappings.
    pub os_held_bytes: u64,
    pub heap_held_bytes: u64,
    pub mmapped_bytes: u64,
    pub live_bytes: u64,
    pub categories: Categories,
    pub percent: std::collections::BTreeMap<&'static str, f64>,
    pub arenas: Vec<ArenaView>,
    /// Heap bytes the model expects to be resident (held − released − never touched).
    pub heap_resident_estimate_bytes: u64,
}

impl GlibcModel {
    /// Categories summed over arenas and mmapped chunks (cheap).
    pub fn categories(&self) -> Categories {
        let mut c = Categories::default();
        for a in &self.arenas {
            c.add(&Categories::of_arena(a));
        }
        c.live += self.mmapped_req;
        c.mmapped_rounding = self.mmapped_bytes - self.mmapped_req.min(self.mmapped_bytes);
        c
    }

    pub fn heap_held(&self) -> u64 {
        self.arenas.iter().map(|a| a.held()).sum()
    }

    pub fn breakdown(&self, time_ns: u64) -> Breakdown {
        let mut arenas = Vec::new();
        let mut resident = 0;
        for a in &self.arenas {
            if a.is_main() && a.held() == 0 && a.chunks.is_empty() {
                continue;
            }
            let c = Categories::of_arena(a);
            let held = a.held();
            let untouched = a.untouched();
            let res = held.saturating_sub(c.released + untouched);
            resident += res;
            let tids: Vec<u32> = a.threads.iter().map(|s| self.tids.get(s).copied().unwrap_or(*s)).collect();
            arenas.push(ArenaView {
                id: if a.is_main() { "main".into() } else { format!("{:#x}", a.id) },
                main: a.is_main(),
                heaps: a.heaps.len(),
                os_held_bytes: held,
                live_bytes: c.live,
                free_bytes: c.tcache + c.fastbins + c.bins + c.released + c.top,
                top_bytes: c.top,
                top_above_trim_threshold_bytes: c.top.saturating_sub(self.params.trim_threshold),
                threads: tids.len(),
                thread_ids: tids,
                categories: c,
                untouched_bytes: untouched,
                resident_estimate_bytes: res,
                unexplained_bytes: (held as i128 - c.sum() as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                conflicts: a.conflicts,
            });
        }
        let categories = self.categories();
        let heap_held = self.heap_held();
        let os_held = heap_held + self.mmapped_bytes;
        let percent = categories
            .pairs()
            .iter()
            .map(|&(k, v)| (k, if os_held == 0 { 0.0 } else { (v as f64 * 1000.0 / os_held as f64).round() / 10.0 }))
            .collect();
        Breakdown {
            time_ns,
            t_s: time_ns.saturating_sub(self.start_ns) as f64 / 1e9,
            os_held_bytes: os_held,
            heap_held_bytes: heap_held,
            mmapped_bytes: self.mmapped_bytes,
            live_bytes: categories.live,
            categories,
            percent,
            arenas,
            heap_resident_estimate_bytes: resident,
        }
    }
}

/// Resident bytes from one `/proc/<pid>/smaps` sample, by what the mappings hold, next to the
/// model's estimate for the heap at the same point of the history.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Resident {
    #[serde(skip)]
    pub time_ns: u64,
    pub t_s: f64,
    /// `[heap]`.
    pub brk_heap: u64,
    /// Thread-arena heaps.
    pub arena_heaps: u64,
    /// Mappings of mmapped chunks.
    pub mmapped_chunks: u64,
    /// The application's own anonymous mmaps.
    pub app_mmaps: u64,
    /// Everything else: stacks, libraries, files, mappings of unknown origin.
    pub other: u64,
    /// `brk_heap + arena_heaps`, measured.
    pub heap_measured: u64,
    /// The model's estimate of the same: heap held − released − never touched.
    pub heap_model: u64,
    /// The categories' sum for the heap (what is held, resident or not).
    pub heap_held: u64,
}

impl GlibcModel {
    /// Classify the mappings of an smaps sample taken at `time_ns`.
    pub fn classify(&self, time_ns: u64, maps: &[crate::trace::Mapping]) -> Resident {
        use crate::trace::MapKind;
        let mut mm: Vec<(u64, u64)> = self.mmapped.values().map(|m| (m.start, m.start + m.len)).collect();
        mm.sort_unstable();
        let overlap = |ranges: &mut dyn Iterator<Item = (u64, u64)>, lo: u64, hi: u64| -> u64 {
            ranges.map(|(s, e)| e.min(hi).saturating_sub(s.max(lo))).sum()
        };
        let heaps: Vec<(u64, u64)> =
            self.arenas.iter().filter(|a| !a.is_main()).flat_map(|a| a.heaps.iter().map(|h| (h.base, h.base + super::params::HEAP_MAX_SIZE))).collect();
        let mut r = Resident {
            time_ns,
            t_s: time_ns.saturating_sub(self.start_ns) as f64 / 1e9,
            brk_heap: 0,
            arena_heaps: 0,
            mmapped_chunks: 0,
            app_mmaps: 0,
            other: 0,
            heap_measured: 0,
            heap_model: 0,
            heap_held: self.heap_held(),
        };
        for m in maps {
            let len = m.end.saturating_sub(m.start).max(1);
            match m.kind {
                MapKind::Heap => r.brk_heap += m.rss,
                MapKind::Anon => {
                    if heaps.iter().any(|&(s, e)| m.start >= s && m.start < e) {
                        r.arena_heaps += m.rss;
                        continue;
                    }
                    // Adjacent anonymous mappings merge into one: share the resident bytes out
                    // by overlap.
                    let i = mm.partition_point(|&(_, e)| e <= m.start);
                    let in_mm = overlap(&mut mm[i..].iter().copied().take_while(|&(s, _)| s < m.end), m.start, m.end);
                    let in_app = overlap(&mut self.app_maps.range(..m.end).rev().map(|(&s, &l)| (s, s + l)).take_while(|&(_, e)| e > m.start), m.start, m.end);
                    let a = (m.rss as u128 * in_mm.min(len) as u128 / len as u128) as u64;
                    let b = (m.rss as u128 * in_app.min(len - in_mm.min(len)) as u128 / len as u128) as u64;
                    r.mmapped_chunks += a;
                    r.app_mmaps += b;
                    r.other += m.rss - a - b;
                }
                _ => r.other += m.rss,
            }
        }
        r.heap_measured = r.brk_heap + r.arena_heaps;
        r.heap_model = self.arenas.iter().map(|a| a.held().saturating_sub(a.t.released + a.untouched())).sum();
        r
    }
}
