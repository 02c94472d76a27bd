//! Prometheus metrics (text exposition format), kept in atomics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; 12],
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    pub queue_depth: AtomicU64,
    pub in_flight: AtomicU64,
    theoretical_flops: AtomicU64,
    measured_flops: Mutex<BTreeMap<&'static str, f64>>,
    pub budget_rejections: AtomicU64,
    pub overload_rejections: AtomicU64,
    generated_tokens: AtomicU64,
}

impl Metrics {
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((route.to_string(), status))
            .or_default() += 1;
        let mut l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = l.entry(route.to_string()).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    pub fn add_flops(&self, theoretical: f64, measured: &vvlm_cost::FlopBreakdown) {
        self.theoretical_flops
            .fetch_add(theoretical as u64, Ordering::Relaxed);
        let mut m = self
            .measured_flops
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *m.entry("vision").or_default() += measured.vision;
        *m.entry("projector").or_default() += measured.projector;
        *m.entry("lm_prefill").or_default() += measured.lm_prefill;
        *m.entry("lm_decode").or_default() += measured.lm_decode;
    }

    pub fn add_tokens(&self, n: u64) {
        self.generated_tokens.fetch_add(n, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        s += "# HELP vvlm_requests_total HTTP requests by route and status.\n# TYPE vvlm_requests_total counter\n";
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            s += &format!("vvlm_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}\n");
        }
        s += "# HELP vvlm_request_duration_seconds Request latency.\n# TYPE vvlm_request_duration_seconds histogram\n";
        for (route, h) in self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            for (i, b) in BUCKETS.iter().enumerate() {
                s += &format!(
                    "vvlm_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {}\n",
                    h.counts[i]
                );
            }
            s += &format!(
                "vvlm_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}\n",
                h.count
            );
            s += &format!(
                "vvlm_request_duration_seconds_sum{{route=\"{route}\"}} {}\n",
                h.sum
            );
            s += &format!(
                "vvlm_request_duration_seconds_count{{route=\"{route}\"}} {}\n",
                h.count
            );
        }
        s += "# HELP vvlm_queue_depth Requests waiting for a worker.\n# TYPE vvlm_queue_depth gauge\n";
        s += &format!(
            "vvlm_queue_depth {}\n",
            self.queue_depth.load(Ordering::Relaxed)
        );
        s += "# HELP vvlm_in_flight Requests being executed.\n# TYPE vvlm_in_flight gauge\n";
        s += &format!(
            "vvlm_in_flight {}\n",
            self.in_flight.load(Ordering::Relaxed)
        );
        s += "# HELP vvlm_flops_theoretical_total Planned (paper) FLOPs of completed requests.\n# TYPE vvlm_flops_theoretical_total counter\n";
        s += &format!(
            "vvlm_flops_theoretical_total {}\n",
            self.theoretical_flops.load(Ordering::Relaxed)
        );
        s += "# HELP vvlm_flops_measured_total FLOPs the engine executed, by component.\n# TYPE vvlm_flops_measured_total counter\n";
        for (c, v) in self
            .measured_flops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            s += &format!("vvlm_flops_measured_total{{component=\"{c}\"}} {v}\n");
        }
        s += "# HELP vvlm_budget_rejections_total Requests refused for budget or quota.\n# TYPE vvlm_budget_rejections_total counter\n";
        s += &format!(
            "vvlm_budget_rejections_total {}\n",
            self.budget_rejections.load(Ordering::Relaxed)
        );
        s += "# HELP vvlm_overload_rejections_total Requests refused because the queue was full.\n# TYPE vvlm_overload_rejections_total counter\n";
        s += &format!(
            "vvlm_overload_rejections_total {}\n",
            self.overload_rejections.load(Ordering::Relaxed)
        );
        s += "# HELP vvlm_generated_tokens_total Completion tokens.\n# TYPE vvlm_generated_tokens_total counter\n";
        s += &format!(
            "vvlm_generated_tokens_total {}\n",
            self.generated_tokens.load(Ordering::Relaxed)
        );
        s
    }
}
