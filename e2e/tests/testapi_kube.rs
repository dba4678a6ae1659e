//! kube-rs conformance (issue 15, "Done when"): the real kube client — the one the
//! operator uses — against the test API server, or a real cluster when
//! `PGWARDEN_E2E_KUBECONFIG` is set (see tests/testapi_cluster). CRUD of a
//! DatabaseAccessPolicy, the status subresource, a 409 on a stale update, a 403
//! for bob, a schema refusal with its field path, a reflector that stays correct
//! through a 410 Gone, and a Controller that reconciles an object created after it.

mod testapi_cluster;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, Status};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::ResourceExt;
use pgwarden_api::{DatabaseAccessPolicy, DatabaseAccessPolicyStatus};
use serde_json::{json, Value};
use testapi_cluster::{Cluster, User};

fn policy_json(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "pgwarden.io/v1alpha1", "kind": "DatabaseAccessPolicy",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "identity": {"oidc": {"issuer": "https://token.actions.githubusercontent.com",
                                  "audiences": ["pgwarden"], "subjects": ["repo:acme/shop:ref:refs/heads/main"]}},
            "database": {"host": "prod-pg.internal", "port": 5432, "name": "shop",
                         "credentialsSecret": "shop-credentials"},
            "defaultAction": "Deny",
            "rules": [{"name": "read", "action": "Allow", "statements": ["SELECT"], "tables": ["public.*"]}],
        }
    })
}

fn policy(name: &str) -> DatabaseAccessPolicy {
    serde_json::from_value(policy_json(name, json!({"app": "shop"}))).expect("a valid policy")
}

fn api_error(r: Result<impl std::fmt::Debug, kube::Error>) -> Status {
    match r {
        Err(kube::Error::Api(e)) => *e,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Polls `f` until it holds (10 s).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn crud_status_conflict_forbidden_and_invalid() {
    let c = Cluster::new("kube-crud");
    runtime().block_on(async {
        let admin = c.client(User::Admin).await;
        let api: Api<DatabaseAccessPolicy> = Api::namespaced(admin.clone(), &c.ns);

        // create / get / list with a label selector
        let created = api.create(&PostParams::default(), &policy("shop")).await.unwrap();
        assert_eq!(created.metadata.generation, Some(1));
        assert!(created.uid().is_some_and(|u| !u.is_empty()));
        assert_eq!(created.spec.database.port, 5432);
        let got = api.get("shop").await.unwrap();
        assert_eq!(got.spec, created.spec);
        let listed = api.list(&ListParams::default().labels("app=shop")).await.unwrap();
        assert_eq!(listed.items.len(), 1);
        assert!(api.list(&ListParams::default().labels("app=other")).await.unwrap().items.is_empty());
        assert!(listed.metadata.resource_version.is_some_and(|rv| !rv.is_empty()));

        // merge patch of the spec bumps generation
        let patched = api
            .patch("shop", &PatchParams::default(), &Patch::Merge(json!({"spec": {"defaultAction": "Allow"}})))
            .await
            .unwrap();
        assert_eq!(patched.metadata.generation, Some(2));

        // status subresource: status written there, spec untouched; status on the
        // main resource ignored
        let st = json!({"status": {"observedGeneration": 2, "selectedPods": 3}});
        let with_status = api
            .patch_status("shop", &PatchParams::default(), &Patch::Merge(&st))
            .await
            .unwrap();
        assert_eq!(
            with_status.status,
            Some(DatabaseAccessPolicyStatus {
                observed_generation: Some(2),
                selected_pods: Some(3),
                ..Default::default()
            })
        );
        assert_eq!(with_status.metadata.generation, Some(2), "a status write is no spec change");
        let ignored = api
            .patch("shop", &PatchParams::default(), &Patch::Merge(json!({"status": {"selectedPods": 9}})))
            .await
            .unwrap();
        assert_eq!(ignored.status.and_then(|s| s.selected_pods), Some(3));

        // replace with the current resourceVersion works; with a stale one: 409
        let mut current = api.get("shop").await.unwrap();
        let stale = current.clone();
        current.spec.default_action = serde_json::from_value(json!("Deny")).unwrap();
        api.replace("shop", &PostParams::default(), &current).await.unwrap();
        let e = api_error(api.replace("shop", &PostParams::default(), &stale).await);
        assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"), "{e:?}");
        assert!(e.message.contains("the object has been modified"), "{e:?}");
        // create of an existing name: 409 AlreadyExists
        let e = api_error(api.create(&PostParams::default(), &policy("shop")).await);
        assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"), "{e:?}");

        // bob has no RBAC: 403 with the real message
        let bob: Api<DatabaseAccessPolicy> = Api::namespaced(c.client(User::Bob).await, &c.ns);
        let e = api_error(bob.list(&ListParams::default()).await);
        assert_eq!((e.code, e.reason.as_str()), (403, "Forbidden"), "{e:?}");
        assert!(
            e.message.contains(&format!(
                "User \"bob\" cannot list resource \"databaseaccesspolicies\" in API group \"pgwarden.io\" in the namespace \"{}\"",
                c.ns
            )),
            "{e:?}"
        );
        let e = api_error(bob.get("shop").await);
        assert_eq!(e.code, 403);

        // schema validation with the field path, through the dynamic API
        let ar = ApiResource::erase::<DatabaseAccessPolicy>(&());
        let dynamic: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &c.ns, &ar);
        let mut bad = policy_json("bad", json!({}));
        bad["spec"]["defaultAction"] = json!("Maybe");
        let bad: DynamicObject = serde_json::from_value(bad).unwrap();
        let e = api_error(dynamic.create(&PostParams::default(), &bad).await);
        assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"), "{e:?}");
        assert!(e.message.contains("spec.defaultAction: Unsupported value: \"Maybe\""), "{e:?}");

        // delete: gone, then 404
        api.delete("shop", &Default::default()).await.unwrap();
        let e = api_error(api.get("shop").await);
        assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"), "{e:?}");
    });
}

/// On the test API server: expire the watch history without the watch seeing the
/// write that moved the resourceVersion on, so the re-watch gets 410 Gone. Returns
/// how many list requests the server had seen before (to prove a relist after).
fn force_410(c: &Cluster) -> Option<usize> {
    let api = c.local()?;
    let lists = dap_lists(c);
    // A write to another type: DAP watches do not see it, and the bookmark
    // interval is long, so their last resourceVersion falls behind the floor.
    c.ok(
        User::Admin,
        &["create", "configmap", &format!("bump-{lists}")],
    );
    api.compact();
    Some(lists)
}

fn dap_lists(c: &Cluster) -> usize {
    c.local().map_or(0, |api| {
        api.audit()
            .iter()
            .filter(|e| e.verb == "list" && e.resource == "databaseaccesspolicies" && e.code == 200)
            .count()
    })
}

fn long_bookmarks() -> pgwarden_testapi::Options {
    pgwarden_testapi::Options {
        bookmark_interval: Duration::from_secs(3600),
        ..Default::default()
    }
}

#[test]
fn reflector_store_stays_correct_through_410_gone() {
    let c = Cluster::with_options("kube-reflector", long_bookmarks());
    runtime().block_on(async {
        let client = c.client(User::Admin).await;
        let api: Api<DatabaseAccessPolicy> = Api::namespaced(client, &c.ns);
        api.create(&PostParams::default(), &policy("a"))
            .await
            .unwrap();
        api.create(&PostParams::default(), &policy("b"))
            .await
            .unwrap();

        let (reader, writer) = reflector::store::<DatabaseAccessPolicy>();
        let inits = Arc::new(AtomicUsize::new(0));
        let inits2 = inits.clone();
        let stream = watcher(api.clone(), watcher::Config::default())
            .map(move |e| {
                if matches!(e, Ok(watcher::Event::Init)) {
                    inits2.fetch_add(1, Ordering::SeqCst);
                }
                e
            })
            .reflect(writer)
            .applied_objects();
        let task = tokio::spawn(async move {
            futures_util::pin_mut!(stream);
            while stream.next().await.is_some() {}
        });
        let names = |r: &reflector::Store<DatabaseAccessPolicy>| {
            let mut n: Vec<String> = r.state().iter().map(|o| o.name_any()).collect();
            n.sort();
            n
        };
        eventually("the initial list", || names(&reader) == ["a", "b"]).await;
        assert_eq!(inits.load(Ordering::SeqCst), 1);

        let before = force_410(&c);
        if before.is_none() {
            eprintln!(
                "real cluster: history cannot be compacted on demand; checking the store only"
            );
        }
        // Changes after the compaction: the relisted store must have them, and
        // must have dropped what was deleted.
        api.delete("a", &Default::default()).await.unwrap();
        api.create(&PostParams::default(), &policy("c"))
            .await
            .unwrap();
        eventually("the store after the relist", || {
            names(&reader) == ["b", "c"]
        })
        .await;
        if let Some(before) = before {
            eventually("a relist after 410 Gone", || {
                inits.load(Ordering::SeqCst) >= 2
            })
            .await;
            assert!(dap_lists(&c) > before, "the watcher listed again");
        }
        // And it keeps watching from the new list.
        api.patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"seen": "yes"}}})),
        )
        .await
        .unwrap();
        eventually("a later change", || {
            reader
                .get(&reflector::ObjectRef::new("b").within(&c.ns))
                .is_some_and(|o| o.labels().get("seen").map(String::as_str) == Some("yes"))
        })
        .await;
        task.abort();
    });
}

struct Ctx {
    api: Api<DatabaseAccessPolicy>,
    reconciled: AtomicUsize,
}

async fn reconcile(obj: Arc<DatabaseAccessPolicy>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    ctx.reconciled.fetch_add(1, Ordering::SeqCst);
    let generation = obj.metadata.generation;
    if obj.status.as_ref().and_then(|s| s.observed_generation) != generation {
        let st = json!({"status": {"observedGeneration": generation}});
        ctx.api
            .patch_status(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&st))
            .await?;
    }
    Ok(Action::await_change())
}

fn error_policy(_: Arc<DatabaseAccessPolicy>, _: &kube::Error, _: Arc<Ctx>) -> Action {
    Action::requeue(Duration::from_millis(200))
}

#[test]
fn controller_reconciles_objects_created_after_410_gone() {
    let c = Cluster::with_options("kube-controller", long_bookmarks());
    runtime().block_on(async {
        let client = c.client(User::Admin).await;
        let api: Api<DatabaseAccessPolicy> = Api::namespaced(client, &c.ns);
        let ctx = Arc::new(Ctx {
            api: api.clone(),
            reconciled: AtomicUsize::new(0),
        });
        let controller = Controller::new(api.clone(), watcher::Config::default())
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|_| async {});
        let task = tokio::spawn(controller);

        let observed = |name: &'static str, generation: i64| {
            let api = api.clone();
            async move {
                for _ in 0..200 {
                    if let Ok(o) = api.get(name).await {
                        if o.status.and_then(|s| s.observed_generation) == Some(generation) {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("{name} was not reconciled to generation {generation}");
            }
        };
        api.create(&PostParams::default(), &policy("first"))
            .await
            .unwrap();
        observed("first", 1).await;

        let before = force_410(&c);
        api.create(&PostParams::default(), &policy("second"))
            .await
            .unwrap();
        observed("second", 1).await;
        // A spec change of the first (generation 2) is reconciled too.
        api.patch(
            "first",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"defaultAction": "Allow"}})),
        )
        .await
        .unwrap();
        observed("first", 2).await;
        if let Some(before) = before {
            assert!(
                dap_lists(&c) > before,
                "the controller's watcher relisted after 410 Gone"
            );
        }
        assert!(ctx.reconciled.load(Ordering::SeqCst) >= 3);
        task.abort();
    });
}

#[test]
fn impersonation_works_as_on_a_real_cluster() {
    // The same requests as alice/bob through `--as`/`--as-group` and kube-rs's
    // impersonation (what a real cluster's tests must use) get the same answers.
    let mut c = Cluster::new("kube-impersonation");
    c.impersonate = true;
    let who = c.ok(
        User::Alice,
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username} {.status.userInfo.groups}",
        ],
    );
    assert!(
        who.starts_with("alice ") && who.contains("dba-oncall"),
        "{who}"
    );
    let e = c.fails(User::Bob, &["get", "dap"]);
    assert!(
        e.contains("User \"bob\" cannot list resource \"databaseaccesspolicies\""),
        "{e}"
    );
    // A Role of its own (a real cluster's `view` does not aggregate pgwarden.io
    // unless the chart's aggregation roles are installed).
    let role = serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "dap-reader"},
        "rules": [{"apiGroups": ["pgwarden.io"], "resources": ["databaseaccesspolicies"], "verbs": ["get", "list"]}]});
    let o = c.kubectl(User::Admin, &["apply", "-f", "-"], Some(&role.to_string()));
    assert!(o.status.success(), "{}", testapi_cluster::text(&o));
    c.ok(
        User::Admin,
        &[
            "create",
            "rolebinding",
            "oncall-read",
            "--role=dap-reader",
            "--group=dba-oncall",
        ],
    );
    c.ok(User::Alice, &["get", "dap"]);
    runtime().block_on(async {
        let bob: Api<DatabaseAccessPolicy> = Api::namespaced(c.client(User::Bob).await, &c.ns);
        assert_eq!(api_error(bob.list(&ListParams::default()).await).code, 403);
        let alice: Api<DatabaseAccessPolicy> = Api::namespaced(c.client(User::Alice).await, &c.ns);
        alice.list(&ListParams::default()).await.unwrap();
    });
    // Only users allowed to impersonate may: bob may not become alice. (`--raw`:
    // kubectl's discovery fails first otherwise, and prints only "unknown".)
    if let Some(api) = c.local() {
        let o = api.kubectl(
            "bob",
            &[
                "--as=alice",
                "get",
                "--raw",
                &format!(
                    "/apis/pgwarden.io/v1alpha1/namespaces/{}/databaseaccesspolicies",
                    c.ns
                ),
            ],
        );
        let e = testapi_cluster::text(&o);
        assert!(!o.status.success() && e.contains("User \"bob\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope"), "{e}");
    }
}

#[test]
fn token_request_and_review_through_kube_rs() {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
    };
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};

    let c = Cluster::new("kube-tokens");
    runtime().block_on(async {
        let client = c.client(User::Admin).await;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &c.ns);
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "agent"}})).unwrap();
        sas.create(&PostParams::default(), &sa).await.unwrap();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &c.ns);
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "ci"},
            "spec": {"serviceAccountName": "agent", "containers": [{"name": "app", "image": "busybox"}]}}))
        .unwrap();
        let pod = pods.create(&PostParams::default(), &pod).await.unwrap();

        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec!["pgwarden".into()],
                expiration_seconds: Some(600),
                bound_object_ref: Some(BoundObjectReference {
                    kind: Some("Pod".into()),
                    api_version: Some("v1".into()),
                    name: Some("ci".into()),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let issued = sas
            .create_token_request("agent", &PostParams::default(), &req)
            .await
            .unwrap();
        let token = issued.status.expect("status").token;

        let reviews: Api<TokenReview> = Api::all(client.clone());
        let review = |auds: Vec<String>| {
            let reviews = reviews.clone();
            let token = token.clone();
            async move {
                let tr = TokenReview {
                    spec: TokenReviewSpec {
                        token: Some(token),
                        audiences: Some(auds),
                    },
                    ..Default::default()
                };
                reviews.create(&PostParams::default(), &tr).await.unwrap().status.expect("status")
            }
        };
        let st = review(vec!["pgwarden".into()]).await;
        assert_eq!(st.authenticated, Some(true), "{st:?}");
        let user = st.user.expect("user");
        assert_eq!(user.username.as_deref(), Some(format!("system:serviceaccount:{}:agent", c.ns).as_str()));
        let extra = user.extra.expect("extra");
        assert_eq!(extra["authentication.kubernetes.io/pod-name"], ["ci"]);
        assert_eq!(Some(&extra["authentication.kubernetes.io/pod-uid"][0]), pod.metadata.uid.as_ref());
        assert_eq!(st.audiences, Some(vec!["pgwarden".to_string()]));

        let st = review(vec!["vault".into()]).await;
        assert_ne!(st.authenticated, Some(true), "{st:?}");
        assert!(st.error.is_some_and(|e| e.contains("invalid")));

        // The bound pod is deleted: the token no longer reviews (a real cluster
        // deletes pods gracefully, so wait for it to be gone).
        pods.delete("ci", &kube::api::DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
            .await
            .unwrap();
        for _ in 0..100 {
            if pods.get_opt("ci").await.unwrap().is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let st = review(vec!["pgwarden".into()]).await;
        assert_ne!(st.authenticated, Some(true), "{st:?}");
    });
}
