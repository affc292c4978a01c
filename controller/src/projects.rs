//! CORE: registering, showing and removing repositories.

use chrono::Utc;
use hobotnica_common::job::{DEFAULT_JOB_TIMEOUT_SECS, Repo};
use hobotnica_common::validate;

use crate::error::CoreError;
use crate::git::check_git_url;
use crate::services::Services;

/// Owner of repositories registered by plain git URL.
pub const LOCAL_OWNER: &str = "local";
/// Longest accepted job timeout (one week).
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// What registering a plain git repository takes.
#[derive(Debug, Clone)]
pub struct NewRepo {
    pub owner: Option<String>,
    pub name: String,
    pub git_url: String,
    pub branch: Option<String>,
    pub timeout_secs: Option<u64>,
}

impl Services {
    pub async fn register_repo(&self, new: NewRepo) -> Result<Repo, CoreError> {
        let owner = new.owner.unwrap_or_else(|| LOCAL_OWNER.to_owned());
        validate::repo_component("owner", &owner)?;
        validate::repo_component("name", &new.name)?;
        check_git_url(&new.git_url).map_err(|reason| CoreError::invalid("git_url", reason))?;
        let branch = new.branch.unwrap_or_else(|| "main".to_owned());
        validate::branch("branch", &branch)?;
        let timeout_secs = new.timeout_secs.unwrap_or(DEFAULT_JOB_TIMEOUT_SECS);
        if timeout_secs == 0 || timeout_secs > MAX_TIMEOUT_SECS {
            return Err(CoreError::invalid(
                "timeout_secs",
                format!("must be between 1 and {MAX_TIMEOUT_SECS} seconds"),
            ));
        }
        let repo = Repo {
            owner,
            name: new.name,
            git_url: new.git_url,
            default_branch: branch,
            timeout_secs,
            created_at: Utc::now(),
        };
        self.store.create_repo(repo.clone()).await?;
        tracing::info!(repo = %repo.full_name(), "repository registered");
        Ok(repo)
    }

    pub async fn repo(&self, owner: &str, name: &str) -> Result<Repo, CoreError> {
        validate::repo_component("owner", owner)?;
        validate::repo_component("name", name)?;
        self.store
            .get_repo(owner, name)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("repository {owner}/{name}")))
    }

    pub async fn delete_repo(&self, owner: &str, name: &str) -> Result<(), CoreError> {
        self.repo(owner, name).await?;
        self.store.delete_repo(owner, name).await?;
        tracing::info!(repo = %format!("{owner}/{name}"), "repository removed");
        Ok(())
    }
}
