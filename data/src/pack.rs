//! Sequence building: encoded samples → fixed-length training sequences.
//!
//! A sample of n tokens occupies n − 1 input positions (its inputs are tokens[..n−1], its labels
//! tokens[1..]), so a packed sequence holds whole samples whose input lengths sum to at most
//! `seq_len`, and each sample's loss in a packed sequence is exactly its loss alone (the model
//! gets per-sample positions and a block-diagonal causal mask). Without packing every sample is a
//! sequence of its own, padded.
//!
//! Over-long samples: text documents are split into consecutive windows that share one token
//! (every token is still predicted exactly once: continued pre-training loses nothing); other
//! samples are truncated (keeping the start) or dropped, as configured. A truncated sample with
//! no learned token left is dropped.

use crate::encode::Encoded;
use crate::DataError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    Truncate,
    Drop,
}

impl Overlong {
    pub fn from_name(name: &str) -> Option<Overlong> {
        match name {
            "truncate" => Some(Overlong::Truncate),
            "drop" => Some(Overlong::Drop),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Overlong::Truncate => "truncate",
            Overlong::Drop => "drop",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PackOptions {
    pub seq_len: usize,
    pub packing: bool,
    pub overlong: Overlong,
}

/// Where built sequences go: the token cache, or nowhere (validation only).
pub trait SequenceSink {
    fn sample(&mut self, tokens: &[u32], targets: &[bool]) -> Result<(), DataError>;
    fn end_sequence(&mut self) -> Result<(), DataError>;
}

/// Counts sequences and discards them.
#[derive(Default)]
pub struct NullSink;

impl SequenceSink for NullSink {
    fn sample(&mut self, _: &[u32], _: &[bool]) -> Result<(), DataError> {
        Ok(())
    }
    fn end_sequence(&mut self) -> Result<(), DataError> {
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackStats {
    /// Samples (or windows of split documents) placed into sequences.
    pub placed: u64,
    pub sequences: u64,
    pub truncated: u64,
    pub dropped: u64,
    /// Text documents longer than a sequence, split into windows.
    pub split: u64,
    /// Input positions holding real tokens, and how many of those have a learned label.
    pub tokens: u64,
    pub target_tokens: u64,
    pub padding: u64,
}

/// What happened to one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    Whole,
    Split,
    Truncated,
    Dropped,
}

pub struct Packer {
    options: PackOptions,
    /// Input positions used by the sequence being filled.
    open: usize,
    pub stats: PackStats,
}

impl Packer {
    pub fn new(options: PackOptions) -> Self {
        Packer {
            options,
            open: 0,
            stats: PackStats::default(),
        }
    }

    fn close(&mut self, sink: &mut dyn SequenceSink) -> Result<(), DataError> {
        if self.open > 0 {
            sink.end_sequence()?;
            self.stats.sequences += 1;
            self.stats.padding += (self.options.seq_len - self.open) as u64;
            self.open = 0;
        }
        Ok(())
    }

    fn place(
        &mut self,
        tokens: &[u32],
        targets: &[bool],
        sink: &mut dyn SequenceSink,
    ) -> Result<(), DataError> {
        let inputs = tokens.len() - 1;
        if !self.options.packing || self.open + inputs > self.options.seq_len {
            self.close(sink)?;
        }
        sink.sample(tokens, targets)?;
        self.open += inputs;
        self.stats.placed += 1;
        self.stats.tokens += inputs as u64;
        self.stats.target_tokens += targets[1..].iter().filter(|&&t| t).count() as u64;
        if !self.options.packing {
            self.close(sink)?;
        }
        Ok(())
    }

    /// Places one sample; `splittable` for text documents.
    pub fn add(
        &mut self,
        sample: &Encoded,
        splittable: bool,
        sink: &mut dyn SequenceSink,
    ) -> Result<Placed, DataError> {
        let (tokens, targets) = (&sample.tokens, &sample.targets);
        let n = tokens.len();
        let limit = self.options.seq_len + 1;
        if n < 2 || sample.target_count() == 0 {
            self.stats.dropped += 1;
            return Ok(Placed::Dropped);
        }
        if n <= limit {
            self.place(tokens, targets, sink)?;
            return Ok(Placed::Whole);
        }
        if splittable {
            let mut start = 0;
            while start + 1 < n {
                let end = (start + limit).min(n);
                self.place(&tokens[start..end], &targets[start..end], sink)?;
                start = end - 1;
            }
            self.stats.split += 1;
            return Ok(Placed::Split);
        }
        if self.options.overlong == Overlong::Truncate && targets[1..limit].iter().any(|&t| t) {
            self.place(&tokens[..limit], &targets[..limit], sink)?;
            self.stats.truncated += 1;
            Ok(Placed::Truncated)
        } else {
            self.stats.dropped += 1;
            Ok(Placed::Dropped)
        }
    }

    pub fn finish(&mut self, sink: &mut dyn SequenceSink) -> Result<(), DataError> {
        self.close(sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what it is given: sequences as lists of samples' tokens.
    #[derive(Default)]
    struct Recorder {
        done: Vec<Vec<Vec<u32>>>,
        open: Vec<Vec<u32>>,
    }

    impl SequenceSink for Recorder {
        fn sample(&mut self, tokens: &[u32], _: &[bool]) -> Result<(), DataError> {
            self.open.push(tokens.to_vec());
            Ok(())
        }
        fn end_sequence(&mut self) -> Result<(), DataError> {
            self.done.push(std::mem::take(&mut self.open));
            Ok(())
        }
    }

    fn sample(n: u32, learned_from: usize) -> Encoded {
        Encoded {
            tokens: (0..n).collect(),
            targets: (0..n as usize).map(|i| i >= learned_from).collect(),
        }
    }

    fn run(options: PackOptions, samples: &[(Encoded, bool)]) -> (Recorder, PackStats) {
        let mut packer = Packer::new(options);
        let mut sink = Recorder::default();
        for (s, split) in samples {
            packer.add(s, *split, &mut sink).unwrap();
        }
        packer.finish(&mut sink).unwrap();
        (sink, packer.stats)
    }

    #[test]
    fn packing_fills_sequences_with_whole_samples_in_order() {
        let opts = PackOptions {
            seq_len: 8,
            packing: true,
            overlong: Overlong::Truncate,
        };
        // Input lengths 4, 3, 2 → [4+3], [2]: 4+3+2 = 9 > 8.
        let (sink, stats) = run(
            opts,
            &[
                (sample(5, 0), false),
                (sample(4, 0), false),
                (sample(3, 0), false),
            ],
        );
        let lens: Vec<Vec<usize>> = sink
            .done
            .iter()
            .map(|s| s.iter().map(Vec::len).collect())
            .collect();
        assert_eq!(lens, [vec![5, 4], vec![3]]);
        assert_eq!(stats.sequences, 2);
        assert_eq!(stats.padding, (8 - 7) + (8 - 2));
        assert_eq!(stats.tokens, 9);
    }

    #[test]
    fn without_packing_each_sample_is_a_sequence() {
        let opts = PackOptions {
            seq_len: 8,
            packing: false,
            overlong: Overlong::Truncate,
        };
        let (sink, stats) = run(opts, &[(sample(3, 0), false), (sample(3, 0), false)]);
        assert_eq!(sink.done.len(), 2);
        assert_eq!(stats.padding, 12);
    }

    #[test]
    fn overlong_samples_are_split_truncated_or_dropped() {
        let truncate = PackOptions {
            seq_len: 4,
            packing: true,
            overlong: Overlong::Truncate,
        };
        // A 10-token document → windows of 5 sharing one token: [0..5], [4..9], [8..10].
        let (sink, stats) = run(truncate, &[(sample(10, 0), true)]);
        let all: Vec<Vec<u32>> = sink.done.into_iter().flatten().collect();
        assert_eq!(all, [vec![0, 1, 2, 3, 4], vec![4, 5, 6, 7, 8], vec![8, 9]]);
        assert_eq!((stats.split, stats.tokens), (1, 9));

        let (sink, stats) = run(truncate, &[(sample(10, 2), false)]);
        assert_eq!(sink.done, [vec![vec![0, 1, 2, 3, 4]]]);
        assert_eq!(stats.truncated, 1);
        // Nothing learned survives truncation: dropped, not trained on as an empty sample.
        let (sink, stats) = run(truncate, &[(sample(10, 7), false)]);
        assert!(sink.done.is_empty());
        assert_eq!(stats.dropped, 1);

        let drop = PackOptions {
            overlong: Overlong::Drop,
            ..truncate
        };
        let (sink, stats) = run(drop, &[(sample(10, 0), false), (sample(3, 0), false)]);
        assert_eq!(sink.done, [vec![vec![0, 1, 2]]]);
        assert_eq!(stats.dropped, 1);
    }
}
