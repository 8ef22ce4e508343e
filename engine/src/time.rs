/// A point on the controller's monotonic clock, in milliseconds since an arbitrary origin.
///
/// The engine never reads a clock; the shell converts `Instant`s, simulations count.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Millis(pub u64);

impl Millis {
    /// Time elapsed since `earlier`; zero if `earlier` is in the future (clock skew between
    /// the shell's samples must never produce a negative age).
    pub fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// A duration as operators read it in events: "2.5 s".
pub(crate) fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}
