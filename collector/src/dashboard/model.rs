//! The dashboard's data: what each panel shows, per process image, taken from the [`Report`]
//! (`report::build`), which already computed every number. Plain data, no terminal types, no
//! formatting: views ([`super::ui`]) decide how it looks; tests can build one by hand.

use crate::analysis::glibc::breakdown::Categories;
use crate::analysis::image::{Relation, CALL_KINDS};
use crate::report::retention::Retention;
use crate::report::{Ending, ProcessReport, Report};

/// Everything the dashboard shows about one trace.
#[derive(Clone, Debug, Default)]
pub struct DashboardModel {
    /// The traced command line.
    pub command: String,
    /// Said once above everything: damage, an incomplete recording, recorder notes.
    pub warnings: Vec<String>,
    pub processes: Vec<ProcessModel>,
    /// `mtracer view` while the trace is still being read: how far it got (nothing else is
    /// known yet).
    pub indexing: Option<Indexing>,
}

/// How the live analysis keeps up (`mtracer run`); kept by the app state, refreshed with the
/// screen whether or not a new model came.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamStatus {
    /// How long ago the newest analysed data was written (0 when the analysis has all of it).
    pub behind_s: f64,
    /// The recorder's backlog: bytes published in the rings and not drained yet, at its last
    /// pass (none when not known).
    pub backlog_bytes: Option<u64>,
    /// Threads of the traced program waiting for a free ring block (lossless mode).
    pub writers_waiting: Option<u64>,
}

/// Progress of reading a trace (`mtracer view` on a large trace).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Indexing {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub events: u64,
    pub events_per_s: f64,
    pub elapsed_s: f64,
}

/// Request sizes of an image's allocations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SizesModel {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    /// `(lo, hi, count, bytes)` of each non-empty power-of-two bucket, smallest first.
    pub buckets: Vec<(u64, u64, u64, u64)>,
}

/// Whether an image's allocation sites are known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SitesStatus {
    /// Not computed for this model (a live snapshot before the first symbolisation).
    #[default]
    Pending,
    /// The trace has no allocation stacks (recorded with `--no-stacks`).
    NoStacks,
    Ready,
}

/// One frame of a site's stack, innermost first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SiteFrame {
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: String,
    /// Inlined into the next frame.
    pub inlined: bool,
}

/// One allocation site with its bytes and blocks in one list.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Site {
    /// The first frame outside the allocator's and the language library's plumbing.
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub bytes: u64,
    pub blocks: u64,
    /// Allocations made here over the run so far, and their bytes.
    pub allocations: u64,
    pub allocated_bytes: u64,
    pub stack_id: u64,
    pub frames: Vec<SiteFrame>,
}

/// The top allocation sites of an image, by live bytes, largest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SitesModel {
    pub status: SitesStatus,
    /// Live at the end: leaked at exit once the image has ended; live now while it runs.
    pub at_end: Vec<Site>,
    /// Live at the peak of live bytes.
    pub at_peak: Vec<Site>,
    pub allocations_with_stack: u64,
    /// `symbols missing: PATH (reason)`.
    pub symbols_missing: Vec<String>,
}

impl SitesModel {
    pub fn from_report(r: &crate::report::sites::SitesReport) -> SitesModel {
        if !r.stacks {
            return SitesModel { status: SitesStatus::NoStacks, ..SitesModel::default() };
        }
        let site = |v: &crate::report::sites::SiteView| Site {
            function: v.function.clone(),
            file: v.file.clone(),
            line: v.line,
            bytes: v.bytes,
            blocks: v.blocks,
            allocations: v.allocations,
            allocated_bytes: v.allocated_bytes,
            stack_id: v.stack_id,
            frames: v.frames.iter().map(|f| SiteFrame { function: f.function.clone(), file: f.file.clone(), line: f.line, module: f.module.clone(), inlined: f.inlined }).collect(),
        };
        SitesModel {
            status: SitesStatus::Ready,
            at_end: r.leaked_sites.iter().map(site).collect(),
            at_peak: r.top_sites_at_peak.iter().map(site).collect(),
            allocations_with_stack: r.allocations_with_stack,
            symbols_missing: r.symbols_missing.clone(),
        }
    }
}

/// One process image.
#[derive(Clone, Debug, Default)]
pub struct ProcessModel {
    pub image: u32,
    pub pid: u32,
    pub ppid: u32,
    pub parent_image: Option<u32>,
    /// `root`, `spawn`, `fork`, `exec`.
    pub relation: String,
    pub exe: String,
    pub args: Vec<String>,
    pub duration_s: f64,
    /// How it ended, in words.
    pub ending: String,
    pub threads: usize,
    /// Calls per hooked function.
    pub calls: Vec<(String, u64)>,
    pub alloc_count: u64,
    pub free_count: u64,
    pub failed_allocs: u64,
    pub bytes_allocated_total: u64,
    pub peak_live_bytes: u64,
    pub peak_live_time_s: f64,
    pub final_live_bytes: u64,
    pub final_live_blocks: u64,
    pub final_heap_bytes: u64,
    pub final_mmapped_bytes: u64,
    pub peak_rss_bytes: u64,
    pub final_rss_bytes: u64,
    pub lost_events: u64,
    pub unmatched_frees: u64,
    /// Non-zero anomaly counters, by name.
    pub anomalies: Vec<(String, u64)>,
    pub timeline: Vec<Point>,
    /// Absent when the allocator is not glibc's.
    pub retention: Option<RetentionModel>,
    pub sizes: SizesModel,
    pub sites: SitesModel,
}

/// One timeline sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub t_s: f64,
    pub live_bytes: u64,
    /// brk heap + arena heaps held from the OS.
    pub heap_bytes: u64,
    pub mmapped_bytes: u64,
    pub rss_bytes: u64,
    pub categories: Categories,
    /// Calls so far per hooked function, by `analysis::image::call_index`.
    pub calls: [u64; CALL_KINDS],
}

impl Default for Point {
    fn default() -> Point {
        Point { t_s: 0.0, live_bytes: 0, heap_bytes: 0, mmapped_bytes: 0, rss_bytes: 0, categories: Categories::default(), calls: [0; CALL_KINDS] }
    }
}

impl Point {
    /// What glibc holds from the OS: heap + mmapped.
    pub fn os_held_bytes(&self) -> u64 {
        self.heap_bytes + self.mmapped_bytes
    }
}

/// The retention section of one image.
#[derive(Clone, Debug, Default)]
pub struct RetentionModel {
    pub at_end: Snapshot,
    /// The state when RSS peaked.
    pub at_peak: Option<Snapshot>,
    pub thresholds: ThresholdsModel,
    pub remedies: Vec<Remedy>,
    pub trims: Vec<Trim>,
    /// The last exactly ordered `mallinfo2()` checkpoint: where and why, and whether it agrees.
    pub mallinfo2_at: Option<(f64, String, bool)>,
    /// Field, model, glibc.
    pub mallinfo2: Vec<(String, u64, u64)>,
    /// Checkpoints in exact order, and how many of them agree with the model.
    pub checkpoints_exact: usize,
    pub checkpoints_agreeing: usize,
    pub model_conflicts: u64,
    pub uncertain: Vec<String>,
}

/// Where the OS-held bytes are at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub t_s: f64,
    /// RSS then (the peak's; 0 at the end).
    pub rss_bytes: u64,
    pub os_held_bytes: u64,
    pub live_bytes: u64,
    /// Every category with its bytes and percent of what is held, in the report's order.
    pub categories: Vec<(String, u64, f64)>,
    pub arenas: Vec<Arena>,
    pub causes: Vec<Cause>,
}

#[derive(Clone, Debug, Default)]
pub struct Arena {
    pub id: String,
    pub heaps: usize,
    pub held_bytes: u64,
    pub live_bytes: u64,
    pub free_bytes: u64,
    pub top_bytes: u64,
    pub top_above_trim_threshold_bytes: u64,
    pub threads: usize,
    pub resident_estimate_bytes: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Cause {
    pub kind: String,
    pub bytes: u64,
    pub text: String,
}

#[derive(Clone, Debug, Default)]
pub struct Remedy {
    pub action: String,
    pub bytes_returned: u64,
    pub text: String,
}

#[derive(Clone, Debug, Default)]
pub struct Trim {
    pub t_s: f64,
    pub pad: u64,
    pub predicted_release_bytes: u64,
    pub rss_before: u64,
    pub rss_after: u64,
    pub causes_before: Vec<Cause>,
}

/// The thresholds in force, as the report gives them.
pub use crate::report::retention::Thresholds as ThresholdsModel;

/// A threshold change, as the glibc model records it.
pub use crate::analysis::glibc::params::ThresholdChange;

impl DashboardModel {
    pub fn from_report(r: &Report) -> DashboardModel {
        let mut warnings = Vec::new();
        if let Some(d) = &r.damage {
            warnings.push(format!("the trace is damaged; showing what comes before: {d}"));
        } else if !r.complete {
            warnings.push("the recording did not end normally; showing what was saved".to_string());
        }
        warnings.extend(r.notes.iter().cloned());
        DashboardModel { command: r.command.join(" "), warnings, processes: r.processes.iter().map(ProcessModel::from_report).collect(), indexing: None }
    }

    /// The image to show first: the one that allocated the most bytes (the first on a tie) —
    /// the one `mtracer export` picks too.
    pub fn busiest(&self) -> usize {
        let mut best = 0;
        for (i, p) in self.processes.iter().enumerate() {
            if p.bytes_allocated_total > self.processes[best].bytes_allocated_total {
                best = i;
            }
        }
        best
    }

    /// Depth of each image in the process tree (0 for roots), in `processes` order: a fork or a
    /// spawned child is one deeper than its parent, an exec (the same process) as deep.
    pub fn depths(&self) -> Vec<usize> {
        let mut depth: Vec<usize> = Vec::with_capacity(self.processes.len());
        for p in &self.processes {
            // Parents are registered before their children.
            let step = usize::from(p.relation != "exec");
            let d = p.parent_image.and_then(|pi| self.processes.iter().position(|q| q.image == pi)).and_then(|i| depth.get(i).map(|d| d + step)).unwrap_or(0);
            depth.push(d);
        }
        depth
    }
}

fn relation(r: Relation) -> &'static str {
    match r {
        Relation::Root => "root",
        Relation::Spawn => "spawn",
        Relation::Fork => "fork",
        Relation::Exec => "exec",
    }
}

fn ending(e: Ending) -> &'static str {
    match e {
        Ending::Exited => "exited",
        Ending::Vanished => "vanished (killed or crashed)",
        Ending::Exec => "replaced by exec",
        Ending::Detached => "still running when the recording stopped",
        Ending::Unknown => "unknown (the trace ends first)",
    }
}

impl ProcessModel {
    pub fn from_report(p: &ProcessReport) -> ProcessModel {
        let a = &p.anomalies;
        let anomalies = [
            ("stream gaps", a.stream_gaps),
            ("undecodable chunks", a.undecodable_chunks),
            ("missing predecessors", a.missing_predecessors),
            ("broken cycles", a.broken_cycles),
            ("forced events", a.forced_events),
            ("reordered blocks", a.reordered_blocks),
            ("implausible events", a.implausible_events),
        ]
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        ProcessModel {
            image: p.image,
            pid: p.pid,
            ppid: p.ppid,
            parent_image: p.parent_image,
            relation: relation(p.relation).to_string(),
            exe: p.exe.clone(),
            args: p.args.clone(),
            duration_s: p.duration_s,
            ending: ending(p.ending).to_string(),
            threads: p.threads,
            calls: p.calls.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            alloc_count: p.alloc_count,
            free_count: p.free_count,
            failed_allocs: p.failed_allocs,
            bytes_allocated_total: p.bytes_allocated_total,
            peak_live_bytes: p.peak_live_bytes,
            peak_live_time_s: p.peak_live_time_s,
            final_live_bytes: p.final_live_bytes,
            final_live_blocks: p.final_live_blocks,
            final_heap_bytes: p.final_heap_bytes,
            final_mmapped_bytes: p.final_mmapped_bytes,
            peak_rss_bytes: p.peak_rss_bytes,
            final_rss_bytes: p.final_rss_bytes,
            lost_events: p.lost_events,
            unmatched_frees: p.unmatched_frees,
            anomalies,
            timeline: p
                .timeline
                .iter()
                .map(|s| Point { t_s: s.t_s, live_bytes: s.live_bytes, heap_bytes: s.heap_bytes, mmapped_bytes: s.mmapped_bytes, rss_bytes: s.rss_bytes, categories: s.categories, calls: s.calls })
                .collect(),
            retention: p.retention.as_ref().map(RetentionModel::from_report),
            sizes: SizesModel {
                count: p.size_histogram.count,
                p50: p.size_histogram.p50,
                p99: p.size_histogram.p99,
                max: p.size_histogram.max,
                buckets: p.size_histogram.buckets.iter().map(|b| (b.lo, b.hi, b.count, b.bytes)).collect(),
            },
            // Built only when the report has them (`ReportOptions::sites`, or filled in by the
            // live feed): `Pending` otherwise.
            sites: if p.sites.stacks || p.sites.stacks_note.is_some() { SitesModel::from_report(&p.sites) } else { SitesModel::default() },
        }
    }

    /// The timeline sample in force at `t_s`: the last one at or before it (the first if none).
    pub fn point_at(&self, t_s: f64) -> Option<&Point> {
        let i = self.timeline.partition_point(|q| q.t_s <= t_s);
        self.timeline.get(i.saturating_sub(1))
    }

    /// Calls per second per hooked function over `[t_s - span_s, t_s]` (clamped to the
    /// timeline), from the samples' running counts; the busiest first, zero rates left out.
    /// Also the total rate. None without two samples in reach.
    pub fn call_rates(&self, t_s: f64, span_s: f64) -> Option<(f64, Vec<(&'static str, f64)>)> {
        let b = self.timeline.partition_point(|q| q.t_s <= t_s).checked_sub(1)?;
        let a = self.timeline.partition_point(|q| q.t_s < self.timeline[b].t_s - span_s).min(b);
        let (p, q) = (&self.timeline[a], &self.timeline[b]);
        let dt = q.t_s - p.t_s;
        if dt <= 0.0 {
            return None;
        }
        let mut v: Vec<(&'static str, f64)> = mtrace_protocol::event::EventKind::ALL
            .iter()
            .filter_map(|k| crate::analysis::image::call_index(*k).map(|i| (k.label(), q.calls[i].saturating_sub(p.calls[i]) as f64 / dt)))
            .filter(|(_, r)| *r > 0.0)
            .collect();
        v.sort_by(|x, y| y.1.total_cmp(&x.1));
        Some((v.iter().map(|x| x.1).sum(), v))
    }

    /// `pid 123 /usr/bin/python3 (fork of image 2)`.
    pub fn title(&self) -> String {
        let rel = match self.parent_image {
            Some(pi) if self.relation != "root" => format!(" ({} of image {pi})", self.relation),
            _ => String::new(),
        };
        format!("pid {} {}{rel}", self.pid, self.exe)
    }
}

fn causes(c: &[crate::analysis::glibc::explain::Cause]) -> Vec<Cause> {
    c.iter().map(|c| Cause { kind: c.kind.to_string(), bytes: c.bytes, text: c.text.clone() }).collect()
}

fn snapshot(b: &crate::analysis::glibc::breakdown::Breakdown, rss_bytes: u64, c: &[crate::analysis::glibc::explain::Cause]) -> Snapshot {
    Snapshot {
        t_s: b.t_s,
        rss_bytes,
        os_held_bytes: b.os_held_bytes,
        live_bytes: b.live_bytes,
        categories: b.categories.pairs().iter().map(|(k, v)| (k.to_string(), *v, b.percent.get(k).copied().unwrap_or(0.0))).collect(),
        arenas: b
            .arenas
            .iter()
            .map(|a| Arena {
                id: a.id.clone(),
                heaps: a.heaps,
                held_bytes: a.os_held_bytes,
                live_bytes: a.live_bytes,
                free_bytes: a.free_bytes,
                top_bytes: a.top_bytes,
                top_above_trim_threshold_bytes: a.top_above_trim_threshold_bytes,
                threads: a.threads,
                resident_estimate_bytes: a.resident_estimate_bytes,
            })
            .collect(),
        causes: causes(c),
    }
}

impl RetentionModel {
    pub fn from_report(r: &Retention) -> RetentionModel {
        // The report's own order of the mallinfo2 fields (the text report's).
        let order = ["arena", "ordblks", "smblks", "hblks", "hblkhd", "uordblks", "fordblks", "fsmblks", "keepcost"];
        RetentionModel {
            at_end: snapshot(&r.at_end, 0, &r.causes),
            at_peak: r.at_peak_rss.as_ref().map(|p| snapshot(&p.breakdown, p.rss_bytes, &p.causes)),
            thresholds: r.thresholds.clone(),
            remedies: r.remedies.iter().map(|m| Remedy { action: m.action.to_string(), bytes_returned: m.bytes_returned, text: m.text.clone() }).collect(),
            trims: r
                .trims
                .iter()
                .map(|t| Trim {
                    t_s: t.t_s,
                    pad: t.pad,
                    predicted_release_bytes: t.predicted_release_bytes,
                    rss_before: t.rss_before,
                    rss_after: t.rss_after,
                    causes_before: causes(&t.causes_before),
                })
                .collect(),
            mallinfo2_at: r.mallinfo2_checkpoint.as_ref().map(|c| (c.t_s, c.reason.to_string(), c.matches)),
            mallinfo2: order.iter().filter_map(|k| r.mallinfo2.get(k).map(|v| (k.to_string(), v.model, v.glibc))).collect(),
            checkpoints_exact: r.checkpoints.iter().filter(|c| c.exact_order).count(),
            checkpoints_agreeing: r.checkpoints.iter().filter(|c| c.exact_order && c.matches).count(),
            model_conflicts: r.model_conflicts,
            uncertain: r.uncertain.clone(),
        }
    }
}
