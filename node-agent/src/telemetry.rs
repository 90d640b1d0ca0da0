//! Logging. `RUST_LOG` selects levels (`info`, `weft::access=off,debug`, ...: target=level
//! directives); access records go to target `weft::access`.
//!
//! Targets, not EnvFilter: the agent needs no span or field filters, and EnvFilter's regex engine
//! would be the largest piece of code in a binary whose resident size is mostly its code.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::{filter::Targets, layer::SubscriberExt as _, util::SubscriberInitExt as _};

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) => spec.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("weft-node: RUST_LOG={spec:?} is not a list of target=level directives ({e}); logging at info");
            Targets::new().with_default(LevelFilter::INFO)
        }),
        Err(_) => Targets::new().with_default(LevelFilter::INFO),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stdout);
    match format {
        LogFormat::Plain => tracing_subscriber::registry().with(fmt).with(filter).init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(fmt.json().flatten_event(true).with_current_span(false))
            .with(filter)
            .init(),
    }
}
