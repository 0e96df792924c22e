//! drover's authoritative name server (`drover dns`): static zones plus pools whose answers
//! follow member health as the control plane's watch stream reports it.
//!
//! | module | what lives there |
//! |---|---|
//! | [`config`] | the TOML file (documented there), validated with located errors |
//! | [`zone`] | static records from the config and RFC 1035 zone files (hickory-proto's parser) |
//! | [`pool`] | pools (multivalue, failover, weighted, zone-aware) and Consul-style discovery names from [`pool::Members`] |
//! | [`table`] | the compiled answer table: pre-encoded responses per (name, type), rebuilt whole and swapped on every change; NXDOMAIN/NODATA/CNAME/ANY answers |
//! | [`wire`] | the hot path's allocation-free reader of a query (header, question, OPT, TSIG) |
//! | [`serial`] | SOA serials that follow content and persist across restarts |
//! | [`tsig`] | TSIG hmac-sha256 signing and verification on wire bytes |
//! | [`rrl`] | response rate limiting per source prefix |
//! | [`server`] | startup, the table rebuilt on member changes, TCP (answers and AXFR/IXFR), NOTIFY |
//! | [`udp`] | UDP worker threads on SO_REUSEPORT sockets, queries read and answered in batches (recvmmsg/sendmmsg) |
//!
//! Why not hickory-server's `Catalog`: its request path decodes the whole message into owned
//! records and builds the response record by record, allocating per query; drover's table
//! answers an exact hit by copying pre-encoded bytes. hickory-proto is still the source of
//! truth for the wire format: every template is encoded by it, and tests decode our answers with it.
#![forbid(unsafe_code)]

pub mod config;
pub mod pool;
pub mod rrl;
pub mod serial;
pub mod server;
pub mod table;
pub mod tsig;
pub mod udp;
pub mod wire;
pub mod zone;

pub use config::DnsConfig;
pub use pool::{Members, View};
pub use server::{DnsError, NameServer};
