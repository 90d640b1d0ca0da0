//! Logging. `RUST_LOG` selects levels (`info`, `weft::access=off,debug`, ...: target=level
//! directives); access records go to target `weft::access`. The filter can be replaced while the
//! agent runs ([`LogFilter::set`], the admin API's `/logging?level=`).
//!
//! Targets, not EnvFilter: the agent needs no span or field filters, and EnvFilter's regex engine
//! would be the largest piece of code in a binary whose resident size is mostly its code.

use std::sync::{Arc, Mutex};

use tracing::level_filters::LevelFilter;
use tracing_subscriber::{Registry, filter::Targets, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _};

use crate::config::LogFormat;

/// The log filter in force, as given, and the handle that replaces it.
#[derive(Clone)]
pub struct LogFilter {
    handle: reload::Handle<Targets, Registry>,
    spec: Arc<Mutex<String>>,
}

impl LogFilter {
    /// The directives in force, as they were given.
    pub fn current(&self) -> String {
        self.spec.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Replaces the filter with `spec` (target=level directives). A spec that does not parse
    /// changes nothing and says why.
    pub fn set(&self, spec: &str) -> Result<(), String> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(
                "an empty level: give a level or target=level directives, e.g. `debug` or `info,weft::access=off`"
                    .into(),
            );
        }
        let targets = parse(spec)?;
        self.handle
            .reload(targets)
            .map_err(|e| format!("the log filter could not be replaced: {e}"))?;
        if let Ok(mut current) = self.spec.lock() {
            *current = spec.to_owned();
        }
        Ok(())
    }
}

/// `spec` as a filter. Each directive is a level or `target=level`: a bare word that is not a level
/// would otherwise be taken as a target at every level, and a mistyped `?level=dbug` would silence
/// everything else.
fn parse(spec: &str) -> Result<Targets, String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in spec.split(',').map(str::trim) {
        let level = match directive.split_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            Some(_) => return Err(format!("{spec:?}: {directive:?} names no target")),
            None => directive,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{spec:?}: {level:?} is not a level (trace, debug, info, warn, error, off); directives are LEVEL or TARGET=LEVEL"
            ));
        }
    }
    spec.parse::<Targets>()
        .map_err(|e| format!("{spec:?} is not a list of target=level directives: {e}"))
}

/// A filter for tests: `layer` must be installed (e.g. with `tracing::subscriber::set_default`) for
/// [`LogFilter::set`] to work.
#[cfg(test)]
pub fn detached(spec: &str) -> (LogFilter, reload::Layer<Targets, Registry>) {
    let targets = spec.parse::<Targets>().expect("a valid spec");
    let (layer, handle) = reload::Layer::new(targets);
    (
        LogFilter {
            handle,
            spec: Arc::new(Mutex::new(spec.to_owned())),
        },
        layer,
    )
}

/// Installs the global subscriber; the filter starts from `RUST_LOG` (`info` without it).
pub fn init(format: LogFormat) -> LogFilter {
    let default = || (Targets::new().with_default(LevelFilter::INFO), "info".to_owned());
    let (targets, spec) = match std::env::var("RUST_LOG") {
        Ok(spec) => match parse(&spec) {
            Ok(t) => (t, spec),
            Err(e) => {
                eprintln!("weft-node: RUST_LOG: {e}; logging at info");
                default()
            }
        },
        Err(_) => default(),
    };
    let (filter, handle) = reload::Layer::new(targets);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stdout);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Plain => registry.with(fmt).init(),
        LogFormat::Json => registry
            .with(fmt.json().flatten_event(true).with_current_span(false))
            .init(),
    }
    LogFilter {
        handle,
        spec: Arc::new(Mutex::new(spec)),
    }
}
