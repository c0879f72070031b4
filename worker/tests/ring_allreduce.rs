//! The TCP ring against the obvious computation: the mean of every rank's tensors.

mod common;
use common::ring::{listeners, on_ring};
use ferrotune_worker::collective::ring::{Ring, RingOptions};
use ferrotune_worker::collective::{plan_buckets, Collective, CollectiveError, ReduceOp};
use std::net::TcpListener;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

fn options(timeout: Duration, bucket_bytes: usize) -> RingOptions {
    RingOptions {
        timeout,
        bucket_bytes,
        token: "test-token".into(),
        generation: 1,
        cancel: Default::default(),
    }
}

/// Shapes with 1 element, sizes not divisible by 2 or 3, and one larger than a bucket.
fn shapes() -> Vec<Vec<i64>> {
    vec![
        vec![1],
        vec![7],
        vec![5, 3],
        vec![1001],
        vec![2],
        vec![64, 33],
    ]
}

fn rank_tensors(rank: usize) -> Vec<Tensor> {
    tch::manual_seed(100 + rank as i64);
    shapes()
        .iter()
        .map(|s| Tensor::randn(s.as_slice(), (Kind::Float, tch::Device::Cpu)))
        .collect()
}

/// Every rank's result is within `tolerance` of `expected` and bitwise equal to rank 0's.
fn assert_close_and_identical(results: &[&Tensor], expected: &Tensor, tolerance: f64, what: &str) {
    for (rank, result) in results.iter().enumerate() {
        let diff = (result.to_kind(Kind::Double) - expected.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff <= tolerance, "{what}, rank {rank}: max diff {diff}");
        assert!(
            result.equal(results[0]),
            "{what}: rank {rank} differs from rank 0"
        );
    }
}

fn check_world(world: usize) {
    // 1 KiB buckets: 256 floats, so the (64, 33) and 1001-element tensors overflow a bucket.
    let opts = options(Duration::from_secs(20), 1024);
    // Made here, not in the threads: libtorch's RNG is process-global.
    let inputs: Vec<Vec<Tensor>> = (0..world).map(rank_tensors).collect();
    let copies: Vec<Vec<Tensor>> = inputs
        .iter()
        .map(|r| r.iter().map(|t| t.copy()).collect())
        .collect();
    let results = on_ring(&opts, copies, |rank, mut ring, mut ts: Vec<Tensor>| {
        ring.all_reduce(&mut ts, ReduceOp::Mean).unwrap();
        let mut scalars = [rank as f64, 1.0];
        ring.all_reduce_scalars(&mut scalars, ReduceOp::Sum)
            .unwrap();
        assert_eq!(scalars, [(0..world).sum::<usize>() as f64, world as f64]);
        ts
    });
    for (i, shape) in shapes().iter().enumerate() {
        let stacked = Tensor::stack(
            &inputs
                .iter()
                .map(|r| r[i].shallow_clone())
                .collect::<Vec<_>>(),
            0,
        );
        let expected = stacked.mean_dim(0, false, Kind::Float);
        let got: Vec<&Tensor> = results.iter().map(|r| &r[i]).collect();
        assert!(got.iter().all(|t| t.size() == *shape));
        assert_close_and_identical(&got, &expected, 1e-6, &format!("world {world}, tensor {i}"));
    }
}

#[test]
fn mean_over_two_ranks_matches_direct_computation() {
    check_world(2);
}

#[test]
fn mean_over_three_ranks_matches_direct_computation() {
    check_world(3);
}

#[test]
fn buckets_respect_the_size_limit_and_keep_order() {
    let buckets = plan_buckets(&[1, 7, 15, 1001, 2, 2112], 256);
    assert_eq!(buckets, vec![0..3, 3..4, 4..5, 5..6]);
    assert_eq!(plan_buckets(&[], 256), Vec::<std::ops::Range<usize>>::new());
    assert_eq!(plan_buckets(&[3, 3, 3], 6), vec![0..2, 2..3]);
}

/// Runs a two-rank ring: `rank0` on its own thread, `rank1` on this one. Returns rank 0's result.
fn two_ranks<R: Send>(
    opts: &RingOptions,
    rank0: impl FnOnce(Ring) -> R + Send,
    rank1: impl FnOnce(Ring),
) -> R {
    let (ls, addrs) = listeners(2);
    let mut it = ls.into_iter();
    let (l0, l1) = (it.next().unwrap(), it.next().unwrap());
    std::thread::scope(|s| {
        let first = s.spawn(|| rank0(Ring::connect(l0, 0, 2, &addrs[1], opts).unwrap()));
        rank1(Ring::connect(l1, 1, 2, &addrs[0], opts).unwrap());
        first.join().unwrap()
    })
}

#[test]
fn a_dead_peer_is_an_error_not_a_hang() {
    let opts = options(Duration::from_secs(3), 1 << 20);
    let started = Instant::now();
    let err = two_ranks(
        &opts,
        |mut ring| {
            let mut big = vec![Tensor::ones([1 << 16], (Kind::Float, tch::Device::Cpu))];
            ring.all_reduce(&mut big, ReduceOp::Sum).unwrap_err()
        },
        // Rank 1 joins the ring and then dies (drops its sockets) without reducing.
        drop,
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(err, CollectiveError::PeerLost { peer: 1, .. }),
        "{err}"
    );
}

#[test]
fn a_silent_peer_times_out() {
    let opts = options(Duration::from_millis(700), 1 << 20);
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let err = two_ranks(
        &opts,
        move |mut ring| {
            let mut t = vec![Tensor::ones([10], (Kind::Float, tch::Device::Cpu))];
            let err = ring.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
            tx.send(()).unwrap();
            err
        },
        // Connected but never reduces; keeps its sockets open until rank 0 has given up.
        |_ring| {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        },
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(err, CollectiveError::Timeout { peer: 1, .. }),
        "{err}"
    );
}

#[test]
fn a_stranger_without_the_token_cannot_join() {
    let opts = options(Duration::from_millis(800), 1 << 20);
    let (ls, addrs) = listeners(2);
    let mut it = ls.into_iter();
    let (l0, _l1) = (it.next().unwrap(), it.next().unwrap());
    let stranger_addrs = addrs.clone();
    let stranger = std::thread::spawn(move || {
        let mut wrong = options(Duration::from_millis(800), 1 << 20);
        wrong.token = "not-the-token".into();
        // Pretends to be rank 1 of the job, dialing rank 0.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        Ring::connect(l, 1, 2, &stranger_addrs[0], &wrong)
    });
    let err = Ring::connect(l0, 0, 2, &addrs[1], &opts)
        .err()
        .expect("rank 0 must not accept the stranger");
    assert!(
        matches!(
            err,
            CollectiveError::NoIncoming { peer: 1, .. } | CollectiveError::Timeout { .. }
        ),
        "{err}"
    );
    let _ = stranger.join();
}

/// Gradients as views of one flat buffer (as the trainer keeps them): reduced where they lie,
/// pipelined over many segments, repeatedly on the same ring, against a sum in f64.
fn check_flat_views(world: usize) {
    // Not a multiple of the world size or of a segment; ~4.9 MB, so ~19 segments per chunk.
    let n: i64 = 1_234_567;
    let rounds = 3;
    let opts = options(Duration::from_secs(20), 1 << 20);
    let inputs: Vec<Vec<Tensor>> = (0..world)
        .map(|rank| {
            tch::manual_seed(500 + rank as i64);
            (0..rounds)
                .map(|_| Tensor::randn([n], (Kind::Float, tch::Device::Cpu)))
                .collect()
        })
        .collect();
    let copies: Vec<Vec<Tensor>> = inputs
        .iter()
        .map(|r| r.iter().map(|t| t.copy()).collect())
        .collect();
    let results = on_ring(&opts, copies, |_, mut ring, mine: Vec<Tensor>| {
        let mut out = Vec::new();
        for flat in mine {
            let mut views = vec![
                flat.narrow(0, 0, 1000).view([10, 100]),
                flat.narrow(0, 1000, 7),
                flat.narrow(0, 1007, n - 1007),
            ];
            ring.all_reduce(&mut views, ReduceOp::Sum).unwrap();
            out.push(flat);
        }
        out
    });
    for round in 0..rounds {
        let expected = inputs
            .iter()
            .map(|r| r[round].to_kind(Kind::Double))
            .reduce(|a, b| a + b)
            .unwrap();
        let got: Vec<&Tensor> = results.iter().map(|r| &r[round]).collect();
        assert_close_and_identical(
            &got,
            &expected,
            1e-5,
            &format!("world {world}, round {round}"),
        );
    }
}

#[test]
fn flat_views_over_two_ranks_reduce_in_place() {
    check_flat_views(2);
}

#[test]
fn flat_views_over_three_ranks_reduce_in_place() {
    check_flat_views(3);
}

/// Reduce-scatter, all-gather and broadcast against direct computation, for chunk sizes of one
/// element, odd ones, and one spanning several pipelined segments (256 KiB = 65,536 floats).
fn check_sharded_ops(world: usize) {
    let opts = options(Duration::from_secs(20), 1024);
    for chunk in [1i64, 7, 1001, 70_001] {
        let n = chunk * world as i64;
        tch::manual_seed(7 + chunk);
        let inputs: Vec<Tensor> = (0..world)
            .map(|_| Tensor::randn([n], (Kind::Float, tch::Device::Cpu)))
            .collect();
        let copies: Vec<(Tensor, Tensor)> = inputs
            .iter()
            .enumerate()
            .map(|(r, t)| (t.copy(), t.narrow(0, r as i64 * chunk, chunk).copy()))
            .collect();
        let results = on_ring(&opts, copies, |rank, mut ring, (mut input, own)| {
            let mut sum = Tensor::zeros([chunk], (Kind::Float, tch::Device::Cpu));
            ring.reduce_scatter(&mut input.copy(), &mut sum, ReduceOp::Sum)
                .unwrap();
            let mut mean = Tensor::zeros([chunk], (Kind::Float, tch::Device::Cpu));
            ring.reduce_scatter(&mut input, &mut mean, ReduceOp::Mean)
                .unwrap();
            // Every rank contributes its own chunk of its input.
            let mut gathered = Tensor::full([n], f64::NAN, (Kind::Float, tch::Device::Cpu));
            ring.all_gather(&own, &mut gathered).unwrap();
            // Rank (world - 1) broadcasts its gathered tensor plus its rank.
            let mut b = if rank == world - 1 {
                &gathered + rank as f64
            } else {
                Tensor::zeros([n], (Kind::Float, tch::Device::Cpu))
            };
            ring.broadcast(&mut b, world - 1).unwrap();
            (sum, mean, gathered, b)
        });
        let stacked = Tensor::stack(&inputs, 0).to_kind(Kind::Double);
        let total = stacked.sum_dim_intlist(0, false, Kind::Double);
        let mut own_chunks = Vec::new();
        for (rank, (sum, mean, _, _)) in results.iter().enumerate() {
            let what = format!("world {world}, chunk {chunk}, rank {rank}");
            let expected = total.narrow(0, rank as i64 * chunk, chunk);
            let diff = |t: &Tensor, e: &Tensor| {
                (t.to_kind(Kind::Double) - e).abs().max().double_value(&[])
            };
            assert!(diff(sum, &expected) <= 1e-5, "{what}: reduce-scatter sum");
            assert!(
                diff(mean, &(&expected / world as f64)) <= 1e-6,
                "{what}: reduce-scatter mean"
            );
            own_chunks.push(inputs[rank].narrow(0, rank as i64 * chunk, chunk));
        }
        // The gather is exact: every rank holds every rank's own chunk, in rank order.
        let expected = Tensor::cat(&own_chunks, 0);
        for (rank, (_, _, gathered, b)) in results.iter().enumerate() {
            assert!(
                gathered.equal(&expected),
                "world {world}, chunk {chunk}: rank {rank}'s all-gather"
            );
            assert!(
                b.equal(&(&expected + (world - 1) as f64)),
                "world {world}, chunk {chunk}: rank {rank}'s broadcast"
            );
        }
    }
}

#[test]
fn reduce_scatter_all_gather_and_broadcast_over_two_ranks() {
    check_sharded_ops(2);
}

#[test]
fn reduce_scatter_all_gather_and_broadcast_over_three_ranks() {
    check_sharded_ops(3);
}

#[test]
fn chunks_that_do_not_divide_are_refused() {
    let opts = options(Duration::from_secs(20), 1024);
    let errors = on_ring(&opts, vec![(), ()], |_, mut ring, ()| {
        let mut input = Tensor::zeros([7], (Kind::Float, tch::Device::Cpu));
        let mut out = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
        ring.reduce_scatter(&mut input, &mut out, ReduceOp::Sum)
            .unwrap_err()
            .to_string()
    });
    assert!(
        errors[0].contains("7 elements are not 2 chunks of 3"),
        "{}",
        errors[0]
    );
}
