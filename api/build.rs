//! Generates the gRPC code from proto/ with protoc (Debian's protobuf-compiler; `cargo xtask setup`
//! installs it). PROTOC may name another binary.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = std::env::var_os("PROTOC").unwrap_or_else(|| "protoc".into());
    if std::process::Command::new(&protoc).arg("--version").output().is_err() {
        return Err(format!(
            "protoc ({}) not found: run `cargo xtask setup` or install Debian's protobuf-compiler",
            std::path::Path::new(&protoc).display()
        )
        .into());
    }
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/weft/v1/weft.proto"], &["proto"])?;
    Ok(())
}
