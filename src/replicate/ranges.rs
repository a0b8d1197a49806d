//! Partitioned catalog walks: the catalog's name space split into key ranges, each walked by its own walker.
//!
//! `/v2/_catalog?last=X` answers the names after any `X`, named or not, so disjoint ranges of one catalog can be
//! listed at once. A range is `(position, end]`: the names after `position` (its walker's `last`) up to and
//! including `end` (`None`: the catalog's end). A walker that has finished its range takes over half of the
//! largest remaining one: the range is cut at a [`midpoint`] of its position and its end, computed byte-wise, so
//! that even a catalog whose names all share one prefix spreads over the walkers.
//!
//! Sources sort their catalogs in one of two orders: byte-wise (breakwater, SQL with the "C" collation), or as
//! distribution does, path-wise (`/` before every other byte: `team/a` < `team-b` < `team0`). The two disagree
//! only where one name has `/` and the other `-` or `.` at the first byte they differ in. Every end a split makes
//! is a prefix of real names followed only by bytes of [`ALPHABET`], none a separator, and a walker's position
//! always shares that prefix (it is inside the range); so [`beyond`] compares a listed name with the end only
//! where the end has no separator, or where the name has left a prefix the position shares with the end, and it
//! answers the same in either order. The source's order need not be known; a source sorted in neither (a page not
//! strictly increasing in both, or a first name not after the `last` asked) is detected by [`Orders`], and walked
//! as one from its start.

use crate::meta::{RangeRecord, WalkRecord};

/// The bytes a split's end is made of after the prefix it shares with real names: no separator (`-`, `.`, `/`),
/// so that both orders compare it alike with any name; nothing a URL query must escape. Sorted.
const ALPHABET: &[u8] = b"0123456789_abcdefghijklmnopqrstuvwxyz";

/// The bytes repository names are made of, sorted: the scale on which a range's size is measured.
const NAME_BYTES: &[u8] = b"-./0123456789_abcdefghijklmnopqrstuvwxyz";

/// Bytes of a name that count in a range's size: past them the f64 has no precision left anyway.
const SIZE_DIGITS: usize = 8;

fn lcp(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The bytes a cut may use at each byte position of a name: [`ALPHABET`], or (`Seen`) the part of it that names
/// were seen to use at that position.
trait Alphabets {
    fn at(&self, index: usize) -> &[u8];
}

/// Any byte of [`ALPHABET`] anywhere.
struct Any;

impl Alphabets for Any {
    fn at(&self, _: usize) -> &[u8] {
        ALPHABET
    }
}

/// The kinds of bytes names were seen to have at each position: digits, lower-case letters, `_`. A cut uses the
/// kinds seen there (names counting `r0000000`, `r0000001`.. have digits, and nothing under `r0000a`), or
/// [`ALPHABET`] past them.
#[derive(Debug, Clone, Default)]
pub struct Seen(Vec<u8>);

/// The kinds, as bits of [`Seen`], and the bytes of each (sorted, so that a union of them is sorted too).
const KINDS: [(u8, &[u8]); 3] = [(1, b"0123456789"), (2, b"_"), (4, b"abcdefghijklmnopqrstuvwxyz")];

/// Every union of kinds, by its bits: what [`Seen::at`] answers.
const UNIONS: [&[u8]; 8] = [
    ALPHABET,
    b"0123456789",
    b"_",
    b"0123456789_",
    b"abcdefghijklmnopqrstuvwxyz",
    b"0123456789abcdefghijklmnopqrstuvwxyz",
    b"_abcdefghijklmnopqrstuvwxyz",
    ALPHABET,
];

impl Alphabets for Seen {
    fn at(&self, index: usize) -> &[u8] {
        UNIONS[usize::from(self.0.get(index).copied().unwrap_or(0))]
    }
}

impl Seen {
    fn learn(&mut self, name: &str) {
        for (i, b) in name.bytes().enumerate() {
            let Some((bit, _)) = KINDS.iter().find(|(_, bytes)| bytes.contains(&b)) else { continue };
            if self.0.len() <= i {
                self.0.resize(i + 1, 0);
            }
            self.0[i] |= bit;
        }
    }
}

/// A string strictly between `lo` and `hi` byte-wise (`hi` `None`: above everything), made of `alphabets` (the
/// string starting at byte `at` of a name), near the middle. `lo` and `hi` must differ in their first byte (or
/// `lo` be empty).
fn between(lo: &[u8], hi: Option<&[u8]>, at: usize, alphabets: &dyn Alphabets) -> Option<Vec<u8>> {
    let a = lo.first().copied();
    // A one-byte string [z] is above `lo` if z > lo[0], and below `hi` if z < hi[0], or z == hi[0] and `hi` is longer.
    let fits = |z: u8| {
        a.is_none_or(|a| z > a)
            && match hi {
                None => true,
                Some(h) => h.first().is_some_and(|&b| z < b || (z == b && h.len() > 1)),
            }
    };
    // The bytes names use here first; else any (above every name seen, say).
    for alphabet in [alphabets.at(at), ALPHABET] {
        let fitting: Vec<u8> = alphabet.iter().copied().filter(|&z| fits(z)).collect();
        if !fitting.is_empty() {
            return Some(vec![fitting[fitting.len() / 2]]);
        }
    }
    // Nothing fits in one byte: `lo`'s first byte, then something above the rest of `lo` (hi's first byte is
    // above `lo`'s, so that stays below `hi`).
    match a {
        Some(a) if ALPHABET.contains(&a) => {
            let mut s = vec![a];
            s.extend(between(&lo[1..], None, at + 1, alphabets)?);
            Some(s)
        }
        _ => None,
    }
}

/// A name strictly between `position` and `end` (both byte-wise and path-wise) at which the range `(position, end]`
/// can be cut in two; `None` if it cannot (the range is too thin). It is the range's common prefix followed by
/// [`ALPHABET`] bytes, near the middle of the range; where no such string fits right after the common prefix
/// (between `a/x` and `a0`), it goes one byte into the position's next component (`a/` and something after `x`).
/// `seen`: the bytes names were seen to use at each position, tried first: a cut between two of them is where
/// names may be (a catalog of `r0000000`.. has nothing under `r0000a`), so fewer ranges turn out empty.
pub fn midpoint(position: Option<&str>, end: Option<&str>, seen: &Seen) -> Option<String> {
    midpoint_in(position, end, seen).or_else(|| midpoint_in(position, end, &Any))
}

fn midpoint_in(position: Option<&str>, end: Option<&str>, alphabets: &dyn Alphabets) -> Option<String> {
    let p = position.unwrap_or("").as_bytes();
    let e = end.map(str::as_bytes);
    if e.is_some_and(|e| p >= e) {
        return None;
    }
    let c = e.map_or(0, |e| lcp(p, e));
    let join = |prefix: &[u8], s: Vec<u8>| String::from_utf8([prefix, &s].concat()).ok();
    if let Some(s) = between(&p[c..], e.map(|e| &e[c..]), c, alphabets) {
        return join(&p[..c], s);
    }
    (c + 1..=p.len()).find_map(|j| between(&p[j..], None, j, alphabets).and_then(|s| join(&p[..j], s)))
}

/// The position of `s` in the name space, as a fraction in [0, 1) over its first bytes (each byte by its rank
/// among [`NAME_BYTES`], so that every name byte weighs alike).
fn fraction(s: &[u8]) -> f64 {
    let base = (NAME_BYTES.len() + 1) as f64;
    let mut f = 0.0;
    let mut scale = 1.0;
    for &b in s.iter().take(SIZE_DIGITS) {
        scale /= base;
        // A byte outside the names' set sits just above the name byte below it.
        let rank = NAME_BYTES.iter().position(|&n| n >= b).map_or(NAME_BYTES.len() as f64, |i| i as f64 + if NAME_BYTES[i] == b { 0.0 } else { -0.5 });
        f += (rank + 1.0) * scale;
    }
    f
}

/// How much of the name space `(position, end]` spans, as a base-2 logarithm (ranges deep inside one prefix are
/// tiny: 2^-5 per byte of prefix). Only compared with other sizes.
pub fn size(position: Option<&str>, end: Option<&str>) -> f64 {
    let p = position.unwrap_or("").as_bytes();
    let (c, top) = match end {
        None => (0, 1.0),
        Some(e) => {
            let c = lcp(p, e.as_bytes());
            (c, fraction(&e.as_bytes()[c..]))
        }
    };
    let width = (top - fraction(&p[c..])).max(f64::MIN_POSITIVE);
    width.log2() - c as f64 * ((NAME_BYTES.len() + 1) as f64).log2()
}

/// Whether name `x`, which the source listed right after `q` (the previous name, or the `last` asked), is past the
/// range's `end`. Correct in both orders (module documentation): where `x` leaves the prefix that `q` shares with
/// `end`, it differs from both at the same byte, and it is after `q`, so after `end` too; within that prefix,
/// `end` has no separator, and the orders agree.
pub fn beyond(q: &str, x: &str, end: Option<&str>) -> bool {
    let Some(end) = end else { return false };
    let (q, x, e) = (q.as_bytes(), x.as_bytes(), end.as_bytes());
    let k = lcp(q, e);
    !x.starts_with(&e[..k]) || x[k..] > e[k..]
}

/// The orders a source's catalog may still be sorted in, from the pages seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orders {
    bytes: bool,
    paths: bool,
}

impl Default for Orders {
    fn default() -> Self {
        Orders { bytes: true, paths: true }
    }
}

/// distribution's order: `/` sorts before every other byte (its `lessPath`).
fn path_key(s: &str) -> impl Iterator<Item = u8> + '_ {
    s.bytes().map(|b| if b == b'/' { 0 } else { b })
}

impl Orders {
    /// Takes in that the source listed `next` right after `prev`.
    pub fn observe(&mut self, prev: &str, next: &str) {
        self.bytes &= prev.as_bytes() < next.as_bytes();
        self.paths &= path_key(prev).lt(path_key(next));
    }

    /// Whether the catalog may still be sorted.
    pub fn sorted(&self) -> bool {
        self.bytes || self.paths
    }
}

/// One range of a walk.
#[derive(Debug, Clone)]
pub struct Range {
    /// Names the range within the run (ranges come and go as they are split and finished).
    pub id: u64,
    /// The last name handed on from this range (or where the range starts): its walker's next `last`.
    pub position: Option<String>,
    /// The last name the range holds; `None`: the catalog's end.
    pub end: Option<String>,
    /// The walker listing it, if any; ranges from a checkpoint start unowned.
    pub owner: Option<usize>,
    /// Its catalog page failed in this run: left for the next run (which retries it), not taken over.
    pub failed: bool,
    /// The [`size`] of the span of names its last page held: a range not much larger is not worth cutting (its
    /// walker finishes it in a page or two, and every cut costs a page listed at the border). `None` until a page
    /// of two names or more: nothing is known of the range yet.
    pub span: Option<f64>,
}

/// What a page of a range came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    /// The names of the page inside the range, to hand on; `done`: the range is finished (and gone).
    Names { names: Vec<String>, done: bool },
    /// The range is no longer the walker's (the walk fell back to one walker): drop the page.
    Gone,
    /// The page shows the catalog is not sorted: the walk now is one range from the start, `id`, the walker's.
    Unsorted { id: u64 },
}

/// A walk's state: what of the catalog is left to hand on. Everything outside its ranges is handed on (finished or
/// outstanding), which is what the checkpoint claims.
#[derive(Debug, Clone, Default)]
pub struct Walk {
    pub ranges: Vec<Range>,
    /// One range followed in the source's own order, never split or cut at an end: a Harbor source, or a catalog
    /// found not sorted.
    pub linear: bool,
    /// The catalog was found not sorted (saved, so a resumed run does not split it again).
    pub unsorted: bool,
    orders: Orders,
    next_id: u64,
    /// The bytes names were seen to use, by position: where cuts are tried first.
    seen: Seen,
}

impl Walk {
    fn push(&mut self, position: Option<String>, end: Option<String>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.ranges.push(Range { id, position, end, owner: None, failed: false, span: None });
        id
    }

    /// A new walk of the whole catalog over `walkers` ranges (one if `linear`).
    pub fn fresh(walkers: usize, linear: bool) -> Walk {
        let mut w = Walk { linear, ..Walk::default() };
        w.push(None, None);
        while !linear && w.ranges.len() < walkers.max(1) && w.split_largest(false).is_some() {}
        w
    }

    /// The walk a job's saved record describes. A record from before partitioned walks has only its position:
    /// it is one range from there to the end.
    pub fn restore(record: Option<&WalkRecord>, position: Option<String>, linear: bool) -> Walk {
        let mut w = Walk::default();
        match record {
            Some(r) => {
                w.unsorted = r.unsorted;
                for range in &r.ranges {
                    w.push(range.position.clone(), range.end.clone());
                }
            }
            None => {
                w.push(position, None);
            }
        }
        w.linear = linear || w.unsorted;
        w
    }

    /// What the checkpoint saves.
    pub fn record(&self) -> WalkRecord {
        WalkRecord {
            ranges: self.ranges.iter().map(|r| RangeRecord { position: r.position.clone(), end: r.end.clone() }).collect(),
            unsorted: self.unsorted,
        }
    }

    pub fn range(&self, id: u64) -> Option<&Range> {
        self.ranges.iter().find(|r| r.id == id)
    }

    fn range_mut(&mut self, id: u64) -> Option<&mut Range> {
        self.ranges.iter_mut().find(|r| r.id == id)
    }

    /// A range for walker `me` to list: one nobody lists, else half of the largest range another walker lists.
    pub fn claim(&mut self, me: usize) -> Option<u64> {
        if let Some(r) = self.ranges.iter_mut().find(|r| r.owner.is_none() && !r.failed) {
            r.owner = Some(me);
            return Some(r.id);
        }
        if self.linear {
            return None;
        }
        let id = self.split_largest(true)?;
        self.range_mut(id)?.owner = Some(me);
        Some(id)
    }

    /// Cuts the largest range that can be cut at its midpoint; returns the new (upper) range, unowned. `known`:
    /// only ranges larger than twice their last page's span (a fresh walk knows nothing and cuts blindly).
    fn split_largest(&mut self, known: bool) -> Option<u64> {
        let mut order: Vec<(f64, usize)> = self
            .ranges
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.failed)
            .map(|(i, r)| (size(r.position.as_deref(), r.end.as_deref()), i))
            .filter(|(size, i)| !known || self.ranges[*i].span.is_some_and(|span| *size > span + 1.0))
            .collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (_, i) in order {
            let r = &self.ranges[i];
            if let Some(m) = midpoint(r.position.as_deref(), r.end.as_deref(), &self.seen) {
                let end = r.end.clone();
                self.ranges[i].end = Some(m.clone());
                return Some(self.push(Some(m), end));
            }
        }
        None
    }

    /// Takes in a page the source listed for range `id` after `asked`: the names inside the range move its
    /// position; a name past its end, or no further page (`more` false), finishes it. Unless the walk is linear, the
    /// page is checked to be sorted first; if it is not, the walk becomes one range from the start.
    pub fn accept(&mut self, id: u64, asked: Option<&str>, items: Vec<String>, more: bool) -> Accepted {
        let Some(range) = self.range(id) else { return Accepted::Gone };
        let (end, owner) = (range.end.clone(), range.owner);
        if !self.linear && !self.observe(asked, &items) {
            return Accepted::Unsorted { id: self.become_unsorted(owner) };
        }
        let mut names = Vec::with_capacity(items.len());
        let mut past_end = false;
        for x in items {
            let q = names.last().map(String::as_str).or(asked).unwrap_or("");
            if !self.linear && beyond(q, &x, end.as_deref()) {
                past_end = true;
                break;
            }
            names.push(x);
        }
        let done = past_end || !more || names.is_empty();
        self.learn(&names);
        if let Some(r) = self.range_mut(id) {
            if let Some(last) = names.last() {
                r.position = Some(last.clone());
            }
            if let [first, .., last] = names.as_slice() {
                r.span = Some(size(Some(first), Some(last)));
            }
        }
        if done {
            self.ranges.retain(|r| r.id != id);
        }
        Accepted::Names { names, done }
    }

    /// Notes the bytes the names use.
    fn learn(&mut self, names: &[String]) {
        for n in names {
            self.seen.learn(n);
        }
    }

    /// Checks a page against the orders the catalog may be in; false once it is sorted in neither.
    fn observe(&mut self, asked: Option<&str>, items: &[String]) -> bool {
        let mut prev = asked;
        for x in items {
            if let Some(p) = prev {
                self.orders.observe(p, x);
            }
            prev = Some(x);
        }
        self.orders.sorted()
    }

    /// The catalog is not sorted: ranges mean nothing. One range over everything, owned by `owner`.
    fn become_unsorted(&mut self, owner: Option<usize>) -> u64 {
        self.ranges.clear();
        self.linear = true;
        self.unsorted = true;
        let id = self.push(None, None);
        if let Some(r) = self.range_mut(id) {
            r.owner = owner;
        }
        id
    }

    /// Whether a walker is listing a range: what a walker with nothing to take over waits on.
    pub fn listing(&self) -> bool {
        self.ranges.iter().any(|r| r.owner.is_some())
    }

    /// Walker `me` is gone: the ranges it held are nobody's.
    pub fn release(&mut self, me: usize) {
        for r in self.ranges.iter_mut().filter(|r| r.owner == Some(me)) {
            r.owner = None;
        }
    }

    /// Range `id`'s page failed: it stays (for the next run), and nobody lists it again in this run.
    pub fn fail(&mut self, id: u64) {
        if let Some(r) = self.range_mut(id) {
            r.owner = None;
            r.failed = true;
        }
    }

    /// Where everything before is handed on: the lowest position of a range left (`Some(None)`: a range is at the
    /// catalog's start, so nothing is); `None` once no range is left.
    pub fn frontier(&self) -> Option<Option<&str>> {
        self.ranges.iter().map(|r| r.position.as_deref()).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mid(p: &str, e: Option<&str>) -> String {
        let m = midpoint(Some(p).filter(|p| !p.is_empty()), e, &Seen::default()).unwrap_or_else(|| panic!("no midpoint of {p:?} and {e:?}"));
        assert!(p.as_bytes() < m.as_bytes(), "{p:?} < {m:?}");
        assert!(path_key(p).lt(path_key(&m)), "{p:?} < {m:?} path-wise");
        if let Some(e) = e {
            assert!(m.as_bytes() < e.as_bytes(), "{m:?} < {e:?}");
            assert!(path_key(&m).lt(path_key(e)), "{m:?} < {e:?} path-wise");
        }
        m
    }

    #[test]
    fn midpoints_lie_strictly_between_in_both_orders() {
        assert_eq!(mid("", None), "h");
        mid("library/alpine", Some("m"));
        mid("library/alpine", None);
        assert!(mid("library/alpine", Some("library0")).starts_with("library/"), "into the next component");
        assert!(mid("a/x", Some("a0")).starts_with("a/"));
        mid("zzzz", None);
        mid("r0000999", Some("r1"));
        mid("ns0/r0000000", Some("ns0/r5"));
        assert_eq!(midpoint(Some("a"), Some("a0"), &Seen::default()), None, "nothing fits between a and a0");
        assert_eq!(midpoint(Some("b"), Some("a"), &Seen::default()), None);
        assert_eq!(midpoint(None, Some("0"), &Seen::default()), None);
        // With the bytes names use, cuts fall among them.
        let mut seen = Seen::default();
        seen.learn("r0000000");
        seen.learn("r0999999");
        let m = midpoint(Some("r0000999"), Some("r1"), &seen).unwrap();
        assert!(m.len() == 3 && m.starts_with("r0") && m.as_bytes()[2].is_ascii_digit(), "{m}");
    }

    #[test]
    fn halving_a_range_in_one_prefix_reaches_inside_it() {
        // All names under library/: splitting (position, end] again and again gets ends inside library/.
        let p = Some("library/aaaa");
        let mut end: Option<String> = None;
        for _ in 0..200 {
            match midpoint(p, end.as_deref(), &Seen::default()) {
                Some(m) if m.starts_with("library/") => return,
                Some(m) => end = Some(m),
                None => break,
            }
        }
        panic!("never split inside library/ (last end {end:?})");
    }

    #[test]
    fn beyond_agrees_with_both_orders() {
        // distribution order: team/a < team/z < team-b/a < team.c/a < team0; bytes: team-b/a < team.c/a < team/a < ...
        assert!(!beyond("team/a", "team/z", Some("team/zz")));
        assert!(beyond("team/a", "team-b/a", Some("team/zz")), "path-wise: after team/, so past the end");
        assert!(beyond("", "team-b", Some("team")));
        assert!(!beyond("", "team", Some("team")), "the end is in its range");
        assert!(!beyond("a", "b", None));
        assert!(beyond("r0000999", "r1000000", Some("r05")));
        assert!(!beyond("r0000999", "r0000a", Some("r05")));
    }

    #[test]
    fn orders_detect_an_unsorted_catalog() {
        let mut o = Orders::default();
        o.observe("team/a", "team-b/a");
        assert!(o.sorted(), "distribution order");
        let mut o = Orders::default();
        o.observe("team-b/a", "team/a");
        assert!(o.sorted(), "byte order");
        o.observe("team/a", "team/a");
        assert!(!o.sorted(), "not strictly increasing");
        let mut o = Orders::default();
        o.observe("b", "a");
        assert!(!o.sorted());
    }

    #[test]
    fn a_fresh_walk_covers_the_name_space_once() {
        let w = Walk::fresh(8, false);
        assert_eq!(w.ranges.len(), 8);
        let mut ends: Vec<Option<String>> = w.ranges.iter().map(|r| r.end.clone()).collect();
        let mut starts: Vec<Option<String>> = w.ranges.iter().map(|r| r.position.clone()).collect();
        ends.sort_by(|a, b| a.is_none().cmp(&b.is_none()).then(a.cmp(b)));
        starts.sort();
        // Each range starts where another ends; one starts at the start, one ends at the end.
        assert_eq!(starts[0], None);
        assert_eq!(ends.last(), Some(&None));
        assert_eq!(starts[1..].to_vec(), ends[..7].to_vec());
        assert_eq!(Walk::fresh(8, true).ranges.len(), 1);
    }

    #[test]
    fn pages_are_cut_at_the_end_and_unsorted_pages_fall_back() {
        let mut w = Walk::default();
        let id = w.push(Some("a".into()), Some("c".into()));
        let page = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(w.accept(id, Some("a"), page(&["a1", "b"]), true), Accepted::Names { names: page(&["a1", "b"]), done: false });
        assert_eq!(w.range(id).unwrap().position.as_deref(), Some("b"));
        assert_eq!(w.accept(id, Some("b"), page(&["c", "c1"]), true), Accepted::Names { names: page(&["c"]), done: true });
        assert!(w.ranges.is_empty());
        assert_eq!(w.accept(id, Some("c"), page(&["d"]), true), Accepted::Gone);

        let mut w = Walk::fresh(4, false);
        let id = w.claim(0).unwrap();
        let asked = w.range(id).unwrap().position.clone();
        let Accepted::Unsorted { id: one } = w.accept(id, asked.as_deref(), page(&["x/b", "x/a"]), true) else { panic!("not detected") };
        assert_eq!((w.ranges.len(), w.linear, w.unsorted), (1, true, true));
        assert_eq!(w.range(one).unwrap().owner, Some(0));
        assert_eq!(w.claim(1), None, "an unsorted walk is not split");
        assert_eq!(w.record().unsorted, true);
    }

    #[test]
    fn an_old_checkpoint_is_one_range_from_its_position() {
        let w = Walk::restore(None, Some("r0000499".into()), false);
        assert_eq!(w.ranges.len(), 1);
        assert_eq!((w.ranges[0].position.as_deref(), w.ranges[0].end.as_deref()), (Some("r0000499"), None));
    }

    /// Walks a sorted catalog with `walkers` walkers in rounds (every walker with a range asks for one page a
    /// round): (requests, rounds, names handed on). The page requests of a real walk, without a real source.
    fn simulate(names: &[String], walkers: usize, n: usize) -> (usize, usize, usize) {
        let mut w = Walk::fresh(walkers, false);
        let mut owned: Vec<Option<u64>> = vec![None; walkers];
        let (mut requests, mut rounds, mut handed) = (0, 0, 0);
        loop {
            for (me, slot) in owned.iter_mut().enumerate() {
                if slot.is_none_or(|id| w.range(id).is_none()) {
                    *slot = w.claim(me);
                }
            }
            if owned.iter().all(Option::is_none) {
                return (requests, rounds, handed);
            }
            rounds += 1;
            // Every walker asks at once; the answers come back one after the other.
            let asks: Vec<(u64, Option<String>)> =
                owned.iter().flatten().filter_map(|id| w.range(*id).map(|r| (*id, r.position.clone()))).collect();
            for (id, asked) in asks {
                requests += 1;
                let start = asked.as_ref().map_or(0, |a| names.partition_point(|x| x <= a));
                let page: Vec<String> = names[start..(start + n).min(names.len())].to_vec();
                let more = start + n < names.len();
                if let Accepted::Names { names: kept, .. } = w.accept(id, asked.as_deref(), page, more) {
                    handed += kept.len();
                }
            }
        }
    }

    #[test]
    fn simulated_walks_hand_on_every_name_once_and_spread() {
        let flat = |count: usize| (0..count).map(|i| format!("r{i:07}")).collect::<Vec<_>>();
        let one = |count: usize| (0..count).map(|i| format!("ns0/r{i:07}")).collect::<Vec<_>>();
        let many = |count: usize| {
            let per = count.div_ceil(300);
            (0..count).map(|i| format!("{}{}/r{:07}", char::from(b'a' + (i / per / 26) as u8), char::from(b'a' + (i / per % 26) as u8), i % per)).collect::<Vec<_>>()
        };
        for (what, names, walkers, n) in [
            ("flat 3000", flat(3000), 8, 100),
            ("one prefix 3000", one(3000), 8, 100),
            ("many prefixes 3000", many(3000), 8, 100),
            ("flat 1M", flat(1_000_000), 8, 1000),
            ("one prefix 1M", one(1_000_000), 8, 1000),
            ("flat 1M, one walker", flat(1_000_000), 1, 1000),
        ] {
            let (requests, rounds, handed) = simulate(&names, walkers, n);
            eprintln!("{what}: {requests} requests, {rounds} rounds for {} pages of names", names.len().div_ceil(n));
            assert_eq!(handed, names.len(), "{what}");
        }
    }
}
