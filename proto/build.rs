//! Compiles proto/ferrotune/v1/*.proto with protox, so building needs no `protoc` on the host.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=ferrotune");
    let fds = protox::compile(["ferrotune/v1/coordinator.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
