//! The dispatch task against a fake worker on the other end of a `UnixStream::pair()`: what it
//! sends, and what it reports for ACKs, NACKs, a worker that dies with handoffs in flight, and a
//! worker that stops answering.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::*;
use crate::channel::HandoffMsg;

fn limits(handoff: HandoffMsg, stall: Duration) -> Limits {
    Limits {
        window: 4,
        max_line: 64 * 1024,
        stall_timeout: stall,
        serialization: Serialization::Json,
        handoff,
    }
}

const ID: WorkerId = WorkerId {
    slot: 0,
    generation: 1,
};

/// A connected TCP pair: (the client's end, the accepted end lb would hand over).
fn conn() -> (std::net::TcpStream, Handoff) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, peer) = l.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    (c, Handoff::new(s, peer))
}

/// The fake worker: reads one envelope line and the fd that came with it.
fn take_handle(worker: &UnixStream) -> (String, OwnedFd) {
    let mut buf = vec![0u8; 4096];
    let mut fds = VecDeque::new();
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !got.ends_with(b"\n") {
        assert!(std::time::Instant::now() < deadline, "no envelope");
        match sys::recv_with_fds(worker.as_fd(), &mut buf, &mut fds, &mut false) {
            Ok(0) => panic!("channel closed"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2)); // the fake worker polls
            }
            Err(e) => panic!("{e}"),
        }
    }
    (
        String::from_utf8(got).unwrap(),
        fds.pop_front().expect("an fd"),
    )
}

/// A dispatch task for [`ID`] and the fake worker's end of its channel (non-blocking).
fn dispatch(
    handoff: HandoffMsg,
    stall: Duration,
) -> (DispatchHandle, UnixStream, mpsc::UnboundedReceiver<Event>) {
    let (master, worker) = UnixStream::pair().unwrap();
    worker.set_nonblocking(true).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    (start(ID, master, tx, limits(handoff, stall)), worker, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Event>) -> Report {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a report")
        .expect("open")
        .report
}

#[tokio::test]
async fn a_handoff_goes_out_with_its_fd_and_an_ack_closes_lbs_copy() {
    let (d, worker, mut rx) = dispatch(HandoffMsg::Default, Duration::from_secs(5));
    let (mut client, h) = conn();
    d.send(h).unwrap();
    assert_eq!(d.pending(), 1);
    let w = worker.try_clone().unwrap();
    let (line, fd) = tokio::task::spawn_blocking(move || take_handle(&w))
        .await
        .unwrap();
    assert_eq!(line.as_bytes(), crate::channel::HANDLE_ENVELOPE);
    (&worker).write_all(crate::channel::HANDLE_ACK).unwrap();
    assert!(matches!(next(&mut rx).await, Report::Acked { .. }));
    assert_eq!(d.pending(), 0);
    // The worker's copy is the connection: what it writes reaches the client, and when it
    // closes, the client sees EOF (lb holds no copy any more).
    let mut theirs = std::net::TcpStream::from(fd);
    theirs.write_all(b"hi").unwrap();
    drop(theirs);
    let mut got = Vec::new();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hi");
}

#[tokio::test]
async fn the_socketio_handoff_carries_an_empty_chunk() {
    let (d, worker, _rx) = dispatch(HandoffMsg::SocketIo, Duration::from_secs(5));
    let (_client, h) = conn();
    d.send(h).unwrap();
    let w = worker.try_clone().unwrap();
    let (line, _fd) = tokio::task::spawn_blocking(move || take_handle(&w))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
    assert_eq!(v["cmd"], "NODE_HANDLE");
    assert_eq!(
        v["msg"],
        serde_json::json!({"type": "sticky:connection", "data": ""})
    );
}

#[tokio::test]
async fn nacks_are_retried_then_the_connection_comes_back() {
    let (d, worker, mut rx) = dispatch(HandoffMsg::Default, Duration::from_secs(5));
    let (_client, h) = conn();
    d.send(h).unwrap();
    for attempt in 0..=MAX_NACKS {
        let w = worker.try_clone().unwrap();
        let _ = tokio::task::spawn_blocking(move || take_handle(&w))
            .await
            .unwrap();
        (&worker).write_all(crate::channel::HANDLE_NACK).unwrap();
        assert!(
            matches!(next(&mut rx).await, Report::Nacked),
            "attempt {attempt}"
        );
    }
    match next(&mut rx).await {
        Report::Returned(conns, why) => {
            assert_eq!((conns.len(), why), (1, Returned::Nack));
        }
        r => panic!("{r:?}"),
    }
    assert_eq!(d.pending(), 0);
}

#[tokio::test]
async fn a_worker_that_dies_with_handoffs_in_flight_gives_every_one_back() {
    let (d, worker, mut rx) = dispatch(HandoffMsg::Default, Duration::from_secs(5));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (c, h) = conn();
            d.send(h).unwrap();
            c
        })
        .collect();
    let w = worker.try_clone().unwrap();
    let _ = tokio::task::spawn_blocking(move || take_handle(&w))
        .await
        .unwrap();
    drop(worker); // the worker dies without answering
    d.exited();
    let mut back = 0;
    let mut closed = false;
    while back < 3 || !closed {
        match next(&mut rx).await {
            Report::Returned(conns, Returned::WorkerExit) => back += conns.len(),
            Report::Closed => closed = true,
            r => panic!("{r:?}"),
        }
    }
    assert_eq!(back, 3, "every connection handed back, none lost");
    drop(clients);
}

#[tokio::test]
async fn a_worker_that_stops_answering_is_reported_stalled_and_recovered() {
    let (d, worker, mut rx) = dispatch(HandoffMsg::Default, Duration::from_millis(100));
    let (_client, h) = conn();
    d.send(h).unwrap();
    assert!(matches!(next(&mut rx).await, Report::Stalled));
    let w = worker.try_clone().unwrap();
    let _ = tokio::task::spawn_blocking(move || take_handle(&w))
        .await
        .unwrap();
    (&worker).write_all(crate::channel::HANDLE_ACK).unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(next(&mut rx).await);
    }
    assert!(
        seen.iter().any(|r| matches!(r, Report::Recovered)),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|r| matches!(r, Report::Acked { .. })),
        "{seen:?}"
    );
}
