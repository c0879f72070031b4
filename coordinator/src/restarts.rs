//! The job's restart count, kept under `checkpoint.dir` so that a coordinator restarted with
//! `cluster.resume: auto` goes on counting where the last one stopped: `cluster.max_restarts`
//! bounds the job, not each coordinator.

use std::path::Path;

const FILE: &str = ".ferrotune-restarts";

/// The count recorded under `dir`; 0 when none is (or it cannot be read: a lost count
/// allows extra restarts, it never blocks a job).
pub fn read(dir: &Path) -> u32 {
    std::fs::read_to_string(dir.join(FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Records `count`, replacing the file atomically (a reader never sees half of it).
pub fn write(dir: &Path, count: u32) -> std::io::Result<()> {
    let tmp = dir.join(format!("{FILE}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, format!("{count}\n"))?;
    std::fs::rename(&tmp, dir.join(FILE))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_count_survives_a_new_reader_and_starts_at_zero() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(super::read(tmp.path()), 0);
        super::write(tmp.path(), 2).unwrap();
        super::write(tmp.path(), 3).unwrap();
        assert_eq!(super::read(tmp.path()), 3);
    }
}
