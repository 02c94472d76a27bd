//! Admission places shared fairly between tenants: at most `capacity` requests are admitted
//! (decoding, queued or running) at once, and each tenant at most its own limit of them. A
//! request that finds no place waits (up to the server's `queue_wait_s`); a freed place goes to
//! the waiting tenant that holds the fewest places for its weight (places held / weight: one of
//! weight 2 is given places until it holds twice as many as one of weight 1), the earliest
//! waiter first among equals. So
//! a tenant sending 64 requests at once cannot keep another tenant's single request waiting
//! behind all of them (a first-come semaphore would), and with a per-tenant limit it cannot hold
//! every place either.
//!
//! Owns places, waiters and the order of grants. It must not know HTTP, the ledger or the
//! engine: tenants are ids, limits and weights are numbers handed in by the caller at each
//! request (so a changed one applies to the next request).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

/// The admission places of one server.
#[derive(Clone)]
pub struct FairGate {
    inner: Arc<Inner>,
}

struct Inner {
    capacity: usize,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    held: usize,
    tenants: HashMap<i64, TenantPlaces>,
    next_seq: u64,
}

#[derive(Default)]
struct TenantPlaces {
    held: usize,
    /// The share given with the tenant's latest request.
    share: Share,
    waiting: VecDeque<Waiter>,
}

impl TenantPlaces {
    fn under_limit(&self) -> bool {
        self.share.limit.is_none_or(|l| self.held < l)
    }

    /// Places held for the tenant's weight: the lowest is served first.
    fn load(&self) -> f64 {
        self.held as f64 / self.share.weight
    }
}

/// What a tenant may have of the places: at most `limit` (None: no limit of its own), and,
/// while others wait too, places in proportion to `weight` (> 0; 1 for every tenant: equal
/// shares).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share {
    pub limit: Option<usize>,
    pub weight: f64,
}

impl Default for Share {
    fn default() -> Self {
        Self {
            limit: None,
            weight: 1.0,
        }
    }
}

impl From<Option<usize>> for Share {
    /// A limit at weight 1.
    fn from(limit: Option<usize>) -> Self {
        Self { limit, weight: 1.0 }
    }
}

struct Waiter {
    seq: u64,
    tx: oneshot::Sender<Place>,
}

/// Why no place was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every place is held.
    Full,
    /// The tenant holds as many places as its limit.
    TenantLimit { limit: usize },
}

/// One admitted request's place, given back when dropped.
pub struct Place {
    inner: Option<Arc<Inner>>,
    tenant: i64,
}

impl std::fmt::Debug for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Place(tenant {})", self.tenant)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            let mut st = inner.lock();
            st.held -= 1;
            if let Some(t) = st.tenants.get_mut(&self.tenant) {
                t.held -= 1;
            }
            inner.grant(&mut st);
            st.forget_idle(self.tenant);
        }
    }
}

impl GateState {
    /// A tenant that holds and awaits nothing is not kept.
    fn forget_idle(&mut self, tenant: i64) {
        if self
            .tenants
            .get(&tenant)
            .is_some_and(|t| t.held == 0 && t.waiting.is_empty())
        {
            self.tenants.remove(&tenant);
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands free places to waiters: each to the waiting tenant (under its limit) that holds
    /// the fewest for its weight, its earliest waiter; a waiter that has gone (its request was
    /// dropped) is skipped.
    fn grant(self: &Arc<Self>, st: &mut GateState) {
        while st.held < self.capacity {
            let next = st
                .tenants
                .iter()
                .filter(|(_, t)| t.under_limit())
                .filter_map(|(&id, t)| t.waiting.front().map(|w| (t.load(), w.seq, id)))
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let Some((_, _, id)) = next else { return };
            let t = st.tenants.get_mut(&id).expect("chosen above");
            let w = t.waiting.pop_front().expect("chosen above");
            t.held += 1;
            st.held += 1;
            let place = Place {
                inner: Some(self.clone()),
                tenant: id,
            };
            if let Err(mut place) = w.tx.send(place) {
                // Nobody waits for it any more: not given (and not released through Drop,
                // which would take the lock held here).
                place.inner = None;
                st.held -= 1;
                if let Some(t) = st.tenants.get_mut(&id) {
                    t.held -= 1;
                }
            }
        }
    }

    /// A place now if one is free for the tenant, else why not.
    fn take_now(
        self: &Arc<Self>,
        st: &mut GateState,
        tenant: i64,
        share: Share,
    ) -> Result<Place, Refused> {
        let t = st.tenants.entry(tenant).or_default();
        t.share = share;
        let result = if !t.under_limit() {
            Err(Refused::TenantLimit {
                limit: share.limit.unwrap_or(0),
            })
        } else if st.held >= self.capacity {
            Err(Refused::Full)
        } else {
            t.held += 1;
            st.held += 1;
            Ok(Place {
                inner: Some(self.clone()),
                tenant,
            })
        };
        // A raised limit may let this tenant's waiters in.
        self.grant(st);
        if result.is_err() {
            st.forget_idle(tenant);
        }
        result
    }

    /// Why a tenant would not be given a place now.
    fn refusal(&self, st: &GateState, tenant: i64) -> Refused {
        match st.tenants.get(&tenant) {
            Some(t) if !t.under_limit() => Refused::TenantLimit {
                limit: t.share.limit.unwrap_or(0),
            },
            _ => Refused::Full,
        }
    }
}

/// Takes a waiter out of its tenant's queue when the wait ends, however it ends (a timeout,
/// or the request's future dropped).
struct Queued {
    inner: Arc<Inner>,
    tenant: i64,
    seq: u64,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if let Some(t) = st.tenants.get_mut(&self.tenant) {
            t.waiting.retain(|w| w.seq != self.seq);
        }
        st.forget_idle(self.tenant);
    }
}

impl FairGate {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                capacity,
                state: Mutex::new(GateState::default()),
            }),
        }
    }

    /// Places in all.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Places not held.
    pub fn available(&self) -> usize {
        self.inner.capacity - self.inner.lock().held
    }

    /// Places the tenant holds.
    pub fn held_by(&self, tenant: i64) -> usize {
        self.inner.lock().tenants.get(&tenant).map_or(0, |t| t.held)
    }

    /// Requests waiting for a place.
    pub fn waiting(&self) -> usize {
        let st = self.inner.lock();
        st.tenants.values().map(|t| t.waiting.len()).sum()
    }

    /// A place now, or why not (no waiting).
    pub fn try_acquire(&self, tenant: i64, share: impl Into<Share>) -> Result<Place, Refused> {
        let mut st = self.inner.lock();
        self.inner.take_now(&mut st, tenant, share.into())
    }

    /// A place, waiting up to `wait` for one (freed places go to the tenant holding the
    /// fewest for its weight). `share`: the tenant's limit and weight (a bare limit: weight 1).
    pub async fn acquire(
        &self,
        tenant: i64,
        share: impl Into<Share>,
        wait: Duration,
    ) -> Result<Place, Refused> {
        let share = share.into();
        let (mut rx, queued) = {
            let mut st = self.inner.lock();
            match self.inner.take_now(&mut st, tenant, share) {
                Ok(p) => return Ok(p),
                Err(e) if wait.is_zero() => return Err(e),
                Err(_) => {}
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            let (tx, rx) = oneshot::channel();
            let t = st.tenants.entry(tenant).or_default();
            t.share = share;
            t.waiting.push_back(Waiter { seq, tx });
            let queued = Queued {
                inner: self.inner.clone(),
                tenant,
                seq,
            };
            (rx, queued)
        };
        match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok(place)) => Ok(place),
            _ => {
                let mut st = self.inner.lock();
                // Given just as the wait ended: taken.
                if let Ok(place) = rx.try_recv() {
                    return Ok(place);
                }
                // Out of the queue before the lock is let go, so nothing is given to it now.
                if let Some(t) = st.tenants.get_mut(&tenant) {
                    t.waiting.retain(|w| w.seq != queued.seq);
                }
                Err(self.inner.refusal(&st, tenant))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_WAIT: Duration = Duration::ZERO;
    const LONG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn places_up_to_the_capacity_then_full() {
        let g = FairGate::new(2);
        let a = g.try_acquire(1, None).unwrap();
        let _b = g.try_acquire(2, None).unwrap();
        assert_eq!(g.try_acquire(3, None).unwrap_err(), Refused::Full);
        assert_eq!(g.available(), 0);
        drop(a);
        assert_eq!(g.available(), 1);
        assert_eq!(g.held_by(1), 0);
        g.try_acquire(3, None).unwrap();
    }

    #[tokio::test]
    async fn a_tenant_limit_refuses_that_tenant_only() {
        let g = FairGate::new(4);
        let _a = g.try_acquire(1, Some(1)).unwrap();
        assert_eq!(
            g.try_acquire(1, Some(1)).unwrap_err(),
            Refused::TenantLimit { limit: 1 }
        );
        let _b = g.try_acquire(2, Some(1)).unwrap();
        // A raised limit applies to the next request.
        let _a2 = g.try_acquire(1, Some(2)).unwrap();
        assert_eq!(g.held_by(1), 2);
    }

    #[tokio::test]
    async fn a_freed_place_goes_to_the_tenant_holding_fewest() {
        let g = FairGate::new(2);
        let a1 = g.try_acquire(1, None).unwrap();
        let a2 = g.try_acquire(1, None).unwrap();
        // Tenant 1 queues two more, then tenant 2 one: FIFO would serve tenant 1 twice first.
        let mut waits = vec![];
        for tenant in [1, 1, 2] {
            let g2 = g.clone();
            waits.push(tokio::spawn(
                async move { g2.acquire(tenant, None, LONG).await },
            ));
            while g.waiting() < waits.len() {
                tokio::task::yield_now().await;
            }
        }
        drop(a1);
        let b = tokio::time::timeout(LONG, waits.pop().unwrap())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((g.held_by(1), g.held_by(2)), (1, 1));
        // Then tenant 1's earliest waiter.
        drop(a2);
        let second = waits.remove(0);
        let a3 = tokio::time::timeout(LONG, second)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((g.held_by(1), g.held_by(2), g.waiting()), (1, 1, 1));
        drop((a3, b));
        waits.remove(0).await.unwrap().unwrap();
        assert_eq!(g.waiting(), 0);
    }

    /// Tenant 1 of weight 3 and tenant 2 of weight 1 both waiting: of four places freed one at
    /// a time, tenant 1 is given three and tenant 2 one.
    #[tokio::test]
    async fn freed_places_follow_the_weights() {
        let g = FairGate::new(4);
        let mut held: Vec<_> = (0..4).map(|_| g.try_acquire(9, None).unwrap()).collect();
        let heavy = Share {
            limit: None,
            weight: 3.0,
        };
        let mut waits = vec![];
        let arrivals = [(1, heavy); 4]
            .into_iter()
            .chain([(2, Share::default()); 4]);
        for (tenant, share) in arrivals {
            let g2 = g.clone();
            waits.push(tokio::spawn(async move {
                g2.acquire(tenant, share, LONG).await
            }));
            while g.waiting() < waits.len() {
                tokio::task::yield_now().await;
            }
        }
        for _ in 0..4 {
            held.pop();
        }
        // 3 / 3 = 1 / 1: each holds its share.
        assert_eq!((g.held_by(1), g.held_by(2), g.held_by(9)), (3, 1, 0));
        assert_eq!(g.waiting(), 4);
        for w in waits {
            w.abort();
        }
    }

    #[tokio::test]
    async fn a_wait_that_times_out_leaves_nothing_behind() {
        let g = FairGate::new(1);
        let a = g.try_acquire(1, None).unwrap();
        let r = g.acquire(2, None, Duration::from_millis(20)).await;
        assert_eq!(r.unwrap_err(), Refused::Full);
        assert_eq!(g.waiting(), 0);
        // A limited tenant's wait names the limit.
        let r = g.acquire(1, Some(1), Duration::from_millis(20)).await;
        assert_eq!(r.unwrap_err(), Refused::TenantLimit { limit: 1 });
        assert_eq!(g.acquire(1, Some(1), NO_WAIT).await.unwrap_err(), {
            Refused::TenantLimit { limit: 1 }
        });
        drop(a);
        assert_eq!((g.available(), g.waiting()), (1, 0));
    }

    #[tokio::test]
    async fn a_dropped_waiter_is_skipped() {
        let g = FairGate::new(1);
        let a = g.try_acquire(1, None).unwrap();
        let gone = {
            let g = g.clone();
            tokio::spawn(async move { g.acquire(2, None, LONG).await })
        };
        while g.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        let next = {
            let g = g.clone();
            tokio::spawn(async move { g.acquire(3, None, LONG).await })
        };
        while g.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        drop(a);
        let p = next.await.unwrap().unwrap();
        assert_eq!((g.held_by(2), g.held_by(3), g.available()), (0, 1, 0));
        drop(p);
        assert_eq!(g.available(), 1);
    }

    #[tokio::test]
    async fn a_tenant_at_its_limit_does_not_block_others_waiting() {
        let g = FairGate::new(2);
        let a = g.try_acquire(1, Some(1)).unwrap();
        let b = g.try_acquire(2, None).unwrap();
        // Tenant 1 waits (at its limit), tenant 3 waits (no place).
        let w1 = {
            let g = g.clone();
            tokio::spawn(async move { g.acquire(1, Some(1), LONG).await })
        };
        while g.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        let w3 = {
            let g = g.clone();
            tokio::spawn(async move { g.acquire(3, None, LONG).await })
        };
        while g.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        // Tenant 2's place goes to tenant 3 (tenant 1 is at its limit, though it came first).
        drop(b);
        let p3 = w3.await.unwrap().unwrap();
        assert_eq!((g.held_by(1), g.held_by(3)), (1, 1));
        drop(p3);
        // A free place tenant 1 may not take stays free.
        assert_eq!(g.available(), 1);
        drop(a);
        w1.await.unwrap().unwrap();
    }

    /// Many tenants with random limits take and give back places from many tasks: the capacity
    /// and each tenant's limit hold at every moment (counted by the test, not the gate), every
    /// request ends, and every place comes back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_traffic_keeps_capacity_and_limits() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        const CAPACITY: usize = 5;
        let g = FairGate::new(CAPACITY);
        let total = Arc::new(AtomicUsize::new(0));
        let per: Arc<Vec<AtomicUsize>> = Arc::new((0..4).map(|_| AtomicUsize::new(0)).collect());
        let limits = [Some(1), Some(2), None, Some(3)];
        let mut tasks = vec![];
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for i in 0..200u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let tenant = (x % 4) as usize;
            let hold_us = x % 700;
            let wait_ms = 1 + (x >> 20) % 50;
            let (g, total, per) = (g.clone(), total.clone(), per.clone());
            tasks.push(tokio::spawn(async move {
                let limit = limits[tenant];
                match g
                    .acquire(tenant as i64, limit, Duration::from_millis(wait_ms))
                    .await
                {
                    Ok(place) => {
                        let now_total = total.fetch_add(1, SeqCst) + 1;
                        let now_tenant = per[tenant].fetch_add(1, SeqCst) + 1;
                        assert!(now_total <= CAPACITY, "request {i}: {now_total} places");
                        assert!(
                            limit.is_none_or(|l| now_tenant <= l),
                            "tenant {tenant}: {now_tenant} places, limit {limit:?}"
                        );
                        tokio::time::sleep(Duration::from_micros(hold_us)).await;
                        per[tenant].fetch_sub(1, SeqCst);
                        total.fetch_sub(1, SeqCst);
                        drop(place);
                        true
                    }
                    Err(_) => false,
                }
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += t.await.unwrap() as usize;
        }
        assert!(admitted > 0);
        assert_eq!((g.available(), g.waiting()), (CAPACITY, 0));
        assert!(g.inner.lock().tenants.is_empty());
    }
}
