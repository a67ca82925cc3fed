//! The process's global allocator: mimalloc, called through its plain entry points
//! whenever the alignment asked for is one `mi_malloc` always gives.
//!
//! The `mimalloc` crate's own `GlobalAlloc` calls `mi_malloc_aligned` for every
//! allocation. In mimalloc 3 that takes the fast path only for blocks up to 1 KiB;
//! any larger block whose size is not a power of two up to 4 KiB is *over-allocated*
//! (size + alignment, then an interior pointer), even at alignment 1. On rampart's
//! hot path that was hyper's 8 KiB read buffer and two boxed futures per request:
//! about 2 over-allocations per request under callgrind.
//!
//! `mi_malloc` returns 16-byte-aligned blocks for sizes that are multiples of 16,
//! and size-aligned ones below (Rust sizes are multiples of their alignment). The
//! result is checked anyway, and the aligned call is the fallback.
//!
//! Also `boxed`: a future built in its heap block rather than copied there.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;
use std::pin::Pin;

/// mimalloc's guaranteed alignment (`MI_MAX_ALIGN_SIZE`).
const PLAIN_ALIGN: usize = 16;

extern "C" {
    fn mi_malloc(size: usize) -> *mut c_void;
    fn mi_zalloc(size: usize) -> *mut c_void;
    fn mi_realloc(p: *mut c_void, newsize: usize) -> *mut c_void;
    fn mi_free(p: *mut c_void);
    fn mi_malloc_aligned(size: usize, alignment: usize) -> *mut c_void;
    fn mi_zalloc_aligned(size: usize, alignment: usize) -> *mut c_void;
    fn mi_realloc_aligned(p: *mut c_void, newsize: usize, alignment: usize) -> *mut c_void;
}

// The `mimalloc` crate links the C library these symbols come from.
use mimalloc as _;

pub struct MiMalloc;

/// `Box::pin(make())`, with the value built in its box: `Box::pin` takes it built on
/// the stack and copies it in, and the futures boxed on the request path are 1.8 to
/// 3.4 KB (a try's cost ~200 instructions a copy under callgrind).
pub fn boxed<T>(make: impl FnOnce() -> T) -> Pin<Box<T>> {
    let mut slot = Box::new_uninit();
    slot.write(make());
    // SAFETY: written on the line above. (`Box::write` says the same without
    // `unsafe`, but needs Rust 1.87; the MSRV is Debian 13's 1.85.)
    Box::into_pin(unsafe { slot.assume_init() })
}

fn aligned(p: *mut c_void, align: usize) -> bool {
    (p as usize) & (align - 1) == 0
}

/// A block from `plain` (`mi_malloc` or `mi_zalloc`) when that alignment is
/// guaranteed and the block meets it, otherwise from the `aligned` counterpart.
///
/// # Safety
/// As `GlobalAlloc::alloc`: `layout` has a non-zero size.
#[inline]
unsafe fn allocate(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned_call: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let align = layout.align();
    if align <= PLAIN_ALIGN {
        let p = plain(layout.size());
        if p.is_null() || aligned(p, align) {
            return p.cast();
        }
        mi_free(p);
    }
    aligned_call(layout.size(), align).cast()
}

// SAFETY: every block comes from mimalloc and goes back to `mi_free`, which takes
// blocks from any of its allocation calls; each returned block is checked to meet
// `layout.align()` (or comes from the aligned call, which guarantees it).
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        allocate(layout, mi_malloc, mi_malloc_aligned)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        allocate(layout, mi_zalloc, mi_zalloc_aligned)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi_free(ptr.cast());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        if align > PLAIN_ALIGN {
            return mi_realloc_aligned(ptr.cast(), new_size, align).cast();
        }
        let p = mi_realloc(ptr.cast(), new_size);
        if p.is_null() || aligned(p, align) {
            return p.cast();
        }
        // Never seen: move the contents to an aligned block.
        let q = mi_malloc_aligned(new_size, align);
        if !q.is_null() {
            std::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), new_size);
        }
        mi_free(p);
        q.cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_of_every_size_class_meet_their_alignment_and_survive_realloc() {
        let a = MiMalloc;
        for align in [1usize, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in (1..=20_000usize).step_by(7).map(|s| s.next_multiple_of(align)) {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; each block is written within its size and
                // freed once, with its layout.
                unsafe {
                    let p = if size % 2 == 0 {
                        a.alloc(layout)
                    } else {
                        a.alloc_zeroed(layout)
                    };
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xab, size);
                    let bigger = size * 3 + 1;
                    let q = a.realloc(p, layout, bigger);
                    assert_eq!(q as usize % align, 0, "realloc to {bigger}, align {align}");
                    assert_eq!(*q.add(size - 1), 0xab, "contents kept");
                    a.dealloc(q, Layout::from_size_align(bigger, align).unwrap());
                }
            }
        }
    }
}
