//! The API's Service.

use super::*;

/// The in-cluster address of the API Service that [`api_service`] renders
/// (`status.url`): its DNS name, which resolves in every namespace, and its HTTP port.
pub fn api_url(pipeline_name: &str, namespace: &str, p: &OcrPipeline) -> String {
    let scheme = if p.spec.api.tls.is_some() {
        "https"
    } else {
        "http"
    };
    format!(
        "{scheme}://{}.{namespace}.svc:{}",
        object_name(pipeline_name, Role::Api.as_str()),
        p.spec.api.service.port
    )
}

pub(super) fn api_service(ctx: &Ctx) -> Service {
    let spec = &ctx.p.spec.api.service;
    Service {
        metadata: ctx.meta("api", "api"),
        spec: Some(ServiceSpec {
            type_: Some(spec.type_.as_str().into()),
            selector: Some(selector_labels(&ctx.name, "api")),
            ports: Some(vec![
                ServicePort {
                    name: Some("http".into()),
                    port: spec.port,
                    target_port: Some(IntOrString::String("http".into())),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("grpc".into()),
                    port: GRPC_PORT,
                    target_port: Some(IntOrString::String("grpc".into())),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}
