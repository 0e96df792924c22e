//! `drover-db`: the foundation of database failover (issue #6) — everything that
//! touches PostgreSQL or decides about it, as a library the agent, server and proxy wire in.
//!
//! | module | what lives there | runs where |
//! |---|---|---|
//! | [`probe`] | [`probe::probe`] → [`probe::DbStatus`] (role, timeline, LSNs, lag, WAL receiver, sync standbys), bounded by one deadline | agent (local server), server (direct probe of every member) |
//! | [`ops`] | promote, fence, read-only, repoint, rejoin via `pg_rewind`, `synchronous_standby_names`, start/stop; [`ops::Hooks`] for other engines | agent |
//! | [`decide`] | pure failover and switchover decisions from observations, guarded by a term the caller compare-and-swaps | server |
//! | [`lease`] | the primary's lease and self-demotion, the fencing-term check on orders, the timing rule between them | agent (server for `check_timing`) |
//! | [`testing`] (feature `testing`) | [`testing::PgCluster`]: a real PostgreSQL 15 primary + streaming replicas for tests | tests |
//!
//! Nothing here keeps state between calls or talks to the drover server: the caller
//! owns timing, persistence and transport, so every piece is testable on its own.

#![forbid(unsafe_code)]

pub mod decide;
pub mod lease;
pub mod ops;
pub mod probe;
#[cfg(feature = "testing")]
pub mod testing;
