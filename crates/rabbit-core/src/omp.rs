//! Running our own CPU kernels on libtorch's OpenMP team instead of a second thread pool.
//!
//! Why: after each parallel region libtorch's OpenMP threads spin for a while before they sleep.
//! Work handed to another pool (rayon) between two libtorch ops then shares the cores with
//! threads that are spinning for nothing: profiled on a 2-core machine, 31% of a compressed
//! decode step was libgomp spinning while the rayon kernel ran. Running the kernel on the same
//! team uses exactly the threads that are already awake, and follows the thread count
//! [`crate::threads`] sets.
//!
//! The team is reached through the OpenMP runtime libtorch loaded (`GOMP_parallel`, the entry
//! point compilers emit for `#pragma omp parallel`, which Intel's and LLVM's runtimes export
//! too), looked up once with `dlsym`; without one, work falls back to rayon.

use std::ffi::c_void;
use std::sync::OnceLock;

type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, u32, u32);
type OmpInt = unsafe extern "C" fn() -> i32;

struct Runtime {
    parallel: GompParallel,
    thread_num: OmpInt,
    num_threads: OmpInt,
}

fn runtime() -> Option<&'static Runtime> {
    static RT: OnceLock<Option<Runtime>> = OnceLock::new();
    RT.get_or_init(|| {
        let sym = |name: &[u8]| {
            // SAFETY: a NUL-terminated symbol name looked up in the already loaded objects.
            let p =
                unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr() as *const libc::c_char) };
            (!p.is_null()).then_some(p)
        };
        let (p, t, n) = (
            sym(b"GOMP_parallel\0")?,
            sym(b"omp_get_thread_num\0")?,
            sym(b"omp_get_num_threads\0")?,
        );
        // SAFETY: these symbols have these C signatures in every OpenMP runtime exporting them.
        unsafe {
            Some(Runtime {
                parallel: std::mem::transmute::<*mut c_void, GompParallel>(p),
                thread_num: std::mem::transmute::<*mut c_void, OmpInt>(t),
                num_threads: std::mem::transmute::<*mut c_void, OmpInt>(n),
            })
        }
    })
    .as_ref()
}

/// A buffer several threads of one [`parallel`] region write at disjoint positions.
pub(crate) struct SharedMut<T>(*mut T);
// SAFETY: callers write disjoint ranges only, and the region ends before the buffer is read.
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Shares `buf`'s elements for the region.
    pub(crate) fn new(buf: &mut [T]) -> Self {
        SharedMut(buf.as_mut_ptr())
    }

    /// The `len` elements from `at` on.
    ///
    /// # Safety
    /// `at + len` is within the buffer, and no other thread touches these elements meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, at: usize, len: usize) -> &mut [T] {
        // SAFETY: as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}

struct Job<'a> {
    f: &'a (dyn Fn(usize, usize) + Sync),
    rt: &'static Runtime,
    panicked: std::sync::atomic::AtomicBool,
}

extern "C" fn trampoline(data: *mut c_void) {
    // SAFETY: `data` is the `Job` that `parallel` passes and outlives the region.
    let job = unsafe { &*(data as *const Job<'_>) };
    // SAFETY: called inside the parallel region, as OpenMP allows.
    let (me, team) = unsafe { ((job.rt.thread_num)(), (job.rt.num_threads)()) };
    let run = std::panic::AssertUnwindSafe(|| (job.f)(me.max(0) as usize, team.max(1) as usize));
    // A panic must not unwind into the C runtime.
    if std::panic::catch_unwind(run).is_err() {
        job.panicked
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Runs `f(part, parts)` for every `part` in `0..parts`, on up to `threads` threads of
/// libtorch's OpenMP team (the calling thread among them), and returns when all are done. The
/// team may be smaller than asked; `f` must cover the work from `parts` it is given.
pub fn parallel(threads: usize, f: &(dyn Fn(usize, usize) + Sync)) {
    let threads = threads.max(1);
    if threads == 1 {
        return f(0, 1);
    }
    match runtime() {
        Some(rt) => {
            let job = Job {
                f,
                rt,
                panicked: std::sync::atomic::AtomicBool::new(false),
            };
            // SAFETY: `trampoline` matches the callback type; `job` lives until the region
            // ends (GOMP_parallel returns after every thread finished).
            unsafe {
                (rt.parallel)(
                    trampoline,
                    &job as *const Job<'_> as *mut c_void,
                    threads as u32,
                    0,
                )
            };
            if job.panicked.into_inner() {
                panic!("a parallel CPU kernel panicked");
            }
        }
        None => {
            use rayon::prelude::*;
            (0..threads).into_par_iter().for_each(|p| f(p, threads));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_part_runs_once() {
        // libtorch's runtime is loaded once a tensor op ran.
        let _ = tch::Tensor::from(1.0f32).f_add_scalar(1.0);
        for threads in [1, 2, 3, 8] {
            let parts = AtomicUsize::new(0);
            let sum = AtomicUsize::new(0);
            parallel(threads, &|p, n| {
                parts.store(n, Ordering::SeqCst);
                sum.fetch_add(p + 1, Ordering::SeqCst);
            });
            let n = parts.load(Ordering::SeqCst);
            assert!((1..=threads).contains(&n), "{threads}: team of {n}");
            assert_eq!(sum.load(Ordering::SeqCst), n * (n + 1) / 2, "{threads}");
        }
        assert!(runtime().is_some(), "libtorch's OpenMP runtime is found");
    }
}
