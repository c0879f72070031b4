//! What the user sees while a job runs: a progress bar on a terminal, plain lines otherwise.
//! Per-step lines go to stdout in both cases so a log or a pipe keeps the loss curve.

use crate::job::{EvalMetrics, StepMetrics};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress {
    bar: Option<ProgressBar>,
    total_steps: u64,
    log_every: u64,
    pub eval_before: Option<f64>,
    pub eval_after: Option<f64>,
}

impl Progress {
    pub fn new(total_steps: u64, log_every: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} step {pos}/{len} {msg} ETA {eta}",
                )
                .expect("static template"),
            );
            bar
        });
        Progress {
            bar,
            total_steps,
            log_every: log_every.max(1),
            eval_before: None,
            eval_after: None,
        }
    }

    /// The job continues at step + 1 of `dir`.
    pub fn resumed(&self, step: u64, dir: &std::path::Path) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.reset_eta();
        }
        self.line(format!(
            "resuming from {} (step {step}/{})",
            dir.display(),
            self.total_steps
        ));
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    pub fn step(&mut self, m: &StepMetrics) {
        let per_s = |n: u64| {
            if m.step_seconds > 0.0 {
                n as f64 / m.step_seconds
            } else {
                0.0
            }
        };
        // Throughput counts every token read, as torchrun scripts do; with answer-only loss
        // masks fewer tokens are learned, and then those are shown too.
        let mut rate = format!("{:.0} tok/s", per_s(m.input_tokens));
        if m.tokens != m.input_tokens {
            rate += &format!(" ({:.0} learned/s)", per_s(m.tokens));
        }
        if let Some(bar) = &self.bar {
            bar.set_position(m.step);
            bar.set_message(format!("loss {:.4} | {rate}", m.loss));
        }
        if m.step.is_multiple_of(self.log_every) || m.step == self.total_steps {
            self.line(format!(
                "step {:>5}/{} | loss {:.4} | lr {:.3e} | grad_norm {:.3} | {rate}",
                m.step, self.total_steps, m.loss, m.lr, m.grad_norm
            ));
        }
    }

    pub fn eval(&mut self, m: &EvalMetrics) {
        match m.phase.as_str() {
            "before" => self.eval_before = Some(m.loss),
            "after" => self.eval_after = Some(m.loss),
            _ => {}
        }
        let label = match m.phase.as_str() {
            "before" => "before fine-tuning".to_string(),
            "after" => "after fine-tuning".to_string(),
            other => format!("at step {} ({other})", m.step),
        };
        self.line(format!(
            "held-out loss {label}: {:.4} ({} tokens)",
            m.loss, m.tokens
        ));
        // One line per dataset when there are several; one dataset's is the total above.
        if m.tasks.len() > 1 {
            for t in &m.tasks {
                self.line(format!("  {}: {:.4} ({} tokens)", t.name, t.loss, t.tokens));
            }
        }
    }

    pub fn message(&self, text: String) {
        self.line(text);
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
