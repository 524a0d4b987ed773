//! Process figures from `/proc`: memory, CPU time, the scheduler's counts.

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
    status_number(&status, field)
}

/// The first number after `field` (a line's start) in a `status` file's text.
fn status_number(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU time this process has used so far, threads that have exited included
/// (`CLOCK_PROCESS_CPUTIME_ID`): it never goes down. Repeatable where wall time is not:
/// it leaves out time spent waiting for a server.
pub fn cpu_time() -> std::time::Duration {
    duration(rustix::time::clock_gettime(
        rustix::time::ClockId::ProcessCPUTime,
    ))
}

fn duration(t: rustix::time::Timespec) -> std::time::Duration {
    std::time::Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
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

/// CPU time of the calling thread so far (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> std::time::Duration {
    duration(rustix::time::clock_gettime(
        rustix::time::ClockId::ThreadCPUTime,
    ))
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
    /// it was switched out while runnable.
    pub runs: u64,
    /// Times a thread gave up its CPU to sleep (`voluntary_ctxt_switches`).
    pub sleeps: u64,
    /// Times a thread was switched out while runnable: preempted, or yielding
    /// (`nonvoluntary_ctxt_switches`).
    pub switched: u64,
}

impl std::ops::AddAssign for Sched {
    fn add_assign(&mut self, o: Sched) {
        self.cpu += o.cpu;
        self.waiting += o.waiting;
        self.runs += o.runs;
        self.sleeps += o.sleeps;
        self.switched += o.switched;
    }
}

impl Sched {
    /// What happened between `before` and this, never negative.
    pub fn since(&self, before: &Sched) -> Sched {
        Sched {
            cpu: self.cpu.saturating_sub(before.cpu),
            waiting: self.waiting.saturating_sub(before.waiting),
            runs: self.runs.saturating_sub(before.runs),
            sleeps: self.sleeps.saturating_sub(before.sleeps),
            switched: self.switched.saturating_sub(before.switched),
        }
    }
}

/// This process's live threads so far: thread id → (name, [`Sched`]). The name is
/// `comm`, its first 15 bytes; tokio names its workers and blocking threads alike. A
/// thread that exits while it is read is left out.
pub fn threads() -> Option<std::collections::BTreeMap<u64, (String, Sched)>> {
    let mut all = std::collections::BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(task) = task else { continue };
        let path = task.path();
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let (Ok(name), Some(s)) = (
            std::fs::read_to_string(path.join("comm")),
            thread_sched(&path),
        ) else {
            continue;
        };
        all.insert(tid, (name.trim_end().to_owned(), s));
    }
    Some(all)
}

/// What each thread name's threads did between two [`threads`] readings: diffed by
/// thread id (a thread started in between counts from zero; one that exited in
/// between is missed), then summed by name.
pub fn by_name_since(
    before: &std::collections::BTreeMap<u64, (String, Sched)>,
    after: &std::collections::BTreeMap<u64, (String, Sched)>,
) -> std::collections::BTreeMap<String, Sched> {
    let mut by = std::collections::BTreeMap::<String, Sched>::new();
    for (tid, (name, a)) in after {
        let b = before.get(tid).map(|(_, b)| *b).unwrap_or_default();
        *by.entry(name.clone()).or_default() += a.since(&b);
    }
    by
}

/// Time on a CPU, runnable but waiting, and times run, in ns (`schedstat`).
fn schedstat(task: &std::path::Path) -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string(task.join("schedstat")).ok()?;
    let mut fields = stat.split_whitespace().map(|f| f.parse::<u64>().ok());
    let mut next = || fields.next().flatten();
    Some((next()?, next()?, next()?))
}

fn thread_sched(task: &std::path::Path) -> Option<Sched> {
    let (cpu, waiting, runs) = schedstat(task)?;
    let status = std::fs::read_to_string(task.join("status")).ok()?;
    Some(Sched {
        cpu: std::time::Duration::from_nanos(cpu),
        waiting: std::time::Duration::from_nanos(waiting),
        runs,
        sleeps: status_number(&status, "voluntary_ctxt_switches:")?,
        switched: status_number(&status, "nonvoluntary_ctxt_switches:")?,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_grow_with_work_and_a_thread_is_part_of_its_process() {
        // The process's clock read outside the thread's: its span holds the thread's.
        let p0 = cpu_time();
        let t0 = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        let t1 = thread_cpu_time();
        let p1 = cpu_time();
        assert!(t1 > t0, "the thread's CPU time grew with its work");
        assert!(p1 - p0 >= t1 - t0, "the process's CPU holds its thread's");
        let mine = threads().expect("this process's threads");
        let me = rustix::thread::gettid().as_raw_nonzero().get() as u64;
        let (_, s) = mine.get(&me).expect("this thread among them");
        assert!(s.cpu > std::time::Duration::ZERO && s.runs > 0);
    }
}
