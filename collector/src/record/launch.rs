//! Running a recording: `mtracer record -- CMD` launches CMD with the preload; `mtracer agent` is
//! started by a standalone preload (`LD_PRELOAD=libmtrace.so CMD`) and serves it.
//!
//! The traced command keeps its stdin, stdout, stderr and exit status; mtracer speaks on stderr
//! only. While the command runs, Ctrl-C reaches it (the terminal signals the whole foreground
//! group) and mtracer keeps recording; SIGTERM and SIGHUP sent to mtracer are passed on. Once the
//! command has exited, mtracer waits for the processes it started that are still traced, like
//! `strace -f`; Ctrl-C then stops the recording.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crate::files::{create_private, Create};
use crate::trace::Record;

use super::server::{self, Server};
use super::sink::SinkThread;
use super::{session_record, Options, Shared, Workers};

/// What happened to the recorded command.
pub struct Outcome {
    /// The exit code mtracer should exit with: the command's, or 128 + signal.
    pub exit_code: i32,
    pub trace_bytes: u64,
    pub images: u32,
    /// The trace file written (empty when the command could not be started).
    pub trace: PathBuf,
}

/// What a recording running in another thread tells a live viewer (`mtracer run`).
#[derive(Default)]
pub struct Progress {
    /// The trace file, once created.
    pub trace: Mutex<Option<PathBuf>>,
    /// The command's exit code (or 128 + signal), once it exited.
    pub exited: Mutex<Option<i32>>,
    /// The recorder's backlog, once it runs.
    pub backlog: Mutex<Option<Arc<super::Backlog>>>,
}

/// A recording behind a live viewer: the command's stdout and stderr go to `log` (its stdin is
/// /dev/null, the keys are the viewer's), and `progress` is kept up to date.
pub struct Live {
    pub log: File,
    pub progress: Arc<Progress>,
}

static CHILD: AtomicI32 = AtomicI32::new(0);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    let child = CHILD.load(Ordering::Acquire);
    if child > 0 {
        if sig == libc::SIGTERM || sig == libc::SIGHUP {
            // SAFETY: kill is async-signal-safe.
            unsafe { libc::kill(child, sig) };
        }
        // SIGINT/SIGQUIT from the terminal already reached the command.
    } else {
        INTERRUPTED.store(true, Ordering::Release);
    }
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only touches atomics and calls kill. Handlers (unlike
        // SIG_IGN) are reset to the default in the exec'd command.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Where is `libmtrace.so`? `$MTRACE_PRELOAD`, else next to this executable, else `../lib`.
pub fn find_preload() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MTRACE_PRELOAD") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(std::fs::canonicalize(&p).unwrap_or(p));
        }
        bail!("MTRACE_PRELOAD names {}, which is not a file", p.display());
    }
    let exe = std::env::current_exe().context("locating the mtracer executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    for cand in [dir.join("libmtrace.so"), dir.join("../lib/libmtrace.so")] {
        if cand.is_file() {
            return Ok(std::fs::canonicalize(&cand).unwrap_or(cand));
        }
    }
    bail!("cannot find libmtrace.so next to {} (build it with `cargo build --release`, or set MTRACE_PRELOAD)", exe.display())
}

/// The control socket's abstract name: ours by pid, and 64 random bits nobody can guess to take
/// it first (the preload also checks whose it is: see `preload/src/session.rs`).
fn socket_name() -> String {
    let mut r = [0u8; 8];
    // SAFETY: getrandom fills the 8 bytes of `r`.
    let got = unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
    let random = if got == 8 { u64::from_ne_bytes(r) } else { crate::clock::now_ns() };
    format!("mtrace-{}-{random:016x}", std::process::id())
}

/// `mtracer record`: run `command` traced, write the trace, return the command's status.
pub fn record(opts: Options, command: &[String], output: Option<PathBuf>, quiet: bool) -> Result<Outcome> {
    record_live(opts, command, output, quiet, None)
}

/// [`record`], optionally behind a live viewer ([`Live`]).
pub fn record_live(mut opts: Options, command: &[String], output: Option<PathBuf>, quiet: bool, live: Option<Live>) -> Result<Outcome> {
    let Some(program) = command.first() else { bail!("no command given (usage: mtracer record -- CMD ARGS...)") };
    let preload = find_preload()?;
    // A trace the user named is created before the command starts: a refused name (a symbolic
    // link, another user's file) stops here, with nothing run. A default name needs the
    // command's pid.
    let early = match &output {
        Some(o) => Some(create_private(o, Create::Replace).context("cannot create the trace")?),
        None => None,
    };
    let name = socket_name();
    let listener = server::listen_abstract(&name)?;

    let mut ld_preload = preload.display().to_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD") {
        let old = old.to_string_lossy();
        if !old.trim().is_empty() {
            ld_preload = format!("{ld_preload}:{old}");
        }
    }
    install_signal_handlers();
    let reaper = become_subreaper();
    // Children must stay waitable: an ignored SIGCHLD inherited from our parent would have the
    // kernel reap them (the command's status with them). The command gets the inherited
    // disposition back below.
    let sigchld_ignored = default_sigchld();
    let mut cmd = Command::new(program);
    cmd.args(&command[1..]).env("LD_PRELOAD", &ld_preload).env("MTRACE_SOCK", format!("@{name}")).env_remove("MTRACE_DISABLE");
    cmd.envs(opts.child_env.iter().map(|(k, v)| (k, v)));
    // SAFETY: the pre-exec hook only calls async-signal-safe functions.
    unsafe {
        cmd.pre_exec(move || {
            // Do not pass our ignored/blocked signals on.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            if sigchld_ignored {
                libc::signal(libc::SIGCHLD, libc::SIG_IGN);
            }
            Ok(())
        });
    }
    if let Some(l) = &live {
        cmd.stdin(Stdio::null()).stdout(l.log.try_clone()?).stderr(l.log.try_clone()?);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
            eprintln!("mtracer: cannot run `{program}`: {e}");
            if let (Some(o), Some(_)) = (&output, early) {
                // Nothing was recorded: leave no empty trace behind.
                let _ = std::fs::remove_file(o);
            }
            return Ok(Outcome { exit_code: code, trace_bytes: 0, images: 0, trace: PathBuf::new() });
        }
    };
    CHILD.store(child.id() as i32, Ordering::Release);
    opts.output = output.unwrap_or_else(|| PathBuf::from(format!("mtrace.{}.mtr", child.id())));
    let file = match early.map_or_else(|| create_private(&opts.output, Create::New), Ok) {
        Ok(f) => f,
        Err(e) => {
            // The command already started; it is traced by nobody. Stop it rather than leave it.
            let _ = child.kill();
            let _ = child.wait();
            bail!("cannot create the trace: {e}");
        }
    };
    lock_while_recording(&file);
    if let Some(l) = &live {
        *l.progress.trace.lock().unwrap_or_else(|e| e.into_inner()) = Some(opts.output.clone());
    }
    if !quiet {
        eprintln!("mtracer: recording pid {} into {}", child.id(), opts.output.display());
    }
    let sink = SinkThread::start(file, Duration::from_millis(100))?;
    let shared = Arc::new(Shared::new(opts.clone(), sink.sink.clone()));
    shared.sink.send(&session_record(&opts, command));
    if let Some(l) = &live {
        *l.progress.backlog.lock().unwrap_or_else(|e| e.into_inner()) = Some(shared.backlog.clone());
    }
    let workers = Workers::start(&shared)?;
    let mut server = Server::new(listener, server::Trust::of(vec![child.id()]));

    let mut status = None;
    let mut waiting_note = None::<Instant>;
    let mut idle_since = None::<Instant>;
    let command_pid = child.id() as libc::pid_t;
    loop {
        server.poll_once(&shared, 5);
        // As a subreaper, reap all along: the command, and the orphans it leaves (a zombie stays
        // "alive" to `kill -0`, which scripts poll).
        let mut exited = None;
        let others_alive = if reaper { reap_children(command_pid, &mut exited) } else { false };
        if status.is_none() {
            if !reaper {
                exited = child.try_wait().context("waiting for the command")?;
            } else if exited.is_none() && !others_alive {
                // No child at all, yet the command's status never came: someone else reaped it.
                bail!("waiting for the command: it was reaped by someone else");
            }
            if let Some(st) = exited {
                status = Some(st);
                CHILD.store(0, Ordering::Release);
                if let Some(l) = &live {
                    *l.progress.exited.lock().unwrap_or_else(|e| e.into_inner()) = Some(exit_code_of(st));
                }
            }
            continue;
        }
        // The command exited: wait for the images still being recorded.
        if INTERRUPTED.load(Ordering::Acquire) {
            break;
        }
        let live = shared.live_images();
        if live == 0 && server.pending() == 0 {
            // Nothing being recorded. A process the command started may still be on its way to
            // registering (between fork or exec and our preload's constructor): as its subreaper
            // we know whether any is alive. None: done at once. Some: wait up to a second for
            // one to register (an untraced one — static, or with LD_PRELOAD dropped — never
            // will, and is not waited for longer). Not a subreaper: a short grace.
            let grace = match reaper.then_some(others_alive) {
                Some(false) => break,
                Some(true) => Duration::from_secs(1),
                None => Duration::from_millis(50),
            };
            let t = *idle_since.get_or_insert_with(Instant::now);
            if t.elapsed() >= grace {
                break;
            }
            continue;
        }
        idle_since = None;
        let t = *waiting_note.get_or_insert_with(Instant::now);
        if t.elapsed() >= Duration::from_secs(1) && !quiet {
            eprintln!("mtracer: the command exited; still recording {live} process(es) it started (Ctrl-C to stop)");
            waiting_note = Some(Instant::now() + Duration::from_secs(3600 * 24 * 365));
        }
    }
    workers.stop(&shared);
    let exit_code = exit_code_of(status.unwrap());
    shared.sink.send(&Record::SessionEnd { time_ns: crate::clock::now_ns(), exit_status: exit_code as i64 });
    let images = shared.images_seen.load(Ordering::Acquire);
    drop(shared);
    drop(server);
    let trace_bytes = sink.finish()?;
    Ok(Outcome { exit_code, trace_bytes, images, trace: opts.output })
}

/// Set SIGCHLD to its default disposition; `true` if it was ignored.
fn default_sigchld() -> bool {
    // SAFETY: sigaction with a valid new action and out-pointer.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGCHLD, &new, &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Make this process the reaper of the command's orphans (`PR_SET_CHILD_SUBREAPER`), so that once
/// the command exits, [`reap_children`] can tell whether anything it started may still
/// register. `false` if the kernel refused.
///
/// An orphan of the command then sees `mtracer` as its parent (`getppid()`) instead of init or
/// the session's own subreaper, as under `tini` or a systemd user session.
fn become_subreaper() -> bool {
    // SAFETY: prctl on this process with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1usize, 0usize, 0usize, 0usize) == 0 }
}

/// Reap every child that has exited: the command (pid `command`; its status goes to
/// `command_status`) and the orphans it left, which are re-parented to us (see
/// [`become_subreaper`]). `true` while any child is still alive (once the command has exited:
/// one it started). The only way the command is waited for once we are a subreaper
/// (`Child::try_wait` would miss a status reaped here).
fn reap_children(command: libc::pid_t, command_status: &mut Option<std::process::ExitStatus>) -> bool {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if r == command {
            *command_status = Some(std::process::ExitStatus::from_raw(status));
            continue;
        }
        if r > 0 {
            continue;
        }
        if r == 0 {
            return true;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false; // ECHILD: no child left
        }
    }
}

/// Hold an exclusive lock on the trace while it is being written: readers that find it locked
/// know the recording is still going on (and wait), rather than mistaking it for a killed one.
/// Released when the file is closed.
fn lock_while_recording(file: &File) {
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(file), libc::LOCK_EX | libc::LOCK_NB) };
}

fn exit_code_of(st: std::process::ExitStatus) -> i32 {
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// `mtracer agent`: serve a standalone preload that handed us its listening socket.
pub fn agent(mut opts: Options, listen_fd: i32, pid: u32, output: PathBuf) -> Result<Outcome> {
    // SAFETY: the preload passed us this descriptor (its listening socket) and nothing else
    // in this process owns it.
    let listener = unsafe { OwnedFd::from_raw_fd(listen_fd) };
    opts.output = output;
    opts.wait_on_exit = true;
    opts.pid_aliases = true;
    // The application has gone on; ignore terminal signals aimed at its process group.
    // SAFETY: setting dispositions of our own process.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // The preload names the file `mtrace.<pid>.mtr` unless MTRACE_OUTPUT says otherwise.
    let default_name = opts.output.file_name().is_some_and(|n| *n == *format!("mtrace.{pid}.mtr"));
    let file = create_private(&opts.output, if default_name { Create::New } else { Create::Replace }).context("cannot create the trace")?;
    lock_while_recording(&file);
    let sink = SinkThread::start(file, Duration::from_millis(100))?;
    let shared = Arc::new(Shared::new(opts.clone(), sink.sink.clone()));
    shared.sink.send(&session_record(&opts, &[format!("(pid {pid}, LD_PRELOAD)")]));
    let workers = Workers::start(&shared)?;
    let mut server = Server::new(listener, server::Trust::of(vec![pid]));
    let started = Instant::now();
    let mut idle_since = None::<Instant>;
    loop {
        server.poll_once(&shared, 5);
        let seen = shared.images_seen.load(Ordering::Acquire);
        if seen == 0 {
            if started.elapsed() > Duration::from_secs(30) {
                break;
            }
            continue;
        }
        if shared.live_images() == 0 && server.pending() == 0 {
            // Grace for children between spawn and registration.
            let t = *idle_since.get_or_insert_with(Instant::now);
            if t.elapsed() >= Duration::from_millis(500) {
                break;
            }
        } else {
            idle_since = None;
        }
    }
    workers.stop(&shared);
    shared.sink.send(&Record::SessionEnd { time_ns: crate::clock::now_ns(), exit_status: -1 });
    let images = shared.images_seen.load(Ordering::Acquire);
    drop(shared);
    drop(server);
    let trace_bytes = sink.finish()?;
    Ok(Outcome { exit_code: 0, trace_bytes, images, trace: opts.output })
}
