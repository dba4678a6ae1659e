//! A minimal Job controller (batch/v1), plus the defaults the real server gives a
//! new Job (selector on `batch.kubernetes.io/controller-uid`, the template's
//! `job-name`/`controller-uid` labels, parallelism/completions/backoffLimit).
//!
//! The controller creates the Job's pods from `spec.template` through the normal
//! create path — so admission webhooks (pod injection) see them as on a real
//! cluster — named `JOB-xxxxx`, owned by the Job (controller reference). It counts
//! Succeeded/Failed pods into `status`, adds `SuccessCriteriaMet` + `Complete` once
//! `completions` pods succeeded, and `FailureTarget` + `Failed`
//! (`BackoffLimitExceeded`) once more than `backoffLimit` pods failed; a failed pod
//! is replaced at once (the real controller's exponential back-off is left out).
//! A refused pod creation becomes a `FailedCreate` Warning Event on the Job and is
//! retried at the next resync.
//!
//! Not here: Indexed completion mode, pod failure/success policies,
//! activeDeadlineSeconds, ttlSecondsAfterFinished, the `job-tracking` pod finalizer.

use std::time::Duration;

use serde_json::{json, Value};

use crate::controllers::{next_relevant, Client};

const RESYNC: Duration = Duration::from_secs(5);

/// What the real server's Job strategy does to a new Job (`uid` is already set).
pub fn default_new_job(obj: &mut Value) {
    let uid = obj["metadata"]["uid"].clone();
    let name = obj["metadata"]["name"].clone();
    let spec = &mut obj["spec"];
    for (k, v) in [
        ("parallelism", json!(1)),
        ("completions", json!(1)),
        ("backoffLimit", json!(6)),
        ("completionMode", json!("NonIndexed")),
        ("suspend", json!(false)),
        ("podReplacementPolicy", json!("TerminatingOrFailed")),
    ] {
        if spec[k].is_null() {
            spec[k] = v;
        }
    }
    if spec["manualSelector"] != json!(true) {
        spec["selector"] = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
        let labels = &mut spec["template"]["metadata"]["labels"];
        for (k, v) in [
            ("batch.kubernetes.io/controller-uid", &uid),
            ("batch.kubernetes.io/job-name", &name),
            ("controller-uid", &uid),
            ("job-name", &name),
        ] {
            labels[k] = v.clone();
        }
    }
    let pod = &mut spec["template"]["spec"];
    for (k, v) in [
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("terminationGracePeriodSeconds", json!(30)),
    ] {
        if pod[k].is_null() {
            pod[k] = v;
        }
    }
}

pub async fn run(client: Client) {
    let mut rx = client.subscribe();
    loop {
        sync_all(&client).await;
        let relevant = |c: &crate::storage::Change| c.key == "batch/jobs" || c.key == "/pods";
        if next_relevant(&mut rx, RESYNC, relevant).await.is_none() {
            return;
        }
    }
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn finished(job: &Value) -> bool {
    job["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True")
    })
}

fn controlled_by(pod: &Value, uid: &str) -> bool {
    pod["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|os| {
            os.iter()
                .any(|o| o["uid"] == uid && o["controller"] == json!(true))
        })
}

async fn sync_all(client: &Client) {
    let (jobs, pods) = {
        let store = client.state().store();
        (store.list("batch/jobs", None), store.list("/pods", None))
    };
    for job in jobs {
        if finished(&job) || job["metadata"]["deletionTimestamp"].is_string() {
            continue;
        }
        let uid = job["metadata"]["uid"].as_str().unwrap_or_default();
        let ns = job["metadata"]["namespace"].as_str().unwrap_or_default();
        let mine: Vec<&Value> = pods
            .iter()
            .filter(|p| p["metadata"]["namespace"] == ns && controlled_by(p, uid))
            .collect();
        sync(client, &job, &mine).await;
    }
}

async fn sync(client: &Client, job: &Value, pods: &[&Value]) {
    let ns = job["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = job["metadata"]["name"].as_str().unwrap_or_default();
    let spec = &job["spec"];
    let phase = |p: &Value| {
        p["status"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let active = pods
        .iter()
        .filter(|p| {
            !matches!(phase(p).as_str(), "Succeeded" | "Failed")
                && !p["metadata"]["deletionTimestamp"].is_string()
        })
        .count() as i64;
    let count = |ph: &str| pods.iter().filter(|p| phase(p) == ph).count() as i64;
    let old = &job["status"];
    // Counts never go down when finished pods are deleted.
    let succeeded = count("Succeeded").max(old["succeeded"].as_i64().unwrap_or(0));
    let failed = count("Failed").max(old["failed"].as_i64().unwrap_or(0));
    let completions = spec["completions"].as_i64().unwrap_or(1);
    let parallelism = spec["parallelism"].as_i64().unwrap_or(1);
    let backoff_limit = spec["backoffLimit"].as_i64().unwrap_or(6);

    let mut status = json!({
        "active": active, "succeeded": succeeded, "failed": failed,
        "ready": 0, "terminating": 0, "uncountedTerminatedPods": {},
        "startTime": old["startTime"].as_str().map(String::from).unwrap_or_else(now),
    });
    let cond = |t: &str, reason: &str, message: &str| {
        json!({"type": t, "status": "True", "reason": reason, "message": message,
               "lastProbeTime": now(), "lastTransitionTime": now()})
    };
    if succeeded >= completions {
        status["active"] = json!(0);
        status["completionTime"] = json!(now());
        let m = "Reached expected number of succeeded pods";
        status["conditions"] = json!([
            cond("SuccessCriteriaMet", "CompletionsReached", m),
            cond("Complete", "CompletionsReached", m)
        ]);
    } else if failed > backoff_limit {
        let m = "Job has reached the specified backoff limit";
        status["active"] = json!(0);
        status["conditions"] = json!([
            cond("FailureTarget", "BackoffLimitExceeded", m),
            cond("Failed", "BackoffLimitExceeded", m)
        ]);
        for p in pods.iter().filter(|p| {
            !matches!(phase(p).as_str(), "Succeeded" | "Failed")
                && !p["metadata"]["deletionTimestamp"].is_string()
        }) {
            let path = crate::controllers::object_path("/pods", p);
            let _ = client
                .delete(&path, &json!({"propagationPolicy": "Background"}))
                .await;
        }
    } else if spec["suspend"] != json!(true) {
        let want = parallelism.min(completions - succeeded) - active;
        for _ in 0..want.max(0) {
            match client
                .create(&format!("/api/v1/namespaces/{ns}/pods"), &pod_for(job))
                .await
            {
                Ok(_) => status["active"] = json!(status["active"].as_i64().unwrap_or(0) + 1),
                Err(e) => {
                    failed_create_event(client, job, &e.to_string()).await;
                    break;
                }
            }
        }
    }
    let changed = ["active", "succeeded", "failed", "conditions", "startTime"]
        .iter()
        .any(|k| old[*k] != status[*k]);
    if changed {
        let path = format!("/apis/batch/v1/namespaces/{ns}/jobs/{name}/status");
        let _ = client
            .merge_patch(
                &path,
                &json!({"metadata": {"resourceVersion": job["metadata"]["resourceVersion"]},
                        "status": status}),
            )
            .await;
    }
}

/// The pod the Job controller creates from the template.
pub fn pod_for(job: &Value) -> Value {
    let name = job["metadata"]["name"].as_str().unwrap_or_default();
    let tmpl = &job["spec"]["template"];
    let mut meta = json!({
        "generateName": format!("{name}-"),
        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
            "uid": job["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}],
    });
    for k in ["labels", "annotations"] {
        if tmpl["metadata"][k].is_object() {
            meta[k] = tmpl["metadata"][k].clone();
        }
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": tmpl["spec"]})
}

async fn failed_create_event(client: &Client, job: &Value, message: &str) {
    let ns = job["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = job["metadata"]["name"].as_str().unwrap_or_default();
    let ev = json!({"apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": format!("{name}.")},
        "involvedObject": {"apiVersion": "batch/v1", "kind": "Job", "name": name, "namespace": ns,
            "uid": job["metadata"]["uid"], "resourceVersion": job["metadata"]["resourceVersion"]},
        "reason": "FailedCreate", "type": "Warning", "message": format!("Error creating: {message}"),
        "source": {"component": "job-controller"}, "count": 1,
        "firstTimestamp": now(), "lastTimestamp": now()});
    let _ = client
        .create(&format!("/api/v1/namespaces/{ns}/events"), &ev)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_job_gets_the_servers_selector_and_template_labels() {
        let mut job = json!({"metadata": {"name": "x", "uid": "u1"},
            "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": []}}}});
        default_new_job(&mut job);
        assert_eq!(
            job["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"],
            "u1"
        );
        let l = &job["spec"]["template"]["metadata"]["labels"];
        assert_eq!(l["job-name"], "x");
        assert_eq!(l["controller-uid"], "u1");
        assert_eq!(job["spec"]["backoffLimit"], 6);
        let pod = pod_for(&job);
        assert_eq!(pod["metadata"]["generateName"], "x-");
        assert_eq!(
            pod["metadata"]["labels"]["batch.kubernetes.io/job-name"],
            "x"
        );
        assert_eq!(pod["metadata"]["ownerReferences"][0]["uid"], "u1");
        assert_eq!(pod["metadata"]["ownerReferences"][0]["controller"], true);
    }
}
