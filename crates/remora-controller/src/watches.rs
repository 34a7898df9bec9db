//! Published answers, one `watch` channel per key, shared by every stream that watches
//! the key and freed when the last of them leaves: what a key costs ends with its last
//! watcher, whatever the keys a client makes up.

use std::{collections::HashMap, hash::Hash, sync::Arc};

use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

/// The watched keys of one kind.
#[derive(Debug)]
pub struct Watches<K, V> {
    map: Mutex<HashMap<K, watch::Sender<V>>>,
    /// How many keys are watched now.
    gauge: Gauge,
}

impl<K: Eq + Hash + Clone, V> Watches<K, V> {
    pub fn new(gauge: Gauge) -> Arc<Self> {
        Arc::new(Self {
            map: Mutex::new(HashMap::new()),
            gauge,
        })
    }

    /// The current answer for `key` (made by `init` when nobody watches it yet), and
    /// every later one. `init` runs under this set's lock.
    pub fn subscribe(self: &Arc<Self>, key: K, init: impl FnOnce(&K) -> V) -> Watched<K, V> {
        let mut map = self.map.lock();
        let rx = match map.get(&key) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(init(&key));
                map.insert(key.clone(), tx);
                self.gauge.set(map.len() as i64);
                rx
            }
        };
        Watched {
            rx: Some(rx),
            key: Some(key),
            watches: self.clone(),
        }
    }

    /// Calls `f` with every watched key and its sender, under this set's lock.
    pub fn each(&self, mut f: impl FnMut(&K, &watch::Sender<V>)) {
        for (key, tx) in self.map.lock().iter() {
            f(key, tx);
        }
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn left(&self, key: &K) {
        let mut map = self.map.lock();
        if map.get(key).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(key);
            self.gauge.set(map.len() as i64);
        }
    }
}

/// One stream's view of a key. Dropping the last one frees the key.
#[derive(Debug)]
pub struct Watched<K: Eq + Hash + Clone, V> {
    rx: Option<watch::Receiver<V>>,
    key: Option<K>,
    watches: Arc<Watches<K, V>>,
}

impl<K: Eq + Hash + Clone, V> Watched<K, V> {
    pub fn rx(&mut self) -> &mut watch::Receiver<V> {
        self.rx.as_mut().expect("present until dropped")
    }
}

impl<K: Eq + Hash + Clone, V> Drop for Watched<K, V> {
    fn drop(&mut self) {
        // The receiver goes first, so the count the set checks no longer includes it.
        drop(self.rx.take());
        if let Some(key) = self.key.take() {
            self.watches.left(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_lives_as_long_as_its_watchers() {
        let gauge = Gauge::default();
        let w: Arc<Watches<u32, &str>> = Watches::new(gauge.clone());
        let mut inits = 0;
        let mut a = w.subscribe(1, |_| {
            inits += 1;
            "one"
        });
        let b = w.subscribe(1, |_| unreachable!("shared"));
        let c = w.subscribe(2, |_| "two");
        assert_eq!((w.len(), gauge.get(), inits), (2, 2, 1));
        w.each(|k, tx| {
            if *k == 1 {
                tx.send_replace("uno");
            }
        });
        assert_eq!(*a.rx().borrow_and_update(), "uno");
        drop(b);
        assert_eq!(w.len(), 2, "one watcher of key 1 remains");
        drop(a);
        drop(c);
        assert_eq!((w.len(), gauge.get()), (0, 0), "every key freed");
        // Many made-up keys, each watched once and left: nothing stays.
        for k in 0..10_000 {
            drop(w.subscribe(k, |_| "x"));
        }
        assert_eq!((w.len(), gauge.get()), (0, 0));
    }
}
