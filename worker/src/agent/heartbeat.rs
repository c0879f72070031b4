//! Heartbeats, and what they bring back: the coordinator's word that this worker's generation
//! has ended (rejoin) or that the job is over (stop). Either breaks the collective at once, so
//! that a rank blocked on a frozen or partitioned neighbour does not wait out its timeout.

use super::Agent;
use crate::collective::ring::RingAbort;
use crate::train::TrainPhase;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Why this worker leaves its generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// The group is re-formed: register again (the process stays, warm).
    Rejoin,
    /// The job is over, or the coordinator is gone: exit.
    Stop(String),
}

#[derive(Default)]
struct State {
    /// (rank, generation) while this worker belongs to one; None while it registers.
    current: Option<(usize, u64)>,
    signal: Option<Signal>,
    ring: Option<RingAbort>,
    cancel_connect: Option<Arc<AtomicBool>>,
}

/// What the generation loop (`session`) and the heartbeat task share.
#[derive(Default)]
pub struct Membership {
    state: Mutex<State>,
    changed: Condvar,
    phase: AtomicU8,
    step: AtomicU64,
    /// f64 bits of this rank's latest step time.
    step_seconds: AtomicU64,
    /// Waiting for the coordinator's decision after a failure: heartbeat often, so that the
    /// "rejoin" is heard within a fraction of the interval.
    urgent: AtomicBool,
    /// Cuts the heartbeat loop's current pause short.
    wake: tokio::sync::Notify,
}

impl Membership {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters a generation: heartbeats carry its rank and number from now on.
    pub fn join(&self, rank: usize, generation: u64, cancel_connect: Arc<AtomicBool>) {
        let mut s = self.lock();
        s.current = Some((rank, generation));
        s.signal = None;
        s.ring = None;
        s.cancel_connect = Some(cancel_connect);
        self.set_phase(TrainPhase::Loading);
    }

    /// The collective of this generation, to break when it ends. If it already has, at once.
    pub fn set_ring(&self, ring: Option<RingAbort>) {
        let mut s = self.lock();
        if s.signal.is_some() {
            if let Some(r) = &ring {
                r.fire();
            }
        }
        s.ring = ring;
    }

    /// Leaves the generation (to register for the next one): no heartbeats meanwhile.
    pub fn leave(&self) {
        let mut s = self.lock();
        s.current = None;
        s.ring = None;
        s.cancel_connect = None;
    }

    pub fn signal(&self) -> Option<Signal> {
        self.lock().signal.clone()
    }

    /// Waits up to `limit` for the coordinator's word, heartbeating often meanwhile.
    pub fn wait_signal(&self, limit: Duration) -> Option<Signal> {
        self.urgent.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        let s = self.lock();
        let (s, _) = self
            .changed
            .wait_timeout_while(s, limit, |s| s.signal.is_none())
            .unwrap_or_else(|e| e.into_inner());
        self.urgent.store(false, Ordering::Relaxed);
        s.signal.clone()
    }

    /// Raises `Rejoin` if this worker is still in `generation` and has no signal yet; returns
    /// whether it did.
    fn raise_rejoin(&self, generation: u64) -> bool {
        let mut s = self.lock();
        let current = s.current.map(|(_, g)| g) == Some(generation) && s.signal.is_none();
        if current {
            self.raise_locked(&mut s, Signal::Rejoin);
        }
        current
    }

    /// Records `signal` (a stop outranks a rejoin) and breaks the collective.
    fn raise(&self, signal: Signal) {
        let mut s = self.lock();
        self.raise_locked(&mut s, signal);
    }

    fn raise_locked(&self, s: &mut State, signal: Signal) {
        if matches!(s.signal, Some(Signal::Stop(_))) || s.signal.as_ref() == Some(&signal) {
            return;
        }
        s.signal = Some(signal);
        if let Some(r) = &s.ring {
            r.fire();
        }
        if let Some(c) = &s.cancel_connect {
            c.store(true, Ordering::Relaxed);
        }
        self.changed.notify_all();
    }

    pub fn set_phase(&self, phase: TrainPhase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    pub fn set_step(&self, step: u64, seconds: f64) {
        self.step.store(step, Ordering::Relaxed);
        self.step_seconds
            .store(seconds.to_bits(), Ordering::Relaxed);
    }

    /// What a heartbeat reports besides the phase: step, step time, memory.
    pub fn progress(&self) -> Progress {
        let (memory_baseline, memory_peak) = crate::memory::usage();
        Progress {
            step: self.step.load(Ordering::Relaxed),
            step_seconds: f64::from_bits(self.step_seconds.load(Ordering::Relaxed)),
            phase: self.phase(),
            memory_baseline,
            memory_peak,
        }
    }

    fn phase(&self) -> TrainPhase {
        TrainPhase::from_u8(self.phase.load(Ordering::Relaxed))
    }
}

/// One rank's progress as a heartbeat carries it.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub step: u64,
    pub step_seconds: f64,
    pub phase: TrainPhase,
    pub memory_baseline: u64,
    pub memory_peak: u64,
}

/// The heartbeat interval while a decision is awaited.
const URGENT_INTERVAL: Duration = Duration::from_millis(100);

pub struct HeartbeatTiming {
    pub interval: Duration,
    pub give_up: Duration,
    pub exit_after: Duration,
    pub exit_code: i32,
}

/// Sends heartbeats for the life of the process. A "rejoin" answer ends this worker's
/// generation; a "stop" answer, or a coordinator unreachable for `give_up` (a worker must not
/// outlive its job), ends the process: one that has not ended `exit_after` later (blocked in a
/// call to a coordinator that vanished) exits here with `exit_code`.
pub async fn heartbeat_loop(agent: Agent, membership: Arc<Membership>, timing: HeartbeatTiming) {
    let HeartbeatTiming {
        interval,
        give_up,
        exit_after,
        exit_code,
    } = timing;
    let mut last_ok = Instant::now();
    let fast = interval.min(URGENT_INTERVAL);
    // A call over a dead link would otherwise wait for TCP to give up, minutes later.
    let call_limit = (interval * 2).max(Duration::from_secs(1));
    let mut next = tokio::time::Instant::now();
    let reason = loop {
        let pause = if membership.urgent.load(Ordering::Relaxed) {
            fast
        } else {
            interval
        };
        next = (next + pause).max(tokio::time::Instant::now());
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = membership.wake.notified() => next = tokio::time::Instant::now(),
        }
        let Some((rank, generation)) = membership.lock().current else {
            // Registering: that call itself fails when the coordinator is gone.
            last_ok = Instant::now();
            continue;
        };
        let beat = agent.heartbeat(rank, generation, membership.progress());
        let answer = match tokio::time::timeout(call_limit, beat).await {
            Ok(answer) => answer.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {call_limit:?}")),
        };
        match answer {
            Ok(None) => last_ok = Instant::now(),
            Ok(Some(Signal::Rejoin)) => {
                last_ok = Instant::now();
                // Only for the generation this beat was sent for: an answer to a beat that was
                // in flight while the worker joined the next one must not end that one.
                if membership.raise_rejoin(generation) {
                    tracing::warn!(generation, "the coordinator re-forms the group: leaving generation {generation} to rejoin");
                }
            }
            Ok(Some(Signal::Stop(reason))) => {
                break format!("the coordinator ended the job: {reason}")
            }
            Err(e) if last_ok.elapsed() > give_up => {
                break format!("no contact with the coordinator for {give_up:?}: {e}")
            }
            Err(_) => {}
        }
    };
    tracing::warn!("{reason}");
    membership.raise(Signal::Stop(reason));
    tokio::time::sleep(exit_after).await;
    tracing::error!("still running {exit_after:?} after being told to stop; exiting");
    eprintln!("error: stopped by the coordinator, or lost contact with it; exiting");
    std::process::exit(exit_code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejoin_answer_ends_only_the_generation_its_beat_was_sent_for() {
        let m = Membership::default();
        m.join(0, 1, Arc::new(AtomicBool::new(false)));
        assert!(m.raise_rejoin(1));
        assert_eq!(m.signal(), Some(Signal::Rejoin));
        assert!(!m.raise_rejoin(1), "raised once");

        let cancel = Arc::new(AtomicBool::new(false));
        m.leave();
        m.join(0, 2, cancel.clone());
        assert_eq!(m.signal(), None, "a new generation starts without a signal");
        // The answer to a beat of generation 1 that was still in flight.
        assert!(!m.raise_rejoin(1));
        assert_eq!(m.signal(), None);
        assert!(!cancel.load(Ordering::Relaxed));

        assert!(m.raise_rejoin(2));
        assert!(
            cancel.load(Ordering::Relaxed),
            "a ring still connecting gives up"
        );
        m.raise(Signal::Stop("over".into()));
        m.raise(Signal::Rejoin);
        assert_eq!(
            m.signal(),
            Some(Signal::Stop("over".into())),
            "a stop outranks"
        );
        assert_eq!(
            m.wait_signal(Duration::from_millis(1)),
            Some(Signal::Stop("over".into()))
        );
    }
}
