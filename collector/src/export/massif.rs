//! massif.out, as valgrind's massif writes it (the grammar `ms_print` and massif-visualizer
//! read), from the site aggregation of one image:
//!
//! ```text
//! desc: …
//! cmd: …
//! time_unit: ms
//! #-----------
//! snapshot=N
//! #-----------
//! time=T
//! mem_heap_B=…          requested bytes live (the report's live bytes)
//! mem_heap_extra_B=…    chunk overhead of the live blocks (chunk size − request; mmapped:
//!                       mapping − request), known from glibc's chunk headers
//! mem_stacks_B=0
//! heap_tree=empty|detailed|peak
//! n2: 1000 (heap allocation functions) malloc/new/new[], --alloc-fns, etc.
//!  n1: 600 0x401136: f (a.c:10)
//!   n0: 600 0x401190: main (a.c:20)
//!  n0: 400 in 3 places, all below massif's threshold (1.00%)
//! ```
//!
//! Snapshots: the first at time 0; the series the analysis kept (about 100, evenly spaced in
//! time — or in bytes allocated, `--time-unit B` — every 10th detailed); the exact peak of live bytes (`heap_tree=peak`); the end
//! (detailed). Trees go from the allocator outwards: a node's children are its callers,
//! largest first, one per distinct label (stacks that read the same merge into one node; frames
//! at different addresses stay apart, as in valgrind's own files); callers below the threshold
//! (percent of the snapshot's `mem_heap_B`) are folded into one "in N places" line. A node's
//! bytes are the sum of its children's (a stack that ends where others go on gets a
//! `(stack ends here)` child). Allocations without a stack are one `(no stack)` entry.

use std::fmt::Write as _;
use std::io::Write;

use anyhow::Result;

use crate::analysis::image::ImageAnalysis;
use crate::analysis::sites::SiteAmount;
use crate::report::sites::SiteNamer;
use crate::symbols::{base_name, Frame};

/// The massif time unit of the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TimeUnit {
    /// Milliseconds since the image started.
    #[default]
    #[value(name = "ms")]
    Ms,
    /// Bytes allocated so far (massif's `--time-unit=B`): evenly spaced snapshots even when the
    /// run is shorter than the trace's time resolution.
    #[value(name = "B")]
    B,
}

impl TimeUnit {
    pub fn label(self) -> &'static str {
        match self {
            TimeUnit::Ms => "ms",
            TimeUnit::B => "B",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tree {
    Empty,
    Detailed,
    Peak,
}

/// One snapshot, with its detail as (frames innermost first, bytes) per site.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub time: u64,
    pub heap: u64,
    pub extra: u64,
    pub tree: Tree,
    pub detail: Vec<(Vec<Frame>, u64)>,
}

/// The massif label of a frame.
fn label(f: &Frame) -> String {
    let name = if f.function.is_empty() { "???" } else { f.function.as_str() };
    match (&f.file, f.line) {
        (Some(file), Some(l)) => format!("0x{:X}: {name} ({}:{l})", f.ip, base_name(file)),
        (Some(file), None) => format!("0x{:X}: {name} ({})", f.ip, base_name(file)),
        _ if !f.module.is_empty() => format!("0x{:X}: {name} (in {})", f.ip, f.module),
        _ => format!("0x{:X}: {name}", f.ip),
    }
}

#[derive(Default)]
struct Node {
    label: String,
    bytes: u64,
    /// Bytes of stacks that end at this node.
    own: u64,
    children: Vec<Node>,
}

impl Node {
    fn insert(&mut self, path: &[String], bytes: u64) {
        self.bytes += bytes;
        match path.split_first() {
            None => self.own += bytes,
            Some((first, rest)) => {
                let i = match self.children.iter().position(|c| c.label == *first) {
                    Some(i) => i,
                    None => {
                        self.children.push(Node { label: first.clone(), ..Default::default() });
                        self.children.len() - 1
                    }
                };
                self.children[i].insert(rest, bytes);
            }
        }
    }

    /// Give bytes of stacks ending at an inner node a child of their own (sum invariant).
    fn close(&mut self, top: bool) {
        if !top && self.own > 0 && !self.children.is_empty() {
            self.children.push(Node { label: "0x0: (stack ends here)".into(), bytes: self.own, own: self.own, children: Vec::new() });
        }
        for c in &mut self.children {
            c.close(false);
        }
        self.children.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.label.cmp(&b.label)));
    }

    fn render(&self, out: &mut String, depth: usize, total: u64, threshold: f64) {
        let significant = |b: u64| total > 0 && b as f64 * 100.0 >= threshold * total as f64;
        let (sig, insig): (Vec<&Node>, Vec<&Node>) = self.children.iter().partition(|c| significant(c.bytes));
        let n = sig.len() + usize::from(!insig.is_empty());
        let _ = writeln!(out, "{:depth$}n{n}: {} {}", "", self.bytes, self.label);
        for c in sig {
            c.render(out, depth + 1, total, threshold);
        }
        if !insig.is_empty() {
            let b: u64 = insig.iter().map(|c| c.bytes).sum();
            let k = insig.len();
            let (s, all) = if k == 1 { ("", "") } else { ("s", "all ") };
            let _ = writeln!(out, "{:w$}n0: {b} in {k} place{s}, {all}below massif's threshold ({threshold:.2}%)", "", w = depth + 1);
        }
    }
}

/// The tree of one detailed snapshot.
pub fn tree(detail: &[(Vec<Frame>, u64)], total: u64, threshold: f64) -> String {
    let mut root = Node { label: "(heap allocation functions) malloc/new/new[], --alloc-fns, etc.".into(), ..Default::default() };
    for (frames, bytes) in detail {
        if *bytes == 0 {
            continue;
        }
        let path: Vec<String> = frames.iter().map(label).collect();
        root.insert(&path, *bytes);
    }
    root.close(true);
    let mut s = String::new();
    root.render(&mut s, 0, total.max(root.bytes), threshold);
    s
}

/// The whole file.
pub fn render(cmd: &str, snapshots: &[Snapshot], threshold: f64, unit: TimeUnit) -> String {
    let mut s = String::new();
    let u = unit.label();
    let _ = writeln!(s, "desc: (mtrace) --threshold={threshold:.1} --time-unit={u}; mem_heap_B: requested bytes live; mem_heap_extra_B: chunk overhead");
    let _ = writeln!(s, "cmd: {}", cmd.replace('\n', " "));
    let _ = writeln!(s, "time_unit: {u}");
    for (i, sn) in snapshots.iter().enumerate() {
        let _ = writeln!(s, "#-----------\nsnapshot={i}\n#-----------");
        let _ = writeln!(s, "time={}\nmem_heap_B={}\nmem_heap_extra_B={}\nmem_stacks_B=0", sn.time, sn.heap, sn.extra);
        match sn.tree {
            Tree::Empty => {
                let _ = writeln!(s, "heap_tree=empty");
            }
            Tree::Detailed | Tree::Peak => {
                let _ = writeln!(s, "heap_tree={}", if sn.tree == Tree::Peak { "peak" } else { "detailed" });
                s.push_str(&tree(&sn.detail, sn.heap, threshold));
            }
        }
    }
    s
}

/// The snapshots of one image.
pub fn snapshots(img: &ImageAnalysis, unit: TimeUnit) -> Vec<Snapshot> {
    let sites = &img.model.sites;
    let c = &img.model.c;
    let ms = |t: u64| t.saturating_sub(img.start_ns) / 1_000_000;
    let series = match unit {
        TimeUnit::Ms => &sites.series,
        TimeUnit::B => &sites.series_bytes,
    };
    let at = |time_ns: u64, allocated: u64| match unit {
        TimeUnit::Ms => ms(time_ns),
        TimeUnit::B => allocated,
    };
    let mut namer = SiteNamer::new(img);
    let at_peak = sites.at_peak();
    let at_end = sites.live_now();
    let mut ids: Vec<u64> = at_peak.iter().chain(&at_end).map(|a| a.stack).collect();
    for (_, p) in &series.points {
        ids.extend(p.detail.iter().flatten().map(|a| a.stack));
    }
    ids.sort_unstable();
    ids.dedup();
    namer.symbols.prepare(ids);
    let mut detail = |v: &[SiteAmount]| -> Vec<(Vec<Frame>, u64)> { v.iter().map(|a| (namer.frames(a.stack), a.bytes)).collect() };

    let mut out = vec![Snapshot { time: 0, heap: img.inherited_bytes, extra: 0, tree: Tree::Empty, detail: Vec::new() }];
    let peak = Snapshot { time: at(c.peak_live_time_ns, sites.peak_allocated), heap: c.peak_live_bytes, extra: sites.peak_overhead, tree: Tree::Peak, detail: detail(&at_peak) };
    let mut peak = Some(peak);
    for (_, p) in &series.points {
        // A point is the state after `serial` changes; the peak, after `peak_serial`.
        if p.serial >= sites.peak_serial() {
            if let Some(pk) = peak.take() {
                out.push(pk);
            }
        }
        out.push(Snapshot {
            time: at(p.time_ns, p.clock),
            heap: p.live_bytes,
            extra: p.overhead,
            tree: if p.detail.is_some() { Tree::Detailed } else { Tree::Empty },
            detail: p.detail.as_deref().map(&mut detail).unwrap_or_default(),
        });
    }
    if let Some(pk) = peak.take() {
        out.push(pk);
    }
    let end_ns = img.end.as_ref().map_or(img.model.now_ns, |e| e.time_ns).max(img.model.now_ns);
    out.push(Snapshot { time: at(end_ns, sites.allocated), heap: c.live_bytes, extra: sites.live_overhead, tree: Tree::Detailed, detail: detail(&at_end) });
    // Times never go back (time marks of different threads can).
    let mut t = 0;
    for s in &mut out {
        t = t.max(s.time);
        s.time = t;
    }
    out
}

pub fn write(img: &ImageAnalysis, cmd: &str, threshold: f64, unit: TimeUnit, out: &mut dyn Write) -> Result<()> {
    out.write_all(render(cmd, &snapshots(img, unit), threshold, unit).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(ip: u64, name: &str, line: u32) -> Frame {
        Frame { function: name.into(), file: Some(format!("/src/{name}.c")), line: Some(line), module: "/bin/a".into(), inlined: false, ip }
    }

    #[test]
    fn tree_sorts_sums_and_folds_insignificant_callers() {
        let main = f(0x400100, "main", 9);
        let detail = vec![
            (vec![f(0x401000, "big", 1), main.clone()], 600),
            (vec![f(0x402000, "mid", 2), main.clone()], 390),
            (vec![f(0x403000, "tiny1", 3), main.clone()], 6),
            (vec![f(0x404000, "tiny2", 4), main.clone()], 4),
            (vec![f(0x405000, "tiny3", 5)], 0),
            // A stack ending inside another's path.
            (vec![f(0x402000, "mid", 2)], 0),
        ];
        let t = tree(&detail, 1000, 1.0);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "n3: 1000 (heap allocation functions) malloc/new/new[], --alloc-fns, etc.");
        assert_eq!(lines[1], " n1: 600 0x401000: big (big.c:1)");
        assert_eq!(lines[2], "  n0: 600 0x400100: main (main.c:9)");
        assert_eq!(lines[3], " n1: 390 0x402000: mid (mid.c:2)");
        assert_eq!(lines[4], "  n0: 390 0x400100: main (main.c:9)");
        assert_eq!(lines[5], " n0: 10 in 2 places, all below massif's threshold (1.00%)");
        assert_eq!(lines.len(), 6);

        // A stack ending where another goes on gets its own child; one insignificant caller.
        let detail = vec![(vec![f(0x402000, "mid", 2), main.clone()], 500), (vec![f(0x402000, "mid", 2)], 495), (vec![f(0x403000, "t", 3)], 5)];
        let t = tree(&detail, 1000, 1.0);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "n2: 1000 (heap allocation functions) malloc/new/new[], --alloc-fns, etc.");
        assert_eq!(lines[1], " n2: 995 0x402000: mid (mid.c:2)");
        assert_eq!(lines[2], "  n0: 500 0x400100: main (main.c:9)");
        assert_eq!(lines[3], "  n0: 495 0x0: (stack ends here)");
        assert_eq!(lines[4], " n0: 5 in 1 place, below massif's threshold (1.00%)");
        // Empty heap.
        assert_eq!(tree(&[], 0, 1.0), "n0: 0 (heap allocation functions) malloc/new/new[], --alloc-fns, etc.\n");
        // Stacks whose frames read the same (two stack ids): one node per label, never two
        // siblings alike.
        let detail = vec![(vec![f(0x401000, "big", 1), main.clone()], 300), (vec![f(0x401000, "big", 1), main.clone()], 700)];
        let t = tree(&detail, 1000, 1.0);
        assert_eq!(t, "n1: 1000 (heap allocation functions) malloc/new/new[], --alloc-fns, etc.\n n1: 1000 0x401000: big (big.c:1)\n  n0: 1000 0x400100: main (main.c:9)\n");
    }

    #[test]
    fn file_has_massif_grammar() {
        let sn = vec![
            Snapshot { time: 0, heap: 0, extra: 0, tree: Tree::Empty, detail: vec![] },
            Snapshot { time: 5, heap: 100, extra: 16, tree: Tree::Peak, detail: vec![(vec![f(0x401000, "a", 1)], 100)] },
        ];
        let s = render("./prog x", &sn, 1.0, TimeUnit::Ms);
        let expected = "\
desc: (mtrace) --threshold=1.0 --time-unit=ms; mem_heap_B: requested bytes live; mem_heap_extra_B: chunk overhead
cmd: ./prog x
time_unit: ms
#-----------
snapshot=0
#-----------
time=0
mem_heap_B=0
mem_heap_extra_B=0
mem_stacks_B=0
heap_tree=empty
#-----------
snapshot=1
#-----------
time=5
mem_heap_B=100
mem_heap_extra_B=16
mem_stacks_B=0
heap_tree=peak
n1: 100 (heap allocation functions) malloc/new/new[], --alloc-fns, etc.
 n0: 100 0x401000: a (a.c:1)
";
        assert_eq!(s, expected);
    }
}
