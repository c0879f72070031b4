use super::*;
use std::collections::HashSet;

#[test]
fn draws_follow_the_weights_within_binomial_error() {
    let weights = [3.0, 1.0, 0.5];
    let mut m = Mixture::new(11, &[50, 70, 9], &weights).unwrap();
    let n = 40_000;
    let mut counts = [0usize; 3];
    for s in m.next_slots(n) {
        counts[s.task] += 1;
    }
    let total: f64 = weights.iter().sum();
    for (i, &c) in counts.iter().enumerate() {
        let p = weights[i] / total;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        let dev = (c as f64 - n as f64 * p).abs();
        assert!(
            dev < 4.0 * sd,
            "task {i}: {c} draws, expected {} ± {sd:.1}",
            n as f64 * p
        );
    }
}

#[test]
fn the_order_is_a_function_of_the_seed() {
    let draw = |seed| {
        Mixture::new(seed, &[30, 20], &[1.0, 1.0])
            .unwrap()
            .next_slots(200)
    };
    assert_eq!(draw(5), draw(5));
    assert_ne!(draw(5), draw(6));
}

#[test]
fn each_dataset_is_visited_once_per_epoch() {
    let mut m = Mixture::new(3, &[7, 5], &[1.0, 1.0]).unwrap();
    let slots = m.next_slots(300);
    for task in 0..2 {
        let mine: Vec<usize> = slots
            .iter()
            .filter(|s| s.task == task)
            .map(|s| s.sequence)
            .collect();
        let n = [7, 5][task];
        for epoch in mine.chunks(n).filter(|c| c.len() == n) {
            let set: HashSet<_> = epoch.iter().collect();
            assert_eq!(
                set.len(),
                n,
                "task {task}: an epoch repeats a sequence: {epoch:?}"
            );
        }
    }
}

#[test]
fn resuming_continues_the_same_order_with_work_independent_of_the_step() {
    let (sizes, weights, seed, batch) = ([13, 29, 4], [1.0, 2.0, 0.5], 77, 6);
    let mut uninterrupted = Mixture::new(seed, &sizes, &weights).unwrap();
    let all = uninterrupted.next_slots(batch * 1200);
    let mut resume_work = Vec::new();
    let mut replay_work = 0;
    for k in [1usize, 10, 100, 1000] {
        let mut first = Mixture::new(seed, &sizes, &weights).unwrap();
        first.next_slots(batch * k);
        replay_work = first.work;
        // What a checkpoint stores, through JSON as trainer_state.json holds it.
        let saved = serde_json::to_string(first.cursor()).unwrap();
        let cursor: Cursor = serde_json::from_str(&saved).unwrap();
        let mut resumed = Mixture::resume(seed, &sizes, &weights, cursor).unwrap();
        let next = resumed.next_slots(batch);
        assert_eq!(next, all[batch * k..batch * (k + 1)], "step {k}");
        resume_work.push(resumed.work);
        let rest = resumed.next_slots(batch * (1200 - k - 1));
        assert_eq!(rest, all[batch * (k + 1)..], "after resuming at step {k}");
    }
    // Draws for one batch plus at most two permutations per dataset (one may roll over inside
    // the batch), at any step; replaying 1000 steps would cost far more, so the check can fail.
    let bound = (batch + 2 * sizes.iter().sum::<usize>()) as u64;
    assert!(
        resume_work.iter().all(|&w| w <= bound),
        "{resume_work:?} > {bound}"
    );
    assert!(replay_work > 10 * bound, "{replay_work}");
}

#[test]
fn ranks_take_disjoint_slices_matching_one_big_worker() {
    let (world, b, accum) = (3, 2, 2);
    let global: Vec<usize> = (0..world * b * accum).collect();
    let mut seen = HashSet::new();
    for m in 0..accum {
        for r in 0..world {
            for &i in rank_slice(&global, world, r, b, m) {
                assert!(seen.insert(i));
            }
        }
        let single: HashSet<usize> = rank_slice(&global, 1, 0, world * b, m)
            .iter()
            .copied()
            .collect();
        let ranks: HashSet<usize> = (0..world)
            .flat_map(|r| rank_slice(&global, world, r, b, m).to_vec())
            .collect();
        assert_eq!(single, ranks);
    }
    assert_eq!(seen.len(), global.len());
}

#[test]
fn bad_mixtures_are_errors() {
    assert!(Mixture::new(0, &[3, 0], &[1.0, 1.0]).is_err());
    assert!(Mixture::new(0, &[3], &[0.0]).is_err());
    assert!(Mixture::new(0, &[3, 4], &[1.0]).is_err());
}
