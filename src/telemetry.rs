//! NVML telemetry (VRAM used, utilisation, clocks) when the library is present; every query is
//! optional, and a machine without NVML simply reports nothing.

#[cfg(feature = "cuda")]
pub struct Telemetry {
    nvml: nvml_wrapper::Nvml,
    /// NVML UUID of the GPU to read; None: NVML device 0.
    uuid: Option<String>,
}

#[cfg(not(feature = "cuda"))]
pub struct Telemetry;

/// One reading of the device.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Sample {
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub gpu_utilization_percent: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    pub power_watts: Option<f64>,
}

/// NVML's name for the GPU with this CUDA UUID: `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn nvml_uuid(bytes: &[u8; 16]) -> String {
    let hex = |r: std::ops::Range<usize>| bytes[r].iter().map(|b| format!("{b:02x}")).collect::<String>();
    format!("GPU-{}-{}-{}-{}-{}", hex(0..4), hex(4..6), hex(6..8), hex(8..10), hex(10..16))
}

impl Telemetry {
    /// Readings of NVML device 0.
    #[cfg(feature = "cuda")]
    pub fn new() -> Option<Telemetry> {
        nvml_wrapper::Nvml::init().ok().map(|nvml| Telemetry { nvml, uuid: None })
    }

    /// Readings of the GPU a backend runs on, found by UUID: NVML numbers every GPU of the
    /// machine and ignores CUDA_VISIBLE_DEVICES, so CUDA device 0 need not be NVML device 0.
    /// None on the CPU or without NVML.
    #[cfg(feature = "cuda")]
    pub fn for_backend(be: &std::sync::Arc<dyn crate::backend::Backend>) -> Option<Telemetry> {
        let uuid = crate::device::as_cuda(be)?.uuid()?;
        nvml_wrapper::Nvml::init().ok().map(|nvml| Telemetry { nvml, uuid: Some(nvml_uuid(&uuid)) })
    }

    #[cfg(feature = "cuda")]
    fn device(&self) -> Result<nvml_wrapper::Device<'_>, nvml_wrapper::error::NvmlError> {
        match &self.uuid {
            Some(uuid) => self.nvml.device_by_uuid(uuid.as_str()),
            None => self.nvml.device_by_index(0),
        }
    }

    #[cfg(not(feature = "cuda"))]
    pub fn new() -> Option<Telemetry> {
        None
    }

    #[cfg(not(feature = "cuda"))]
    pub fn for_backend(_: &std::sync::Arc<dyn crate::backend::Backend>) -> Option<Telemetry> {
        None
    }

    #[cfg(feature = "cuda")]
    pub fn sample(&self) -> Sample {
        use nvml_wrapper::enum_wrappers::device::Clock;
        let Ok(d) = self.device() else { return Sample::default() };
        let mem = d.memory_info().ok();
        Sample {
            memory_used_bytes: mem.as_ref().map(|m| m.used),
            memory_total_bytes: mem.as_ref().map(|m| m.total),
            gpu_utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
            sm_clock_mhz: d.clock_info(Clock::SM).ok(),
            memory_clock_mhz: d.clock_info(Clock::Memory).ok(),
            power_watts: d.power_usage().ok().map(|mw| mw as f64 / 1000.0),
        }
    }

    #[cfg(not(feature = "cuda"))]
    pub fn sample(&self) -> Sample {
        Sample::default()
    }

    #[cfg(feature = "cuda")]
    pub fn describe(&self) -> String {
        let driver = self.nvml.sys_driver_version().unwrap_or_else(|_| "?".into());
        let name = self.device().and_then(|d| d.name()).unwrap_or_else(|_| "?".into());
        format!("driver {driver}, {name}")
    }

    #[cfg(not(feature = "cuda"))]
    pub fn describe(&self) -> String {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn nvml_uuid_is_grouped_lowercase_hex() {
        let bytes: [u8; 16] = std::array::from_fn(|i| (i * 17) as u8);
        assert_eq!(super::nvml_uuid(&bytes), "GPU-00112233-4455-6677-8899-aabbccddeeff");
    }
}
