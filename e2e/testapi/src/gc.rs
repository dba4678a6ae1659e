//! The garbage collector (kube-controller-manager's `garbagecollector`): objects
//! whose `metadata.ownerReferences` name only owners that no longer exist are
//! deleted (background propagation); references to some gone owners while others
//! live are removed. Deleting with `propagationPolicy: Orphan` (the default for
//! batch/v1 Jobs, as on the real server) or `Foreground` puts the `orphan` /
//! `foregroundDeletion` finalizer on the owner; the collector then strips the
//! owner's references from its dependents, or deletes the dependents (waiting for
//! those with `blockOwnerDeletion`), and removes the finalizer, which lets the
//! server finish the deletion.
//!
//! Level-triggered: every relevant change (and a periodic resync) runs one pass
//! over the whole store. Owners are matched by uid, so an owner deleted and
//! created again under the same name does not adopt the old dependents.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::controllers::{next_relevant, object_path, Client};
use crate::registry::ResourceType;
use crate::storage::Change;

pub const ORPHAN: &str = "orphan";
pub const FOREGROUND: &str = "foregroundDeletion";
const RESYNC: Duration = Duration::from_secs(5);

/// The finalizer a DELETE with these DeleteOptions puts on the object, if any.
pub fn deletion_finalizer(rt: &ResourceType, opts: &Value) -> Option<&'static str> {
    match opts["propagationPolicy"].as_str() {
        Some("Orphan") => return Some(ORPHAN),
        Some("Foreground") => return Some(FOREGROUND),
        Some(_) => return None,
        None => {}
    }
    match opts["orphanDependents"].as_bool() {
        Some(true) => Some(ORPHAN),
        Some(false) => None,
        // batch/v1 Jobs orphan their pods unless told otherwise (kept by the real
        // server for compatibility; kubectl always sends Background).
        None if rt.group == "batch" && rt.plural == "jobs" => Some(ORPHAN),
        None => None,
    }
}

fn has_finalizer(obj: &Value, f: &str) -> bool {
    obj["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|fs| fs.iter().any(|x| x == f))
}

fn deleting(obj: &Value) -> bool {
    obj["metadata"]["deletionTimestamp"].is_string()
}

fn relevant(c: &Change) -> bool {
    c.kind == "DELETED"
        || (c.kind == "ADDED" && c.object["metadata"]["ownerReferences"].is_array())
        || (deleting(&c.object)
            && (has_finalizer(&c.object, ORPHAN) || has_finalizer(&c.object, FOREGROUND)))
}

pub async fn run(client: Client) {
    let mut rx = client.subscribe();
    loop {
        collect(&client).await;
        if next_relevant(&mut rx, RESYNC, relevant).await.is_none() {
            return;
        }
    }
}

/// One stored object, as the collector sees it.
struct Node {
    path: String,
    uid: String,
    rv: String,
    owners: Vec<Value>,
    obj: Value,
}

fn uid_of(v: &Value) -> &str {
    v["uid"].as_str().unwrap_or_default()
}

/// What one pass decides (pure: the tests below drive it without a server).
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Delete (background) the object at `path` with this uid precondition.
    Delete { path: String, uid: String },
    /// Replace the object's ownerReferences (at resourceVersion `rv`).
    SetOwners {
        path: String,
        rv: String,
        owners: Vec<Value>,
    },
    /// Remove finalizer `finalizer` (at resourceVersion `rv`).
    DropFinalizer {
        path: String,
        rv: String,
        finalizers: Vec<Value>,
    },
}

fn plan(nodes: &[Node], uids: &HashSet<String>) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut dependents: HashMap<&str, Vec<&Node>> = HashMap::new();
    for n in nodes {
        for o in &n.owners {
            dependents.entry(uid_of(o)).or_default().push(n);
        }
    }
    let without = |fs: &Value, f: &str| -> Vec<Value> {
        fs.as_array()
            .map(|a| a.iter().filter(|x| *x != f).cloned().collect())
            .unwrap_or_default()
    };
    for n in nodes {
        let being_deleted = deleting(&n.obj);
        if being_deleted && has_finalizer(&n.obj, ORPHAN) {
            for d in dependents.get(n.uid.as_str()).into_iter().flatten() {
                actions.push(Action::SetOwners {
                    path: d.path.clone(),
                    rv: d.rv.clone(),
                    owners: d
                        .owners
                        .iter()
                        .filter(|o| uid_of(o) != n.uid)
                        .cloned()
                        .collect(),
                });
            }
            actions.push(Action::DropFinalizer {
                path: n.path.clone(),
                rv: n.rv.clone(),
                finalizers: without(&n.obj["metadata"]["finalizers"], ORPHAN),
            });
            continue;
        }
        if being_deleted && has_finalizer(&n.obj, FOREGROUND) {
            let deps = dependents.get(n.uid.as_str()).cloned().unwrap_or_default();
            for d in &deps {
                if !deleting(&d.obj) {
                    actions.push(Action::Delete {
                        path: d.path.clone(),
                        uid: d.uid.clone(),
                    });
                }
            }
            let blocking = deps.iter().any(|d| {
                d.owners
                    .iter()
                    .any(|o| uid_of(o) == n.uid && o["blockOwnerDeletion"] == json!(true))
            });
            if !blocking {
                actions.push(Action::DropFinalizer {
                    path: n.path.clone(),
                    rv: n.rv.clone(),
                    finalizers: without(&n.obj["metadata"]["finalizers"], FOREGROUND),
                });
            }
            continue;
        }
        if n.owners.is_empty() || being_deleted {
            continue;
        }
        let live: Vec<Value> = n
            .owners
            .iter()
            .filter(|o| uids.contains(uid_of(o)))
            .cloned()
            .collect();
        if live.is_empty() {
            actions.push(Action::Delete {
                path: n.path.clone(),
                uid: n.uid.clone(),
            });
        } else if live.len() < n.owners.len() {
            actions.push(Action::SetOwners {
                path: n.path.clone(),
                rv: n.rv.clone(),
                owners: live,
            });
        }
    }
    actions
}

async fn collect(client: &Client) {
    let (nodes, uids) = {
        let store = client.state().store();
        let mut uids = HashSet::new();
        let mut nodes = Vec::new();
        for ((key, _, _), obj) in store.iter() {
            let uid = obj["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            uids.insert(uid.clone());
            let owners = obj["metadata"]["ownerReferences"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let interesting = !owners.is_empty()
                || (deleting(obj)
                    && (has_finalizer(obj, ORPHAN) || has_finalizer(obj, FOREGROUND)));
            if interesting {
                nodes.push(Node {
                    path: object_path(key, obj),
                    uid,
                    rv: obj["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    owners,
                    obj: obj.clone(),
                });
            }
        }
        (nodes, uids)
    };
    // Failures (a conflict with another writer, an object already gone) are
    // retried by the next pass, which sees the new state.
    for a in plan(&nodes, &uids) {
        let _ = match a {
            Action::Delete { path, uid } => {
                client
                    .delete(
                        &path,
                        &json!({"kind": "DeleteOptions", "apiVersion": "v1",
                        "propagationPolicy": "Background", "preconditions": {"uid": uid}}),
                    )
                    .await
            }
            Action::SetOwners { path, rv, owners } => {
                let owners = if owners.is_empty() {
                    Value::Null
                } else {
                    Value::Array(owners)
                };
                client
                    .merge_patch(
                        &path,
                        &json!({"metadata": {"resourceVersion": rv, "ownerReferences": owners}}),
                    )
                    .await
            }
            Action::DropFinalizer {
                path,
                rv,
                finalizers,
            } => {
                let fs = if finalizers.is_empty() {
                    Value::Null
                } else {
                    Value::Array(finalizers)
                };
                client
                    .merge_patch(
                        &path,
                        &json!({"metadata": {"resourceVersion": rv, "finalizers": fs}}),
                    )
                    .await
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, uid: &str, owners: &[(&str, bool)], extra: Value) -> Node {
        let owners: Vec<Value> = owners
            .iter()
            .map(|(u, block)| json!({"uid": u, "kind": "Job", "name": "j", "blockOwnerDeletion": block}))
            .collect();
        let mut obj = json!({"metadata": {"name": name, "uid": uid, "resourceVersion": "7"}});
        if let (Some(m), Some(e)) = (obj["metadata"].as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                m.insert(k.clone(), v.clone());
            }
        }
        Node {
            path: format!("/p/{name}"),
            uid: uid.into(),
            rv: "7".into(),
            owners,
            obj,
        }
    }

    fn uids(u: &[&str]) -> HashSet<String> {
        u.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_dependent_whose_only_owner_is_gone_is_deleted() {
        let nodes = [node("pod", "p1", &[("job1", true)], json!({}))];
        assert_eq!(
            plan(&nodes, &uids(&["p1"])),
            vec![Action::Delete {
                path: "/p/pod".into(),
                uid: "p1".into()
            }]
        );
        // With its owner alive nothing happens.
        assert!(plan(&nodes, &uids(&["p1", "job1"])).is_empty());
    }

    #[test]
    fn a_dependent_with_a_live_owner_only_loses_the_dangling_reference() {
        let nodes = [node(
            "pod",
            "p1",
            &[("gone", false), ("live", false)],
            json!({}),
        )];
        let a = plan(&nodes, &uids(&["p1", "live"]));
        assert!(
            matches!(&a[..], [Action::SetOwners { owners, .. }] if owners.len() == 1 && owners[0]["uid"] == "live"),
            "{a:?}"
        );
    }

    #[test]
    fn orphan_strips_references_then_drops_the_finalizer() {
        let nodes = [
            node(
                "job",
                "job1",
                &[],
                json!({"deletionTimestamp": "x", "finalizers": ["orphan", "keep"]}),
            ),
            node("pod", "p1", &[("job1", true)], json!({})),
        ];
        let a = plan(&nodes, &uids(&["job1", "p1"]));
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(
            matches!(&a[0], Action::SetOwners { path, owners, .. } if path == "/p/pod" && owners.is_empty())
        );
        assert!(
            matches!(&a[1], Action::DropFinalizer { finalizers, .. } if finalizers == &vec![json!("keep")])
        );
    }

    #[test]
    fn foreground_waits_for_blocking_dependents() {
        let owner = node(
            "job",
            "job1",
            &[],
            json!({"deletionTimestamp": "x", "finalizers": ["foregroundDeletion"]}),
        );
        let blocking = node("pod", "p1", &[("job1", true)], json!({}));
        let a = plan(&[owner, blocking], &uids(&["job1", "p1"]));
        assert_eq!(
            a,
            vec![Action::Delete {
                path: "/p/pod".into(),
                uid: "p1".into()
            }]
        );
        let owner = node(
            "job",
            "job1",
            &[],
            json!({"deletionTimestamp": "x", "finalizers": ["foregroundDeletion"]}),
        );
        let a = plan(&[owner], &uids(&["job1"]));
        assert!(
            matches!(&a[..], [Action::DropFinalizer { finalizers, .. }] if finalizers.is_empty())
        );
    }

    #[test]
    fn jobs_orphan_by_default_other_kinds_do_not() {
        let reg = crate::registry::Registry::with_builtins();
        let jobs = reg.get("batch", "v1", "jobs").unwrap();
        let pods = reg.get("", "v1", "pods").unwrap();
        assert_eq!(deletion_finalizer(&jobs, &json!({})), Some(ORPHAN));
        assert_eq!(
            deletion_finalizer(&jobs, &json!({"propagationPolicy": "Background"})),
            None
        );
        assert_eq!(deletion_finalizer(&pods, &json!({})), None);
        assert_eq!(
            deletion_finalizer(&pods, &json!({"propagationPolicy": "Foreground"})),
            Some(FOREGROUND)
        );
        assert_eq!(
            deletion_finalizer(&pods, &json!({"orphanDependents": true})),
            Some(ORPHAN)
        );
    }
}
