//! Admission, in the real server's order: mutating plugins → object validation
//! (built-in checks, a CRD's schema) → validating plugins. Only the two plugin
//! stages live here; [`crate::handlers`] runs schema validation between them.
//!
//! The one plugin registered is [`crate::webhooks::Webhooks`] (Mutating/Validating
//! WebhookConfigurations called over HTTPS). Plugins get the server [`State`] to
//! read what they need under the store lock, never holding it across an await.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use crate::auth::UserInfo;
use crate::handlers::State;
use crate::status::ApiResult;

/// What an admission plugin learns about a write (AdmissionRequest's fields).
#[derive(Debug, Clone)]
pub struct AdmissionAttributes {
    /// `CREATE`, `UPDATE`, `DELETE`
    pub operation: &'static str,
    pub group: String,
    pub version: String,
    pub kind: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    pub user: UserInfo,
    pub old_object: Option<Value>,
    pub dry_run: bool,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait AdmissionPlugin: Send + Sync {
    /// May change `object`; an error refuses the request.
    fn mutate<'a>(
        &'a self,
        state: &'a State,
        attrs: &'a AdmissionAttributes,
        object: &'a mut Value,
    ) -> BoxFuture<'a, ApiResult<()>>;
    /// May only refuse.
    fn validate<'a>(
        &'a self,
        state: &'a State,
        attrs: &'a AdmissionAttributes,
        object: &'a Value,
    ) -> BoxFuture<'a, ApiResult<()>>;
}

#[derive(Default, Clone)]
pub struct Admission {
    plugins: Vec<Arc<dyn AdmissionPlugin>>,
}

impl Admission {
    pub fn add(&mut self, p: Arc<dyn AdmissionPlugin>) {
        self.plugins.push(p);
    }

    pub async fn mutate(
        &self,
        state: &State,
        attrs: &AdmissionAttributes,
        object: &mut Value,
    ) -> ApiResult<()> {
        for p in &self.plugins {
            p.mutate(state, attrs, object).await?;
        }
        Ok(())
    }

    pub async fn validate(
        &self,
        state: &State,
        attrs: &AdmissionAttributes,
        object: &Value,
    ) -> ApiResult<()> {
        for p in &self.plugins {
            p.validate(state, attrs, object).await?;
        }
        Ok(())
    }
}
