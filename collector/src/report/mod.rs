//! The summary report: what `mtracer report` prints, as text or JSON. Built from an
//! [`Analysis`]; the analysis knows nothing about it.

pub mod retention;
pub mod sizes;
pub mod sites;
pub mod text;

use std::collections::BTreeMap;

use crate::trace::end_reason;
use serde::Serialize;

use crate::analysis::image::{ImageAnalysis, Relation};
use crate::analysis::Analysis;

#[derive(Serialize)]
pub struct Report {
    pub mtracer_version: String,
    pub command: Vec<String>,
    /// Every event of every image is in the trace: the recording ended normally and no image
    /// stopped tracing early (false: the recorder was killed, or see an image's
    /// `tracing_stopped`; data up to then is shown).
    pub complete: bool,
    pub exit_status: Option<i64>,
    /// What was wrong with the file, when a damaged trace was analysed with `--partial`.
    pub damage: Option<String>,
    pub lossy: bool,
    pub notes: Vec<String>,
    pub processes: Vec<ProcessReport>,
}

/// How a process image ended.
#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Ending {
    /// Exited normally (destructors ran, or `_exit`).
    Exited,
    /// Disappeared without saying goodbye: killed or crashed.
    Vanished,
    /// Replaced by a new program image (exec); its heap ended there.
    Exec,
    /// Still running when the recording stopped.
    Detached,
    /// The trace ends before the image did (the recorder was killed).
    Unknown,
}

/// Why an image's events end before it did.
#[derive(Serialize, Clone, Debug)]
pub struct TracingStoppedReport {
    /// Seconds from the image's start.
    pub at_s: f64,
    pub why: String,
    /// At least this many calls after that are not in the trace (null: unknown).
    pub untraced_calls: Option<u64>,
}

#[derive(Serialize)]
pub struct ProcessReport {
    pub image: u32,
    pub pid: u32,
    pub ppid: u32,
    pub parent_image: Option<u32>,
    pub relation: Relation,
    pub exe: String,
    pub args: Vec<String>,
    pub glibc_version: String,
    pub allocator: String,
    pub malloc_env: Vec<String>,
    pub duration_s: f64,
    pub threads: usize,
    /// The image had ordering cells: its cross-thread history is exact (see `mtrace_protocol::order`).
    /// Without them (`MTRACE_ORDER=0`, or no memory for the table) threads are ordered by liveness
    /// and time marks alone.
    pub order_cells: bool,
    /// Size of the table of ordering cells (8 bytes a cell; 0 without), from the image's Hello.
    pub order_table_bytes: u64,
    /// Calls per hooked function, failed calls and `free(NULL)` included.
    pub calls: BTreeMap<String, u64>,
    pub alloc_count: u64,
    pub free_count: u64,
    pub failed_allocs: u64,
    pub bytes_allocated_total: u64,
    /// Largest sum of requested sizes of live blocks.
    pub peak_live_bytes: u64,
    pub peak_live_time_s: f64,
    pub final_live_bytes: u64,
    pub final_live_blocks: u64,
    /// Final live bytes by the call that created the block (malloc, calloc, realloc, …).
    pub final_live_by_call: BTreeMap<String, u64>,
    /// A fork child's live bytes inherited from its parent at the fork.
    pub inherited_live_bytes: u64,
    /// brk heap + thread-arena heaps held from the OS at the end.
    pub final_heap_bytes: u64,
    /// Mappings of live mmapped chunks at the end.
    pub final_mmapped_bytes: u64,
    pub peak_rss_bytes: u64,
    pub final_rss_bytes: u64,
    pub rss_samples: u64,
    pub lost_events: u64,
    pub unmatched_frees: u64,
    pub ending: Ending,
    /// The image's events end before the image did: when, why, and what is missing (null: every
    /// event is in the trace).
    pub tracing_stopped: Option<TracingStoppedReport>,
    /// Status passed to `_exit` when the image left that way.
    pub exit_status: Option<i64>,
    /// Inconsistencies met while rebuilding (all zero in a healthy trace).
    pub anomalies: Anomalies,
    /// Why the process holds more than it uses (glibc model); absent when the allocator is not
    /// glibc's.
    pub retention: Option<retention::Retention>,
    /// Why there is no retention section (another allocator, chunk headers not recorded).
    pub retention_unavailable: Option<String>,
    pub timeline: Vec<TimelineSample>,
    /// Request sizes of the allocations, by power-of-two bucket.
    pub size_histogram: sizes::SizeHistogram,
    /// Allocation sites: `stacks`, `top_sites_at_peak`, `leaked_sites`, `temporary_sites`,
    /// `retention_by_site`, … (see [`sites`]).
    #[serde(flatten)]
    pub sites: sites::SitesReport,
}

#[derive(Serialize, Default)]
pub struct Anomalies {
    pub stream_gaps: u64,
    pub undecodable_chunks: u64,
    /// Ordering positions naming events the trace never got (killed between a free's exchange
    /// and its event).
    pub missing_predecessors: u64,
    /// Ordering waits released to break a cycle (never expected).
    pub broken_cycles: u64,
    /// Frees applied although their block never appeared.
    pub forced_events: u64,
    /// Allocations admitted while their address was still live (the old block's free was lost).
    pub reordered_blocks: u64,
    /// Events whose values no real process has (a block of 2^64 bytes, an address range that
    /// wraps): a damaged or forged trace. They are left out of the analysis.
    pub implausible_events: u64,
}

#[derive(Serialize, Clone, Copy)]
pub struct TimelineSample {
    pub t_s: f64,
    pub live_bytes: u64,
    pub heap_bytes: u64,
    pub mmapped_bytes: u64,
    pub rss_bytes: u64,
    /// OS-held bytes by retention category (see `analysis::glibc::breakdown`).
    pub categories: crate::analysis::glibc::breakdown::Categories,
    /// Calls so far per hooked function (`analysis::image::call_index`); not in the JSON.
    #[serde(skip)]
    pub calls: [u64; crate::analysis::image::CALL_KINDS],
}

/// Options of the report.
#[derive(Clone, Copy)]
pub struct ReportOptions {
    /// At most this many timeline samples per process (evenly thinned; 0 = all).
    pub max_timeline: usize,
    /// Build the allocation-site sections (symbolises the stacks: skip it for views that do not
    /// show them).
    pub sites: bool,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions { max_timeline: 1000, sites: true }
    }
}

pub fn build(a: &Analysis, opts: ReportOptions) -> Report {
    Report {
        mtracer_version: a.session.mtracer_version.clone(),
        command: a.session.command.clone(),
        complete: a.complete && a.images.iter().all(|i| i.tracing_stopped.is_none()),
        exit_status: a.exit_status,
        damage: a.damage.clone(),
        lossy: a.session.lossy,
        notes: a.notes.clone(),
        processes: {
            // One symbolizer for every image: the libraries they share are parsed once.
            let symbolizer = std::rc::Rc::new(crate::symbols::symbolizer());
            a.images.iter().map(|i| process(i, a.complete, opts, &symbolizer)).collect()
        },
    }
}

fn secs(ns: u64) -> f64 {
    (ns as f64 / 1e9 * 1e6).round() / 1e6
}

/// The image's events end early: it stopped tracing itself (the recorder did not answer), or
/// the trace ends before it did (the recorder was killed: nobody could say more).
fn tracing_stopped(img: &ImageAnalysis, complete: bool) -> Option<TracingStoppedReport> {
    if let Some(t) = &img.tracing_stopped {
        let why = match t.reason {
            mtrace_protocol::ring::detach_reason::NO_HEARTBEAT => format!("the recorder did not answer for {:.1} s (its ring full, its clock still)", t.timeout_ms as f64 / 1000.0),
            mtrace_protocol::ring::detach_reason::COLLECTOR_CLOSED => "the recorder closed the ring".to_string(),
            r => format!("reason {r}"),
        };
        return Some(TracingStoppedReport { at_s: secs(t.time_ns.saturating_sub(img.start_ns)), why, untraced_calls: Some(t.untraced_calls) });
    }
    (img.end.is_none() && !complete).then(|| TracingStoppedReport {
        at_s: secs(img.model.now_ns.saturating_sub(img.start_ns)),
        why: "the trace ends here: the recorder was killed or crashed (a process that ran on did so untraced)".to_string(),
        untraced_calls: None,
    })
}

fn process(img: &ImageAnalysis, complete: bool, opts: ReportOptions, symbolizer: &std::rc::Rc<blazesym::symbolize::Symbolizer>) -> ProcessReport {
    let c = &img.model.c;
    let end_ns = img.end.as_ref().map(|e| e.time_ns).unwrap_or(img.model.now_ns).max(img.start_ns);
    let (ending, exit_status) = match &img.end {
        Some(e) => (
            match e.reason {
                end_reason::EXITED => Ending::Exited,
                end_reason::VANISHED => Ending::Vanished,
                end_reason::DETACHED => Ending::Detached,
                end_reason::EXECED => Ending::Exec,
                _ => Ending::Unknown,
            },
            (e.status >= 0).then_some(e.status),
        ),
        None => (Ending::Unknown, None),
    };
    let tracing_stopped = tracing_stopped(img, complete);
    let exit_rss = img.end.as_ref().filter(|e| e.rss_bytes > 0).map(|e| e.rss_bytes);
    let hwm = img.end.as_ref().map_or(0, |e| e.hwm_bytes);
    let stats = img.merge_stats();
    let mut timeline: Vec<TimelineSample> = img
        .samples.timeline
        .iter()
        .map(|p| TimelineSample {
            t_s: secs(p.time_ns.saturating_sub(img.start_ns)),
            live_bytes: p.live_bytes,
            heap_bytes: p.heap_bytes,
            mmapped_bytes: p.mmapped_bytes,
            rss_bytes: p.rss_bytes,
            categories: p.categories,
            calls: p.calls,
        })
        .collect();
    if opts.max_timeline > 0 && timeline.len() > opts.max_timeline {
        let n = timeline.len();
        let k = opts.max_timeline;
        timeline = (0..k).map(|i| timeline[i * (n - 1) / (k - 1).max(1)]).collect();
    }
    let mut r = ProcessReport {
        image: img.id,
        pid: img.pid,
        ppid: img.ppid,
        parent_image: img.parent,
        relation: img.relation,
        exe: img.meta.exe.clone(),
        args: img.meta.args.clone(),
        glibc_version: img.meta.glibc_version.clone(),
        allocator: img.meta.allocator.clone(),
        malloc_env: img.meta.env.iter().filter(|e| !e.starts_with("LD_PRELOAD=")).cloned().collect(),
        duration_s: secs(end_ns - img.start_ns),
        threads: img.threads(),
        order_cells: img.meta.order_cells,
        order_table_bytes: img.meta.order_table.map_or(0, |t| t.1),
        calls: c.calls.iter().map(|(k, v)| (k.label().to_string(), *v)).collect(),
        alloc_count: c.alloc_count,
        free_count: c.free_count,
        failed_allocs: c.failed_allocs,
        bytes_allocated_total: c.bytes_allocated_total,
        peak_live_bytes: c.peak_live_bytes,
        peak_live_time_s: secs(c.peak_live_time_ns.saturating_sub(img.start_ns)),
        final_live_bytes: c.live_bytes,
        final_live_blocks: c.live_blocks,
        final_live_by_call: {
            let mut m = BTreeMap::new();
            for b in img.model.live.values().chain(img.model.extra.values().flatten()) {
                *m.entry(b.kind.label().to_string()).or_insert(0) += b.size;
            }
            m
        },
        inherited_live_bytes: img.inherited_bytes,
        final_heap_bytes: img.model.heap_bytes(),
        final_mmapped_bytes: c.mmapped_bytes,
        peak_rss_bytes: img.peak_rss_sample.max(hwm),
        final_rss_bytes: exit_rss.unwrap_or(img.last_rss_sample),
        rss_samples: img.rss_samples,
        // The ring's total counts every dropped event; `Lost` events in the streams mark where
        // (they can lag it). Take the larger, for traces whose end was never recorded.
        lost_events: img.end.as_ref().map_or(0, |e| e.dropped_events).max(c.lost_events),
        unmatched_frees: c.unmatched_frees,
        ending,
        tracing_stopped,
        exit_status,
        anomalies: Anomalies {
            stream_gaps: stats.gaps,
            undecodable_chunks: stats.decode_errors,
            missing_predecessors: stats.missing_predecessors,
            broken_cycles: stats.broken_cycles,
            forced_events: stats.forced,
            reordered_blocks: c.reordered,
            implausible_events: stats.implausible,
        },
        retention: retention::build(img),
        retention_unavailable: (!img.glibc.enabled).then(|| img.glibc.uncertain.first().cloned().unwrap_or_else(|| "no glibc model".into())),
        timeline,
        size_histogram: sizes::build(img),
        sites: if opts.sites { sites::build(img, symbolizer.clone()) } else { sites::SitesReport::default() },
    };
    name_pinning_sites(&mut r);
    r
}

/// The retention causes name a heap top's pinning block by address: add where it was allocated.
fn name_pinning_sites(r: &mut ProcessReport) {
    let Some(rb) = &r.sites.retention_by_site else { return };
    let Some(ret) = &mut r.retention else { return };
    let name = |causes: &mut Vec<crate::analysis::glibc::explain::Cause>, pins: &[sites::Pin]| {
        for p in pins {
            let Some(site) = &p.site else { continue };
            let at = format!("{:#x}", p.address);
            let loc = match (&site.file, site.line) {
                (Some(f), Some(l)) => format!(" ({}:{l})", crate::symbols::base_name(f)),
                _ => String::new(),
            };
            let by = format!(" (allocated in {}{loc})", site.function);
            for c in causes.iter_mut().filter(|c| c.kind == "top_pinned" && !c.text.contains("(allocated in ")) {
                if p.live && c.text.contains(&at) {
                    c.text = c.text.replacen(&at, &format!("{at}{by}"), 1);
                } else if !p.live && c.arena.as_deref() == Some(p.arena.as_str()) && c.text.contains("a freed ") {
                    // "pinned by a freed N-byte chunk held in …: …"
                    if let Some(i) = c.text.find(": ") {
                        c.text.insert_str(i, &format!(" (its block was allocated in {}{loc})", site.function));
                    }
                }
            }
        }
    };
    name(&mut ret.causes, &rb.top_pinned_by);
    if let Some(peak) = &mut ret.at_peak_rss {
        name(&mut peak.causes, &rb.top_pinned_at_peak_rss);
    }
}
