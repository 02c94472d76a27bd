//! The measured-FLOPs counter: the engine adds the FLOPs of every matrix product it executes.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where FLOPs are spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// The vision tower (patch embedding and encoder layers).
    Vision,
    /// The multimodal projector.
    Projector,
    /// The language model's prefill pass (including its LM head).
    LmPrefill,
    /// The language model's single-token decode passes (including the LM head).
    LmDecode,
}

impl Component {
    pub const ALL: [Component; 4] = [
        Component::Vision,
        Component::Projector,
        Component::LmPrefill,
        Component::LmDecode,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// FLOPs by component. All figures are FLOPs (multiply-add = 2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FlopBreakdown {
    pub vision: f64,
    pub projector: f64,
    pub lm_prefill: f64,
    pub lm_decode: f64,
}

impl FlopBreakdown {
    pub fn total(&self) -> f64 {
        self.vision + self.projector + self.lm_prefill + self.lm_decode
    }

    /// Everything before the first generated token.
    pub fn prefill_total(&self) -> f64 {
        self.vision + self.projector + self.lm_prefill
    }

    pub fn get(&self, c: Component) -> f64 {
        match c {
            Component::Vision => self.vision,
            Component::Projector => self.projector,
            Component::LmPrefill => self.lm_prefill,
            Component::LmDecode => self.lm_decode,
        }
    }

    pub fn get_mut(&mut self, c: Component) -> &mut f64 {
        match c {
            Component::Vision => &mut self.vision,
            Component::Projector => &mut self.projector,
            Component::LmPrefill => &mut self.lm_prefill,
            Component::LmDecode => &mut self.lm_decode,
        }
    }
}

impl std::ops::Add for FlopBreakdown {
    type Output = FlopBreakdown;
    fn add(mut self, o: FlopBreakdown) -> FlopBreakdown {
        for c in Component::ALL {
            *self.get_mut(c) += o.get(c);
        }
        self
    }
}

/// A thread-safe per-request FLOP counter. Counts are exact integers.
#[derive(Debug, Default)]
pub struct FlopCounter {
    counts: [AtomicU64; 4],
}

impl FlopCounter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `flops` to a component.
    pub fn add(&self, component: Component, flops: u64) {
        self.counts[component.index()].fetch_add(flops, Ordering::Relaxed);
    }

    /// Adds the FLOPs of a `[m, k] x [k, n]` matrix product (`2 m k n`).
    pub fn add_matmul(&self, component: Component, m: usize, k: usize, n: usize) {
        self.add(component, 2 * (m as u64) * (k as u64) * (n as u64));
    }

    pub fn get(&self, component: Component) -> u64 {
        self.counts[component.index()].load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> FlopBreakdown {
        let mut b = FlopBreakdown::default();
        for c in Component::ALL {
            *b.get_mut(c) = self.get(c) as f64;
        }
        b
    }

    pub fn reset(&self) {
        for c in &self.counts {
            c.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_component_and_sums() {
        let c = FlopCounter::new();
        c.add_matmul(Component::Vision, 3, 4, 5);
        c.add(Component::LmDecode, 7);
        c.add_matmul(Component::Vision, 1, 1, 1);
        let s = c.snapshot();
        assert_eq!(s.vision, 122.0);
        assert_eq!(s.lm_decode, 7.0);
        assert_eq!(s.total(), 129.0);
        assert_eq!(s.prefill_total(), 122.0);
        c.reset();
        assert_eq!(c.snapshot().total(), 0.0);
    }

    #[test]
    fn counter_is_shared_across_threads() {
        let c = std::sync::Arc::new(FlopCounter::new());
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.add(Component::Projector, 2)
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(c.get(Component::Projector), 8000);
    }
}
