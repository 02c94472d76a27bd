//! Prometheus metrics on the official Rust client (`prometheus-client`), one registry per
//! server (not a process-global recorder: several servers, as tests run them, keep separate
//! counts). Exposed at `/metrics` in the OpenMetrics text format Prometheus scrapes.
//!
//! Owns the metric names and what each counts; must not know routes' logic or the engine.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Seconds, for request latency and its parts (5 ms to 2 min).
const LATENCY_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];
/// Seconds per output token (1 ms to 1 s).
const TOKEN_BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0,
];

fn latency() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Component {
    component: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    duration: Family<Route, Histogram, fn() -> Histogram>,
    queue_depth: Gauge,
    in_flight: Gauge,
    theoretical_flops: Counter<f64, AtomicU64>,
    measured_flops: Family<Component, Counter<f64, AtomicU64>>,
    budget_rejections: Counter,
    overload_rejections: Counter,
    generated_tokens: Counter,
    queue_time: Histogram,
    time_to_first_token: Histogram,
    time_per_output_token: Histogram,
    e2e_latency: Histogram,
    ledger_available: Gauge,
    journal_pending: Gauge,
    tenant_charged: Family<TenantLabel, Gauge<f64, AtomicU64>>,
    tenant_reserved: Family<TenantLabel, Gauge<f64, AtomicU64>>,
    cache_lookups: Family<CacheLookup, Counter>,
    constrained: Family<Constraint, Counter>,
    batch_sequences: Gauge,
    batch_kv_tokens: Gauge,
    decode_batch_size: Histogram,
    decode_steps_deferred: Counter,
    batch_lines_preempted: Counter,
    batch_lines_resumed: Counter,
    batch_lines_resumed_kv_kept: Counter,
    batch_parked_kv_released: Counter,
    resume_recomputed_flops: Counter<f64, AtomicU64>,
    cache_bytes: Gauge,
    cache_entries: Gauge,
    cache: std::sync::Mutex<Option<std::sync::Arc<crate::cache::VideoCache>>>,
    tenant_limit_rejections: Family<TenantLabel, Counter>,
    tenant_places_held: Family<TenantLabel, Gauge>,
    admission_waiting: Gauge,
    admission_held: Gauge,
    admission: std::sync::Mutex<Option<crate::fair_gate::FairGate>>,
    media_fetches: Family<FetchResult, Counter>,
    media_fetch_bytes: Counter,
    media_fetch_seconds: Histogram,
    batch_lines: Family<FetchResult, Counter>,
    batches_open: Gauge,
    batch_lines_pending: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchResult {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Constraint {
    format: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLookup {
    what: &'static str,
    result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            registry: Registry::with_prefix("vvlm"),
            requests: Family::default(),
            duration: Family::new_with_constructor(latency),
            queue_depth: Gauge::default(),
            in_flight: Gauge::default(),
            theoretical_flops: Counter::default(),
            measured_flops: Family::default(),
            budget_rejections: Counter::default(),
            overload_rejections: Counter::default(),
            generated_tokens: Counter::default(),
            constrained: Family::default(),
            queue_time: latency(),
            time_to_first_token: latency(),
            time_per_output_token: Histogram::new(TOKEN_BUCKETS),
            e2e_latency: latency(),
            ledger_available: Gauge::default(),
            journal_pending: Gauge::default(),
            tenant_charged: Family::default(),
            tenant_reserved: Family::default(),
            cache_lookups: Family::default(),
            batch_sequences: Gauge::default(),
            batch_kv_tokens: Gauge::default(),
            decode_batch_size: Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            decode_steps_deferred: Counter::default(),
            batch_lines_preempted: Counter::default(),
            batch_lines_resumed: Counter::default(),
            batch_lines_resumed_kv_kept: Counter::default(),
            batch_parked_kv_released: Counter::default(),
            resume_recomputed_flops: Counter::default(),
            cache_bytes: Gauge::default(),
            cache_entries: Gauge::default(),
            cache: std::sync::Mutex::new(None),
            tenant_limit_rejections: Family::default(),
            tenant_places_held: Family::default(),
            admission_waiting: Gauge::default(),
            admission_held: Gauge::default(),
            admission: std::sync::Mutex::new(None),
            media_fetches: Family::default(),
            media_fetch_bytes: Counter::default(),
            media_fetch_seconds: latency(),
            batch_lines: Family::default(),
            batches_open: Gauge::default(),
            batch_lines_pending: Gauge::default(),
        };
        let mut m = m;
        let r = &mut m.registry;
        r.register(
            "requests",
            "HTTP requests by route and status",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Request latency by route",
            m.duration.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting for a worker",
            m.queue_depth.clone(),
        );
        r.register("in_flight", "Requests being executed", m.in_flight.clone());
        r.register(
            "flops_theoretical",
            "Planned FLOPs of completed requests",
            m.theoretical_flops.clone(),
        );
        r.register(
            "flops_measured",
            "FLOPs the engine executed, by component",
            m.measured_flops.clone(),
        );
        r.register(
            "budget_rejections",
            "Requests refused for budget or quota",
            m.budget_rejections.clone(),
        );
        r.register(
            "overload_rejections",
            "Requests refused because the queue was full",
            m.overload_rejections.clone(),
        );
        r.register(
            "generated_tokens",
            "Completion tokens",
            m.generated_tokens.clone(),
        );
        r.register(
            "constrained_requests",
            "Requests admitted with a constrained output, by format (json_object, json_schema: forced tool calls too, choice)",
            m.constrained.clone(),
        );
        r.register(
            "request_queue_time_seconds",
            "Seconds from queued to a worker starting the request",
            m.queue_time.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Seconds from queued to the first streamed text",
            m.time_to_first_token.clone(),
        );
        r.register(
            "time_per_output_token_seconds",
            "Decode seconds per generated token after the first",
            m.time_per_output_token.clone(),
        );
        r.register(
            "e2e_request_latency_seconds",
            "Seconds from queued to the request's last token",
            m.e2e_latency.clone(),
        );
        r.register(
            "ledger_available",
            "1 when the ledger's database answered the last call, else 0 (new work gets 503)",
            m.ledger_available.clone(),
        );
        r.register(
            "ledger_journal_pending",
            "Settlements journaled locally, waiting for the database",
            m.journal_pending.clone(),
        );
        r.register(
            "tenant_charged_flops",
            "FLOPs charged to the tenant in its current period (the shared ledger's, read at scrape)",
            m.tenant_charged.clone(),
        );
        r.register(
            "tenant_reserved_flops",
            "FLOPs held by the tenant's requests in flight on any replica (read at scrape)",
            m.tenant_reserved.clone(),
        );
        m.ledger_available.set(1);
        r.register(
            "tenant_limit_rejections",
            "Requests refused (429 concurrency_limit) because their tenant had its limit of \
             requests in flight",
            m.tenant_limit_rejections.clone(),
        );
        r.register(
            "tenant_places_held",
            "Admission places the tenant holds on this replica (its requests decoding, queued or \
             running; read at scrape)",
            m.tenant_places_held.clone(),
        );
        r.register(
            "admission_places_held",
            "Admission places held (requests decoding, queued or running; read at scrape)",
            m.admission_held.clone(),
        );
        r.register(
            "media_fetches",
            "Media URLs asked for, by result: ok, refused (outside url_allow, credentials, a \
             private address), too_large, failed (upstream status, redirect, timeout, transport)",
            m.media_fetches.clone(),
        );
        r.register(
            "media_fetch_bytes",
            "Bytes of media fetched by URL",
            m.media_fetch_bytes.clone(),
        );
        r.register(
            "media_fetch_seconds",
            "Seconds each media URL's fetch took (the ones fetched, whatever their result)",
            m.media_fetch_seconds.clone(),
        );
        r.register(
            "batch_lines",
            "Batch lines run by this replica, by result: ok (a 2xx answer), failed (any other \
             answer, recorded in the batch's error file), retried (429 or 503: run again later)",
            m.batch_lines.clone(),
        );
        r.register(
            "batches_open",
            "Batches in progress over all tenants and replicas (from the shared ledger at scrape)",
            m.batches_open.clone(),
        );
        r.register(
            "batch_lines_pending",
            "Lines of the batches in progress without an answer, over all replicas (from the \
             shared ledger at scrape): the backlog to scale on",
            m.batch_lines_pending.clone(),
        );
        r.register(
            "admission_waiting",
            "Requests waiting at the door for an admission place (read at scrape)",
            m.admission_waiting.clone(),
        );
        r.register(
            "cache_lookups",
            "Video cache lookups of requests with media, by what (frames, vision, prefix: the KV \
             of the prompt up to the video) and result",
            m.cache_lookups.clone(),
        );
        r.register(
            "batch_sequences",
            "Sequences in the workers' running batches",
            m.batch_sequences.clone(),
        );
        r.register(
            "batch_kv_tokens",
            "KV positions the running batches reserve (prompt + max_tokens per sequence)",
            m.batch_kv_tokens.clone(),
        );
        r.register(
            "decode_batch_size",
            "Sequences per decode step",
            m.decode_batch_size.clone(),
        );
        r.register(
            "decode_steps_deferred",
            "Decode steps batch lines' sequences waited for their turn so that an interactive \
             request's steps ran with fewer rows (`[batch] rows_beside_interactive`), one per \
             sequence per step",
            m.decode_steps_deferred.clone(),
        );
        r.register(
            "batch_lines_preempted",
            "Batch lines taken out of a worker's batch to make room for an interactive request \
             (put back in the queue with their progress, their KV kept with them while the \
             worker's KV budget has room, else freed)",
            m.batch_lines_preempted.clone(),
        );
        r.register(
            "batch_lines_resumed",
            "Preempted batch lines that continued where they were (with their KV kept, or \
             their prompt prefilled and their generated tokens' KV rebuilt)",
            m.batch_lines_resumed.clone(),
        );
        r.register(
            "batch_lines_resumed_kv_kept",
            "Preempted batch lines that continued with the KV they had kept: nothing recomputed",
            m.batch_lines_resumed_kv_kept.clone(),
        );
        r.register(
            "batch_parked_kv_released",
            "KV caches of preempted batch lines freed before the lines resumed, oldest first, \
             because an interactive request needed the memory (those lines rebuild their KV)",
            m.batch_parked_kv_released.clone(),
        );
        r.register(
            "resume_recomputed_flops",
            "FLOPs spent resuming preempted batch lines (the video's encoding when not cached, \
             the prompt's prefill, the generated tokens' KV): the server's cost, not charged",
            m.resume_recomputed_flops.clone(),
        );
        r.register(
            "cache_bytes",
            "Bytes the video cache holds",
            m.cache_bytes.clone(),
        );
        r.register(
            "cache_entries",
            "Entries the video cache holds",
            m.cache_entries.clone(),
        );
        m
    }
}

impl Metrics {
    /// What the last lease renewal saw of the database and the journal.
    pub fn ledger_tick(&self, available: bool, pending: usize) {
        self.ledger_available.set(available as i64);
        self.journal_pending.set(pending as i64);
    }

    /// Usage of every tenant as the ledger has it now (None: the database did not answer).
    pub fn set_usage<'a>(&self, usages: Option<impl IntoIterator<Item = &'a vvlm_ledger::Usage>>) {
        let Some(usages) = usages else {
            self.ledger_available.set(0);
            return;
        };
        self.ledger_available.set(1);
        self.tenant_charged.clear();
        self.tenant_reserved.clear();
        for u in usages {
            let l = TenantLabel {
                tenant: u.tenant.clone(),
            };
            self.tenant_charged.get_or_create(&l).set(u.charged_flops);
            self.tenant_reserved.get_or_create(&l).set(u.reserved_flops);
        }
    }

    /// The admission places each tenant holds on this replica now.
    pub fn set_places_held(&self, held: &[(&str, usize)]) {
        self.tenant_places_held.clear();
        for &(tenant, n) in held {
            self.tenant_places_held
                .get_or_create(&TenantLabel {
                    tenant: tenant.to_string(),
                })
                .set(n as i64);
        }
    }

    /// One answered HTTP request.
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RouteStatus {
                route: route.to_string(),
                status,
            })
            .inc();
        self.duration
            .get_or_create(&Route {
                route: route.to_string(),
            })
            .observe(seconds);
    }

    pub fn add_flops(&self, theoretical: f64, measured: &vvlm_cost::FlopBreakdown) {
        self.theoretical_flops.inc_by(theoretical);
        for (component, v) in [
            ("vision", measured.vision),
            ("projector", measured.projector),
            ("lm_prefill", measured.lm_prefill),
            ("lm_decode", measured.lm_decode),
        ] {
            self.measured_flops
                .get_or_create(&Component { component })
                .inc_by(v);
        }
    }

    /// A media URL's outcome (`ok`, `refused`, `too_large` or `failed`), its bytes and, when
    /// it was fetched, how long that took.
    pub fn media_fetch(&self, result: &'static str, bytes: u64, seconds: Option<f64>) {
        self.media_fetches
            .get_or_create(&FetchResult { result })
            .inc();
        self.media_fetch_bytes.inc_by(bytes);
        if let Some(s) = seconds {
            self.media_fetch_seconds.observe(s);
        }
    }

    /// The batches in progress and their lines without an answer (from the ledger).
    pub fn set_batch_backlog(&self, open: i64, pending: i64) {
        self.batches_open.set(open);
        self.batch_lines_pending.set(pending);
    }

    /// A batch line's outcome: `ok`, `failed` or `retried`.
    pub fn batch_line(&self, result: &'static str) {
        self.batch_lines
            .get_or_create(&FetchResult { result })
            .inc();
    }

    pub fn add_tokens(&self, n: u64) {
        self.generated_tokens.inc_by(n);
    }

    pub fn budget_rejected(&self) {
        self.budget_rejections.inc();
    }

    pub fn overload_rejected(&self) {
        self.overload_rejections.inc();
    }

    /// A request refused a place at the door: the server was full, or its tenant at its limit.
    pub fn admission_refused(&self, tenant: &str, why: crate::fair_gate::Refused) {
        match why {
            crate::fair_gate::Refused::Full => self.overload_rejected(),
            crate::fair_gate::Refused::TenantLimit { .. } => {
                self.tenant_limit_rejections
                    .get_or_create(&TenantLabel {
                        tenant: tenant.to_string(),
                    })
                    .inc();
            }
        }
    }

    /// A job entered the queue (+1) or left it (-1).
    pub fn queued(&self, delta: i64) {
        self.queue_depth.inc_by(delta);
    }

    /// A worker started (+1) or finished (-1) a job.
    pub fn running(&self, delta: i64) {
        self.in_flight.inc_by(delta);
    }

    /// The latency parts of one finished request (vLLM's names): queue time, time to first
    /// token (None when nothing was generated), time per output token of each completion, and
    /// end to end.
    pub fn observe_request(
        &self,
        queue_s: f64,
        first_token_s: Option<f64>,
        per_token_s: &[f64],
        e2e_s: f64,
    ) {
        self.queue_time.observe(queue_s);
        if let Some(t) = first_token_s {
            self.time_to_first_token.observe(t);
        }
        for &t in per_token_s {
            self.time_per_output_token.observe(t);
        }
        self.e2e_latency.observe(e2e_s);
    }

    /// A request admitted with its output held to `format`.
    pub fn constrained(&self, format: &'static str) {
        self.constrained.get_or_create(&Constraint { format }).inc();
    }

    /// One request's cache lookup: were its frames, and its vision features, cached?
    pub fn cache_lookup(&self, frames: bool, vision: bool) {
        let result = |hit: bool| if hit { "hit" } else { "miss" };
        for (what, hit) in [("frames", frames), ("vision", vision)] {
            self.cache_lookups
                .get_or_create(&CacheLookup {
                    what,
                    result: result(hit),
                })
                .inc();
        }
    }

    /// Whether a request with media continued from a cached KV prefix.
    pub fn prefix_lookup(&self, hit: bool) {
        self.cache_lookups
            .get_or_create(&CacheLookup {
                what: "prefix",
                result: if hit { "hit" } else { "miss" },
            })
            .inc();
    }

    /// A worker's batch changed by these many sequences and reserved KV positions.
    pub fn batch_changed(&self, sequences: i64, kv_tokens: i64) {
        self.batch_sequences.inc_by(sequences);
        self.batch_kv_tokens.inc_by(kv_tokens);
    }

    /// One decode step over this many sequences.
    pub fn decode_step(&self, sequences: usize) {
        self.decode_batch_size.observe(sequences as f64);
    }

    /// A batch line preempted for an interactive request.
    pub fn batch_line_preempted(&self) {
        self.batch_lines_preempted.inc();
    }

    /// A preempted batch line resumed, having recomputed `flops` to continue (none when it
    /// had kept its KV: `kv_kept`).
    pub fn batch_line_resumed(&self, flops: f64, kv_kept: bool) {
        self.batch_lines_resumed.inc();
        if kv_kept {
            self.batch_lines_resumed_kv_kept.inc();
        }
        self.resume_recomputed_flops.inc_by(flops);
    }

    /// The kept KV cache of a preempted batch line freed for an interactive request's memory.
    pub fn batch_parked_kv_released(&self) {
        self.batch_parked_kv_released.inc();
    }

    /// Background sequence-steps deferred for interactive ones (see [`Self::decode_step`]).
    pub fn decode_steps_deferred(&self, steps: u64) {
        if steps > 0 {
            self.decode_steps_deferred.inc_by(steps);
        }
    }

    /// The cache whose size `/metrics` reports.
    pub fn watch_cache(&self, c: std::sync::Arc<crate::cache::VideoCache>) {
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
    }

    /// The admission places whose use `/metrics` shows.
    pub fn watch_admission(&self, g: crate::fair_gate::FairGate) {
        *self.admission.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        if let Some(g) = self
            .admission
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            self.admission_held
                .set((g.capacity() - g.available()) as i64);
            self.admission_waiting.set(g.waiting() as i64);
        }
        if let Some(c) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let (entries, bytes) = c.usage();
            self.cache_entries.set(entries as i64);
            self.cache_bytes.set(bytes as i64);
        }
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String cannot fail");
        s
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_names_and_values() {
        let m = Metrics::default();
        m.observe("/v1/videos/qa", 200, 0.3);
        m.observe("/v1/videos/qa", 200, 0.02);
        m.observe("/v1/videos/qa", 402, 0.001);
        m.add_flops(
            1.5e12,
            &vvlm_cost::FlopBreakdown {
                vision: 1e9,
                projector: 2e6,
                lm_prefill: 3e9,
                lm_decode: 4e8,
            },
        );
        m.add_tokens(7);
        m.queued(2);
        m.queued(-1);
        m.overload_rejected();
        m.observe_request(0.01, Some(0.2), &[0.004, 0.006], 0.5);
        let text = m.render();
        for line in [
            "vvlm_requests_total{route=\"/v1/videos/qa\",status=\"200\"} 2",
            "vvlm_requests_total{route=\"/v1/videos/qa\",status=\"402\"} 1",
            "vvlm_request_duration_seconds_count{route=\"/v1/videos/qa\"} 3",
            "vvlm_request_duration_seconds_bucket{le=\"0.025\",route=\"/v1/videos/qa\"} 2",
            "vvlm_flops_theoretical_total 1500000000000.0",
            "vvlm_flops_measured_total{component=\"lm_prefill\"} 3000000000.0",
            "vvlm_generated_tokens_total 7",
            "vvlm_queue_depth 1",
            "vvlm_overload_rejections_total 1",
            "vvlm_budget_rejections_total 0",
            "vvlm_time_per_output_token_seconds_count 2",
            "vvlm_time_to_first_token_seconds_bucket{le=\"0.25\"} 1",
            "vvlm_e2e_request_latency_seconds_sum 0.5",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
