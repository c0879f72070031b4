//! `mixture-cursor`: the data cursor a run reaches after `--steps` optimizer steps, made by the
//! same `Mixture` the workers use (for the resume benchmark's synthesised late checkpoint).

use clap::Parser;
use ferrotune_data::mixture::Mixture;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    seed: u64,
    /// Training sequences per dataset, comma-separated.
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    #[arg(long, value_delimiter = ',')]
    weights: Vec<f64>,
    #[arg(long)]
    global_batch: usize,
    #[arg(long)]
    steps: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut mixture = Mixture::new(a.seed, &a.sizes, &a.weights)?;
    for _ in 0..a.steps {
        mixture.next_slots(a.global_batch);
    }
    println!("{}", serde_json::to_string(mixture.cursor())?);
    Ok(())
}
