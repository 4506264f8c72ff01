//! The connections a worker holds, as the kernel counts them.
//!
//! Some workers never say how many connections they have open: a Node cluster worker gets its
//! connections as `newconn`s and reports no close (Node's own primary does not know either).
//! For those lb notes each connection's (local, peer) address pair when it hands it over, and
//! once a second asks the kernel which of them are still open ([`crate::tcpdiag::open_pairs`]:
//! one sock_diag dump, no byte read, no fd kept). Established and peer-closed (`CLOSE_WAIT`)
//! connections count; one the worker closed does not. A WebSocket counts for as long as it
//! lives, which is what `least-connections` and `--balance-factor` need.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpStream};

use crate::tcpdiag::canonical;

/// A (local, peer) address pair, as the kernel's dump keys it.
pub type Pair = (SocketAddr, SocketAddr);

/// The connections handed to one worker that were still open at the last look.
#[derive(Debug, Default, Clone)]
pub struct Held {
    pairs: HashSet<Pair>,
}

impl Held {
    /// Notes a connection about to be handed over.
    pub fn note(&mut self, stream: &TcpStream) {
        if let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) {
            self.pairs.insert((canonical(local), canonical(peer)));
        }
    }

    /// Keeps the pairs still `open` and says how many there are.
    pub fn refresh(&mut self, open: &HashSet<Pair>) -> u64 {
        self.pairs.retain(|p| open.contains(p));
        self.pairs.len() as u64
    }

    /// The pairs, for lb's next image (an in-place upgrade).
    pub fn to_vec(&self) -> Vec<Pair> {
        self.pairs.iter().copied().collect()
    }

    /// What lb's previous image noted.
    pub fn from_vec(pairs: Vec<Pair>) -> Self {
        Self {
            pairs: pairs.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_connection_counts_until_the_holder_closes_it() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let clients: Vec<_> = (0..3)
            .map(|_| TcpStream::connect(l.local_addr().unwrap()).unwrap())
            .collect();
        let mut held = Held::default();
        let mut servers: Vec<_> = (0..3).map(|_| l.accept().unwrap().0).collect();
        for s in &servers {
            held.note(s);
        }
        let open = crate::tcpdiag::open_pairs().unwrap();
        assert_eq!(held.refresh(&open), 3);
        servers.pop();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while held.clone().refresh(&crate::tcpdiag::open_pairs().unwrap()) != 2 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(clients);
    }
}
