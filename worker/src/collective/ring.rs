//! Ring all-reduce over TCP, for CPU workers.
//!
//! Rank r sends to rank r+1 and receives from rank r-1. A reduction is a reduce-scatter (W-1
//! steps; afterwards rank r owns the full sum of one chunk) then an all-gather (W-1 steps that
//! pass the owned chunks around). Each rank moves 2(W-1)/W of the buffer, whatever W is. Every
//! chunk is summed in one place and copied everywhere else, so all ranks end bitwise identical.
//!
//! Every socket has read and write timeouts: a dead peer gives an error (connection reset or
//! end of stream), a silent one gives a timeout, never a hang.

use super::{plan_buckets, Collective, CollectiveError, ReduceOp};
use bytemuck::Pod;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const MAGIC: &[u8; 8] = b"FTRING01";

#[derive(Debug, Clone)]
pub struct RingOptions {
    pub timeout: Duration,
    pub bucket_bytes: usize,
    /// Shared secret of the job; a connection that does not present it is dropped.
    pub token: String,
    pub generation: u64,
}

pub struct Ring {
    rank: usize,
    world_size: usize,
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
    timeout: Duration,
    bucket_elems: usize,
    bucket: Vec<f32>,
}

/// Numbers the ring can sum.
trait Element: Pod + std::ops::AddAssign + std::ops::DivAssign {
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

fn hello(rank: usize, opts: &RingOptions) -> Vec<u8> {
    let mut msg = MAGIC.to_vec();
    msg.extend_from_slice(&opts.generation.to_le_bytes());
    msg.extend_from_slice(&(rank as u32).to_le_bytes());
    msg.extend_from_slice(&(opts.token.len() as u32).to_le_bytes());
    msg.extend_from_slice(opts.token.as_bytes());
    msg
}

/// Reads a neighbour's hello; true if it is rank `expect_rank` of this job and generation.
fn check_hello(stream: &mut TcpStream, expect_rank: usize, opts: &RingOptions) -> bool {
    let mut head = [0u8; 24];
    if stream.read_exact(&mut head).is_err() || &head[..8] != MAGIC {
        return false;
    }
    let generation = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    let rank = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
    let token_len = u32::from_le_bytes(head[20..24].try_into().expect("4 bytes")) as usize;
    if token_len != opts.token.len() || generation != opts.generation || rank != expect_rank {
        return false;
    }
    let mut token = vec![0u8; token_len];
    stream.read_exact(&mut token).is_ok() && token == opts.token.as_bytes()
}

fn configure(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

impl Ring {
    /// Joins the ring: connects to rank+1 at `next_address` and accepts rank-1 on `listener`,
    /// which must already be bound at the address this rank announced (it is bound before
    /// registering, so neighbours can dial at once).
    pub fn connect(
        listener: TcpListener,
        rank: usize,
        world_size: usize,
        next_address: &str,
        opts: &RingOptions,
    ) -> Result<Self, CollectiveError> {
        if rank >= world_size {
            return Err(CollectiveError::Setup(format!(
                "rank {rank} outside a group of {world_size}"
            )));
        }
        let bucket_elems = (opts.bucket_bytes / 4).max(1);
        if world_size == 1 {
            return Ok(Ring {
                rank,
                world_size,
                next: None,
                prev: None,
                timeout: opts.timeout,
                bucket_elems,
                bucket: Vec::new(),
            });
        }
        let next_rank = (rank + 1) % world_size;
        let prev_rank = (rank + world_size - 1) % world_size;
        let deadline = Instant::now() + opts.timeout;

        // Dial first and send our hello without waiting: every rank does the same, then accepts,
        // so nobody waits on a neighbour that is itself waiting.
        let mut next = dial(next_address, next_rank, deadline, opts.timeout)?;
        next.write_all(&hello(rank, opts))
            .map_err(|source| CollectiveError::PeerLost {
                peer: next_rank,
                during: "handshake",
                source,
            })?;
        let mut prev = accept(&listener, prev_rank, deadline, opts)?;
        prev.write_all(&[1])
            .map_err(|source| CollectiveError::PeerLost {
                peer: prev_rank,
                during: "handshake",
                source,
            })?;
        let mut ack = [0u8; 1];
        next.read_exact(&mut ack)
            .map_err(|e| classify(e, next_rank, opts.timeout, "handshake"))?;
        Ok(Ring {
            rank,
            world_size,
            next: Some(next),
            prev: Some(prev),
            timeout: opts.timeout,
            bucket_elems,
            bucket: Vec::new(),
        })
    }

    /// Sends `send` to the next rank while receiving `recv` from the previous one. The send runs
    /// on its own thread: with both directions blocking, two full socket buffers would deadlock.
    fn exchange(&mut self, send: &[u8], recv: &mut [u8]) -> Result<(), CollectiveError> {
        let (next, prev) = match (self.next.as_mut(), self.prev.as_mut()) {
            (Some(n), Some(p)) => (n, p),
            _ => return Ok(()),
        };
        let (next_rank, prev_rank) = (
            (self.rank + 1) % self.world_size,
            (self.rank + self.world_size - 1) % self.world_size,
        );
        let timeout = self.timeout;
        std::thread::scope(|s| {
            let writer = s.spawn(move || next.write_all(send));
            let read = prev.read_exact(recv);
            let written = writer
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("sender thread panicked")));
            read.map_err(|e| classify(e, prev_rank, timeout, "all-reduce receive"))?;
            written.map_err(|e| classify(e, next_rank, timeout, "all-reduce send"))
        })
    }

    fn reduce_in_place<T: Element>(
        &mut self,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        let w = self.world_size;
        if w > 1 {
            let n = buf.len();
            let bounds = |c: usize| (c * n / w, (c + 1) * n / w);
            let mut scratch: Vec<T> = vec![T::zeroed(); n.div_ceil(w) + 1];
            // Reduce-scatter: after step s, chunk (rank - s - 1) holds s + 2 contributions.
            for s in 0..w - 1 {
                let (a, b) = bounds((self.rank + w - s) % w);
                let (c, d) = bounds((self.rank + 2 * w - s - 1) % w);
                self.exchange(
                    bytemuck::cast_slice(&buf[a..b]),
                    bytemuck::cast_slice_mut(&mut scratch[..d - c]),
                )?;
                for (x, y) in buf[c..d].iter_mut().zip(&scratch[..d - c]) {
                    *x += *y;
                }
            }
            // All-gather: pass each finished chunk around the ring.
            for s in 0..w - 1 {
                let (a, b) = bounds((self.rank + 1 + w - s) % w);
                let (c, d) = bounds((self.rank + w - s) % w);
                self.exchange(
                    bytemuck::cast_slice(&buf[a..b]),
                    bytemuck::cast_slice_mut(&mut scratch[..d - c]),
                )?;
                buf[c..d].copy_from_slice(&scratch[..d - c]);
            }
        }
        if op == ReduceOp::Mean {
            let div = T::from_count(w);
            for x in buf.iter_mut() {
                *x /= div;
            }
        }
        Ok(())
    }
}

fn classify(
    e: std::io::Error,
    peer: usize,
    timeout: Duration,
    during: &'static str,
) -> CollectiveError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout {
            peer,
            timeout,
            during,
        },
        _ => CollectiveError::PeerLost {
            peer,
            during,
            source: e,
        },
    }
}

fn dial(
    address: &str,
    peer: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, CollectiveError> {
    let connect_err = |source| CollectiveError::Connect {
        peer,
        address: address.to_string(),
        timeout,
        source,
    };
    loop {
        let attempt = address
            .to_socket_addrs()
            .and_then(|mut addrs| {
                addrs
                    .next()
                    .ok_or_else(|| std::io::Error::other("address resolves to nothing"))
            })
            .and_then(|addr| {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10));
                TcpStream::connect_timeout(&addr, left)
            });
        match attempt {
            Ok(stream) => {
                configure(&stream, timeout).map_err(connect_err)?;
                return Ok(stream);
            }
            Err(e) if Instant::now() >= deadline => return Err(connect_err(e)),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn accept(
    listener: &TcpListener,
    peer: usize,
    deadline: Instant,
    opts: &RingOptions,
) -> Result<TcpStream, CollectiveError> {
    listener
        .set_nonblocking(true)
        .map_err(|e| CollectiveError::Setup(format!("listener: {e}")))?;
    loop {
        match listener.accept() {
            Ok((mut stream, from)) => {
                let ok = stream.set_nonblocking(false).is_ok()
                    && configure(&stream, opts.timeout).is_ok()
                    && check_hello(&mut stream, peer, opts);
                if ok {
                    return Ok(stream);
                }
                tracing::warn!(%from, "dropped a ring connection that is not rank {peer} of this job");
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(CollectiveError::NoIncoming {
                        peer,
                        timeout: opts.timeout,
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(CollectiveError::Setup(format!("accept: {e}"))),
        }
    }
}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&mut self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), CollectiveError> {
        for t in tensors.iter() {
            if t.kind() != Kind::Float || t.device() != Device::Cpu {
                return Err(CollectiveError::UnsupportedTensor {
                    kind: t.kind(),
                    device: t.device(),
                });
            }
        }
        let sizes: Vec<usize> = tensors.iter().map(|t| t.numel()).collect();
        let mut bucket = std::mem::take(&mut self.bucket);
        for range in plan_buckets(&sizes, self.bucket_elems) {
            let total: usize = sizes[range.clone()].iter().sum();
            bucket.clear();
            bucket.resize(total, 0.0);
            let mut offset = 0;
            for i in range.clone() {
                let n = sizes[i];
                tensors[i]
                    .contiguous()
                    .view(-1)
                    .copy_data(&mut bucket[offset..offset + n], n);
                offset += n;
            }
            let reduced = self.reduce_in_place(&mut bucket, op);
            if let Err(e) = reduced {
                self.bucket = bucket;
                return Err(e);
            }
            let mut offset = 0;
            for i in range {
                let n = sizes[i];
                let src = Tensor::from_slice(&bucket[offset..offset + n])
                    .view(tensors[i].size().as_slice());
                tch::no_grad(|| tensors[i].copy_(&src));
                offset += n;
            }
        }
        self.bucket = bucket;
        Ok(())
    }

    fn all_reduce_scalars(
        &mut self,
        values: &mut [f64],
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        self.reduce_in_place(values, op)
    }
}
