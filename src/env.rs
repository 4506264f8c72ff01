//! The master ↔ child contract in the environment and the fd table: every variable name and fd
//! number lb sets for a worker (or for its own next image), in one place, used by both ends — the
//! master ([`crate::spawn`], the shell) and the worker side ([`crate::worker`], the built-in
//! worker). A leaf module.

/// The fd of the worker's channel (Node's `NODE_CHANNEL_FD`).
pub const CHANNEL_FD: i32 = 3;
/// The fd of the slot's listening socket with `--steering kernel`.
pub const LISTEN_FD: i32 = 4;

/// Node's channel fd (always [`CHANNEL_FD`]).
pub const NODE_CHANNEL_FD: &str = "NODE_CHANNEL_FD";
/// Node's channel format: `json` or `advanced`.
pub const NODE_CHANNEL_SERIALIZATION_MODE: &str = "NODE_CHANNEL_SERIALIZATION_MODE";
/// Node's cluster worker id: makes `cluster.isWorker` true (a positive integer, unique per worker).
pub const NODE_UNIQUE_ID: &str = "NODE_UNIQUE_ID";
/// The worker's slot (0-based).
pub const LB_WORKER_ID: &str = "LB_WORKER_ID";
/// pm2's name for the same slot number (0…N-1), which apps and the `config` package read; set
/// unless lb's own environment sets it.
pub const NODE_APP_INSTANCE: &str = "NODE_APP_INSTANCE";
/// Set to [`LISTEN_FD`] when the worker gets its slot's listener (kernel steering).
pub const LB_LISTEN_FD: &str = "LB_LISTEN_FD";
/// How often an `lb::worker` worker sends a heartbeat, in milliseconds.
pub const LB_HEARTBEAT_MS: &str = "LB_HEARTBEAT_MS";
/// Built-in worker: `--client-header-timeout`, in milliseconds.
pub const LB_CLIENT_HEADER_TIMEOUT_MS: &str = "LB_CLIENT_HEADER_TIMEOUT_MS";
/// Built-in worker: `--keepalive-timeout`, in milliseconds.
pub const LB_KEEPALIVE_TIMEOUT_MS: &str = "LB_KEEPALIVE_TIMEOUT_MS";
/// lb's listening port (for cluster apps: `listen(PORT)` attaches to lb's listener).
pub const LB_PORT: &str = "LB_PORT";
/// The same, under the name apps read (set only if lb's own environment has no `PORT`).
pub const PORT: &str = "PORT";
/// An in-place upgrade's state document: the fd of the memfd lb's previous image left.
pub const LB_UPGRADE_STATE: &str = "LB_UPGRADE_STATE";
/// The preflight's config text (`lb check --takeover`).
pub const LB_UPGRADE_CONFIG: &str = "LB_UPGRADE_CONFIG";
