//! What this process holds in memory, for the coordinator's dashboard and for checking
//! `coordinator plan`'s estimate against reality.
//!
//! Figures come from the kernel (`/proc/self/status`): resident set now (`VmRSS`) and its
//! high-water mark (`VmHWM`). The baseline is the resident set just before the model is
//! loaded (the runtime, libtorch and the tokenizer, which the estimate does not count); the
//! high-water mark is reset once training is set up, so the transient of mapping the
//! safetensors files while copying them into tensors is not taken for the training peak.
//! On GPUs the same figures describe the host side only.

use std::sync::atomic::{AtomicU64, Ordering};

static BASELINE: AtomicU64 = AtomicU64::new(0);

/// One `/proc/self/status` field in bytes (the kernel writes them in kB); None off Linux.
fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status(&status, field)
}

fn parse_status(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Records the resident set as the baseline (called before the model is loaded).
pub fn mark_baseline() {
    BASELINE.store(status_bytes("VmRSS").unwrap_or(0), Ordering::Relaxed);
}

/// Starts the high-water mark afresh at the current resident set (Linux ≥ 4.0; elsewhere the
/// peak keeps counting from the process start, which only overstates it).
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// (baseline, peak) resident bytes; zeros where the kernel does not say.
pub fn usage() -> (u64, u64) {
    (
        BASELINE.load(Ordering::Relaxed),
        status_bytes("VmHWM").unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kernel_fields_in_bytes() {
        let status = "Name:\tworker\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n";
        assert_eq!(parse_status(status, "VmHWM"), Some(200 * 1024 * 1024));
        assert_eq!(parse_status(status, "VmRSS"), Some(100 * 1024 * 1024));
        assert_eq!(parse_status(status, "VmSwap"), None);
    }

    #[test]
    fn the_peak_follows_an_allocation_and_restarts_when_reset() {
        reset_peak();
        let (_, before) = usage();
        // Touch 64 MiB so it becomes resident.
        let block = vec![1u8; 64 << 20];
        let (_, after) = usage();
        assert!(block.iter().step_by(4096).all(|&b| b == 1));
        assert!(
            after >= before + (60 << 20),
            "peak {after} after touching 64 MiB from {before}"
        );
        drop(block);
        reset_peak();
        let (_, reset) = usage();
        assert!(reset < after, "reset peak {reset} below {after}");
    }
}
