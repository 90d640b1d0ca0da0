//! In-process HBONE tests: a test CA, a real server on 127.0.0.1 with a handler that forwards to local
//! application servers, and the pooled client. Loopback only, no root, every wait bounded.

mod support;

mod fuzz;
mod limits;
mod pool;
mod reference;
mod refusals;
mod statuses;
mod tunnel;
