//! Process memory figures from `/proc`.

/// Peak resident set size (`VmHWM`) of process `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmHWM:")
}

/// Current resident set size (`VmRSS`) of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time this process has used so far, summed over its live threads, in nanoseconds
/// (`/proc/self/task/*/schedstat`). Repeatable where wall time is not: it leaves out
/// time spent waiting for a server.
pub fn cpu_time() -> Option<std::time::Duration> {
    tasks_cpu_time("/proc/self/task")
}

/// CPU time process `pid` (a server the bench started) has used so far, user and
/// system, threads that have exited included (`utime` and `stime` of
/// `/proc/<pid>/stat`, in clock ticks: 10 ms here, fine over a phase of a second or
/// more on two cores).
pub fn cpu_time_of(pid: u32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = rustix::param::clock_ticks_per_second();
    Some(std::time::Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000) / per_second.max(1),
    ))
}

fn tasks_cpu_time(dir: &str) -> Option<std::time::Duration> {
    tasks_sched(dir).map(|s| s.cpu)
}

/// What the scheduler did for threads, summed over them (`schedstat` and `status` of
/// each).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sched {
    /// Time on a CPU.
    pub cpu: std::time::Duration,
    /// Time runnable but waiting for a CPU: a woken thread's wait to run is in it.
    pub waiting: std::time::Duration,
    /// Times a thread was put on a CPU: after it slept (a park, a lock, I/O) or after
    /// it was preempted.
    pub runs: u64,
    /// Times a thread gave up its CPU to sleep (`voluntary_ctxt_switches`).
    pub sleeps: u64,
    /// Times a thread was preempted (`nonvoluntary_ctxt_switches`).
    pub preempted: u64,
}

impl std::ops::AddAssign for Sched {
    fn add_assign(&mut self, o: Sched) {
        self.cpu += o.cpu;
        self.waiting += o.waiting;
        self.runs += o.runs;
        self.sleeps += o.sleeps;
        self.preempted += o.preempted;
    }
}

impl Sched {
    /// What happened between `before` and this (threads that exited in between make
    /// it an underestimate, never negative).
    pub fn since(&self, before: &Sched) -> Sched {
        Sched {
            cpu: self.cpu.saturating_sub(before.cpu),
            waiting: self.waiting.saturating_sub(before.waiting),
            runs: self.runs.saturating_sub(before.runs),
            sleeps: self.sleeps.saturating_sub(before.sleeps),
            preempted: self.preempted.saturating_sub(before.preempted),
        }
    }
}

/// CPU time of the calling thread so far (`/proc/thread-self/schedstat`).
pub fn thread_cpu_time() -> Option<std::time::Duration> {
    thread_sched(std::path::Path::new("/proc/thread-self")).map(|s| s.cpu)
}

/// [`Sched`] of this process so far by thread name (`comm`: its first 15 bytes; tokio
/// names its workers and blocking threads alike).
pub fn sched_by_thread() -> Option<std::collections::BTreeMap<String, Sched>> {
    let mut by = std::collections::BTreeMap::<String, Sched>::new();
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        // A thread that exits meanwhile is left out.
        let (Ok(name), Some(s)) = (
            std::fs::read_to_string(path.join("comm")),
            thread_sched(&path),
        ) else {
            continue;
        };
        *by.entry(name.trim_end().to_owned()).or_default() += s;
    }
    Some(by)
}

fn thread_sched(task: &std::path::Path) -> Option<Sched> {
    let stat = std::fs::read_to_string(task.join("schedstat")).ok()?;
    let mut fields = stat.split_whitespace().map(|f| f.parse::<u64>().ok());
    let mut next = || fields.next().flatten();
    let (cpu, waiting, runs) = (next()?, next()?, next()?);
    let status = std::fs::read_to_string(task.join("status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .parse()
            .ok()
    };
    Some(Sched {
        cpu: std::time::Duration::from_nanos(cpu),
        waiting: std::time::Duration::from_nanos(waiting),
        runs,
        sleeps: field("voluntary_ctxt_switches:")?,
        preempted: field("nonvoluntary_ctxt_switches:")?,
    })
}

fn tasks_sched(dir: &str) -> Option<Sched> {
    let mut total = Sched::default();
    for task in std::fs::read_dir(dir).ok()? {
        total += thread_sched(&task.ok()?.path())?;
    }
    Some(total)
}

/// Bytes the files under `path` take on disk (allocated blocks, so preallocated but
/// unwritten space counts, as `du` counts it); 0 for a path that does not exist.
pub fn disk_usage(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.blocks() * 512;
    }
    let entries = std::fs::read_dir(path).into_iter().flatten().flatten();
    meta.blocks() * 512 + entries.map(|e| disk_usage(&e.path())).sum::<u64>()
}
