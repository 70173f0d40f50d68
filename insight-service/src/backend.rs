//! Chooses and builds the LLM backend from the configuration (`--llm-backend`).

use std::sync::Arc;

use secrecy::SecretString;

use crate::{
    config::{BackendKind, Config},
    llm::{
        Generator, LlmBackend,
        gemini::{GeminiConfig, GeminiGenerator},
        http::{HttpLimits, SetupError},
        local::LocalBackend,
        openai::{OpenAiConfig, OpenAiGenerator},
        prompted::PromptedBackend,
    },
};

/// Why the configured backend cannot be built. Names the variable or flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The gemini backend needs a key.
    #[error("--llm-backend gemini needs an API key: set GEMINI_API_KEY or --llm-api-key-file")]
    MissingGeminiKey,
    /// The key file could not be read.
    #[error("cannot read --llm-api-key-file {path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The key file is empty.
    #[error("--llm-api-key-file {0} is empty")]
    EmptyKeyFile(String),
    /// Base URL or model name unusable.
    #[error(transparent)]
    Setup(#[from] SetupError),
}

/// The key from `--llm-api-key-file`, else from `env_var`; trimmed; never logged.
fn api_key(config: &Config, env_var: &str) -> Result<Option<SecretString>, BackendError> {
    if let Some(path) = &config.llm_api_key_file {
        let text = std::fs::read_to_string(path).map_err(|source| BackendError::KeyFile {
            path: path.display().to_string(),
            source,
        })?;
        let key = text.trim();
        if key.is_empty() {
            return Err(BackendError::EmptyKeyFile(path.display().to_string()));
        }
        return Ok(Some(SecretString::from(key.to_owned())));
    }
    Ok(std::env::var(env_var)
        .ok()
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .map(SecretString::from))
}

/// The HTTP limits of every remote call, from the flags.
fn limits(config: &Config) -> HttpLimits {
    HttpLimits {
        max_response_bytes: config.llm_max_response_bytes,
        stall_timeout: config.llm_stall_timeout,
        max_retries: config.llm_max_retries,
        ..HttpLimits::default()
    }
}

/// The configured backend, in the two shapes its users need.
#[derive(Clone)]
pub struct Backends {
    /// The map-reduce summarizer.
    pub summarizer: Arc<dyn LlmBackend>,
    /// The raw text generator (for music analysis); `None` for `local`, whose analysis is the
    /// deterministic one.
    pub generator: Option<Arc<dyn Generator>>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("summarizer", &self.summarizer.name())
            .field(
                "generator",
                &self.generator.as_ref().map(|g| g.name().to_owned()),
            )
            .finish()
    }
}

/// Builds the backend `config.llm_backend` names.
pub fn build_backends(config: &Config) -> Result<Backends, BackendError> {
    let generator: Arc<dyn Generator> = match build_generator(config)? {
        Some(generator) => generator,
        None => {
            return Ok(Backends {
                summarizer: Arc::new(LocalBackend::new()),
                generator: None,
            });
        }
    };
    Ok(Backends {
        summarizer: Arc::new(PromptedBackend::new(generator.clone())),
        generator: Some(generator),
    })
}

/// The remote generator `config.llm_backend` names; `None` for `local`.
fn build_generator(config: &Config) -> Result<Option<Arc<dyn Generator>>, BackendError> {
    Ok(match config.llm_backend {
        BackendKind::Local => None,
        BackendKind::Gemini => {
            let key = api_key(config, "GEMINI_API_KEY")?.ok_or(BackendError::MissingGeminiKey)?;
            let mut gemini = GeminiConfig::new(key);
            if let Some(url) = &config.llm_base_url {
                gemini.base_url = url.clone();
            }
            if let Some(model) = &config.llm_model {
                gemini.model = model.clone();
            }
            gemini.stream = config.llm_stream;
            gemini.thinking = config.llm_thinking_budget;
            gemini.limits = limits(config);
            Some(Arc::new(GeminiGenerator::new(gemini)?))
        }
        BackendKind::Openai => {
            let mut openai = OpenAiConfig::new(api_key(config, "OPENAI_API_KEY")?);
            if let Some(url) = &config.llm_base_url {
                openai.base_url = url.clone();
            }
            if let Some(model) = &config.llm_model {
                openai.model = model.clone();
            }
            openai.stream = config.llm_stream;
            openai.json_mode = config.llm_json_mode;
            openai.token_limit_field = config.llm_token_limit_field;
            openai.thinking = config.llm_thinking_budget;
            openai.limits = limits(config);
            Some(Arc::new(OpenAiGenerator::new(openai)?))
        }
    })
}
