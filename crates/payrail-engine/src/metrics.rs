//! A small Prometheus registry: labelled counters and latency histograms, rendered in the text
//! exposition format. Kept in-house because we need a handful of series, not a framework.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Upper bounds of the latency buckets, in milliseconds.
const BUCKETS_MS: [f64; 14] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

#[derive(Default, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS_MS.len()],
    count: u64,
    sum_us: u64,
}

impl Histogram {
    fn observe(&mut self, micros: u64) {
        let ms = micros as f64 / 1000.0;
        for (i, le) in BUCKETS_MS.iter().enumerate() {
            if ms <= *le {
                self.buckets[i] = self.buckets[i].saturating_add(1);
            }
        }
        self.count = self.count.saturating_add(1);
        self.sum_us = self.sum_us.saturating_add(micros);
    }
}

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Family {
    help: &'static str,
    counters: BTreeMap<Labels, u64>,
    gauges: BTreeMap<Labels, i64>,
    histograms: BTreeMap<Labels, Histogram>,
}

#[derive(Default)]
pub struct Metrics {
    families: Mutex<BTreeMap<&'static str, Family>>,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    pub fn inc(&self, name: &'static str, help: &'static str, labels: &[(&'static str, &str)]) {
        self.add(name, help, labels, 1);
    }

    pub fn add(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        n: u64,
    ) {
        if let Ok(mut f) = self.families.lock() {
            let fam = f.entry(name).or_insert_with(|| Family {
                help,
                ..Family::default()
            });
            let c = fam.counters.entry(own(labels)).or_insert(0);
            *c = c.saturating_add(n);
        }
    }

    pub fn observe_us(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        micros: u64,
    ) {
        if let Ok(mut f) = self.families.lock() {
            let fam = f.entry(name).or_insert_with(|| Family {
                help,
                ..Family::default()
            });
            fam.histograms
                .entry(own(labels))
                .or_default()
                .observe(micros);
        }
    }

    /// Sets a gauge (a value that goes up and down, such as a queue length).
    pub fn set_gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        value: i64,
    ) {
        if let Ok(mut f) = self.families.lock() {
            let fam = f.entry(name).or_insert_with(|| Family {
                help,
                ..Family::default()
            });
            fam.gauges.insert(own(labels), value);
        }
    }

    /// Value of one counter series (tests and the console).
    pub fn counter(&self, name: &str, labels: &[(&'static str, &str)]) -> u64 {
        self.families
            .lock()
            .ok()
            .and_then(|f| {
                f.get(name)
                    .and_then(|fam| fam.counters.get(&own(labels)).copied())
            })
            .unwrap_or(0)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(f) = self.families.lock() else {
            return out;
        };
        for (name, fam) in f.iter() {
            let kind = if !fam.histograms.is_empty() {
                "histogram"
            } else if !fam.gauges.is_empty() {
                "gauge"
            } else {
                "counter"
            };
            let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {kind}", fam.help);
            for (labels, v) in &fam.counters {
                let _ = writeln!(out, "{name}{} {v}", fmt_labels(labels, None));
            }
            for (labels, v) in &fam.gauges {
                let _ = writeln!(out, "{name}{} {v}", fmt_labels(labels, None));
            }
            for (labels, h) in &fam.histograms {
                for (i, le) in BUCKETS_MS.iter().enumerate() {
                    let le = format!("{}", le / 1000.0);
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {}",
                        fmt_labels(labels, Some(&le)),
                        h.buckets[i]
                    );
                }
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {}",
                    fmt_labels(labels, Some("+Inf")),
                    h.count
                );
                let _ = writeln!(
                    out,
                    "{name}_sum{} {}",
                    fmt_labels(labels, None),
                    h.sum_us as f64 / 1e6
                );
                let _ = writeln!(out, "{name}_count{} {}", fmt_labels(labels, None), h.count);
            }
        }
        out
    }
}

fn own(labels: &[(&'static str, &str)]) -> Labels {
    labels.iter().map(|(k, v)| (*k, (*v).to_string())).collect()
}

fn fmt_labels(labels: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::new();
        m.inc("payrail_x_total", "x", &[("a", "1")]);
        m.inc("payrail_x_total", "x", &[("a", "1")]);
        m.observe_us("payrail_lat_seconds", "lat", &[("r", "/p")], 3_000);
        let s = m.render();
        assert!(s.contains("payrail_x_total{a=\"1\"} 2"), "{s}");
        assert!(
            s.contains("payrail_lat_seconds_bucket{r=\"/p\",le=\"0.0025\"} 0"),
            "{s}"
        );
        assert!(
            s.contains("payrail_lat_seconds_bucket{r=\"/p\",le=\"0.005\"} 1"),
            "{s}"
        );
        assert!(s.contains("payrail_lat_seconds_count{r=\"/p\"} 1"), "{s}");
        assert_eq!(m.counter("payrail_x_total", &[("a", "1")]), 2);
        m.set_gauge("payrail_q", "q", &[], 5);
        m.set_gauge("payrail_q", "q", &[], 3);
        let s = m.render();
        assert!(s.contains("# TYPE payrail_q gauge\npayrail_q 3\n"), "{s}");
    }
}
