//! Security: nobody else gets in. Another local user can neither register with a recorder nor
//! pose as one, a traced process that scribbles on its ring cannot take the recorder down, the
//! files mtracer writes are private and never written through a symbolic link, and a setuid
//! program run by another user is not traced (its `MTRACE_*` variables are that user's).
//!
//! The tests that need a second user run as root and use `nobody` (uid 65534) for it; run as
//! another user they print why they skip and pass. The file tests run as anyone.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mtrace_tests::*;

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Root, or a message saying why the test does not run.
fn root_or_skip(test: &str) -> bool {
    if !is_root() {
        eprintln!("{test}: skipped: needs root (to act as a second user, uid {NOBODY})");
    }
    is_root()
}

/// A directory every user can enter and write (the second user's files go there).
fn shared_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("mtrace-sec").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

/// A copy of a fixture any user can run.
fn fixture_in(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(fixture(name), &to).unwrap();
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    to
}

fn as_nobody(cmd: &mut Command) -> &mut Command {
    // std drops the supplementary groups (setgroups) when root sets a uid.
    cmd.uid(NOBODY).gid(NOBODY)
}

/// The abstract name `mtracer` (pid `pid`) listens under, from /proc/net/unix.
fn recorder_socket(pid: u32) -> String {
    let prefix = format!("@mtrace-{pid}-");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let table = std::fs::read_to_string("/proc/net/unix").unwrap();
        if let Some(name) = table.lines().filter_map(|l| l.split_whitespace().nth(7)).find(|n| n.starts_with(&prefix)) {
            return name.to_string();
        }
        assert!(Instant::now() < deadline, "no socket {prefix}… in /proc/net/unix");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process of another user, not started by the recording, that knows the recorder's socket
/// (anyone can read /proc/net/unix) is refused before anything it sends is read: it gets no
/// ring, does not appear in the trace, and the trace notes the refusal. A process of that same
/// user that the traced command started (a service dropping its privileges) is recorded.
#[test]
fn another_users_connection_is_refused_but_the_commands_own_descendants_are_not() {
    if !root_or_skip("another_users_connection_is_refused") {
        return;
    }
    let dir = shared_dir();
    let secure = fixture_in(dir.path(), "secure");
    let trace = dir.path().join("root.mtr");
    let rec = Command::new(paths().mtracer())
        .args(["record", "-q", "-o"])
        .arg(&trace)
        .args(["--", "sleep", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let name = recorder_socket(rec.id());
    let intruder = as_nobody(Command::new(&secure).env("LD_PRELOAD", paths().preload()).env("MTRACE_SOCK", &name)).output().unwrap();
    let rec = rec.wait_with_output().unwrap();
    assert!(rec.status.success(), "{}", String::from_utf8_lossy(&rec.stderr));
    let intruder_err = String::from_utf8_lossy(&intruder.stderr);
    assert!(intruder.status.success(), "{intruder_err}");
    assert_eq!(String::from_utf8_lossy(&intruder.stdout), "preloaded 1 secure 0\n", "the intruder did load the preload");
    // Refused as it connects: its Hello is never read (the preload then finds the connection
    // closed, before or after sending).
    assert!(intruder_err.contains("running untraced") && !intruder_err.contains("recording"), "{intruder_err}");
    let rep = report_json(&trace);
    let exes: Vec<&str> = rep["processes"].as_array().unwrap().iter().map(|p| p["exe"].as_str().unwrap()).collect();
    assert_eq!(exes.len(), 1, "only the traced command: {exes:?}");
    assert!(exes[0].ends_with("/sleep"), "{exes:?}");
    let notes = rep["notes"].to_string();
    assert!(notes.contains(&format!("of uid {NOBODY}: not this user's")), "{notes}");
    assert!(String::from_utf8_lossy(&rec.stderr).contains("refused a connection"), "{}", String::from_utf8_lossy(&rec.stderr));

    // The same user, as a descendant of the traced command: admitted.
    let r = record(&[], &["setpriv", &format!("--reuid={NOBODY}"), &format!("--regid={NOBODY}"), "--clear-groups", secure.to_str().unwrap()], &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    assert_eq!(r.stdout(), "preloaded 1 secure 0\n");
    let rep = r.report();
    let p = rep["processes"].as_array().unwrap().iter().find(|p| p["exe"].as_str().unwrap().ends_with("/secure")).expect("the exec'd image of uid 65534");
    assert!(num(p, "alloc_count") >= 99, "{p}");
    assert_eq!(num(p, "unmatched_frees"), 0);
}

/// Another user listens under the name a standalone preload looks for its parent's agent at,
/// before any agent exists. The preload connects, sees whose the socket is, and sends it
/// nothing — not the Hello with the program's arguments (here a password), not one event — then
/// starts its own agent and records as usual.
#[test]
fn a_squatted_agent_name_gets_nothing() {
    if !root_or_skip("a_squatted_agent_name_gets_nothing") {
        return;
    }
    let dir = shared_dir();
    let squat = fixture_in(dir.path(), "squat");
    let secure = fixture_in(dir.path(), "secure");
    let trace = dir.path().join("own.mtr");
    // The traced program's parent: a shell that waits for the squatter before starting it.
    let mut sh = Command::new("sh")
        .args(["-c", "read go; LD_PRELOAD=\"$1\" MTRACE_OUTPUT=\"$2\" \"$0\" --password=SECRET-TOKEN-42"])
        .arg(&secure)
        .arg(paths().preload())
        .arg(&trace)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let name = format!("mtrace-agent-{}", sh.id());
    let mut squatter = as_nobody(Command::new(&squat).arg(&name).arg("4000")).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(squatter.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    writeln!(sh.stdin.take().unwrap(), "go").unwrap();
    let sh = sh.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&sh.stderr);
    assert!(sh.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&sh.stdout), "preloaded 1 secure 0\n");
    assert!(err.contains(&format!("ignoring @{name}: it belongs to uid {NOBODY}, not to this user")), "{err}");
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(squatter.wait().unwrap().success());
    assert_eq!(line, "connections 1 bytes 0\n", "the squatter was connected to, and got nothing");
    // Recorded all the same, by an agent of its own.
    let rep = report_json(&trace);
    let p = &rep["processes"][0];
    assert!(p["exe"].as_str().unwrap().ends_with("/secure"), "{p}");
    assert!(num(p, "alloc_count") >= 99, "{p}");
}

/// A traced process that tries to shrink and grow its ring (the memfd is sealed: both fail),
/// then writes random bytes over all of it — header, block descriptors, events — and allocates
/// on. The recorder validates what it reads: it neither dies (no SIGBUS, no panic) nor hangs, the
/// command's output and status come through, and the trace it saved reads back with the image
/// and its end, the bogus drop counters of a lossless ring ignored and noted.
#[test]
fn a_ring_its_process_scribbles_on_is_survived() {
    if !root_or_skip("a_ring_its_process_scribbles_on_is_survived") {
        return;
    }
    let r = record(&[], &[fixture("scribble").to_str().unwrap()], &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    assert_eq!(r.stdout(), "shrink EPERM grow EPERM\ndone\n");
    assert!(!r.stderr().contains("panicked"), "{}", r.stderr());
    let rep = r.report();
    let p = &rep["processes"][0];
    assert!(p["exe"].as_str().unwrap().ends_with("/scribble"), "{p}");
    assert_eq!(num(p, "lost_events"), 0, "a lossless ring's counters are not believed");
    assert!(rep["notes"].to_string().contains("wrote over its ring"), "{}", rep["notes"]);
}

/// Traces, exports and logs are 0600 whatever the umask; a symbolic link as the output is
/// refused before the command runs, and its target is left alone — through `record -o`,
/// `export -o` and a standalone preload's `MTRACE_OUTPUT` alike.
#[test]
fn files_are_private_and_never_written_through_a_symbolic_link() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // A permissive umask: the modes are ours, not inherited.
    let sh = |script: &str| Command::new("sh").args(["-c", &format!("umask 000; {script}")]).current_dir(d).output().unwrap();
    let m = paths().mtracer();
    let o = sh(&format!("'{}' record -q -- true && '{}' record -q -o named.mtr -- true", m.display(), m.display()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let default = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("mtrace.")).expect("the default trace");
    assert_eq!(mode(&default), 0o600, "{}", default.display());
    assert_eq!(mode(&d.join("named.mtr")), 0o600);
    let o = sh(&format!("'{}' export --format massif -o massif.out named.mtr", m.display()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(mode(&d.join("massif.out")), 0o600);
    // An existing file written over becomes private too.
    std::fs::set_permissions(d.join("named.mtr"), std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(sh(&format!("'{}' record -q -o named.mtr -- true", m.display())).status.success());
    assert_eq!(mode(&d.join("named.mtr")), 0o600);

    let victim = d.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, d.join("link")).unwrap();
    let o = sh(&format!("'{}' record -o link -- touch ran", m.display()));
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("link is a symbolic link: refusing to write through it"), "{err}");
    assert!(!d.join("ran").exists(), "the command must not run when its trace cannot be written");
    let o = sh(&format!("'{}' export --format massif -o link named.mtr", m.display()));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("symbolic link"));
    // Standalone: the agent refuses the link; the program runs on untraced, as it would bare.
    let o = Command::new("sh").args(["-c", "echo hello"]).current_dir(d).env("LD_PRELOAD", paths().preload()).env("MTRACE_OUTPUT", "link").output().unwrap();
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello\n");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
}

/// A library in the system directory with the set-user-ID bit: the only way ld.so preloads
/// into a setuid program (what `/etc/ld.so.preload` does for every program, which a test must
/// not touch). Removed when dropped.
struct SystemPreload(PathBuf);

impl SystemPreload {
    fn install() -> SystemPreload {
        let dir = ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"].into_iter().map(Path::new).find(|d| d.is_dir()).unwrap();
        let p = dir.join(format!("libmtrace-sectest-{}.so", std::process::id()));
        std::fs::copy(paths().preload(), &p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o4755)).unwrap();
        SystemPreload(p)
    }
    fn name(&self) -> &str {
        self.0.file_name().unwrap().to_str().unwrap()
    }
}

impl Drop for SystemPreload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A setuid-root program, preloaded, run by another user who set `MTRACE_COLLECTOR` (a program
/// of theirs, to be run with euid 0) and `MTRACE_OUTPUT` (a root-owned file, to be written
/// over). The preload sees `AT_SECURE` and traces nothing: the collector never runs, the file is
/// untouched, no trace appears, and the program behaves as bare. The same program without the
/// setuid bit, same user, same variables, does run that collector: the variables are live, and
/// only the secure mode stops them.
#[test]
fn a_setuid_program_run_by_another_user_is_not_traced() {
    if !root_or_skip("a_setuid_program_run_by_another_user_is_not_traced") {
        return;
    }
    let dir = shared_dir();
    let d = dir.path();
    let plain = fixture_in(d, "secure");
    let suid = d.join("secure_suid");
    std::fs::copy(&plain, &suid).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let marker = d.join("collector-ran");
    let evil = d.join("evil.sh");
    std::fs::write(&evil, format!("#!/bin/sh\ntouch '{}'\n", marker.display())).unwrap();
    std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o755)).unwrap();
    let precious = d.join("root-owned");
    std::fs::write(&precious, "root's data").unwrap();
    let lib = SystemPreload::install();
    let run = |prog: &Path| {
        as_nobody(Command::new(prog).current_dir(d).env("LD_PRELOAD", lib.name()).env("MTRACE_COLLECTOR", &evil).env("MTRACE_OUTPUT", &precious))
            .output()
            .unwrap()
    };
    let o = run(&suid);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout), "preloaded 1 secure 1\n", "ld.so did preload us into the setuid program");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "", "not a word from the preload");
    assert!(!marker.exists(), "the user's collector ran with euid 0");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "root's data");
    assert!(!std::fs::read_dir(d).unwrap().any(|e| e.unwrap().file_name().to_str().unwrap().starts_with("mtrace.")));

    let o = run(&plain);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout), "preloaded 1 secure 0\n");
    assert!(marker.exists(), "the control run: MTRACE_COLLECTOR is honoured outside the secure mode");
}

/// The recorder holds at most `--max-rings` rings at once (each is shared memory the traced
/// processes made it create): one more process is refused with a clear message, in the trace and
/// on stderr, and runs on untraced; the recording goes on.
#[test]
fn the_recorder_holds_no_more_rings_than_its_limit() {
    let r = record(&["--max-rings", "1"], &["sh", "-c", "sleep 0.2; echo child ran"], &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    assert_eq!(r.stdout(), "child ran\n");
    let limit = "the recorder holds its limit of 1 rings (64 MiB of shared memory; raise it with --max-rings)";
    assert!(r.stderr().contains(limit), "{}", r.stderr());
    let rep = r.report();
    let exes: Vec<&str> = rep["processes"].as_array().unwrap().iter().map(|p| p["exe"].as_str().unwrap()).collect();
    assert_eq!(exes.len(), 1, "the shell only: {exes:?}");
    assert!(rep["notes"].to_string().contains(limit), "{}", rep["notes"]);
}
