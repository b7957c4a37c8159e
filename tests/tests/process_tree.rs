//! fork + exec: every process image appears with its own exact numbers — a fork child starts with
//! its parent's heap, an exec starts a new image with the same pid.

use mtrace_tests::*;

#[test]
fn fork_and_exec_give_one_exact_image_each() {
    let fx = fixture("forkexec");
    let r = record(&[], &[fx.to_str().unwrap()], &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let out = r.stdout();
    let rep = r.report();
    let procs = rep["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 3, "{rep}");
    let by_relation = |rel: &str| procs.iter().find(|p| p["relation"] == rel).unwrap_or_else(|| panic!("no {rel} image: {rep}"));
    let (parent, child, exec) = (by_relation("root"), by_relation("fork"), by_relation("exec"));
    for (p, role) in [(parent, "parent"), (child, "child"), (exec, "exec")] {
        let t = role_line(&out, role);
        for k in ["alloc_count", "free_count", "final_live_bytes", "inherited_live_bytes"] {
            assert_eq!(num(p, k), t[k], "{role} {k}");
        }
        assert_eq!(num(p, "unmatched_frees"), 0, "{role}");
    }
    assert_eq!(num(child, "parent_image"), num(parent, "image"));
    assert_eq!(num(exec, "parent_image"), num(parent, "image"));
    assert_eq!(num(exec, "pid"), num(parent, "pid"));
    assert_ne!(num(child, "pid"), num(parent, "pid"));
    assert_eq!(parent["ending"], "exec");
    assert_eq!(child["ending"], "exited");
    assert_eq!(exec["ending"], "exited");
}

/// The command exits at once, leaving behind an untraced process that starts a traced one 300 ms
/// later: the recorder (their subreaper) sees a descendant alive, waits for the registration,
/// and the late image is in the trace with its exact numbers. (Without the wait, the recording
/// would end as soon as nothing was registered.)
#[test]
fn a_process_started_after_the_command_exited_is_recorded() {
    let fx = fixture("exactness");
    // The inner shell runs without LD_PRELOAD (untraced, never registers) and exits at once; its
    // background subshell (another process, untraced too) sleeps, then execs the fixture with the
    // preload back. Meanwhile no traced process is alive.
    let script = r#"env -u LD_PRELOAD sh -c '(sleep 0.3; exec env LD_PRELOAD="$0" "$1" >"$2") & exit 0' "$LD_PRELOAD" "$FX" "$OUT""#;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fixture.out");
    let r = record(&[], &["sh", "-c", script], &[("FX", fx.to_str().unwrap()), ("OUT", out.to_str().unwrap())]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let rep = r.report();
    let procs = rep["processes"].as_array().unwrap();
    let late = procs.iter().find(|p| p["exe"].as_str() == fx.to_str()).unwrap_or_else(|| panic!("the fixture is not in the trace: {rep}"));
    assert_eq!(late["ending"], "exited", "{late}");
    let truth = truth(&std::fs::read_to_string(&out).unwrap());
    for k in ["alloc_count", "free_count", "final_live_bytes", "peak_live_bytes"] {
        assert_eq!(num(late, k), truth[k], "{k}");
    }
}

/// The recorder is the subreaper of the command's orphans: it reaps them as they exit, while the
/// command still runs. A script that waits for an orphan with `kill -0` (a zombie still answers
/// it) sees it go.
#[test]
fn orphans_are_reaped_while_the_command_runs() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = r#"( sleep 0.2 & echo $! >"$PIDFILE" ); pid=$(cat "$PIDFILE"); n=0
        while kill -0 "$pid" 2>/dev/null; do n=$((n + 1)); [ "$n" -gt 100 ] && exit 3; sleep 0.05; done; echo gone"#;
    let r = record(&[], &["sh", "-c", script], &[("PIDFILE", pidfile.to_str().unwrap())]);
    assert_eq!(r.code(), Some(0), "the orphan stayed a zombie: {}", r.stderr());
    assert_eq!(r.stdout(), "gone\n");
}

/// Started with SIGCHLD ignored (inherited from a parent that ignores it), the recorder still
/// gets the command's exit status (the kernel would otherwise reap the command for nobody), and
/// the command still inherits the ignored SIGCHLD.
#[test]
fn an_inherited_ignored_sigchld_neither_hangs_nor_loses_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.mtr");
    // An ignored signal stays ignored across exec (python3 is one of the suite's real programs).
    let under_ignored_sigchld = |cmd: &[&str]| {
        std::process::Command::new("timeout")
            .args(["30", "python3", "-c", "import os, signal, sys; signal.signal(signal.SIGCHLD, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])"])
            .arg(paths().mtracer())
            .args(["record", "-q", "-o"])
            .arg(&trace)
            .arg("--")
            .args(cmd)
            .output()
            .unwrap()
    };
    let o = under_ignored_sigchld(&["sh", "-c", "exit 5"]);
    assert_eq!(o.status.code(), Some(5), "{}", String::from_utf8_lossy(&o.stderr));
    // SigIgn is a hex mask: SIGCHLD (17) is bit 16, the fifth digit from the right.
    let o = under_ignored_sigchld(&["grep", "-c", "^SigIgn:.*[13579bdf]....$", "/proc/self/status"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "1\n", "the command sees SIGCHLD ignored");
}

/// `report --image N` and `--exe NAME` keep only the images asked for; asking for one the trace
/// does not have is an error that lists those it has.
#[test]
fn report_picks_images_by_number_and_by_executable() {
    let fx = fixture("exactness");
    let r = record(&[], &["sh", "-c", r#""$FX" > /dev/null; true"#], &[("FX", fx.to_str().unwrap())]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let run = |args: &[&str]| {
        let o = std::process::Command::new(paths().mtracer()).arg("report").args(args).arg(&r.trace).output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let images = |json: &str| -> Vec<(u64, String)> {
        let v: Value = serde_json::from_str(json).unwrap();
        v["processes"].as_array().unwrap().iter().map(|p| (p["image"].as_u64().unwrap(), p["exe"].as_str().unwrap().to_string())).collect()
    };
    let (code, all, _) = run(&["--json"]);
    assert_eq!(code, Some(0));
    let all = images(&all);
    assert_eq!(all.len(), 2, "{all:?}");
    let fx_image = all.iter().find(|(_, e)| e.ends_with("/exactness")).expect("the fixture's image").0;
    for args in [&["--json", "--exe", "exactness"][..], &["--json", "--exe", fx.to_str().unwrap()], &["--json", "--image", &fx_image.to_string()]] {
        let (code, out, err) = run(args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert_eq!(images(&out), vec![(fx_image, fx.to_str().unwrap().to_string())], "{args:?}");
    }
    // By the name it was run by (argv[0]): a symbolic link to the fixture, whose exe is the
    // fixture itself.
    let dir = tempfile::tempdir().unwrap();
    let alias = dir.path().join("alias");
    std::os::unix::fs::symlink(&fx, &alias).unwrap();
    let r2 = record(&[], &["sh", "-c", r#""$FX" > /dev/null; true"#], &[("FX", alias.to_str().unwrap())]);
    assert_eq!(r2.code(), Some(0), "{}", r2.stderr());
    let o = std::process::Command::new(paths().mtracer()).args(["report", "--json", "--exe", "alias"]).arg(&r2.trace).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let found = images(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].1, fx.to_str().unwrap());
    // The text report too: one image section.
    let (code, out, _) = run(&["--exe", "exactness"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.matches("== image ").count(), 1, "{out}");
    for (args, what) in [(&["--image", "9"][..], "no process image 9"), (&["--exe", "nope"], "no process image running nope")] {
        let (code, _, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}");
        assert!(err.contains(what) && err.contains(&format!("{fx_image} {}", fx.display())), "{args:?}: {err}");
    }
}
