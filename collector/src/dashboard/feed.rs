//! The analysis behind the dashboard, off the terminal's thread, reading the trace as a stream:
//!
//! * a reader thread reads the trace file frame by frame (never the whole file into memory),
//!   either to its end (`mtracer view`, with progress: bytes read of the file's size) or
//!   following it while the recorder writes it (`mtracer run`: at the end of the data it waits
//!   for more until told the recorder finished) — the recorder never waits for it;
//! * an analysis thread feeds every record to one [`Analyzer`] — incrementally, never re-reading
//!   — and publishes a [`DashboardModel`] snapshot every `period` while following, and the final
//!   model at the end.
//!
//! When the analysis falls behind the data, the snapshots say by how much
//! ([`StreamStatus::behind_s`]): how long ago the last analysed data was written.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError};

use super::model::{DashboardModel, Indexing, SitesModel};
use crate::analysis::{Analysis, Analyzer};
use crate::report;
use crate::trace::{Frame, Record, TraceError, TraceReader};

/// How a [`Feed`] reads its trace.
#[derive(Clone, Copy, Debug)]
pub struct FeedOptions {
    /// Follow a trace being written (until [`Feed::writer_finished`]) instead of stopping at the
    /// end of the file; a cut-short tail is then the end of the data, not damage.
    pub follow: bool,
    /// Analyse a damaged trace up to the damage instead of failing.
    pub partial: bool,
    /// Snapshots while following, at most this often (and the final model at the end).
    pub period: Duration,
}

/// What the feed's threads share with the dashboard.
pub struct FeedState {
    /// Bytes of the file read so far, and its size when last looked at.
    pub bytes_read: AtomicU64,
    pub bytes_total: AtomicU64,
    /// Hooked calls analysed so far.
    pub calls: AtomicU64,
    /// Snapshots published so far.
    pub snapshots: AtomicU64,
    /// The final model is published (or the analysis failed).
    pub done: AtomicBool,
    started: Instant,
    /// The reader waits at the end of the data (it has all there is for now).
    at_end: AtomicBool,
    /// The recorder's clock in the newest `Sync` record analysed.
    data_ns: AtomicU64,
    /// Frames read and not analysed yet.
    queued: AtomicU64,
    writer_done: AtomicBool,
    stop: AtomicBool,
    latest: Mutex<Option<DashboardModel>>,
    error: Mutex<Option<String>>,
}

impl FeedState {
    /// Following: how long ago the newest analysed data was written — 0 when the analysis has
    /// everything the file holds (the reader waits at its end, no frame is queued).
    pub fn behind_s(&self) -> f64 {
        let data = self.data_ns.load(Ordering::Relaxed);
        let caught_up = self.at_end.load(Ordering::Acquire) && self.queued.load(Ordering::Acquire) == 0;
        if caught_up || data == 0 || self.done.load(Ordering::Acquire) {
            return 0.0;
        }
        crate::clock::now_ns().saturating_sub(data) as f64 / 1e9
    }

    /// Progress of the reading so far (for the indexing gauge).
    pub fn indexing(&self) -> Indexing {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let calls = self.calls.load(Ordering::Relaxed);
        Indexing {
            bytes_done: self.bytes_read.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            events: calls,
            events_per_s: calls as f64 / secs,
            elapsed_s: secs,
        }
    }
}

/// The running analysis of one trace file.
pub struct Feed {
    pub state: Arc<FeedState>,
}

impl Feed {
    /// Start reading and analysing `path`.
    pub fn start(path: &Path, opts: FeedOptions) -> Feed {
        let state = Arc::new(FeedState {
            bytes_read: AtomicU64::new(0),
            bytes_total: AtomicU64::new(std::fs::metadata(path).map_or(0, |m| m.len())),
            calls: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            done: AtomicBool::new(false),
            started: Instant::now(),
            at_end: AtomicBool::new(false),
            data_ns: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            writer_done: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            latest: Mutex::new(None),
            error: Mutex::new(None),
        });
        // A few frames in flight: the reader decompresses while the analysis works, and memory
        // stays bounded (a frame is at most a few MiB).
        let (tx, rx) = bounded::<Result<Frame, TraceError>>(8);
        let (s, p) = (state.clone(), path.to_path_buf());
        let spawned = std::thread::Builder::new().name("mtrace-feed-read".into()).spawn(move || read_loop(&p, &s, opts, tx));
        if let Err(e) = spawned {
            state.fail(format!("cannot start the trace reader: {e}"));
            return Feed { state };
        }
        let (s, p) = (state.clone(), path.to_path_buf());
        let spawned = std::thread::Builder::new().name("mtrace-feed-analyse".into()).spawn(move || analyse_loop(&p, &s, opts, rx));
        if let Err(e) = spawned {
            state.fail(format!("cannot start the analysis: {e}"));
        }
        Feed { state }
    }

    /// The newest model not taken yet.
    pub fn take_model(&self) -> Option<DashboardModel> {
        self.state.latest.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Why the analysis failed, if it did.
    pub fn error(&self) -> Option<String> {
        self.state.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The final model is out (or the analysis failed).
    pub fn done(&self) -> bool {
        self.state.done.load(Ordering::Acquire)
    }

    /// Following: the writer has finished, the end of the file is the end of the trace.
    pub fn writer_finished(&self) {
        self.state.writer_done.store(true, Ordering::Release);
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        // The threads end at their next look (they hold no terminal and nothing to save).
        self.state.stop.store(true, Ordering::Release);
    }
}

impl FeedState {
    fn fail(&self, e: String) {
        *self.error.lock().unwrap_or_else(|x| x.into_inner()) = Some(e);
        self.done.store(true, Ordering::Release);
    }

    fn publish(&self, m: DashboardModel) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
        self.snapshots.fetch_add(1, Ordering::AcqRel);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// The trace file as a byte stream that counts what was read and, when following, waits at the
/// end of the data for more until the writer has finished.
struct Tail {
    file: File,
    state: Arc<FeedState>,
    follow: bool,
}

impl Read for Tail {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            // Read the flag before the file: data written before the writer finished is seen.
            let finished = !self.follow || self.state.writer_done.load(Ordering::Acquire) || self.state.stopping();
            let n = self.file.read(buf)?;
            if n > 0 {
                self.state.at_end.store(false, Ordering::Release);
                let done = self.state.bytes_read.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                self.state.bytes_total.fetch_max(done, Ordering::Relaxed);
                return Ok(n);
            }
            if finished {
                return Ok(0);
            }
            self.state.at_end.store(true, Ordering::Release);
            if let Ok(m) = self.file.metadata() {
                self.state.bytes_total.fetch_max(m.len(), Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn read_loop(path: &Path, state: &Arc<FeedState>, opts: FeedOptions, tx: crossbeam_channel::Sender<Result<Frame, TraceError>>) {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            let _ = tx.send(Err(TraceError::Io(std::io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))));
            return;
        }
    };
    let tail = Tail { file, state: state.clone(), follow: opts.follow };
    let mut reader = match TraceReader::new(BufReader::with_capacity(1 << 20, tail)) {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    loop {
        if state.stopping() {
            return;
        }
        match reader.next_frame() {
            Ok(Some(f)) => {
                state.queued.fetch_add(1, Ordering::AcqRel);
                if tx.send(Ok(f)).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

/// Describe a reading error as `mtracer report` does.
fn describe(path: &Path, e: &TraceError) -> String {
    let hint = if e.offset().is_some() { "\n(use --partial to analyse what comes before the damage)" } else { "" };
    format!("{}: {e}{hint}", path.display())
}

/// The allocation sites of the live snapshots: symbolising is the costly part of a snapshot, so
/// the sites are rebuilt at most once per [`LiveSites::MIN_PERIOD`] (and never taking more than
/// a tenth of the analysis thread's time: after a build that took `c`, the next waits `10·c`),
/// each image's symbols are cached across rebuilds (only new addresses are looked up), one
/// symbolizer (which keeps the ELF and DWARF files it parsed) serves every rebuild; in between,
/// snapshots carry the latest sites.
struct LiveSites {
    symbolizer: Option<std::rc::Rc<blazesym::symbolize::Symbolizer>>,
    caches: rustc_hash::FxHashMap<u32, crate::symbols::SymbolCache>,
    latest: rustc_hash::FxHashMap<u32, SitesModel>,
    next: Instant,
    /// What the last rebuild cost, in total and per image (for `MTRACE_DASH_STATS`-style checks
    /// and the tests).
    last_cost: Duration,
}

impl LiveSites {
    const MIN_PERIOD: Duration = Duration::from_secs(1);

    fn new() -> LiveSites {
        LiveSites { symbolizer: None, caches: Default::default(), latest: Default::default(), next: Instant::now(), last_cost: Duration::ZERO }
    }

    /// Give `m` (built from `x`) the sites of its images: rebuilt if due (or `force`), else the
    /// latest.
    fn fill(&mut self, x: &Analysis, m: &mut DashboardModel, force: bool) {
        let now = Instant::now();
        if force || now >= self.next {
            let symbolizer = self.symbolizer.get_or_insert_with(|| std::rc::Rc::new(crate::symbols::symbolizer())).clone();
            for img in &x.images {
                let cache = self.caches.entry(img.id).or_default();
                let r = report::sites::build_top(img, symbolizer.clone(), cache, report::sites::MAX_SITES);
                self.latest.insert(img.id, SitesModel::from_report(&r));
            }
            self.last_cost = now.elapsed();
            self.next = Instant::now() + Self::MIN_PERIOD.max(self.last_cost * 10);
            if std::env::var_os("MTRACE_DASH_SITES_COST").is_some() {
                eprintln!("mtrace feed: sites of {} image(s) in {:.1} ms ({} addresses cached)", x.images.len(), self.last_cost.as_secs_f64() * 1e3, self.caches.values().map(|c| c.len()).sum::<usize>());
            }
        }
        for p in &mut m.processes {
            if let Some(s) = self.latest.get(&p.image) {
                p.sites = s.clone();
            }
        }
    }
}

/// The dashboard's model of a complete analysis, with its sites.
pub fn final_model(a: &Analysis) -> DashboardModel {
    let mut m = DashboardModel::from_report(&report::build(a, report::ReportOptions { max_timeline: 0, sites: false }));
    LiveSites::new().fill(a, &mut m, true);
    m
}

fn analyse_loop(path: &Path, state: &Arc<FeedState>, opts: FeedOptions, rx: crossbeam_channel::Receiver<Result<Frame, TraceError>>) {
    let mut a = Analyzer::new();
    let mut damage = None;
    // Snapshots on a fixed schedule (not `period` after the last one, which would add a frame's
    // analysis time to every period): the first at once, then one per `period`.
    let mut next_snapshot = Instant::now();
    let mut dirty = false;
    // The newest recorder clock in the analysed records (Sync records are written every pass
    // of the drain, at least every 10 ms while a process is traced): see `behind_s`.
    let mut data_ns = 0u64;
    let mut sites = LiveSites::new();
    let mut snapshot = |a: &mut Analyzer, state: &FeedState| {
        let mut m = a.peek(|x| {
            let mut m = DashboardModel::from_report(&report::build(x, report::ReportOptions { max_timeline: 0, sites: false }));
            sites.fill(x, &mut m, false);
            m
        });
        // Still being written: not a recording that ended badly.
        m.warnings.retain(|w| !w.starts_with("the recording did not end normally"));
        state.publish(m);
    };
    loop {
        if state.stopping() {
            return;
        }
        let msg = rx.recv_timeout(Duration::from_millis(20));
        match msg {
            Ok(Ok(frame)) => {
                state.queued.fetch_sub(1, Ordering::AcqRel);
                for r in frame.records() {
                    match r {
                        Ok(rec) => {
                            if let Record::Sync { time_ns, .. } = rec {
                                data_ns = data_ns.max(time_ns);
                                state.data_ns.store(data_ns, Ordering::Relaxed);
                            }
                            a.push(rec);
                        }
                        Err(e) => {
                            damage = Some(e);
                            break;
                        }
                    }
                }
                state.calls.store(a.calls(), Ordering::Relaxed);
                dirty = true;
                if damage.is_some() {
                    break;
                }
            }
            Ok(Err(e)) => {
                damage = Some(e);
                break;
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if opts.follow && now >= next_snapshot && (dirty || state.snapshots.load(Ordering::Acquire) == 0) {
            next_snapshot += opts.period;
            if next_snapshot < now {
                // A frame took longer than a period: start the schedule again from now.
                next_snapshot = now + opts.period;
            }
            dirty = false;
            snapshot(&mut a, state);
        }
    }
    let damage = match damage {
        None => None,
        // Following, a frame cut short is where the recorder stopped writing.
        Some(e) if opts.follow => Some(e.to_string()).filter(|_| !matches!(e, TraceError::Truncated { .. })),
        Some(e @ TraceError::Io(_)) => return state.fail(describe(path, &e)),
        Some(e) if !opts.partial => return state.fail(describe(path, &e)),
        Some(e) => Some(e.to_string()),
    };
    let analysis = a.finish(damage);
    // The final sites (only their new addresses symbolised when live snapshots came before).
    let mut m = DashboardModel::from_report(&report::build(&analysis, report::ReportOptions { max_timeline: 0, sites: false }));
    sites.fill(&analysis, &mut m, true);
    state.calls.store(analysis.images.iter().map(|i| i.model.c.calls.values().sum::<u64>()).sum(), Ordering::Relaxed);
    state.publish(m);
    state.done.store(true, Ordering::Release);
}
