//! Intra-op threads of the CPU kernels: a fixed count, or (the default) adapting to the cores
//! other processes leave free.
//!
//! Why adapt: libtorch's OpenMP threads spin at every barrier of every small parallel region a
//! decode step is made of. When another process takes one of the cores, one of our threads is
//! preempted in the middle of a region and the others spin until it comes back: on a 2-core
//! machine one busy core made decode 5–6× slower with 2 threads, against 1.6× with 1 thread.
//! A passive wait policy avoids the stall but costs ~25% on a quiet machine (the wake-ups), and
//! libgomp reads it once, before `main`. So instead the thread count follows the load: every
//! [`WINDOW`] the governor reads how busy our CPUs were (`/proc/stat`, steal included) minus our
//! own CPU time, and uses the cores that are left (with hysteresis, so noise does not flip it).
//!
//! OpenMP's thread count is a per-thread setting (libtorch's `set_num_threads` also sets its
//! global default, MKL's and its own pool's): [`tick`] applies it on the thread that calls it,
//! the one that runs the compute. The ceiling is libtorch's default count, capped by what the
//! process may use (its affinity mask and cgroup CPU quota, as `available_parallelism` reads
//! them).

use std::cell::Cell;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many intra-op threads the CPU kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Threads {
    /// Up to libtorch's default count (the cores, or `OMP_NUM_THREADS`), fewer while other
    /// processes keep some of the cores busy.
    #[default]
    Auto,
    /// Exactly this many, whatever the load.
    Fixed(usize),
}

impl std::fmt::Display for Threads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Threads::Auto => f.write_str("auto"),
            Threads::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for Threads {
    type Err = String;
    fn from_str(s: &str) -> Result<Threads, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Threads::Auto);
        }
        match s.parse::<usize>() {
            Ok(0) => Err("0 threads: give at least 1, or auto".into()),
            Ok(n) if n > MAX_THREADS => Err(format!("{n} threads is more than {MAX_THREADS}")),
            Ok(n) => Ok(Threads::Fixed(n)),
            Err(_) => Err(format!(
                "`{s}` is not a thread count (a number ≥ 1, or auto)"
            )),
        }
    }
}

/// The most intra-op threads `--threads` accepts.
pub const MAX_THREADS: usize = 1024;

/// How long the load is measured before the thread count is reconsidered.
pub const WINDOW: Duration = Duration::from_millis(300);

/// The first window, from [`configure`] (loading the model) on: short, so that the first sweep
/// (a prefill of a quickly opened streamed model) already runs with the right count.
const FIRST_WINDOW: Duration = Duration::from_millis(100);

/// Free cores must exceed the current count by this much before a thread is added, and fall
/// below it by this much before one is removed.
const HYSTERESIS: f64 = 0.6;

/// The thread count for `free` cores (our CPUs minus what other processes used), moving from
/// `current` only when the difference is clear; always within `1..=max`.
pub fn decide(current: usize, max: usize, free: f64) -> usize {
    let max = max.max(1);
    let mut n = current.clamp(1, max);
    while n > 1 && free < n as f64 - HYSTERESIS {
        n -= 1;
    }
    while n < max && free > n as f64 + HYSTERESIS {
        n += 1;
    }
    n
}

/// Busy and total time of the given CPUs from `/proc/stat` text, in clock ticks, and how many
/// CPU lines they came from: busy is everything but idle and iowait (steal counts as busy: the
/// hypervisor took the core). `cpus` empty means every CPU line. `None` when no requested CPU
/// line is present.
pub fn cpu_ticks(stat: &str, cpus: &[usize]) -> Option<(u64, u64, usize)> {
    let (mut busy, mut total, mut seen) = (0u64, 0u64, 0usize);
    for line in stat.lines() {
        // Per-CPU lines only ("cpu3 ..."), not the aggregate "cpu  ..." line.
        let Some(rest) = line
            .strip_prefix("cpu")
            .filter(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        else {
            continue;
        };
        let mut fields = rest.split_ascii_whitespace();
        let Some(Ok(id)) = fields.next().map(str::parse::<usize>) else {
            continue;
        };
        if !cpus.is_empty() && !cpus.contains(&id) {
            continue;
        }
        let v: Vec<u64> = fields.take(8).filter_map(|f| f.parse().ok()).collect();
        if v.len() < 4 {
            continue;
        }
        // user nice system idle iowait irq softirq steal
        let idle = v[3] + v.get(4).copied().unwrap_or(0);
        let all: u64 = v.iter().sum();
        busy += all - idle;
        total += all;
        seen += 1;
    }
    (seen > 0).then_some((busy, total, seen))
}

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    busy_ticks: u64,
    own_s: f64,
}

struct Governor {
    policy: Threads,
    max: usize,
    current: usize,
    cpus: Vec<usize>,
    /// CPU lines the last sample summed (the CPUs measured).
    lines: usize,
    ticks_per_s: f64,
    last: Option<Sample>,
    /// Sum and count of the thread counts layers ran with (for reports).
    used: (u64, u64),
    /// Whether a first decision was taken (after [`FIRST_WINDOW`]).
    decided: bool,
}

static GOVERNOR: Mutex<Option<Governor>> = Mutex::new(None);

thread_local! {
    /// The count last applied on this thread (OpenMP's setting is per thread).
    static APPLIED: Cell<usize> = const { Cell::new(0) };
}

/// The CPUs this process may run on (its affinity mask).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// CPU time of this whole process (all its threads), in seconds.
fn own_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

impl Governor {
    fn sample(&mut self) -> Option<Sample> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        // CPU lines that do not match the affinity mask (an unreadable mask, or a container
        // that renumbers /proc/stat): measure every CPU line instead.
        let (busy, _, lines) = match cpu_ticks(&stat, &self.cpus) {
            Some(t) => t,
            None => {
                self.cpus.clear();
                cpu_ticks(&stat, &[])?
            }
        };
        self.lines = lines;
        Some(Sample {
            at: Instant::now(),
            busy_ticks: busy,
            own_s: own_cpu_s(),
        })
    }

    /// Re-measures when a window has passed; returns the count to use.
    fn update(&mut self) -> usize {
        if let Threads::Fixed(n) = self.policy {
            return n;
        }
        let now = Instant::now();
        let window = if self.decided { WINDOW } else { FIRST_WINDOW };
        if matches!(self.last, Some(l) if now - l.at < window) {
            return self.current;
        }
        let Some(s) = self.sample() else {
            return self.current;
        };
        if let Some(l) = self.last {
            let dt = (s.at - l.at).as_secs_f64();
            let busy = (s.busy_ticks.saturating_sub(l.busy_ticks)) as f64 / self.ticks_per_s;
            let others = (busy - (s.own_s - l.own_s)).max(0.0) / dt;
            let free = self.lines.max(1) as f64 - others;
            let next = decide(self.current, self.max, free);
            self.decided = true;
            if next != self.current {
                tracing::debug!(from = self.current, to = next, others, "intra-op threads");
                self.current = next;
            }
        }
        self.last = Some(s);
        self.current
    }
}

/// Sets the policy for this process (the first call also reads libtorch's default count, the
/// ceiling of [`Threads::Auto`]) and applies it on the calling thread.
pub fn configure(policy: Threads) {
    let mut g = GOVERNOR.lock().unwrap_or_else(|e| e.into_inner());
    let cpus = allowed_cpus();
    let max = match g.as_ref() {
        Some(g) => g.max,
        None => {
            // libtorch counts the host's cores; the process may be allowed fewer.
            let allowed = std::thread::available_parallelism().map_or(usize::MAX, |n| n.get());
            (tch::get_num_threads().max(1) as usize).min(allowed).max(1)
        }
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let current = match policy {
        Threads::Fixed(n) => n,
        Threads::Auto => max,
    };
    let lines = cpus.len();
    let mut gov = Governor {
        policy,
        max,
        current,
        cpus,
        lines,
        ticks_per_s: if hz > 0 { hz as f64 } else { 100.0 },
        last: None,
        used: (0, 0),
        decided: false,
    };
    // The first window starts now (loading the model), so the first sweeps already adapt.
    gov.last = gov.sample();
    *g = Some(gov);
    drop(g);
    apply(current);
}

fn apply(n: usize) {
    APPLIED.with(|a| {
        if a.get() != n {
            tch::set_num_threads(n as i32);
            a.set(n);
        }
    });
}

/// Called before each layer of a sweep on the compute thread (cheap: a lock and a clock read
/// unless a window has passed): re-measures the load when a window has passed and applies the
/// thread count. Does nothing until [`configure`] was called.
pub fn tick() {
    let mut g = GOVERNOR.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gov) = g.as_mut() else { return };
    let n = gov.update();
    gov.used.0 += n as u64;
    gov.used.1 += 1;
    drop(g);
    apply(n);
}

/// The policy, the count in use, and the mean count layers ran with since [`configure`]
/// (`None` before it, or before the first sweep for the mean).
pub fn report() -> Option<(Threads, usize, Option<f64>)> {
    let g = GOVERNOR.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref().map(|g| {
        let mean = (g.used.1 > 0).then(|| g.used.0 as f64 / g.used.1 as f64);
        (g.policy, g.current, mean)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counts_and_auto_and_refuses_the_rest() {
        assert_eq!("auto".parse::<Threads>(), Ok(Threads::Auto));
        assert_eq!("AUTO".parse::<Threads>(), Ok(Threads::Auto));
        assert_eq!("3".parse::<Threads>(), Ok(Threads::Fixed(3)));
        for bad in ["0", "-1", "two", "", "1.5", "1025"] {
            let e = bad.parse::<Threads>().unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert_eq!(Threads::Fixed(4).to_string(), "4");
        assert_eq!(Threads::Auto.to_string(), "auto");
    }

    #[test]
    fn decide_follows_free_cores_with_hysteresis() {
        // Quiet 2-core machine: stay at 2.
        assert_eq!(decide(2, 2, 1.95), 2);
        // One busy core (our spinning threads leave it ~0.7 of a core): drop to 1.
        assert_eq!(decide(2, 2, 1.3), 1);
        // Noise near the boundary moves nothing.
        assert_eq!(decide(2, 2, 1.5), 2);
        assert_eq!(decide(1, 2, 1.5), 1);
        // The other process stopped: back to 2.
        assert_eq!(decide(1, 2, 1.9), 2);
        // Never below 1 nor above the ceiling.
        assert_eq!(decide(2, 2, -3.0), 1);
        assert_eq!(decide(1, 4, 64.0), 4);
        assert_eq!(decide(8, 4, 64.0), 4);
        // Several cores at once on a large machine.
        assert_eq!(decide(16, 16, 9.0), 9);
    }

    #[test]
    fn proc_stat_ticks_of_chosen_cpus() {
        let stat = "cpu  10 0 10 100 5 0 0 0 0 0\n\
                    cpu0 4 1 3 50 2 1 1 2 0 0\n\
                    cpu1 6 0 7 50 3 0 0 0 0 0\n\
                    intr 12345\nctxt 99\n";
        // cpu0: busy = 4+1+3+1+1+2 = 12, total = 64.
        assert_eq!(cpu_ticks(stat, &[0]), Some((12, 64, 1)));
        assert_eq!(cpu_ticks(stat, &[1]), Some((13, 66, 1)));
        assert_eq!(cpu_ticks(stat, &[]), Some((25, 130, 2)));
        assert_eq!(cpu_ticks(stat, &[1, 5]), Some((13, 66, 1)));
        assert_eq!(cpu_ticks(stat, &[7]), None);
        assert_eq!(cpu_ticks("garbage", &[]), None);
    }

    #[test]
    fn this_machine_has_a_readable_stat_and_affinity() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        let stat = std::fs::read_to_string("/proc/stat").unwrap();
        let (busy, total, lines) = cpu_ticks(&stat, &cpus).unwrap();
        assert_eq!(lines, cpus.len());
        assert!(busy <= total && total > 0);
    }
}
