//! Pools and discovery names: from the control plane's member health view (and static
//! members in the config) to the record sets each (name, type) answers with.
//!
//! Orders are deterministic (a hash of pool and member names, not a random shuffle), so two
//! name servers with the same view hand out the same answers in the same sequence.

use crate::config::{DnsConfig, NoneHealthy, Policy, PoolConfig, parse_name};
use crate::table::{Builder, DynamicSet};
use drover_core::health::MemberHealth;
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// The control plane's view, as `drover-feed` hands it over.
pub use drover_core::health::{Members, View};

/// Most pre-encoded variants per (name, type); rotations beyond this repeat.
const MAX_VARIANTS: usize = 64;

#[derive(Debug, Clone)]
struct Candidate {
    entity: String,
    addr: IpAddr,
    weight: u32,
    zone: Option<String>,
    healthy: bool,
    secondary: bool,
}

fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn member_label(entity: &str, parent: &Name) -> Option<Name> {
    Name::from_labels([entity.as_bytes()]).ok()?.append_domain(parent).ok().map(|n| n.to_lowercase())
}

fn candidates(pool: &PoolConfig, members: &Members) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = pool
        .members
        .iter()
        .map(|m| Candidate {
            entity: m.name.clone(),
            addr: m.address,
            weight: m.weight,
            zone: m.zone.clone(),
            healthy: true,
            secondary: m.secondary,
        })
        .collect();
    for m in members.values() {
        let primary = pool.subscription.as_ref().is_some_and(|s| m.subscriptions.contains(s));
        let secondary = !primary && pool.secondary_subscription.as_ref().is_some_and(|s| m.subscriptions.contains(s));
        if !primary && !secondary {
            continue;
        }
        let Some(addr) = m.address.as_deref().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
        out.push(Candidate {
            entity: m.entity.clone(),
            addr,
            weight: m
                .labels
                .get("dns_weight")
                .and_then(|w| w.parse().ok())
                .filter(|w| (1..=1000).contains(w))
                .unwrap_or(1),
            zone: m.labels.get("zone").cloned(),
            healthy: m.passes(&pool.checks),
            secondary,
        });
    }
    out.sort_by_key(|c| fnv(&[&pool.name, &c.entity]));
    out
}

/// The members a pool answers with, policy and the none-healthy rule applied.
fn selected(pool: &PoolConfig, all: &[Candidate]) -> Vec<Candidate> {
    let healthy = |secondary: bool| -> Vec<Candidate> {
        all.iter().filter(|c| c.healthy && c.secondary == secondary).cloned().collect()
    };
    let mut chosen = healthy(false);
    if chosen.is_empty() && pool.policy == Policy::Failover {
        chosen = healthy(true);
    }
    if chosen.is_empty() && pool.when_none_healthy == NoneHealthy::All {
        // Like Route 53: when every member fails its checks, answer them all rather than nothing.
        chosen = all.to_vec();
    }
    chosen
}

/// Rotations (or sliding windows when more members than `n`) of `list`.
fn rotations<T: Clone>(list: &[T], n: usize) -> Vec<Vec<T>> {
    let k = list.len();
    if k == 0 {
        return vec![];
    }
    let count = k.min(MAX_VARIANTS);
    (0..count).map(|i| (0..n.min(k)).map(|j| list[(i * k / count + j) % k].clone()).collect()).collect()
}

/// Smooth weighted round robin slots: each member leads in proportion to its weight.
fn weighted<T: Clone>(list: &[(T, u32)], n: usize) -> Vec<Vec<T>> {
    if list.is_empty() {
        return vec![];
    }
    let total: u32 = list.iter().map(|(_, w)| *w).sum();
    let scale = |w: u32| {
        if total as usize > MAX_VARIANTS { (w as usize * MAX_VARIANTS / total as usize).max(1) } else { w as usize }
    };
    let weights: Vec<i64> = list.iter().map(|(_, w)| scale(*w) as i64).collect();
    let slots: i64 = weights.iter().sum();
    let mut current = vec![0i64; list.len()];
    let mut out = Vec::new();
    for _ in 0..slots {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let best = (0..list.len()).max_by_key(|i| (current[*i], std::cmp::Reverse(*i))).expect("non-empty");
        current[best] -= slots;
        let mut v = vec![list[best].0.clone()];
        v.extend(list.iter().enumerate().filter(|(i, _)| *i != best).map(|(_, (t, _))| t.clone()));
        v.truncate(n);
        out.push(v);
    }
    out
}

/// How a pool turns a member into its record of one type (none when the family differs).
type RecordFor<'a> = dyn Fn(&Candidate) -> Option<Record> + 'a;

fn variants_for(pool: &PoolConfig, list: &[Candidate], rec: &RecordFor) -> Vec<Vec<Record>> {
    let recs: Vec<(Record, u32)> = list.iter().filter_map(|c| rec(c).map(|r| (r, c.weight))).collect();
    match pool.policy {
        Policy::Weighted => weighted(&recs, pool.max_answers),
        _ => rotations(&recs.into_iter().map(|(r, _)| r).collect::<Vec<_>>(), pool.max_answers),
    }
}

fn sorted(mut v: Vec<Record>) -> Vec<Record> {
    v.sort_by_key(|r| r.data.to_string());
    v
}

/// Adds every pool's and discovery name's record sets to `b`.
pub fn add_pools(b: &mut Builder, cfg: &DnsConfig, members: &Members) {
    let client_zones: BTreeSet<&str> = cfg.client_zones.iter().map(|c| c.zone.as_str()).collect();
    for pool in &cfg.pools {
        let Some(name) = parse_name(&pool.name, None).map(|n| n.to_lowercase()) else { continue };
        let all = candidates(pool, members);
        let chosen = selected(pool, &all);
        let ttl = pool.ttl_secs;
        let a = |c: &Candidate| match c.addr {
            IpAddr::V4(v4) => Some(Record::from_rdata(name.clone(), ttl, RData::A(A(v4)))),
            IpAddr::V6(_) => None,
        };
        let aaaa = |c: &Candidate| match c.addr {
            IpAddr::V6(v6) => Some(Record::from_rdata(name.clone(), ttl, RData::AAAA(AAAA(v6)))),
            IpAddr::V4(_) => None,
        };
        let srv = |c: &Candidate| {
            let port = pool.srv_port?;
            let target = member_label(&c.entity, &name)?;
            Some(Record::from_rdata(name.clone(), ttl, RData::SRV(SRV::new(0, c.weight as u16, port, target))))
        };
        let mut types: Vec<(RecordType, &RecordFor)> = vec![(RecordType::A, &a), (RecordType::AAAA, &aaaa)];
        if pool.srv_port.is_some() {
            types.push((RecordType::SRV, &srv));
        }
        // SRV targets resolve to the member's own address, health or not: the SRV set decides who is in.
        let mut additional = Vec::new();
        if pool.srv_port.is_some() {
            for c in &all {
                let Some(target) = member_label(&c.entity, &name) else { continue };
                let (rtype, data) = match c.addr {
                    IpAddr::V4(v4) => (RecordType::A, RData::A(A(v4))),
                    IpAddr::V6(v6) => (RecordType::AAAA, RData::AAAA(AAAA(v6))),
                };
                let r = Record::from_rdata(target.clone(), ttl, data);
                additional.push(r.clone());
                b.add_dynamic(
                    rtype,
                    DynamicSet {
                        name: target,
                        variants: vec![vec![r.clone()]],
                        by_zone: vec![],
                        canonical: vec![r],
                        additional: vec![],
                    },
                );
            }
        }
        for (rtype, rec) in types {
            let by_zone = if pool.policy == Policy::ZoneAware {
                client_zones
                    .iter()
                    .map(|z| {
                        let local: Vec<Candidate> =
                            chosen.iter().filter(|c| c.zone.as_deref() == Some(*z)).cloned().collect();
                        // The asker's zone first: only its members while any is healthy, else all.
                        let list = if local.iter().any(|c| rec(c).is_some()) { local } else { chosen.clone() };
                        (z.to_string(), variants_for(pool, &list, rec))
                    })
                    .collect()
            } else {
                vec![]
            };
            let canonical = sorted(chosen.iter().filter_map(rec).collect());
            b.add_dynamic(
                rtype,
                DynamicSet {
                    name: name.clone(),
                    variants: variants_for(pool, &chosen, rec),
                    by_zone,
                    canonical,
                    additional: additional.clone(),
                },
            );
        }
    }
    if let Some(d) = &cfg.discovery {
        add_discovery(b, d, members);
    }
}

/// Consul-style names: `<subscription>.service.<domain>` (healthy members, up to 8, rotated)
/// and `<entity>.node.<domain>` (the entity's address).
fn add_discovery(b: &mut Builder, d: &crate::config::Discovery, members: &Members) {
    let Some(domain) = parse_name(&d.domain, None).map(|n| n.to_lowercase()) else { return };
    let Ok(service_parent) = Name::from_labels(["service"]).and_then(|n| n.append_domain(&domain)) else { return };
    let Ok(node_parent) = Name::from_labels(["node"]).and_then(|n| n.append_domain(&domain)) else { return };
    let mut services: BTreeMap<&str, Vec<(&MemberHealth, IpAddr)>> = BTreeMap::new();
    for m in members.values() {
        let Some(addr) = m.address.as_deref().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
        for s in &m.subscriptions {
            services.entry(s.as_str()).or_default().push((m, addr));
        }
        let Some(node) = member_label(&m.entity, &node_parent) else { continue };
        let (rtype, data) = match addr {
            IpAddr::V4(v4) => (RecordType::A, RData::A(A(v4))),
            IpAddr::V6(v6) => (RecordType::AAAA, RData::AAAA(AAAA(v6))),
        };
        let r = Record::from_rdata(node.clone(), d.ttl_secs, data);
        b.add_dynamic(
            rtype,
            DynamicSet {
                name: node,
                variants: vec![vec![r.clone()]],
                by_zone: vec![],
                canonical: vec![r],
                additional: vec![],
            },
        );
    }
    for (s, ms) in services {
        // Agents subscribe to `entity:NAME` for themselves; those are not services.
        if s.contains(':') {
            continue;
        }
        let Some(name) = member_label(s, &service_parent) else { continue };
        let mut healthy: Vec<&(&MemberHealth, IpAddr)> = ms.iter().filter(|(m, _)| m.healthy).collect();
        healthy.sort_by_key(|(m, _)| fnv(&[s, &m.entity]));
        for (rtype, v4) in [(RecordType::A, true), (RecordType::AAAA, false)] {
            let recs: Vec<Record> = healthy
                .iter()
                .filter(|(_, a)| a.is_ipv4() == v4)
                .map(|(_, a)| {
                    let data = match a {
                        IpAddr::V4(x) => RData::A(A(*x)),
                        IpAddr::V6(x) => RData::AAAA(AAAA(*x)),
                    };
                    Record::from_rdata(name.clone(), d.ttl_secs, data)
                })
                .collect();
            b.add_dynamic(
                rtype,
                DynamicSet {
                    name: name.clone(),
                    variants: rotations(&recs, 8),
                    by_zone: vec![],
                    canonical: sorted(recs),
                    additional: vec![],
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_slots_follow_weights() {
        let v = weighted(&[("a", 3), ("b", 1)], 1);
        let a = v.iter().filter(|x| x[0] == "a").count();
        assert_eq!((a, v.len()), (3, 4));
    }

    #[test]
    fn rotations_cover_every_member_when_more_than_max_answers() {
        let v = rotations(&[1, 2, 3, 4, 5], 2);
        let firsts: BTreeSet<_> = v.iter().map(|x| x[0]).collect();
        assert_eq!(firsts.len(), 5);
        assert!(v.iter().all(|x| x.len() == 2));
    }
}
