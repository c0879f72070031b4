//! bf16 compute weights with fp32 masters (`model.precision: bf16`), on CPU: training tracks
//! fp32 training, the compute copy always equals the cast masters, and the masters keep
//! updates that bf16 weights alone would round away.

use ferrotune_worker::grads::FlatGrads;
use ferrotune_worker::model::io::LoadedModel;
use ferrotune_worker::optim::{AdamW, AdamWConfig};
use ferrotune_worker::precision::ComputeCopy;
use tch::{Device, Kind, Tensor};

const ADAM: AdamWConfig = AdamWConfig {
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 0.0,
};

fn model(dir: &std::path::Path) -> LoadedModel {
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "initializer_range": 0.05
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    tch::manual_seed(5);
    LoadedModel::load(dir, true, Device::Cpu).unwrap()
}

/// Losses of 30 AdamW steps on one fixed batch, in fp32 or through a bf16 compute copy.
fn train(bf16: bool) -> (Vec<f64>, LoadedModel, Option<ComputeCopy>) {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    tch::manual_seed(9);
    let ids = Tensor::randint(97, [4, 33], (Kind::Int64, Device::Cpu));
    let (x, y) = (ids.narrow(1, 0, 32), ids.narrow(1, 1, 32));
    let mut opt = AdamW::new(m.named_parameters(), ADAM);
    let compute = bf16.then(|| ComputeCopy::new(&m, Kind::BFloat16));
    let flat = FlatGrads::new(&opt.parameters());
    let mut losses = Vec::new();
    for _ in 0..30 {
        let net = compute.as_ref().map_or(&m.model, |c| &c.model);
        let (loss, count) = net.loss_sum(&x, &y);
        let loss = loss / count as f64;
        losses.push(loss.double_value(&[]));
        loss.backward();
        match &compute {
            Some(c) => {
                let grads = flat.upcast_from(c);
                assert!(grads.iter().all(|g| g.kind() == Kind::Float));
                opt.step_with(3e-3, &grads);
                c.sync();
            }
            None => opt.step(3e-3),
        }
        opt.zero_grad();
    }
    (losses, m, compute)
}

#[test]
fn bf16_compute_tracks_fp32_training_and_mirrors_the_masters() {
    let (fp32, _, _) = train(false);
    let (bf16, masters, compute) = train(true);
    let compute = compute.unwrap();
    assert!(
        (bf16[0] - fp32[0]).abs() / fp32[0] < 1e-2,
        "first loss {} vs {}",
        bf16[0],
        fp32[0]
    );
    let (a, b) = (fp32.last().unwrap(), bf16.last().unwrap());
    eprintln!("loss {} -> fp32 {a}, bf16 compute {b}", fp32[0]);
    assert!(*a < 0.5 * fp32[0], "fp32 training must learn: {fp32:?}");
    assert!(
        (a - b).abs() / a < 0.05,
        "after 30 steps: fp32 {a}, bf16 compute {b}\n{fp32:?}\n{bf16:?}"
    );
    // The masters stay fp32 (they are what checkpoints save); the copy is their exact cast.
    let copy = compute.model_parameters();
    for ((name, m), c) in masters.named_parameters().iter().zip(&copy) {
        assert_eq!(m.kind(), Kind::Float, "{name}");
        assert_eq!(c.kind(), Kind::BFloat16, "{name}");
        assert!(
            m.to_kind(Kind::BFloat16).equal(c),
            "{name}: copy is not the cast master"
        );
    }
}

#[test]
fn masters_keep_updates_that_bf16_weights_round_away() {
    // A normalised Adam step of lr = 1e-4 on weights of 1.0 is far below bf16's resolution there
    // (2^-7 = 0.0078 between 1.0 and the next value).
    let grad = Tensor::full([16], 0.5, (Kind::Float, Device::Cpu));
    let w32 = Tensor::ones([16], (Kind::Float, Device::Cpu));
    let w16 = Tensor::ones([16], (Kind::BFloat16, Device::Cpu));
    let mut opt32 = AdamW::new(vec![("w".into(), w32.shallow_clone())], ADAM);
    let mut opt16 = AdamW::new(vec![("w".into(), w16.shallow_clone())], ADAM);
    for _ in 0..100 {
        opt32.step_with(1e-4, std::slice::from_ref(&grad));
        opt16.step_with(1e-4, &[grad.to_kind(Kind::BFloat16)]);
    }
    let moved32 = (1.0 - w32.mean(Kind::Float).double_value(&[])).abs();
    let moved16 = (1.0 - w16.to_kind(Kind::Float).mean(Kind::Float).double_value(&[])).abs();
    assert!(moved32 > 5e-3, "fp32 masters moved {moved32}");
    assert_eq!(moved16, 0.0, "bf16 weights alone lose every update");
    // ...and the cast of the masters has moved too: the compute copy sees the progress.
    assert!(!w32.to_kind(Kind::BFloat16).equal(&w16));
}

/// The compute copy is made in bf16 and cast from the masters: nothing is drawn for it (a
/// random fp32 init first would cost a whole fp32 model more, briefly), and it equals the
/// cast masters from the start.
#[test]
fn the_compute_copy_is_cast_never_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    tch::manual_seed(11);
    let compute = ComputeCopy::new(&m, Kind::BFloat16);
    let after_copy = Tensor::randn([4], (Kind::Float, Device::Cpu));
    tch::manual_seed(11);
    let untouched = Tensor::randn([4], (Kind::Float, Device::Cpu));
    assert!(
        after_copy.equal(&untouched),
        "making the compute copy drew random numbers"
    );
    for ((_, master), copy) in m.named_parameters().iter().zip(compute.model_parameters()) {
        assert_eq!(copy.kind(), Kind::BFloat16);
        assert!(copy.equal(&master.to_kind(Kind::BFloat16)));
    }
}
