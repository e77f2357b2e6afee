//! The usage snippet: how to call an endpoint through the gateway, ready to paste.

/// How to call an endpoint through the gateway: the base URL for OpenAI-compatible clients
/// and ready-to-paste snippets. The management API and the demo print the same thing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct UsageSnippet {
    /// The base URL clients configure, e.g. `http://host/proxy-api/coreweave-model/inference`.
    pub base_url: String,
    /// A streaming chat completion with curl.
    pub curl: String,
    /// The same with the OpenAI Python client.
    pub python: String,
    /// The same in Rust with the `async-openai` crate.
    pub rust: String,
}

impl UsageSnippet {
    /// Snippets for `base_url`, authenticating with `api_key` (a real key, or a placeholder
    /// such as `$GATEWAY_KEY`) and asking for `model`.
    pub fn new(base_url: &str, api_key: &str, model: &str) -> Self {
        let curl = format!(
            r#"curl -N {base_url}/chat/completions \
  -H "Authorization: Bearer {api_key}" \
  -H "Content-Type: application/json" \
  -d '{{"model": "{model}", "stream": true,
       "messages": [{{"role": "user", "content": "Say hello"}}]}}'"#
        );
        let python = format!(
            r#"from openai import OpenAI

client = OpenAI(base_url="{base_url}", api_key="{api_key}")
stream = client.chat.completions.create(
    model="{model}",
    messages=[{{"role": "user", "content": "Say hello"}}],
    stream=True,
)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)"#
        );
        let rust = format!(
            r#"use async_openai::{{Client, config::OpenAIConfig}};
use async_openai::types::chat::{{ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs}};
use futures_util::StreamExt;

let client = Client::with_config(
    OpenAIConfig::new().with_api_base("{base_url}").with_api_key("{api_key}"),
);
let request = CreateChatCompletionRequestArgs::default()
    .model("{model}")
    .messages([ChatCompletionRequestUserMessageArgs::default().content("Say hello").build()?.into()])
    .build()?;
let mut stream = client.chat().create_stream(request).await?;
while let Some(chunk) = stream.next().await {{
    if let Some(text) = chunk?.choices.first().and_then(|c| c.delta.content.as_deref()) {{
        print!("{{text}}");
    }}
}}"#
        );
        Self {
            base_url: base_url.to_owned(),
            curl,
            python,
            rust,
        }
    }
}

/// The model the snippets ask for.
pub const EXAMPLE_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
