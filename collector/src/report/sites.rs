//! The allocation-site sections of the report: top sites at the peak of live bytes, sites
//! leaking at exit, temporary allocations, and freed memory glibc still holds, by site.
//!
//! Built from the analysis' per-stack aggregation (`analysis::sites`) and the image's stack
//! table, symbolised here once per distinct address. A site is named (`function`, `file`,
//! `line`) by its first frame outside the allocator's plumbing and the language's library (see
//! [`plumbing`]: operator new, `std::vector`, Rust's `alloc::`, libc, the loader, …), so that
//! `strdup`, `new` or `vec!` name their caller.
//!
//! A site is what the user sees: the naming frame and every caller beyond it ([`shown_frames`]),
//! each as its symbolised function, file, line and module (an unresolved frame's function is
//! `module+0xoffset`). Stack ids whose shown frames are identical — stacks that differ only in
//! the hidden plumbing frames inside them (malloc vs calloc, two paths through libc or
//! `alloc::`), or only in return addresses that symbolise to the same lines — are one site:
//! its numbers are summed over them, `stack_ids` lists them, `stack_id` is the one with the most
//! bytes in that list and `frames` are its frames (every frame, the library's included).
//!
//! [`SiteView`] is the plain structure other views (the dashboard) can use.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::analysis::glibc::arena::State;
use crate::analysis::image::ImageAnalysis;
use crate::analysis::sites::{SiteAmount, SIZE_CLASSES};
use crate::symbols::{Frame, Symbols};

/// At most this many entries per list.
pub const MAX_SITES: usize = 50;

/// One allocation site with its numbers in some list.
#[derive(Clone, Debug, Serialize)]
pub struct SiteView {
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Bytes of this list (live at the peak, leaked, temporary, retained).
    pub bytes: u64,
    pub blocks: u64,
    /// The stack id in the trace, in hex (ids are 64-bit hashes: too wide for JSON numbers in
    /// most readers); "0x0": allocations without a stack. Of the site's stack ids, the one with
    /// the most bytes in this list (then the most blocks, then the lowest id): `frames` are its.
    #[serde(serialize_with = "hex")]
    pub stack_id: u64,
    /// Every stack id shown as this site (identical frames from the naming one outward), in
    /// hex, ascending; `stack_id` is one of them.
    #[serde(serialize_with = "hex_list")]
    pub stack_ids: Vec<u64>,
    /// Allocations made at this site over the whole run, and their bytes.
    pub allocations: u64,
    pub allocated_bytes: u64,
    /// Temporary allocations of this site (see `analysis::sites`).
    pub temporary: u64,
    /// Allocations by requested size, non-empty classes only: `"≤16"`, …, `">128K"`.
    pub size_classes: BTreeMap<String, u64>,
    pub frames: Vec<Frame>,
}

fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

fn hex_list<S: serde::Serializer>(v: &[u64], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|v| format!("{v:#x}")))
}

/// Bytes one site has in glibc's free lists.
#[derive(Clone, Debug, Serialize)]
pub struct RetainedSite {
    #[serde(flatten)]
    pub site: SiteView,
    pub tcache: u64,
    pub fastbins: u64,
    pub bins: u64,
}

/// The block right under a heap top: live, or freed and held in a tcache or fastbin.
#[derive(Clone, Debug, Serialize)]
pub struct Pin {
    pub arena: String,
    pub address: u64,
    /// Requested bytes of a live block; chunk size of a freed one.
    pub size: u64,
    pub live: bool,
    pub site: Option<SiteView>,
}

/// Freed memory that glibc holds at the end, by the site whose block it was.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RetentionBySite {
    /// Sites by bytes of their freed chunks still in tcaches, fastbins and bins (a chunk in the
    /// bins that merged with neighbours counts for the site of its lowest block).
    pub sites: Vec<RetainedSite>,
    /// Live blocks that pin a heap top at the end (a heap can only shrink from the top).
    pub top_pinned_by: Vec<Pin>,
    /// The same at the peak of RSS (the sample the retention section's `at_peak_rss` describes).
    pub top_pinned_at_peak_rss: Vec<Pin>,
}

/// Per top function (the site's `function`), bytes live at the peak.
#[derive(Clone, Debug, Serialize)]
pub struct FunctionView {
    pub function: String,
    pub bytes: u64,
    pub blocks: u64,
    /// Sites (as listed, not stack ids) of this function live at the peak.
    pub sites: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SitesReport {
    /// The trace carries allocation stacks (false: every list below is empty for that reason).
    pub stacks: bool,
    /// Why there are no sites, when `stacks` is false.
    pub stacks_note: Option<String>,
    /// Allocations that carried a stack id.
    pub allocations_with_stack: u64,
    pub top_sites_at_peak: Vec<SiteView>,
    pub top_functions_at_peak: Vec<FunctionView>,
    /// Sites of the blocks still live when the image ended.
    pub leaked_sites: Vec<SiteView>,
    pub temporary_sites: Vec<SiteView>,
    pub retention_by_site: Option<RetentionBySite>,
    /// `symbols missing: PATH (reason)` per module that could not be symbolised.
    pub symbols_missing: Vec<String>,
}

/// Is this frame the allocator's plumbing or the language's library rather than the program's
/// code? Allocation shims by name; C++ and Rust standard library code by the source file it
/// comes from (`/usr/include/c++/…`, `/rustc/…`) or its namespace; libc, the dynamic loader,
/// libstdc++, libgcc and the preload by module.
pub fn plumbing(f: &Frame) -> bool {
    const PREFIXES: [&str; 13] = [
        "operator new",
        "__rust_alloc",
        "__rust_realloc",
        "__rdl_",
        "__rg_",
        "alloc::",
        "<alloc::",
        "core::",
        "<core::",
        "std::",
        "<std::",
        "__gnu_cxx::",
        "__cxa_",
    ];
    const FILES: [&str; 2] = ["/usr/include/c++/", "/rustc/"];
    const MODULES: [&str; 6] = ["libc.so", "libc-", "libstdc++", "libgcc_s", "libmtrace", "ld-linux"];
    let m = crate::symbols::base_name(&f.module);
    PREFIXES.iter().any(|p| f.function.starts_with(p))
        || f.file.as_deref().is_some_and(|file| FILES.iter().any(|p| file.starts_with(p)))
        || MODULES.iter().any(|p| m.starts_with(p))
}

/// The index of the frame that names a site: the first outside the plumbing (the innermost
/// frame when all are).
pub fn site_index(frames: &[Frame]) -> usize {
    frames.iter().position(|f| !plumbing(f)).unwrap_or(0)
}

/// The frame that names a site.
pub fn site_frame(frames: &[Frame]) -> Option<&Frame> {
    frames.get(site_index(frames))
}

/// The frames a site shows: the naming frame and its callers.
pub fn shown_frames(frames: &[Frame]) -> &[Frame] {
    frames.get(site_index(frames)..).unwrap_or_default()
}

/// A shown frame as it identifies a site: function (`module+0xoffset` when unresolved), file,
/// line, module.
type ShownKey = Vec<(String, Option<String>, Option<u32>, String)>;

fn shown_key(frames: &[Frame]) -> ShownKey {
    shown_frames(frames).iter().map(|f| (f.function.clone(), f.file.clone(), f.line, f.module.clone())).collect()
}

/// One entry of a list: a site with its amounts summed over its stack ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub site: usize,
    /// Its stack id with the most bytes here (then blocks, then the lowest id).
    pub stack: u64,
    pub bytes: u64,
    pub blocks: u64,
    /// Per-list parts (retention: tcache, fastbins, bins), summed too.
    pub parts: [u64; 3],
}

fn class_label(i: usize) -> String {
    let lo = if i == 0 { 0 } else { SIZE_CLASSES[i - 1] + 1 };
    let hi = SIZE_CLASSES[i];
    let k = |n: u64| if n >= 1024 && n % 1024 == 0 { format!("{}K", n / 1024) } else { n.to_string() };
    if hi == u64::MAX { format!(">{}", k(lo - 1)) } else { format!("{}-{}", k(lo), k(hi)) }
}

/// Builds [`SiteView`]s for one image (symbolising each address once), grouping stack ids into
/// sites by their shown frames.
pub struct SiteNamer<'a> {
    img: &'a ImageAnalysis,
    pub symbols: Symbols<'a>,
    sites: FxHashMap<ShownKey, usize>,
    site_of: FxHashMap<u64, usize>,
    /// Stack ids per site, ascending once [`SiteNamer::index`] has seen them all.
    members: Vec<Vec<u64>>,
}

impl<'a> SiteNamer<'a> {
    pub fn new(img: &'a ImageAnalysis) -> SiteNamer<'a> {
        SiteNamer::with(img, Symbols::new(img.stacks()))
    }

    /// With a symbolizer shared between images.
    pub fn shared(img: &'a ImageAnalysis, symbolizer: std::rc::Rc<blazesym::symbolize::Symbolizer>) -> SiteNamer<'a> {
        SiteNamer::with(img, Symbols::shared(img.stacks(), symbolizer))
    }

    fn with(img: &'a ImageAnalysis, symbols: Symbols<'a>) -> SiteNamer<'a> {
        SiteNamer { img, symbols, sites: FxHashMap::default(), site_of: FxHashMap::default(), members: Vec::new() }
    }

    /// The site of a stack id (symbolising it if needed).
    pub fn site(&mut self, stack: u64) -> usize {
        if let Some(&i) = self.site_of.get(&stack) {
            return i;
        }
        let key = shown_key(&self.frames(stack));
        let n = self.sites.len();
        let i = *self.sites.entry(key).or_insert(n);
        if i == n {
            self.members.push(Vec::new());
        }
        self.members[i].push(stack);
        self.site_of.insert(stack, i);
        i
    }

    /// Symbolise these stack ids (one batch per module) and give each its site; with every
    /// stack id the image allocated from, so that a site's counters cover all its stacks.
    pub fn index(&mut self, ids: impl IntoIterator<Item = u64>) {
        let mut ids: Vec<u64> = ids.into_iter().chain(self.img.model.sites.by_stack.keys().copied()).collect();
        ids.sort_unstable();
        ids.dedup();
        self.symbols.prepare(ids.iter().copied());
        for id in ids {
            self.site(id);
        }
        for m in &mut self.members {
            m.sort_unstable();
        }
    }

    /// Group per-stack amounts into sites: summed, largest first (bytes, blocks, then the
    /// representative stack id), at most `n`.
    pub fn group(&mut self, v: impl IntoIterator<Item = (SiteAmount, [u64; 3])>, n: usize) -> Vec<Entry> {
        let mut per: FxHashMap<usize, (Entry, (u64, u64))> = FxHashMap::default();
        for (a, parts) in v {
            let site = self.site(a.stack);
            let e = per.entry(site).or_insert((Entry { site, stack: a.stack, bytes: 0, blocks: 0, parts: [0; 3] }, (a.bytes, a.blocks)));
            // The representative: most bytes, then most blocks, then the lowest id.
            let best = &mut e.1;
            if (a.bytes, a.blocks, std::cmp::Reverse(a.stack)) > (best.0, best.1, std::cmp::Reverse(e.0.stack)) {
                *best = (a.bytes, a.blocks);
                e.0.stack = a.stack;
            }
            e.0.bytes += a.bytes;
            e.0.blocks += a.blocks;
            for (s, p) in e.0.parts.iter_mut().zip(parts) {
                *s += p;
            }
        }
        let mut v: Vec<Entry> = per.into_values().map(|(e, _)| e).collect();
        v.sort_unstable_by(|a, b| b.bytes.cmp(&a.bytes).then(b.blocks.cmp(&a.blocks)).then(a.stack.cmp(&b.stack)));
        v.truncate(n);
        v
    }

    /// Frames of a stack id (`(no stack)` for 0, `(stack N not defined)` when the trace lacks it).
    pub fn frames(&mut self, stack: u64) -> Vec<Frame> {
        let pseudo = |name: String| vec![Frame { function: name, file: None, line: None, module: String::new(), inlined: false, ip: 0 }];
        if stack == 0 {
            return pseudo("(no stack)".into());
        }
        self.symbols.stack(stack).unwrap_or_else(|| pseudo(format!("(stack {stack} not defined in the trace)")))
    }

    /// The view of one stack's amounts, as its site (counters over all the site's stacks).
    pub fn view(&mut self, a: SiteAmount) -> SiteView {
        let site = self.site(a.stack);
        self.entry_view(Entry { site, stack: a.stack, bytes: a.bytes, blocks: a.blocks, parts: [0; 3] })
    }

    /// The view of a grouped entry: its representative's frames, counters summed over every
    /// stack id of the site.
    pub fn entry_view(&mut self, e: Entry) -> SiteView {
        let frames = self.frames(e.stack);
        let top = site_frame(&frames).cloned();
        let ids = self.members[e.site].clone();
        let (mut allocs, mut allocated, mut temporary, mut classes) = (0u64, 0u64, 0u64, [0u64; SIZE_CLASSES.len()]);
        for id in &ids {
            if let Some(st) = self.img.model.sites.by_stack.get(id) {
                allocs += st.allocs;
                allocated = allocated.saturating_add(st.allocated_bytes);
                temporary += st.temporary;
                for (c, n) in classes.iter_mut().zip(st.size_classes) {
                    *c += n;
                }
            }
        }
        SiteView {
            function: top.as_ref().map(|f| f.function.clone()).unwrap_or_default(),
            file: top.as_ref().and_then(|f| f.file.clone()),
            line: top.as_ref().and_then(|f| f.line),
            bytes: e.bytes,
            blocks: e.blocks,
            stack_id: e.stack,
            stack_ids: ids,
            allocations: allocs,
            allocated_bytes: allocated,
            temporary,
            size_classes: classes.iter().enumerate().filter(|(_, n)| **n > 0).map(|(i, n)| (class_label(i), *n)).collect(),
            frames,
        }
    }
}

fn plain(v: impl IntoIterator<Item = SiteAmount>) -> impl Iterator<Item = (SiteAmount, [u64; 3])> {
    v.into_iter().map(|a| (a, [0; 3]))
}

/// The two lists the dashboard shows, cheaply enough to be done again and again while a trace
/// is being written: the top `n` sites live at the peak (`top_sites_at_peak`) and live now
/// (`leaked_sites`: leaked once the image has ended), symbolising only their addresses and
/// reusing what `cache` (an earlier call's, same image) already knows; the other lists stay
/// empty. `cache` is updated.
pub fn build_top(img: &ImageAnalysis, symbolizer: std::rc::Rc<blazesym::symbolize::Symbolizer>, cache: &mut crate::symbols::SymbolCache, n: usize) -> SitesReport {
    let sites = &img.model.sites;
    if sites.with_stack == 0 && img.stacks().is_empty() {
        return no_stacks();
    }
    let (at_peak, live) = (sites.at_peak(), sites.live_now());
    let mut namer = SiteNamer::with(img, Symbols::resume(img.stacks(), symbolizer, std::mem::take(cache)));
    namer.symbols.prepare(at_peak.iter().chain(live.iter()).map(|a| a.stack));
    // Grouped like the report's lists (stacks that read the same are one site); the counters
    // of other lists (allocations, temporaries) cover the stacks of these two lists only.
    let at_peak = namer.group(plain(at_peak), n);
    let live = namer.group(plain(live), n);
    let r = SitesReport {
        stacks: true,
        stacks_note: None,
        allocations_with_stack: sites.with_stack,
        top_sites_at_peak: at_peak.into_iter().map(|e| namer.entry_view(e)).collect(),
        leaked_sites: live.into_iter().map(|e| namer.entry_view(e)).collect(),
        symbols_missing: namer.symbols.missing(),
        ..Default::default()
    };
    *cache = namer.symbols.into_cache();
    r
}

fn no_stacks() -> SitesReport {
    SitesReport { stacks: false, stacks_note: Some("the trace has no allocation stacks (recorded without stacks): no sites".into()), ..Default::default() }
}

pub fn build(img: &ImageAnalysis, symbolizer: std::rc::Rc<blazesym::symbolize::Symbolizer>) -> SitesReport {
    let sites = &img.model.sites;
    let stacks = sites.with_stack > 0 || !img.stacks().is_empty();
    if !stacks {
        return no_stacks();
    }
    let retained = retained(img);
    let mut namer = SiteNamer::shared(img, symbolizer);
    // Every stack id of the image gets its site first (their counters are summed per site).
    namer.index(img.samples.peak_pins.iter().map(|p| p.stack).chain(retained.0.iter().map(|r| r.0)).chain(retained.1.iter().filter_map(|p| p.3)));
    let at_peak_all = namer.group(plain(sites.at_peak()), usize::MAX);
    let at_peak: Vec<Entry> = at_peak_all.iter().take(MAX_SITES).copied().collect();
    let leaked = namer.group(plain(sites.live_now()), MAX_SITES);
    let temporary = namer.group(
        plain(sites.by_stack.iter().filter(|(_, s)| s.temporary > 0).map(|(&stack, s)| SiteAmount { stack, bytes: s.temporary_bytes, blocks: s.temporary })),
        MAX_SITES,
    );
    let retained_sites = namer.group(
        retained.0.iter().map(|&(stack, tc, fb, bins, blocks)| (SiteAmount { stack, bytes: tc + fb + bins, blocks }, [tc, fb, bins])),
        MAX_SITES,
    );

    // Per top function, over every site live at the peak.
    let mut funcs: BTreeMap<String, FunctionView> = BTreeMap::new();
    for e in &at_peak_all {
        let frames = namer.frames(e.stack);
        let name = site_frame(&frames).map(|f| f.function.clone()).unwrap_or_default();
        let f = funcs.entry(name.clone()).or_insert(FunctionView { function: name, bytes: 0, blocks: 0, sites: 0 });
        f.bytes += e.bytes;
        f.blocks += e.blocks;
        f.sites += 1;
    }
    let mut top_functions: Vec<FunctionView> = funcs.into_values().collect();
    top_functions.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.function.cmp(&b.function)));
    top_functions.truncate(MAX_SITES);

    let retention_by_site = img.glibc.enabled.then(|| RetentionBySite {
        sites: retained_sites.iter().map(|&e| RetainedSite { site: namer.entry_view(e), tcache: e.parts[0], fastbins: e.parts[1], bins: e.parts[2] }).collect(),
        top_pinned_by: retained
            .1
            .iter()
            .map(|&(ref arena, address, size, stack)| Pin { arena: arena.clone(), address, size, live: true, site: stack.map(|s| namer.view(SiteAmount { stack: s, bytes: size, blocks: 1 })) })
            .collect(),
        top_pinned_at_peak_rss: img
            .samples
            .peak_pins
            .iter()
            .map(|p| Pin { arena: p.arena.clone(), address: p.address, size: p.size, live: p.live, site: Some(namer.view(SiteAmount { stack: p.stack, bytes: p.size, blocks: 1 })) })
            .collect(),
    });

    SitesReport {
        stacks: true,
        stacks_note: None,
        allocations_with_stack: sites.with_stack,
        top_sites_at_peak: at_peak.into_iter().map(|e| namer.entry_view(e)).collect(),
        top_functions_at_peak: top_functions,
        leaked_sites: leaked.into_iter().map(|e| namer.entry_view(e)).collect(),
        temporary_sites: temporary.into_iter().map(|e| namer.entry_view(e)).collect(),
        retention_by_site,
        symbols_missing: namer.symbols.missing(),
    }
}

type Retained = (Vec<(u64, u64, u64, u64, u64)>, Vec<(String, u64, u64, Option<u64>)>);

/// Freed chunks in glibc's free lists at the end, by the stack of the block that was there
/// (stack, tcache, fastbins, bins, chunks), largest first (all of them: they are grouped into
/// sites after); and the blocks pinning heap tops (arena, user address, requested size, stack).
fn retained(img: &ImageAnalysis) -> Retained {
    let g = &img.glibc;
    if !g.enabled {
        return (Vec::new(), Vec::new());
    }
    let freed = &img.model.sites.freed_stack;
    let mut per: rustc_hash::FxHashMap<u64, (u64, u64, u64, u64)> = Default::default();
    let mut pins = Vec::new();
    for a in &g.arenas {
        for (&addr, c) in &a.chunks {
            let slot = match c.state {
                State::Tcache { .. } => 0,
                State::Fast => 1,
                State::Free => 2,
                _ => continue,
            };
            let stack = freed.get(&(addr + 16)).copied().unwrap_or(0);
            let e = per.entry(stack).or_default();
            let bytes = c.size - c.released_bytes().min(c.size);
            match slot {
                0 => e.0 += bytes,
                1 => e.1 += bytes,
                _ => e.2 += bytes,
            }
            e.3 += 1;
        }
        if let Some((addr, c)) = a.top_neighbour() {
            if let State::InUse { req } = c.state {
                let ptr = addr + 16;
                let stack = img.model.live.get(&ptr).map(|b| b.stack);
                let arena = if a.is_main() { "main".to_string() } else { format!("{:#x}", a.id) };
                pins.push((arena, ptr, req, stack));
            }
        }
    }
    let mut v: Vec<(u64, u64, u64, u64, u64)> = per.into_iter().map(|(s, (t, f, b, n))| (s, t, f, b, n)).collect();
    v.sort_unstable_by(|a, b| (b.1 + b.2 + b.3).cmp(&(a.1 + a.2 + a.3)).then(a.0.cmp(&b.0)));
    (v, pins)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::image::Relation;
    use crate::analysis::meta::ProcessMeta;
    use crate::analysis::stacks::{ModuleDef, StackDef};
    use crate::trace::ProcessStart;
    use mtrace_protocol::event::{Event, EventKind};

    const LIBC: u64 = 0x7f00_0000_0000;
    const APP: u64 = 0x5555_0000_0000;

    fn alloc(ptr: u64, size: u64, stack: u64) -> Event {
        let chunk = mtrace_protocol::event::chunk::request2size(size) | 1;
        Event::Alloc { kind: EventKind::Malloc, ptr, size, align: 0, chunk, prev_size: 0, stack, after: None }
    }
    fn free(ptr: u64) -> Event {
        Event::Free { kind: EventKind::Free, ptr, chunk: 0, after: None }
    }

    /// An image whose modules cannot be read (frames stay `module+0xoffset`): a libc (plumbing)
    /// and the program; `stacks`: id → return addresses, innermost first.
    fn image(stacks: &[(u64, &[u64])], events: &[Event]) -> ImageAnalysis {
        let ps = ProcessStart { image: 0, pid: 1, ppid: 0, parent_image: None, origin: 0, fork_seq: 0, time_ns: 0, hello: Vec::new() };
        let mut img = ImageAnalysis::new(&ps, ProcessMeta::default(), Relation::Root);
        let t = img.stacks_mut();
        for (bias, path) in [(LIBC, "/nonexistent/libc.so.6"), (APP, "/nonexistent/app")] {
            t.modules.push(ModuleDef { bias, lo: bias, hi: bias + 0x10_0000, build_id: Vec::new(), path: path.into(), loaded_ns: 0, unloaded_ns: None });
        }
        for (id, ips) in stacks {
            t.stacks.insert(*id, StackDef { frames: ips.to_vec().into(), time_ns: 1 });
        }
        for (i, ev) in events.iter().enumerate() {
            img.model.apply(ev, 1000 * (i as u64 + 1), 1);
        }
        img
    }

    fn ids(v: &SiteView) -> Vec<String> {
        serde_json::to_value(v).unwrap()["stack_ids"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    }

    #[test]
    fn stacks_differing_only_in_plumbing_frames_are_one_site_with_summed_numbers() {
        // 1 and 2 differ only inside libc (malloc vs calloc, say): one site. 3 is called from
        // another place in the program, 4 from another outer caller: sites of their own.
        let stacks: [(u64, &[u64]); 4] = [
            (1, &[LIBC + 0x101, APP + 0x1001, APP + 0x2001]),
            (2, &[LIBC + 0x201, LIBC + 0x301, APP + 0x1001, APP + 0x2001]),
            (3, &[LIBC + 0x101, APP + 0x1011, APP + 0x2001]),
            (4, &[LIBC + 0x101, APP + 0x1001, APP + 0x3001]),
        ];
        let events = [
            alloc(0x10, 100, 1),
            alloc(0x20, 200, 2),
            alloc(0x30, 30, 3),
            alloc(0x40, 40, 2), // temporary
            free(0x40),
            alloc(0x50, 5000, 1), // the peak: 5330 B
            free(0x50),           // temporary
            alloc(0x60, 7, 4),
            free(0x60), // temporary
        ];
        let img = image(&stacks, &events);
        assert_eq!(img.model.c.peak_live_bytes, 5330);
        let r = build(&img, std::rc::Rc::new(crate::symbols::symbolizer()));
        assert!(r.stacks);

        // At the peak: stacks 1 (5100 B, 2 blocks) and 2 (200 B) are one entry.
        let top: Vec<(&str, u64, u64, u64)> = r.top_sites_at_peak.iter().map(|v| (v.function.as_str(), v.bytes, v.blocks, v.stack_id)).collect();
        assert_eq!(top, vec![("app+0x1000", 5300, 3, 1), ("app+0x1010", 30, 1, 3)]);
        let a = &r.top_sites_at_peak[0];
        assert_eq!(ids(a), vec!["0x1", "0x2"]);
        assert_eq!((a.allocations, a.allocated_bytes, a.temporary), (4, 5340, 2));
        let classes: Vec<(&str, u64)> = a.size_classes.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(classes, vec![("17-64", 1), ("4097-16K", 1), ("65-256", 2)]);
        // Its frames are those of the stack with the most bytes, plumbing included.
        let f: Vec<&str> = a.frames.iter().map(|f| f.function.as_str()).collect();
        assert_eq!(f, vec!["libc.so.6+0x100", "app+0x1000", "app+0x2000"]);
        let json = serde_json::to_value(a).unwrap();
        assert_eq!((json["stack_id"].as_str(), json["bytes"].as_u64()), (Some("0x1"), Some(5300)));
        let funcs: Vec<(&str, u64, u64, u64)> = r.top_functions_at_peak.iter().map(|f| (f.function.as_str(), f.bytes, f.blocks, f.sites)).collect();
        assert_eq!(funcs, vec![("app+0x1000", 5300, 3, 1), ("app+0x1010", 30, 1, 1)]);

        // Leaked: 100 B of stack 1 and 200 B of stack 2; the representative is now stack 2.
        let leaked: Vec<(&str, u64, u64, u64)> = r.leaked_sites.iter().map(|v| (v.function.as_str(), v.bytes, v.blocks, v.stack_id)).collect();
        assert_eq!(leaked, vec![("app+0x1000", 300, 2, 2), ("app+0x1010", 30, 1, 3)]);
        assert_eq!(r.leaked_sites[0].frames.len(), 4);

        // Temporaries: 40 B of stack 2 and 5000 B of stack 1; stack 4 (another outer caller)
        // stays apart though its naming frame is the same.
        let temp: Vec<(&str, u64, u64, u64, u64)> = r.temporary_sites.iter().map(|v| (v.function.as_str(), v.bytes, v.blocks, v.allocations, v.stack_id)).collect();
        assert_eq!(temp, vec![("app+0x1000", 5040, 2, 4, 1), ("app+0x1000", 7, 1, 1, 4)]);
        assert_eq!(ids(&r.temporary_sites[1]), vec!["0x4"]);
    }

    #[test]
    fn grouping_sums_retention_parts_and_orders_by_bytes() {
        let stacks: [(u64, &[u64]); 3] = [(1, &[LIBC + 0x101, APP + 0x1001]), (2, &[LIBC + 0x201, APP + 0x1001]), (3, &[APP + 0x1011])];
        let img = image(&stacks, &[]);
        let mut namer = SiteNamer::new(&img);
        namer.index([1, 2, 3]);
        let a = |stack, bytes, blocks| SiteAmount { stack, bytes, blocks };
        let v = namer.group([(a(1, 30, 1), [10, 20, 0]), (a(3, 40, 2), [0, 0, 40]), (a(2, 25, 3), [5, 0, 20])], 10);
        let got: Vec<(u64, u64, u64, [u64; 3])> = v.iter().map(|e| (e.stack, e.bytes, e.blocks, e.parts)).collect();
        assert_eq!(got, vec![(1, 55, 4, [15, 20, 20]), (3, 40, 2, [0, 0, 40])]);
        assert_eq!(namer.group([(a(1, 30, 1), [0; 3]), (a(3, 40, 2), [0; 3]), (a(2, 25, 3), [0; 3])], 1).len(), 1);
    }
}
