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

    // Replicas start at once: one creates, the others' creates get 409 and
    // they read the winner's keys. A race is not certain in one round, so
    // race a few rounds (deleting between them) until one produced a 409.
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(admin(&api).await);
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let mut a = None;
    for round in 0..20 {
        if round > 0 {
            secrets
                .delete("pgwarden-keys", &DeleteParams::default())
                .await
                .unwrap();
        }
        let seen = api.audit().len();
        let loads = clients
            .iter()
            .map(|c| tokio::spawn(Keys::load_or_create(c.clone(), "default", "pgwarden-keys")));
        let all: Vec<Keys> = futures_util::future::join_all(loads)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        for k in &all {
            assert_eq!(k.masking_key(), all[0].masking_key());
            assert_eq!(
                k.fingerprint_key("ci", "nightly"),
                all[0].fingerprint_key("ci", "nightly")
            );
        }
        let lost_race = api.audit()[seen..]
            .iter()
            .any(|e| e.resource == "secrets" && e.verb == "create" && e.code == 409);
        if lost_race {
            a = Some(all[0].clone());
            break;
        }
    }
    let a = a.expect("no load lost a create race in 20 rounds");

    // A restart reads the same keys.
    let again = Keys::load_or_create(client.clone(), "default", "pgwarden-keys")
        .await
        .unwrap();
    assert_eq!(again.masking_key(), a.masking_key());

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_replica_restores_a_deleted_keys_secret_with_the_keys_in_use() {
    let api = TestApiServer::start().unwrap();
    let client = admin(&api).await;
    let keys = Keys::load_or_create(client.clone(), "default", "pgwarden-keys")
        .await
        .unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let keeper = {
        let (keys, client) = (keys.clone(), client.clone());
        tokio::spawn(async move {
            keys.keep_stored(client, "default", "pgwarden-keys", stop)
                .await
        })
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    // Let the watch start before deleting.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    secrets
        .delete("pgwarden-keys", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let restored = loop {
        if let Some(s) = secrets.get_opt("pgwarden-keys").await.unwrap() {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "not restored");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(restored.data.unwrap()[MASKING_KEY].0, keys.masking_key().0);
    // A replica starting now gets the keys in use, not new ones.
    let later = Keys::load_or_create(client, "default", "pgwarden-keys")
        .await
        .unwrap();
    assert_eq!(later.masking_key(), keys.masking_key());
    assert_eq!(
        later.fingerprint_key("ci", "p"),
        keys.fingerprint_key("ci", "p")
    );
    stop_tx.send_replace(true);
    tokio::time::timeout(std::time::Duration::from_secs(2), keeper)
        .await
        .expect("keep_stored ends on shutdown")
        .unwrap();
}
