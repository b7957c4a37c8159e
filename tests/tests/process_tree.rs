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
