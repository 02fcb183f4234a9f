//! Generated protocol types. `v1` is the public API; `internal::v1` is what the router and the
//! pipeline stages speak.

pub mod auth;
pub mod convert;
pub mod transport;

pub mod v1 {
    tonic::include_proto!("mlaserve.v1");
}

pub mod internal {
    pub mod v1 {
        tonic::include_proto!("mlaserve.internal.v1");
    }
}

/// Encoded `FileDescriptorSet` of every proto here, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

/// gRPC server reflection (v1 and v1alpha, so both grpcurl and buf curl work) over every service
/// here and grpc.health.v1.
pub fn reflection_services() -> (
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    (
        builder().build_v1().expect("descriptor sets are valid"),
        builder().build_v1alpha().expect("descriptor sets are valid"),
    )
}
