//! The keys Secret against the test API server: created once, the same keys on
//! every load (restarts, replicas racing), recreated when deleted.

use k8s_openapi::api::core::v1::Secret;
use kube::api::DeleteParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use pgwarden_operator::keys::{Keys, MASKING_KEY, ROOT_KEY};
use pgwarden_testapi::TestApiServer;

async fn admin(api: &TestApiServer) -> Client {
    let kc = Kubeconfig::read_from(api.kubeconfig()).unwrap();
    let opts = KubeConfigOptions {
        context: Some("admin".into()),
        ..Default::default()
    };
    let config = Config::from_custom_kubeconfig(kc, &opts).await.unwrap();
    Client::try_from(config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_created_once_shared_by_racing_replicas_and_recreated_when_deleted() {
    let api = TestApiServer::start().unwrap();
    let client = admin(&api).await;

    // Two replicas start at once: one creates, the other reads the winner's.
    let (a, b) = tokio::join!(
        Keys::load_or_create(client.clone(), "default", "pgwarden-keys"),
        Keys::load_or_create(client.clone(), "default", "pgwarden-keys"),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.masking_key(), b.masking_key());
    assert_eq!(
        a.fingerprint_key("ci", "nightly"),
        b.fingerprint_key("ci", "nightly")
    );

    // A restart reads the same keys.
    let again = Keys::load_or_create(client.clone(), "default", "pgwarden-keys")
        .await
        .unwrap();
    assert_eq!(again.masking_key(), a.masking_key());

    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let stored = secrets.get("pgwarden-keys").await.unwrap();
    let data = stored.data.unwrap();
    assert_eq!(data[MASKING_KEY].0, a.masking_key().0);
    assert_eq!(data[ROOT_KEY].0.len(), 32);

    // Deleted: the next load creates new keys (pseudonyms change; logged).
    secrets
        .delete("pgwarden-keys", &DeleteParams::default())
        .await
        .unwrap();
    let fresh = Keys::load_or_create(client.clone(), "default", "pgwarden-keys")
        .await
        .unwrap();
    assert_ne!(fresh.masking_key(), a.masking_key());
    assert!(secrets.get_opt("pgwarden-keys").await.unwrap().is_some());

    // A damaged Secret is an error, never silently replaced.
    let mut damaged = secrets.get("pgwarden-keys").await.unwrap();
    damaged
        .data
        .as_mut()
        .unwrap()
        .insert(ROOT_KEY.into(), k8s_openapi::ByteString(vec![1, 2, 3]));
    secrets
        .replace("pgwarden-keys", &Default::default(), &damaged)
        .await
        .unwrap();
    let err = Keys::load_or_create(client, "default", "pgwarden-keys")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("\"root-key\" is not 32 bytes"),
        "{err}"
    );
}
