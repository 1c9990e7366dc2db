//! Drawing what each request is: which hostname (Zipf), which kind of
//! connection, which protocol. Deterministic from a seed, so a run can be
//! repeated exactly.

/// An open-loop schedule: event `i` is due at `start + i / rate`, until
/// `end`, whatever happened to the earlier ones.
#[derive(Debug)]
pub struct OpenLoop {
    start: std::time::Instant,
    gap: std::time::Duration,
    end: std::time::Instant,
    i: u32,
}

impl OpenLoop {
    /// `rate` events a second from `start` until `end`.
    pub fn new(start: std::time::Instant, rate: f64, end: std::time::Instant) -> Self {
        OpenLoop {
            start,
            gap: std::time::Duration::from_secs_f64(1.0 / rate.max(0.001)),
            end,
            i: 0,
        }
    }

    /// Waits until the next event is due and returns when it was due; `None`
    /// at the end.
    pub async fn next(&mut self) -> Option<std::time::Instant> {
        let due = self.start + self.gap.mul_f64(f64::from(self.i));
        if due >= self.end {
            return None;
        }
        self.i = self.i.saturating_add(1);
        tokio::time::sleep_until(due.into()).await;
        Some(due)
    }
}

/// SplitMix64: small, fast, good enough to pick load (not for secrets).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf over `n` items: item `k` (0-based) is drawn with probability
/// proportional to `1 / (k + 1)^s`. A few hostnames are hot, most are cold,
/// as on a platform that serves thousands of apps.
#[derive(Clone, Debug)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// The distribution; `n` at least 1, `s` at least 0 (0 is uniform).
    pub fn new(n: usize, s: f64) -> Self {
        let n = n.max(1);
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 0..n {
            sum += 1.0 / ((k + 1) as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Zipf { cdf }
    }

    /// The probability of item `k`.
    pub fn p(&self, k: usize) -> f64 {
        let below = if k == 0 { 0.0 } else { self.cdf[k - 1] };
        self.cdf.get(k).map_or(0.0, |c| c - below)
    }

    /// Draws an item.
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cdf
            .partition_point(|c| *c <= u)
            .min(self.cdf.len() - 1)
    }
}

/// Picks one of several choices by weight.
#[derive(Clone, Debug)]
pub struct Weighted<T> {
    items: Vec<(f64, T)>,
}

impl<T: Copy> Weighted<T> {
    /// Choices with their weights (need not sum to 1; zero weights never come up).
    pub fn new(choices: &[(f64, T)]) -> Self {
        let total: f64 = choices.iter().map(|(w, _)| w.max(0.0)).sum();
        let mut acc = 0.0;
        let items = choices
            .iter()
            .filter(|(w, _)| *w > 0.0)
            .map(|(w, t)| {
                acc += w / total;
                (acc, *t)
            })
            .collect();
        Weighted { items }
    }

    /// Draws one; `None` only when every weight was zero.
    pub fn sample(&self, rng: &mut Rng) -> Option<T> {
        let u = rng.unit();
        self.items
            .iter()
            .find(|(c, _)| u < *c)
            .or(self.items.last())
            .map(|(_, t)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_frequencies_follow_the_law() {
        let z = Zipf::new(100, 1.0);
        let mut rng = Rng::new(7);
        let draws = 200_000;
        let mut counts = vec![0u32; 100];
        for _ in 0..draws {
            counts[z.sample(&mut rng)] += 1;
        }
        for k in [0, 1, 4, 9, 49, 99] {
            let want = z.p(k) * draws as f64;
            let got = f64::from(counts[k]);
            // Five standard deviations of a binomial count.
            let tol = 5.0 * (want * (1.0 - z.p(k))).sqrt();
            assert!(
                (got - want).abs() < tol,
                "item {k}: {got} draws, expected {want:.0} +- {tol:.0}"
            );
        }
        // Item 0 is twice as likely as item 1 when s = 1.
        assert!((z.p(0) / z.p(1) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn weighted_choices_keep_their_shares() {
        let w = Weighted::new(&[(0.6, 'k'), (0.3, 'n'), (0.1, 'r'), (0.0, 'x')]);
        let mut rng = Rng::new(1);
        let mut c = std::collections::HashMap::new();
        for _ in 0..100_000 {
            *c.entry(w.sample(&mut rng).unwrap_or('?')).or_insert(0u32) += 1;
        }
        assert!(!c.contains_key(&'x'));
        for (k, share) in [('k', 0.6), ('n', 0.3), ('r', 0.1)] {
            let got = f64::from(c[&k]) / 100_000.0;
            assert!((got - share).abs() < 0.01, "{k}: {got}");
        }
    }
}
