//! ZeRO stages 1 and 2 on a real TCP ring against stage 0: the same weights, gradient norms
//! and optimizer state after steps with clipping active, for 2 and 3 ranks and parameters
//! that the chunks split; stage 2 sends half the gradient bytes; saved moments re-shard to
//! another world size unchanged.

mod common;
use ferrotune_worker::collective::ring::{Ring, RingOptions};
use ferrotune_worker::optim::AdamWConfig;
use ferrotune_worker::zero::{Stage, Updater};
use std::collections::HashMap;
use std::time::Duration;
use tch::{Kind, Tensor};

const STEPS: usize = 6;
const MAX_NORM: f64 = 0.5;

/// Matrices (decayed) and vectors (not), sizes that 2 and 3 do not divide, one over a bucket.
fn shapes() -> Vec<Vec<i64>> {
    vec![vec![5, 3], vec![7], vec![64, 33], vec![1001], vec![2, 2]]
}

fn config() -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    }
}

/// The same start on every rank, and per rank and step the targets its loss pulls towards.
struct Input {
    start: Vec<Tensor>,
    /// One weight per parameter and step.
    targets: Vec<Tensor>,
}

/// libtorch's generator is process-global and the tests run in parallel: draws are serialised,
/// or two tests seeding at once would interleave their draws.
static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn inputs(world: usize) -> Vec<Input> {
    let _draws = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(7);
    let start: Vec<Tensor> = shapes()
        .iter()
        .map(|s| Tensor::randn(s.as_slice(), (Kind::Float, tch::Device::Cpu)))
        .collect();
    (0..world)
        .map(|_| Input {
            start: start.iter().map(|t| t.copy()).collect(),
            targets: (0..STEPS)
                .map(|_| Tensor::randn([shapes().len() as i64], (Kind::Float, tch::Device::Cpu)))
                .collect(),
        })
        .collect()
}

struct Outcome {
    params: Vec<Tensor>,
    norms: Vec<f64>,
    gradient_bytes: u64,
    /// Rank 0: the moments per parameter after gathering.
    state: Vec<(String, Tensor)>,
}

/// A ring of `world` threads (1 KiB buckets: several per flat buffer).
fn on_ring<I: Send, T: Send>(
    world: usize,
    inputs: Vec<I>,
    per_rank: impl Fn(usize, Ring, I) -> T + Sync,
) -> Vec<T> {
    assert_eq!(inputs.len(), world);
    let opts = RingOptions {
        timeout: Duration::from_secs(20),
        bucket_bytes: 1024,
        token: "t".into(),
        generation: 1,
        cancel: Default::default(),
    };
    common::ring::on_ring(&opts, inputs, per_rank)
}

fn named(params: &[Tensor]) -> Vec<(String, Tensor)> {
    params
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("p{i}"), p.shallow_clone()))
        .collect()
}

/// STEPS steps of a loss whose gradient differs per rank: sum_i t_i * sum(p_i²) + sum(p_i).
fn train(stage: Stage, world: usize) -> Vec<Outcome> {
    on_ring(world, inputs(world), |rank, mut ring, input| {
        let params: Vec<Tensor> = input
            .start
            .into_iter()
            .map(|t| t.set_requires_grad(true))
            .collect();
        let mut updater = Updater::new(stage, named(&params), None, config(), rank, world);
        let (mut norms, mut gradient_bytes) = (Vec::new(), 0);
        for step in 0..STEPS {
            let t = &input.targets[step];
            let loss = params
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    (p * p).sum(Kind::Float) * t.double_value(&[i as i64]) + p.sum(Kind::Float)
                })
                .fold(
                    Tensor::zeros([], (Kind::Float, tch::Device::Cpu)),
                    |a, b| a + b,
                );
            loss.backward();
            let mut scalars = [loss.double_value(&[]), 4.0, 4.0];
            let norm = updater
                .reduce_and_step(None, &mut scalars, 1e-2, MAX_NORM, &mut ring)
                .unwrap();
            assert_eq!(scalars[1], 4.0 * world as f64, "the scalars are summed");
            norms.push(norm);
            gradient_bytes += updater.last_gradient_bytes;
        }
        updater.gather_state(&mut ring).unwrap();
        let state = if rank == 0 {
            updater
                .state()
                .state_tensors()
                .into_iter()
                .map(|(n, t)| (n, t.copy()))
                .collect()
        } else {
            Vec::new()
        };
        Outcome {
            params: params.iter().map(|p| p.detach().copy()).collect(),
            norms,
            gradient_bytes,
            state,
        }
    })
}

fn max_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(x.size(), y.size());
            (x - y).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

fn by_name(state: &[(String, Tensor)]) -> (Vec<String>, Vec<Tensor>) {
    let mut sorted: Vec<_> = state.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted
        .into_iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .unzip()
}

fn check(world: usize) {
    let zero = train(Stage::Zero, world);
    assert!(
        zero[0].norms.iter().all(|&n| n > MAX_NORM),
        "clipping is active at every step: {:?}",
        zero[0].norms
    );
    let (names, moments) = by_name(&zero[0].state);
    assert_eq!(names.len(), 2 * shapes().len());
    for stage in [Stage::One, Stage::Two] {
        let sharded = train(stage, world);
        for (rank, out) in sharded.iter().enumerate() {
            let diff = max_diff(&out.params, &zero[rank].params);
            assert!(
                diff <= 1e-6,
                "{stage:?}, {world} ranks, rank {rank}: weights differ by {diff}"
            );
            for (a, b) in out.norms.iter().zip(&zero[rank].norms) {
                assert!((a - b).abs() <= 1e-6 * b, "{stage:?}: grad_norm {a} vs {b}");
            }
            // Every rank ends with the same weights.
            assert_eq!(max_diff(&out.params, &sharded[0].params), 0.0);
        }
        let (sharded_names, sharded_moments) = by_name(&sharded[0].state);
        assert_eq!(sharded_names, names);
        let diff = max_diff(&sharded_moments, &moments);
        assert!(diff <= 1e-6, "{stage:?}: gathered moments differ by {diff}");

        // The ring counts what it sends: stage 2's reduce-scatter is half an all-reduce.
        let ratio = sharded[1].gradient_bytes as f64 / zero[1].gradient_bytes as f64;
        eprintln!("{stage:?}, {world} ranks: gradient bytes {ratio:.3} of stage 0's");
        let want = if stage == Stage::Two { 0.5 } else { 1.0 };
        assert!((ratio - want).abs() < 0.02, "{stage:?}: {ratio}");
    }
}

#[test]
fn stages_1_and_2_equal_stage_0_on_two_ranks() {
    check(2);
}

#[test]
fn stages_1_and_2_equal_stage_0_on_three_ranks() {
    check(3);
}

/// Moments gathered from 3 ranks, loaded into 2 ranks' chunks and gathered again, are the same
/// tensors: that is the whole of re-sharding.
#[test]
fn saved_moments_reshard_to_another_world_size() {
    let three = train(Stage::One, 3);
    let saved: Vec<(String, Tensor)> = three[0]
        .state
        .iter()
        .map(|(n, t)| (n.clone(), t.copy()))
        .collect();
    type Start = (Vec<Tensor>, Vec<(String, Tensor)>);
    let starts: Vec<Start> = (0..2)
        .map(|_| {
            let start = inputs(1).remove(0).start;
            let state = saved.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
            (start, state)
        })
        .collect();
    let regathered = on_ring(2, starts, |rank, mut ring, (start, state)| {
        let params: Vec<Tensor> = start
            .into_iter()
            .map(|t| t.set_requires_grad(true))
            .collect();
        let mut updater = Updater::new(Stage::Two, named(&params), None, config(), rank, 2);
        let map: HashMap<String, Tensor> = state.into_iter().collect();
        updater.state_mut().load_state(map, STEPS as u64).unwrap();
        assert_eq!(updater.state().step_count(), STEPS as u64);
        updater.gather_state(&mut ring).unwrap();
        updater
            .state()
            .state_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect::<Vec<_>>()
    });
    let (names, want) = by_name(&saved);
    let (got_names, got) = by_name(&regathered[0]);
    assert_eq!(got_names, names);
    assert_eq!(max_diff(&got, &want), 0.0);
    // A moment missing or of another shape is refused by name.
    let mut map: HashMap<String, Tensor> = saved.into_iter().collect();
    map.remove("exp_avg.p3");
    let params: Vec<Tensor> = inputs(1).remove(0).start;
    let mut lone = Updater::new(Stage::One, named(&params), None, config(), 0, 1);
    let err = lone.state_mut().load_state(map, 1).unwrap_err();
    assert!(err.contains("`exp_avg.p3` is missing"), "{err}");
}
