//! How a subscriber and the controller compare what the subscriber holds without listing it: every
//! resource falls in one of [`BUCKETS`] buckets by its key, and each bucket has a digest, the
//! wrapping sum of its resources' [`digest`]s. Both sides compute them with these functions, so a
//! resync sends only the buckets whose digests differ.
//!
//! The hashes are fixed by the protocol (FNV-1a, then SplitMix64's finalizer), not by a hasher that
//! may change between Rust releases or be seeded per process.

/// Buckets per subscriber: with 100,000 resources, about 100 in each, so one changed resource costs
/// a resync of about 100; the summary is 8 KiB.
pub const BUCKETS: usize = 1024;

/// FNV-1a over `type/name`, without building that string.
fn key_hash(ty: &str, name: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in ty.bytes().chain(std::iter::once(b'/')).chain(name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// SplitMix64's finalizer: spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The bucket of the resource `type/name`, below [`BUCKETS`].
pub fn bucket(ty: &str, name: &str) -> usize {
    // BUCKETS is a power of two far below u32::MAX: the mask keeps the value in range.
    (mix(key_hash(ty, name)) as usize) & (BUCKETS - 1)
}

/// What the resource `type/name` at `version` adds to its bucket's digest.
pub fn digest(ty: &str, name: &str, version: u64) -> u64 {
    mix(key_hash(ty, name) ^ mix(version.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// The bucket digests of a set of resources, given as (type, name, version).
pub fn summarize<'a>(resources: impl IntoIterator<Item = (&'a str, &'a str, u64)>) -> Vec<u64> {
    let mut buckets = vec![0u64; BUCKETS];
    for (ty, name, version) in resources {
        let b = &mut buckets[bucket(ty, name)];
        *b = b.wrapping_add(digest(ty, name, version));
    }
    buckets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hashes_are_the_protocols_and_do_not_change() {
        // Fixed values: a subscriber and a controller of different builds must agree.
        assert_eq!(key_hash("", ""), 0xaf63_a24c_8601_89fe, "FNV-1a of \"/\"");
        assert_eq!(bucket("workload", "default/web-0"), bucket("workload", "default/web-0"));
        let d = digest("workload", "default/web-0", 7);
        assert_ne!(d, digest("workload", "default/web-0", 8), "the version counts");
        assert_ne!(d, digest("workload", "default/web-1", 7), "the name counts");
        assert_ne!(d, digest("service", "default/web-0", 7), "the type counts");
        assert_ne!(
            digest("workload", "a/bc", 1),
            digest("workload", "ab/c", 1),
            "the separator counts"
        );
    }

    #[test]
    fn buckets_spread_and_summaries_do_not_depend_on_order() {
        let names: Vec<String> = (0..20_000).map(|i| format!("ns-{}/pod-{i}", i % 10)).collect();
        let mut counts = vec![0usize; BUCKETS];
        for n in &names {
            counts[bucket("workload", n)] += 1;
        }
        let (min, max) = (counts.iter().min().copied(), counts.iter().max().copied());
        // About 19.5 each: every bucket is used and none holds many times its share.
        assert!(min >= Some(3) && max <= Some(50), "{min:?}..{max:?}");
        let forward = summarize(names.iter().map(|n| ("workload", n.as_str(), 1)));
        let backward = summarize(names.iter().rev().map(|n| ("workload", n.as_str(), 1)));
        assert_eq!(forward, backward);
        let mut changed = names.iter().map(|n| ("workload", n.as_str(), 1)).collect::<Vec<_>>();
        changed[5].2 = 2;
        let other = summarize(changed);
        let differ: Vec<usize> = (0..BUCKETS).filter(|b| forward[*b] != other[*b]).collect();
        assert_eq!(differ, [bucket("workload", &names[5])]);
    }
}
