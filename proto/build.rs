//! Compiles `proto/corral/v1/*.proto` with protox (pure Rust), so a fresh
//! machine builds without a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "corral/v1/common.proto",
        "corral/v1/scheduler.proto",
        "corral/v1/agent.proto",
        "corral/v1/batch.proto",
        "corral/v1/pod.proto",
        "corral/v1/service.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
