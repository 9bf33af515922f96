//! Support for plugins built for `wasm32-unknown-unknown`: components that import
//! nothing from WASI, only warren's own `warren:plugin` interfaces.
//!
//! Such a component is cheaper to instantiate for every message (about 2 µs
//! less per message for the no-op plugin, see BENCHMARKS.md), and it gets
//! exactly what warren grants and nothing else. What it gives up is what WASI
//! provides: no clocks, no random numbers, no stdout/stderr (use [`crate::log`]).
//! Two pieces make the target usable, and this module provides both:
//!
//! * **An allocator that starts in the instance's initial memory.** The
//!   standard library's allocator for this target asks for every byte with
//!   `memory.grow`. warren gives each message a fresh instance, so the very
//!   first allocation of every message (the message's own body) would grow the
//!   memory, which costs the host two system calls per message (one to grow,
//!   one to shrink the pooled slot back). Here the same dlmalloc first gets a
//!   zeroed arena that is part of the module's initial memory and only grows
//!   the memory past it.
//! * **Panic messages in warren's log** (feature `panic-log`). Without stderr a
//!   panic would trap with no text; the hook sends it to warren's log at error
//!   level first.
//!
//! Both are default features. Without `allocator`, bring your own
//! `#[global_allocator]`. Without `panic-log`, a plugin that never logs imports
//! no function at all, which saves it about 2 µs per message more (an imported
//! function that takes a string needs two extra core instances), at the price
//! of panics that trap without their message.

/// Installs the panic hook once per instance (called before every handler call;
/// after the first call it is one atomic load).
pub(crate) fn init() {
    #[cfg(feature = "panic-log")]
    {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                crate::log::error(&format!("plugin panicked: {info}"));
            }));
        });
    }
}

// The allocator below takes no lock: it relies on the target having one thread.
#[cfg(all(feature = "allocator", target_feature = "atomics"))]
compile_error!(
    "warren-plugin-sdk's `allocator` feature is single-threaded: build without \
     `+atomics`, or turn the feature off and bring a thread-safe allocator"
);

#[cfg(feature = "allocator")]
mod allocator {
    use core::alloc::{GlobalAlloc, Layout};
    use core::arch::wasm32;
    use core::cell::UnsafeCell;
    use core::ptr;
    use core::sync::atomic::{AtomicBool, Ordering};

    use dlmalloc::Dlmalloc;

    /// WebAssembly's page size.
    const PAGE: usize = 64 * 1024;
    /// The arena in the initial memory: enough for a few kilobytes of message and
    /// what the handler makes of it. Untouched pages cost nothing, neither to
    /// instantiate (they are zero-filled on demand) nor to reset.
    const ARENA: usize = 4 * PAGE;

    #[repr(C, align(65536))]
    struct Arena(UnsafeCell<[u8; ARENA]>);
    // SAFETY: the arena is handed to the allocator once (guarded by `Pages::taken`)
    // and only ever touched through it.
    unsafe impl Sync for Arena {}
    static ARENA_MEMORY: Arena = Arena(UnsafeCell::new([0; ARENA]));

    /// Where dlmalloc gets its memory: the arena first, then `memory.grow`.
    struct Pages {
        taken: AtomicBool,
    }

    // SAFETY: follows dlmalloc's contract: regions are page-aligned, at least the
    // size asked for, zeroed, and never handed out twice.
    unsafe impl dlmalloc::Allocator for Pages {
        fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
            if size <= ARENA && !self.taken.swap(true, Ordering::Relaxed) {
                return (ARENA_MEMORY.0.get().cast(), ARENA, 0);
            }
            let Some(pages) = size.checked_add(PAGE - 1).map(|s| s / PAGE) else {
                return (ptr::null_mut(), 0, 0);
            };
            let previous = wasm32::memory_grow(0, pages);
            if previous == usize::MAX {
                return (ptr::null_mut(), 0, 0);
            }
            match (previous.checked_mul(PAGE), pages.checked_mul(PAGE)) {
                (Some(start), Some(len)) => (ptr::without_provenance_mut(start), len, 0),
                _ => (ptr::null_mut(), 0, 0),
            }
        }

        fn remap(&self, _ptr: *mut u8, _old: usize, _new: usize, _can_move: bool) -> *mut u8 {
            ptr::null_mut()
        }

        fn free_part(&self, _ptr: *mut u8, _old: usize, _new: usize) -> bool {
            false
        }

        fn free(&self, _ptr: *mut u8, _size: usize) -> bool {
            false
        }

        fn can_release_part(&self, _flags: u32) -> bool {
            false
        }

        fn allocates_zeros(&self) -> bool {
            true
        }

        fn page_size(&self) -> usize {
            PAGE
        }
    }

    /// dlmalloc behind `GlobalAlloc`. The target has no threads, so no lock.
    struct Global(UnsafeCell<Dlmalloc<Pages>>);
    // SAFETY: wasm32-unknown-unknown without the `atomics` feature has one thread.
    unsafe impl Sync for Global {}

    #[global_allocator]
    static GLOBAL: Global = Global(UnsafeCell::new(Dlmalloc::new_with_allocator(Pages {
        taken: AtomicBool::new(false),
    })));

    // SAFETY: forwards to dlmalloc, which upholds GlobalAlloc's contract; access is
    // single-threaded (see `Global`).
    unsafe impl GlobalAlloc for Global {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            unsafe { (*self.0.get()).malloc(layout.size(), layout.align()) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            unsafe { (*self.0.get()).calloc(layout.size(), layout.align()) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { (*self.0.get()).free(ptr, layout.size(), layout.align()) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            unsafe { (*self.0.get()).realloc(ptr, layout.size(), layout.align(), new_size) }
        }
    }
}
