//! Service discovery on the instance: the agent long-polls the server for the peers of the
//! services its components `use` (`GET /v1/agent/peers`), writes each component's set to
//! `$DROVER_PEERS` (replaced atomically), and answers `SERVICE.drover.` over DNS on
//! `$DROVER_DNS` (A records, SRV records `_PORT._tcp.SERVICE.drover.`, TTL 1 s). While the
//! server is unreachable the last known peers stay (static stability).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use drover_model::api::{PeerAddr, PeersReply};
use drover_model::Plan;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::report::{error_chain, Servers, Throttle};

/// Seconds a DNS answer may be kept (the server waits this long after an agent applied a
/// set before a leaver it dropped may stop).
pub const DNS_TTL_SECS: u32 = 1;
/// The zone every name is under.
const ZONE: &str = "drover.";
/// How long one long-poll is held by the server.
const POLL_WAIT: Duration = Duration::from_secs(25);
const POLL_TIMEOUT: Duration = Duration::from_secs(35);
const RETRY: Duration = Duration::from_secs(1);

/// An instance's discovery: what its components use, where their files are, the DNS socket.
pub(crate) struct Discovery {
    /// (component, the services it uses, its file).
    files: Vec<(String, Vec<String>, PathBuf)>,
    socket: Option<tokio::net::UdpSocket>,
    dns: Option<SocketAddr>,
    current: Arc<RwLock<PeersReply>>,
}

impl Discovery {
    /// For a plan none of whose components uses anything: `None`. Otherwise the files are
    /// written (empty sets) and the DNS socket bound before any component starts: on
    /// `ADDR:53` when the agent may, else on a port the system picks.
    pub fn prepare(plan: &Plan, dir: &Path, addr: IpAddr) -> Option<Discovery> {
        let files: Vec<(String, Vec<String>, PathBuf)> = plan
            .components
            .iter()
            .filter(|c| !c.uses.is_empty())
            .map(|c| {
                (
                    c.name.clone(),
                    c.uses.clone(),
                    dir.join("peers").join(format!("{}.json", c.name)),
                )
            })
            .collect();
        if files.is_empty() {
            return None;
        }
        let std_socket = std::net::UdpSocket::bind((addr, 53))
            .or_else(|_| std::net::UdpSocket::bind((addr, 0)))
            .and_then(|s| {
                s.set_nonblocking(true)?;
                Ok(s)
            });
        let (socket, dns) = match std_socket.and_then(tokio::net::UdpSocket::from_std) {
            Ok(s) => {
                let local = s.local_addr().ok();
                (Some(s), local)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot bind the DNS responder; peers only in $DROVER_PEERS");
                (None, None)
            }
        };
        let d = Discovery {
            files,
            socket,
            dns,
            current: Arc::new(RwLock::new(PeersReply::default())),
        };
        d.write_files(&PeersReply::default());
        Some(d)
    }

    /// `DROVER_PEERS` and `DROVER_DNS` of component `name`, if it uses anything.
    pub fn env(&self, name: &str) -> Vec<(String, String)> {
        let Some((_, _, path)) = self.files.iter().find(|(c, _, _)| c == name) else {
            return Vec::new();
        };
        let mut env = vec![("DROVER_PEERS".to_string(), path.display().to_string())];
        if let Some(dns) = self.dns {
            env.push(("DROVER_DNS".to_string(), dns.to_string()));
        }
        env
    }

    /// Each component's used services, as JSON, replaced atomically (write, then rename).
    fn write_files(&self, reply: &PeersReply) {
        for (name, uses, path) in &self.files {
            let services: BTreeMap<String, Vec<PeerAddr>> = uses
                .iter()
                .map(|s| {
                    (
                        s.clone(),
                        reply.services.get(s).cloned().unwrap_or_default(),
                    )
                })
                .collect();
            let body = PeersReply {
                epoch: reply.epoch.clone(),
                version: reply.version,
                services,
            };
            let write = || -> std::io::Result<()> {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let tmp = path.with_extension("json.tmp");
                let text = serde_json::to_vec_pretty(&body).map_err(std::io::Error::other)?;
                std::fs::write(&tmp, text)?;
                std::fs::rename(&tmp, path)
            };
            if let Err(e) = write() {
                tracing::warn!(component = %name, path = %path.display(), error = %e, "cannot write the peers file");
            }
        }
    }

    /// Poll the server and answer DNS, until dropped.
    pub async fn run(self, client: reqwest::Client, servers: Servers, instance: &str) {
        let poll = async {
            // The server's epoch and the version of it applied last.
            let mut epoch = String::new();
            let mut applied = 0u64;
            let mut throttle = Throttle::default();
            let wait_ms = POLL_WAIT.as_millis().to_string();
            loop {
                let (server, url) = servers.url("/v1/agent/peers");
                let answer = async {
                    let resp = client
                        .get(&url)
                        .query(&[
                            ("instance", instance),
                            ("epoch", &epoch),
                            ("version", &applied.to_string()),
                            ("wait_ms", &wait_ms),
                        ])
                        .timeout(POLL_TIMEOUT)
                        .send()
                        .await
                        .map_err(|e| {
                            servers.failed(server);
                            error_chain(&e)
                        })?;
                    if !resp.status().is_success() {
                        if Servers::try_another(resp.status()) {
                            servers.failed(server);
                        }
                        return Err(format!("status {}", resp.status()));
                    }
                    let bytes = resp.bytes().await.map_err(|e| error_chain(&e))?;
                    serde_json::from_slice::<PeersReply>(&bytes)
                        .map_err(|e| format!("unreadable answer: {e}"))
                }
                .await;
                match answer {
                    Ok(reply) => {
                        if let Some(held_back) = throttle.recovered() {
                            tracing::info!(held_back, "peer polls reach the server again");
                        }
                        let changed = {
                            let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
                            cur.services != reply.services
                        };
                        // An answer from another run of the server (a restart, a new
                        // leader) whose sets are empty while it rebuilds: keep what we have.
                        let changed = changed
                            && !(reply.epoch != epoch
                                && reply.services.values().all(Vec::is_empty)
                                && !epoch.is_empty());
                        if changed {
                            self.write_files(&reply);
                            *self.current.write().unwrap_or_else(|e| e.into_inner()) =
                                reply.clone();
                            tracing::debug!(version = reply.version, "peers changed");
                        }
                        applied = reply.version;
                        epoch = reply.epoch;
                    }
                    Err(problem) => {
                        if let Some(held_back) = throttle.failed() {
                            tracing::warn!(%problem, held_back, "cannot poll the server for peers; the last known stay (logged at most once a minute)");
                        }
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
        };
        let dns = async {
            let Some(socket) = &self.socket else {
                return std::future::pending::<()>().await;
            };
            let mut buf = vec![0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let reply = {
                    let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
                    answer(&buf[..n], &cur)
                };
                if let Some(out) = reply {
                    let _ = socket.send_to(&out, from).await;
                }
            }
        };
        tokio::join!(poll, dns);
    }
}

/// Resolve `name` (e.g. `core.drover.`) to its A records through the DNS responder at `dns`
/// (a component's `$DROVER_DNS`): a small client for components and tests written in Rust.
pub async fn lookup(dns: SocketAddr, name: &str) -> Result<Vec<IpAddr>, String> {
    use hickory_proto::op::Query;
    let name = Name::from_ascii(name).map_err(|e| format!("{name:?}: {e}"))?;
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(name, RecordType::A));
    let bytes = q.to_vec().map_err(|e| e.to_string())?;
    let bind: SocketAddr = if dns.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| e.to_string())?;
    socket
        .send_to(&bytes, dns)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buf))
        .await
        .map_err(|_| format!("no answer from {dns} within 1s"))?
        .map_err(|e| e.to_string())?;
    let m = Message::from_vec(&buf[..n]).map_err(|e| e.to_string())?;
    if m.metadata.response_code != ResponseCode::NoError {
        return Err(format!("{}", m.metadata.response_code));
    }
    Ok(m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect())
}

/// The answer to one DNS query (`None`: not a query at all).
pub(crate) fn answer(query: &[u8], peers: &PeersReply) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    if q.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut out = Message::response(q.metadata.id, q.metadata.op_code);
    out.metadata.recursion_desired = q.metadata.recursion_desired;
    if q.metadata.op_code != OpCode::Query || q.queries.len() != 1 {
        out.metadata.response_code = ResponseCode::NotImp;
        return out.to_vec().ok();
    }
    let question = q.queries[0].clone();
    let name = question.name.to_lowercase();
    out.add_query(question.clone());
    let text = name.to_ascii();
    let text = if text.ends_with('.') {
        text
    } else {
        format!("{text}.")
    };
    let Some(rest) = text.strip_suffix(ZONE) else {
        out.metadata.response_code = ResponseCode::Refused;
        return out.to_vec().ok();
    };
    out.metadata.authoritative = true;
    let labels: Vec<&str> = rest.trim_end_matches('.').split('.').collect();
    let record = |name: &Name, ip: IpAddr| match ip {
        IpAddr::V4(v4) => Record::from_rdata(name.clone(), DNS_TTL_SECS, RData::A(A(v4))),
        IpAddr::V6(v6) => Record::from_rdata(name.clone(), DNS_TTL_SECS, RData::AAAA(AAAA(v6))),
    };
    let ip_of = |p: &PeerAddr| p.addr.parse::<IpAddr>().ok();
    let family_ok = |ip: &IpAddr, t: RecordType| {
        matches!(
            (ip, t),
            (IpAddr::V4(_), RecordType::A) | (IpAddr::V6(_), RecordType::AAAA)
        )
    };
    let qtype = question.query_type;
    match labels.as_slice() {
        // SERVICE.drover.: every peer's address.
        [service] if peers.services.contains_key(*service) => {
            if matches!(qtype, RecordType::A | RecordType::AAAA) {
                for ip in peers.services[*service].iter().filter_map(ip_of) {
                    if family_ok(&ip, qtype) {
                        out.add_answer(record(&name, ip));
                    }
                }
            }
        }
        // _PORT._tcp.SERVICE.drover.: one SRV per peer, its address in the additional section.
        [port, proto, service]
            if peers.services.contains_key(*service)
                && port.starts_with('_')
                && (*proto == "_tcp" || *proto == "_udp") =>
        {
            if qtype == RecordType::SRV {
                let port = &port[1..];
                for p in &peers.services[*service] {
                    let (Some(n), Some(ip)) = (p.ports.get(port), ip_of(p)) else {
                        continue;
                    };
                    let target =
                        Name::from_ascii(format!("{}.{service}.{ZONE}", p.instance)).ok()?;
                    out.add_answer(Record::from_rdata(
                        name.clone(),
                        DNS_TTL_SECS,
                        RData::SRV(SRV::new(0, 10, *n, target.clone())),
                    ));
                    out.add_additional(record(&target, ip));
                }
            }
        }
        // INSTANCE.SERVICE.drover.: that peer (the SRV targets).
        [instance, service] if peers.services.contains_key(*service) => {
            let found = peers.services[*service]
                .iter()
                .find(|p| p.instance.eq_ignore_ascii_case(instance));
            match found.and_then(ip_of) {
                Some(ip) if family_ok(&ip, qtype) => {
                    out.add_answer(record(&name, ip));
                }
                Some(_) => {}
                None => out.metadata.response_code = ResponseCode::NXDomain,
            }
        }
        _ => out.metadata.response_code = ResponseCode::NXDomain,
    }
    out.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn peers() -> PeersReply {
        let p = |id: &str, ip: &str| PeerAddr {
            instance: id.into(),
            addr: ip.into(),
            ports: [("http".to_string(), 8080)].into_iter().collect(),
        };
        PeersReply {
            epoch: String::new(),
            version: 3,
            services: [(
                "core".to_string(),
                vec![p("i-000004", "127.9.0.4"), p("i-000005", "127.9.0.5")],
            )]
            .into_iter()
            .collect(),
        }
    }

    fn ask(name: &str, t: RecordType) -> Message {
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        let out = answer(&q.to_vec().unwrap(), &peers()).expect("an answer");
        Message::from_vec(&out).unwrap()
    }

    #[test]
    fn answers_a_srv_and_instance_names_and_refuses_other_zones() {
        let m = ask("core.drover.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        let ips: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
        assert_eq!(ips, vec!["127.9.0.4", "127.9.0.5"]);
        assert!(m.answers.iter().all(|r| r.ttl == DNS_TTL_SECS));
        // Case does not matter.
        assert_eq!(ask("CORE.Drover.", RecordType::A).answers.len(), 2);

        let m = ask("_http._tcp.core.drover.", RecordType::SRV);
        assert_eq!(m.answers.len(), 2);
        assert!(
            m.answers[0].data.to_string().contains("8080"),
            "{:?}",
            m.answers
        );
        assert_eq!(m.additionals.len(), 2);

        let m = ask("i-000005.core.drover.", RecordType::A);
        assert_eq!(m.answers[0].data.to_string(), "127.9.0.5");

        assert_eq!(
            ask("web.drover.", RecordType::A).metadata.response_code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            ask("example.com.", RecordType::A).metadata.response_code,
            ResponseCode::Refused
        );
        // Garbage, or an answer rather than a query: no reply at all.
        assert!(answer(b"\x12\x34garbage", &peers()).is_none());
        let mut not_a_query = Message::response(7, OpCode::Query);
        not_a_query.add_query(Query::query(
            Name::from_ascii("core.drover.").unwrap(),
            RecordType::A,
        ));
        assert!(answer(&not_a_query.to_vec().unwrap(), &peers()).is_none());
        // No AAAA for IPv4 peers: an empty answer, not an error.
        let m = ask("core.drover.", RecordType::AAAA);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }
}
