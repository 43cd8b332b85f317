//! Real TCP connections from a client namespace to a VIP, balanced by the XDP program
//! on the LB's interface to two backends by L2 direct server return.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use aya::programs::xdp::XdpMode;
use lb_tests::{
    lab::Lab,
    servers::{ask_name, NameServer},
};
use lb_userspace::{
    plan::ServicePlan, BackendRoute, Dataplane, Egress, LoadOptions, Program, Programs, Proto,
    ServiceConfig, ServiceKey,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const PORT: u16 = 8080;
const CONNECTIONS: usize = 100;

#[test]
fn tcp_requests_to_the_vip_are_answered_by_both_backends() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.add_host("client", 10)?;
    lab.add_host("lb", 2)?;
    lab.add_host("b1", 11)?;
    lab.add_host("b2", 12)?;

    let lb = lab.host("lb");
    // The LB owns the VIP: it answers ARP for it, so clients send it the VIP's frames.
    lb.add_addr(VIP)?;
    let options = LoadOptions {
        max_services: 4,
        conn_table_size: 4096,
        ..LoadOptions::default()
    };
    let (mut dataplane, mut maps) = Programs::load(&options).context("loading the XDP program")?;
    lb.ns
        .enter(|| Ok(dataplane.attach(Program::Balancer, "eth0", XdpMode::Default)?))?;
    // Frames the LB transmits back out of its veth arrive only if the peer runs XDP too.
    lab.bridge
        .enter(|| Ok(dataplane.attach(Program::Pass, &lb.bridge_port, XdpMode::Default)?))?;

    let key = ServiceKey {
        addr: VIP.into(),
        port: PORT,
        proto: Proto::Tcp,
    };
    let mut servers = Vec::new();
    let mut backends = Vec::new();
    for tag in ["b1", "b2"] {
        let host = lab.host(tag);
        host.add_dsr_vip(VIP)?;
        servers.push(NameServer::start(&host.ns, PORT, tag)?);
        backends.push((
            host.ip.into(),
            1,
            BackendRoute {
                dst_mac: host.mac,
                src_mac: lb.mac,
                egress: Egress::Ingress,
                encap: None,
            },
        ));
    }
    maps.write_service(
        key,
        &ServicePlan::with_backends(ServiceConfig::default(), backends.clone()),
    )?;

    let client = lab.host("client").ns.spawn(move || {
        let mut answers: BTreeMap<String, usize> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0..CONNECTIONS {
            ensure!(Instant::now() < deadline, "only {i} connections in 60 s");
            let name = ask_name(SocketAddr::from((VIP, PORT)), Duration::from_secs(3))
                .with_context(|| format!("connection {i} to the VIP"))?;
            *answers.entry(name).or_default() += 1;
        }
        Ok(answers)
    });
    let answers = client.join().expect("client thread panicked")?;

    let stats = maps.global_stats()?;
    dataplane.flush_logs();
    eprintln!("answers: {answers:?}; data plane: {stats:?}");
    assert_eq!(answers.values().sum::<usize>(), CONNECTIONS);
    assert_eq!(
        answers.keys().collect::<Vec<_>>(),
        ["b1", "b2"],
        "answers: {answers:?}"
    );
    for (name, n) in &answers {
        assert!(
            *n >= CONNECTIONS / 5,
            "{name} served only {n} of {CONNECTIONS}"
        );
    }
    // Every client packet of those connections went through the balancer (SYN, ACK,
    // FIN at least), and each backend's share was counted.
    assert!(stats.tx >= 3 * CONNECTIONS as u64, "{stats:?}");
    let counters = maps.counters(key).context("the service's counters")?;
    for (tag, backend) in ["b1", "b2"].iter().zip(&backends) {
        let c = counters.backends[&backend.0];
        assert!(c.packets >= 3 * answers[*tag] as u64, "{tag}: {c:?}");
    }
    for server in servers {
        server.stop()?;
    }
    Ok(())
}
