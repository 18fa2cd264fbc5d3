//! Topic tries of the embedded broker: subscriptions by filter, retained messages by topic.
//!
//! Routing a PUBLISH walks the filter trie along the topic's levels (exact child, `+` child,
//! `#` entries), so its cost depends on the topic's depth and the filters that match, not on
//! how many devices are subscribed. A subscription with a wildcard finds its retained
//! messages the same way in the retained trie. Empty nodes are pruned on removal, so a fleet
//! that comes and goes leaves nothing behind.
//!
//! Inserts, removals and matches recurse once per level of the topic or filter they are
//! given, so the broker bounds levels at the packet (`max_topic_levels`, at most
//! [`MAX_TOPIC_LEVELS`]); walks whose depth is the tree's own (collecting everything below a
//! `#`, dropping a subtree) use an explicit stack.

use std::collections::HashMap;
use std::hash::Hash;

/// The deepest topic or filter the broker lets into a trie.
pub const MAX_TOPIC_LEVELS: usize = 1024;

/// Subscriptions: filter -> subscribers of type `S`, keyed by `K` (the client id).
#[derive(Debug)]
pub struct FilterTrie<K, S> {
    root: FilterNode<K, S>,
    len: usize,
}

#[derive(Debug)]
struct FilterNode<K, S> {
    children: HashMap<Box<str>, FilterNode<K, S>>,
    plus: Option<Box<FilterNode<K, S>>>,
    /// Filters ending here (`a/b`).
    exact: Vec<(K, S)>,
    /// Filters ending here with `/#` (`a/b/#`, which also matches `a/b`).
    multi: Vec<(K, S)>,
}

impl<K, S> Default for FilterNode<K, S> {
    fn default() -> Self {
        Self {
            children: HashMap::new(),
            plus: None,
            exact: Vec::new(),
            multi: Vec::new(),
        }
    }
}

impl<K, S> FilterNode<K, S> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.multi.is_empty()
    }
}

impl<K: Eq + Hash + Clone, S> Default for FilterTrie<K, S> {
    fn default() -> Self {
        Self {
            root: FilterNode::default(),
            len: 0,
        }
    }
}

impl<K: Eq + Hash + Clone, S> FilterTrie<K, S> {
    /// Number of (filter, subscriber) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nobody subscribed to anything.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `key`'s subscription to `filter` (a valid filter); true if it is new.
    pub fn insert(&mut self, filter: &str, key: K, sub: S) -> bool {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        let mut list = None;
        while let Some(level) = levels.next() {
            if level == "#" {
                list = Some(&mut node.multi);
                break;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
            if levels.peek().is_none() {
                list = Some(&mut node.exact);
            }
        }
        let Some(list) = list else {
            return false;
        };
        match list.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => {
                entry.1 = sub;
                false
            }
            None => {
                list.push((key, sub));
                self.len += 1;
                true
            }
        }
    }

    /// Removes `key`'s subscription to `filter`; true if there was one.
    pub fn remove(&mut self, filter: &str, key: &K) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, key);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `f` with every subscriber whose filter matches `topic` (once per matching
    /// filter: a client with two matching filters is seen twice).
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&K, &S)) {
        let levels: Vec<&str> = topic.split('/').collect();
        // MQTT 3.1.1 §4.7.2: wildcards at the first level do not match `$` topics.
        let dollar = topic.starts_with('$');
        visit(&self.root, &levels, 0, dollar, &mut f);
    }
}

fn remove_at<K: Eq, S>(node: &mut FilterNode<K, S>, levels: &[&str], key: &K) -> bool {
    let Some((&level, rest)) = levels.split_first() else {
        return false;
    };
    if level == "#" {
        return take(&mut node.multi, key);
    }
    let child = if level == "+" {
        node.plus.as_deref_mut()
    } else {
        node.children.get_mut(level)
    };
    let Some(child) = child else {
        return false;
    };
    let removed = if rest.is_empty() {
        take(&mut child.exact, key)
    } else {
        remove_at(child, rest, key)
    };
    if child.is_empty() {
        if level == "+" {
            node.plus = None;
        } else {
            node.children.remove(level);
        }
    }
    removed
}

fn take<K: Eq, S>(list: &mut Vec<(K, S)>, key: &K) -> bool {
    match list.iter().position(|(k, _)| k == key) {
        Some(i) => {
            list.swap_remove(i);
            if list.is_empty() {
                // Give the memory back: most lists hold one device.
                *list = Vec::new();
            }
            true
        }
        None => false,
    }
}

fn visit<K, S>(
    node: &FilterNode<K, S>,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    f: &mut impl FnMut(&K, &S),
) {
    let wildcard_ok = !(dollar && depth == 0);
    if wildcard_ok {
        for (k, s) in &node.multi {
            f(k, s);
        }
    }
    let Some(level) = levels.get(depth) else {
        for (k, s) in &node.exact {
            f(k, s);
        }
        return;
    };
    if let Some(child) = node.children.get(*level) {
        visit(child, levels, depth + 1, dollar, f);
    }
    if wildcard_ok {
        if let Some(child) = node.plus.as_deref() {
            visit(child, levels, depth + 1, dollar, f);
        }
    }
}

/// Retained messages by topic.
#[derive(Debug)]
pub struct RetainedTrie<M> {
    root: RetainedNode<M>,
    len: usize,
}

#[derive(Debug)]
struct RetainedNode<M> {
    children: HashMap<Box<str>, RetainedNode<M>>,
    message: Option<M>,
}

impl<M> Default for RetainedNode<M> {
    fn default() -> Self {
        Self {
            children: HashMap::new(),
            message: None,
        }
    }
}

impl<M> Default for RetainedTrie<M> {
    fn default() -> Self {
        Self {
            root: RetainedNode::default(),
            len: 0,
        }
    }
}

impl<M: Clone> RetainedTrie<M> {
    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `message` for `topic`; returns the one it replaced.
    pub fn set(&mut self, topic: &str, message: M) -> Option<M> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let previous = node.message.replace(message);
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    /// The retained message of `topic`, if any.
    pub fn get(&self, topic: &str) -> Option<&M> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.message.as_ref()
    }

    /// Removes the retained message of `topic` and returns it.
    pub fn clear(&mut self, topic: &str) -> Option<M> {
        let levels: Vec<&str> = topic.split('/').collect();
        let cleared = clear_at(&mut self.root, &levels);
        if cleared.is_some() {
            self.len -= 1;
        }
        cleared
    }

    /// Every retained message whose topic matches `filter`.
    pub fn matching(&self, filter: &str) -> Vec<M> {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut out = Vec::new();
        collect(&self.root, &levels, 0, &mut out);
        out
    }
}

fn clear_at<M>(node: &mut RetainedNode<M>, levels: &[&str]) -> Option<M> {
    let Some((&level, rest)) = levels.split_first() else {
        return node.message.take();
    };
    let child = node.children.get_mut(level)?;
    let cleared = clear_at(child, rest);
    if child.message.is_none() && child.children.is_empty() {
        node.children.remove(level);
    }
    cleared
}

fn collect<M: Clone>(node: &RetainedNode<M>, filter: &[&str], depth: usize, out: &mut Vec<M>) {
    let Some(level) = filter.get(depth) else {
        out.extend(node.message.iter().cloned());
        return;
    };
    match *level {
        "#" => {
            // `a/#` matches `a` itself and everything below it.
            if depth > 0 {
                out.extend(node.message.iter().cloned());
            }
            for (name, child) in &node.children {
                if depth == 0 && name.starts_with('$') {
                    continue;
                }
                all_below(child, out);
            }
        }
        "+" => {
            for (name, child) in &node.children {
                if depth == 0 && name.starts_with('$') {
                    continue;
                }
                collect(child, filter, depth + 1, out);
            }
        }
        literal => {
            if let Some(child) = node.children.get(literal) {
                collect(child, filter, depth + 1, out);
            }
        }
    }
}

/// Every message at or below `node`; iterative, since the retained tree may be as deep as
/// the deepest topic anyone retained.
fn all_below<M: Clone>(node: &RetainedNode<M>, out: &mut Vec<M>) {
    let mut stack = vec![node];
    while let Some(node) = stack.pop() {
        out.extend(node.message.iter().cloned());
        stack.extend(node.children.values());
    }
}

// Dropping a tree node by node would recurse once per level; these drops take the subtree
// apart with an explicit stack instead, so no tree depth can overflow the thread's stack.
impl<M> Drop for RetainedNode<M> {
    fn drop(&mut self) {
        let mut stack: Vec<RetainedNode<M>> = self.children.drain().map(|(_, c)| c).collect();
        while let Some(mut node) = stack.pop() {
            stack.extend(node.children.drain().map(|(_, c)| c));
        }
    }
}

impl<K, S> Drop for FilterNode<K, S> {
    fn drop(&mut self) {
        let mut stack: Vec<FilterNode<K, S>> = self.children.drain().map(|(_, c)| c).collect();
        stack.extend(self.plus.take().map(|b| *b));
        while let Some(mut node) = stack.pop() {
            stack.extend(node.children.drain().map(|(_, c)| c));
            stack.extend(node.plus.take().map(|b| *b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::wire::topic_matches;

    fn matches(trie: &FilterTrie<String, u8>, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        trie.for_each_match(topic, |k, _| out.push(k.clone()));
        out.sort();
        out
    }

    const FILTERS: &[&str] = &[
        "a/b", "a/+", "a/#", "#", "+", "+/b", "a/+/c", "a/b/#", "$SYS/#", "$SYS/+", "+/+", "a//b",
        "/#", "+/",
    ];
    const TOPICS: &[&str] = &[
        "a",
        "a/b",
        "a/c",
        "a/b/c",
        "a/x/c",
        "b",
        "$SYS/load",
        "$SYS",
        "a//b",
        "/a",
        "a/",
        "",
    ];

    #[test]
    fn the_trie_agrees_with_the_reference_matcher() {
        let mut trie = FilterTrie::default();
        for f in FILTERS {
            assert!(trie.insert(f, f.to_string(), 1));
        }
        for t in TOPICS {
            let mut want: Vec<String> = FILTERS
                .iter()
                .filter(|f| topic_matches(t, f))
                .map(|f| f.to_string())
                .collect();
            want.sort();
            assert_eq!(matches(&trie, t), want, "topic {t:?}");
        }
    }

    #[test]
    fn removal_prunes_every_node() {
        let mut trie = FilterTrie::default();
        for f in FILTERS {
            trie.insert(f, "c1".to_string(), 0);
            trie.insert(f, "c2".to_string(), 1);
        }
        assert!(
            !trie.insert("a/b", "c1".to_string(), 1),
            "replacing is not new"
        );
        assert_eq!(trie.len(), FILTERS.len() * 2);
        for f in FILTERS {
            assert!(trie.remove(f, &"c1".to_string()));
            assert!(!trie.remove(f, &"c1".to_string()));
        }
        let want = FILTERS.iter().filter(|f| topic_matches("a/b", f)).count();
        assert_eq!(matches(&trie, "a/b"), vec!["c2".to_string(); want]);
        for f in FILTERS {
            assert!(trie.remove(f, &"c2".to_string()));
        }
        assert!(trie.is_empty());
        assert!(
            trie.root.is_empty(),
            "{:?}",
            trie.root.children.keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn very_deep_trees_are_walked_and_dropped_without_recursion() {
        // Deeper than any stack would survive one frame per level.
        let mut retained = RetainedTrie::default();
        let mut node = &mut retained.root;
        for _ in 0..200_000 {
            node = node.children.entry("a".into()).or_default();
        }
        node.message = Some(1u8);
        retained.len = 1;
        assert_eq!(retained.matching("#"), vec![1]);
        drop(retained);

        let mut filters: FilterTrie<String, u8> = FilterTrie::default();
        let mut node = &mut filters.root;
        for _ in 0..200_000 {
            node = node.plus.get_or_insert_with(Default::default);
        }
        drop(filters);
    }

    #[test]
    fn retained_messages_are_found_by_filter() {
        let mut r = RetainedTrie::default();
        for t in TOPICS {
            r.set(t, t.to_string());
        }
        assert_eq!(r.len(), TOPICS.len());
        for f in FILTERS {
            let mut got = r.matching(f);
            got.sort();
            let mut want: Vec<String> = TOPICS
                .iter()
                .filter(|t| topic_matches(t, f))
                .map(|t| t.to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "filter {f:?}");
        }
        r.set("a/b", "newer".to_string());
        assert_eq!(r.matching("a/b"), vec!["newer".to_string()]);
        for t in TOPICS {
            r.clear(t);
        }
        assert!(r.is_empty());
        assert!(r.root.children.is_empty());
    }
}
