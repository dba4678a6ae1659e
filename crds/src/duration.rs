//! A Go-style duration string (`"30s"`, `"15m"`, `"1h30m"`, `"250ms"`), the
//! spelling Kubernetes users already know from other CRDs.
//!
//! Only whole numbers of `h`, `m`, `s` and `ms` are accepted: sub-millisecond
//! precision means nothing for the timeouts configured here, and refusing
//! fractions (`1.5h`) keeps parsing exact.

use std::{borrow::Cow, fmt, str::FromStr, time::Duration as StdDuration};

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// What the CRD schema accepts; [`Duration::from_str`] is the authority and
/// gives the precise error message.
pub const DURATION_PATTERN: &str = r"^(0|([0-9]+(h|ms|m|s))+)$";

const MS_PER_SEC: u64 = 1_000;
const MS_PER_MIN: u64 = 60 * MS_PER_SEC;
const MS_PER_HOUR: u64 = 60 * MS_PER_MIN;

/// A non-negative duration with millisecond resolution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration {
    millis: u64,
}

/// Why a duration string was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("duration is empty; write e.g. \"30s\", \"15m\" or \"1h30m\"")]
    Empty,
    #[error("duration {0:?} is negative; durations must be zero or positive")]
    Negative(String),
    #[error(
        "duration {input:?} is invalid: {reason}; write whole numbers with units h, m, s or ms, e.g. \"30s\" or \"1h30m\""
    )]
    Invalid { input: String, reason: &'static str },
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

// === impl Duration ===

impl Duration {
    pub const ZERO: Self = Self { millis: 0 };

    pub const fn from_millis(millis: u64) -> Self {
        Self { millis }
    }

    /// `None` if the value does not fit in `u64` milliseconds.
    pub const fn from_secs(secs: u64) -> Option<Self> {
        match secs.checked_mul(MS_PER_SEC) {
            Some(millis) => Some(Self { millis }),
            None => None,
        }
    }

    pub const fn as_millis(self) -> u64 {
        self.millis
    }

    pub const fn as_std(self) -> StdDuration {
        StdDuration::from_millis(self.millis)
    }

    pub const fn is_zero(self) -> bool {
        self.millis == 0
    }
}

impl From<Duration> for StdDuration {
    fn from(d: Duration) -> Self {
        d.as_std()
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| DurationError::Invalid {
            input: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(DurationError::Empty);
        }
        if input.starts_with('-') {
            return Err(DurationError::Negative(input.to_owned()));
        }
        // Go accepts a bare "0"; nothing else may omit its unit.
        if input == "0" {
            return Ok(Self::ZERO);
        }

        let overflow = || DurationError::Overflow(input.to_owned());
        let mut rest = input;
        let mut millis: u64 = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(invalid("expected a number"));
            }
            let (number, after) = rest.split_at(digits);
            let number: u64 = number.parse().map_err(|_| overflow())?;

            let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
            let (unit, after) = after.split_at(unit_len);
            let scale = match unit {
                "h" => MS_PER_HOUR,
                "m" => MS_PER_MIN,
                "s" => MS_PER_SEC,
                "ms" => 1,
                "" if after.starts_with('.') => return Err(invalid("fractions are not supported")),
                "" => return Err(invalid("missing unit")),
                _ => return Err(invalid("unknown unit")),
            };
            millis = number
                .checked_mul(scale)
                .and_then(|n| millis.checked_add(n))
                .ok_or_else(overflow)?;
            rest = after;
        }
        Ok(Self { millis })
    }
}

impl fmt::Display for Duration {
    /// Largest units first, zero parts omitted: `1h30m`, `1s500ms`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.millis == 0 {
            return f.write_str("0s");
        }
        let mut rest = self.millis;
        for (scale, unit) in [
            (MS_PER_HOUR, "h"),
            (MS_PER_MIN, "m"),
            (MS_PER_SEC, "s"),
            (1, "ms"),
        ] {
            let n = rest / scale;
            if n > 0 {
                write!(f, "{n}{unit}")?;
            }
            rest %= scale;
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl de::Visitor<'_> for Visitor {
            type Value = Duration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"30s\", \"15m\" or \"1h30m\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(Visitor)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration such as \"30s\", \"15m\", \"1h30m\" or \"250ms\" (units h, m, s, ms)."
        })
    }
}

#[cfg(test)]
mod tests;
