//! A real OpenAI client library (async-openai) calling W&B-style chat completions through the
//! gateway, streaming and not. The mock upstream requires its own key, which only the gateway
//! holds, so a success proves the credential swap.

mod support;

use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use futures_util::StreamExt;
use tower_gateway::forward::ForwardBuilder;

use support::*;

async fn setup() -> (MockUpstream, TestGateway, Client<OpenAIConfig>) {
    // reqwest is built without a bundled crypto provider; the gateway's is ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mock = MockUpstream::new(UP_KEY, Duration::from_millis(1));
    let addr = mock.spawn().await.unwrap();
    let gw = start_gateway(&format!("http://{addr}/v1"), ForwardBuilder::default()).await;
    let config = OpenAIConfig::new()
        .with_api_base(gw.base_url())
        .with_api_key(GW_KEY);
    (mock, gw, Client::with_config(config))
}

fn request(stream: bool) -> async_openai::types::chat::CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model("meta-llama/Llama-3.1-8B-Instruct")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("Say hello")
            .build()
            .unwrap()
            .into()])
        .stream(stream)
        .build()
        .unwrap()
}

#[tokio::test]
async fn openai_client_non_streaming() {
    let (mock, _gw, client) = setup().await;
    let response = within("completion", client.chat().create(request(false)))
        .await
        .unwrap();
    let content = response.choices[0].message.content.as_deref().unwrap();
    assert_eq!(
        content,
        "Hello from the mock W&B Inference upstream! You said: Say hello"
    );
    assert!(response.usage.is_some());
    assert_eq!(mock.requests(), 1);
}

#[tokio::test]
async fn openai_client_streaming() {
    let (_mock, _gw, client) = setup().await;
    let mut stream = within("stream", client.chat().create_stream(request(true)))
        .await
        .unwrap();
    let mut text = String::new();
    let mut chunks = 0;
    while let Some(chunk) = within("chunk", stream.next()).await {
        let chunk = chunk.unwrap();
        chunks += 1;
        if let Some(content) = chunk
            .choices
            .first()
            .and_then(|c| c.delta.content.as_deref())
        {
            text.push_str(content);
        }
    }
    assert!(chunks > 5);
    assert_eq!(
        text,
        "Hello from the mock W&B Inference upstream! You said: Say hello"
    );
}

#[tokio::test]
async fn openai_client_sees_gateway_errors_as_api_errors() {
    let (_mock, gw, _) = setup().await;
    let config = OpenAIConfig::new()
        .with_api_base(gw.base_url())
        .with_api_key("gw-not-a-key");
    let err = Client::with_config(config)
        .chat()
        .create(request(false))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("Invalid gateway API key"), "{message}");
}

/// A stream the upstream cuts in the middle reaches the OpenAI client library as an error,
/// never as a short answer: the gateway sends one event in the OpenAI error shape before the
/// cut.
#[tokio::test]
async fn openai_client_sees_a_stream_cut_midway_as_an_error() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (up, mut feeds) = sse_upstream().await;
    let gw = start_gateway(&up.base_url(), ForwardBuilder::default()).await;
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(gw.base_url())
            .with_api_key(GW_KEY),
    );
    let chunk = |k: usize| {
        format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{k} \"}},\"finish_reason\":null}}]}}\n\n"
        )
    };
    let feeder = tokio::spawn(async move {
        let (_, events) = feeds.recv().await.unwrap();
        for k in 0..3 {
            events.send(Ok(chunk(k).into())).await.unwrap();
        }
        // Let the three reach the client, then fail.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = events
            .send(Err(std::io::Error::other("upstream fell over")))
            .await;
    });
    let mut stream = within("stream", client.chat().create_stream(request(true)))
        .await
        .unwrap();
    let (mut text, mut error) = (String::new(), None);
    while let Some(item) = within("an item", stream.next()).await {
        match item {
            Ok(chunk) => {
                if let Some(c) = chunk
                    .choices
                    .first()
                    .and_then(|c| c.delta.content.as_deref())
                {
                    text.push_str(c);
                }
            }
            Err(err) => {
                error = Some(err.to_string());
                break;
            }
        }
    }
    feeder.await.unwrap();
    assert_eq!(text, "tok0 tok1 tok2 ");
    let error = error.expect("the cut stream ended as an error, not as a short answer");
    // The gateway's event, not only the broken connection, told it.
    assert!(error.contains("upstream_stream_error"), "{error}");
}
