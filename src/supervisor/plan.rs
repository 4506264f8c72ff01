//! What a reload changes, decided once for both of its paths: the in-place reload of the
//! configuration (no executable to re-execute, or kernel steering) and the new image resuming
//! after an in-place upgrade. Pure: settings in, decisions out.
//!
//! - Settings in [`NEEDS_RESTART`] cannot change under a running lb: they are reported and keep
//!   their running value ([`keep_running`]).
//! - A changed worker count is a scale; a changed worker command or `--user` is a rolling
//!   restart ([`plan`]).

use crate::config::Settings;

/// Settings a reload cannot apply to a running lb: reported, kept at their running value.
pub const NEEDS_RESTART: [&str; 9] = [
    "listen",
    "metrics",
    "control",
    "backlog",
    "log_format",
    "serialization",
    "steering",
    "handoff",
    "worker_output",
];

/// Splits the names of changed settings into (applied while running, needing a restart).
pub fn split(differences: Vec<&'static str>) -> (Vec<&'static str>, Vec<&'static str>) {
    differences
        .into_iter()
        .partition(|name| !NEEDS_RESTART.contains(name))
}

/// `new`, with every setting of [`NEEDS_RESTART`] at its running value from `old`.
pub fn keep_running(old: &Settings, new: Settings) -> Settings {
    Settings {
        listen: old.listen,
        metrics: old.metrics,
        control: old.control.clone(),
        backlog: old.backlog,
        log_format: old.log_format,
        serialization: old.serialization,
        steering: old.steering,
        handoff: old.handoff.clone(),
        worker_output: old.worker_output,
        ..new
    }
}

/// What the workers run, before or after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workers<'a> {
    /// How many slots.
    pub count: usize,
    /// The worker command, resolved (the built-in worker is lb's own path).
    pub argv: &'a [String],
    /// `--user`, by name.
    pub user: Option<&'a str>,
}

/// What to do to the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Changes {
    /// Scale to this many slots.
    pub scale: Option<usize>,
    /// Replace every worker with a rolling restart.
    pub roll: bool,
}

/// The workers' changes from `old` to `new`.
pub fn plan(old: Workers<'_>, new: Workers<'_>) -> Changes {
    Changes {
        scale: (old.count != new.count).then_some(new.count),
        roll: old.argv != new.argv || old.user != new.user,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_count_scales_a_new_command_or_user_rolls() {
        let a = ["node".to_string(), "a.js".to_string()];
        let b = ["node".to_string(), "b.js".to_string()];
        let w = |count, argv: &'static [String], user| Workers { count, argv, user };
        let a: &'static [String] = Box::leak(Box::new(a));
        let b: &'static [String] = Box::leak(Box::new(b));
        assert_eq!(plan(w(2, a, None), w(2, a, None)), Changes::default());
        assert_eq!(
            plan(w(2, a, None), w(4, a, None)),
            Changes {
                scale: Some(4),
                roll: false
            }
        );
        assert!(plan(w(2, a, None), w(2, b, None)).roll);
        assert!(plan(w(2, a, None), w(2, a, Some("nobody"))).roll);
    }

    #[test]
    fn restart_only_settings_are_reported_not_applied() {
        let (applied, restart) = split(vec!["workers", "listen", "policy", "steering", "handoff"]);
        assert_eq!(applied, ["workers", "policy"]);
        assert_eq!(restart, ["listen", "steering", "handoff"]);
    }
}
