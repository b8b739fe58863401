//! Page-aligned, reusable host buffers: one whole layer is read into one of these with a single
//! sequential read, and its tensors are viewed in place.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment of every buffer: a page, so O_DIRECT reads and in-place tensor views both work.
pub const BUFFER_ALIGN: usize = 4096;

/// A heap buffer aligned to [`BUFFER_ALIGN`] with a fixed capacity and a current length.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively; it is moved between the reader thread and
// the compute thread (or shared read-only, below).
unsafe impl Send for AlignedBuf {}
// SAFETY: through a shared reference the buffer is only read (`as_slice`, `as_ptr`); writing
// needs `&mut` (`spare_mut`, `set_len`). Tensors viewing a shared buffer (the expert cache's)
// are weights, never written in place.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `cap` bytes (rounded up to the alignment). Zeroed so that the pages are real
    /// (measured memory is honest) and reads never expose stale data.
    pub fn new(cap: usize) -> AlignedBuf {
        let cap = cap.max(1).div_ceil(BUFFER_ALIGN) * BUFFER_ALIGN;
        let layout = Layout::from_size_align(cap, BUFFER_ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, cap, len: 0 }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Bytes currently holding data.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no data is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the length (after a read filled the first `len` bytes).
    ///
    /// # Panics
    /// When `len` exceeds the capacity (a programming error).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "AlignedBuf::set_len({len}) beyond capacity {}",
            self.cap
        );
        self.len = len;
    }

    /// The whole capacity, for filling.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for cap bytes and initialised (zeroed at allocation).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }

    /// The filled bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len <= cap initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for in-place tensor views.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, BUFFER_ALIGN).expect("valid layout");
        // SAFETY: allocated in `new` with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_rounded() {
        let mut b = AlignedBuf::new(5000);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.as_ptr() as usize % BUFFER_ALIGN, 0);
        b.spare_mut()[..3].copy_from_slice(&[1, 2, 3]);
        b.set_len(3);
        assert_eq!(b.as_slice(), &[1, 2, 3]);
    }
}
