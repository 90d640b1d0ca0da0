//! HBONE (placeholder; being built).
