//! `GET /metrics`: Prometheus text format — queue depth, running requests, requests by endpoint and
//! status, latency histograms per stage, device memory.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 13] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le {
                self.counts[i] += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    stages: Mutex<BTreeMap<&'static str, Histogram>>,
    images: Mutex<u64>,
}

/// Gauges read at scrape time.
pub struct Gauges {
    pub queue_depth: usize,
    pub running: usize,
    /// Per device: (live bytes, peak bytes) of the engine's tensors, where the backend tracks them.
    pub device_memory: Vec<Option<(usize, usize)>>,
}

impl Metrics {
    pub fn count_request(&self, endpoint: &str, status: u16) {
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *r.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    /// A stage took `d`: queue, encode, references, denoise, decode, total.
    pub fn observe(&self, stage: &'static str, d: Duration) {
        let mut s = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        s.entry(stage).or_default().observe(d.as_secs_f64());
    }

    pub fn count_image(&self) {
        *self.images.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, value: usize| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        };
        gauge("flux2_queue_depth", "Requests waiting for a worker.", g.queue_depth);
        gauge("flux2_requests_running", "Requests a worker is running.", g.running);
        let _ = writeln!(out, "# HELP flux2_images_total Images generated.\n# TYPE flux2_images_total counter");
        let _ = writeln!(out, "flux2_images_total {}", *self.images.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = writeln!(out, "# HELP flux2_requests_total Requests answered, by endpoint and status.");
        let _ = writeln!(out, "# TYPE flux2_requests_total counter");
        for ((endpoint, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "flux2_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP flux2_stage_seconds Time per request stage.");
        let _ = writeln!(out, "# TYPE flux2_stage_seconds histogram");
        for (stage, h) in self.stages.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            for (le, c) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(out, "flux2_stage_seconds_bucket{{stage=\"{stage}\",le=\"{le}\"}} {c}");
            }
            let _ = writeln!(out, "flux2_stage_seconds_bucket{{stage=\"{stage}\",le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "flux2_stage_seconds_sum{{stage=\"{stage}\"}} {}", h.sum);
            let _ = writeln!(out, "flux2_stage_seconds_count{{stage=\"{stage}\"}} {}", h.count);
        }
        let _ = writeln!(out, "# HELP flux2_device_memory_bytes Device memory held by the engine's tensors.");
        let _ = writeln!(out, "# TYPE flux2_device_memory_bytes gauge");
        for (i, m) in g.device_memory.iter().enumerate() {
            if let Some((live, peak)) = m {
                let _ = writeln!(out, "flux2_device_memory_bytes{{device=\"{i}\",kind=\"live\"}} {live}");
                let _ = writeln!(out, "flux2_device_memory_bytes{{device=\"{i}\",kind=\"peak\"}} {peak}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let m = Metrics::default();
        m.observe("denoise", Duration::from_millis(70));
        m.observe("denoise", Duration::from_secs(3));
        m.count_request("generations", 200);
        let text = m.render(&Gauges { queue_depth: 2, running: 1, device_memory: vec![Some((5, 9))] });
        assert!(text.contains("flux2_queue_depth 2"), "{text}");
        assert!(text.contains("flux2_stage_seconds_bucket{stage=\"denoise\",le=\"0.1\"} 1"), "{text}");
        assert!(text.contains("flux2_stage_seconds_bucket{stage=\"denoise\",le=\"5\"} 2"), "{text}");
        assert!(text.contains("flux2_stage_seconds_count{stage=\"denoise\"} 2"), "{text}");
        assert!(text.contains("flux2_requests_total{endpoint=\"generations\",status=\"200\"} 1"), "{text}");
        assert!(text.contains("flux2_device_memory_bytes{device=\"0\",kind=\"peak\"} 9"), "{text}");
    }
}
