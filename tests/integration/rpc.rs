//! RPC through `amq.rabbitmq.reply-to` with the `fib` plugin, as RabbitMQ's
//! tutorial clients do it, under concurrency.

use std::time::Duration;

use warren_tests::{Client, RpcClient, config, header, start, text, unique};

use crate::pipeline;

fn fib(n: u32) -> u128 {
    let (mut a, mut b) = (0u128, 1u128);
    for _ in 0..n {
        (a, b) = (b, a + b);
    }
    a
}

#[tokio::test]
async fn concurrent_rpc_calls_get_their_own_answers() -> anyhow::Result<()> {
    let q = unique("rpc");
    let warren = start(config(&pipeline(
        "fib",
        &q,
        "fib",
        "concurrency = 4\nprefetch = 16\n",
    ))?)
    .await?;
    let mut rpc = RpcClient::connect().await?;
    let calls = 64u32;
    for i in 0..calls {
        rpc.request(&q, (i * 7 % 90).to_string().as_bytes(), &format!("c{i}"))
            .await?;
    }
    let answers = rpc.replies(calls as usize, Duration::from_secs(20)).await?;
    for i in 0..calls {
        let want = fib(i * 7 % 90).to_string();
        assert_eq!(text(&answers[&format!("c{i}")]), want, "call c{i}");
    }
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_bad_rpc_request_gets_an_error_reply_and_is_parked() -> anyhow::Result<()> {
    let q = unique("rpc-bad");
    let warren = start(config(&pipeline("fib", &q, "fib", ""))?).await?;
    let mut rpc = RpcClient::connect().await?;
    let r = rpc.call(&q, b"abc", Duration::from_secs(10)).await?;
    assert!(
        text(&r).starts_with("error: not an integer"),
        "{}",
        text(&r)
    );
    assert!(header(&r, "x-warren-error").is_some_and(|e| e.contains("not an integer")));
    let client = Client::connect().await?;
    let d = client
        .take_one(&format!("{q}.dlq"), Duration::from_secs(10))
        .await?;
    assert_eq!(text(&d), "abc");
    assert!(header(&d, "x-warren-reason").is_some_and(|e| e.contains("not an integer")));
    warren.shutdown().await;
    Ok(())
}
