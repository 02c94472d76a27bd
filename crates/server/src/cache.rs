//! The video cache: decoded frames, the vision features of a video, and the LM's KV of the
//! prompt up to and including its visual tokens (at the pooled side last used), so that a
//! follow-up question about it neither decodes, encodes nor prefills it again, and the planner
//! prices it at its marginal cost. Text prompts keep the KV of their system message here too
//! (keyed by that message), so requests sharing a system prompt do not prefill it again. Keyed by scope (the tenant, unless sharing is configured: a cross-tenant hit
//! would tell one tenant, by its timing, that another sent the same video), the SHA-256 of the
//! video's bytes, the checkpoint and the number of frames (uniform sampling: the instants
//! follow from it and the video). Bounded by bytes, least recently used out first.
//!
//! Owns the cache's keys, bounds and counters; must not know tensors (features are the engine's
//! opaque [`VisionFeatures`]) or how frames are decoded.

use crate::worker::Frames;
use lru::LruCache;
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};
use vvlm_engine::{PrefixKv, VisionFeatures};
use vvlm_planner::CachedVision;
use vvlm_video::SampledFrame;

/// What identifies a cached video encoding.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub scope: String,
    pub content: [u8; 32],
    pub model: String,
    pub frames: u32,
}

/// One cached video at one (checkpoint, frame count).
#[derive(Clone)]
pub struct CacheEntry {
    pub frames: Arc<Frames>,
    pub sampled: Arc<Vec<SampledFrame>>,
    pub features: Option<Arc<VisionFeatures>>,
    /// The KV of [text before the video + visual tokens] at one pooled side.
    pub prefix: Option<CachedPrefix>,
}

/// A KV prefix with what it was made for.
#[derive(Clone)]
pub struct CachedPrefix {
    pub side: u32,
    /// The request's system prompt (part of the text before the video).
    pub system: Option<String>,
    pub kv: PrefixKv,
}

impl CacheEntry {
    fn bytes(&self) -> usize {
        self.frames.pixels.len() * 4
            + self.features.as_ref().map_or(0, |f| f.bytes())
            + self.prefix.as_ref().map_or(0, |p| p.kv.bytes())
    }
}

struct Inner {
    map: LruCache<CacheKey, CacheEntry>,
    bytes: usize,
}

pub struct VideoCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

/// The key content of a text prompt's cached KV: its system message (None apart from every
/// string), in a domain of its own (never a video's hash).
pub fn text_prefix_key(system: Option<&str>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"vvlm text prefix\0");
    match system {
        Some(s) => {
            h.update([1]);
            h.update(s.as_bytes());
        }
        None => h.update([0]),
    }
    h.finalize().into()
}

/// The SHA-256 of a video's bytes (or of a list of images, each length-prefixed).
pub fn content_hash<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().into()
}

impl VideoCache {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            inner: Mutex::new(Inner {
                map: LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry for a key, marked as recently used.
    pub fn get(&self, key: &CacheKey) -> Option<CacheEntry> {
        self.lock().map.get(key).cloned()
    }

    /// The (checkpoint, frames) with encoded features for a video in a scope, and the pooled
    /// side and positions of a KV prefix made for the same system prompt: what the planner may
    /// price at its marginal cost.
    pub fn cached_vision(
        &self,
        scope: &str,
        content: &[u8; 32],
        system: Option<&str>,
    ) -> Vec<CachedVision> {
        self.lock()
            .map
            .iter()
            .filter(|(k, e)| k.scope == scope && &k.content == content && e.features.is_some())
            .map(|(k, e)| {
                let prefix = e.prefix.as_ref().filter(|p| p.system.as_deref() == system);
                CachedVision {
                    model: k.model.clone(),
                    frames: k.frames,
                    prefilled_side: prefix.map(|p| p.side),
                    prefix_tokens: prefix.map(|p| p.kv.tokens()),
                }
            })
            .collect()
    }

    /// Text alone: per checkpoint, the prompt tokens whose KV is cached for a text prefix key
    /// ([`text_prefix_key`]) in a scope: what the planner may price at its marginal cost.
    pub fn cached_text_tokens(
        &self,
        scope: &str,
        content: &[u8; 32],
    ) -> std::collections::BTreeMap<String, usize> {
        self.lock()
            .map
            .iter()
            .filter(|(k, _)| k.scope == scope && &k.content == content && k.frames == 0)
            .filter_map(|(k, e)| e.prefix.as_ref().map(|p| (k.model.clone(), p.kv.tokens())))
            .collect()
    }

    /// Inserts or replaces an entry, then evicts the least recently used until under the cap.
    /// An entry larger than the cap alone is not kept.
    pub fn put(&self, key: CacheKey, entry: CacheEntry) {
        let size = entry.bytes();
        let mut g = self.lock();
        if size > self.max_bytes {
            if let Some(old) = g.map.pop(&key) {
                g.bytes -= old.bytes();
            }
            return;
        }
        if let Some(old) = g.map.put(key, entry) {
            g.bytes -= old.bytes();
        }
        g.bytes += size;
        while g.bytes > self.max_bytes {
            match g.map.pop_lru() {
                Some((_, old)) => g.bytes -= old.bytes(),
                None => break,
            }
        }
    }

    /// Adds features to an entry that has the frames (if it is still cached).
    pub fn add_features(&self, key: &CacheKey, features: VisionFeatures) {
        let entry = self.lock().map.peek(key).cloned();
        if let Some(mut e) = entry {
            e.features = Some(Arc::new(features));
            self.put(key.clone(), e);
        }
    }

    /// Keeps the KV prefix of an entry's video (replacing the one it had).
    pub fn add_prefix(&self, key: &CacheKey, prefix: CachedPrefix) {
        let entry = self.lock().map.peek(key).cloned();
        if let Some(mut e) = entry {
            e.prefix = Some(prefix);
            self.put(key.clone(), e);
        }
    }

    /// Keeps a text prompt's KV prefix (an entry of its own, without frames).
    pub fn put_text_prefix(&self, key: CacheKey, prefix: CachedPrefix) {
        self.put(
            key,
            CacheEntry {
                frames: Arc::new(Frames {
                    pixels: vec![],
                    count: 0,
                    size: 0,
                }),
                sampled: Arc::new(vec![]),
                features: None,
                prefix: Some(prefix),
            },
        );
    }

    /// (entries, bytes) held now.
    pub fn usage(&self) -> (usize, usize) {
        let g = self.lock();
        (g.map.len(), g.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(values: usize) -> CacheEntry {
        CacheEntry {
            frames: Arc::new(Frames {
                pixels: vec![0.0; values],
                count: 1,
                size: 1,
            }),
            sampled: Arc::new(vec![]),
            features: None,
            prefix: None,
        }
    }

    fn key(scope: &str, n: u8) -> CacheKey {
        CacheKey {
            scope: scope.into(),
            content: [n; 32],
            model: "m".into(),
            frames: 4,
        }
    }

    #[test]
    fn evicts_least_recently_used_under_the_byte_cap() {
        // 100 values = 400 bytes each; a 1000-byte cache holds two.
        let c = VideoCache::new(1000);
        c.put(key("a", 1), entry(100));
        c.put(key("a", 2), entry(100));
        assert_eq!(c.usage(), (2, 800));
        assert!(c.get(&key("a", 1)).is_some()); // 1 is now the most recent
        c.put(key("a", 3), entry(100));
        assert_eq!(c.usage(), (2, 800));
        assert!(
            c.get(&key("a", 2)).is_none(),
            "the least recently used goes"
        );
        assert!(c.get(&key("a", 1)).is_some() && c.get(&key("a", 3)).is_some());
        // Too large alone: not kept, nothing else evicted.
        c.put(key("a", 4), entry(1000));
        assert_eq!(c.usage(), (2, 800));
        // Replacing an entry counts its new size once.
        c.put(key("a", 3), entry(50));
        assert_eq!(c.usage(), (2, 600));
    }

    #[test]
    fn scopes_and_contents_are_separate() {
        let c = VideoCache::new(1 << 20);
        c.put(key("alice", 1), entry(10));
        assert!(c.get(&key("bob", 1)).is_none());
        assert!(c.get(&key("alice", 2)).is_none());
        // Only entries with features are offered to the planner.
        assert!(c.cached_vision("alice", &[1; 32], None).is_empty());
        assert_ne!(
            content_hash([b"ab".as_slice(), b"c".as_slice()]),
            content_hash([b"a".as_slice(), b"bc".as_slice()])
        );
    }
}
