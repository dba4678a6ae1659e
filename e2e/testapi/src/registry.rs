//! What the server serves: one [`ResourceType`] per group/version/resource, built in
//! (core kinds, RBAC, CRDs themselves, ...) or derived from a stored
//! CustomResourceDefinition. Discovery, routing, tables and validation all read it,
//! so a CRD becomes servable the moment it is stored, as on a real server.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::schema::Schema;

/// A printer column: `additionalPrinterColumns` of a CRD, or a built-in column.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub source: ColumnSource,
}

#[derive(Debug, Clone)]
pub enum ColumnSource {
    /// A simple JSONPath (`.spec.database.name`, `.status.conditions[0].type`).
    JsonPath(String),
    /// The number of keys of a map at this path (Secret/ConfigMap `DATA`).
    CountKeys(Vec<&'static str>),
}

/// How objects of a type are stored and shown.
#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub namespaced: bool,
    pub verbs: Vec<&'static str>,
    /// A `status` subresource: status ignored on the main resource, everything but
    /// status ignored on `/status`.
    pub status_subresource: bool,
    /// `metadata.generation` is kept and bumped when anything but metadata/status
    /// changes (custom resources, CRDs, workload kinds).
    pub has_generation: bool,
    /// Unconditional updates (PUT without resourceVersion) are allowed for most
    /// built-in kinds but not for custom resources.
    pub allow_unconditional_update: bool,
    /// Built-in columns or the CRD's printer columns, after `Name`.
    pub columns: Vec<Column>,
    /// Structural schema of a custom resource version.
    pub schema: Option<Arc<Schema>>,
    /// Create-only virtual resources (access reviews): never stored.
    pub virtual_create: bool,
    /// Set for types served from a CRD (`<plural>.<group>`).
    pub crd_name: Option<String>,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// Storage key of the type: all versions of a group/resource share objects.
    pub fn storage_key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }
}

const RW: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn age() -> Column {
    col("Age", "date", ".metadata.creationTimestamp", 0)
}

fn col(name: &str, type_: &str, path: &str, priority: i64) -> Column {
    Column {
        name: name.into(),
        type_: type_.into(),
        format: String::new(),
        description: String::new(),
        priority,
        source: ColumnSource::JsonPath(path.into()),
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    short: &[&str],
    namespaced: bool,
    status: bool,
    columns: Vec<Column>,
) -> ResourceType {
    ResourceType {
        group: group.into(),
        version: version.into(),
        kind: kind.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: Vec::new(),
        namespaced,
        verbs: RW.to_vec(),
        status_subresource: status,
        has_generation: false,
        allow_unconditional_update: true,
        columns,
        schema: None,
        virtual_create: false,
        crd_name: None,
    }
}

fn review(group: &str, kind: &str, plural: &str, namespaced: bool) -> ResourceType {
    let mut t = builtin(group, "v1", kind, plural, &[], namespaced, false, vec![]);
    t.verbs = vec!["create"];
    t.virtual_create = true;
    t
}

/// The built-in kinds the test server serves.
pub fn builtin_types() -> Vec<ResourceType> {
    let data = |path: Vec<&'static str>| Column {
        source: ColumnSource::CountKeys(path),
        ..col("Data", "integer", "", 0)
    };
    let mut types = vec![
        builtin(
            "",
            "v1",
            "Namespace",
            "namespaces",
            &["ns"],
            false,
            true,
            vec![col("Status", "string", ".status.phase", 0), age()],
        ),
        builtin(
            "",
            "v1",
            "Secret",
            "secrets",
            &[],
            true,
            false,
            vec![col("Type", "string", ".type", 0), data(vec!["data"]), age()],
        ),
        builtin(
            "",
            "v1",
            "ConfigMap",
            "configmaps",
            &["cm"],
            true,
            false,
            vec![data(vec!["data"]), age()],
        ),
        builtin(
            "",
            "v1",
            "ServiceAccount",
            "serviceaccounts",
            &["sa"],
            true,
            false,
            vec![age()],
        ),
        builtin(
            "",
            "v1",
            "Pod",
            "pods",
            &["po"],
            true,
            true,
            vec![
                col("Status", "string", ".status.phase", 0),
                age(),
                col("IP", "string", ".status.podIP", 1),
                col("Node", "string", ".spec.nodeName", 1),
            ],
        ),
        builtin(
            "",
            "v1",
            "Service",
            "services",
            &["svc"],
            true,
            true,
            vec![
                col("Type", "string", ".spec.type", 0),
                col("Cluster-IP", "string", ".spec.clusterIP", 0),
                age(),
            ],
        ),
        builtin(
            "",
            "v1",
            "Event",
            "events",
            &["ev"],
            true,
            false,
            vec![
                col("Type", "string", ".type", 0),
                col("Reason", "string", ".reason", 0),
                col("Object", "string", ".involvedObject.name", 0),
                col("Message", "string", ".message", 0),
            ],
        ),
        builtin(
            "events.k8s.io",
            "v1",
            "Event",
            "events",
            &["ev"],
            true,
            false,
            vec![
                col("Type", "string", ".type", 0),
                col("Reason", "string", ".reason", 0),
                col("Object", "string", ".regarding.name", 0),
                col("Note", "string", ".note", 0),
            ],
        ),
        builtin(
            "coordination.k8s.io",
            "v1",
            "Lease",
            "leases",
            &[],
            true,
            false,
            vec![col("Holder", "string", ".spec.holderIdentity", 0), age()],
        ),
        builtin("batch", "v1", "Job", "jobs", &[], true, true, vec![age()]),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            &["crd", "crds"],
            false,
            true,
            vec![col(
                "Created At",
                "string",
                ".metadata.creationTimestamp",
                0,
            )],
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "Role",
            "roles",
            &[],
            true,
            false,
            vec![age()],
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRole",
            "clusterroles",
            &[],
            false,
            false,
            vec![age()],
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "RoleBinding",
            "rolebindings",
            &[],
            true,
            false,
            vec![col("Role", "string", ".roleRef.name", 0), age()],
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            &[],
            false,
            false,
            vec![col("Role", "string", ".roleRef.name", 0), age()],
        ),
        builtin(
            "admissionregistration.k8s.io",
            "v1",
            "MutatingWebhookConfiguration",
            "mutatingwebhookconfigurations",
            &[],
            false,
            false,
            vec![age()],
        ),
        builtin(
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingWebhookConfiguration",
            "validatingwebhookconfigurations",
            &[],
            false,
            false,
            vec![age()],
        ),
        review(
            "authorization.k8s.io",
            "SelfSubjectAccessReview",
            "selfsubjectaccessreviews",
            false,
        ),
        review(
            "authorization.k8s.io",
            "SubjectAccessReview",
            "subjectaccessreviews",
            false,
        ),
        review(
            "authentication.k8s.io",
            "TokenReview",
            "tokenreviews",
            false,
        ),
        review(
            "authentication.k8s.io",
            "SelfSubjectReview",
            "selfsubjectreviews",
            false,
        ),
    ];
    for t in &mut types {
        match t.kind.as_str() {
            "Pod" | "Service" => t.categories = vec!["all".into()],
            "Job" => {
                t.categories = vec!["all".into()];
                t.has_generation = true;
            }
            "CustomResourceDefinition" => {
                t.has_generation = true;
                t.categories = vec!["api-extensions".into()];
            }
            _ => {}
        }
    }
    types
}

/// Derives the served types of a CRD object: one per served version. Errors are
/// the field causes the CRD itself fails with.
pub fn types_from_crd(crd: &Value) -> Result<Vec<ResourceType>, Vec<crate::status::Cause>> {
    use crate::status::Cause;
    let spec = &crd["spec"];
    let names = &spec["names"];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let group = s(&spec["group"]);
    let plural = s(&names["plural"]);
    let kind = s(&names["kind"]);
    let mut causes = Vec::new();
    if group.is_empty() {
        causes.push(Cause::required("spec.group"));
    }
    if plural.is_empty() {
        causes.push(Cause::required("spec.names.plural"));
    }
    if kind.is_empty() {
        causes.push(Cause::required("spec.names.kind"));
    }
    let name = s(&crd["metadata"]["name"]);
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause::invalid(
            "metadata.name",
            &format!("{name:?}"),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    let scope = s(&spec["scope"]);
    if scope != "Namespaced" && scope != "Cluster" {
        causes.push(Cause::not_supported(
            "spec.scope",
            &spec["scope"],
            &[Value::from("Cluster"), Value::from("Namespaced")],
        ));
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        causes.push(Cause::required("spec.versions"));
    }
    let mut out = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        if !v["served"].as_bool().unwrap_or(false) {
            continue;
        }
        let schema = match v["schema"]["openAPIV3Schema"].as_object() {
            Some(_) => match Schema::parse(&v["schema"]["openAPIV3Schema"]) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    causes.push(Cause::invalid(
                        &format!("spec.versions[{i}].schema.openAPIV3Schema"),
                        "\"object\"",
                        &e,
                    ));
                    None
                }
            },
            None => {
                causes.push(Cause::required(&format!(
                    "spec.versions[{i}].schema.openAPIV3Schema"
                )));
                None
            }
        };
        let columns = v["additionalPrinterColumns"]
            .as_array()
            .map(|cols| {
                cols.iter()
                    .map(|c| Column {
                        name: s(&c["name"]),
                        type_: s(&c["type"]),
                        format: s(&c["format"]),
                        description: s(&c["description"]),
                        priority: c["priority"].as_i64().unwrap_or(0),
                        source: ColumnSource::JsonPath(s(&c["jsonPath"])),
                    })
                    .collect()
            })
            // No printer columns: the real server shows Name and Age.
            .unwrap_or_else(|| vec![age()]);
        out.push(ResourceType {
            group: group.clone(),
            version: s(&v["name"]),
            kind: kind.clone(),
            plural: plural.clone(),
            singular: match s(&names["singular"]) {
                x if x.is_empty() => kind.to_lowercase(),
                x => x,
            },
            short_names: strs(&names["shortNames"]),
            categories: strs(&names["categories"]),
            namespaced: scope == "Namespaced",
            verbs: RW.to_vec(),
            status_subresource: v["subresources"]["status"].is_object(),
            has_generation: true,
            allow_unconditional_update: false,
            columns,
            schema,
            virtual_create: false,
            crd_name: Some(name.clone()),
        });
    }
    if causes.is_empty() {
        Ok(out)
    } else {
        Err(causes)
    }
}

/// All served types, by group → version → plural.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    types: BTreeMap<(String, String, String), Arc<ResourceType>>,
}

impl Registry {
    pub fn with_builtins() -> Registry {
        let mut r = Registry::default();
        for t in builtin_types() {
            r.insert(t);
        }
        r
    }

    pub fn insert(&mut self, t: ResourceType) {
        self.types.insert(
            (t.group.clone(), t.version.clone(), t.plural.clone()),
            Arc::new(t),
        );
    }

    /// Drops every type served from CRD `crd_name`.
    pub fn remove_crd(&mut self, crd_name: &str) {
        self.types
            .retain(|_, t| t.crd_name.as_deref() != Some(crd_name));
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<ResourceType>> {
        self.types.values()
    }

    /// Groups with their versions, in a stable order (core `""` first).
    pub fn groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (g, v, _) in self.types.keys() {
            let vs = m.entry(g.clone()).or_default();
            if !vs.contains(v) {
                vs.push(v.clone());
            }
        }
        m
    }
}
