//! A minimal Rust worker on `lb::worker`: echoes every line it receives, prefixed with its slot.
//!
//! ```sh
//! cargo build --release --example echo_worker
//! lb -w 2 -- target/release/examples/echo_worker
//! nc 127.0.0.1 8000
//! ```

use lb::worker::Worker;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut worker = Worker::from_env()?;
        worker.ready();
        let slot = worker.slot().unwrap_or(0);
        while let Some(conn) = worker.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = conn.stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if write
                        .write_all(format!("[{slot}] {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                    conn.guard.counters().request_done();
                }
            });
        }
        Ok(())
    })
}
