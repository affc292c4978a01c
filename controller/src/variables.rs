//! CORE: repository variables (plain and secret, by scope) and the
//! environment a job gets from them, with the forms of each secret the
//! agent masks.

use std::collections::BTreeMap;

use hobotnica_common::env::merge_layers;
use hobotnica_common::job::{EnvScope, EnvValue, EnvVar, Job, Repo};
use hobotnica_common::mask_forms::mask_forms;
use hobotnica_common::validate;

use crate::auth::{Access, Caller};
use crate::error::CoreError;
use crate::secrets::env_context;
use crate::services::Services;

/// Most variables a repository may have.
pub const MAX_REPO_VARS: usize = 200;

/// A variable to set on a repository.
#[derive(Debug, Clone)]
pub struct SetEnv {
    pub key: String,
    pub value: String,
    pub secret: bool,
    pub scope: hobotnica_common::job::EnvScope,
}

/// What a job gets at assignment: its variables (repository, kind, one-time;
/// secrets opened) and the values the agent must mask.
#[derive(Debug, Default)]
pub struct JobEnvironment {
    pub env: BTreeMap<String, String>,
    pub secrets: Vec<String>,
}

impl Services {
    /// The variables of `owner/name`, when `caller` may read it (a secret's
    /// value stays sealed: the edges never show it).
    pub async fn variables(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
    ) -> Result<Vec<EnvVar>, CoreError> {
        Ok(self.repo_for(caller, owner, name, Access::Read).await?.env)
    }

    /// Adds or replaces a variable of `owner/name` for `caller` (push
    /// access).
    pub async fn set_variable(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
        set: SetEnv,
    ) -> Result<EnvVar, CoreError> {
        let repo = self.repo_for(caller, owner, name, Access::Push).await?;
        self.set_env(&repo, set).await
    }

    /// Removes a variable of `owner/name` (of every scope, or of one) for
    /// `caller` (push access).
    pub async fn remove_variable(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
        key: &str,
        scope: Option<EnvScope>,
    ) -> Result<(), CoreError> {
        let repo = self.repo_for(caller, owner, name, Access::Push).await?;
        self.delete_env(&repo, key, scope).await
    }

    /// Adds or replaces a repository variable.
    pub(crate) async fn set_env(&self, repo: &Repo, set: SetEnv) -> Result<EnvVar, CoreError> {
        let field = format!("env.{}", set.key);
        validate::env_name(&field, &set.key)?;
        if hobotnica_common::env::is_reserved(&set.key) {
            return Err(CoreError::invalid(
                &field,
                hobotnica_common::env::RESERVED_NAMES,
            ));
        }
        validate::env_value(&field, &set.value)?;
        let value = if set.secret {
            EnvValue::Sealed(self.secret_key.seal(
                set.value.as_bytes(),
                &env_context(&repo.full_name(), &set.key),
            ))
        } else {
            EnvValue::Plain(set.value)
        };
        let var = EnvVar {
            key: set.key.clone(),
            scope: set.scope,
            value,
        };
        self.change_repo(&repo.owner, &repo.name, |updated| {
            updated
                .env
                .retain(|other| !(other.key == var.key && other.scope == var.scope));
            if updated.env.len() >= MAX_REPO_VARS {
                return Err(CoreError::invalid(
                    "env",
                    format!("a repository has at most {MAX_REPO_VARS} variables"),
                ));
            }
            updated.env.push(var.clone());
            updated
                .env
                .sort_by(|a, b| (&a.key, a.scope as u8).cmp(&(&b.key, b.scope as u8)));
            Ok(())
        })
        .await?;
        tracing::info!(repo = %repo.full_name(), key = %var.key, secret = var.is_secret(), "variable set");
        Ok(var)
    }

    /// Removes a repository variable (of every scope, or of one).
    async fn delete_env(
        &self,
        repo: &Repo,
        key: &str,
        scope: Option<EnvScope>,
    ) -> Result<(), CoreError> {
        self.change_repo(&repo.owner, &repo.name, |updated| {
            let before = updated.env.len();
            updated
                .env
                .retain(|var| !(var.key == key && scope.is_none_or(|scope| var.scope == scope)));
            if updated.env.len() == before {
                return Err(CoreError::NotFound(format!("variable {key}")));
            }
            Ok(())
        })
        .await
    }

    /// The variables of `job`: the repository's (scope `all`, then the job's
    /// kind), then the job's one-time ones, merged by
    /// `hobotnica_common::env::merge_layers`; secrets opened (none for a
    /// pull request from a fork), with their mask forms.
    pub fn job_environment(&self, repo: &Repo, job: &Job) -> JobEnvironment {
        let mut secrets = Vec::new();
        let mut layer = |in_layer: fn(EnvScope) -> bool| -> BTreeMap<String, String> {
            let mut layer = BTreeMap::new();
            for var in repo
                .env
                .iter()
                .filter(|var| in_layer(var.scope) && var.scope.applies_to(job.kind))
            {
                let value = match &var.value {
                    EnvValue::Plain(value) => value.clone(),
                    EnvValue::Sealed(_) if job.from_fork => continue,
                    EnvValue::Sealed(sealed) => match self.open_variable(repo, &var.key, sealed) {
                        Some(value) => {
                            secrets.extend(mask_forms(&value));
                            value
                        }
                        None => continue,
                    },
                };
                layer.insert(var.key.clone(), value);
            }
            layer
        };
        let all = layer(|scope| scope == EnvScope::All);
        let kind = layer(|scope| scope != EnvScope::All);
        JobEnvironment {
            env: merge_layers([&all, &kind, &job.env]),
            secrets,
        }
    }

    /// A secret variable's value, opened; `None` (logged) when the key
    /// cannot open it.
    fn open_variable(&self, repo: &Repo, key: &str, sealed: &str) -> Option<String> {
        match self
            .secret_key
            .open(sealed, &env_context(&repo.full_name(), key))
        {
            Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
            Err(err) => {
                tracing::error!(repo = %repo.full_name(), key = %key, error = %err, "cannot open a secret variable");
                None
            }
        }
    }
}
