//! The ring's data path: a persistent sender thread and a pipelined reduce-scatter + all-gather.
//!
//! Every chunk of the ring algorithm is cut into segments of [`SEGMENT_BYTES`]. The receiving
//! (calling) thread reads a segment from the previous rank, adds it in (or, in the all-gather,
//! reads it straight into place) and at once queues that same segment for the sender thread,
//! which forwards it to the next rank while the next segment is still arriving. Sends, receives
//! and additions of consecutive segments overlap, so a 64 MiB reduction costs little more than
//! moving its bytes through the socket once, and nothing is copied beyond the socket itself.
//!
//! The sender thread lives as long as the ring (no thread per exchange) and writes from the
//! caller's memory: see [`SendSegment`] for why that is sound.

use super::CollectiveError;
use bytemuck::Pod;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes per pipelined segment: small enough that the first hop's latency is a fraction of a
/// large reduction, large enough that the per-segment overhead (a channel message, a syscall or
/// two) stays below a few per cent. Measured on loopback: 128 KiB–1 MiB are within noise.
pub const SEGMENT_BYTES: usize = 256 * 1024;

/// Numbers the ring can sum.
pub trait Element: Pod + std::ops::AddAssign + std::ops::DivAssign {
    fn from_count(n: usize) -> Self;
}
impl Element for f32 {
    fn from_count(n: usize) -> Self {
        n as f32
    }
}
impl Element for f64 {
    fn from_count(n: usize) -> Self {
        n as f64
    }
}

/// A region of the caller's buffer for the sender thread to write to the next rank.
struct SendSegment {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a SendSegment is only created by `reduce` for memory that stays alive and unwritten
// until the sender has finished with it: `reduce` never returns (not even on error) before the
// sender has answered a fence queued after every segment of the call, and the ring schedule
// only writes a segment again after the data sent from it has gone all the way round the ring
// (its next receive of that segment is the forwarded copy of this very send), which the
// neighbour can only have read after our write of it has completed.
unsafe impl Send for SendSegment {}

enum Job {
    Send(SendSegment),
    /// Answer with the first send error since the last fence, if any.
    Fence,
}

/// A send that failed, kept by the sender thread until the next fence.
struct SendFailure {
    kind: ErrorKind,
    message: String,
}

/// The persistent sender: writes queued segments to the next rank, in order.
pub struct Sender {
    jobs: Option<mpsc::Sender<Job>>,
    fenced: mpsc::Receiver<Option<SendFailure>>,
    /// A handle on the same socket, to unblock a stuck write when the receive side failed.
    stream: TcpStream,
    /// Set by the sender thread when a write fails, before any fence reports it.
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Bytes queued for sending since the ring started (what ZeRO's traffic figures count).
    queued_bytes: AtomicU64,
}

impl Sender {
    pub fn start(next: TcpStream) -> std::io::Result<Sender> {
        let stream = next.try_clone()?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (answer, fenced) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let flag = failed.clone();
        let thread = std::thread::Builder::new()
            .name("ring-sender".into())
            .spawn(move || send_loop(next, queue, answer, flag))?;
        Ok(Sender {
            jobs: Some(jobs),
            fenced,
            stream,
            failed,
            thread: Some(thread),
            queued_bytes: AtomicU64::new(0),
        })
    }

    pub fn bytes_sent(&self) -> u64 {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    fn queue(&self, job: Job) -> bool {
        if let Job::Send(segment) = &job {
            self.queued_bytes
                .fetch_add(segment.len as u64, Ordering::Relaxed);
        }
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }

    /// Waits until every queued segment has been written; the first failure if one did not.
    fn fence(&self) -> Result<(), SendFailure> {
        let gone = || SendFailure {
            kind: ErrorKind::BrokenPipe,
            message: "the ring's sender thread has ended".into(),
        };
        if !self.queue(Job::Fence) {
            return Err(gone());
        }
        match self.fenced.recv() {
            Ok(None) => Ok(()),
            Ok(Some(failure)) => Err(failure),
            Err(_) => Err(gone()),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn send_loop(
    mut next: TcpStream,
    queue: mpsc::Receiver<Job>,
    answer: mpsc::Sender<Option<SendFailure>>,
    failed: Arc<AtomicBool>,
) {
    let mut failure: Option<SendFailure> = None;
    for job in queue {
        match job {
            Job::Send(segment) => {
                if failure.is_some() {
                    continue;
                }
                // SAFETY: see `SendSegment`: the memory is alive and not written until the
                // fence that follows this job has been answered.
                let bytes = unsafe { std::slice::from_raw_parts(segment.ptr, segment.len) };
                if let Err(e) = next.write_all(bytes) {
                    failed.store(true, Ordering::Release);
                    failure = Some(SendFailure {
                        kind: e.kind(),
                        message: e.to_string(),
                    });
                }
            }
            Job::Fence => {
                if answer.send(failure.take()).is_err() {
                    return;
                }
            }
        }
    }
}

/// Who the ring's neighbours are, for errors.
#[derive(Debug, Clone, Copy)]
pub struct Neighbours {
    pub rank: usize,
    pub world_size: usize,
    pub timeout: Duration,
}

impl Neighbours {
    fn next(&self) -> usize {
        (self.rank + 1) % self.world_size
    }
    fn prev(&self) -> usize {
        (self.rank + self.world_size - 1) % self.world_size
    }
}

/// Which part of the ring schedule a call runs. An all-reduce is both halves in the ring's own
/// chunk order; the halves alone label chunks so that rank r owns chunk r (as NCCL does): after
/// a reduce-scatter rank r holds the sum of chunk r, and an all-gather starts from rank r
/// holding chunk r.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phases {
    AllReduce,
    ReduceScatter,
    AllGather,
}

impl Phases {
    /// The schedule's steps (of the all-reduce's 2(W-1)) this call runs.
    fn steps(self, w: usize) -> std::ops::Range<usize> {
        match self {
            Phases::AllReduce => 0..2 * (w - 1),
            Phases::ReduceScatter => 0..w - 1,
            Phases::AllGather => w - 1..2 * (w - 1),
        }
    }

    /// The chunk of the buffer that the schedule's chunk `c` is: after the reduce-scatter the
    /// ring schedule leaves rank r owning its chunk r+1, so the halves shift labels by one.
    fn chunk(self, c: usize, w: usize) -> usize {
        match self {
            Phases::AllReduce => c,
            Phases::ReduceScatter | Phases::AllGather => (c + w - 1) % w,
        }
    }
}

pub fn classify(
    kind: ErrorKind,
    source: std::io::Error,
    peer: usize,
    timeout: Duration,
    during: &'static str,
) -> CollectiveError {
    match kind {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout {
            peer,
            timeout,
            during,
        },
        _ => CollectiveError::PeerLost {
            peer,
            during,
            source,
        },
    }
}

/// Sums `buf` over all ranks in place (every rank passes a buffer of the same length) and
/// leaves the same bits on every rank: each element is summed on one rank, in one order, and
/// copied everywhere else. `scratch` is the reusable receive area (at least one segment).
/// `phases` runs only half of it: see [`Phases`] (chunk c is `c*n/W..(c+1)*n/W`).
pub fn reduce<T: Element>(
    buf: &mut [T],
    prev: &mut TcpStream,
    sender: &Sender,
    scratch: &mut Vec<u64>,
    who: Neighbours,
    phases: Phases,
) -> Result<(), CollectiveError> {
    let w = who.world_size;
    if w < 2 || buf.is_empty() {
        return Ok(());
    }
    let seg_elems = (SEGMENT_BYTES / std::mem::size_of::<T>()).max(1);
    let scratch_words = (seg_elems * std::mem::size_of::<T>()).div_ceil(8);
    if scratch.len() < scratch_words {
        scratch.resize(scratch_words, 0);
    }
    let received = run_schedule(buf, prev, sender, scratch, who, seg_elems, phases);
    finish(received, sender, who)
}

/// Every rank's `buf` becomes `root`'s: the segments travel once round the ring from the root,
/// each forwarded as soon as it has arrived.
pub fn broadcast<T: Element>(
    buf: &mut [T],
    prev: &mut TcpStream,
    sender: &Sender,
    who: Neighbours,
    root: usize,
) -> Result<(), CollectiveError> {
    if who.world_size < 2 || buf.is_empty() {
        return Ok(());
    }
    let seg_elems = (SEGMENT_BYTES / std::mem::size_of::<T>()).max(1);
    let size = std::mem::size_of::<T>();
    let n = buf.len();
    let base = buf.as_mut_ptr();
    let mut received = Ok(());
    for x in (0..n).step_by(seg_elems) {
        let y = (x + seg_elems).min(n);
        if who.rank != root {
            // SAFETY: x..y lies inside `buf`, and the sender never reads a segment before it is
            // queued below, after this write.
            let dst = unsafe { std::slice::from_raw_parts_mut(base.add(x), y - x) };
            if let Err(e) = read(prev, bytemuck::cast_slice_mut(dst), who) {
                received = Err(e);
                break;
            }
        }
        if who.next() != root {
            let segment = SendSegment {
                // SAFETY: x..y lies inside `buf`; nothing writes it again in this call.
                ptr: unsafe { base.add(x) } as *const u8,
                len: (y - x) * size,
            };
            if !sender.queue(Job::Send(segment)) {
                received = Err(CollectiveError::PeerLost {
                    peer: who.next(),
                    during: "broadcast send",
                    source: std::io::Error::new(ErrorKind::BrokenPipe, "sender thread ended"),
                });
                break;
            }
        }
    }
    finish(received, sender, who)
}

/// Ends a call: waits until the sender is done with the caller's memory, and names the rank
/// whose failure came first.
fn finish(
    received: Result<(), CollectiveError>,
    sender: &Sender,
    who: Neighbours,
) -> Result<(), CollectiveError> {
    // A receive that fails is often only the echo of a send that failed first (the next rank
    // is gone, so the ring stalled): then the send's peer is the one to name.
    let send_failed_first = sender.failed.load(Ordering::Acquire);
    if received.is_err() {
        // A write stuck on a full socket would otherwise wait out its timeout.
        let _ = sender.stream.shutdown(Shutdown::Write);
    }
    // Whatever happened, the sender must be done with `buf` before we return.
    let sent = sender.fence();
    match (received, sent) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), _) if !send_failed_first => Err(e),
        (_, Err(f)) => {
            let source = std::io::Error::new(f.kind, f.message);
            Err(classify(
                f.kind,
                source,
                who.next(),
                who.timeout,
                "all-reduce send",
            ))
        }
        (Err(e), Ok(())) => Err(e),
    }
}

/// The ring schedule over segments. Step s (of 2(W-1)) receives chunk (rank - s - 1) and sends
/// chunk (rank - s); the first W-1 steps add what they receive (reduce-scatter), the rest copy
/// it (all-gather). The chunk received at step s is the one sent at step s+1, so each received
/// segment is queued for sending as soon as it is complete.
fn run_schedule<T: Element>(
    buf: &mut [T],
    prev: &mut TcpStream,
    sender: &Sender,
    scratch: &mut [u64],
    who: Neighbours,
    seg_elems: usize,
    phases: Phases,
) -> Result<(), CollectiveError> {
    let (w, rank, n) = (who.world_size, who.rank, buf.len());
    let size = std::mem::size_of::<T>();
    let bounds = |c: usize| {
        let chunk = phases.chunk(c, w);
        (chunk * n / w, (chunk + 1) * n / w)
    };
    // Everything below goes through this one pointer: the sender thread reads segments of the
    // buffer while this thread writes other segments of it.
    let base = buf.as_mut_ptr();
    let queue_send = |from: usize, to: usize| {
        let segment = SendSegment {
            // SAFETY: from..to lies inside `buf` (chunk bounds are within 0..n).
            ptr: unsafe { base.add(from) } as *const u8,
            len: (to - from) * size,
        };
        if sender.queue(Job::Send(segment)) {
            Ok(())
        } else {
            Err(CollectiveError::PeerLost {
                peer: who.next(),
                during: "all-reduce send",
                source: std::io::Error::new(ErrorKind::BrokenPipe, "sender thread ended"),
            })
        }
    };
    let segments = |chunk: usize| {
        let (a, b) = bounds(chunk);
        (a..b)
            .step_by(seg_elems)
            .map(move |x| (x, (x + seg_elems).min(b)))
    };
    let steps = phases.steps(w);
    // The first step sends chunk (rank - first): the rank's own in either half.
    for (x, y) in segments((rank + 2 * w - steps.start) % w) {
        queue_send(x, y)?;
    }
    for s in steps.clone() {
        if s == 1 {
            // Half-way through: a neighbour has sent to us and waits for what we owe it.
            crate::fault::point(crate::fault::Point::AllReduce);
        }
        let chunk = (rank + 2 * w - s - 1) % w;
        for (x, y) in segments(chunk) {
            // SAFETY: x..y lies inside `buf`, and the sender is not reading it now: its last
            // send of this segment completed before the data derived from it came back round
            // (see `SendSegment`), and its next send of it is queued only below.
            let dst = unsafe { std::slice::from_raw_parts_mut(base.add(x), y - x) };
            if s < w - 1 {
                let bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(scratch)[..(y - x) * size];
                read(prev, bytes, who)?;
                let incoming: &[T] = bytemuck::cast_slice(bytes);
                for (d, v) in dst.iter_mut().zip(incoming) {
                    *d += *v;
                }
            } else {
                read(prev, bytemuck::cast_slice_mut(dst), who)?;
            }
            if s + 1 < steps.end {
                queue_send(x, y)?;
            }
        }
    }
    Ok(())
}

fn read(prev: &mut TcpStream, bytes: &mut [u8], who: Neighbours) -> Result<(), CollectiveError> {
    prev.read_exact(bytes)
        .map_err(|e| classify(e.kind(), e, who.prev(), who.timeout, "all-reduce receive"))
}
