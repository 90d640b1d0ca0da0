#![no_std]
// Exists so that the node agent can depend on this package and rebuild when it changes.
