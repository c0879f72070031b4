//! ZeRO stages 1 and 2 on a real TCP ring against stage 0: the same weights, gradient norms
//! and optimizer state after steps with clipping active, for 2 and 3 ranks and parameters
//! that the chunks split; stage 2 sends half the gradient bytes; the moments each rank saves
//! (its range of the flat moments) restore into another world size, and into stage 0,
//! unchanged.

mod common;
use ferrotune_data::trainer_state::OptimizerShards;
use ferrotune_worker::checkpoint::{check_shard_map, load_per_parameter, load_shard};
use ferrotune_worker::collective::ring::{Ring, RingOptions};
use ferrotune_worker::optim::{AdamWConfig, OptimizerState};
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
    /// What the rank saves of its optimizer: the moments per parameter at stage 0, its range
    /// of the flat moments at stages 1 and 2.
    state: Vec<(String, Tensor)>,
    /// The shard map (stages 1 and 2).
    shards: Option<OptimizerShards>,
}

/// What the ranks of a sharded run saved, as the per-parameter moments stage 0 saves: each
/// moment's ranges laid end to end in rank order and cut at the parameters' sizes.
fn consolidate(ranks: &[Outcome]) -> Vec<(String, Tensor)> {
    let map = ranks[0].shards.as_ref().expect("sharded");
    let mut out = Vec::new();
    for moment in ["exp_avg", "exp_avg_sq"] {
        let pieces: Vec<Tensor> = ranks
            .iter()
            .map(|r| {
                let (_, t) = r.state.iter().find(|(n, _)| n == moment).unwrap();
                t.shallow_clone()
            })
            .collect();
        let flat = Tensor::cat(&pieces, 0);
        let mut at = 0;
        for p in &map.parameters {
            let n: i64 = p.shape.iter().product();
            let view = flat.narrow(0, at, n).view(p.shape.as_slice()).copy();
            out.push((format!("{moment}.{}", p.name), view));
            at += n;
        }
        assert_eq!(at, flat.numel() as i64, "the ranges cover the parameters");
    }
    out
}

/// Restores what `saved` (the ranks of a sharded run) saved into `optimizer`, through the
/// shard map as a resume does.
fn restore(optimizer: &mut dyn OptimizerState, saved: &[Outcome]) -> Result<(), String> {
    let map = saved[0].shards.as_ref().expect("sharded");
    let index = check_shard_map(optimizer, map)?;
    for (i, rank) in saved.iter().enumerate() {
        let file: HashMap<String, Tensor> = rank
            .state
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        load_shard(optimizer, map, &index, i, &file)?;
    }
    Ok(())
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
        let shards = updater.state().shards();
        if let Some((r, map)) = &shards {
            assert_eq!(*r, rank);
            assert_eq!(map.files.len(), world);
        }
        Outcome {
            params: params.iter().map(|p| p.detach().copy()).collect(),
            norms,
            gradient_bytes,
            state: copied(updater.state()),
            shards: shards.map(|(_, map)| map),
        }
    })
}

fn copied(optimizer: &dyn OptimizerState) -> Vec<(String, Tensor)> {
    optimizer
        .state_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect()
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
        let (sharded_names, sharded_moments) = by_name(&consolidate(&sharded));
        assert_eq!(sharded_names, names);
        let diff = max_diff(&sharded_moments, &moments);
        assert!(diff <= 1e-6, "{stage:?}: saved moments differ by {diff}");

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

/// Moments saved by 3 ranks, restored into 2 ranks' chunks (and into stage 0) through the shard
/// map and saved again, are the same tensors: that is the whole of re-sharding.
#[test]
fn saved_moments_reshard_to_another_world_size() {
    let three = train(Stage::One, 3);
    let want = consolidate(&three);
    // Restoring involves no collective: each rank takes what overlaps its chunk.
    let two: Vec<Outcome> = (0..2)
        .map(|rank| {
            let params: Vec<Tensor> = inputs(1).remove(0).start;
            let mut updater = Updater::new(Stage::Two, named(&params), None, config(), rank, 2);
            restore(updater.state_mut(), &three).unwrap();
            let (_, map) = updater.state().shards().unwrap();
            Outcome {
                params,
                norms: Vec::new(),
                gradient_bytes: 0,
                state: copied(updater.state()),
                shards: Some(map),
            }
        })
        .collect();
    assert_eq!(two[0].shards.as_ref().unwrap().files.len(), 2);
    let (names, want_moments) = by_name(&want);
    let (got_names, got) = by_name(&consolidate(&two));
    assert_eq!(got_names, names);
    assert_eq!(max_diff(&got, &want_moments), 0.0);

    // Stage 0 takes whole parameters out of the same files.
    let params: Vec<Tensor> = inputs(1).remove(0).start;
    let mut lone = Updater::new(Stage::Zero, named(&params), None, config(), 0, 1);
    restore(lone.state_mut(), &three).unwrap();
    let (zero_names, zero) = by_name(&copied(lone.state()));
    assert_eq!(zero_names, names);
    assert_eq!(max_diff(&zero, &want_moments), 0.0);
    // ... and a sharded optimizer its chunk out of per-parameter moments.
    let per_parameter: HashMap<String, Tensor> =
        want.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    let mut sharded = Updater::new(Stage::One, named(&params), None, config(), 0, 1);
    load_per_parameter(sharded.state_mut(), per_parameter).unwrap();
    let one = Outcome {
        params: Vec::new(),
        norms: Vec::new(),
        gradient_bytes: 0,
        state: copied(sharded.state()),
        shards: sharded.state().shards().map(|(_, m)| m),
    };
    let (_, from_per_parameter) = by_name(&consolidate(&[one]));
    assert_eq!(max_diff(&from_per_parameter, &want_moments), 0.0);

    // A moment missing, or a shard map of another model, is refused by name.
    let mut map: HashMap<String, Tensor> = want.into_iter().collect();
    map.remove("exp_avg.p3");
    let err = load_per_parameter(lone.state_mut(), map).unwrap_err();
    assert!(err.contains("`exp_avg.p3` is missing"), "{err}");
    let mut other = three;
    other[0].shards.as_mut().unwrap().parameters[2].shape = vec![33, 64];
    let err = restore(lone.state_mut(), &other).unwrap_err();
    assert!(err.contains("`p2` is [33, 64]"), "{err}");
    other[0].shards.as_mut().unwrap().files[1].end += 1;
    let err = restore(lone.state_mut(), &other).unwrap_err();
    assert!(err.contains("optimizer shard map"), "{err}");
}
