//! Loading the XDP object, attaching its programs to interfaces, detaching them.

use std::collections::HashMap;

use aya::{
    programs::{xdp::XdpLinkId, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use lb_common::{map_names, program_names, MAGLEV_DEFAULT_SIZE};

use crate::{
    error::{DataplaneError, Result},
    maglev::is_prime,
    manager::MapManager,
};

/// The XDP object built from `lb-ebpf` by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJECT"));

/// The programs in the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Program {
    /// The balancer.
    Balancer,
    /// `XDP_PASS` for everything: goes on a veth peer so that transmitted frames arrive.
    Pass,
    /// Swaps MACs and transmits: the benchmark's baseline.
    SwapMacs,
}

impl Program {
    pub const ALL: [Program; 3] = [Program::Balancer, Program::Pass, Program::SwapMacs];

    pub fn name(self) -> &'static str {
        match self {
            Program::Balancer => program_names::BALANCER,
            Program::Pass => program_names::PASS,
            Program::SwapMacs => program_names::SWAP_MACS,
        }
    }
}

/// Sizes fixed at load time: the ring array and the connection table dominate memory.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Services (VIP, port, protocol) the data plane can hold at once.
    pub max_services: u32,
    /// Largest Maglev table a service may use (a prime). Each service owns two slots of
    /// this size, so the ring array takes `max_services * 2 * maglev_max_size * 4` bytes.
    pub maglev_max_size: u32,
    /// Entries of the per-CPU LRU connection table.
    pub conn_table_size: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_services: 64,
            maglev_max_size: MAGLEV_DEFAULT_SIZE,
            conn_table_size: 1 << 18,
        }
    }
}

/// The loaded programs. Dropping it detaches everything it attached.
pub struct Dataplane {
    ebpf: Ebpf,
    // Owns the log ring buffer: dropping it would close the map the program writes to.
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
    links: HashMap<(Program, String), XdpLinkId>,
}

impl Dataplane {
    /// Loads every program and hands back the maps to write services into.
    pub fn load(options: &LoadOptions) -> Result<(Dataplane, MapManager)> {
        if !is_prime(options.maglev_max_size) {
            return Err(DataplaneError::Options(format!(
                "maglev_max_size {} is not a prime",
                options.maglev_max_size
            )));
        }
        let ring_entries = options
            .max_services
            .checked_mul(2)
            .and_then(|n| n.checked_mul(options.maglev_max_size))
            .filter(|&n| n > 0 && options.max_services <= lb_common::MAX_VIPS)
            .ok_or_else(|| {
                DataplaneError::Options(format!(
                    "max_services {} (at most {}) times two slots of {} entries does not fit the ring array",
                    options.max_services,
                    lb_common::MAX_VIPS,
                    options.maglev_max_size
                ))
            })?;
        if options.conn_table_size == 0 {
            return Err(DataplaneError::Options(
                "conn_table_size must be positive".into(),
            ));
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::MAGLEV_RING, ring_entries)
            .map_max_entries(map_names::CONNS, options.conn_table_size)
            .load(OBJECT)?;
        // The program logs only on control-plane inconsistencies; no log map means none.
        let logger = EbpfLogger::init(&mut ebpf).ok();
        for program in Program::ALL {
            let xdp: &mut Xdp = ebpf
                .program_mut(program.name())
                .and_then(|p| p.try_into().ok())
                .ok_or(DataplaneError::MissingProgram {
                    name: program.name(),
                })?;
            xdp.load().map_err(|source| DataplaneError::ProgramLoad {
                name: program.name(),
                source,
            })?;
        }
        let maps = MapManager::new(&mut ebpf, options)?;
        let dataplane = Dataplane {
            ebpf,
            logger,
            links: HashMap::new(),
        };
        Ok((dataplane, maps))
    }

    /// A loaded program, e.g. to run packets through it with `aya::programs::TestRun`.
    pub fn program(&self, program: Program) -> &Xdp {
        self.ebpf
            .program(program.name())
            .and_then(|p| p.try_into().ok())
            .expect("every program was checked at load")
    }

    fn program_mut(&mut self, program: Program) -> &mut Xdp {
        self.ebpf
            .program_mut(program.name())
            .and_then(|p| p.try_into().ok())
            .expect("every program was checked at load")
    }

    /// Attaches `program` to `interface` (in the calling thread's network namespace).
    pub fn attach(&mut self, program: Program, interface: &str, mode: XdpMode) -> Result<()> {
        let id = self
            .program_mut(program)
            .attach(interface, mode)
            .map_err(|source| DataplaneError::Attach {
                program: program.name(),
                interface: interface.to_string(),
                source,
            })?;
        self.links.insert((program, interface.to_string()), id);
        Ok(())
    }

    /// Detaches `program` from `interface`; a no-op if it is not attached there.
    pub fn detach(&mut self, program: Program, interface: &str) -> Result<()> {
        if let Some(id) = self.links.remove(&(program, interface.to_string())) {
            self.program_mut(program)
                .detach(id)
                .map_err(|source| DataplaneError::Detach {
                    program: program.name(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Writes out what the program logged; the daemon calls it when the log fd is readable.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
    }
}
