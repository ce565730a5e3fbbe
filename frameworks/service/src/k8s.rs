//! Kubernetes Pod manifests (`apiVersion: v1`, `kind: Pod`) as services:
//! [`parse_pod_manifest`] turns one into a one-instance service whose
//! template is a pod, in the wire form ([`pb::ServiceSpec`]) that
//! [`crate::spec::validate`] then checks like any other spec.
//!
//! Supported, and what each becomes:
//!
//! | manifest | service |
//! |---|---|
//! | `metadata.name` | `name` (Corral's name rules: `[A-Za-z0-9_-]`, at most 63) |
//! | `metadata.labels` | `labels` |
//! | `metadata.namespace` | only absent or `default` |
//! | `metadata.annotations["corral.dev/size"]` | size of every persistentVolumeClaim volume (a quantity, e.g. `10Gi`) |
//! | `spec.restartPolicy` | `pod.restart_policy` (default `Always`) |
//! | `spec.terminationGracePeriodSeconds` | `kill_grace_period` (default 30 s, Kubernetes') |
//! | `spec.containers[]` `name`, `image`, `command`, `args` | the container, its entrypoint override and arguments |
//! | `env[]` `name`/`value` | `env` (`valueFrom` is not supported) |
//! | `ports[]` `containerPort`, `name`, `protocol: TCP` | `ports` (names resolve probe ports) |
//! | `resources.requests`/`limits` `cpu`, `memory` | `cpus`, `mem`: the request, else the limit, else 0.1 CPU / 32 MiB |
//! | `volumeMounts[]` `name`, `mountPath`, `readOnly` | `volume_mounts` |
//! | `livenessProbe`, `readinessProbe`, `startupProbe` | `health_checks` with Kubernetes' defaults (period 10 s, timeout 1 s, failure 3, success 1) |
//! | `spec.volumes[]` `emptyDir: {}`, `hostPath.path`, `persistentVolumeClaim.claimName` | `empty_dir`, `host_path`, `persistent` |
//!
//! Anything else is refused, never ignored: the manifest is read as a
//! generic YAML value first, walked against the supported keys, and every
//! unsupported key path is reported in one error (`unsupported fields:
//! spec.containers[0].securityContext, spec.nodeSelector`). The one
//! exception is `status`, which `kubectl get -o yaml` emits and which
//! describes a pod rather than asking for anything: it is ignored. (The
//! other fields that output carries, such as `metadata.uid` and defaulted
//! `spec.dnsPolicy`, are refused like any other: apply the manifest you
//! wrote, not the one the API server returns.)
//!
//! Corral gives a container one amount per resource, used as its limit, so
//! a limit above the request is not honoured (the container gets the
//! request); a limit below the request is an error, as in Kubernetes.
//!
//! A persistentVolumeClaim becomes a persistent volume on the agent named
//! after the claim (`CLAIM-POD-0`, as a StatefulSet names its claims' volumes,
//! since the pod is slot 0 of a one-instance service). There is no claim
//! object to read a size from, so the
//! size comes from the pod annotation `corral.dev/size` (all claims of the
//! pod) or is [`DEFAULT_CLAIM_SIZE_MIB`].

use std::collections::{BTreeMap, HashMap};

use corral_proto::{Amount, pb};
use yaml_serde::{Mapping, Value};

use crate::quantity::{self, QuantityError};
use crate::spec::{self, DEFAULT_CPUS, DEFAULT_MEM_MIB};

/// The pod annotation giving the size of its persistentVolumeClaim volumes.
pub const SIZE_ANNOTATION: &str = "corral.dev/size";
/// Size of a claim without a `corral.dev/size` annotation: 1 GiB, enough
/// for a small database or cache, small enough to fit a laptop agent.
pub const DEFAULT_CLAIM_SIZE_MIB: f64 = 1024.0;
/// Kubernetes' `terminationGracePeriodSeconds` default.
pub const DEFAULT_TERMINATION_GRACE_SECONDS: f64 = 30.0;
/// Kubernetes' probe defaults (`periodSeconds`, `timeoutSeconds`,
/// `failureThreshold`, `successThreshold`); common.proto's timeout default
/// (5 s) differs, so a manifest's probes always carry these explicitly.
const PROBE_PERIOD_SECONDS: i64 = 10;
const PROBE_TIMEOUT_SECONDS: i64 = 1;
const PROBE_FAILURE_THRESHOLD: i64 = 3;
const PROBE_SUCCESS_THRESHOLD: i64 = 1;
/// Largest whole-number field accepted (probe timings and thresholds,
/// the grace period): a day in seconds. Beyond it a probe would never
/// decide anything and a kill would never end.
const MAX_WHOLE_SECONDS: i64 = 86_400;
/// Largest manifest read: a Pod manifest is a few KiB.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;

/// The README quickstart: a web server and a writer sharing an `emptyDir`
/// volume. `web` serves the volume with busybox httpd on port 8080 and has a
/// liveness probe on it; `writer` rewrites `index.html` every 5 seconds.
pub const QUICKSTART_MANIFEST: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: hello
  labels:
    app: hello
spec:
  restartPolicy: Always
  volumes:
    - name: www
      emptyDir: {}
  containers:
    - name: web
      image: busybox:latest
      command: ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]
      ports:
        - containerPort: 8080
          name: http
      resources:
        requests:
          cpu: 100m
          memory: 32Mi
      volumeMounts:
        - name: www
          mountPath: /www
          readOnly: true
      livenessProbe:
        httpGet:
          path: /index.html
          port: http
        initialDelaySeconds: 2
        periodSeconds: 5
    - name: writer
      image: busybox:latest
      command: ["/bin/sh", "-c"]
      args:
        - while true; do echo "hello from $(hostname) at $(date)" > /www/index.html; sleep 5; done
      resources:
        requests:
          cpu: 50m
          memory: 16Mi
      volumeMounts:
        - name: www
          mountPath: /www
"#;

/// A manifest refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest: not YAML: {0}")]
    Yaml(String),
    /// Every key path the translation does not support, in document order.
    #[error("unsupported fields: {}", .0.join(", "))]
    Unsupported(Vec<String>),
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
}

impl ManifestError {
    fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Field {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Reads a Kubernetes Pod manifest into a one-instance pod service.
pub fn parse_pod_manifest(yaml: &str) -> Result<pb::ServiceSpec, ManifestError> {
    if yaml.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::field(
            "manifest",
            format!("larger than {MAX_MANIFEST_BYTES} bytes"),
        ));
    }
    let root: Value = yaml_serde::from_str(yaml).map_err(|e| ManifestError::Yaml(e.to_string()))?;
    let top = Node::root(&root).fields()?;
    // The kind first: walking a Deployment against the Pod's keys would
    // only bury the real problem under a list of "unsupported" fields.
    match top.get("kind").map(|n| n.str()).transpose()? {
        Some("Pod") => {}
        Some(other) => {
            return Err(ManifestError::field(
                "kind",
                format!("'{other}' is not supported: only Pod"),
            ));
        }
        None => return Err(ManifestError::field("kind", "required: Pod")),
    }
    match top.get("apiVersion").map(|n| n.str()).transpose()? {
        Some("v1") => {}
        Some(other) => {
            return Err(ManifestError::field(
                "apiVersion",
                format!("'{other}' is not supported: only v1"),
            ));
        }
        None => return Err(ManifestError::field("apiVersion", "required: v1")),
    }
    let mut unsupported = Vec::new();
    walk(&root, &POD, "", &mut unsupported);
    if !unsupported.is_empty() {
        return Err(ManifestError::Unsupported(unsupported));
    }

    let metadata = top.required("metadata")?.fields()?;
    let name_node = metadata.required("name")?;
    let name = name_node.str()?;
    spec::validate_name(name, &name_node.path)
        .map_err(|e| ManifestError::field(e.field, e.reason))?;
    if let Some(ns) = metadata.get("namespace") {
        let ns_name = ns.str()?;
        if ns_name != "default" {
            return Err(ManifestError::field(
                ns.path,
                format!("'{ns_name}': only the default namespace is supported"),
            ));
        }
    }
    let mut labels = HashMap::new();
    if let Some(l) = metadata.get("labels") {
        for (key, value) in l.fields()?.entries()? {
            labels.insert(key.to_string(), value.str()?.to_string());
        }
    }
    let claim_size = match metadata.get("annotations") {
        Some(a) => match a.fields()?.get(SIZE_ANNOTATION) {
            Some(size) => {
                let mib = quantity::memory_mib(&size.quantity_text()?)
                    .map_err(|e| quantity_error(&size.path, e))?;
                if mib.is_zero() {
                    return Err(ManifestError::field(size.path, "must be > 0"));
                }
                mib.as_f64()
            }
            None => DEFAULT_CLAIM_SIZE_MIB,
        },
        None => DEFAULT_CLAIM_SIZE_MIB,
    };

    let spec = top.required("spec")?.fields()?;
    let restart_policy = match spec.get("restartPolicy") {
        None => pb::PodRestartPolicy::Always,
        Some(p) => match p.str()? {
            "Always" => pb::PodRestartPolicy::Always,
            "OnFailure" => pb::PodRestartPolicy::OnFailure,
            "Never" => pb::PodRestartPolicy::Never,
            other => {
                return Err(ManifestError::field(
                    p.path,
                    format!("'{other}' is not one of Always, OnFailure, Never"),
                ));
            }
        },
    };
    let grace = match spec.get("terminationGracePeriodSeconds") {
        None => DEFAULT_TERMINATION_GRACE_SECONDS,
        Some(g) => g.int(0, MAX_WHOLE_SECONDS)? as f64,
    };
    let volumes = match spec.get("volumes") {
        None => Vec::new(),
        Some(v) => v
            .list()?
            .into_iter()
            .map(|v| volume(v, claim_size))
            .collect::<Result<_, _>>()?,
    };
    let container_nodes = spec.required("containers")?;
    let container_list = container_nodes.list()?;
    if container_list.is_empty() {
        return Err(ManifestError::field(
            container_nodes.path,
            "a pod needs at least one container",
        ));
    }
    let containers = container_list
        .into_iter()
        .map(container)
        .collect::<Result<_, _>>()?;
    Ok(pb::ServiceSpec {
        name: name.to_string(),
        instances: 1,
        kill_grace_period_seconds: Some(grace),
        constraints: Vec::new(),
        restart: None,
        update: None,
        template: Some(pb::service_spec::Template::Pod(pb::PodTemplate {
            restart_policy: restart_policy as i32,
            containers,
            volumes,
        })),
        labels,
    })
}

fn volume(node: Node<'_>, claim_size: f64) -> Result<pb::PodVolumeTemplate, ManifestError> {
    use pb::pod_volume_template::Source;
    let fields = node.fields()?;
    let name = fields.required("name")?.str()?.to_string();
    let mut sources = Vec::new();
    if let Some(e) = fields.get_even_null("emptyDir") {
        e.fields()?;
        sources.push(Source::EmptyDir(pb::EmptyDirVolume {}));
    }
    if let Some(h) = fields.get("hostPath") {
        let path = h.fields()?.required("path")?.str()?.to_string();
        sources.push(Source::HostPath(path));
    }
    if let Some(c) = fields.get("persistentVolumeClaim") {
        let claim = c.fields()?.required("claimName")?;
        let claim_name = claim.str()?;
        spec::validate_name(claim_name, &claim.path)
            .map_err(|e| ManifestError::field(e.field, e.reason))?;
        sources.push(Source::Persistent(pb::PersistentVolumeTemplate {
            size_mib: claim_size,
            claim: claim_name.to_string(),
        }));
    }
    if sources.len() != 1 {
        return Err(ManifestError::field(
            node.path,
            "needs exactly one of emptyDir, hostPath, persistentVolumeClaim",
        ));
    }
    Ok(pb::PodVolumeTemplate {
        name,
        source: sources.pop(),
    })
}

fn container(node: Node<'_>) -> Result<pb::ContainerTemplate, ManifestError> {
    let fields = node.fields()?;
    let name = fields.required("name")?.str()?.to_string();
    let image = fields.required("image")?.str()?.to_string();
    let strings = |key: &str| -> Result<Vec<String>, ManifestError> {
        match fields.get(key) {
            None => Ok(Vec::new()),
            Some(list) => list
                .list()?
                .into_iter()
                .map(|s| s.str().map(str::to_string))
                .collect(),
        }
    };
    let command = strings("command")?;
    let args = strings("args")?;
    let mut env = HashMap::new();
    if let Some(list) = fields.get("env") {
        for item in list.list()? {
            let var = item.fields()?;
            let key = var.required("name")?;
            let value = match var.get("value") {
                Some(v) => v.str()?.to_string(),
                None => String::new(),
            };
            if env.insert(key.str()?.to_string(), value).is_some() {
                return Err(ManifestError::field(
                    key.path.clone(),
                    format!("duplicate variable '{}'", key.str()?),
                ));
            }
        }
    }
    // Named ports, for probes that refer to a port by name.
    let mut ports = Vec::new();
    let mut port_names: BTreeMap<String, u32> = BTreeMap::new();
    if let Some(list) = fields.get("ports") {
        for item in list.list()? {
            let p = item.fields()?;
            let number = p.required("containerPort")?.int(1, 65_535)? as u32;
            if let Some(protocol) = p.get("protocol") {
                let text = protocol.str()?;
                if text != "TCP" {
                    return Err(ManifestError::field(
                        protocol.path,
                        format!("only TCP is supported, not '{text}'"),
                    ));
                }
            }
            if let Some(n) = p.get("name")
                && port_names.insert(n.str()?.to_string(), number).is_some()
            {
                return Err(ManifestError::field(
                    n.path.clone(),
                    format!("duplicate port name '{}'", n.str()?),
                ));
            }
            ports.push(number);
        }
    }
    let (cpus, mem) = resources(&fields)?;
    let mut volume_mounts = Vec::new();
    if let Some(list) = fields.get("volumeMounts") {
        for item in list.list()? {
            let m = item.fields()?;
            volume_mounts.push(pb::VolumeMount {
                name: m.required("name")?.str()?.to_string(),
                path: m.required("mountPath")?.str()?.to_string(),
                read_only: match m.get("readOnly") {
                    Some(r) => r.bool()?,
                    None => false,
                },
            });
        }
    }
    let mut health_checks = Vec::new();
    for (key, kind) in [
        ("livenessProbe", pb::health_check::Kind::Liveness),
        ("readinessProbe", pb::health_check::Kind::Readiness),
        ("startupProbe", pb::health_check::Kind::Startup),
    ] {
        if let Some(p) = fields.get(key) {
            health_checks.push(probe(p, kind, &port_names)?);
        }
    }
    Ok(pb::ContainerTemplate {
        name,
        image,
        command,
        args,
        env,
        cpus: cpus.as_f64(),
        mem_mib: mem.as_f64(),
        ports,
        volume_mounts,
        health_checks,
    })
}

/// `(cpus, mem)`: the request, else the limit, else Corral's defaults.
fn resources(container: &Fields<'_>) -> Result<(Amount, Amount), ManifestError> {
    let (mut requests, mut limits) = (None, None);
    if let Some(r) = container.get("resources") {
        let r = r.fields()?;
        requests = r.get("requests").map(|n| n.fields()).transpose()?;
        limits = r.get("limits").map(|n| n.fields()).transpose()?;
    }
    let read = |list: &Option<Fields<'_>>,
                key: &str,
                parse: fn(&str) -> Result<Amount, QuantityError>|
     -> Result<Option<(Amount, String)>, ManifestError> {
        let Some(node) = list.as_ref().and_then(|l| l.get(key)) else {
            return Ok(None);
        };
        let text = node.quantity_text()?;
        let amount = parse(&text).map_err(|e| quantity_error(&node.path, e))?;
        if amount.is_zero() {
            return Err(ManifestError::field(node.path, "must be > 0"));
        }
        Ok(Some((amount, node.path)))
    };
    let pick = |key: &str,
                parse: fn(&str) -> Result<Amount, QuantityError>,
                default: f64|
     -> Result<Amount, ManifestError> {
        let request = read(&requests, key, parse)?;
        let limit = read(&limits, key, parse)?;
        if let (Some((request, _)), Some((limit, path))) = (&request, &limit)
            && limit < request
        {
            return Err(ManifestError::field(
                path.clone(),
                format!("is below the request ({request})"),
            ));
        }
        match request.or(limit) {
            Some((amount, _)) => Ok(amount),
            None => {
                Amount::from_f64(default, key).map_err(|e| ManifestError::field(e.field, e.reason))
            }
        }
    };
    Ok((
        pick("cpu", quantity::cpu_amount, DEFAULT_CPUS)?,
        pick("memory", quantity::memory_mib, DEFAULT_MEM_MIB)?,
    ))
}

fn probe(
    node: Node<'_>,
    kind: pb::health_check::Kind,
    port_names: &BTreeMap<String, u32>,
) -> Result<pb::HealthCheck, ManifestError> {
    use pb::health_check::{Kind, Probe as P};
    let fields = node.fields()?;
    let port = |n: Node<'_>| -> Result<u32, ManifestError> {
        match n.value {
            Value::String(name) => port_names.get(name.as_str()).copied().ok_or_else(|| {
                ManifestError::field(n.path.clone(), format!("no port named '{name}'"))
            }),
            _ => Ok(n.int(1, 65_535)? as u32),
        }
    };
    let mut probes = Vec::new();
    if let Some(exec) = fields.get("exec") {
        let command = exec.fields()?.required("command")?;
        let argv: Vec<String> = command
            .list()?
            .into_iter()
            .map(|s| s.str().map(str::to_string))
            .collect::<Result<_, _>>()?;
        if argv.first().is_none_or(String::is_empty) {
            return Err(ManifestError::field(command.path, "must not be empty"));
        }
        probes.push(P::Command(pb::CommandProbe {
            shell: false,
            value: argv[0].clone(),
            arguments: argv,
        }));
    }
    if let Some(http) = fields.get("httpGet") {
        let h = http.fields()?;
        if let Some(scheme) = h.get("scheme") {
            let text = scheme.str()?;
            if text != "HTTP" {
                return Err(ManifestError::field(
                    scheme.path,
                    format!("only HTTP is supported, not '{text}'"),
                ));
            }
        }
        probes.push(P::Http(pb::HttpProbe {
            scheme: "http".into(),
            port: port(h.required("port")?)?,
            path: match h.get("path") {
                Some(p) => p.str()?.to_string(),
                None => "/".into(),
            },
        }));
    }
    if let Some(tcp) = fields.get("tcpSocket") {
        probes.push(P::Tcp(pb::TcpProbe {
            port: port(tcp.fields()?.required("port")?)?,
        }));
    }
    if probes.len() != 1 {
        return Err(ManifestError::field(
            node.path,
            "needs exactly one of exec, httpGet, tcpSocket",
        ));
    }
    let int = |key: &str, min: i64, default: i64| -> Result<i64, ManifestError> {
        match fields.get(key) {
            None => Ok(default),
            Some(n) => n.int(min, MAX_WHOLE_SECONDS),
        }
    };
    let success = int("successThreshold", 1, PROBE_SUCCESS_THRESHOLD)?;
    if success != 1 && kind != Kind::Readiness {
        return Err(ManifestError::field(
            format!("{}.successThreshold", node.path),
            "must be 1 for liveness and startup probes",
        ));
    }
    Ok(pb::HealthCheck {
        kind: kind as i32,
        probe: probes.pop(),
        delay_seconds: Some(int("initialDelaySeconds", 0, 0)? as f64),
        interval_seconds: Some(int("periodSeconds", 1, PROBE_PERIOD_SECONDS)? as f64),
        timeout_seconds: Some(int("timeoutSeconds", 1, PROBE_TIMEOUT_SECONDS)? as f64),
        grace_period_seconds: None,
        consecutive_failures: Some(int("failureThreshold", 1, PROBE_FAILURE_THRESHOLD)? as u32),
        consecutive_successes: Some(success as u32),
    })
}

fn quantity_error(path: &str, e: QuantityError) -> ManifestError {
    ManifestError::field(path, e.to_string())
}

// ---------------------------------------------------------------------------
// The supported keys.

/// What the walk expects at a place in the manifest. Only keys are checked
/// here; types and values are checked while translating, with the path.
enum Shape {
    /// A value; its type is checked when it is read.
    Leaf,
    List(&'static Shape),
    /// A mapping with exactly these keys supported.
    Object(&'static [(&'static str, Shape)]),
    /// A mapping with any keys (labels).
    AnyKeys,
    /// Read by nobody and not reported (`status`).
    Ignored,
}

use Shape::{AnyKeys, Ignored, Leaf, List, Object};

const RESOURCE_LIST: Shape = Object(&[("cpu", Leaf), ("memory", Leaf)]);

const PROBE: Shape = Object(&[
    ("exec", Object(&[("command", List(&Leaf))])),
    (
        "httpGet",
        Object(&[("path", Leaf), ("port", Leaf), ("scheme", Leaf)]),
    ),
    ("tcpSocket", Object(&[("port", Leaf)])),
    ("initialDelaySeconds", Leaf),
    ("periodSeconds", Leaf),
    ("timeoutSeconds", Leaf),
    ("failureThreshold", Leaf),
    ("successThreshold", Leaf),
]);

const CONTAINER: Shape = Object(&[
    ("name", Leaf),
    ("image", Leaf),
    ("command", List(&Leaf)),
    ("args", List(&Leaf)),
    ("env", List(&Object(&[("name", Leaf), ("value", Leaf)]))),
    (
        "ports",
        List(&Object(&[
            ("containerPort", Leaf),
            ("name", Leaf),
            ("protocol", Leaf),
        ])),
    ),
    (
        "resources",
        Object(&[("requests", RESOURCE_LIST), ("limits", RESOURCE_LIST)]),
    ),
    (
        "volumeMounts",
        List(&Object(&[
            ("name", Leaf),
            ("mountPath", Leaf),
            ("readOnly", Leaf),
        ])),
    ),
    ("livenessProbe", PROBE),
    ("readinessProbe", PROBE),
    ("startupProbe", PROBE),
]);

const VOLUME: Shape = Object(&[
    ("name", Leaf),
    ("emptyDir", Object(&[])),
    ("hostPath", Object(&[("path", Leaf)])),
    ("persistentVolumeClaim", Object(&[("claimName", Leaf)])),
]);

const POD: Shape = Object(&[
    ("apiVersion", Leaf),
    ("kind", Leaf),
    (
        "metadata",
        Object(&[
            ("name", Leaf),
            ("namespace", Leaf),
            ("labels", AnyKeys),
            ("annotations", Object(&[(SIZE_ANNOTATION, Leaf)])),
        ]),
    ),
    (
        "spec",
        Object(&[
            ("containers", List(&CONTAINER)),
            ("volumes", List(&VOLUME)),
            ("restartPolicy", Leaf),
            ("terminationGracePeriodSeconds", Leaf),
        ]),
    ),
    ("status", Ignored),
]);

/// Collects the path of every key `value` has that `shape` does not
/// support, in document order. Values of the wrong type are left to the
/// translation, which reports them with their path.
fn walk(value: &Value, shape: &Shape, path: &str, out: &mut Vec<String>) {
    match (shape, value) {
        (Object(keys), Value::Mapping(map)) => {
            for (key, child) in map {
                let key_path = child_path(path, key);
                match key
                    .as_str()
                    .and_then(|k| keys.iter().find(|(name, _)| *name == k))
                {
                    Some((_, child_shape)) => walk(child, child_shape, &key_path, out),
                    None => out.push(key_path),
                }
            }
        }
        (List(item), Value::Sequence(items)) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, item, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// `parent.key`, or `parent["odd/key"]` for keys that are not plain words
/// (annotations and labels have dots and slashes).
fn child_path(parent: &str, key: &Value) -> String {
    let key = match key {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        _ => "?".into(),
    };
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (parent.is_empty(), plain) {
        (true, true) => key,
        (false, true) => format!("{parent}.{key}"),
        (_, false) => format!("{parent}[{key:?}]"),
    }
}

// ---------------------------------------------------------------------------
// Reading values with their paths.

/// A value and where it is in the manifest (a manifest is a few KiB, so
/// every node owning its path costs nothing worth saving).
#[derive(Clone)]
struct Node<'a> {
    value: &'a Value,
    path: String,
}

/// The fields of a mapping node.
struct Fields<'a> {
    /// `None` for a `null` read as an empty mapping.
    map: Option<&'a Mapping>,
    path: String,
}

impl<'a> Node<'a> {
    fn root(value: &'a Value) -> Self {
        Self {
            value,
            path: String::new(),
        }
    }

    fn type_error(&self, what: &str) -> ManifestError {
        let field = if self.path.is_empty() {
            "manifest".to_string()
        } else {
            self.path.clone()
        };
        ManifestError::field(field, format!("must be {what}"))
    }

    /// A mapping's fields; `null` (`emptyDir:`) reads as an empty mapping.
    fn fields(&self) -> Result<Fields<'a>, ManifestError> {
        match self.value {
            Value::Mapping(map) => Ok(Fields {
                map: Some(map),
                path: self.path.clone(),
            }),
            Value::Null => Ok(Fields {
                map: None,
                path: self.path.clone(),
            }),
            _ => Err(self.type_error("a mapping")),
        }
    }

    fn str(&self) -> Result<&'a str, ManifestError> {
        match self.value {
            Value::String(s) => Ok(s),
            _ => Err(self.type_error("a string")),
        }
    }

    fn bool(&self) -> Result<bool, ManifestError> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.type_error("true or false")),
        }
    }

    fn int(&self, min: i64, max: i64) -> Result<i64, ManifestError> {
        match self.value {
            Value::Number(n) => match n.as_i64() {
                Some(v) if (min..=max).contains(&v) => Ok(v),
                _ => Err(self.type_error(&format!("a whole number from {min} to {max}"))),
            },
            _ => Err(self.type_error(&format!("a whole number from {min} to {max}"))),
        }
    }

    fn list(&self) -> Result<Vec<Node<'a>>, ManifestError> {
        match self.value {
            Value::Sequence(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, value)| Node {
                    value,
                    path: format!("{}[{i}]", self.path),
                })
                .collect()),
            // `args:` with nothing after it: no arguments.
            Value::Null => Ok(Vec::new()),
            _ => Err(self.type_error("a list")),
        }
    }

    /// A quantity's text: YAML reads `cpu: 1` and `cpu: 0.5` as numbers,
    /// which print back as the same quantity (`1`, `0.5`, `1e20`).
    fn quantity_text(&self) -> Result<String, ManifestError> {
        match self.value {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            _ => Err(self.type_error("a quantity such as 500m or 128Mi")),
        }
    }
}

impl<'a> Fields<'a> {
    /// The field, if present and not `null` (Kubernetes reads an explicit
    /// null as unset).
    fn get(&self, key: &str) -> Option<Node<'a>> {
        self.get_even_null(key).filter(|n| !n.value.is_null())
    }

    /// The field even when it is `null`: for `emptyDir:`, where being
    /// there is what counts.
    fn get_even_null(&self, key: &str) -> Option<Node<'a>> {
        let value = self.map?.get(key)?;
        Some(Node {
            value,
            path: child_path(&self.path, &Value::String(key.to_string())),
        })
    }

    fn required(&self, key: &str) -> Result<Node<'a>, ManifestError> {
        self.get(key).ok_or_else(|| {
            ManifestError::field(
                child_path(&self.path, &Value::String(key.to_string())),
                "required",
            )
        })
    }

    /// Every `(key, value)`, for mappings with free keys (labels). A key
    /// that is not a string is refused.
    fn entries(&self) -> Result<Vec<(&'a str, Node<'a>)>, ManifestError> {
        let Some(map) = self.map else {
            return Ok(Vec::new());
        };
        map.iter()
            .map(|(key, value)| {
                let path = child_path(&self.path, key);
                match key.as_str() {
                    Some(k) => Ok((k, Node { value, path })),
                    None => Err(ManifestError::field(path, "keys must be strings")),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{self, HealthCheckKind, Probe, ProbeCommand, Template, VolumeSource};
    use pb::health_check::{Kind, Probe as P};

    /// Every supported field, some in more than one form.
    const FULL: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: shop
  namespace: default
  labels:
    app: shop
    app.kubernetes.io/version: "2"
  annotations:
    corral.dev/size: 2Gi
spec:
  restartPolicy: OnFailure
  terminationGracePeriodSeconds: 45
  volumes:
    - name: scratch
      emptyDir: {}
    - name: config
      hostPath:
        path: /etc/shop
    - name: db
      persistentVolumeClaim:
        claimName: shop-db
    - name: tmp
      emptyDir:
  containers:
    - name: api
      image: registry:5000/shop/api:2
      command: ["/app/api"]
      args: ["--port", "8080"]
      env:
        - name: MODE
          value: production
        - name: EMPTY
      ports:
        - containerPort: 8080
          name: http
          protocol: TCP
        - containerPort: 9090
      resources:
        requests:
          cpu: 500m
          memory: 128Mi
        limits:
          cpu: 1
          memory: 1Gi
      volumeMounts:
        - name: scratch
          mountPath: /scratch
        - name: config
          mountPath: /etc/shop
          readOnly: true
        - name: db
          mountPath: /var/lib/shop
          readOnly: false
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
          scheme: HTTP
        initialDelaySeconds: 5
        periodSeconds: 7
        timeoutSeconds: 2
        failureThreshold: 4
        successThreshold: 1
      readinessProbe:
        tcpSocket:
          port: 9090
        successThreshold: 3
      startupProbe:
        exec:
          command: ["cat", "/tmp/started"]
        failureThreshold: 30
        periodSeconds: 1
    - name: worker
      image: busybox
      resources:
        limits:
          cpu: 0.25
          memory: 100M
      volumeMounts:
        - name: tmp
          mountPath: /tmp
status:
  phase: Running
  podIP: 10.0.0.7
"#;

    fn error(yaml: &str) -> ManifestError {
        parse_pod_manifest(yaml).expect_err("manifest should be refused")
    }

    fn field_error(yaml: &str) -> (String, String) {
        match error(yaml) {
            ManifestError::Field { field, reason } => (field, reason),
            other => panic!("not a field error: {other}"),
        }
    }

    /// A one-container pod with `extra` lines added to the container.
    fn with_container(extra: &str) -> String {
        let mut yaml = String::from(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n    - name: c\n      image: busybox\n",
        );
        for line in extra.lines() {
            yaml.push_str("      ");
            yaml.push_str(line);
            yaml.push('\n');
        }
        yaml
    }

    #[test]
    fn the_readme_quickstart_shows_exactly_this_manifest() {
        let readme = include_str!("../../../README.md");
        assert!(
            readme.contains(&format!("```yaml\n{QUICKSTART_MANIFEST}```")),
            "README.md's quickstart manifest and QUICKSTART_MANIFEST differ"
        );
    }

    #[test]
    fn the_quickstart_manifest_parses_and_validates() {
        let spec = parse_pod_manifest(QUICKSTART_MANIFEST).unwrap();
        let service = spec::validate(&spec).unwrap();
        assert_eq!(service.name, "hello");
        assert_eq!(service.instances, 1);
        let Template::Pod(pod) = &service.template else {
            panic!("not a pod");
        };
        assert_eq!(pod.volumes[0].source, VolumeSource::EmptyDir);
        let (web, writer) = (&pod.containers[0], &pod.containers[1]);
        assert_eq!(web.ports, [8080]);
        assert!(web.volume_mounts[0].read_only);
        assert!(!writer.volume_mounts[0].read_only);
        assert_eq!(web.volume_mounts[0].volume, writer.volume_mounts[0].volume);
        // The probe's named port resolves to the container port.
        assert_eq!(
            web.health_checks[0].probe,
            Probe::Http {
                port: 8080,
                path: "/index.html".into()
            }
        );
        assert_eq!(writer.command, ["/bin/sh", "-c"]);
        assert!(writer.args[0].contains("/www/index.html"));
    }

    #[test]
    fn a_full_manifest_maps_field_by_field() {
        let spec = parse_pod_manifest(FULL).unwrap();
        assert_eq!(spec.name, "shop");
        assert_eq!(spec.instances, 1);
        assert_eq!(spec.kill_grace_period_seconds, Some(45.0));
        assert_eq!(spec.labels["app"], "shop");
        assert_eq!(spec.labels["app.kubernetes.io/version"], "2");
        assert!(spec.constraints.is_empty() && spec.restart.is_none() && spec.update.is_none());
        let Some(pb::service_spec::Template::Pod(pod)) = &spec.template else {
            panic!("not a pod");
        };
        assert_eq!(pod.restart_policy, pb::PodRestartPolicy::OnFailure as i32);
        use pb::pod_volume_template::Source;
        let sources: Vec<_> = pod
            .volumes
            .iter()
            .map(|v| (v.name.as_str(), v.source.clone()))
            .collect();
        assert_eq!(
            sources,
            [
                ("scratch", Some(Source::EmptyDir(pb::EmptyDirVolume {}))),
                ("config", Some(Source::HostPath("/etc/shop".into()))),
                (
                    "db",
                    Some(Source::Persistent(pb::PersistentVolumeTemplate {
                        size_mib: 2048.0,
                        claim: "shop-db".into(),
                    }))
                ),
                // `emptyDir:` with nothing after it is still an emptyDir.
                ("tmp", Some(Source::EmptyDir(pb::EmptyDirVolume {}))),
            ]
        );

        let api = &pod.containers[0];
        assert_eq!(api.name, "api");
        assert_eq!(api.image, "registry:5000/shop/api:2");
        assert_eq!(api.command, ["/app/api"]);
        assert_eq!(api.args, ["--port", "8080"]);
        assert_eq!(api.env["MODE"], "production");
        assert_eq!(api.env["EMPTY"], "");
        assert_eq!(api.ports, [8080, 9090]);
        // Requests win over limits.
        assert_eq!(api.cpus, 0.5);
        assert_eq!(api.mem_mib, 128.0);
        let mounts: Vec<_> = api
            .volume_mounts
            .iter()
            .map(|m| (m.name.as_str(), m.path.as_str(), m.read_only))
            .collect();
        assert_eq!(
            mounts,
            [
                ("scratch", "/scratch", false),
                ("config", "/etc/shop", true),
                ("db", "/var/lib/shop", false),
            ]
        );
        assert_eq!(
            api.health_checks,
            [
                pb::HealthCheck {
                    kind: Kind::Liveness as i32,
                    probe: Some(P::Http(pb::HttpProbe {
                        scheme: "http".into(),
                        port: 8080,
                        path: "/healthz".into(),
                    })),
                    delay_seconds: Some(5.0),
                    interval_seconds: Some(7.0),
                    timeout_seconds: Some(2.0),
                    grace_period_seconds: None,
                    consecutive_failures: Some(4),
                    consecutive_successes: Some(1),
                },
                // Kubernetes' defaults where the probe says nothing.
                pb::HealthCheck {
                    kind: Kind::Readiness as i32,
                    probe: Some(P::Tcp(pb::TcpProbe { port: 9090 })),
                    delay_seconds: Some(0.0),
                    interval_seconds: Some(10.0),
                    timeout_seconds: Some(1.0),
                    grace_period_seconds: None,
                    consecutive_failures: Some(3),
                    consecutive_successes: Some(3),
                },
                pb::HealthCheck {
                    kind: Kind::Startup as i32,
                    probe: Some(P::Command(pb::CommandProbe {
                        shell: false,
                        value: "cat".into(),
                        arguments: vec!["cat".into(), "/tmp/started".into()],
                    })),
                    delay_seconds: Some(0.0),
                    interval_seconds: Some(1.0),
                    timeout_seconds: Some(1.0),
                    grace_period_seconds: None,
                    consecutive_failures: Some(30),
                    consecutive_successes: Some(1),
                },
            ]
        );
        let worker = &pod.containers[1];
        // Limits stand in for missing requests; 100M bytes round up to
        // the next thousandth of a MiB.
        assert_eq!(worker.cpus, 0.25);
        assert_eq!(worker.mem_mib, 95.368);
        assert!(worker.command.is_empty() && worker.args.is_empty());

        // And the result is a valid service; the claim makes it replace
        // instances in place.
        let service = spec::validate(&spec).unwrap();
        let Template::Pod(p) = &service.template else {
            panic!("not a pod");
        };
        assert_eq!(
            p.containers[0].health_checks[2].probe,
            Probe::Command(ProbeCommand::Argv(vec![
                "cat".into(),
                "/tmp/started".into()
            ]))
        );
        assert_eq!(
            p.containers[0].health_checks[1].kind,
            HealthCheckKind::Readiness
        );
        assert_eq!(service.update.limits(1), (0, 1));
    }

    #[test]
    fn a_bare_pod_takes_kubernetes_and_corral_defaults() {
        let spec = parse_pod_manifest(&with_container("")).unwrap();
        assert_eq!(
            spec.kill_grace_period_seconds,
            Some(DEFAULT_TERMINATION_GRACE_SECONDS)
        );
        let Some(pb::service_spec::Template::Pod(pod)) = &spec.template else {
            panic!("not a pod");
        };
        assert_eq!(pod.restart_policy, pb::PodRestartPolicy::Always as i32);
        assert_eq!(pod.containers[0].cpus, DEFAULT_CPUS);
        assert_eq!(pod.containers[0].mem_mib, DEFAULT_MEM_MIB);
        // Claims without the size annotation get the default size.
        let yaml = format!(
            "{}  volumes:\n    - name: d\n      persistentVolumeClaim:\n        claimName: d\n",
            with_container("")
        );
        let Some(pb::service_spec::Template::Pod(pod)) =
            parse_pod_manifest(&yaml).unwrap().template
        else {
            panic!("not a pod");
        };
        assert_eq!(
            pod.volumes[0].source,
            Some(pb::pod_volume_template::Source::Persistent(
                pb::PersistentVolumeTemplate {
                    size_mib: DEFAULT_CLAIM_SIZE_MIB,
                    claim: "d".into(),
                }
            ))
        );
        spec::validate(&spec).unwrap();
    }

    #[test]
    fn every_unsupported_field_is_listed_in_one_error() {
        let yaml = r#"
apiVersion: v1
kind: Pod
metadata:
  name: p
  uid: 1234
  annotations:
    corral.dev/size: 1Gi
    kubectl.kubernetes.io/last-applied-configuration: "{}"
spec:
  nodeSelector:
    disk: ssd
  containers:
    - name: a
      image: busybox
      securityContext:
        privileged: true
      env:
        - name: X
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
      resources:
        requests:
          cpu: 1
          ephemeral-storage: 1Gi
      livenessProbe:
        httpGet:
          port: 80
          httpHeaders: []
    - name: b
      image: busybox
      ports:
        - containerPort: 80
          hostPort: 80
  volumes:
    - name: v
      emptyDir:
        medium: Memory
    - name: h
      hostPath:
        path: /x
        type: Directory
  hostNetwork: true
"#;
        assert_eq!(
            error(yaml),
            ManifestError::Unsupported(
                [
                    "metadata.uid",
                    "metadata.annotations[\"kubectl.kubernetes.io/last-applied-configuration\"]",
                    "spec.nodeSelector",
                    "spec.containers[0].securityContext",
                    "spec.containers[0].env[0].valueFrom",
                    "spec.containers[0].resources.requests.ephemeral-storage",
                    "spec.containers[0].livenessProbe.httpGet.httpHeaders",
                    "spec.containers[1].ports[0].hostPort",
                    "spec.volumes[0].emptyDir.medium",
                    "spec.volumes[1].hostPath.type",
                    "spec.hostNetwork",
                ]
                .map(String::from)
                .to_vec()
            )
        );
        assert!(
            error(yaml)
                .to_string()
                .starts_with("unsupported fields: metadata.uid, metadata.annotations")
        );
        // One field alone is listed alone.
        assert_eq!(
            error(&with_container("stdin: true")).to_string(),
            "unsupported fields: spec.containers[0].stdin"
        );
    }

    #[test]
    fn status_is_ignored() {
        let yaml = format!(
            "{}status:\n  phase: Running\n  anything:\n    at: all\n",
            with_container("")
        );
        assert_eq!(
            parse_pod_manifest(&yaml).unwrap(),
            parse_pod_manifest(&with_container("")).unwrap()
        );
    }

    #[test]
    fn only_v1_pods_are_read() {
        let deployment =
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\nspec:\n  replicas: 3\n";
        assert_eq!(
            field_error(deployment),
            (
                "kind".into(),
                "'Deployment' is not supported: only Pod".into()
            )
        );
        let yaml = with_container("").replace("apiVersion: v1", "apiVersion: v2");
        assert_eq!(
            field_error(&yaml),
            ("apiVersion".into(), "'v2' is not supported: only v1".into())
        );
        let yaml = with_container("").replace("apiVersion: v1\n", "");
        assert_eq!(field_error(&yaml).0, "apiVersion");
        let yaml = with_container("").replace("kind: Pod\n", "");
        assert_eq!(field_error(&yaml).0, "kind");
    }

    #[test]
    fn bad_quantities_name_the_field() {
        let (field, reason) =
            field_error(&with_container("resources:\n  requests:\n    cpu: 1.2.3"));
        assert_eq!(field, "spec.containers[0].resources.requests.cpu");
        assert!(reason.starts_with("'1.2.3' is not a quantity"), "{reason}");
        for (extra, field) in [
            (
                "resources:\n  limits:\n    memory: 12 GB",
                "spec.containers[0].resources.limits.memory",
            ),
            (
                "resources:\n  requests:\n    cpu: -1",
                "spec.containers[0].resources.requests.cpu",
            ),
            (
                "resources:\n  requests:\n    cpu: 0.0001",
                "spec.containers[0].resources.requests.cpu",
            ),
            (
                "resources:\n  requests:\n    memory: 0",
                "spec.containers[0].resources.requests.memory",
            ),
            (
                "resources:\n  requests:\n    memory: [1]",
                "spec.containers[0].resources.requests.memory",
            ),
            (
                "resources:\n  requests:\n    cpu: 1e20",
                "spec.containers[0].resources.requests.cpu",
            ),
        ] {
            assert_eq!(field_error(&with_container(extra)).0, field, "{extra}");
        }
        let yaml = with_container("").replace(
            "  name: p\n",
            "  name: p\n  annotations:\n    corral.dev/size: lots\n",
        );
        assert_eq!(
            field_error(&yaml).0,
            "metadata.annotations[\"corral.dev/size\"]"
        );
    }

    #[test]
    fn yaml_numbers_are_quantities_too() {
        let spec = parse_pod_manifest(&with_container(
            "resources:\n  requests:\n    cpu: 0.1\n    memory: 1048576",
        ))
        .unwrap();
        let Some(pb::service_spec::Template::Pod(pod)) = spec.template else {
            panic!("not a pod");
        };
        assert_eq!(pod.containers[0].cpus, 0.1);
        assert_eq!(pod.containers[0].mem_mib, 1.0);
    }

    #[test]
    fn limits_below_requests_are_refused() {
        let (field, reason) = field_error(&with_container(
            "resources:\n  requests:\n    memory: 1Gi\n  limits:\n    memory: 512Mi",
        ));
        assert_eq!(field, "spec.containers[0].resources.limits.memory");
        assert_eq!(reason, "is below the request (1024)");
        // Equal is fine.
        parse_pod_manifest(&with_container(
            "resources:\n  requests:\n    cpu: 500m\n  limits:\n    cpu: 0.5",
        ))
        .unwrap();
    }

    #[test]
    fn bad_values_name_the_manifest_field() {
        for (yaml, field) in [
            (
                with_container("ports:\n  - containerPort: 53\n    protocol: UDP"),
                "spec.containers[0].ports[0].protocol",
            ),
            (
                with_container("ports:\n  - containerPort: 70000"),
                "spec.containers[0].ports[0].containerPort",
            ),
            (
                with_container("ports:\n  - name: x"),
                "spec.containers[0].ports[0].containerPort",
            ),
            (
                with_container(
                    "ports:\n  - containerPort: 1\n    name: x\n  - containerPort: 2\n    name: x",
                ),
                "spec.containers[0].ports[1].name",
            ),
            (
                with_container("livenessProbe:\n  httpGet:\n    port: 80\n    scheme: HTTPS"),
                "spec.containers[0].livenessProbe.httpGet.scheme",
            ),
            (
                with_container("livenessProbe:\n  httpGet:\n    port: web"),
                "spec.containers[0].livenessProbe.httpGet.port",
            ),
            (
                with_container("livenessProbe:\n  tcpSocket:\n    port: 80\n  successThreshold: 2"),
                "spec.containers[0].livenessProbe.successThreshold",
            ),
            (
                with_container("livenessProbe:\n  tcpSocket:\n    port: 80\n  periodSeconds: 0"),
                "spec.containers[0].livenessProbe.periodSeconds",
            ),
            (
                with_container("livenessProbe:\n  tcpSocket:\n    port: 80\n  timeoutSeconds: 1.5"),
                "spec.containers[0].livenessProbe.timeoutSeconds",
            ),
            (
                with_container("readinessProbe:\n  initialDelaySeconds: 1"),
                "spec.containers[0].readinessProbe",
            ),
            (
                with_container(
                    "startupProbe:\n  exec:\n    command: [\"true\"]\n  tcpSocket:\n    port: 1",
                ),
                "spec.containers[0].startupProbe",
            ),
            (
                with_container("startupProbe:\n  exec:\n    command: []"),
                "spec.containers[0].startupProbe.exec.command",
            ),
            (
                with_container("env:\n  - name: A\n    value: x\n  - name: A\n    value: y"),
                "spec.containers[0].env[1].name",
            ),
            (
                with_container("env:\n  - name: A\n    value: 1"),
                "spec.containers[0].env[0].value",
            ),
            (
                with_container("command: /bin/sh"),
                "spec.containers[0].command",
            ),
            (with_container("args: [1, 2]"), "spec.containers[0].args[0]"),
            (
                with_container("volumeMounts:\n  - name: v"),
                "spec.containers[0].volumeMounts[0].mountPath",
            ),
            (
                with_container("volumeMounts:\n  - name: v\n    mountPath: /v\n    readOnly: yes"),
                "spec.containers[0].volumeMounts[0].readOnly",
            ),
            (
                with_container("").replace("      image: busybox\n", ""),
                "spec.containers[0].image",
            ),
            (
                with_container("").replace("name: p", "name: my.pod"),
                "metadata.name",
            ),
            (
                with_container("").replace("  name: p\n", "  name: p\n  namespace: kube-system\n"),
                "metadata.namespace",
            ),
            (
                with_container("").replace("  name: p\n", "  name: p\n  labels:\n    tier: 1\n"),
                "metadata.labels.tier",
            ),
            (
                format!("{}  restartPolicy: Sometimes\n", with_container("")),
                "spec.restartPolicy",
            ),
            (
                format!(
                    "{}  terminationGracePeriodSeconds: -1\n",
                    with_container("")
                ),
                "spec.terminationGracePeriodSeconds",
            ),
            (
                format!(
                    "{}  volumes:\n    - name: v\n      emptyDir: {{}}\n      hostPath:\n        path: /x\n",
                    with_container("")
                ),
                "spec.volumes[0]",
            ),
            (
                format!("{}  volumes:\n    - name: v\n", with_container("")),
                "spec.volumes[0]",
            ),
            (
                format!(
                    "{}  volumes:\n    - name: v\n      persistentVolumeClaim:\n        claimName: a.b\n",
                    with_container("")
                ),
                "spec.volumes[0].persistentVolumeClaim.claimName",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers: []\n".into(),
                "spec.containers",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n".into(),
                "spec",
            ),
            ("- just\n- a list\n".into(), "manifest"),
        ] {
            assert_eq!(field_error(&yaml).0, field, "{yaml}");
        }
        assert!(matches!(error("a: [unclosed"), ManifestError::Yaml(_)));
    }

    #[test]
    fn the_translation_leaves_the_rest_to_spec_validation() {
        // A mount of a volume the pod does not have is the spec's rule, and
        // its error names the matching spec field.
        let spec = parse_pod_manifest(&with_container(
            "volumeMounts:\n  - name: cache\n    mountPath: /cache",
        ))
        .unwrap();
        assert_eq!(
            spec::validate(&spec).unwrap_err().to_string(),
            "service.pod.containers[0].volume_mounts[0].name: no volume named 'cache'"
        );
    }
}
