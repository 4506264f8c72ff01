//! Micro-benchmark of one handoff as the master does it: accept4 → sendmsg(NODE_HANDLE + fd) →
//! the worker's recvmsg and ACK → the master reads the ACK and closes its copy.
//! `cargo bench --bench handoff`

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use criterion::{Criterion, criterion_group, criterion_main};
use lb::channel::{HANDLE_ACK, HANDLE_ENVELOPE};
use lb::sys;

fn handoff(c: &mut Criterion) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (master, worker) = UnixStream::pair().unwrap();
    let mut master_r = master.try_clone().unwrap();
    let mut worker_w = worker.try_clone().unwrap();
    let mut buf = [0u8; 256];
    let mut fds = VecDeque::new();
    let mut truncated = false;
    let mut ack = [0u8; 26];
    // The client side is created outside the timed part as far as possible: connect is what a
    // client pays, not the master.
    c.bench_function("accept_send_ack_close", |b| {
        b.iter_batched(
            || TcpStream::connect(addr).unwrap(),
            |client| {
                let (conn, _) = sys::accept(listener.as_fd()).unwrap();
                sys::send_with_fd(master.as_fd(), HANDLE_ENVELOPE, Some(conn.as_fd())).unwrap();
                // worker: receive the envelope and fd, ACK, keep the connection (dropped here)
                let n =
                    sys::recv_with_fds(worker.as_fd(), &mut buf, &mut fds, &mut truncated).unwrap();
                assert_eq!(n, HANDLE_ENVELOPE.len());
                worker_w.write_all(HANDLE_ACK).unwrap();
                fds.clear();
                // master: read the ACK, close its copy
                master_r.read_exact(&mut ack).unwrap();
                drop(conn);
                client
            },
            criterion::BatchSize::NumIterations(64),
        )
    });
    c.bench_function("sendmsg_with_fd_only", |b| {
        let client = TcpStream::connect(addr).unwrap();
        let (conn, _) = listener.accept().unwrap();
        drop(client);
        b.iter(|| {
            sys::send_with_fd(master.as_fd(), HANDLE_ENVELOPE, Some(conn.as_fd())).unwrap();
            sys::recv_with_fds(worker.as_fd(), &mut buf, &mut fds, &mut truncated).unwrap();
            fds.clear();
        })
    });
}

criterion_group!(benches, handoff);
criterion_main!(benches);
