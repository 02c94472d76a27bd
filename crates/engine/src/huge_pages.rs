//! Memory for the decode kernels' weights on transparent huge pages.
//!
//! Decode reads every weight from memory once a token. On 4 KiB pages SmolLM2's ~96 MB of
//! tiled Q4_1/Q8_0 records are ~24,000 pages a step, each a TLB miss and a page walk when its
//! first line is loaded; on 2 MiB pages, 48. The matrices are mostly smaller than a huge page
//! (a layer's q/k/v 0.35 MB, gate/up 1.1 MB), so one allocation each could not be backed by
//! one; [`WeightBytes::zeroed`] instead carves them out of shared segments of 32 MiB, mapped at
//! a 2 MiB boundary and advised `MADV_HUGEPAGE` before their first touch, so a model's matrices
//! lie one after another on huge pages. A segment is unmapped when the last matrix in it is
//! dropped.
//!
//! A hint only: where transparent huge pages are off (`never`) or the kernel finds no free huge
//! page, the segment is ordinary memory, and where anonymous mappings fail (or off Linux) each
//! buffer is a plain heap allocation. Owns nothing else: what the bytes mean is `qdot`'s.

use std::sync::{Arc, Mutex};

/// A huge page (x86-64 and aarch64 Linux with 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;
/// The size of a shared segment: a model's matrices fill a few, and a segment's unused tail is
/// address space (never touched, so never resident).
const SEGMENT: usize = 32 << 20;
/// Where each buffer starts in its segment (a cache line).
const ALIGN: usize = 64;

/// An anonymous mapping (or, where mapping failed, a heap buffer) that buffers are carved from.
struct Segment {
    ptr: *mut u8,
    len: usize,
    /// The heap buffer standing in for a mapping that failed.
    heap: Option<Vec<u8>>,
}

// SAFETY: the segment's memory is handed out in disjoint ranges, each owned by one
// `WeightBytes`; the segment itself only unmaps it when dropped, when no range is left.
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

impl Segment {
    /// A zeroed segment of at least `len` bytes (a multiple of the huge page).
    fn new(len: usize) -> Self {
        let len = len.next_multiple_of(HUGE_PAGE);
        #[cfg(target_os = "linux")]
        // SAFETY: an anonymous private mapping of `len + HUGE_PAGE` bytes, of which the 2 MiB
        // aligned `len` are kept and the rest unmapped; no memory is read or written here.
        unsafe {
            let total = len + HUGE_PAGE;
            let p = libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            if p != libc::MAP_FAILED {
                let base = p as usize;
                let start = base.next_multiple_of(HUGE_PAGE);
                if start > base {
                    libc::munmap(p, start - base);
                }
                let tail = base + total - (start + len);
                if tail > 0 {
                    libc::munmap((start + len) as *mut libc::c_void, tail);
                }
                // Only a hint: an error (THP unsupported) leaves ordinary pages.
                libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
                return Self {
                    ptr: start as *mut u8,
                    len,
                    heap: None,
                };
            }
        }
        let mut heap = vec![0u8; len];
        Self {
            ptr: heap.as_mut_ptr(),
            len,
            heap: Some(heap),
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if self.heap.is_none() {
            // SAFETY: the mapping made in `new`, unmapped once; no `WeightBytes` refers to it
            // any more (each holds the `Arc` this is the last of).
            unsafe {
                libc::munmap(self.ptr as *mut libc::c_void, self.len);
            }
        }
    }
}

/// The segment new buffers are carved from, and how much of it is handed out.
static CURRENT: Mutex<Option<(Arc<Segment>, usize)>> = Mutex::new(None);

/// Ranges of live segments whose buffers were dropped, for a buffer of the same length to take
/// again (a loader packs a matrix, then packs it again fused or reordered and drops the first:
/// without reuse a segment would keep those bytes resident for the model's life).
static FREED: Mutex<Vec<(std::sync::Weak<Segment>, usize, usize)>> = Mutex::new(Vec::new());
/// At most this many freed ranges are remembered (the oldest are forgotten).
const MAX_FREED: usize = 4096;

/// Zeroed bytes for a matrix of the decode kernels, from a huge-page segment shared with other
/// matrices (see the module doc). Derefs to `[u8]`.
pub struct WeightBytes {
    segment: Arc<Segment>,
    offset: usize,
    len: usize,
}

impl WeightBytes {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        if len > SEGMENT / 2 {
            // Large enough to fill huge pages of its own (a vocabulary-sized head).
            return Self {
                segment: Arc::new(Segment::new(len)),
                offset: 0,
                len,
            };
        }
        if let Some(reused) = Self::reuse(len) {
            return reused;
        }
        let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        let fits = |(s, used): &(Arc<Segment>, usize)| used.next_multiple_of(ALIGN) + len <= s.len;
        if !current.as_ref().is_some_and(fits) {
            *current = Some((Arc::new(Segment::new(SEGMENT)), 0));
        }
        let (segment, used) = current.as_mut().expect("a segment with room, set above");
        let offset = used.next_multiple_of(ALIGN);
        *used = offset + len;
        Self {
            segment: segment.clone(),
            offset,
            len,
        }
    }

    /// A freed range of exactly `len` bytes in a live segment, zeroed again.
    fn reuse(len: usize) -> Option<Self> {
        let mut freed = FREED.lock().unwrap_or_else(|e| e.into_inner());
        freed.retain(|(segment, _, _)| segment.strong_count() > 0);
        let i = freed.iter().position(|&(_, _, l)| l == len)?;
        let (segment, offset, len) = freed.swap_remove(i);
        let mut bytes = Self {
            segment: segment.upgrade()?,
            offset,
            len,
        };
        bytes.fill(0);
        Some(bytes)
    }
}

impl Drop for WeightBytes {
    fn drop(&mut self) {
        // The segment's last buffer takes it with it (unmapped); otherwise its range is left
        // for the next buffer of its length.
        if Arc::strong_count(&self.segment) > 1 {
            let mut freed = FREED.lock().unwrap_or_else(|e| e.into_inner());
            if freed.len() >= MAX_FREED {
                freed.remove(0);
            }
            freed.push((Arc::downgrade(&self.segment), self.offset, self.len));
        }
    }
}

impl std::ops::Deref for WeightBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `offset..offset + len` lies inside the segment (checked when carved), is
        // initialised (zeroed by the kernel or the heap) and is this buffer's alone.
        unsafe { std::slice::from_raw_parts(self.segment.ptr.add(self.offset), self.len) }
    }
}

impl std::ops::DerefMut for WeightBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `deref`; `&mut self` makes this the only reference to the range.
        unsafe { std::slice::from_raw_parts_mut(self.segment.ptr.add(self.offset), self.len) }
    }
}

impl Clone for WeightBytes {
    /// A copy in its own range (the ranges are never shared, so that `DerefMut` stays sound).
    fn clone(&self) -> Self {
        let mut copy = Self::zeroed(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBytes({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buffers are zeroed, disjoint, keep what is written to them through clones and the drop
    /// of their neighbours, and a large one gets a segment of its own.
    #[test]
    fn buffers_are_zeroed_disjoint_and_outlive_their_neighbours() {
        let mut a = WeightBytes::zeroed(1000);
        let mut b = WeightBytes::zeroed(3000);
        assert!(a.iter().all(|&x| x == 0) && b.iter().all(|&x| x == 0));
        a.fill(1);
        b.fill(2);
        assert!(a.iter().all(|&x| x == 1), "writing b changed a");
        let c = b.clone();
        drop(b);
        assert_eq!(c.len(), 3000);
        assert!(c.iter().all(|&x| x == 2));
        assert!(a.iter().all(|&x| x == 1));
        let big = WeightBytes::zeroed(SEGMENT);
        assert_eq!(big.offset, 0);
        assert!(big.segment.len >= SEGMENT);
        assert_eq!(
            big.segment.ptr as usize % HUGE_PAGE,
            0,
            "segments start on a huge page"
        );
        assert!(big.iter().step_by(4096).all(|&x| x == 0));
        // A dropped buffer's range is taken again by the next one of its length, zeroed.
        let mut d = WeightBytes::zeroed(12_345);
        d.fill(7);
        let (segment, offset) = (d.segment.ptr as usize, d.offset);
        drop(d);
        let e = WeightBytes::zeroed(12_345);
        assert!(e.iter().all(|&x| x == 0), "a reused range is zeroed");
        // (Another test thread may have taken it first; then it is elsewhere, still zeroed.)
        if (e.segment.ptr as usize, e.offset) != (segment, offset) {
            eprintln!("the freed range went to another buffer of its length");
        }
        // Many small ones: segments are replaced when full, and every buffer stays readable.
        let many: Vec<WeightBytes> = (0..200)
            .map(|i| {
                let mut w = WeightBytes::zeroed(300_000);
                w[0] = i as u8;
                w
            })
            .collect();
        for (i, w) in many.iter().enumerate() {
            assert_eq!(w[0], i as u8);
            assert_eq!(w.as_ptr() as usize % ALIGN, 0);
        }
    }
}
