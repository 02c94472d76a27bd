//! The queue between admission and the workers, ordered fairly between tenants: a worker with
//! room takes the oldest job of the tenant with the fewest jobs started and not finished
//! (running in a batch, or held by a worker until it fits), and among those the fewest jobs in
//! all (started and queued), both counted for the tenant's weight (divided by it: a tenant of
//! weight 2 may have twice as many started before another of weight 1 goes first). So a tenant's burst queued ahead does not keep another tenant's
//! request waiting behind all of it (with one-at-a-time service too, where nobody has a job
//! started when the next is chosen), and a tenant with nothing running is never passed over
//! for one with something running; within a tenant, first come first served. Background jobs
//! (batch lines) wait while any tenant has an interactive job queued, and among themselves are
//! ordered the same way. The fair gate (`fair_gate`) bounds how many jobs there can be, so the
//! queue itself is unbounded.
//!
//! Owns the order in which queued jobs start. It must not know what a job is: tenants are ids,
//! jobs are values.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A queue of jobs of type `T`, shared by the server (which pushes) and its workers (which take).
pub struct JobQueue<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for JobQueue<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<T> {
    state: Mutex<QueueState<T>>,
    ready: Condvar,
}

struct QueueState<T> {
    tenants: HashMap<i64, TenantJobs<T>>,
    next_seq: u64,
    closed: bool,
}

struct TenantJobs<T> {
    /// Jobs taken by a worker and not finished.
    started: usize,
    queued: VecDeque<(u64, T)>,
    /// Background jobs (batch lines): taken only while no tenant has a job in `queued`.
    background: VecDeque<(u64, T)>,
    /// The weight given with the tenant's latest job.
    weight: f64,
}

impl<T> QueueState<T> {
    fn forget_idle(&mut self, tenant: i64) {
        if self
            .tenants
            .get(&tenant)
            .is_some_and(|t| t.started == 0 && t.queued.is_empty() && t.background.is_empty())
        {
            self.tenants.remove(&tenant);
        }
    }
}

/// A job's start, counted against its tenant until dropped (when the job finishes).
pub struct Started {
    finish: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            f();
        }
    }
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Started")
    }
}

impl<T: Send + 'static> Default for JobQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Send + 'static> JobQueue<T> {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(QueueState {
                    tenants: HashMap::new(),
                    next_seq: 0,
                    closed: false,
                }),
                ready: Condvar::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState<T>> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a tenant's job at weight 1; false (the job dropped) once the queue is closed.
    pub fn push(&self, tenant: i64, job: T) -> bool {
        self.push_weighted(tenant, 1.0, job)
    }

    /// Queues a job of a tenant of the given weight (> 0); false once the queue is closed.
    pub fn push_weighted(&self, tenant: i64, weight: f64, job: T) -> bool {
        self.push_as(tenant, weight, false, job)
    }

    /// Queues a job; a `background` one (a batch line) is taken only while no interactive job
    /// of any tenant is queued. False once the queue is closed.
    pub fn push_as(&self, tenant: i64, weight: f64, background: bool, job: T) -> bool {
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let t = st.tenants.entry(tenant).or_insert_with(|| TenantJobs {
            started: 0,
            queued: VecDeque::new(),
            background: VecDeque::new(),
            weight,
        });
        t.weight = weight;
        if background {
            t.background.push_back((seq, job));
        } else {
            t.queued.push_back((seq, job));
        }
        drop(st);
        self.inner.ready.notify_one();
        true
    }

    /// Puts a job taken from the queue back at the head of its tenant's jobs of its class (a
    /// worker that could not fit it yet; its start ticket is dropped by the caller): it is the
    /// oldest of them again. Once the queue is closed the job is handed back.
    pub fn put_back(&self, tenant: i64, weight: f64, background: bool, job: T) -> Result<(), T> {
        let mut st = self.lock();
        if st.closed {
            return Err(job);
        }
        let t = st.tenants.entry(tenant).or_insert_with(|| TenantJobs {
            started: 0,
            queued: VecDeque::new(),
            background: VecDeque::new(),
            weight,
        });
        let jobs = if background {
            &mut t.background
        } else {
            &mut t.queued
        };
        let seq = jobs.front().map_or(0, |&(s, _)| s.saturating_sub(1));
        jobs.push_front((seq, job));
        drop(st);
        self.inner.ready.notify_one();
        Ok(())
    }

    /// The next job (the oldest of the tenant with the fewest started, then the fewest in all;
    /// background jobs only when no interactive one is queued), with its start ticket;
    /// None when none is queued (`wait`: blocks for one until the queue is closed).
    pub fn take(&self, wait: bool) -> Option<(T, Started)> {
        self.take_of(wait, true)
    }

    /// [`Self::take`] of interactive jobs only (never waits): background jobs stay queued.
    pub fn take_interactive(&self) -> Option<(T, Started)> {
        self.take_of(false, false)
    }

    fn take_of(&self, wait: bool, background_too: bool) -> Option<(T, Started)> {
        let mut st = self.lock();
        loop {
            let pick = |background: bool| {
                st.tenants
                    .iter()
                    .filter_map(|(&id, t)| {
                        // A tenant's batch lines queued do not count against its
                        // interactive jobs (nor the other way round).
                        let jobs = if background { &t.background } else { &t.queued };
                        let started = t.started as f64 / t.weight;
                        let outstanding = (t.started + jobs.len()) as f64 / t.weight;
                        jobs.front()
                            .map(|&(seq, _)| (started, outstanding, seq, id, background))
                    })
                    .min_by(|a, b| {
                        (a.0.total_cmp(&b.0))
                            .then(a.1.total_cmp(&b.1))
                            .then(a.2.cmp(&b.2))
                    })
            };
            let next = pick(false).or_else(|| background_too.then(|| pick(true)).flatten());
            if let Some((_, _, _, tenant, background)) = next {
                let t = st.tenants.get_mut(&tenant).expect("chosen above");
                let jobs = if background {
                    &mut t.background
                } else {
                    &mut t.queued
                };
                let (_, job) = jobs.pop_front().expect("chosen above");
                t.started += 1;
                let inner = self.inner.clone();
                let finish = move || {
                    let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(t) = st.tenants.get_mut(&tenant) {
                        t.started -= 1;
                    }
                    st.forget_idle(tenant);
                };
                return Some((
                    job,
                    Started {
                        finish: Some(Box::new(finish)),
                    },
                ));
            }
            if !wait || st.closed {
                return None;
            }
            st = self.inner.ready.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// No more jobs are queued; waiting workers wake (and find none once the queue is empty).
    pub fn close(&self) {
        self.lock().closed = true;
        self.inner.ready.notify_all();
    }

    /// Jobs queued (not taken).
    pub fn len(&self) -> usize {
        self.lock()
            .tenants
            .values()
            .map(|t| t.queued.len() + t.background.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Jobs of the tenant taken and not finished.
    pub fn started(&self, tenant: i64) -> usize {
        self.lock().tenants.get(&tenant).map_or(0, |t| t.started)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(q: &JobQueue<&'static str>, keep: &mut Vec<Started>) -> Vec<&'static str> {
        let mut out = vec![];
        while let Some((job, started)) = q.take(false) {
            out.push(job);
            keep.push(started);
        }
        out
    }

    #[test]
    fn background_jobs_wait_for_every_interactive_one() {
        let q = JobQueue::new();
        q.push_as(1, 1.0, true, "a-line1");
        q.push_as(1, 1.0, true, "a-line2");
        q.push_as(2, 1.0, true, "b-line1");
        q.push(2, "b1");
        q.push(3, "c1");
        let mut running = vec![];
        // Interactive jobs first, of any tenant, even a tenant whose batch was queued before
        // (b's batch line does not count against b1: b1 was queued before c1); then the
        // background ones, fairly between tenants: a has none started (a-line1), then a and b
        // have one started and one queued each, and a-line2 was queued first.
        assert_eq!(
            order(&q, &mut running),
            ["b1", "c1", "a-line1", "a-line2", "b-line1"]
        );
        assert_eq!((q.started(1), q.started(2), q.started(3)), (2, 2, 1));
        running.clear();
        assert_eq!(q.len(), 0);
        // An interactive job queued behind background ones is taken first.
        q.push_as(1, 1.0, true, "a-line3");
        q.push(1, "a1");
        assert_eq!(order(&q, &mut running), ["a1", "a-line3"]);
    }

    /// A worker that cannot fit a background job yet puts it back: it is taken again before
    /// its tenant's later lines (and after any interactive job); meanwhile a worker may take
    /// interactive jobs alone.
    #[test]
    fn a_job_put_back_is_its_tenants_oldest_again() {
        let q = JobQueue::new();
        q.push_as(1, 1.0, true, "a-line1");
        q.push_as(1, 1.0, true, "a-line2");
        let (job, started) = q.take(false).unwrap();
        assert_eq!(job, "a-line1");
        assert_eq!(q.started(1), 1);
        drop(started);
        assert!(q.put_back(1, 1.0, true, job).is_ok());
        assert_eq!(q.started(1), 0);
        assert!(q.take_interactive().is_none());
        q.push(2, "b1");
        assert_eq!(q.take_interactive().map(|(j, _)| j), Some("b1"));
        let mut running = vec![];
        assert_eq!(order(&q, &mut running), ["a-line1", "a-line2"]);
        q.close();
        assert_eq!(q.put_back(1, 1.0, true, "late"), Err("late"));
    }

    #[test]
    fn a_later_tenant_is_taken_before_an_earlier_tenants_backlog() {
        let q = JobQueue::new();
        for job in ["a1", "a2", "a3", "a4"] {
            assert!(q.push(1, job));
        }
        q.push(2, "b1");
        q.push(2, "b2");
        q.push(3, "c1");
        let mut running = vec![];
        // Nobody has a job started: c1 (1 in all), b1 (2), a1 (4); then by jobs started (b2
        // and a2 at one each: tenant 2 has fewer in all), then the rest of tenant 1's.
        assert_eq!(
            order(&q, &mut running),
            ["c1", "b1", "a1", "b2", "a2", "a3", "a4"]
        );
        assert_eq!((q.started(1), q.started(2), q.len()), (4, 2, 0));
        running.clear();
        assert_eq!((q.started(1), q.started(2)), (0, 0));
    }

    #[test]
    fn jobs_running_count_against_their_tenant() {
        let q = JobQueue::new();
        q.push(1, "a1");
        let (_, a1) = q.take(false).unwrap();
        // Tenant 1 has a job running: tenant 2's later job goes first.
        q.push(1, "a2");
        q.push(2, "b1");
        let (first, _b1) = q.take(false).unwrap();
        assert_eq!(first, "b1");
        // Both have one running now: the oldest queued job.
        q.push(2, "b2");
        let (second, _a2) = q.take(false).unwrap();
        assert_eq!(second, "a2");
        drop(a1);
        assert_eq!(q.started(1), 1);
        assert_eq!(q.take(false).unwrap().0, "b2");
        assert!(q.take(false).is_none());
    }

    /// One job at a time (a batch of one): when a job ends nobody has one started, and the
    /// tenant with fewer jobs in all goes first.
    #[test]
    fn one_at_a_time_the_tenant_with_fewer_jobs_goes_first() {
        let q = JobQueue::new();
        for job in ["a1", "a2", "a3"] {
            q.push(1, job);
        }
        let (job, running) = q.take(false).unwrap();
        assert_eq!(job, "a1");
        q.push(2, "b1");
        drop(running);
        let mut served = vec![];
        while let Some((job, running)) = q.take(false) {
            served.push(job);
            drop(running);
        }
        assert_eq!(served, ["b1", "a2", "a3"]);
    }

    /// A tenant with nothing running is not passed over for one with more queued but a job
    /// running (no starvation by the count of jobs in all).
    #[test]
    fn nothing_running_goes_before_fewer_in_all() {
        let q = JobQueue::new();
        q.push(2, "b1");
        let (_, _b1) = q.take(false).unwrap();
        for job in ["a1", "a2", "a3"] {
            q.push(1, job);
        }
        q.push(2, "b2");
        assert_eq!(q.take(false).unwrap().0, "a1");
    }

    /// Tenant 1 of weight 2 and tenant 2 of weight 1, both with a backlog: while all run,
    /// tenant 1 has two jobs started for each of tenant 2's.
    #[test]
    fn started_jobs_follow_the_weights() {
        let q = JobQueue::new();
        for job in ["a1", "a2", "a3", "a4"] {
            q.push_weighted(1, 2.0, job);
        }
        for job in ["b1", "b2", "b3", "b4"] {
            q.push_weighted(2, 1.0, job);
        }
        let mut running = vec![];
        // a1 (fewer in all for its weight: 4 / 2 against 4), b1 (none started), a2 (0.5
        // started against 1), a3 (1 against 1; 2 in all against 4), b2, a4: four to two.
        assert_eq!(
            order(&q, &mut running)[..6],
            ["a1", "b1", "a2", "a3", "b2", "a4"]
        );
    }

    #[test]
    fn a_waiting_worker_wakes_for_a_job_and_at_close() {
        let q: JobQueue<u32> = JobQueue::new();
        let worker = {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut got = vec![];
                while let Some((job, _started)) = q.take(true) {
                    got.push(job);
                }
                got
            })
        };
        q.push(7, 1);
        q.push(7, 2);
        std::thread::sleep(std::time::Duration::from_millis(20));
        q.close();
        assert!(!q.push(7, 3), "closed");
        assert_eq!(worker.join().unwrap(), [1, 2]);
        // Nothing is kept for tenants with nothing queued or running.
        assert!(q.lock().tenants.is_empty());
    }
}
