//! The allocation-site sections of the report: top sites at the peak of live bytes, sites
//! leaking at exit, temporary allocations, and freed memory glibc still holds, by site.
//!
//! Built from the analysis' per-stack aggregation (`analysis::sites`) and the image's stack
//! table, symbolised here once per distinct address. A site is one stack id; its `function`,
//! `file` and `line` are those of its first frame outside the allocator's plumbing and the
//! language's library (see [`plumbing`]: operator new, `std::vector`, Rust's `alloc::`, libc,
//! the loader, …), so that `strdup`, `new` or `vec!` name their caller; `frames` lists every
//! frame, the library's included.
//!
//! [`SiteView`] is the plain structure other views (the dashboard) can use.

use std::collections::BTreeMap;

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
    /// most readers); "0x0": allocations without a stack.
    #[serde(serialize_with = "hex")]
    pub stack_id: u64,
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

/// The frame that names a site.
pub fn site_frame(frames: &[Frame]) -> Option<&Frame> {
    frames.iter().find(|f| !plumbing(f)).or(frames.first())
}

fn class_label(i: usize) -> String {
    let lo = if i == 0 { 0 } else { SIZE_CLASSES[i - 1] + 1 };
    let hi = SIZE_CLASSES[i];
    let k = |n: u64| if n >= 1024 && n % 1024 == 0 { format!("{}K", n / 1024) } else { n.to_string() };
    if hi == u64::MAX { format!(">{}", k(lo - 1)) } else { format!("{}-{}", k(lo), k(hi)) }
}

/// Builds [`SiteView`]s for one image (symbolising each address once).
pub struct SiteNamer<'a> {
    img: &'a ImageAnalysis,
    pub symbols: Symbols<'a>,
}

impl<'a> SiteNamer<'a> {
    pub fn new(img: &'a ImageAnalysis) -> SiteNamer<'a> {
        SiteNamer { img, symbols: Symbols::new(img.stacks()) }
    }

    /// With a symbolizer shared between images.
    pub fn shared(img: &'a ImageAnalysis, symbolizer: std::rc::Rc<blazesym::symbolize::Symbolizer>) -> SiteNamer<'a> {
        SiteNamer { img, symbols: Symbols::shared(img.stacks(), symbolizer) }
    }

    /// Frames of a stack id (`(no stack)` for 0, `(stack N not defined)` when the trace lacks it).
    pub fn frames(&mut self, stack: u64) -> Vec<Frame> {
        let pseudo = |name: String| vec![Frame { function: name, file: None, line: None, module: String::new(), inlined: false, ip: 0 }];
        if stack == 0 {
            return pseudo("(no stack)".into());
        }
        self.symbols.stack(stack).unwrap_or_else(|| pseudo(format!("(stack {stack} not defined in the trace)")))
    }

    pub fn view(&mut self, a: SiteAmount) -> SiteView {
        let frames = self.frames(a.stack);
        let top = site_frame(&frames).cloned();
        let st = self.img.model.sites.by_stack.get(&a.stack).cloned().unwrap_or_default();
        SiteView {
            function: top.as_ref().map(|f| f.function.clone()).unwrap_or_default(),
            file: top.as_ref().and_then(|f| f.file.clone()),
            line: top.as_ref().and_then(|f| f.line),
            bytes: a.bytes,
            blocks: a.blocks,
            stack_id: a.stack,
            allocations: st.allocs,
            allocated_bytes: st.allocated_bytes,
            temporary: st.temporary,
            size_classes: st.size_classes.iter().enumerate().filter(|(_, n)| **n > 0).map(|(i, n)| (class_label(i), *n)).collect(),
            frames,
        }
    }
}

/// Largest first, ties by stack id; at most `n`.
fn top(mut v: Vec<SiteAmount>, n: usize) -> Vec<SiteAmount> {
    v.sort_unstable_by(|a, b| b.bytes.cmp(&a.bytes).then(b.blocks.cmp(&a.blocks)).then(a.stack.cmp(&b.stack)));
    v.truncate(n);
    v
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
    let at_peak = top(sites.at_peak(), n);
    let live = top(sites.live_now(), n);
    let mut namer = SiteNamer { img, symbols: Symbols::resume(img.stacks(), symbolizer, std::mem::take(cache)) };
    namer.symbols.prepare(at_peak.iter().chain(live.iter()).map(|a| a.stack));
    let r = SitesReport {
        stacks: true,
        stacks_note: None,
        allocations_with_stack: sites.with_stack,
        top_sites_at_peak: at_peak.into_iter().map(|a| namer.view(a)).collect(),
        leaked_sites: live.into_iter().map(|a| namer.view(a)).collect(),
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
    let at_peak_all = sites.at_peak();
    let at_peak = top(at_peak_all.clone(), MAX_SITES);
    let leaked = top(sites.live_now(), MAX_SITES);
    let temporary = top(
        sites.by_stack.iter().filter(|(_, s)| s.temporary > 0).map(|(&stack, s)| SiteAmount { stack, bytes: s.temporary_bytes, blocks: s.temporary }).collect(),
        MAX_SITES,
    );
    let retained = retained(img);
    let mut namer = SiteNamer::shared(img, symbolizer);
    let ids: Vec<u64> = img.samples.peak_pins.iter().map(|p| p.stack).chain(at_peak_all.iter().map(|a| a.stack)).chain(leaked.iter().map(|a| a.stack)).chain(temporary.iter().map(|a| a.stack)).chain(retained.0.iter().map(|r| r.0)).chain(retained.1.iter().filter_map(|p| p.3)).collect();
    namer.symbols.prepare(ids);

    // Per top function, over every site live at the peak.
    let mut funcs: BTreeMap<String, FunctionView> = BTreeMap::new();
    for a in &at_peak_all {
        let frames = namer.frames(a.stack);
        let name = site_frame(&frames).map(|f| f.function.clone()).unwrap_or_default();
        let e = funcs.entry(name.clone()).or_insert(FunctionView { function: name, bytes: 0, blocks: 0, sites: 0 });
        e.bytes += a.bytes;
        e.blocks += a.blocks;
        e.sites += 1;
    }
    let mut top_functions: Vec<FunctionView> = funcs.into_values().collect();
    top_functions.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.function.cmp(&b.function)));
    top_functions.truncate(MAX_SITES);

    let retention_by_site = img.glibc.enabled.then(|| RetentionBySite {
        sites: retained
            .0
            .iter()
            .map(|&(stack, tc, fb, bins, blocks)| RetainedSite {
                site: namer.view(SiteAmount { stack, bytes: tc + fb + bins, blocks }),
                tcache: tc,
                fastbins: fb,
                bins,
            })
            .collect(),
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
        top_sites_at_peak: at_peak.into_iter().map(|a| namer.view(a)).collect(),
        top_functions_at_peak: top_functions,
        leaked_sites: leaked.into_iter().map(|a| namer.view(a)).collect(),
        temporary_sites: temporary.into_iter().map(|a| namer.view(a)).collect(),
        retention_by_site,
        symbols_missing: namer.symbols.missing(),
    }
}

type Retained = (Vec<(u64, u64, u64, u64, u64)>, Vec<(String, u64, u64, Option<u64>)>);

/// Freed chunks in glibc's free lists at the end, by the stack of the block that was there
/// (stack, tcache, fastbins, bins, chunks), largest first; and the blocks pinning heap tops
/// (arena, user address, requested size, stack).
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
    v.truncate(MAX_SITES);
    (v, pins)
}
