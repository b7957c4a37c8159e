//! The dashboards end to end in a real terminal: `mtracer run` and `mtracer view` driven in tmux
//! (`new-session -d -x 120 -y 40`, `send-keys`, `capture-pane -p`) on a private server
//! (`tmux -L <unique name>`, killed at the end). Skipped, with a message, when tmux is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mtrace_tests::{fixture, heavy, paths, report_json, Value};

/// A private tmux server with one 120×40 session running a shell command.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// None (and a message) when there is no tmux.
    fn start(name: &str, shell: &str) -> Option<Tmux> {
        Tmux::start_sized(name, shell, 120)
    }

    /// [`Tmux::start`] `width` columns wide.
    fn start_sized(name: &str, shell: &str, width: u16) -> Option<Tmux> {
        if !Command::new("tmux").arg("-V").output().is_ok_and(|o| o.status.success()) {
            eprintln!("SKIPPED: tmux is not installed (apt-get install tmux)");
            return None;
        }
        let socket = format!("mtrace-test-{name}-{}", std::process::id());
        let t = Tmux { socket };
        let st = t.tmux(&["new-session", "-d", "-x", &width.to_string(), "-y", "40", shell]);
        assert!(st.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&st.stderr));
        Some(t)
    }

    fn tmux(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().expect("running tmux")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p"]).stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys"];
        args.extend_from_slice(keys);
        assert!(self.tmux(&args).status.success());
    }

    /// The screen once `ok` holds for it, within `limit` seconds (else the test fails showing it).
    fn wait(&self, what: &str, limit: f64, ok: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + Duration::from_secs_f64(limit);
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < end, "waited {limit} s for {what}; the screen:\n{s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for(&self, needle: &str, limit: f64) -> String {
        self.wait(&format!("{needle:?}"), limit, |s| s.contains(needle))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

/// `sh -c` text running `mtracer ARGS` with `env`, then printing its exit status and waiting.
fn shell(env: &[(&str, &Path)], args: &[&str]) -> String {
    let mut s = String::new();
    for (k, v) in env {
        s += &format!("{k}='{}' ", v.display());
    }
    s += &format!("'{}'", paths().mtracer().display());
    for a in args {
        s += &format!(" '{a}'");
    }
    s + "; echo \"mtracer-exit=$?\"; sleep 600"
}

/// `name value` lines of the `MTRACE_DASH_STATS` file.
fn stats(p: &Path) -> std::collections::HashMap<String, f64> {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    text.lines().filter_map(|l| l.split_once(' ')).map(|(k, v)| (k.to_string(), v.parse().unwrap())).collect()
}

/// A line of the screen holding every one of `parts`.
fn has_line(s: &str, parts: &[&str]) {
    assert!(s.lines().any(|l| parts.iter().all(|p| l.contains(p))), "no line with {parts:?}:\n{s}");
}

/// `mtracer run` on run_demo (allocates 100 000 B kept + 10 × 5 000 B, sleeps, frees the ten,
/// exits 3): the numbers on the screen are the fixture's, and the keys work while it runs and
/// after it exited.
#[test]
fn run_in_tmux_shows_the_known_numbers_and_answers_keys() {
    // Alone: it must see the fixture still running, and count frames, next to no churn.
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.mtr");
    let st = dir.path().join("stats");
    let fx = fixture("run_demo");
    let demo_env = PathBuf::from("3000");
    let cmd = shell(&[("MTRACE_DASH_STATS", &st), ("RUN_DEMO_SLEEP_MS", &demo_env)], &["run", "-o", trace.to_str().unwrap(), "--", fx.to_str().unwrap()]);
    let Some(t) = Tmux::start("run", &cmd) else { return };
    t.wait("the command's image", 10.0, |s| s.contains("mtracer run · running") && s.contains("/run_demo"));
    // 120×40: the timeline and the retention panel, one above the other.
    let s = t.wait_for("at the end", 5.0);
    assert!(s.contains("▶ Timeline") && s.contains(" Retention "), "{s}");
    // ? opens the help, any key closes it.
    t.keys(&["?"]);
    t.wait_for("Keys", 3.0);
    t.keys(&["x"]);
    t.wait("the help to close", 3.0, |s| !s.contains("Keys"));
    // p pauses the refreshing and says so; p again resumes.
    t.keys(&["p"]);
    t.wait_for("[paused]", 3.0);
    t.keys(&["p"]);
    t.wait("the pause to end", 3.0, |s| !s.contains("[paused]"));
    // Tab, Tab: the second page, Counters (focused) and the allocation sizes. Every allocation
    // happened before the sleep: 11 mallocs.
    t.keys(&["Tab", "Tab"]);
    let s = t.wait_for("▶ Counters", 3.0);
    assert!(s.contains(" Allocation sizes "), "{s}");
    has_line(&s, &["malloc", " 11 "]);
    assert!(s.contains("mtracer run · running"), "the command still sleeps:\n{s}");
    // The command exits 3; the final model: the ten frees, the block kept.
    let s = t.wait("the end of the recording", 15.0, |s| s.contains("exited with status 3") && s.contains("final live      97.66 KiB in 1 blocks"));
    has_line(&s, &["peak live       146.48 KiB"]);
    has_line(&s, &["free", " 10 "]);
    has_line(&s, &["allocations     11"]);
    has_line(&s, &["lost events     0"]);
    has_line(&s, &["11 allocations · median"]);
    has_line(&s, &["4.00 KiB–8.00 KiB", " 10 ", "48.83 KiB"]);
    has_line(&s, &["64.00 KiB–128.00 KiB", " 1 ", "97.66 KiB"]);
    // The backlog comes from the recorder in `run`.
    has_line(&s, &["backlog         0 B"]);
    // Back to the timeline: the cursor goes to the peak of live bytes (checked below against
    // the report), the retention panel shows the sample there.
    t.keys(&["BTab", "BTab", "g"]);
    let at_peak = t.wait("the cursor's values", 3.0, |s| s.contains("┃cursor "));
    // q quits; mtracer exits with the command's status.
    t.keys(&["q"]);
    let s = t.wait_for("mtracer-exit=", 10.0);
    assert!(s.contains("mtracer-exit=3"), "{s}");
    assert!(s.contains("the command's output is in"), "{s}");
    let r = report_json(&trace);
    assert_eq!(r["processes"][0]["final_live_bytes"].as_u64(), Some(100_000), "{r:#}");
    let peak_t = r["processes"][0]["peak_live_time_s"].as_f64().unwrap();
    has_line(&at_peak, &[&format!("cursor {peak_t:.3} s: live "), " · held ", " · RSS "]);
    has_line(&at_peak, &[&format!("Retention · at the end and at the cursor ({peak_t:.3} s)")]);
    // Refreshed several times a second while the command ran (about 3.5 s).
    let n = stats(&st);
    assert!(n["frames"] >= 12.0 && n["models"] >= 5.0, "{n:?}");
}

/// The malloc-bound churn fixture under `mtracer run`: nothing lost, every call counted, and the
/// screen refreshed at least 4 times a second all along (the analysis, on its own thread, may
/// fall behind — the screen says so — but never holds up the recorder or the screen).
#[test]
fn run_keeps_refreshing_under_churn_and_loses_nothing() {
    let _g = heavy();
    const PAIRS: u64 = 3_000_000;
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("churn.mtr");
    let st = dir.path().join("stats");
    let fx = fixture("churn");
    let cmd = shell(&[("MTRACE_DASH_STATS", &st)], &["run", "-o", trace.to_str().unwrap(), "--", fx.to_str().unwrap(), "1", &PAIRS.to_string()]);
    // Wide enough for the whole header line.
    let Some(t) = Tmux::start_sized("churn", &cmd, 200) else { return };
    let started = Instant::now();
    // The final model: the header ends with the image's ending.
    let s = t.wait("the final model", 120.0, |s| s.starts_with("mtracer run · exited with status 0") && s.lines().next().is_some_and(|l| l.trim_end().ends_with("s · exited")));
    let took = started.elapsed().as_secs_f64();
    assert!(!s.contains("analysis behind by"), "caught up:\n{s}");
    t.keys(&["q"]);
    let s = t.wait_for("mtracer-exit=", 30.0);
    assert!(s.contains("mtracer-exit=0"), "{s}");
    let r: Value = report_json(&trace);
    let p = &r["processes"][0];
    assert_eq!(p["lost_events"].as_u64(), Some(0), "{p:#}");
    assert_eq!(p["unmatched_frees"].as_u64(), Some(0), "{p:#}");
    assert_eq!(p["calls"]["malloc"].as_u64(), Some(PAIRS), "{p:#}");
    assert_eq!(p["size_histogram"]["buckets"][0]["count"].as_u64(), Some(PAIRS), "all the 32-byte requests: {p:#}");
    let n = stats(&st);
    let rate = (n["frames"] - 1.0) / n["span_s"];
    eprintln!("churn under mtracer run: {PAIRS} pairs, {took:.2} s to the final model; {} frames in {:.2} s = {rate:.2}/s, longest gap {:.3} s, {} models", n["frames"], n["span_s"], n["max_gap_s"], n["models"]);
    assert!(rate >= 4.0, "{n:?}");
    assert!(n["span_s"] >= took * 0.8, "the frames cover the run: {n:?} vs {took:.2} s");
}

/// `mtracer view` shows a gauge while it reads the trace, and q quits before the end.
#[test]
fn view_shows_progress_while_reading_and_quits_at_once() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("churn.mtr");
    // About 2 s of analysis here.
    let rec = Command::new(paths().mtracer()).args(["record", "-q", "-o"]).arg(&trace).arg("--").arg(fixture("churn")).args(["1", "3000000"]).output().unwrap();
    assert!(rec.status.success(), "{rec:?}");
    let size = std::fs::metadata(&trace).unwrap().len();
    let cmd = shell(&[], &["view", trace.to_str().unwrap()]);
    let Some(t) = Tmux::start("view", &cmd) else { return };
    // The footer is drawn last: wait for it, not for the first line (a busy machine shows a
    // half-drawn screen in between).
    let s = t.wait_for("q quit", 10.0);
    assert!(s.contains(&format!("reading the trace of: {}", trace.display())), "{s}");
    assert!(s.contains("events analysed") && s.contains("events/s") && s.contains("q quit"), "{s}");
    assert!(s.contains(&format!(" of {} (", mtracer_bytes(size))), "the total is the file's size:\n{s}");
    t.keys(&["q"]);
    let s = t.wait_for("mtracer-exit=", 5.0);
    assert!(s.contains("mtracer-exit=0") && !s.contains("Timeline"), "{s}");
    drop(t);
    // Left to the end, the panels come.
    let Some(t) = Tmux::start("view2", &cmd) else { return };
    let s = t.wait_for("▶ Timeline", 60.0);
    assert!(s.contains("mtracer view · image 0 (1 of 1)"), "{s}");
    t.keys(&["q"]);
    assert!(t.wait_for("mtracer-exit=", 5.0).contains("mtracer-exit=0"));
}

/// `report::text::bytes` as the screen shows sizes.
fn mtracer_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", UNITS[u])
}

/// The terminal goes away under the dashboard (tmux killed): mtracer does not spin on the dead
/// terminal; it ends once the command, which got the hang-up, has ended.
#[test]
fn a_terminal_that_hangs_up_ends_the_dashboard() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.mtr");
    let pid_file = dir.path().join("pid");
    let cmd = format!(
        "echo $$ > '{}'; RUN_DEMO_SLEEP_MS=5000 exec '{}' run -o '{}' -- '{}'",
        pid_file.display(),
        paths().mtracer().display(),
        trace.display(),
        fixture("run_demo").display()
    );
    let Some(t) = Tmux::start("hangup", &cmd) else { return };
    t.wait("the dashboard", 10.0, |s| s.contains("mtracer run · running") && s.contains("/run_demo"));
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    drop(t);
    // Gone, or a zombie nobody reaped yet.
    let alive = || std::fs::read_to_string(proc_dir.join("stat")).is_ok_and(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')));
    let end = Instant::now() + Duration::from_secs(4);
    while alive() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone = !alive();
    if !gone {
        // Do not leave it behind.
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    assert!(gone, "mtracer {pid} still runs 4 s after its terminal went away (the command sleeps 5 s and got SIGHUP)");
}

/// `mtracer view` on a terminal with a trace cut short in a frame: the terminal is given back and
/// the error is `report`'s (exit 2); with `--partial`, the panels of what comes before.
#[test]
fn view_on_a_terminal_reports_damage_like_report() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.mtr");
    let rec = Command::new(paths().mtracer()).args(["record", "-q", "-o"]).arg(&whole).arg("--").arg(fixture("run_demo")).env("RUN_DEMO_SLEEP_MS", "500").output().unwrap();
    assert_eq!(rec.status.code(), Some(3), "{rec:?}");
    // Several frames (the recorder writes one at least every 100 ms); the last one is cut.
    let bytes = std::fs::read(&whole).unwrap();
    let cut = dir.path().join("cut.mtr");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let Some(t) = Tmux::start("damage", &shell(&[], &["view", cut.to_str().unwrap()])) else { return };
    let s = t.wait_for("mtracer-exit=", 10.0);
    assert!(s.contains("mtracer-exit=2") && s.contains("use --partial to analyse what comes before the damage"), "{s}");
    assert!(s.contains(&format!("mtracer: {}: ", cut.display())), "{s}");
    drop(t);
    let Some(t) = Tmux::start("partial", &shell(&[], &["view", "--partial", cut.to_str().unwrap()])) else { return };
    let s = t.wait_for("▶ Timeline", 10.0);
    assert!(s.contains("warning: the trace is damaged"), "{s}");
    t.keys(&["q"]);
    assert!(t.wait_for("mtracer-exit=", 5.0).contains("mtracer-exit=0"));
}
