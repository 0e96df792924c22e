//! Behaviour of the redb-backed store against the etcd v3 semantics in `drover_store`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_store::embedded::{EmbeddedStore, StoreOptions};
use drover_store::{Compare, KeyValue, Op, Store, StoreError, WatchEvent, WatchStream};
use tempfile::TempDir;
use tokio::time::timeout;

fn open_tmp() -> (TempDir, Arc<EmbeddedStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    (dir, store)
}

async fn next_event(rx: &mut WatchStream) -> WatchEvent {
    timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("watch event within 10s")
        .expect("watch stream open")
        .expect("watch event, not an error")
}

fn put_op(key: &str, value: &str) -> Op {
    Op::put(key, value.as_bytes().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_range_and_delete_round_trip() {
    let (_dir, store) = open_tmp();
    assert_eq!(store.get("a/1").await.unwrap(), None);

    store.put("a/2", b"two".to_vec(), None).await.unwrap();
    store.put("a/1", b"one".to_vec(), None).await.unwrap();
    let rev = store.put("b/1", b"other".to_vec(), None).await.unwrap();

    let kv = store.get("a/1").await.unwrap().unwrap();
    assert_eq!(kv.value, b"one");
    assert_eq!(kv.version, 1);
    assert_eq!(kv.lease, None);

    let (kvs, read_at) = store.range("a/").await.unwrap();
    assert_eq!(read_at, rev);
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["a/1", "a/2"]);
    assert_eq!(store.range("").await.unwrap().0.len(), 3);

    assert!(store.delete("a/1").await.unwrap());
    assert_eq!(store.get("a/1").await.unwrap(), None);
    assert_eq!(store.range("a/").await.unwrap().0.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_txn_bumps_the_revision_by_exactly_one() {
    let (_dir, store) = open_tmp();
    assert_eq!(store.revision().await.unwrap(), 1, "an empty store is at revision 1 like etcd");

    assert_eq!(store.put("k", b"1".to_vec(), None).await.unwrap(), 2);
    assert_eq!(store.put("k", b"2".to_vec(), None).await.unwrap(), 3);
    let kv = store.get("k").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));

    let resp = store.txn(vec![], vec![put_op("x", "1"), put_op("y", "1"), Op::delete("k")], vec![]).await.unwrap();
    assert!(resp.succeeded);
    assert_eq!(resp.revision, 4);
    assert_eq!(store.get("x").await.unwrap().unwrap().mod_revision, 4);
    assert_eq!(store.get("y").await.unwrap().unwrap().mod_revision, 4);
    assert_eq!(store.revision().await.unwrap(), 4);

    // Recreating a deleted key starts a new generation.
    store.put("k", b"3".to_vec(), None).await.unwrap();
    let kv = store.get("k").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (5, 5, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_change_nothing_do_not_bump_the_revision() {
    let (_dir, store) = open_tmp();
    store.put("k", b"1".to_vec(), None).await.unwrap();
    assert!(!store.delete("missing").await.unwrap());
    assert_eq!(store.revision().await.unwrap(), 2);

    let resp = store.txn(vec![Compare::Missing("k".into())], vec![put_op("k", "2")], vec![]).await.unwrap();
    assert!(!resp.succeeded);
    assert_eq!(resp.revision, 2);

    let resp = store.txn(vec![], vec![Op::DeletePrefix { prefix: "nothing/".into() }], vec![]).await.unwrap();
    assert_eq!(resp.revision, 2);
    assert_eq!(store.revision().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_with_holding_compares_runs_success_branch() {
    let (_dir, store) = open_tmp();
    let rev = store.put("lock", b"me".to_vec(), None).await.unwrap();

    let resp = store
        .txn(
            vec![
                Compare::ModRevision("lock".into(), rev),
                Compare::Value("lock".into(), b"me".to_vec()),
                Compare::Exists("lock".into()),
                Compare::Missing("other".into()),
                Compare::ModRevision("other".into(), 0),
            ],
            vec![put_op("lock", "you")],
            vec![put_op("failed", "1")],
        )
        .await
        .unwrap();
    assert!(resp.succeeded);
    assert_eq!(resp.revision, rev + 1);
    assert_eq!(store.get("lock").await.unwrap().unwrap().value, b"you");
    assert_eq!(store.get("failed").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_with_failed_compare_runs_failure_branch() {
    let (_dir, store) = open_tmp();
    let rev = store.put("lock", b"me".to_vec(), None).await.unwrap();
    store.put("lock", b"someone else".to_vec(), None).await.unwrap();

    for stale in [
        Compare::ModRevision("lock".into(), rev),
        Compare::Value("lock".into(), b"me".to_vec()),
        Compare::Missing("lock".into()),
        Compare::Exists("nobody".into()),
        Compare::Value("nobody".into(), vec![]),
    ] {
        let before = store.revision().await.unwrap();
        let resp = store
            .txn(vec![stale.clone()], vec![put_op("lock", "me again")], vec![put_op("lost", &before.to_string())])
            .await
            .unwrap();
        assert!(!resp.succeeded, "{stale:?} should fail");
        assert_eq!(resp.revision, before + 1);
        assert_eq!(store.get("lock").await.unwrap().unwrap().value, b"someone else");
        assert_eq!(store.get("lost").await.unwrap().unwrap().value, before.to_string().as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_prefix_removes_every_key_under_it_in_one_revision() {
    let (_dir, store) = open_tmp();
    for key in ["jobs/a", "jobs/b", "jobs/c", "jobsx", "other"] {
        store.put(key, b"v".to_vec(), None).await.unwrap();
    }
    let mut rx = store.watch("", 0).await.unwrap();
    let resp = store.txn(vec![], vec![Op::DeletePrefix { prefix: "jobs/".into() }], vec![]).await.unwrap();
    let keys: Vec<String> = store.range("").await.unwrap().0.into_iter().map(|kv| kv.key).collect();
    assert_eq!(keys, ["jobsx", "other"]);
    for key in ["jobs/a", "jobs/b", "jobs/c"] {
        assert_eq!(next_event(&mut rx).await, WatchEvent::Delete { key: key.into(), mod_revision: resp.revision });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_get_distinct_consecutive_revisions() {
    let (_dir, store) = open_tmp();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let store = Arc::clone(&store);
        tasks.spawn(async move { store.put(&format!("k/{i}"), vec![1], None).await.unwrap() });
    }
    let mut revisions: Vec<i64> = tasks.join_all().await;
    revisions.sort_unstable();
    assert_eq!(revisions, (2..302).collect::<Vec<_>>());
    assert_eq!(store.revision().await.unwrap(), 301);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_zero_only_sees_future_events() {
    let (_dir, store) = open_tmp();
    store.put("a", b"old".to_vec(), None).await.unwrap();
    let mut rx = store.watch("", 0).await.unwrap();
    let rev = store.put("a", b"new".to_vec(), None).await.unwrap();
    match next_event(&mut rx).await {
        WatchEvent::Put(kv) => assert_eq!((kv.value, kv.mod_revision, kv.version), (b"new".to_vec(), rev, 2)),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_only_delivers_keys_under_its_prefix() {
    let (_dir, store) = open_tmp();
    let mut rx = store.watch("nodes/", 0).await.unwrap();
    store.put("jobs/1", b"x".to_vec(), None).await.unwrap();
    store.put("nodes/a", b"x".to_vec(), None).await.unwrap();
    store.put("nodesx", b"x".to_vec(), None).await.unwrap();
    store.delete("jobs/1").await.unwrap();
    store.delete("nodes/a").await.unwrap();

    assert_eq!(next_event(&mut rx).await.key(), "nodes/a");
    match next_event(&mut rx).await {
        WatchEvent::Delete { key, .. } => assert_eq!(key, "nodes/a"),
        other => panic!("unexpected {other:?}"),
    }
    // Nothing else is queued.
    store.put("nodes/end", b"x".to_vec(), None).await.unwrap();
    assert_eq!(next_event(&mut rx).await.key(), "nodes/end");

    // Replays filter by prefix too.
    let mut replay = store.watch("nodes/", 2).await.unwrap();
    let keys: Vec<String> =
        [next_event(&mut replay).await, next_event(&mut replay).await, next_event(&mut replay).await]
            .iter()
            .map(|e| e.key().to_owned())
            .collect();
    assert_eq!(keys, ["nodes/a", "nodes/a", "nodes/end"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replays_from_a_past_revision_then_streams_live_without_gaps() {
    let (_dir, store) = open_tmp();
    for i in 0..600 {
        store.put(&format!("k/{}", i % 7), i.to_string().into_bytes(), None).await.unwrap();
    }
    // Writers keep going while the watch replays and switches to live.
    let writer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut last = 0;
            for i in 0..400 {
                last = store.put(&format!("k/{}", i % 5), b"live".to_vec(), None).await.unwrap();
            }
            last
        })
    };
    let from = 5;
    let mut rx = store.watch("k/", from).await.unwrap();
    let last = writer.await.unwrap();

    let mut expected = from;
    while expected <= last {
        let event = next_event(&mut rx).await;
        assert_eq!(event.revision(), expected, "revisions must be contiguous");
        expected += 1;
    }
    assert!(rx.try_recv().is_err(), "no duplicates after the last write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_compacted_revision_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_with(
        &dir.path().join("s.redb"),
        StoreOptions { history_revisions: 10, ..StoreOptions::default() },
    )
    .unwrap();
    for i in 0..100 {
        store.put("k", vec![i], None).await.unwrap();
    }
    let current = store.revision().await.unwrap();
    match store.watch("", 2).await {
        Err(StoreError::Compacted { requested: 2, compact_revision }) => {
            assert!(compact_revision > 2 && compact_revision <= current - 9, "compact at {compact_revision}");
        }
        other => panic!("expected Compacted, got {:?}", other.map(|_| ())),
    }

    // The last `history_revisions` revisions are still replayable.
    let from = current - 9;
    let mut rx = store.watch("", from).await.unwrap();
    for rev in from..=current {
        assert_eq!(next_event(&mut rx).await.revision(), rev);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_bounded_in_bytes_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let opts = StoreOptions { history_revisions: 100_000, history_max_bytes: 20_000 };
    let store = EmbeddedStore::open_with(&path, opts.clone()).unwrap();
    for i in 0..200u32 {
        store.put(&format!("k{}", i % 7), vec![i as u8; 1000], None).await.unwrap();
    }
    let current = store.revision().await.unwrap();
    // About 20 revisions of 1 KB fit the budget; the oldest are gone.
    assert!(matches!(store.watch("", 2).await, Err(StoreError::Compacted { .. })));
    let mut rx = store.watch("", current - 10).await.expect("recent history is kept");
    for rev in current - 10..=current {
        assert_eq!(next_event(&mut rx).await.revision(), rev);
    }
    drop(rx);
    drop(store);
    // The budget is enforced from what is on disk after a reopen, too.
    let store = EmbeddedStore::open_with(&path, opts).unwrap();
    for i in 0..50u32 {
        store.put("again", vec![i as u8; 1000], None).await.unwrap();
    }
    let current = store.revision().await.unwrap();
    match store.watch("", current - 40).await {
        Err(StoreError::Compacted { compact_revision, .. }) => assert!(compact_revision > current - 40),
        other => panic!("expected Compacted, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_deletes_its_keys_with_delete_events() {
    let (_dir, store) = open_tmp();
    let started = Instant::now();
    let lease = store.lease_grant(1).await.unwrap();
    store.put("agents/a", b"up".to_vec(), Some(lease)).await.unwrap();
    store.put("agents/plain", b"up".to_vec(), None).await.unwrap();
    assert_eq!(store.get("agents/a").await.unwrap().unwrap().lease, Some(lease));
    let mut rx = store.watch("agents/", 0).await.unwrap();

    let event = timeout(Duration::from_secs(4), rx.recv()).await.expect("expiry within 4s").unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1), "expired before its TTL");
    assert!(matches!(&event, WatchEvent::Delete { key, .. } if key == "agents/a"), "{event:?}");
    assert_eq!(store.get("agents/a").await.unwrap(), None);
    assert!(store.get("agents/plain").await.unwrap().is_some());

    assert!(matches!(store.lease_keepalive(lease).await, Err(StoreError::LeaseNotFound(id)) if id == lease));
    assert!(matches!(
        store.put("agents/a", vec![], Some(lease)).await,
        Err(StoreError::LeaseNotFound(id)) if id == lease
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_keeps_a_leased_key_alive() {
    let (_dir, store) = open_tmp();
    let lease = store.lease_grant(1).await.unwrap();
    store.put("agents/a", b"up".to_vec(), Some(lease)).await.unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(store.lease_keepalive(lease).await.unwrap(), 1);
    }
    assert!(store.get("agents/a").await.unwrap().is_some(), "kept alive for 2.5s on a 1s TTL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_deletes_the_leases_keys_now() {
    let (_dir, store) = open_tmp();
    let lease = store.lease_grant(60).await.unwrap();
    store.put("a", b"1".to_vec(), Some(lease)).await.unwrap();
    store.put("b", b"1".to_vec(), Some(lease)).await.unwrap();
    // A put without a lease detaches the key, like etcd.
    store.put("b", b"2".to_vec(), None).await.unwrap();
    let before = store.revision().await.unwrap();

    store.lease_revoke(lease).await.unwrap();
    assert_eq!(store.get("a").await.unwrap(), None);
    assert_eq!(store.get("b").await.unwrap().unwrap().value, b"2");
    assert_eq!(store.revision().await.unwrap(), before + 1);
    assert!(matches!(store.lease_revoke(lease).await, Err(StoreError::LeaseNotFound(_))));
    assert!(matches!(store.lease_keepalive(lease).await, Err(StoreError::LeaseNotFound(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_with_an_unknown_lease_is_rejected_and_writes_nothing() {
    let (_dir, store) = open_tmp();
    let before = store.revision().await.unwrap();
    let err = store
        .txn(vec![], vec![put_op("a", "1"), Op::Put { key: "b".into(), value: vec![], lease: Some(999) }], vec![])
        .await;
    assert!(matches!(err, Err(StoreError::LeaseNotFound(999))));
    assert_eq!(store.get("a").await.unwrap(), None);
    assert_eq!(store.revision().await.unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_keeps_keys_revision_history_and_leases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let (lease, revision, kv) = {
        let store = EmbeddedStore::open(&path).unwrap();
        store.put("plain", b"p".to_vec(), None).await.unwrap();
        let lease = store.lease_grant(60).await.unwrap();
        store.put("leased", b"l".to_vec(), Some(lease)).await.unwrap();
        let kv = store.get("leased").await.unwrap().unwrap();
        (lease, store.revision().await.unwrap(), kv)
    };

    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.revision().await.unwrap(), revision);
    assert_eq!(store.get("leased").await.unwrap(), Some(kv));
    assert_eq!(store.get("plain").await.unwrap().unwrap().value, b"p");
    assert_eq!(store.lease_keepalive(lease).await.unwrap(), 60);

    let mut rx = store.watch("", 2).await.unwrap();
    assert_eq!(next_event(&mut rx).await.key(), "plain");
    assert_eq!(next_event(&mut rx).await.key(), "leased");

    let next_lease = store.lease_grant(5).await.unwrap();
    assert_ne!(next_lease, lease, "lease ids are not reused after reopen");
    store.lease_revoke(lease).await.unwrap();
    assert_eq!(store.get("leased").await.unwrap(), None);
    assert_eq!(store.put("after", vec![], None).await.unwrap(), revision + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_with_5000_puts_commits_as_one_revision_and_is_visible() {
    let (_dir, store) = open_tmp();
    let lease = store.lease_grant(60).await.unwrap();
    let ops: Vec<Op> = (0..5000)
        .map(|i| Op::Put { key: format!("bulk/{i:05}"), value: vec![7; 100], lease: (i % 2 == 0).then_some(lease) })
        .collect();
    let before = store.revision().await.unwrap();
    let started = Instant::now();
    let resp = store.txn(vec![], ops, vec![]).await.unwrap();
    println!("5000-op txn committed in {:?}", started.elapsed());
    assert_eq!(resp.revision, before + 1);

    let (kvs, rev) = store.range("bulk/").await.unwrap();
    assert_eq!(rev, resp.revision);
    assert_eq!(kvs.len(), 5000);
    assert!(kvs.iter().all(|kv: &KeyValue| kv.mod_revision == resp.revision && kv.version == 1));

    store.lease_revoke(lease).await.unwrap();
    assert_eq!(store.range("bulk/").await.unwrap().0.len(), 2500);
    assert_eq!(store.revision().await.unwrap(), resp.revision + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_watcher_does_not_block_puts_and_is_cut_off_as_lagged() {
    let (_dir, store) = open_tmp();
    let mut slow = store.watch("", 0).await.unwrap();

    let puts = 6000;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            for i in (worker..puts).step_by(16) {
                store.put(&format!("k/{i}"), vec![0; 16], None).await.unwrap();
            }
        });
    }
    timeout(Duration::from_secs(120), tasks.join_all()).await.expect("puts must not block on the watcher");
    println!("{puts} puts from 16 tasks in {:?}", started.elapsed());
    assert_eq!(store.revision().await.unwrap(), 1 + puts as i64);

    let mut delivered = 0;
    loop {
        match slow.recv().await {
            Some(Ok(_)) => delivered += 1,
            Some(Err(StoreError::WatchLagged)) => break,
            other => panic!("expected WatchLagged, got {other:?}"),
        }
    }
    assert!(delivered > 0 && delivered < puts);
    assert!(slow.recv().await.is_none(), "a lagged watcher is dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_store_ends_watch_streams() {
    let (_dir, store) = open_tmp();
    let mut rx = store.watch("", 0).await.unwrap();
    drop(store);
    assert!(timeout(Duration::from_secs(5), rx.recv()).await.unwrap().is_none());
}
