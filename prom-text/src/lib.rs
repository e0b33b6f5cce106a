//! The Prometheus text exposition format (version 0.0.4), written in one place.
//!
//! Every process of the workspace renders its `/metrics` through [`Writer`]: the gateway, its
//! process metrics, the control-plane client's gauges, the sidecar and controlplane-lite. The
//! metric names, labels, HELP and TYPE lines are a contract (DESIGN.md "Observability"), so
//! this crate only formats; what is exported stays with each caller. It has no dependencies,
//! so the gateway can use it without pulling anything into its tree.

#![forbid(unsafe_code)]

use std::fmt::{self, Write as _};

/// A metric family's type (`# TYPE` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample's value. Integers print as integers and floats with Rust's shortest round-trip
/// form; infinities print as the format's `+Inf`/`-Inf` and not-a-number as `NaN`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
}

impl From<u64> for Value {
    fn from(value: u64) -> Value {
        Value::U64(value)
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Value {
        Value::I64(value)
    }
}

impl From<u8> for Value {
    fn from(value: u8) -> Value {
        Value::U64(u64::from(value))
    }
}

impl From<bool> for Value {
    fn from(value: bool) -> Value {
        Value::U64(u64::from(value))
    }
}

impl From<f64> for Value {
    fn from(value: f64) -> Value {
        Value::F64(value)
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::U64(value) => write!(f, "{value}"),
            Value::I64(value) => write!(f, "{value}"),
            Value::F64(value) if value.is_nan() => f.write_str("NaN"),
            Value::F64(value) if value == f64::INFINITY => f.write_str("+Inf"),
            Value::F64(value) if value == f64::NEG_INFINITY => f.write_str("-Inf"),
            Value::F64(value) => write!(f, "{value}"),
        }
    }
}

/// A label value escaped for the text format: backslash, double quote and line feed.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(['\\', '"', '\n']) {
            f.write_str(&rest[..at])?;
            f.write_str(match rest.as_bytes()[at] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[at + 1..];
        }
        f.write_str(rest)
    }
}

/// Label pairs, in the order they are written. Names are the caller's constants; values are
/// escaped.
pub type Labels<'a> = [(&'a str, &'a str)];

/// Appends Prometheus text to a `String` (writing to a `String` cannot fail, so no method
/// returns an error).
pub struct Writer<'a> {
    out: &'a mut String,
}

impl<'a> Writer<'a> {
    pub fn new(out: &'a mut String) -> Writer<'a> {
        Writer { out }
    }

    /// The `# HELP` and `# TYPE` lines that open a family.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    /// One sample line: `name{labels} value` (no braces without labels).
    pub fn sample(&mut self, name: &str, labels: &Labels<'_>, value: impl Into<Value>) {
        self.sample_with(name, "", labels, None, value.into());
    }

    /// A family of one unlabelled sample: HELP, TYPE and the value.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Into<Value>) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The samples of one histogram series (its family opened with [`Writer::family`]):
    /// `_bucket` per upper bound with its cumulative count, the `+Inf` bucket (`count`),
    /// `_sum` and `_count`. `buckets` must already be cumulative.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &Labels<'_>,
        buckets: impl IntoIterator<Item = (f64, u64)>,
        count: u64,
        sum: f64,
    ) {
        for (bound, cumulative) in buckets {
            self.sample_with(
                name,
                "_bucket",
                labels,
                Some(Value::F64(bound)),
                Value::U64(cumulative),
            );
        }
        self.sample_with(
            name,
            "_bucket",
            labels,
            Some(Value::F64(f64::INFINITY)),
            Value::U64(count),
        );
        self.sample_with(name, "_sum", labels, None, Value::F64(sum));
        self.sample_with(name, "_count", labels, None, Value::U64(count));
    }

    fn sample_with(
        &mut self,
        name: &str,
        suffix: &str,
        labels: &Labels<'_>,
        le: Option<Value>,
        value: Value,
    ) {
        let out = &mut *self.out;
        out.push_str(name);
        out.push_str(suffix);
        if !labels.is_empty() || le.is_some() {
            out.push('{');
            for (index, (label, text)) in labels.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{label}=\"{}\"", Escaped(text));
            }
            if let Some(le) = le {
                if !labels.is_empty() {
                    out.push(',');
                }
                let _ = write!(out, "le=\"{le}\"");
            }
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        Writer::new(&mut out).sample("m", &[("a", "x\"y\\z\nw"), ("b", "plain")], 1u64);
        assert_eq!(out, "m{a=\"x\\\"y\\\\z\\nw\",b=\"plain\"} 1\n");
        assert_eq!(Escaped("no specials").to_string(), "no specials");
    }

    #[test]
    fn families_and_unlabelled_samples() {
        let mut out = String::new();
        let mut writer = Writer::new(&mut out);
        writer.single("up", Kind::Gauge, "Whether it is up.", true);
        writer.single("t", Kind::Counter, "Seconds.", 2.5);
        assert_eq!(
            out,
            "# HELP up Whether it is up.\n# TYPE up gauge\nup 1\n\
             # HELP t Seconds.\n# TYPE t counter\nt 2.5\n"
        );
    }

    #[test]
    fn values_use_the_formats_spelling_of_special_floats() {
        assert_eq!(Value::F64(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::F64(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Value::F64(f64::NAN).to_string(), "NaN");
        assert_eq!(Value::F64(0.0).to_string(), "0");
        assert_eq!(Value::F64(0.00005).to_string(), "0.00005");
        assert_eq!(Value::I64(-3).to_string(), "-3");
    }

    #[test]
    fn histograms_end_with_inf_sum_and_count() {
        let mut out = String::new();
        let mut writer = Writer::new(&mut out);
        writer.histogram("h", &[("l", "a")], [(0.5, 1), (1.0, 2)], 3, 4.25);
        writer.histogram("g", &[], [(0.001, 0)], 0, 0.0);
        assert_eq!(
            out,
            "h_bucket{l=\"a\",le=\"0.5\"} 1\nh_bucket{l=\"a\",le=\"1\"} 2\n\
             h_bucket{l=\"a\",le=\"+Inf\"} 3\nh_sum{l=\"a\"} 4.25\nh_count{l=\"a\"} 3\n\
             g_bucket{le=\"0.001\"} 0\ng_bucket{le=\"+Inf\"} 0\ng_sum 0\ng_count 0\n"
        );
    }
}
