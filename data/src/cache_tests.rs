use super::*;
use crate::pack::SequenceSink;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn fill(w: &mut CacheWriter, n: u32) -> Result<serde_json::Value, DataError> {
    for i in 0..n {
        w.sample(&[i, i + 1, i + 2], &[false, true, true])?;
        if i % 2 == 1 {
            w.end_sequence()?;
        }
    }
    if n % 2 == 1 {
        w.end_sequence()?;
    }
    Ok(serde_json::json!({"n": n}))
}

#[test]
fn a_built_cache_reads_back_what_was_written() {
    let root = tempfile::tempdir().unwrap();
    let (cache, outcome) = ensure(root.path(), "d", "abc", |w| fill(w, 5)).unwrap();
    assert_eq!(outcome, Outcome::Built);
    assert_eq!(cache.len(), 3);
    let seq = cache.sequence(1);
    assert_eq!(seq.len(), 2);
    assert_eq!(seq[0], (&[2u32, 3, 4][..], &[0u8, 1, 1][..]));
    assert_eq!(cache.sequence(2)[0].0, &[4, 5, 6]);
    assert_eq!(cache.meta.report["n"], 5);
    // Second time: opened, the builder is not called.
    let (_, outcome) = ensure(root.path(), "d", "abc", |_| panic!("must not rebuild")).unwrap();
    assert_eq!(outcome, Outcome::Opened);
}

#[test]
fn concurrent_callers_build_once_and_the_others_wait() {
    let root = Arc::new(tempfile::tempdir().unwrap());
    let builds = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (root, builds) = (root.clone(), builds.clone());
            std::thread::spawn(move || {
                let (cache, _) = ensure(root.path(), "d", "k1", |w| {
                    builds.fetch_add(1, Ordering::SeqCst);
                    // Slow enough that the others find the lock taken.
                    std::thread::sleep(Duration::from_millis(300));
                    fill(w, 4)
                })
                .unwrap();
                cache.sequence(1)[1].0.to_vec()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), [3, 4, 5]);
    }
    assert_eq!(builds.load(Ordering::SeqCst), 1);
}

#[test]
fn a_failed_or_abandoned_build_is_never_used() {
    let root = tempfile::tempdir().unwrap();
    let err = ensure(root.path(), "d", "k2", |w| {
        fill(w, 3)?;
        Err(DataError::Rejected("bad line".into()))
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("bad line"));
    let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
    assert!(left.is_empty(), "a failed build leaves nothing: {left:?}");

    // A crashed builder: its half-written tmp directory and a lock nobody touches any more.
    let tmp = root.path().join(".tmp-d-k3-999999");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("tokens.bin"), [1, 2, 3]).unwrap();
    let lock = root.path().join("d-k3.lock");
    std::fs::write(&lock, "pid 999999").unwrap();
    let old = SystemTime::now() - STALE_LOCK - Duration::from_secs(1);
    File::options()
        .write(true)
        .open(&lock)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let (cache, outcome) = ensure(root.path(), "d", "k3", |w| fill(w, 2)).unwrap();
    assert_eq!((outcome, cache.len()), (Outcome::Built, 1));
}

#[test]
fn a_damaged_cache_is_refused_with_a_message() {
    let root = tempfile::tempdir().unwrap();
    let (cache, _) = ensure(root.path(), "d", "k4", |w| fill(w, 2)).unwrap();
    let dir = cache.dir.clone();
    drop(cache);
    let tokens = dir.join("tokens.bin");
    let bytes = std::fs::read(&tokens).unwrap();
    std::fs::write(&tokens, &bytes[..bytes.len() - 4]).unwrap();
    let err = TokenCache::open(&dir).err().unwrap().to_string();
    assert!(
        err.contains("damaged") && err.contains("tokens.bin"),
        "{err}"
    );
}
