//! Memory of the whole machine, through sysinfo (which reads `/proc/meminfo`).

use serde::Serialize;
use sysinfo::{MemoryRefreshKind, System};

/// Memory of the machine as the kernel reports it (not the container's view).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SystemMem {
    /// Total RAM in bytes; 0 when it could not be read.
    pub total_bytes: u64,
    /// Available RAM in bytes (MemAvailable: free plus reclaimable).
    pub available_bytes: u64,
    /// Total swap in bytes.
    pub swap_total_bytes: u64,
    /// Used swap in bytes.
    pub swap_used_bytes: u64,
}

/// Keeps one sysinfo `System` and refreshes only its memory figures, so a sample does not pay
/// for the CPU and process tables sysinfo can also collect.
#[derive(Debug)]
pub(crate) struct SystemReader {
    /// `None` when sysinfo cannot run on this platform; the figures then read as 0.
    system: Option<System>,
}

impl SystemReader {
    pub(crate) fn new() -> Self {
        let system = match System::new() {
            Ok(system) => Some(system),
            Err(error) => {
                tracing::warn!(%error, "system memory is not available on this platform");
                None
            }
        };
        Self { system }
    }

    pub(crate) fn read(&mut self) -> SystemMem {
        let Some(system) = &mut self.system else {
            return SystemMem::default();
        };
        system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram().with_swap());
        SystemMem {
            total_bytes: system.total_memory(),
            available_bytes: system.available_memory(),
            swap_total_bytes: system.total_swap(),
            swap_used_bytes: system.used_swap(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_real_machine() {
        let mem = SystemReader::new().read();
        assert!(mem.total_bytes > 0);
        assert!(mem.available_bytes <= mem.total_bytes);
        assert!(mem.swap_used_bytes <= mem.swap_total_bytes);
    }
}
