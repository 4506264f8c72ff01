//! The control socket's commands ([`crate::control::Request`], passed in as
//! [`control::Command`]s with their reply channels): one handler per verb, and the `lb roll`
//! callers answered when the roll they asked for has ended.

use std::time::Instant;

use super::*;

impl Master {
    /// One command from the control socket.
    pub(super) fn on_command(&mut self, cmd: control::Command, now: Instant) {
        let refuse = |reply: tokio::sync::oneshot::Sender<Result<(), String>>| {
            let _ = reply.send(Err("lb is shutting down".into()));
        };
        match cmd {
            control::Command::Roll(reply) if self.fleet.shutting_down() => refuse(reply),
            control::Command::Roll(reply) => {
                self.fleet.roll("lb roll", now);
                self.apply();
                self.roll_waiters.push(reply);
            }
            control::Command::Stop(reply) => {
                self.begin_shutdown("lb stop", now);
                // The drain, then the orphans' grace and exit: the longest `lb stop` waits.
                let limit = self.settings.shutdown_timeout + Duration::from_secs(5);
                let _ = reply.send(Ok(serde_json::json!({
                    "pid": std::process::id(),
                    "timeout_ms": limit.as_millis() as u64,
                })));
            }
            control::Command::Reload(reply) => self.request_reload("lb reload", Some(reply)),
            control::Command::Scale(_, reply) if self.fleet.shutting_down() => refuse(reply),
            control::Command::Scale(n, reply) => {
                self.fleet.scale(n, now);
                self.apply();
                let _ = reply.send(Ok(()));
            }
            control::Command::Route(key, reply) => {
                let _ = reply.send(Ok(self.router.explain(key)));
            }
        }
    }

    /// `lb roll` callers get the outcome once no roll is in progress.
    pub(super) fn answer_roll_waiters(&mut self) {
        if self.roll_waiters.is_empty() || self.fleet.rolling() {
            return;
        }
        let outcome = self
            .fleet
            .roll_outcome()
            .cloned()
            .unwrap_or_else(|| Err("no rolling restart ran".into()));
        for w in self.roll_waiters.drain(..) {
            let _ = w.send(outcome.clone());
        }
    }
}
