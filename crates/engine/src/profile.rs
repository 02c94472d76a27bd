//! Where a forward pass's time goes, by kind of op, for benchmarks and for deciding what to
//! optimise on a device one cannot sit at (the GPU runs are one prepared script): matrix
//! products (with their bias), attention, norms, RoPE and activations; the rest of a pass
//! (residual adds, copies, embeddings) is its total minus these.
//!
//! Off by default: a section costs one relaxed atomic load. When on ([`set_enabled`]), each
//! section synchronises its device before and after, so a GPU's time lands in the section that
//! queued it; a profiled pass is slower than a plain one (no overlap of launches with work), so
//! benchmarks report both. The totals are process-wide: profile one pass at a time.
//!
//! Owns the switch and the totals. Knows nothing of models: callers name their sections.

use candle_core::{Device, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// A kind of op a forward pass spends time in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// Linear layers: the matrix product and its bias.
    Matmul,
    /// Attention: scores, softmax and the weighted values (fused or not).
    Attention,
    /// LayerNorm and RMSNorm.
    Norm,
    /// Rotary position embeddings.
    Rope,
    /// GELU, SwiGLU.
    Activation,
    /// Writing a step's new keys and values into the KV cache.
    KvAppend,
}

impl Section {
    pub const ALL: [Section; 6] = [
        Section::Matmul,
        Section::Attention,
        Section::Norm,
        Section::Rope,
        Section::Activation,
        Section::KvAppend,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Section::Matmul => "matmul",
            Section::Attention => "attention",
            Section::Norm => "norm",
            Section::Rope => "rope",
            Section::Activation => "activation",
            Section::KvAppend => "kv-append",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Seconds and calls per section, in [`Section::ALL`]'s order.
static TOTALS: Mutex<[(f64, u64); Section::ALL.len()]> = Mutex::new([(0.0, 0); Section::ALL.len()]);

/// Turns timing on or off (for the whole process).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Zeroes the totals.
pub fn reset() {
    *TOTALS.lock().unwrap_or_else(|e| e.into_inner()) = [(0.0, 0); Section::ALL.len()];
}

/// Seconds and calls per section since the last [`reset`].
pub fn totals() -> Vec<(Section, f64, u64)> {
    let t = *TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    Section::ALL
        .iter()
        .zip(t)
        .map(|(&s, (secs, calls))| (s, secs, calls))
        .collect()
}

/// Runs `f` as part of `section` on `device` (timed only while enabled).
pub fn time<T>(section: Section, device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    device.synchronize()?;
    let t = Instant::now();
    let out = f()?;
    device.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    let i = Section::ALL
        .iter()
        .position(|&s| s == section)
        .expect("every section is in ALL");
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    totals[i].0 += secs;
    totals[i].1 += 1;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_count_only_while_enabled() {
        // The totals are process-wide and other tests' forward passes may run while this one
        // has timing on, so the counts below are lower bounds.
        reset();
        let dev = Device::Cpu;
        time(Section::Norm, &dev, || Ok(())).unwrap();
        assert!(totals().iter().all(|&(_, s, c)| s == 0.0 && c == 0));
        set_enabled(true);
        time(Section::Norm, &dev, || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            Ok(())
        })
        .unwrap();
        time(Section::Matmul, &dev, || Ok(())).unwrap();
        set_enabled(false);
        let t = totals();
        let norm = t.iter().find(|x| x.0 == Section::Norm).unwrap();
        assert!(norm.1 >= 0.005 && norm.2 >= 1, "{norm:?}");
        assert!(t.iter().find(|x| x.0 == Section::Matmul).unwrap().2 >= 1);
        // Errors pass through, untimed.
        set_enabled(true);
        let e = time::<()>(Section::Rope, &dev, || candle_core::bail!("boom"));
        set_enabled(false);
        assert!(e.is_err());
    }
}
