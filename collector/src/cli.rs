//! Command-line interface of `mtracer`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::record::{self, Options};
use crate::report;

#[derive(Parser)]
#[command(name = "mtracer", version, about = "Trace every allocation of a program and explain its memory", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct RecordArgs {
    /// Trace file to write (default: mtrace.<pid>.mtr)
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// RSS sampling period in milliseconds
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    sample_ms: u64,
    /// Period of the per-mapping resident-bytes samples (/proc/<pid>/smaps), in milliseconds;
    /// 0: none
    #[arg(long, default_value_t = 100)]
    smaps_interval_ms: u64,
    /// Drop events (counted) instead of slowing the program down when mtracer falls behind
    #[arg(long)]
    lossy: bool,
    /// Size of each process's shared-memory ring, in MiB
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    ring_mb: u64,
    /// How long a traced process waits for a recorder that stopped answering (its ring full,
    /// the recorder's clock standing still) before it stops tracing and runs on untraced, in ms
    #[arg(long, default_value_t = mtrace_protocol::ring::DEFAULT_DETACH_TIMEOUT_MS, value_parser = clap::value_parser!(u32).range(1..=86_400_000))]
    detach_timeout_ms: u32,
    /// Most process images traced at once (each holds a ring of --ring-mb): one more waits for
    /// none and runs untraced, with a note in the trace
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_rings: u32,
    /// Size of one ring block, in KiB (power of two, 4..=128)
    #[arg(long, default_value_t = 64)]
    block_kb: u32,
    /// Pause after every pass over the rings, in microseconds (a longer pause uses less CPU and
    /// needs a larger ring; with --lossy it shows what losses look like)
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=10_000_000))]
    drain_interval_us: u64,
    /// Say nothing on stderr
    #[arg(short, long)]
    quiet: bool,
    /// Record no allocation stacks (sets MTRACE_STACKS=0 for CMD)
    #[arg(long)]
    no_stacks: bool,
    /// Frames per allocation stack (sets MTRACE_STACK_DEPTH; the preload's default is 32)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=mtrace_protocol::event::MAX_STACK_DEPTH as u64))]
    stack_depth: Option<u64>,
    /// Take a stack only for the allocation that crosses each N bytes allocated by a thread
    /// (sets MTRACE_STACK_SAMPLE_BYTES; 0, the default: every allocation)
    #[arg(long)]
    stack_sample_bytes: Option<u64>,
}

impl RecordArgs {
    fn options(&self) -> Result<Options, String> {
        let block = self.block_kb * 1024;
        if !(4096..=mtrace_protocol::ring::MAX_BLOCK_SIZE).contains(&block) || !block.is_power_of_two() {
            return Err(format!("--block-kb must be a power of two between 4 and {}", mtrace_protocol::ring::MAX_BLOCK_SIZE / 1024));
        }
        Ok(Options {
            sample_period: Duration::from_millis(self.sample_ms),
            smaps_period: Duration::from_millis(self.smaps_interval_ms),
            lossy: self.lossy,
            ring_size: self.ring_mb << 20,
            max_rings: self.max_rings,
            detach_timeout_ms: self.detach_timeout_ms,
            block_size: block,
            drain_interval: Duration::from_micros(self.drain_interval_us),
            child_env: [
                self.no_stacks.then(|| ("MTRACE_STACKS".to_string(), "0".to_string())),
                self.stack_depth.map(|d| ("MTRACE_STACK_DEPTH".to_string(), d.to_string())),
                self.stack_sample_bytes.map(|n| ("MTRACE_STACK_SAMPLE_BYTES".to_string(), n.to_string())),
            ]
            .into_iter()
            .flatten()
            .collect(),
            ..Options::default()
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a command under the tracer and save its trace
    Record {
        #[command(flatten)]
        args: RecordArgs,
        /// The command to run, after `--`
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Record like `record` and show the dashboard live while the command runs (when stdout is
    /// not a terminal: record, then print the report's summary)
    Run {
        #[command(flatten)]
        args: RecordArgs,
        /// The command to run, after `--`
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Summarise a trace: per process, calls, live bytes, peak, RSS, timeline
    Report {
        /// The trace file
        file: PathBuf,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
        /// Analyse a damaged trace up to the damage instead of failing
        #[arg(long)]
        partial: bool,
        /// At most this many timeline samples per process (0: all)
        #[arg(long, default_value_t = 1000)]
        timeline_points: usize,
        /// Only this process image, by its number (as the report numbers them, from 0)
        #[arg(long)]
        image: Option<u32>,
        /// Only the process images whose executable is NAME: its file name or path, or the name
        /// it was run by (argv[0], or its file name)
        #[arg(long, value_name = "NAME")]
        exe: Option<String>,
    },
    /// Open a full-screen dashboard on a trace: timeline, retention, arenas, thresholds,
    /// counters, sizes, sites, processes (or, with --print or when stdout is not a terminal, print
    /// one frame)
    View {
        /// The trace file
        file: PathBuf,
        /// Analyse a damaged trace up to the damage instead of failing
        #[arg(long)]
        partial: bool,
        /// Print one frame of this size (e.g. 100x40) as plain text and exit; the default when
        /// stdout is not a terminal is 100x40
        #[arg(long, value_name = "WxH", value_parser = parse_size)]
        print: Option<(u16, u16)>,
        /// The panel to focus (with --print: the only one shown)
        #[arg(long, value_enum)]
        panel: Option<crate::dashboard::app::Panel>,
        /// The process image to show first, by its number in the report (default: the one that
        /// allocated the most)
        #[arg(long)]
        image: Option<u32>,
    },
    /// Write one process image of a trace for other tools: massif (ms_print,
    /// massif-visualizer), folded stacks, a flamegraph SVG, or the timeline as CSV
    Export {
        /// The trace file
        file: PathBuf,
        /// Output format
        #[arg(long, value_enum)]
        format: crate::export::Format,
        /// Write here instead of stdout
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// The process image, by its number in the report (default: the one that allocated the
        /// most)
        #[arg(long)]
        image: Option<u32>,
        /// massif: callers below this percentage of a snapshot's bytes are folded into one line
        #[arg(long, default_value_t = 1.0)]
        threshold: f64,
        /// massif: time in milliseconds, or in bytes allocated (evenly spaced snapshots for
        /// short runs)
        #[arg(long, value_enum, default_value_t = crate::export::massif::TimeUnit::Ms)]
        time_unit: crate::export::massif::TimeUnit,
        /// folded/svg: weigh stacks by bytes live at the peak, leaked at exit, or allocated
        #[arg(long, value_enum, default_value_t = crate::export::Weight::Peak)]
        weight: crate::export::Weight,
        /// Analyse a damaged trace up to the damage instead of failing
        #[arg(long)]
        partial: bool,
    },
    /// Print the records and events of a trace, one per line (for debugging mtrace itself)
    #[command(hide = true)]
    Dump {
        file: PathBuf,
    },
    /// Serve a standalone preload (started by libmtrace.so itself)
    #[command(hide = true)]
    Agent {
        #[arg(long)]
        listen_fd: i32,
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        output: PathBuf,
    },
}

/// Run the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Record { args, command } => record_cmd(&args, &command).0,
        Cmd::Run { args, command } => run_cmd(&args, &command),
        Cmd::Report { file, json, partial, timeline_points, image, exe } => match crate::progress::reading(&file, |p| crate::analysis::analyze_file_observed(&file, partial, p)) {
            Ok(a) => {
                let mut r = report::build(&a, report::ReportOptions { max_timeline: timeline_points, sites: true });
                if let Err(e) = select_images(&mut r, image, exe.as_deref()) {
                    eprintln!("mtracer: {e}");
                    return 2;
                }
                let text = if json {
                    match serde_json::to_string_pretty(&r) {
                        Ok(s) => s + "\n",
                        Err(e) => {
                            eprintln!("mtracer: {e}");
                            return 2;
                        }
                    }
                } else {
                    report::text::render(&r)
                };
                write_stdout(text.as_bytes())
            }
            Err(e) => {
                eprintln!("mtracer: {e:#}");
                2
            }
        },
        Cmd::View { file, partial, print, panel, image } => view(&file, partial, print, panel, image),
        Cmd::Export { file, format, output, image, threshold, weight, time_unit, partial } => {
            export_cmd(&file, crate::export::Options { format, image, threshold, weight, time_unit }, output.as_deref(), partial)
        }
        Cmd::Dump { file } => match crate::trace::dump(&file, &mut std::io::stdout().lock()) {
            Ok(()) => 0,
            Err(crate::trace::TraceError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
            Err(e) => {
                eprintln!("mtracer: {e:#}");
                2
            }
        },
        Cmd::Agent { listen_fd, pid, output } => match record::launch::agent(Options::default(), listen_fd, pid, output) {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("mtracer agent: {e:#}");
                1
            }
        },
    }
}

/// `mtracer record`: record, say where the trace went; returns the exit code and the trace
/// written (none when nothing was recorded).
fn record_cmd(args: &RecordArgs, command: &[String]) -> (i32, Option<PathBuf>) {
    let opts = match args.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mtracer: {e}");
            return (2, None);
        }
    };
    match record::launch::record(opts, command, args.output.clone(), args.quiet) {
        Ok(o) => {
            if !args.quiet && o.trace_bytes > 0 {
                eprintln!(
                    "mtracer: trace saved ({}, {} process image(s)); see `mtracer report {}`",
                    report::text::bytes(o.trace_bytes),
                    o.images,
                    o.trace.display(),
                );
            }
            (o.exit_code, (o.trace_bytes > 0).then_some(o.trace))
        }
        Err(e) => {
            eprintln!("mtracer: {e:#}");
            (2, None)
        }
    }
}

/// `mtracer run`: the live dashboard on a terminal; otherwise `record` followed by the text
/// summary of the trace. Exits with the command's status.
fn run_cmd(args: &RecordArgs, command: &[String]) -> i32 {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() && std::io::stdin().is_terminal() {
        return run_live(args, command);
    }
    let (code, trace) = record_cmd(args, command);
    if let Some(t) = trace {
        print_summary(&t);
    }
    code
}

/// How often `mtracer run` shows a new state of the analysis: 5 times a second. The analysis
/// reads the trace as it is written, record by record, on its own thread
/// ([`crate::dashboard::feed`]); a snapshot costs building the report, not re-reading anything.
const REFRESH: Duration = Duration::from_millis(200);

/// `mtracer run` on a terminal: record in a thread (the command's output going to
/// `<trace>.log`) and show the dashboard on the growing trace until `q`; then wait for the
/// recording to end and exit with the command's status.
fn run_live(args: &RecordArgs, command: &[String]) -> i32 {
    use crate::record::launch::{Live, Progress};
    use std::sync::Arc;
    let opts = match args.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mtracer: {e}");
            return 2;
        }
    };
    // Until the trace's name is known (by default it has the command's pid), the log has ours.
    let (first_log, how) = match &args.output {
        Some(o) => (log_path(o), crate::files::Create::Replace),
        None => (PathBuf::from(format!("mtrace.{}.log", std::process::id())), crate::files::Create::New),
    };
    let log = match crate::files::create_private(&first_log, how) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("mtracer: cannot create the log: {e}");
            return 2;
        }
    };
    let progress = Arc::new(Progress::default());
    let live = Live { log, progress: progress.clone() };
    let (output, cmd) = (args.output.clone(), command.to_vec());
    let recorder = std::thread::spawn(move || record::launch::record_live(opts, &cmd, output, true, Some(live)));
    let Some(trace) = wait_for_trace(&progress, &recorder) else {
        // The command could not be started (the recorder said why) or the recording failed.
        let _ = std::fs::remove_file(&first_log);
        return finish_recording(recorder, None, None, args.quiet);
    };
    let log = log_path(&trace);
    if log != first_log && std::fs::rename(&first_log, &log).is_err() {
        return finish_recording(recorder, Some(&trace), Some(&first_log), args.quiet);
    }
    if let Err(e) = live_dashboard(&trace, command, &progress, &recorder) {
        eprintln!("mtracer: terminal: {e}");
    }
    if !recorder.is_finished() {
        eprintln!("mtracer: dashboard closed; still recording until the command exits");
    }
    finish_recording(recorder, Some(&trace), Some(&log), args.quiet)
}

/// `<trace>.log`: where `mtracer run` sends the command's output.
fn log_path(trace: &std::path::Path) -> PathBuf {
    let mut s = trace.as_os_str().to_owned();
    s.push(".log");
    PathBuf::from(s)
}

/// Wait until the recorder has created the trace (its name), or has given up.
fn wait_for_trace(progress: &crate::record::launch::Progress, recorder: &std::thread::JoinHandle<anyhow::Result<record::launch::Outcome>>) -> Option<PathBuf> {
    loop {
        if let Some(t) = progress.trace.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Some(t);
        }
        if recorder.is_finished() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Join the recorder, say where the trace and the command's output are (unless `quiet`), and
/// return the exit code (the command's).
fn finish_recording(recorder: std::thread::JoinHandle<anyhow::Result<record::launch::Outcome>>, trace: Option<&std::path::Path>, log: Option<&std::path::Path>, quiet: bool) -> i32 {
    let outcome = match recorder.join() {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            eprintln!("mtracer: {e:#}");
            return 2;
        }
        Err(_) => {
            eprintln!("mtracer: the recorder failed");
            return 2;
        }
    };
    if quiet {
        return outcome.exit_code;
    }
    if let (Some(t), true) = (trace, outcome.trace_bytes > 0) {
        eprintln!("mtracer: trace saved in {} ({}); see `mtracer report {}`", t.display(), report::text::bytes(outcome.trace_bytes), t.display());
    }
    if let Some(l) = log {
        eprintln!("mtracer: the command's output is in {}", l.display());
    }
    outcome.exit_code
}

/// The dashboard of `mtracer run`: the analysis follows the trace as the recorder writes it and
/// hands over a new model every [`REFRESH`] (kept while paused), with the command's state and
/// the recorder's backlog in it, and the final model once the recording has ended.
fn live_dashboard(trace: &std::path::Path, command: &[String], progress: &crate::record::launch::Progress, recorder: &std::thread::JoinHandle<anyhow::Result<record::launch::Outcome>>) -> std::io::Result<()> {
    use crate::dashboard::feed::{Feed, FeedOptions};
    use crate::dashboard::{self, app::App, model::{DashboardModel, StreamStatus}, Refresh};
    use std::sync::atomic::Ordering;
    let model = DashboardModel { command: command.join(" "), ..DashboardModel::default() };
    let mut app = App::new(0, 0);
    app.color = dashboard::color_wanted();
    app.live = Some("running".to_string());
    let feed = Feed::start(trace, FeedOptions { follow: true, partial: true, period: REFRESH });
    let mut seen_images = false;
    let mut told_finished = false;
    let mut final_shown = false;
    let mut last_tick = std::time::Instant::now();
    let mut source = |app: &mut App| -> Refresh {
        let exited = *progress.exited.lock().unwrap_or_else(|e| e.into_inner());
        let finished = recorder.is_finished();
        if finished && !told_finished {
            told_finished = true;
            feed.writer_finished();
        }
        let status = match exited {
            None if finished => "recording ended".to_string(),
            None => "running".to_string(),
            Some(c) if finished => format!("exited with status {c}"),
            Some(c) => format!("exited with status {c}; still recording its children"),
        };
        let changed = app.live.as_deref() != Some(status.as_str());
        app.live = Some(status);
        // The screen is refreshed every REFRESH while recording, new model or not: how far
        // behind the analysis is and the recorder's backlog change by themselves.
        let tick = !final_shown && last_tick.elapsed() >= REFRESH;
        let fresh = if final_shown || app.paused { None } else { feed.take_model() };
        if fresh.is_some() {
            final_shown = feed.done() && told_finished;
        }
        if tick || final_shown {
            last_tick = std::time::Instant::now();
            let backlog = progress.backlog.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let st = Some(StreamStatus {
                behind_s: feed.state.behind_s(),
                backlog_bytes: backlog.as_ref().map(|b| b.bytes.load(Ordering::Relaxed)),
                writers_waiting: backlog.as_ref().map(|b| b.writers_waiting.load(Ordering::Relaxed)),
            });
            if app.stream != st {
                app.stream = st;
            }
        }
        let Some(m) = fresh else {
            return if changed || tick { Refresh::Redraw } else { Refresh::Nothing };
        };
        if !seen_images && !m.processes.is_empty() {
            seen_images = true;
            app.observe(&m);
            app.process = m.busiest();
        }
        Refresh::Model(m)
    };
    dashboard::run_live(model, app, &mut source)
}

/// Print the text report of a finished trace (what `mtracer report FILE` prints); problems are
/// reported on stderr and do not change the exit status, which is the command's.
fn print_summary(trace: &std::path::Path) {
    match crate::progress::reading(trace, |p| crate::analysis::analyze_file_observed(trace, false, p)) {
        Ok(a) => {
            let r = report::build(&a, report::ReportOptions { max_timeline: 1000, sites: true });
            write_stdout(report::text::render(&r).as_bytes());
        }
        Err(e) => eprintln!("mtracer: {e:#}"),
    }
}

/// `WIDTHxHEIGHT`, within what a terminal can be.
fn parse_size(s: &str) -> Result<(u16, u16), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| format!("expected WIDTHxHEIGHT (like 100x40), got {s:?}"))?;
    let w: u16 = w.trim().parse().map_err(|_| format!("bad width in {s:?}"))?;
    let h: u16 = h.trim().parse().map_err(|_| format!("bad height in {s:?}"))?;
    if !(20..=1000).contains(&w) || !(5..=1000).contains(&h) {
        return Err(format!("{s}: the width must be 20 to 1000 and the height 5 to 1000"));
    }
    Ok((w, h))
}

/// The image to show first (`--image`, else the busiest) and the app state focused on `panel`,
/// or why not.
fn first_view(model: &crate::dashboard::model::DashboardModel, panel: Option<crate::dashboard::app::Panel>, image: Option<u32>) -> Result<crate::dashboard::app::App, String> {
    use crate::dashboard::{self, app::App};
    let first = match image {
        None => model.busiest(),
        Some(n) => model.processes.iter().position(|p| p.image == n).ok_or_else(|| format!("the trace has no process image {n} (it has {})", model.processes.len()))?,
    };
    let mut app = App::new(model.processes.len(), first);
    app.color = dashboard::color_wanted();
    if let Some(p) = panel.filter(|&p| !app.focus_panel(p)) {
        return Err(format!("the {} panel needs more than one process image", p.title()));
    }
    app.observe(model);
    Ok(app)
}

fn view(file: &std::path::Path, partial: bool, print: Option<(u16, u16)>, panel: Option<crate::dashboard::app::Panel>, image: Option<u32>) -> i32 {
    use crate::dashboard;
    use std::io::IsTerminal;
    let size = match print {
        Some(s) => Some(s),
        None if !std::io::stdout().is_terminal() => Some((100, 40)),
        None => None,
    };
    let Some((w, h)) = size else {
        return view_interactive(file, partial, panel, image);
    };
    // One frame: the whole analysis first; bad input is reported exactly as `report` reports it.
    let a = match crate::progress::reading(file, |p| crate::analysis::analyze_file_observed(file, partial, p)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mtracer: {e:#}");
            return 2;
        }
    };
    let model = dashboard::feed::final_model(&a);
    drop(a);
    let mut app = match first_view(&model, panel, image) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mtracer: {e}");
            return 2;
        }
    };
    app.single = panel.is_some();
    // Plain text has no colours: the timeline's series differ by their marks instead.
    app.color = false;
    let mut text = dashboard::ui::render_text(&model, &app, w, h).join("\n");
    text.push('\n');
    write_stdout(text.as_bytes())
}

/// `mtracer view` on a terminal: the trace is checked (its header) before the terminal is
/// touched, then read and analysed as a stream on other threads while the dashboard shows the
/// progress (q quits at any time); the panels come once the analysis is complete.
fn view_interactive(file: &std::path::Path, partial: bool, panel: Option<crate::dashboard::app::Panel>, image: Option<u32>) -> i32 {
    use crate::dashboard::feed::{Feed, FeedOptions};
    use crate::dashboard::{self, app::App, model::DashboardModel, Refresh};
    use std::time::Instant;
    match std::fs::File::open(file) {
        Ok(f) => {
            crate::analysis::wait_for_recorder(&f, file, Duration::from_secs(30));
            if let Err(e) = crate::trace::TraceReader::new(std::io::BufReader::new(f)) {
                eprintln!("mtracer: {}: {e}", file.display());
                return 2;
            }
        }
        Err(e) => {
            eprintln!("mtracer: cannot open {}: {e}", file.display());
            return 2;
        }
    }
    let feed = Feed::start(file, FeedOptions { follow: false, partial, period: REFRESH });
    let waiting = |feed: &Feed| DashboardModel { command: file.display().to_string(), indexing: Some(feed.state.indexing()), ..DashboardModel::default() };
    let mut app = App::new(0, 0);
    app.color = dashboard::color_wanted();
    let mut failure: Option<String> = None;
    let mut shown = false;
    let mut last = Instant::now();
    let mut source = |app: &mut App| -> Refresh {
        if shown {
            return Refresh::Nothing;
        }
        if let Some(m) = feed.take_model() {
            shown = true;
            return match first_view(&m, panel, image) {
                Ok(mut first) => {
                    // Keys pressed while reading (help, say) still count.
                    first.help = app.help;
                    first.paused = app.paused;
                    *app = first;
                    Refresh::Model(m)
                }
                Err(e) => {
                    failure = Some(e);
                    Refresh::Stop
                }
            };
        }
        if feed.done() {
            failure = Some(feed.error().unwrap_or_else(|| "the analysis ended without a result".to_string()));
            shown = true;
            return Refresh::Stop;
        }
        if last.elapsed() >= REFRESH {
            last = Instant::now();
            return Refresh::Model(waiting(&feed));
        }
        Refresh::Nothing
    };
    let first = waiting(&feed);
    let r = dashboard::run_live(first, app, &mut source);
    if let Some(e) = failure {
        eprintln!("mtracer: {e}");
        return 2;
    }
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mtracer: terminal: {e}");
            2
        }
    }
}

/// `mtracer export`: analyse, then write the export to a file or stdout.
fn export_cmd(file: &std::path::Path, opts: crate::export::Options, output: Option<&std::path::Path>, partial: bool) -> i32 {
    if !(0.0..=100.0).contains(&opts.threshold) {
        eprintln!("mtracer: --threshold must be between 0 and 100 (percent), not {}", opts.threshold);
        return 2;
    }
    let a = match crate::progress::reading(file, |p| crate::analysis::analyze_file_observed(file, partial, p)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mtracer: {e:#}");
            return 2;
        }
    };
    let mut buf = Vec::new();
    if let Err(e) = crate::export::export(&a, &opts, &mut buf) {
        eprintln!("mtracer: {e:#}");
        return 2;
    }
    match output {
        Some(p) => match crate::files::write_private(p, &buf) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("mtracer: cannot write the export: {e}");
                2
            }
        },
        None => write_stdout(&buf),
    }
}

/// Keep only the process images `report --image N` / `--exe NAME` asked for (both: both must
/// hold); an error names what the trace has when nothing is left.
fn select_images(r: &mut report::Report, image: Option<u32>, exe: Option<&str>) -> Result<(), String> {
    if image.is_none() && exe.is_none() {
        return Ok(());
    }
    const LISTED: usize = 12;
    let mut all: Vec<String> = r.processes.iter().take(LISTED).map(|p| format!("{} {}", p.image, p.exe)).collect();
    if r.processes.len() > LISTED {
        all.push(format!("… {} in all", r.processes.len()));
    }
    let is = |path: &str, name: &str| path == name || std::path::Path::new(path).file_name().is_some_and(|f| f == name);
    let runs = |p: &report::ProcessReport, name: &str| is(&p.exe, name) || p.args.first().is_some_and(|a0| is(a0, name));
    r.processes.retain(|p| image.is_none_or(|n| p.image == n) && exe.is_none_or(|e| runs(p, e)));
    if r.processes.is_empty() {
        let wanted = match (image, exe) {
            (Some(n), Some(e)) => format!("image {n} running {e}"),
            (Some(n), None) => format!("process image {n}"),
            (None, Some(e)) => format!("process image running {e}"),
            (None, None) => "process image".to_string(),
        };
        return Err(format!("the trace has no {wanted} (images: {})", all.join(", ")));
    }
    Ok(())
}

/// Write to stdout; a reader that went away (`mtracer report f | head`) is not an error.
fn write_stdout(bytes: &[u8]) -> i32 {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("mtracer: writing to stdout: {e}");
            2
        }
    }
}

