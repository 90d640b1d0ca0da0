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
    // The controller's side of Config again, sending `EncodedPush` (the wire form of `Push` with each
    // resource encoded once for all subscribers): see src/encoded.rs. The route is Config's.
    let config = tonic_build::manual::Service::builder()
        .name("Config")
        .package("weft.v1")
        .method(
            tonic_build::manual::Method::builder()
                .name("stream")
                .route_name("Stream")
                .input_type("crate::v1::StreamRequest")
                .output_type("crate::encoded::EncodedPush")
                .codec_path("tonic_prost::ProstCodec")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[config]);
    Ok(())
}
