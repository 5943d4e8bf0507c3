//! Seeded randomness for tests: every random schedule (faults, kills, loads) comes from a
//! seed that is printed, so a failure seen once can be replayed with
//! `OUTPOST_TEST_SEED=<seed>`. An unseeded RNG would make such a failure unrepeatable.

use rand::SeedableRng;

/// The seeded random generator of a test run.
pub type TestRng = rand::rngs::StdRng;

/// The seed of this run: `OUTPOST_TEST_SEED` when set, else a random one. Printed (with
/// `test`, the test's name), so a failing run can be replayed. Panics if
/// `OUTPOST_TEST_SEED` is set but is not a `u64`: silently ignoring it would not replay.
pub fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("OUTPOST_TEST_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("OUTPOST_TEST_SEED={s:?} is not a u64")),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: seed = {seed} (replay with OUTPOST_TEST_SEED={seed})");
    seed
}

/// A random generator for `seed`, salted with `salt`: one independent stream per use
/// (per thread, per phase), so adding a use does not shift the others.
pub fn rng(seed: u64, salt: u64) -> TestRng {
    TestRng::seed_from_u64(seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// [`test_seed`] and a generator for it (salt 0): the one call a test with a single random
/// schedule needs. Returns the seed too, for failure messages.
pub fn seeded(test: &str) -> (u64, TestRng) {
    let seed = test_seed(test);
    (seed, rng(seed, 0))
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    #[test]
    fn one_seed_gives_one_stream_and_salts_differ() {
        let a: Vec<u64> = (0..4).map(|_| rng(7, 1).random()).collect();
        let b: Vec<u64> = (0..4).map(|_| rng(7, 1).random()).collect();
        assert_eq!(a, b);
        let mut x = rng(7, 1);
        let mut y = rng(7, 2);
        let xs: Vec<u64> = (0..4).map(|_| x.random()).collect();
        let ys: Vec<u64> = (0..4).map(|_| y.random()).collect();
        assert_ne!(xs, ys);
    }
}
