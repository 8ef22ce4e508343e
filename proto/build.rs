fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Operator messages derive Serialize so that `vmha -o json` prints exactly what the
    // controller sent, with no second set of view structs to keep in step.
    tonic_prost_build::configure()
        .type_attribute(".vmha.v1", "#[derive(serde::Serialize)]")
        .compile_protos(&["proto/vmha/v1/agent.proto", "proto/vmha/v1/operator.proto"], &["proto"])?;
    Ok(())
}
