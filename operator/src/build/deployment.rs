//! The API, worker and writer Deployments: containers, probes, resources,
//! Pod Security `restricted` contexts, spreading, and the replica hand-over to
//! an autoscaler.

use super::*;

/// A probe of the `http` port; HTTPS where the API serves TLS (the kubelet
/// does not verify the certificate).
fn http_probe(path: &str, period: i32, failures: i32, tls: bool) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            scheme: tls.then(|| "HTTPS".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// Holds liveness and readiness off until `/livez` answers: a worker serves
/// HTTP only once its model is loaded (minutes for a large model on slow
/// storage or a first CUDA initialisation), the API and the writer once
/// their database is connected and migrated. Liveness alone would restart
/// them after a minute.
fn startup_probe(role: Role, tls: bool) -> Probe {
    let failures = match role {
        // 10 minutes.
        Role::Worker => 120,
        // 2 minutes.
        Role::Api | Role::Writer => 24,
    };
    http_probe("/livez", 5, failures, tls)
}

/// CPU and memory requests a role gets when its `resources` leave them out
/// (documented on the CRD's `resources` fields).
pub fn default_requests(role: Role, device: Device) -> [(&'static str, &'static str); 2] {
    match (role, device) {
        (Role::Api, _) => [("cpu", "250m"), ("memory", "256Mi")],
        (Role::Worker, Device::Cpu) => [("cpu", "1"), ("memory", "1Gi")],
        (Role::Worker, Device::Cuda) => [("cpu", "1"), ("memory", "2Gi")],
        (Role::Writer, _) => [("cpu", "100m"), ("memory", "128Mi")],
    }
}

/// Requests of the model download: curl piped into tar.
const FETCHER_REQUESTS: [(&str, &str); 2] = [("cpu", "100m"), ("memory", "64Mi")];

/// The user's resources with a request added for each of `defaults` that
/// they neither request nor limit (a limit alone makes Kubernetes request
/// the limit, and a lower default would change the pod's QoS class).
fn with_default_requests(
    resources: Option<&ResourceRequirements>,
    defaults: &[(&str, &str)],
) -> ResourceRequirements {
    let mut out = resources.cloned().unwrap_or_default();
    for (name, quantity) in defaults {
        let limited = out.limits.as_ref().is_some_and(|l| l.contains_key(*name));
        let requested = out.requests.as_ref().is_some_and(|r| r.contains_key(*name));
        if !limited && !requested {
            out.requests
                .get_or_insert_with(BTreeMap::new)
                .insert((*name).into(), Quantity((*quantity).into()));
        }
    }
    out
}

fn role_resources(ctx: &Ctx, role: Role) -> ResourceRequirements {
    let spec = &ctx.p.spec;
    let user = match role {
        Role::Api => spec.api.resources.as_ref(),
        Role::Worker => spec.worker.resources.as_ref(),
        Role::Writer => spec.writer.resources.as_ref(),
    };
    let defaults = default_requests(role, spec.model.device);
    let mut resources = with_default_requests(user, &defaults);
    if role == Role::Worker && spec.model.device == Device::Cuda {
        resources.limits.get_or_insert_with(BTreeMap::new).insert(
            GPU_RESOURCE.into(),
            Quantity(spec.worker.gpus_per_pod.to_string()),
        );
    }
    resources
}

/// Pod Security `restricted`, pod side: non-root as the image's user, the
/// runtime's default seccomp profile.
fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUNTIME_UID),
        run_as_group: Some(RUNTIME_UID),
        fs_group: Some(RUNTIME_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

/// Pod Security `restricted`, container side, for every container (init
/// containers included): no privilege escalation, no capabilities, and a
/// read-only root filesystem (the containers write only to their volumes).
fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(LinuxCapabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        ..SecurityContext::default()
    }
}

/// Whether `manager` owns the live object's `spec.replicas` through
/// server-side apply.
fn applies_replicas(live: &Deployment, manager: &str) -> bool {
    live.metadata.managed_fields.iter().flatten().any(|entry| {
        entry.manager.as_deref() == Some(manager)
            && entry.operation.as_deref() == Some("Apply")
            && entry.subresource.as_deref().unwrap_or("").is_empty()
            && entry.fields_v1.as_ref().is_some_and(|f| {
                f.0.get("f:spec")
                    .and_then(|s| s.get("f:replicas"))
                    .is_some()
            })
    })
}

/// The apply that keeps a Deployment's replica count when an autoscaler
/// takes it over, to be sent (not forced) with [`REPLICAS_HANDOVER_MANAGER`]
/// before `desired`.
///
/// `desired` leaves `spec.replicas` out once an autoscaler owns the count.
/// While the operator's own apply still owns the field (autoscaling was just
/// switched on), that apply alone would remove it, and the Deployment would
/// fall back to the default of 1 replica until the autoscaler acts. Applying
/// the live count under a second manager first keeps the field owned, at its
/// value; the autoscaler's first scale takes it from that manager.
/// `None` when there is nothing to hand over.
pub fn replicas_handover(desired: &DesiredObject, live: Option<&Deployment>) -> Option<Value> {
    if desired.kind != ManagedKind::Deployment || desired.body.pointer("/spec/replicas").is_some() {
        return None;
    }
    let live = live?;
    let replicas = live.spec.as_ref()?.replicas?;
    if !applies_replicas(live, MANAGER) {
        return None;
    }
    Some(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": desired.name},
        "spec": {"replicas": replicas},
    }))
}

fn anti_affinity(ctx: &Ctx, role: Role) -> Option<Affinity> {
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(&ctx.name, role.as_str())),
            ..LabelSelector::default()
        }),
        topology_key: "kubernetes.io/hostname".into(),
        ..PodAffinityTerm::default()
    };
    let pod_anti_affinity = match ctx.p.spec.availability.anti_affinity {
        AntiAffinity::None => return None,
        AntiAffinity::Preferred => PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: term,
                },
            ]),
            ..PodAntiAffinity::default()
        },
        AntiAffinity::Required => PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![term]),
            ..PodAntiAffinity::default()
        },
    };
    Some(Affinity {
        pod_anti_affinity: Some(pod_anti_affinity),
        ..Affinity::default()
    })
}

pub(super) fn deployment(
    ctx: &Ctx,
    role: Role,
    set_replicas: bool,
    plan: &Plan,
) -> Result<Deployment, BuildError> {
    let spec = &ctx.p.spec;
    let component = role.as_str();
    let port = spec.observability.metrics_port;

    let mut env_vars = vec![
        env(contract_env::CONFIG_FILE, CONFIG_PATH),
        env(contract_env::LOG_FORMAT, "json"),
        secret_env(
            &env_name(keys::DATABASE_URL),
            &spec.database.secret.name,
            &spec.database.secret.key,
        ),
    ];
    env_vars.extend(kafka_env(ctx));
    env_vars.extend(blob_env(ctx));
    if let Some(redis) = &spec.redis {
        env_vars.push(secret_env(
            &env_name(keys::REDIS_URL),
            &redis.secret.name,
            &redis.secret.key,
        ));
    }
    let config = pipeline_config(ctx.p, plan.worker_mode);
    if role == Role::Worker {
        env_vars.extend(per_deployment_env(&config, &keys::WORKER_ONLY)?);
    }
    if role == Role::Writer {
        env_vars.extend(per_deployment_env(&config, &keys::WRITER_ONLY)?);
        env_vars.extend(webhook_secret_env(ctx));
    }
    if role == Role::Api {
        env_vars.extend(per_deployment_env(&config, &keys::API_ONLY)?);
    }
    if let Some(endpoint) = &spec.observability.otlp_endpoint {
        env_vars.push(env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()));
        env_vars.push(env("OTEL_SERVICE_NAME", format!("ocr-{component}")));
    }

    let mut ports = vec![ContainerPort {
        name: Some("http".into()),
        container_port: port,
        ..ContainerPort::default()
    }];
    if role == Role::Api {
        ports.push(ContainerPort {
            name: Some("grpc".into()),
            container_port: GRPC_PORT,
            ..ContainerPort::default()
        });
    }

    let mut mounts = vec![VolumeMount {
        name: "config".into(),
        mount_path: "/etc/ocr".into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: object_name(&ctx.name, "config"),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    if let Some(blob_volume) = &spec.blob.volume {
        mounts.push(VolumeMount {
            name: "blobs".into(),
            mount_path: BLOB_DIR.into(),
            sub_path: blob_volume.sub_path.clone(),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "blobs".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: blob_volume.claim_name.clone(),
                read_only: Some(false),
            }),
            ..Volume::default()
        });
    }
    if role == Role::Api {
        let secrets = [
            ("api-keys", API_KEYS_DIR, spec.api.auth.keys_secret.as_ref()),
            (
                "tls",
                TLS_DIR,
                spec.api.tls.as_ref().map(|tls| &tls.secret_name),
            ),
        ];
        for (name, path, secret) in secrets {
            let Some(secret) = secret else { continue };
            mounts.push(VolumeMount {
                name: name.into(),
                mount_path: path.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
            volumes.push(Volume {
                name: name.into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.clone()),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
        }
    }
    let mut init_containers = Vec::new();
    if role == Role::Worker {
        let source = &spec.model.source;
        mounts.push(VolumeMount {
            name: "models".into(),
            mount_path: MODEL_DIR.into(),
            read_only: Some(true),
            sub_path: source.volume.as_ref().and_then(|v| v.sub_path.clone()),
            ..VolumeMount::default()
        });
        match (&source.volume, &source.url) {
            (Some(volume), _) => volumes.push(Volume {
                name: "models".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: volume.claim_name.clone(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            }),
            (None, url) => {
                volumes.push(Volume {
                    name: "models".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                });
                if let Some(url) = url {
                    init_containers.push(Container {
                        name: "fetch-model".into(),
                        image: Some(spec.images.model_fetcher.clone()),
                        image_pull_policy: Some(spec.images.pull_policy.as_str().into()),
                        command: Some(vec![
                            "sh".into(),
                            "-c".into(),
                            "set -eu; curl -fsSL --retry 5 \"$MODEL_URL\" | tar -xzf - -C /models"
                                .into(),
                        ]),
                        env: Some(vec![env("MODEL_URL", url.clone())]),
                        volume_mounts: Some(vec![VolumeMount {
                            name: "models".into(),
                            mount_path: MODEL_DIR.into(),
                            ..VolumeMount::default()
                        }]),
                        resources: Some(with_default_requests(None, &FETCHER_REQUESTS)),
                        security_context: Some(container_security_context()),
                        ..Container::default()
                    });
                }
            }
        }
    }

    mounts.push(VolumeMount {
        name: "tmp".into(),
        mount_path: TMP_DIR.into(),
        ..VolumeMount::default()
    });
    volumes.push(Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });

    // Only the API serves its front ends over TLS; the other roles' probe
    // and metrics port stays plain.
    let tls = role == Role::Api && spec.api.tls.is_some();
    let (replicas, grace) = match role {
        Role::Api => (spec.api.replicas, 30),
        Role::Worker => (spec.worker.replicas, 60),
        Role::Writer => (spec.writer.replicas, 60),
    };

    let container = Container {
        name: component.into(),
        image: Some(
            spec.images
                .runtime_image(role == Role::Worker && spec.model.device == Device::Cuda),
        ),
        image_pull_policy: Some(spec.images.pull_policy.as_str().into()),
        args: Some(vec![component.into()]),
        env: Some(env_vars),
        ports: Some(ports),
        startup_probe: Some(startup_probe(role, tls)),
        liveness_probe: Some(http_probe("/livez", 10, 6, tls)),
        readiness_probe: Some(http_probe("/readyz", 5, 3, tls)),
        resources: Some(role_resources(ctx, role)),
        volume_mounts: Some(mounts),
        security_context: Some(container_security_context()),
        ..Container::default()
    };

    let (node_selector, tolerations) = if role == Role::Worker {
        (
            Some(spec.worker.node_selector.clone()).filter(|m| !m.is_empty()),
            Some(spec.worker.tolerations.clone()).filter(|t| !t.is_empty()),
        )
    } else {
        (None, None)
    };

    let annotations = BTreeMap::from([
        (CONFIG_HASH_ANNOTATION.to_string(), ctx.config_hash.clone()),
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), port.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);

    // Workers hold GPUs, which are rarely free for a surge pod: replace in place.
    // API and writer pods are cheap: surge so capacity never drops.
    let (max_surge, max_unavailable) = match role {
        Role::Worker => (IntOrString::Int(0), IntOrString::Int(1)),
        Role::Api | Role::Writer => (IntOrString::Int(1), IntOrString::Int(0)),
    };

    let pull_secrets = Some(
        spec.images
            .pull_secrets
            .iter()
            .map(|name| LocalObjectReference { name: name.clone() })
            .collect::<Vec<_>>(),
    )
    .filter(|v| !v.is_empty());

    Ok(Deployment {
        metadata: ctx.meta(component, component),
        spec: Some(DeploymentSpec {
            // Left out when an autoscaler owns the count, so applies do not
            // fight it; `replicas_handover` keeps the count when it changes hands.
            replicas: set_replicas.then_some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&ctx.name, component)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(max_surge),
                    max_unavailable: Some(max_unavailable),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&ctx.name, component)),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    init_containers: Some(init_containers).filter(|c| !c.is_empty()),
                    volumes: Some(volumes),
                    affinity: anti_affinity(ctx, role),
                    node_selector,
                    tolerations,
                    image_pull_secrets: pull_secrets,
                    termination_grace_period_seconds: Some(grace),
                    security_context: Some(pod_security_context()),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    })
}
