//! Host facts for the hello and system metrics for keepalives.
//!
//! Only the sysinfo parts the keepalive reports are ever refreshed (no process table),
//! which keeps both the agent's memory and the cost of a keepalive small.
//!
//! Keepalive metric names (tags in brackets):
//! `cpu.usage_percent`, `memory.used_bytes`, `memory.total_bytes`, `load.load1`,
//! `load.load5`, `load.load15`, `disk.used_bytes` / `disk.total_bytes` /
//! `disk.used_percent` [mount], `net.rx_bytes` / `net.tx_bytes` [interface].

use drover_core::metrics::MetricPoint;
use drover_core::resource::SystemFacts;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};
use sysinfo::{DiskRefreshKind, Disks, Networks, System};

/// A stuck filesystem (a hung NFS mount) can block `statvfs` forever; past this the
/// keepalive goes out without metrics, because the keepalive itself is what tells the
/// server the node is alive.
const SAMPLE_LIMIT: Duration = Duration::from_secs(5);

pub(crate) type SharedSampler = Arc<Mutex<Sampler>>;

/// Samples on a blocking thread, bounded by [`SAMPLE_LIMIT`]. While an earlier sample
/// is still stuck, later ones return nothing at once instead of queueing threads.
pub(crate) async fn sample_bounded(sampler: &SharedSampler) -> Vec<MetricPoint> {
    let sampler = sampler.clone();
    let task = tokio::task::spawn_blocking(move || match sampler.try_lock() {
        Ok(mut s) => Some(s.sample()),
        // A panic mid-sample leaves only stale readings behind; keep sampling.
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner().sample()),
        Err(TryLockError::WouldBlock) => None,
    });
    match tokio::time::timeout(SAMPLE_LIMIT, task).await {
        Ok(Ok(Some(points))) => points,
        Ok(Ok(None)) => {
            tracing::warn!("an earlier system metrics sample is still stuck; keepalive sent without metrics");
            Vec::new()
        }
        Ok(Err(e)) => {
            tracing::warn!("system metrics sample failed: {e}");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!(
                "system metrics took over {} s (a hung mount?); keepalive sent without metrics",
                SAMPLE_LIMIT.as_secs()
            );
            Vec::new()
        }
    }
}

pub(crate) fn hostname() -> Option<String> {
    System::host_name().ok().filter(|h| !h.is_empty())
}

/// Holds the sysinfo state between keepalives; CPU usage is a difference between two
/// readings, so the same `System` must be refreshed each time.
pub(crate) struct Sampler {
    system: Option<System>,
    disks: Option<Disks>,
    networks: Option<Networks>,
    last_cpu_refresh: Option<Instant>,
}

impl Sampler {
    pub fn new() -> Self {
        // Each part is optional: a platform or sandbox that hides one of them should
        // cost that part of the keepalive, not the agent.
        let mut system = System::new().ok();
        let last_cpu_refresh = system.as_mut().map(|s| {
            s.refresh_cpu_usage();
            Instant::now()
        });
        Sampler {
            system,
            disks: Disks::new().ok(),
            networks: Networks::new_with_refreshed_list().ok(),
            last_cpu_refresh,
        }
    }

    pub fn facts(&mut self) -> SystemFacts {
        let (cpus, memory_total_bytes) = match &mut self.system {
            Some(s) => {
                s.refresh_memory();
                (s.cpus().len(), s.total_memory())
            }
            None => (0, 0),
        };
        let cpus = if cpus > 0 { cpus } else { std::thread::available_parallelism().map_or(0, |n| n.get()) };
        let os_version = match (System::name(), System::os_version()) {
            (Ok(name), Ok(version)) => format!("{name} {version}"),
            (Ok(name), Err(_)) => name,
            (Err(_), Ok(version)) => version,
            (Err(_), Err(_)) => String::new(),
        };
        SystemFacts {
            hostname: hostname().unwrap_or_default(),
            os: std::env::consts::OS.to_string(),
            os_version,
            kernel: System::kernel_version().unwrap_or_default(),
            arch: System::cpu_arch(),
            cpus,
            memory_total_bytes,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// The first global (not loopback, not link-local) address, IPv4 preferred, as the
    /// entity's default address.
    pub fn primary_address(&self) -> Option<String> {
        let networks = self.networks.as_ref()?;
        let mut candidates: Vec<IpAddr> = networks
            .values()
            .flat_map(|n| n.ip_networks().iter().map(|ip| ip.addr))
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !is_link_local(ip))
            .collect();
        // HashMap order is arbitrary; sorting makes the choice stable across restarts.
        candidates.sort_by_key(|ip| (ip.is_ipv6(), *ip));
        candidates.first().map(|ip| ip.to_string())
    }

    pub fn sample(&mut self) -> Vec<MetricPoint> {
        let now = drover_core::time::now_secs();
        let mut points = Vec::with_capacity(32);
        let mut point = |name: &str, value: f64, tag: Option<(&str, &str)>, unit: Option<&str>| {
            points.push(MetricPoint {
                name: name.to_string(),
                value,
                timestamp: now,
                tags: tag.map(|(k, v)| vec![(k.to_string(), v.to_string())]).unwrap_or_default(),
                unit: unit.map(str::to_string),
            });
        };

        if let Some(s) = &mut self.system {
            // Usage over a shorter span than sysinfo's minimum is noise, not a reading. The
            // first keepalive follows the start at once, so wait out the rest of the span
            // (this runs on a blocking thread) rather than send a keepalive with no CPU.
            if let Some(t) = self.last_cpu_refresh
                && let Some(rest) = sysinfo::MINIMUM_CPU_UPDATE_INTERVAL.checked_sub(t.elapsed())
            {
                std::thread::sleep(rest);
            }
            let usable = self.last_cpu_refresh.is_some();
            s.refresh_cpu_usage();
            self.last_cpu_refresh = Some(Instant::now());
            if usable {
                point("cpu.usage_percent", f64::from(s.global_cpu_usage()), None, Some("%"));
            }
            s.refresh_memory();
            point("memory.used_bytes", s.used_memory() as f64, None, Some("B"));
            point("memory.total_bytes", s.total_memory() as f64, None, Some("B"));
        }
        if let Ok(load) = System::load_average() {
            point("load.load1", load.one, None, None);
            point("load.load5", load.five, None, None);
            point("load.load15", load.fifteen, None, None);
        }
        if let Some(disks) = &mut self.disks {
            // Re-listing picks up mounts that came or went; only sizes are read.
            disks.refresh_specifics(true, DiskRefreshKind::nothing().with_storage());
            for disk in disks.iter() {
                let total = disk.total_space();
                if total == 0 {
                    continue;
                }
                let used = total.saturating_sub(disk.available_space());
                let mount = disk.mount_point().to_string_lossy();
                let tag = Some(("mount", mount.as_ref()));
                point("disk.used_bytes", used as f64, tag, Some("B"));
                point("disk.total_bytes", total as f64, tag, Some("B"));
                point("disk.used_percent", used as f64 * 100.0 / total as f64, tag, Some("%"));
            }
        }
        if let Some(networks) = &mut self.networks {
            networks.refresh(true);
            let mut names: Vec<_> = networks.iter().collect();
            names.sort_by(|a, b| a.0.cmp(b.0));
            for (name, data) in names {
                let name = name.to_string_lossy();
                let tag = Some(("interface", name.as_ref()));
                point("net.rx_bytes", data.total_received() as f64, tag, Some("B"));
                point("net.tx_bytes", data.total_transmitted() as f64, tag, Some("B"));
            }
        }
        points
    }
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_describe_this_host() {
        let facts = Sampler::new().facts();
        assert_eq!(facts.os, std::env::consts::OS);
        assert!(facts.cpus > 0);
        assert!(facts.memory_total_bytes > 0);
        assert_eq!(facts.agent_version, env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn keepalive_metrics_include_memory_and_load() {
        let mut s = Sampler::new();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let points = s.sample();
        let names: Vec<_> = points.iter().map(|p| p.name.as_str()).collect();
        for expected in ["cpu.usage_percent", "memory.used_bytes", "memory.total_bytes", "load.load1"] {
            assert!(names.contains(&expected), "{expected} missing from {names:?}");
        }
    }
}
