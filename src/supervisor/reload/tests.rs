//! The reload core driven with a fake clock: every path `tests/upgrade.rs` covers with real
//! processes, and the ones it cannot reach (a second SIGHUP in every phase, shutdown in every
//! phase, a settle that gives way four times).

use super::*;

const STEADY_QUIET: Facts = Facts {
    steady: true,
    quiet: true,
    preflight_busy: false,
};
const STEADY_BUSY: Facts = Facts {
    steady: true,
    quiet: false,
    preflight_busy: false,
};
const ROLLING: Facts = Facts {
    steady: false,
    quiet: true,
    preflight_busy: false,
};

fn text(s: &str) -> Option<String> {
    Some(s.to_string())
}

/// Every step until the reload has nothing more to do now.
fn steps(r: &mut Reload, now: Instant, facts: Facts) -> Vec<Step> {
    let mut out = Vec::new();
    while let Some(s) = r.poll(now, facts) {
        let stop = s == Step::Exec || matches!(s, Step::Failed(_));
        out.push(s);
        if stop || out.len() > 10 {
            break;
        }
    }
    out
}

/// A reload whose preflight passed at `t`.
fn checked(t: Instant) -> Reload {
    let mut r = Reload::new("SIGHUP", text("a"));
    assert_eq!(steps(&mut r, t, STEADY_QUIET), [Step::Preflight]);
    assert_eq!(r.preflight_done(Ok(())), Some(Ok(())));
    r
}

#[test]
fn a_steady_quiet_lb_checks_settles_and_re_executes() {
    let t = Instant::now();
    let mut r = checked(t);
    assert_eq!(steps(&mut r, t, STEADY_QUIET), [Step::Pause, Step::Exec]);
    assert_eq!(r.tries, 1);
    assert!(matches!(r.phase, Phase::Settling { .. }));
    assert_eq!(r.poll_timeout(t), Some(t + SETTLE_POLL));
}

#[test]
fn the_reload_waits_for_a_steady_fleet_and_says_so_once() {
    let t = Instant::now();
    let mut r = Reload::new("SIGHUP", None);
    assert_eq!(steps(&mut r, t, ROLLING), [Step::Waiting]);
    assert_eq!(steps(&mut r, t, ROLLING), []);
    assert_eq!(r.poll_timeout(t), None, "the fleet's events wake it");
    // An older preflight still running holds the new one back.
    let busy = Facts {
        preflight_busy: true,
        ..STEADY_QUIET
    };
    assert_eq!(steps(&mut r, t, busy), []);
    assert_eq!(steps(&mut r, t, STEADY_QUIET), [Step::Preflight]);
    assert_eq!(
        steps(&mut r, t, STEADY_QUIET),
        [],
        "one preflight at a time"
    );
}

#[test]
fn a_failed_preflight_ends_the_reload_with_its_line() {
    let t = Instant::now();
    let mut r = Reload::new("SIGHUP", None);
    steps(&mut r, t, STEADY_QUIET);
    assert_eq!(
        r.preflight_done(Err("invalid config".into())),
        Some(Err("invalid config".into()))
    );
    assert_eq!(
        steps(&mut r, t, STEADY_QUIET),
        [Step::Failed("invalid config".into())]
    );
}

#[test]
fn a_settle_that_cannot_finish_gives_way_and_is_tried_four_times() {
    let t0 = Instant::now();
    let mut r = checked(t0);
    let mut t = t0;
    for try_ in 1..=SETTLE_TRIES {
        assert_eq!(steps(&mut r, t, STEADY_BUSY), [Step::Pause], "try {try_}");
        assert_eq!(steps(&mut r, t + SETTLE_LIMIT / 2, STEADY_BUSY), []);
        t += SETTLE_LIMIT;
        if try_ < SETTLE_TRIES {
            assert_eq!(steps(&mut r, t, STEADY_BUSY), [Step::Resume, Step::Retry]);
            assert_eq!(r.poll_timeout(t), Some(t + SETTLE_RETRY));
            assert_eq!(steps(&mut r, t + SETTLE_RETRY / 2, STEADY_BUSY), []);
            t += SETTLE_RETRY;
        }
    }
    let s = steps(&mut r, t, STEADY_BUSY);
    assert_eq!(s[0], Step::Resume);
    assert!(
        matches!(&s[1], Step::Failed(why) if why.contains("not settled (4 tries")),
        "{s:?}"
    );
}

#[test]
fn a_fleet_that_changes_while_settling_makes_the_settle_give_way() {
    let t = Instant::now();
    let mut r = checked(t);
    assert_eq!(steps(&mut r, t, STEADY_BUSY), [Step::Pause]);
    assert_eq!(steps(&mut r, t, ROLLING), [Step::Resume, Step::Retry]);
    // Not before the fleet is steady again and the retry is due.
    let later = t + SETTLE_RETRY;
    assert_eq!(steps(&mut r, later, ROLLING), []);
    assert_eq!(
        steps(&mut r, later, STEADY_QUIET),
        [Step::Pause, Step::Exec]
    );
    assert_eq!(r.tries, 2);
}

#[test]
fn an_exec_that_fails_resumes_and_ends_the_reload() {
    let t = Instant::now();
    let mut r = checked(t);
    assert_eq!(steps(&mut r, t, STEADY_QUIET), [Step::Pause, Step::Exec]);
    r.exec_failed("execve: ENOENT".into());
    assert_eq!(
        steps(&mut r, t, STEADY_QUIET),
        [Step::Resume, Step::Failed("execve: ENOENT".into())]
    );
}

#[test]
fn the_same_text_asked_for_again_changes_nothing_in_any_phase() {
    let t = Instant::now();
    let mut r = Reload::new("SIGHUP", text("a"));
    assert!(!r.again(text("a")));
    steps(&mut r, t, STEADY_QUIET);
    assert!(!r.again(text("a")));
    assert_eq!(r.preflight_done(Ok(())), Some(Ok(())));
    assert!(!r.again(text("a")));
    assert_eq!(steps(&mut r, t, STEADY_BUSY), [Step::Pause]);
    assert!(!r.again(text("a")));
    assert!(matches!(r.phase, Phase::Settling { .. }));
}

#[test]
fn a_changed_text_while_waiting_is_the_one_checked() {
    let t = Instant::now();
    let mut r = Reload::new("SIGHUP", text("a"));
    steps(&mut r, t, ROLLING);
    assert!(r.again(text("b")));
    assert_eq!(steps(&mut r, t, STEADY_QUIET), [Step::Preflight]);
    assert_eq!(r.text, text("b"));
}

#[test]
fn a_changed_text_during_the_preflight_discards_its_verdict_and_checks_again() {
    let t = Instant::now();
    let mut r = Reload::new("SIGHUP", text("a"));
    steps(&mut r, t, STEADY_QUIET);
    assert!(r.again(text("b")));
    assert_eq!(
        r.preflight_done(Ok(())),
        None,
        "a verdict on the older text"
    );
    assert_eq!(steps(&mut r, t, STEADY_QUIET), [Step::Preflight]);
    assert_eq!(r.preflight_done(Ok(())), Some(Ok(())));
    assert_eq!(steps(&mut r, t, STEADY_QUIET), [Step::Pause, Step::Exec]);
    // The same with a failing verdict on the older text: not the reload's end.
    let mut r = Reload::new("SIGHUP", text("a"));
    steps(&mut r, t, STEADY_QUIET);
    r.again(text("b"));
    assert_eq!(r.preflight_done(Err("old text broken".into())), None);
    assert_eq!(steps(&mut r, t, STEADY_QUIET), [Step::Preflight]);
}

#[test]
fn a_changed_text_after_the_preflight_is_checked_before_any_exec() {
    let t = Instant::now();
    let mut r = checked(t);
    assert!(r.again(text("b")));
    assert_eq!(steps(&mut r, t, STEADY_QUIET), [Step::Preflight]);
    assert_eq!(r.tries, 0);
}

#[test]
fn a_changed_text_while_settling_resumes_first_then_checks_again() {
    let t = Instant::now();
    let mut r = checked(t);
    assert_eq!(steps(&mut r, t, STEADY_BUSY), [Step::Pause]);
    assert!(r.again(text("b")));
    assert_eq!(
        steps(&mut r, t, STEADY_QUIET),
        [Step::Resume, Step::Preflight]
    );
    assert_eq!(r.preflight_done(Ok(())), Some(Ok(())));
    assert_eq!(steps(&mut r, t, STEADY_QUIET), [Step::Pause, Step::Exec]);
}

#[test]
fn shutdown_ends_the_reload_in_every_phase_accepting_again_if_it_was_settling() {
    let t = Instant::now();
    let down = || Step::Failed("lb is shutting down".into());
    let mut waiting = Reload::new("SIGHUP", None);
    steps(&mut waiting, t, ROLLING);
    waiting.abandon();
    assert_eq!(steps(&mut waiting, t, STEADY_QUIET), [down()]);
    let mut preflight = Reload::new("SIGHUP", None);
    steps(&mut preflight, t, STEADY_QUIET);
    preflight.abandon();
    assert_eq!(steps(&mut preflight, t, STEADY_QUIET), [down()]);
    assert_eq!(
        preflight.preflight_done(Ok(())),
        None,
        "its verdict no longer matters"
    );
    let mut c = checked(t);
    c.abandon();
    assert_eq!(steps(&mut c, t, STEADY_QUIET), [down()]);
    let mut settling = checked(t);
    steps(&mut settling, t, STEADY_BUSY);
    settling.abandon();
    assert_eq!(
        steps(&mut settling, t, STEADY_QUIET),
        [Step::Resume, down()]
    );
}

#[test]
fn owed_steps_are_due_at_once() {
    let t = Instant::now();
    let mut r = checked(t);
    steps(&mut r, t, STEADY_BUSY);
    r.abandon();
    assert_eq!(r.poll_timeout(t), Some(t));
}
