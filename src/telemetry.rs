//! NVML telemetry (VRAM used, utilisation, clocks) when the library is present; every query is
//! optional, and a machine without NVML simply reports nothing.

#[cfg(feature = "cuda")]
pub struct Telemetry {
    nvml: nvml_wrapper::Nvml,
}

#[cfg(not(feature = "cuda"))]
pub struct Telemetry;

/// One reading of device 0.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Sample {
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub gpu_utilization_percent: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    pub power_watts: Option<f64>,
}

impl Telemetry {
    #[cfg(feature = "cuda")]
    pub fn new() -> Option<Telemetry> {
        nvml_wrapper::Nvml::init().ok().map(|nvml| Telemetry { nvml })
    }

    #[cfg(not(feature = "cuda"))]
    pub fn new() -> Option<Telemetry> {
        None
    }

    #[cfg(feature = "cuda")]
    pub fn sample(&self) -> Sample {
        use nvml_wrapper::enum_wrappers::device::Clock;
        let Ok(d) = self.nvml.device_by_index(0) else { return Sample::default() };
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
        let name = self.nvml.device_by_index(0).and_then(|d| d.name()).unwrap_or_else(|_| "?".into());
        format!("driver {driver}, device 0 {name}")
    }

    #[cfg(not(feature = "cuda"))]
    pub fn describe(&self) -> String {
        String::new()
    }
}
