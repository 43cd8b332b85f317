//! Errors of the library. Each says what failed and what to do about it.

use std::net::IpAddr;

use aya::{maps::MapError, programs::ProgramError, EbpfError};
use thiserror::Error;

use crate::{maglev::MaglevError, model::ServiceKey};

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("loading the XDP object failed (run as root with CAP_BPF; see the verifier log): {0}")]
    Load(#[from] EbpfError),
    #[error(
        "XDP program {name} is missing from the object; the build of lb-ebpf is stale or broken"
    )]
    MissingProgram { name: &'static str },
    #[error("XDP program {name} was rejected by the kernel: {source}")]
    ProgramLoad {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {program} to interface {interface} failed (does it exist in this network namespace? try another XDP mode): {source}")]
    Attach {
        program: &'static str,
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("detaching {program} failed: {source}")]
    Detach {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name} is missing from the object or has an unexpected type/size; rebuild lb-ebpf and lb-userspace together")]
    MapShape { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("load options: {0}")]
    Options(String),
    #[error("no room for service {service}: the data plane was loaded for {max} services; reload with a larger max_services")]
    TooManyServices { service: ServiceKey, max: u32 },
    #[error("no room for backend {backend} of {service}: all {max} backend slots are in use")]
    TooManyBackends {
        service: ServiceKey,
        backend: IpAddr,
        max: u32,
    },
    #[error("Maglev size {size} of {service} exceeds the loaded maximum {max}; reload with a larger maglev_max_size")]
    RingTooLarge {
        service: ServiceKey,
        size: u32,
        max: u32,
    },
    #[error("no room in the ring for {service}: its tables need {needed} cells, {free} of {total} are free; raise dataplane.ring_cells (4 bytes each) and restart with the maps detached, or pin a smaller maglev_size")]
    RingFull {
        service: ServiceKey,
        needed: u64,
        free: u64,
        total: u64,
    },
    #[error("backend {backend} of {service} is not of the service's address family")]
    FamilyMismatch {
        service: ServiceKey,
        backend: IpAddr,
    },
    #[error("backend {backend} is listed twice for {service}")]
    DuplicateBackend {
        service: ServiceKey,
        backend: IpAddr,
    },
    #[error("no such service: {0}")]
    UnknownService(ServiceKey),
    #[error("no backend {backend} in {service}")]
    UnknownBackend {
        service: ServiceKey,
        backend: IpAddr,
    },
    #[error("too many egress interfaces: the XDP devmap holds {max}")]
    TooManyTxPorts { max: u32 },
    #[error(transparent)]
    Maglev(#[from] MaglevError),
    #[error("the map manager was told to stop writing here (a test's simulated crash)")]
    Crashed,
}

pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;

pub(crate) trait MapResultExt<T> {
    fn map_ctx(self, name: &'static str) -> Result<T>;
}

impl<T> MapResultExt<T> for std::result::Result<T, MapError> {
    fn map_ctx(self, name: &'static str) -> Result<T> {
        self.map_err(|source| DataplaneError::Map { name, source })
    }
}
