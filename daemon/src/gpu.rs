//! GPU and memory inventory through NVML. NVML is opened once; when the
//! library or driver is missing the daemon keeps working and reports why,
//! with system RAM as the only memory it can vouch for.

use modeld_wire::types::{GpuInfo, GpuProcess, NvmlStatus, SystemMemory, VramReply};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::{Device, Nvml};

pub struct GpuProbe {
    nvml: Result<Nvml, String>,
}

impl GpuProbe {
    /// Tries to open NVML; never fails, only records why it could not.
    pub fn open() -> Self {
        let nvml = Nvml::init().map_err(|err| format!("NVML unavailable: {err}"));
        if let Err(reason) = &nvml {
            tracing::info!("{reason}; GPU reporting disabled");
        }
        GpuProbe { nvml }
    }

    /// A fresh reading of every GPU and of system memory. NVML calls block,
    /// so callers run this on a blocking thread.
    pub fn snapshot(&self) -> VramReply {
        let system = system_memory();
        match &self.nvml {
            Ok(nvml) => match read_gpus(nvml) {
                Ok(gpus) => VramReply {
                    gpus,
                    models: Vec::new(),
                    nvml: NvmlStatus {
                        available: true,
                        driver_version: nvml.sys_driver_version().ok(),
                        reason: None,
                    },
                    system,
                },
                Err(err) => unavailable(format!("NVML query failed: {err}"), system),
            },
            Err(reason) => unavailable(reason.clone(), system),
        }
    }
}

fn unavailable(reason: String, system: SystemMemory) -> VramReply {
    VramReply {
        gpus: Vec::new(),
        models: Vec::new(),
        nvml: NvmlStatus {
            available: false,
            driver_version: None,
            reason: Some(reason),
        },
        system,
    }
}

fn read_gpus(nvml: &Nvml) -> Result<Vec<GpuInfo>, nvml_wrapper::error::NvmlError> {
    (0..nvml.device_count()?)
        .map(|index| read_gpu(index, &nvml.device_by_index(index)?))
        .collect()
}

fn read_gpu(index: u32, device: &Device) -> Result<GpuInfo, nvml_wrapper::error::NvmlError> {
    let memory = device.memory_info()?;
    // Process lists are optional: some drivers and containers refuse them.
    let mut processes: Vec<GpuProcess> = device
        .running_compute_processes()
        .unwrap_or_default()
        .into_iter()
        .chain(device.running_graphics_processes().unwrap_or_default())
        .map(gpu_process)
        .collect();
    processes.sort_by_key(|p| p.pid);
    processes.dedup_by_key(|p| p.pid);
    Ok(GpuInfo {
        index,
        name: device.name()?,
        uuid: device.uuid()?,
        total_bytes: memory.total,
        used_bytes: memory.used,
        free_bytes: memory.free,
        processes,
    })
}

fn gpu_process(info: ProcessInfo) -> GpuProcess {
    let name = std::fs::read_to_string(format!("/proc/{}/comm", info.pid))
        .ok()
        .map(|s| s.trim_end().to_string());
    let used_bytes = match info.used_gpu_memory {
        UsedGpuMemory::Used(bytes) => Some(bytes),
        UsedGpuMemory::Unavailable => None,
    };
    GpuProcess {
        pid: info.pid,
        name,
        used_bytes,
    }
}

/// GPU memory the processes `pids` hold on every GPU, from the driver;
/// `None` without NVML. A process list the driver refuses counts as none.
pub fn processes_gpu_bytes(pids: &[u32]) -> Option<u64> {
    static NVML: std::sync::OnceLock<Option<Nvml>> = std::sync::OnceLock::new();
    let nvml = NVML.get_or_init(|| Nvml::init().ok()).as_ref()?;
    let count = nvml.device_count().ok()?;
    let mut total = 0;
    for index in 0..count {
        let Ok(device) = nvml.device_by_index(index) else {
            continue;
        };
        let processes = device.running_compute_processes().unwrap_or_default();
        for process in processes.into_iter().filter(|p| pids.contains(&p.pid)) {
            if let UsedGpuMemory::Used(bytes) = process.used_gpu_memory {
                total += bytes;
            }
        }
    }
    Some(total)
}

/// Total and available RAM from `/proc/meminfo`; zeros where it is unreadable.
pub fn system_memory() -> SystemMemory {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> SystemMemory {
    SystemMemory {
        total_bytes: proc_kib_field(text, "MemTotal"),
        available_bytes: proc_kib_field(text, "MemAvailable"),
    }
}

/// A `Name:   1234 kB` line of a /proc file, in bytes; 0 when absent.
pub fn proc_kib_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        let text = "MemTotal:       16384 kB\nMemFree:  1 kB\nMemAvailable:    8192 kB\n";
        let memory = parse_meminfo(text);
        assert_eq!(memory.total_bytes, 16384 * 1024);
        assert_eq!(memory.available_bytes, 8192 * 1024);
    }

    #[test]
    fn snapshot_always_reports_system_memory() {
        let reply = GpuProbe::open().snapshot();
        assert!(reply.system.total_bytes > 0);
        assert_eq!(reply.nvml.available, reply.nvml.reason.is_none());
    }
}
