//! The `--listen` shorthand: one listener in front of one control-plane subscription,
//! for `drover proxy --server URL --listen …` and `drover up --proxy …` without a
//! config file.
//!
//! `[http://|tcp://]BIND=SUBSCRIPTION:PORT`, for example `0.0.0.0:8080=web:8000` or
//! `tcp://127.0.0.1:5433=db:5432`. Each spec becomes a listener; a service named after
//! the subscription whose backends are its members (at their address and PORT, or
//! their `port` label); and, for http, a catch-all route. The service also gets a TCP
//! connect check (every second, in after 1 pass, out after 2 failures), so a member
//! whose agent is fine but whose application port is not open stays out of rotation.

use crate::config::ProxyConfig;
use std::net::SocketAddr;
use std::path::Path;

/// One parsed `--listen` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    pub tcp: bool,
    pub bind: SocketAddr,
    pub subscription: String,
    pub port: u16,
}

impl std::str::FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<ListenSpec, String> {
        let shape = "expected [http://|tcp://]BIND=SUBSCRIPTION:PORT, e.g. 0.0.0.0:8080=web:8000";
        let (tcp, rest) = match s.split_once("://") {
            None => (false, s),
            Some(("http", r)) => (false, r),
            Some(("tcp", r)) => (true, r),
            Some((other, _)) => return Err(format!("`{s}`: protocol `{other}` is not http or tcp")),
        };
        let (bind, target) = rest.split_once('=').ok_or_else(|| format!("`{s}`: {shape}"))?;
        let bind: SocketAddr = bind.parse().map_err(|_| format!("`{s}`: `{bind}` is not IP:PORT"))?;
        let (subscription, port) = target.rsplit_once(':').ok_or_else(|| format!("`{s}`: {shape}"))?;
        let ok_name = !subscription.is_empty()
            && subscription.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok_name {
            return Err(format!("`{s}`: `{subscription}` is not a subscription name"));
        }
        let port: u16 =
            port.parse().ok().filter(|p| *p != 0).ok_or_else(|| format!("`{s}`: `{port}` is not a port"))?;
        Ok(ListenSpec { tcp, bind, subscription: subscription.to_string(), port })
    }
}

impl ListenSpec {
    /// The name of the listener the `index`th spec becomes.
    pub fn listener_name(&self, index: usize) -> String {
        format!("{}-{index}", if self.tcp { "tcp" } else { "http" })
    }
}

/// The config the specs stand for, validated like a file.
pub fn config_from_specs(specs: &[ListenSpec], admin_listen: Option<SocketAddr>) -> Result<ProxyConfig, String> {
    use std::fmt::Write;
    if specs.is_empty() {
        return Err("no --listen given".into());
    }
    let mut t = String::new();
    if let Some(a) = admin_listen {
        let _ = writeln!(t, "admin_listen = \"{a}\"");
    }
    let mut services = std::collections::BTreeMap::new();
    for (i, s) in specs.iter().enumerate() {
        let proto = if s.tcp { "tcp" } else { "http" };
        let name = s.listener_name(i);
        let _ = writeln!(t, "[[listeners]]\nname = \"{name}\"\nbind = \"{}\"\nprotocol = \"{proto}\"", s.bind);
        // One service per (subscription, port), shared by listeners that name the same.
        let name = format!("{}-{}", s.subscription, s.port);
        if s.tcp {
            let _ = writeln!(t, "service = \"{name}\"");
        }
        services.insert(name, s);
    }
    for (i, s) in specs.iter().enumerate().filter(|(_, s)| !s.tcp) {
        let _ = writeln!(
            t,
            "[[routes]]\nlistener = \"{}\"\nservice = \"{}-{}\"",
            s.listener_name(i),
            s.subscription,
            s.port
        );
    }
    for (name, s) in services {
        let _ = writeln!(
            t,
            "[services.{name}]\nmembers = {{ subscription = \"{}\", port = {} }}\n\
             [services.{name}.health]\nkind = \"tcp\"\ninterval_ms = 1000\ntimeout_ms = 500\nrise = 1\nfall = 2",
            s.subscription, s.port
        );
    }
    ProxyConfig::parse(Path::new("--listen"), &t).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_and_without_a_protocol() {
        let s: ListenSpec = "0.0.0.0:8080=web:8000".parse().unwrap();
        assert_eq!(
            s,
            ListenSpec { tcp: false, bind: "0.0.0.0:8080".parse().unwrap(), subscription: "web".into(), port: 8000 }
        );
        let s: ListenSpec = "tcp://127.0.0.1:5433=db:5432".parse().unwrap();
        assert!(s.tcp);
        assert_eq!((s.subscription.as_str(), s.port), ("db", 5432));
        let s: ListenSpec = "http://[::1]:80=a.b-c_d:1".parse().unwrap();
        assert_eq!(s.bind, "[::1]:80".parse().unwrap());
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (spec, says) in [
            ("udp://1.2.3.4:5=a:1", "protocol `udp`"),
            ("1.2.3.4:5", "expected [http://|tcp://]BIND"),
            ("host:5=a:1", "`host:5` is not IP:PORT"),
            ("1.2.3.4:5=a b:1", "not a subscription name"),
            ("1.2.3.4:5=web:0", "`0` is not a port"),
            ("1.2.3.4:5=web", "expected"),
        ] {
            let e = spec.parse::<ListenSpec>().unwrap_err();
            assert!(e.contains(says), "{spec}: {e}");
        }
    }

    #[test]
    fn specs_become_listeners_member_services_and_routes() {
        let specs: Vec<ListenSpec> =
            ["127.0.0.1:8080=web:8000", "tcp://127.0.0.1:5433=db:5432", "127.0.0.1:8081=web:8000"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
        let cfg = config_from_specs(&specs, Some("127.0.0.1:9901".parse().unwrap())).unwrap();
        assert_eq!(cfg.listeners.len(), 3);
        assert_eq!(cfg.services.len(), 2, "listeners naming the same subscription share its service");
        let web = &cfg.services["web-8000"];
        let m = web.members.as_ref().unwrap();
        assert_eq!((m.subscription.as_str(), m.port), ("web", 8000));
        assert!(web.backends.is_empty());
        assert_eq!(web.health.as_ref().unwrap().rise, 1, "new members still have to accept a connection first");
        assert_eq!(cfg.listeners[1].service.as_deref(), Some("db-5432"));
        assert_eq!(cfg.routes.len(), 2);
        assert!(config_from_specs(&[], None).is_err());
    }
}
