//! `[[service]]` sections to the desired state.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use toml::Spanned;

use super::{
    error::{ConfigError, Ctx},
    file::{ServiceSection, ServicesFile},
};
use crate::{
    dataplane::loader::LoadOptions,
    desired::{BackendSpec, Desired, ServiceSpec},
    maglev::is_prime,
    model::{CheckConfig, EncapSettings, Probe, ServiceConfig, ServiceKey},
};

/// `sizes`: the data plane's (from `[dataplane]`), to refuse what it cannot hold at
/// the service that goes beyond; `None` for a file of services only (`lbctl apply`),
/// which the daemon checks.
pub(super) fn services(
    ctx: &Ctx,
    sections: Vec<Spanned<ServiceSection>>,
    sizes: Option<(&LoadOptions, &EncapSettings)>,
) -> Result<Desired, ConfigError> {
    let max_size = sizes.map_or(u32::MAX, |s| s.0.maglev_max_size);
    let mut out = BTreeMap::new();
    let (mut backends_total, mut cells_total) = (0u64, 0u64);
    for section in sections {
        let span = section.span();
        let s = section.into_inner();
        let key = ServiceKey {
            addr: s.vip,
            port: s.port,
            proto: s.protocol,
        };
        if let Some(why) = crate::validate::vip_refusal(s.vip, &Default::default()) {
            return Err(ctx.err(span.clone(), format!("service.vip: {why}")));
        }
        let mut config = ServiceConfig {
            pass_irregular: s.pass_irregular,
            ..ServiceConfig::default()
        };
        if let Some(f) = s.forward {
            config.forward = f
                .get_ref()
                .parse()
                .map_err(|e: String| ctx.err(f.span(), format!("forward: {e}")))?;
        }
        if let Some(size) = s.maglev_size {
            let v = *size.get_ref();
            if !is_prime(v) {
                return Err(ctx.err(
                    size.span(),
                    format!(
                        "maglev_size: {v} is not a prime (leave it out to size the table by \
                         the backends: a prime of at least 100 cells per backend)"
                    ),
                ));
            }
            if v > max_size {
                return Err(ctx.err(
                    size.span(),
                    format!("maglev_size: {v} exceeds dataplane.maglev_max_size {max_size}"),
                ));
            }
            config.maglev_size = v;
        }
        let mut spm = crate::spm::Settings::default();
        if let Some(section) = s.spm {
            let sspan = section.span();
            let section = section.into_inner();
            spm.id = section.id;
            if let Some(v) = section.version {
                spm.version = v;
            }
            if let Some(r) = section.rule {
                spm.rule = serde_json::from_value(serde_json::Value::String(r.clone()))
                    .map_err(|_| {
                        ctx.err(
                            sspan.clone(),
                            format!(
                                "spm.rule: `{r}` is not one of plain, preselect, data, source, topology"
                            ),
                        )
                    })?;
            }
            if let Some(p) = section.epoch_policy {
                spm.epoch_policy = serde_json::from_value(serde_json::Value::String(p.clone()))
                    .map_err(|_| {
                        ctx.err(
                            sspan.clone(),
                            format!("spm.epoch_policy: `{p}` is not one of stateful, stateless"),
                        )
                    })?;
            }
            config.epoch_resteer = section.epoch_resteer;
            spm.redirect = section.redirect;
            for t in section.topology {
                let parsed = t.subnet.split_once('/').and_then(|(a, p)| {
                    let a: IpAddr = a.parse().ok()?;
                    let p: u8 = p.parse().ok()?;
                    (p <= if a.is_ipv4() { 32 } else { 128 }).then_some((a, p))
                });
                let Some((net, prefix)) = parsed else {
                    return Err(ctx.err(
                        sspan,
                        format!(
                            "spm.topology.subnet: `{}` is not an address/prefix such as 203.0.113.0/25",
                            t.subnet
                        ),
                    ));
                };
                if net.is_ipv4() != s.vip.is_ipv4() {
                    return Err(ctx.err(
                        sspan,
                        format!(
                            "spm.topology.subnet: {} is not of the same family as vip {}",
                            t.subnet, s.vip
                        ),
                    ));
                }
                spm.topology.push((net, prefix, t.sphere));
            }
            if spm.rule == crate::spm::RuleName::Topology && spm.topology.is_empty() {
                return Err(ctx.err(
                    sspan,
                    "spm.topology: the topology rule needs subnet rules, e.g. \
                     topology = [{ subnet = \"203.0.113.0/25\", sphere = \"east\" }]",
                ));
            }
        }
        let steering = match s.steering {
            None => None,
            Some(section) => {
                let sspan = section.span();
                let t = section.into_inner();
                if t.scale == 0 || t.period_ms == 0 {
                    return Err(ctx.err(sspan, "steering: scale and period_ms must be positive"));
                }
                if t.low >= t.high {
                    return Err(ctx.err(
                        sspan,
                        format!(
                            "steering.low ({}) must be below steering.high ({}): the gap is the hysteresis",
                            t.low, t.high
                        ),
                    ));
                }
                Some(crate::watermark::Marks {
                    scale: t.scale,
                    high: t.high,
                    low: t.low,
                    min_backends: t.min_backends,
                    period_ms: t.period_ms,
                })
            }
        };
        let mut backends = BTreeMap::new();
        for b in s.backend {
            let bspan = b.span();
            let b = b.into_inner();
            if b.address.is_ipv4() != s.vip.is_ipv4() && !config.forward.encapsulates() {
                return Err(ctx.err(
                    bspan,
                    format!(
                        "backend.address: {} is not of the same family as vip {} (only an \
                         encapsulating service, forward = \"ipip\" or \"gue\", may mix them)",
                        b.address, s.vip
                    ),
                ));
            }
            if let Some(why) = crate::validate::backend_refusal(&key, b.address, config.forward) {
                return Err(ctx.err(bspan, format!("backend.address: {why}")));
            }
            if let Some((_, encap)) = sizes {
                if let Some(why) =
                    crate::validate::encap_refusal(&key, b.address, config.forward, encap)
                {
                    return Err(ctx.err(bspan, format!("backend.address: {why}")));
                }
            }
            if let Some(why) = b.mac.as_ref().and_then(crate::model::mac_refusal) {
                return Err(ctx.err(bspan, format!("backend.mac: {why}")));
            }
            let spec = BackendSpec {
                mac: b.mac,
                weight: b.weight,
                drain: b.drain,
            };
            if let Some(sphere) = b.sphere {
                spm.spheres.insert(b.address, sphere);
            }
            if backends.insert(b.address, spec).is_some() {
                return Err(ctx.err(
                    bspan,
                    format!("backend.address: {} is listed twice in {key}", b.address),
                ));
            }
        }
        let check = match s.check {
            None => None,
            Some(c) => {
                let cspan = c.span();
                let c = c.into_inner();
                let probe = match c.kind.as_str() {
                    "tcp" => Probe::Tcp,
                    "http" => Probe::Http {
                        path: c.path.unwrap_or_else(|| "/".into()),
                        status: c.status.unwrap_or(200),
                    },
                    "udp" => Probe::Udp {
                        send: c.send.unwrap_or_else(|| "ping".into()),
                        expect: c.expect,
                    },
                    other => {
                        return Err(ctx.err(
                            cspan,
                            format!("check.kind: `{other}` is not one of tcp, http, udp"),
                        ));
                    }
                };
                let port = c.port.unwrap_or(key.port);
                if port == 0 {
                    return Err(ctx.err(
                        cspan,
                        "check.port: the service has no port; say which port to probe",
                    ));
                }
                if c.interval_ms == 0 || c.timeout_ms == 0 || c.rise == 0 || c.fall == 0 {
                    return Err(ctx.err(
                        cspan,
                        "check: interval_ms, timeout_ms, rise and fall must be positive",
                    ));
                }
                Some(CheckConfig {
                    probe,
                    port,
                    interval: std::time::Duration::from_millis(c.interval_ms),
                    timeout: std::time::Duration::from_millis(c.timeout_ms),
                    rise: c.rise,
                    fall: c.fall,
                })
            }
        };
        let spec = ServiceSpec {
            config,
            backends,
            check,
            spm,
            steering,
        };
        if let Some((sizes, _)) = sizes {
            let n = out.len() as u64 + 1;
            if n > sizes.max_services as u64 {
                return Err(ctx.err(
                    span,
                    format!(
                        "service: {key} is service number {n}, but dataplane.max_services is {}",
                        sizes.max_services
                    ),
                ));
            }
            backends_total += spec.backends.len() as u64;
            if backends_total > sizes.max_backends as u64 {
                return Err(ctx.err(
                    span,
                    format!(
                        "service: {key} brings the backends to {backends_total}, but \
                         dataplane.max_backends is {}",
                        sizes.max_backends
                    ),
                ));
            }
            cells_total += crate::dataplane::spec_reservation(&spec, sizes.tables());
            if cells_total > sizes.ring_cells as u64 {
                return Err(ctx.err(
                    span,
                    format!(
                        "service: {key} brings the tables to {cells_total} ring cells (two \
                         slots per service), but dataplane.ring_cells is {}; raise it (4 bytes \
                         a cell) or pin smaller maglev_size values",
                        sizes.ring_cells
                    ),
                ));
            }
        }
        if out.insert(key, spec).is_some() {
            return Err(ctx.err(span, format!("service: {key} is defined twice")));
        }
    }
    Ok(Desired {
        services: out.into_iter().collect(),
    })
}

/// Parses the services of a file for `lbctl apply`.
pub fn parse_services(path: &Path, text: &str) -> Result<Desired, ConfigError> {
    let ctx = Ctx { path, text };
    let file: ServicesFile = toml::from_str(text).map_err(|e| ctx.toml_err(e))?;
    services(&ctx, file.service, None)
}
