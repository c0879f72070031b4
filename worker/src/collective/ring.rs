//! Ring all-reduce over TCP, for CPU workers.
//!
//! Rank r sends to rank r+1 and receives from rank r-1. A reduction is a reduce-scatter (W-1
//! steps; afterwards rank r owns the full sum of one chunk) then an all-gather (W-1 steps that
//! pass the owned chunks around). Each rank moves 2(W-1)/W of the buffer, whatever W is. Every
//! chunk is summed in one place and copied everywhere else, so all ranks end bitwise identical.
//!
//! The data path (a persistent sender thread, segments pipelined through both phases) is in
//! [`super::pipeline`]; tensor memory is reduced in place where it is one flat region
//! ([`super::flat`]).
//!
//! Every socket has read and write timeouts: a dead peer gives an error (connection reset or
//! end of stream), a silent one gives a timeout, never a hang.

use super::pipeline::{self, Element, Neighbours, Phases, Sender};
use super::{check_chunks, flat, plan_buckets, Collective, CollectiveError, ReduceOp};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Tensor;

const MAGIC: &[u8; 8] = b"FTRING01";

#[derive(Debug, Clone)]
pub struct RingOptions {
    pub timeout: Duration,
    pub bucket_bytes: usize,
    /// Shared secret of the job; a connection that does not present it is dropped.
    pub token: String,
    pub generation: u64,
    /// Set from another thread to give up connecting at once (the generation has ended).
    pub cancel: Arc<AtomicBool>,
}

/// Breaks a ring from another thread: both of its sockets are shut down, so a rank blocked in
/// a collective (its neighbour frozen or partitioned) returns with an error at once instead of
/// waiting out the collective timeout.
#[derive(Debug)]
pub struct RingAbort {
    streams: Vec<TcpStream>,
}

impl RingAbort {
    pub fn fire(&self) {
        for s in &self.streams {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

pub struct Ring {
    rank: usize,
    world_size: usize,
    link: Option<Link>,
    timeout: Duration,
    bucket_elems: usize,
    /// Reused buffers: the packing area for tensors that are not one flat region, and the
    /// receive area of one segment.
    bucket: Vec<f32>,
    scratch: Vec<u64>,
}

/// The two sockets of a ring of two or more: receive from the previous rank on the calling
/// thread, send to the next one from the persistent sender thread.
struct Link {
    prev: TcpStream,
    sender: Sender,
    /// Handles on both sockets for [`RingAbort`].
    handles: Vec<TcpStream>,
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
                link: None,
                timeout: opts.timeout,
                bucket_elems,
                bucket: Vec::new(),
                scratch: Vec::new(),
            });
        }
        let next_rank = (rank + 1) % world_size;
        let prev_rank = (rank + world_size - 1) % world_size;
        let deadline = Instant::now() + opts.timeout;

        // Dial first and send our hello without waiting: every rank does the same, then accepts,
        // so nobody waits on a neighbour that is itself waiting.
        let mut next = dial(next_address, next_rank, deadline, opts)?;
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
        let lost = |source| CollectiveError::PeerLost {
            peer: next_rank,
            during: "starting the sender thread",
            source,
        };
        let handles = vec![
            prev.try_clone().map_err(lost)?,
            next.try_clone().map_err(lost)?,
        ];
        let sender = Sender::start(next).map_err(lost)?;
        Ok(Ring {
            rank,
            world_size,
            link: Some(Link {
                prev,
                sender,
                handles,
            }),
            timeout: opts.timeout,
            bucket_elems,
            bucket: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// A handle that breaks this ring from another thread; None for a group of one.
    pub fn abort_handle(&self) -> Option<RingAbort> {
        let link = self.link.as_ref()?;
        let streams = link
            .handles
            .iter()
            .filter_map(|s| s.try_clone().ok())
            .collect();
        Some(RingAbort { streams })
    }

    fn neighbours(&self) -> Neighbours {
        Neighbours {
            rank: self.rank,
            world_size: self.world_size,
            timeout: self.timeout,
        }
    }

    /// Sums (or averages) `buf` over the ring in place.
    fn reduce_in_place<T: Element>(
        &mut self,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        self.run_phases(buf, Phases::AllReduce)?;
        if op == ReduceOp::Mean {
            divide(buf, self.world_size);
        }
        Ok(())
    }

    fn run_phases<T: Element>(
        &mut self,
        buf: &mut [T],
        phases: Phases,
    ) -> Result<(), CollectiveError> {
        let who = self.neighbours();
        match self.link.as_mut() {
            Some(link) => pipeline::reduce(
                buf,
                &mut link.prev,
                &link.sender,
                &mut self.scratch,
                who,
                phases,
            ),
            None => Ok(()),
        }
    }
}

fn divide<T: Element>(buf: &mut [T], n: usize) {
    let div = T::from_count(n);
    for x in buf.iter_mut() {
        *x /= div;
    }
}

/// One contiguous fp32 CPU tensor's memory (the ring's element type).
fn one_slice(t: &mut Tensor) -> Result<&mut [f32], CollectiveError> {
    let tensors = std::slice::from_mut(t);
    flat::check_tensors(tensors)?;
    if tensors[0].numel() == 0 {
        return Ok(&mut []);
    }
    flat::as_one_slice(tensors).ok_or(CollectiveError::UnsupportedTensor {
        kind: tch::Kind::Float,
        device: tch::Device::Cpu,
        expected: "one contiguous fp32 CPU tensor (the TCP ring)",
    })
}

fn classify(
    e: std::io::Error,
    peer: usize,
    timeout: Duration,
    during: &'static str,
) -> CollectiveError {
    pipeline::classify(e.kind(), e, peer, timeout, during)
}

fn cancelled(peer: usize, opts: &RingOptions) -> Option<CollectiveError> {
    opts.cancel.load(Ordering::Relaxed).then(|| {
        CollectiveError::Setup(format!(
            "gave up connecting to rank {peer}: the generation ended"
        ))
    })
}

fn dial(
    address: &str,
    peer: usize,
    deadline: Instant,
    opts: &RingOptions,
) -> Result<TcpStream, CollectiveError> {
    let timeout = opts.timeout;
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
            Err(_) => {
                if let Some(e) = cancelled(peer, opts) {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(20))
            }
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
                if let Some(e) = cancelled(peer, opts) {
                    return Err(e);
                }
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

    fn bytes_sent(&self) -> u64 {
        self.link.as_ref().map_or(0, |l| l.sender.bytes_sent())
    }

    fn all_reduce(&mut self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), CollectiveError> {
        flat::check_tensors(tensors)?;
        if self.world_size == 1 && op == ReduceOp::Sum {
            return Ok(());
        }
        // Gradients that are views of one flat buffer are reduced where they lie.
        if let Some(memory) = flat::as_one_slice(tensors) {
            return self.reduce_in_place(memory, op);
        }
        let sizes: Vec<usize> = tensors.iter().map(|t| t.numel()).collect();
        let mut bucket = std::mem::take(&mut self.bucket);
        let mut result = Ok(());
        for range in plan_buckets(&sizes, self.bucket_elems) {
            flat::pack(&tensors[range.clone()], &mut bucket);
            result = self.reduce_in_place(&mut bucket, op);
            if result.is_err() {
                break;
            }
            flat::unpack(&bucket, &mut tensors[range]);
        }
        self.bucket = bucket;
        result
    }

    fn all_reduce_scalars(
        &mut self,
        values: &mut [f64],
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        self.reduce_in_place(values, op)
    }

    fn reduce_scatter(
        &mut self,
        input: &mut Tensor,
        output: &mut Tensor,
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        check_chunks(input, output, self.world_size)?;
        let (w, rank) = (self.world_size, self.rank);
        let buf = one_slice(input)?;
        self.run_phases(buf, Phases::ReduceScatter)?;
        let k = buf.len() / w;
        let mine = &mut buf[rank * k..(rank + 1) * k];
        if op == ReduceOp::Mean {
            divide(mine, w);
        }
        one_slice(output)?.copy_from_slice(mine);
        Ok(())
    }

    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CollectiveError> {
        check_chunks(output, input, self.world_size)?;
        flat::check_tensors(std::slice::from_ref(input))?;
        let (w, rank) = (self.world_size, self.rank);
        let k = output.numel() / w;
        let mine = output.reshape([-1]).narrow(0, (rank * k) as i64, k as i64);
        // In place (`input` is output's own chunk, as ZeRO's parameters are) nothing moves;
        // otherwise libtorch copies it over: no bucket-sized staging buffer either way (at a
        // 7B model's chunk that would be gigabytes kept for the ring's life).
        if input.data_ptr() != mine.data_ptr() {
            tch::no_grad(|| mine.shallow_clone().f_copy_(&input.reshape([-1])))
                .map_err(|e| CollectiveError::Setup(format!("all-gather input: {e}")))?;
        }
        let buf = one_slice(output)?;
        self.run_phases(buf, Phases::AllGather)
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::Setup(format!(
                "broadcast from rank {root} in a group of {}",
                self.world_size
            )));
        }
        let who = self.neighbours();
        let buf = one_slice(tensor)?;
        match self.link.as_mut() {
            Some(link) => pipeline::broadcast(buf, &mut link.prev, &link.sender, who, root),
            None => Ok(()),
        }
    }
}
