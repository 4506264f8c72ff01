//! The Node primary's half of the cluster protocol (DESIGN §8): `online`, `listening`, `close`,
//! `disconnect`; which answer a worker's `queryServer` gets (lb's own listener for lb's port,
//! else a shared listener lb opens once per server key); malformed messages counted.

use std::time::Instant;

use super::*;

impl Master {
    /// A message of Node's cluster protocol, answered as Node's primary does.
    pub(super) fn on_cluster(&mut self, id: WorkerId, m: ClusterMsg, now: Instant) {
        match m {
            ClusterMsg::Online => self.fleet.on_cluster_online(id),
            ClusterMsg::QueryServer(q) => self.query_server(id, q),
            ClusterMsg::Listening { key } => {
                if self.router.rr_listening(id, &key) {
                    // Listening on lb's port: ready (with or without --wait-ready).
                    self.fleet.on_ready(id, now);
                }
            }
            ClusterMsg::Close { key } => self.router.rr_closed(id, &key),
            ClusterMsg::ExitedAfterDisconnect { .. } => {
                self.fleet.on_leaving(id, now, "cluster disconnect")
            }
            ClusterMsg::NewconnReply { .. } | ClusterMsg::Other => {
                self.shared.metrics.dropped(Dropped::Ignored)
            }
            ClusterMsg::Malformed(why) => {
                self.shared.metrics.dropped(Dropped::Malformed);
                if self.malformed_log.hit(now).is_some() {
                    tracing::warn!(
                        slot = id.slot,
                        "malformed cluster message from a worker ({why}); ignored (logged at most every 5s)"
                    );
                }
            }
        }
        self.apply();
    }

    /// A cluster worker called `listen()`. On lb's port its server is attached to lb's
    /// listener (connections come as `newconn`, chosen by lb's policy); on any other TCP address
    /// lb opens that socket once per key and shares it, as Node's primary would (the kernel
    /// balances those connections, not lb); pipes and UDP are refused with ENOTSUP.
    pub(super) fn query_server(&mut self, id: WorkerId, q: ServerQuery) {
        let Some(d) = self.router.dispatch(id).cloned() else {
            return;
        };
        let lb = self.listen_addr;
        if let Some(lb) = lb
            && q.is_tcp()
            && q.port == i64::from(lb.port())
            && let Some(g) = &mut self.group
        {
            // Kernel steering: the worker's server gets the slot's own listener and accepts
            // from it (like Node's SCHED_NONE, but the kernel picks by client IP).
            let fd = g.listener(id.slot).and_then(|fd| fd.try_clone_to_owned());
            return match fd {
                Ok(fd) => {
                    // What the master hands this worker itself (a down slot's queue) goes to
                    // the same server, as a `newconn`.
                    self.router.rr_answered(id, q.key.clone());
                    d.cluster(ClusterOut::Shared { query: q, fd })
                }
                Err(e) => {
                    tracing::warn!(slot = id.slot, "cannot share the slot's listener: {e}");
                    d.cluster(ClusterOut::Error {
                        query: q,
                        errno: e.raw_os_error().unwrap_or(libc::EINVAL),
                    })
                }
            };
        }
        if let Some(lb) = lb
            && q.is_tcp()
            && q.port == i64::from(lb.port())
        {
            self.router.rr_answered(id, q.key.clone());
            return d.cluster(ClusterOut::RrReply {
                query: q,
                listener: lb,
            });
        }
        if !q.is_tcp() {
            tracing::warn!(
                slot = id.slot,
                "a worker listens on {} (a pipe or UDP): not supported under lb, refused with ENOTSUP",
                q.key
            );
            return d.cluster(ClusterOut::Error {
                query: q,
                errno: libc::ENOTSUP,
            });
        }
        let socket = match self.shared_listeners.get(&q.key) {
            Some(s) => s.try_clone(),
            None => match bind_shared(&q) {
                Ok(s) => {
                    let addr = s.local_addr().ok().and_then(|a| a.as_socket());
                    tracing::info!(
                        slot = id.slot,
                        "a worker listens on {} itself (not lb's port {}): served as a shared socket, balanced by the kernel, not sticky",
                        addr.map_or_else(|| q.key.clone(), |a| a.to_string()),
                        lb.map_or(0, |a| a.port())
                    );
                    let dup = s.try_clone();
                    self.shared_listeners.insert(q.key.clone(), s);
                    dup
                }
                Err(e) => Err(e),
            },
        };
        match socket {
            Ok(s) => d.cluster(ClusterOut::Shared {
                query: q,
                fd: s.into(),
            }),
            Err(e) => {
                tracing::warn!(
                    slot = id.slot,
                    "cannot listen on {} for a worker: {e}",
                    q.key
                );
                d.cluster(ClusterOut::Error {
                    query: q,
                    errno: e.raw_os_error().unwrap_or(libc::EINVAL),
                });
            }
        }
    }
}

/// Opens the listening socket a cluster worker asked for (Node's primary binds `[::]`, both
/// families, for a `listen(port)` without a host), as lb binds its own ([`crate::listener`]).
pub(super) fn bind_shared(q: &ServerQuery) -> std::io::Result<socket2::Socket> {
    let ip: std::net::IpAddr = match q.address.as_deref() {
        Some(a) => a
            .parse()
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL))?,
        None => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let port =
        u16::try_from(q.port).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // Node's backlog for a listen() without one.
    crate::listener::bind_with(SocketAddr::new(ip, port), 511, false).map_err(|e| e.source)
}
