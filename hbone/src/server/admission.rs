//! Admission of client connections before anything is spent on them. The one implementation lives
//! in [`weft_dataplane::admission`], shared with the controller's agent listener; HBONE keeps its
//! names here.

pub use weft_dataplane::admission::{Admission, AdmissionLimits, Admitted, Refused};
