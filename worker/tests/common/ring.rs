//! Rings of threads for the worker's collective tests.

use ferrotune_worker::collective::ring::{Ring, RingOptions};
use std::net::TcpListener;

pub fn listeners(n: usize) -> (Vec<TcpListener>, Vec<String>) {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs = ls
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    (ls, addrs)
}

/// Runs `per_rank` on its own thread for every rank of a fresh ring, each with its own input
/// (tensors are not shared between threads); results in rank order.
pub fn on_ring<I: Send, T: Send>(
    opts: &RingOptions,
    inputs: Vec<I>,
    per_rank: impl Fn(usize, Ring, I) -> T + Sync,
) -> Vec<T> {
    let world = inputs.len();
    let (ls, addrs) = listeners(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = ls
            .into_iter()
            .zip(inputs)
            .enumerate()
            .map(|(rank, (l, input))| {
                let (addrs, per_rank) = (&addrs, &per_rank);
                s.spawn(move || {
                    let next = &addrs[(rank + 1) % world];
                    let ring = Ring::connect(l, rank, world, next, opts).unwrap();
                    per_rank(rank, ring, input)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
