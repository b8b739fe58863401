//! Small statistics shared by the timings of `generate` and `bench`.

/// The median of `values`: the middle one, or the mean of the two middle ones for an even count;
/// 0 for none. Orders as [`f64::total_cmp`] (a NaN sorts last).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn odd_even_and_empty() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        let input = [2.0, 1.0];
        median(&input);
        assert_eq!(input, [2.0, 1.0], "the input is left as it was");
    }
}
