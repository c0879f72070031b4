//! What workers report about training: a step's figures and a held-out evaluation. Plain data
//! that the job passes on to the progress display.

#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Learned (labelled) tokens.
    pub tokens: u64,
    /// Non-padding tokens read, prompts included.
    pub input_tokens: u64,
    pub step_seconds: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EvalMetrics {
    pub step: u64,
    pub phase: String,
    pub loss: f64,
    pub tokens: u64,
    /// Per dataset, in config order.
    pub tasks: Vec<TaskEval>,
}

/// Greedy answers of one rank to its share of the eval report's held-out prompts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sample {
    pub dataset: String,
    pub index: u32,
    pub prompt: String,
    pub answer: String,
    pub reference: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskEval {
    pub name: String,
    pub loss: f64,
    pub tokens: u64,
}
