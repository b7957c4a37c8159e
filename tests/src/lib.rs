//! Test harness for the end-to-end tests in `tests/tests/`: locates (and if needed builds) the
//! `mtracer` binary and `libmtrace.so` of the profile the tests run in, compiles the C and C++
//! fixtures of `tests/fixtures/` with gcc / g++, runs commands under the tracer, and reads
//! reports as JSON.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::SystemTime;

pub use serde_json::Value;

pub mod fuzz;
pub mod synth;

pub struct Paths {
    pub workspace: PathBuf,
    /// `target/<profile>`: where `mtracer` and `libmtrace.so` are.
    pub bin_dir: PathBuf,
    pub fixtures_out: PathBuf,
}

impl Paths {
    pub fn mtracer(&self) -> PathBuf {
        self.bin_dir.join("mtracer")
    }
    pub fn preload(&self) -> PathBuf {
        self.bin_dir.join("libmtrace.so")
    }
}

/// The binaries of the profile these tests were built with, built first if missing.
pub fn paths() -> &'static Paths {
    static P: OnceLock<Paths> = OnceLock::new();
    P.get_or_init(|| {
        let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        // The test executable lives in target/<profile>/deps/.
        let exe = std::env::current_exe().expect("test executable path");
        let bin_dir = exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf();
        let release = bin_dir.file_name().is_some_and(|n| n == "release");
        let p = Paths { fixtures_out: bin_dir.join("fixtures"), workspace, bin_dir };
        build_binaries(&p, release);
        std::fs::create_dir_all(&p.fixtures_out).unwrap();
        p
    })
}

fn build_binaries(p: &Paths, release: bool) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&p.workspace).args(["build", "-q", "-p", "mtrace-preload", "-p", "mtrace-collector"]);
    if release {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("running cargo build for the binaries under test");
    assert!(st.success(), "building mtracer and libmtrace.so failed");
    assert!(p.mtracer().is_file() && p.preload().is_file(), "mtracer / libmtrace.so missing in {}", p.bin_dir.display());
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Compile `tests/fixtures/<name>.c` with gcc, or `tests/fixtures/<name>.cpp` with g++ when there
/// is no `.c` (once per change of the source or of a header in `tests/fixtures/`), and return the
/// executable.
pub fn fixture(name: &str) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let p = paths();
    let dir = p.workspace.join("tests/fixtures");
    let c = dir.join(format!("{name}.c"));
    let (src, compiler, std) = if c.exists() { (c, "gcc", None) } else { (dir.join(format!("{name}.cpp")), "g++", Some("-std=c++17")) };
    let out = p.fixtures_out.join(name);
    // Fixtures may include shared headers (`#include "retention.h"`).
    let newest_input = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.extension().is_some_and(|x| x == "h"))
        .chain([src.clone()])
        .filter_map(|f| mtime(&f))
        .max();
    let _g = LOCK.lock().unwrap();
    if mtime(&out).is_none() || mtime(&out) < newest_input {
        let tmp = out.with_extension(format!("tmp{}", std::process::id()));
        let o = Command::new(compiler)
            .args(["-O1", "-g", "-fno-builtin", "-pthread", "-Wall", "-Wno-use-after-free", "-Wno-alloc-size-larger-than"])
            .args(std)
            .arg("-o")
            .arg(&tmp)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("{compiler} is needed to build the fixtures (apt-get install {compiler}): {e}"));
        assert!(o.status.success(), "compiling {}:\n{}", src.display(), String::from_utf8_lossy(&o.stderr));
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// Serialises heavy recordings inside one test binary. An 8-thread churn recorded next to three
/// others on a 2-core machine starves the recorder of CPU: its clock barely ticks and whole
/// seconds of events arrive in one pass, so the only order left is causal (and the report then
/// flags the rare blocks it had to admit out of order). Tests about exactness take turns.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A finished `mtracer record` run.
pub struct Recorded {
    pub output: Output,
    pub trace: PathBuf,
    _dir: tempfile::TempDir,
}

impl Recorded {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }
    /// `mtracer report --json` of the trace.
    pub fn report(&self) -> Value {
        report_json(&self.trace)
    }
}

/// Run `cmd` under `mtracer record` (with extra `mtracer` options and environment).
pub fn record(opts: &[&str], cmd: &[&str], env: &[(&str, &str)]) -> Recorded {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.mtr");
    let output = Command::new(paths().mtracer())
        .arg("record")
        .arg("-q")
        .arg("-o")
        .arg(&trace)
        .args(opts)
        .arg("--")
        .args(cmd)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("running mtracer record");
    Recorded { output, trace, _dir: dir }
}

/// `mtracer report --json FILE --timeline-points 0`, parsed.
pub fn report_json(trace: &Path) -> Value {
    let o = Command::new(paths().mtracer()).args(["report", "--json", "--timeline-points", "0"]).arg(trace).output().unwrap();
    assert!(o.status.success(), "mtracer report failed:\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("report JSON")
}

/// Lines `key value` (or `role key value key value ...`) a fixture printed.
pub fn truth(stdout: &str) -> HashMap<String, u64> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// A fixture's `role k1 v1 k2 v2 ...` line as a map.
pub fn role_line(stdout: &str, role: &str) -> HashMap<String, u64> {
    let line = stdout.lines().find(|l| l.split_whitespace().next() == Some(role)).unwrap_or_else(|| panic!("no `{role}` line in:\n{stdout}"));
    let v: Vec<&str> = line.split_whitespace().skip(1).collect();
    v.chunks(2).map(|kv| (kv[0].to_string(), kv[1].parse().unwrap())).collect()
}

/// `report.processes[i][key]` as u64.
pub fn num(p: &Value, key: &str) -> u64 {
    p[key].as_u64().unwrap_or_else(|| panic!("report has no number `{key}`: {p}"))
}

/// The report's anomalies of a process, as (name, count) for the non-zero ones.
pub fn anomalies(p: &Value) -> Vec<(String, u64)> {
    p["anomalies"].as_object().unwrap().iter().filter(|(_, v)| v.as_u64() != Some(0)).map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect()
}

/// Run a python3 script that drives a command in a real pseudo-terminal (80×24): `shell` is run
/// with `sh -c` and `args` as `$0 $1 …`; `body` then talks to it through the globals `fd`
/// (the terminal), `out` (everything received) and `read_until(needle, limit=default_limit)`,
/// and `mode` (the last argument). The script prints the list `steps` it builds, then `out`.
/// Returns the script's stdout and stderr.
pub fn drive_in_pty(shell: &str, default_limit: f64, body: &str, args: &[&std::ffi::OsStr], mode: &str, env: &[(&str, &str)]) -> (String, String) {
    let script = format!(
        r#"
import os, pty, sys, time, select, termios, fcntl, struct
args, mode = sys.argv[1:-1], sys.argv[-1]
pid, fd = pty.fork()
if pid == 0:
    fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 80, 0, 0))
    os.execv('/bin/sh', ['sh', '-c', {shell:?}] + args)
out = b''
def read_until(needle, limit={default_limit:?}):
    global out
    end = time.time() + limit
    while needle not in out and time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return needle in out
{body}
os.waitpid(pid, 0)
sys.stdout.write(repr(steps) + '\n')
sys.stdout.buffer.write(out)
"#
    );
    let o = Command::new("python3").arg("-c").arg(script).args(args).arg(mode).envs(env.iter().copied()).output().expect("python3 is needed");
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// What a pseudo-terminal showed after the command ended (`after`, from its exit marker on,
/// with `stty -a`'s output): back in canonical mode with echo.
pub fn assert_terminal_restored(after: &str) {
    assert!(after.contains(" icanon") && after.contains(" echo") && !after.contains("-icanon") && !after.contains(" -echo "), "the terminal is still raw:\n{after}");
}

/// The raw events of one process image of a trace (see [`raw_events`]).
#[derive(Default, Debug)]
pub struct RawImage {
    pub image: u32,
    /// Stack definitions: id → frames, and how many times each id was defined.
    pub stacks: HashMap<u64, Vec<u64>>,
    pub stack_defs: HashMap<u64, usize>,
    /// `Module` events: (bias, lo, hi, build id, path).
    pub modules: Vec<(u64, u64, u64, Vec<u8>, String)>,
    /// `ModuleUnload` biases.
    pub unloads: Vec<u64>,
    /// Allocation events (malloc family, realloc): (stream, kind, size, stack id or 0).
    pub allocs: Vec<(u32, mtrace_protocol::event::EventKind, u64, u64)>,
    /// Words of allocation events that carried `AUX_HAS_STACK`.
    pub with_stack_flag: usize,
}

/// Every process image's raw events, read with the collector's trace reader (no analysis).
pub fn raw_events(trace: &Path) -> Vec<RawImage> {
    use mtrace_collector::trace::{Record, TraceReader};
    use mtrace_protocol::event::{self, Event, Events};
    let mut r = TraceReader::new(std::io::BufReader::new(std::fs::File::open(trace).unwrap())).unwrap();
    let mut images: std::collections::BTreeMap<u32, RawImage> = Default::default();
    while let Some(frame) = r.next_frame().unwrap() {
        for rec in frame.records() {
            let Record::Chunk(c) = rec.unwrap() else { continue };
            let img = images.entry(c.image).or_insert_with(|| RawImage { image: c.image, ..Default::default() });
            for ev in Events::new(&c.words) {
                let (at, e) = ev.unwrap();
                let w = &c.words[at..];
                match e {
                    Event::Stack { id, .. } => {
                        img.stacks.insert(id, event::stack_frames(w).to_vec());
                        *img.stack_defs.entry(id).or_default() += 1;
                    }
                    Event::Module { bias, lo, hi, .. } => {
                        let mut buf = vec![0u8; 4096];
                        let n = event::module_build_id(w, &mut buf);
                        let bid = buf[..n].to_vec();
                        let n = event::module_path(w, &mut buf);
                        img.modules.push((bias, lo, hi, bid, String::from_utf8_lossy(&buf[..n]).into_owned()));
                    }
                    Event::ModuleUnload { bias } => img.unloads.push(bias),
                    Event::Alloc { kind, size, stack, .. } | Event::Realloc { kind, size, stack, .. } => {
                        img.allocs.push((c.stream, kind, size, stack));
                        if event::split_header(w[0]).2 & event::AUX_HAS_STACK != 0 {
                            img.with_stack_flag += 1;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    images.into_values().collect()
}

/// Function ranges of an executable or library: name → (start, end), link-time addresses
/// (`nm -S`).
pub fn symbol_ranges(bin: &Path) -> HashMap<String, (u64, u64)> {
    let o = Command::new("nm").arg("-S").arg("--defined-only").arg(bin).output().expect("nm (binutils) is needed");
    assert!(o.status.success());
    let mut m = HashMap::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 4 && (f[2] == "T" || f[2] == "t") {
            let start = u64::from_str_radix(f[0], 16).unwrap();
            let size = u64::from_str_radix(f[1], 16).unwrap();
            m.insert(f[3].to_string(), (start, start + size));
        }
    }
    m
}
