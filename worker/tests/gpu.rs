//! GPU checks, run only with FERROTUNE_GPU_TESTS=1 (bench/gpu.sh runs them on a lent GPU
//! machine): NCCL collectives at world size 1 on awkward sizes, abort without a hang, a tiny
//! fine-tune on CUDA against the same steps on the CPU (ZeRO stages 0, 1 and 2, fp32 and bf16),
//! and the Hugging Face goldens on CUDA.
//!
//! One GPU cannot hold two NCCL ranks (NCCL refuses two ranks on one device), so multi-rank
//! correctness rests on these world-size-1 checks (pointers, counts, dtypes, streams, packing)
//! plus the shared bucket and training code, which the CPU suite tests over the TCP ring.
//!
//! Tolerances, and why: CUDA fp32 matmuls run without TF32 (libtorch's default), but kernels
//! sum in a different order than the CPU's: ≤ 1e-4 relative on losses and logits, 1e-3 on
//! gradients. bf16 compute rounds every activation to 8 bits of mantissa: ≤ 2e-2 on losses.

mod common;

use ferrotune_worker::collective::nccl::{self, Nccl, NcclOptions};
use ferrotune_worker::collective::{Collective, CollectiveError, ReduceOp};
use ferrotune_worker::model::io::{LoadedModel, SaveOptions};
use ferrotune_worker::model::DType;
use ferrotune_worker::optim::AdamWConfig;
use ferrotune_worker::precision::ComputeCopy;
use ferrotune_worker::zero::{Stage, Updater};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const CUDA: Device = Device::Cuda(0);

/// False (with the reason printed) unless the GPU tests were asked for; asked for on a host
/// without a usable GPU, they fail saying why.
fn gpu_tests() -> bool {
    if std::env::var("FERROTUNE_GPU_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set FERROTUNE_GPU_TESTS=1 on a GPU host (bench/gpu.sh does)");
        return false;
    }
    let inventory = ferrotune_worker::device::inventory();
    if let Some(why) = inventory.cuda_unavailable {
        panic!("FERROTUNE_GPU_TESTS=1, but CUDA cannot be used: {why}");
    }
    if let Some(why) = inventory.nccl_unavailable {
        panic!("FERROTUNE_GPU_TESTS=1, but NCCL cannot be used: {why}");
    }
    true
}

fn communicator(abort: Arc<AtomicBool>) -> Nccl {
    let id = nccl::unique_id().unwrap();
    let options = NcclOptions {
        timeout: Duration::from_secs(30),
        abort,
    };
    Nccl::connect(&id, 0, 1, CUDA, options).unwrap()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.equal(b)
}

#[test]
fn nccl_collectives_at_world_size_1_on_awkward_sizes() {
    if !gpu_tests() {
        return;
    }
    let mut comm = communicator(Arc::default());
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));
    tch::manual_seed(1);
    for kind in [Kind::Float, Kind::BFloat16] {
        // Separate allocations: the packing path.
        let mut tensors: Vec<Tensor> = [1i64, 7, 1023, 65_537]
            .iter()
            .map(|&n| Tensor::randn([n], (kind, CUDA)))
            .collect();
        tensors.push(Tensor::randn([3, 5], (kind, CUDA)).transpose(0, 1));
        let before: Vec<Tensor> = tensors.iter().map(|t| t.copy()).collect();
        for op in [ReduceOp::Sum, ReduceOp::Mean] {
            comm.all_reduce(&mut tensors, op).unwrap();
            for (t, b) in tensors.iter().zip(&before) {
                assert!(
                    same(t, b),
                    "{kind:?} {op:?}: one rank's reduction is the identity"
                );
            }
        }
        // Views of one flat buffer: reduced in place, in one call.
        let flat = Tensor::randn([4099], (kind, CUDA));
        let copy = flat.copy();
        let mut views = vec![flat.narrow(0, 0, 4000), flat.narrow(0, 4000, 99)];
        let mut scalars = [1.5, -2.0, 3e10];
        comm.all_reduce_with_scalars(&mut views, &mut scalars, ReduceOp::Sum)
            .unwrap();
        assert!(same(&flat, &copy));
        assert_eq!(scalars, [1.5, -2.0, 3e10]);
    }
    let input = Tensor::randn([4097], (Kind::Float, CUDA));
    let mut output = Tensor::zeros([4097], (Kind::Float, CUDA));
    comm.reduce_scatter(&input, &mut output, ReduceOp::Sum)
        .unwrap();
    assert!(same(&output, &input));
    let input = Tensor::randn([333], (Kind::Float, CUDA));
    let mut output = Tensor::zeros([333], (Kind::Float, CUDA));
    comm.all_gather(&input, &mut output).unwrap();
    assert!(same(&output, &input));
    let mut t = Tensor::randn([1000], (Kind::Float, CUDA));
    let copy = t.copy();
    comm.broadcast(&mut t, 0).unwrap();
    assert!(same(&t, &copy));
    // A mismatched size is refused before NCCL sees it.
    let mut short = Tensor::zeros([10], (Kind::Float, CUDA));
    assert!(comm.all_gather(&input, &mut short).is_err());
    // A host tensor is refused, and the communicator stays usable.
    let mut host = vec![Tensor::ones([4], (Kind::Float, Device::Cpu))];
    match comm.all_reduce(&mut host, ReduceOp::Sum) {
        Err(CollectiveError::UnsupportedTensor { .. }) => {}
        other => panic!("expected UnsupportedTensor, got {other:?}"),
    }
    let mut ok = vec![Tensor::ones([4], (Kind::Float, CUDA))];
    comm.all_reduce(&mut ok, ReduceOp::Sum).unwrap();
}

#[test]
fn an_aborted_generation_ends_the_communicator_at_once() {
    if !gpu_tests() {
        return;
    }
    let abort = Arc::new(AtomicBool::new(false));
    let mut comm = communicator(abort.clone());
    let mut t = vec![Tensor::ones([1 << 20], (Kind::Float, CUDA))];
    comm.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    abort.store(true, Ordering::Release);
    let started = Instant::now();
    let e = comm.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
    assert!(e.to_string().contains("aborted"), "{e}");
    let e = comm.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
    assert!(e.to_string().contains("aborted earlier"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(comm);
}

/// A small Llama written once on the CPU, so that both devices start from the same weights.
fn small_model(dir: &std::path::Path) {
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "initializer_range": 0.05
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    tch::manual_seed(5);
    let m = LoadedModel::load(dir, true, Device::Cpu).unwrap();
    let options = SaveOptions {
        dtype: DType::F32,
        max_shard_bytes: u64::MAX,
    };
    m.save_weights(dir, &options).unwrap();
}

/// Losses of 10 clipped AdamW steps on one fixed batch (which the model can learn: random
/// batches of random tokens have nothing to learn beyond their unigram loss), through the
/// trainer's update (`zero::Updater`: flat gradients, the collective, NCCL on CUDA, clipping,
/// AdamW at a ZeRO stage, a bf16 compute copy).
fn losses(dir: &std::path::Path, device: Device, bf16: bool, stage: Stage) -> Vec<f64> {
    let m = LoadedModel::load(dir, false, device).unwrap();
    let config = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let compute = bf16.then(|| ComputeCopy::new(&m, Kind::BFloat16));
    let mut updater = Updater::new(stage, m.named_parameters(), compute.as_ref(), config, 0, 1);
    let mut comm: Box<dyn Collective> = match device {
        Device::Cpu => Box::new(ferrotune_worker::collective::SingleProcess),
        _ => Box::new(communicator(Arc::default())),
    };
    tch::manual_seed(9);
    let ids = Tensor::randint(97, [4, 33], (Kind::Int64, Device::Cpu)).to_device(device);
    let (x, y) = (ids.narrow(1, 0, 32), ids.narrow(1, 1, 32));
    let mut out = Vec::new();
    for _ in 0..10 {
        let net = compute.as_ref().map_or(&m.model, |c| &c.model);
        let (loss_sum, count) = net.loss_sum(&x, &y);
        let value = loss_sum.double_value(&[]);
        out.push(value / count as f64);
        loss_sum.backward();
        let mut scalars = [value, count as f64, count as f64];
        updater
            .reduce_and_step(compute.as_ref(), &mut scalars, 1e-2, 0.5, comm.as_mut())
            .unwrap();
    }
    out
}

#[test]
fn a_tiny_fine_tune_on_cuda_tracks_the_same_steps_on_the_cpu() {
    if !gpu_tests() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    small_model(dir.path());
    let runs = [
        (false, Stage::Zero, 1e-4),
        (true, Stage::Zero, 2e-2),
        (false, Stage::Two, 1e-4),
        (true, Stage::One, 2e-2),
    ];
    for (bf16, stage, bound) in runs {
        let cpu = losses(dir.path(), Device::Cpu, bf16, stage);
        let cuda = losses(dir.path(), CUDA, bf16, stage);
        eprintln!("bf16={bf16} {stage:?}\n  cpu  {cpu:?}\n  cuda {cuda:?}");
        assert!(cpu[9] < cpu[0] * 0.9, "the CPU run learns: {cpu:?}");
        for (step, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
            let rel = (a - b).abs() / a.abs();
            assert!(
                rel <= bound,
                "bf16={bf16} {stage:?} step {step}: cpu {a} cuda {b} ({rel:.2e} > {bound:.0e})"
            );
        }
    }
}

#[test]
fn hugging_face_goldens_hold_on_cuda() {
    if !gpu_tests() {
        return;
    }
    let root = common::goldens().expect(
        "goldens: set FERROTUNE_GOLDENS to a carried goldens directory, or FERROTUNE_PYTHON to a Python with torch and transformers",
    );
    let mut failures = Vec::new();
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap().flatten() {
        let dir = entry.path();
        if !dir.join("case.json").is_file() {
            continue;
        }
        let golden = common::read_tensors(&dir.join("goldens.safetensors"));
        let g = |k: &str| golden[k].to_device(CUDA);
        let model = LoadedModel::load(&dir.join("model"), false, CUDA).unwrap();
        let (ids, labels) = (g("input_ids"), g("labels"));
        let logits = model.model.forward(&ids);
        let mut check = |what: String, err: f64, bound: f64| {
            if err.is_nan() || err > bound {
                failures.push(format!("{what}: {err:.3e} > {bound:.0e}"));
            }
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        check(
            format!("{name} logits"),
            common::rel_err(&logits, &g("logits")),
            1e-4,
        );
        let (sum, count) = model.model.loss_sum(&ids, &labels);
        let loss = sum / count as f64;
        check(
            format!("{name} loss"),
            common::rel_err(&loss, &g("loss")),
            1e-4,
        );
        loss.backward();
        for (p, t) in model.named_parameters() {
            let reference = g(&format!("grad.{p}"));
            check(
                format!("{name} grad {p}"),
                common::rel_err(&t.grad(), &reference),
                1e-3,
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 4,
        "only {checked} golden cases in {}",
        root.display()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn checkpoint_snapshots_of_gpu_tensors_land_in_pinned_host_memory() {
    if !gpu_tests() {
        return;
    }
    let t = Tensor::randn([257, 3], (Kind::Float, CUDA));
    let mut host = ferrotune_worker::device::host_buffer_like(&t);
    host.copy_(&t);
    assert_eq!(host.device(), Device::Cpu);
    assert!(same(&host, &t.to_device(Device::Cpu)));
}
