//! Active health checks of backends: the probes (TCP connect, HTTP GET with an
//! expected status, UDP request/response), each bounded by a timeout, and the task
//! that runs them on each service's interval and hands verdict changes (from the
//! pure rise/fall counter, [`crate::health::Health`]) to the daemon.

use std::{net::SocketAddr, time::Duration};

use crate::{
    health::Health,
    model::{Forward, Probe},
};
use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
    time::timeout,
};

/// How a probe leaves: `mark` makes `lb_probe_encap` wrap it like the service's
/// traffic (0: not wrapped), from `source` (`None`: the kernel's choice).
#[derive(Clone, Copy, Debug, Default)]
pub struct Via {
    pub mark: u32,
    pub source: Option<std::net::IpAddr>,
}

/// Runs one probe against `target`, bounded by `limit`.
pub async fn probe(target: SocketAddr, probe: &Probe, limit: Duration, via: Via) -> Result<()> {
    timeout(limit, run_probe(target, probe, via))
        .await
        .with_context(|| format!("no answer from {target} within {limit:?}"))?
}

/// The socket mark of probes to a backend reached by `forward`.
pub fn mark_for(forward: Forward) -> u32 {
    match forward {
        Forward::L2 => 0,
        Forward::Ipip => lb_common::probe_mark(lb_common::ROUTE_MODE_IPIP),
        Forward::Gue => lb_common::probe_mark(lb_common::ROUTE_MODE_GUE),
    }
}

async fn connect(target: SocketAddr, via: Via) -> Result<TcpStream> {
    let sock = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if via.mark != 0 {
        socket2::SockRef::from(&sock)
            .set_mark(via.mark)
            .context("marking a health probe (needs CAP_NET_ADMIN)")?;
    }
    if let Some(src) = via.source {
        sock.bind(SocketAddr::new(src, 0))
            .with_context(|| format!("binding a health probe to {src}"))?;
    }
    sock.connect(target)
        .await
        .with_context(|| format!("connecting to {target}"))
}

async fn run_probe(target: SocketAddr, probe: &Probe, via: Via) -> Result<()> {
    match probe {
        Probe::Tcp => {
            connect(target, via).await?;
            Ok(())
        }
        Probe::Http { path, status } => {
            let mut s = connect(target, via).await?;
            s.write_all(
                format!("GET {path} HTTP/1.0\r\nHost: {target}\r\nUser-Agent: lbd-health\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            let mut head = vec![0u8; 64];
            let n = s.read(&mut head).await?;
            let line = String::from_utf8_lossy(&head[..n]);
            let got: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .with_context(|| format!("{target} did not answer HTTP: {line:?}"))?;
            if got != *status {
                bail!("{target}{path} answered {got}, not {status}");
            }
            Ok(())
        }
        Probe::Udp { send, expect } => {
            let any: std::net::IpAddr = if target.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            };
            let sock = UdpSocket::bind(SocketAddr::new(via.source.unwrap_or(any), 0)).await?;
            if via.mark != 0 {
                socket2::SockRef::from(&sock)
                    .set_mark(via.mark)
                    .context("marking a health probe (needs CAP_NET_ADMIN)")?;
            }
            sock.connect(target).await?;
            sock.send(send.as_bytes()).await?;
            let mut buf = vec![0u8; 2048];
            let n = sock
                .recv(&mut buf)
                .await
                .with_context(|| format!("{target} refused the datagram"))?;
            if let Some(e) = expect {
                let answer = String::from_utf8_lossy(&buf[..n]);
                if !answer.contains(e.as_str()) {
                    bail!("{target} answered {answer:?}, without {e:?}");
                }
            }
            Ok(())
        }
    }
}

/// Runs every service's health checks, each backend on its own interval, and hands
/// verdict changes to the daemon. Runs until the daemon exits.
pub async fn run_checks(daemon: crate::shell::handle::DaemonHandle) {
    use std::collections::BTreeMap;
    use tokio::time::Instant;
    let mut states: BTreeMap<(crate::model::ServiceKey, std::net::IpAddr), (Health, Instant)> =
        BTreeMap::new();
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(crate::model::ServiceKey, std::net::IpAddr, bool, u32, u32)>(
            256,
        );
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let checks = daemon.now().checks.clone();
                let now = Instant::now();
                let mut wanted = std::collections::BTreeSet::new();
                for crate::model::ServiceChecks { service: key, check, backends, forward, encap } in checks {
                    for addr in backends {
                        let via = Via {
                            mark: mark_for(forward),
                            source: forward.encapsulates().then(|| encap.source_for(addr)).flatten(),
                        };
                        wanted.insert((key, addr));
                        let entry = states.entry((key, addr)).or_insert((Health::default(), now));
                        if entry.1 > now {
                            continue;
                        }
                        entry.1 = now + check.interval;
                        let (tx, probe_kind, limit) = (tx.clone(), check.probe.clone(), check.timeout);
                        let target = std::net::SocketAddr::new(addr, check.port);
                        let (rise, fall) = (check.rise, check.fall);
                        tokio::spawn(async move {
                            let ok = probe(target, &probe_kind, limit, via).await.is_ok();
                            let _ = tx.send((key, addr, ok, rise, fall)).await;
                        });
                    }
                }
                // Backends that left: forget them, and their verdicts.
                let gone: Vec<_> = states.keys().filter(|k| !wanted.contains(k)).copied().collect();
                for k in gone {
                    states.remove(&k);
                    let _ = daemon.change(move |d| d.set_health(k.0, k.1, true)).await;
                }
            }
            Some((key, addr, ok, rise, fall)) = rx.recv() => {
                if let Some((h, _)) = states.get_mut(&(key, addr)) {
                    if let Some(healthy) = h.record(ok, rise, fall) {
                        if let Err(e) = daemon.change(move |d| d.set_health(key, addr, healthy)).await {
                            tracing::warn!("applying a health verdict: {e:#}");
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes_tell_a_listening_server_from_a_dead_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 256];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let status = if req.starts_with("GET /healthz") {
                    "200 OK"
                } else {
                    "404 Not Found"
                };
                let _ = s
                    .write_all(format!("HTTP/1.0 {status}\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let limit = Duration::from_millis(500);
        probe(addr, &Probe::Tcp, limit, Via::default())
            .await
            .unwrap();
        probe(
            addr,
            &Probe::Http {
                path: "/healthz".into(),
                status: 200,
            },
            limit,
            Via::default(),
        )
        .await
        .unwrap();
        let e = probe(
            addr,
            &Probe::Http {
                path: "/other".into(),
                status: 200,
            },
            limit,
            Via::default(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("answered 404"), "{e:#}");

        // Nothing listens on a port just freed.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(probe(dead, &Probe::Tcp, limit, Via::default())
            .await
            .is_err());

        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let uaddr = udp.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(&[b"pong ", &buf[..n]].concat(), from).await;
            }
        });
        let ping = Probe::Udp {
            send: "ping".into(),
            expect: Some("pong".into()),
        };
        probe(uaddr, &ping, limit, Via::default()).await.unwrap();
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = probe(
            silent.local_addr().unwrap(),
            &ping,
            Duration::from_millis(200),
            Via::default(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("no answer"), "{e:#}");
    }
}
