//! The audit log: one entry per request, in memory for tests and as JSON lines in
//! a file for people and other processes (`audit.log` beside the kubeconfig).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub user: String,
    pub groups: Vec<String>,
    /// Kubernetes verb (`get`, `list`, `watch`, `create`, ...), or the lowercase
    /// HTTP method for non-resource requests.
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    pub uri: String,
    pub code: u16,
}

impl AuditEvent {
    pub fn to_json(&self) -> Value {
        json!({
            "user": self.user, "groups": self.groups, "verb": self.verb, "apiGroup": self.group,
            "resource": self.resource, "subresource": self.subresource,
            "namespace": self.namespace, "name": self.name, "requestURI": self.uri, "code": self.code,
        })
    }
}

#[derive(Debug)]
pub struct Audit {
    events: Mutex<Vec<AuditEvent>>,
    file: Option<Mutex<File>>,
}

impl Audit {
    pub fn new(path: Option<&Path>) -> std::io::Result<Audit> {
        let file = match path {
            Some(p) => Some(Mutex::new(File::create(p)?)),
            None => None,
        };
        Ok(Audit {
            events: Mutex::new(Vec::new()),
            file,
        })
    }

    pub fn record(&self, e: AuditEvent) {
        if let Some(f) = &self.file {
            if let Ok(mut f) = f.lock() {
                // Best effort: a full disk must not fail the request being audited.
                let _ = writeln!(f, "{}", e.to_json());
            }
        }
        if let Ok(mut v) = self.events.lock() {
            v.push(e);
        }
    }

    pub fn events(&self) -> Vec<AuditEvent> {
        self.events.lock().map(|v| v.clone()).unwrap_or_default()
    }
}
