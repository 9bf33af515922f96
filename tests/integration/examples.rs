//! The example pipelines end to end: thumbnails and notification fan-out.

use std::io::Cursor;
use std::time::Duration;

use image::{ImageFormat, RgbImage};
use warren_tests::{Client, config, header, start, text, unique};

use crate::pipeline;

const WAIT: Duration = Duration::from_secs(20);

fn image_bytes(w: u32, h: u32, format: ImageFormat) -> anyhow::Result<Vec<u8>> {
    let img = RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format)?;
    Ok(out.into_inner())
}

#[tokio::test]
async fn thumbnails_keep_the_aspect_ratio_and_bad_images_are_parked() -> anyhow::Result<()> {
    let q = unique("images");
    let thumbs = unique("thumbs");
    let extra = format!(
        "[[pipeline.output]]\nexchange = {thumbs:?}\ntype = \"fanout\"\n[pipeline.limits]\nmemory_mib = 256\ntimeout_ms = 20000\n[pipeline.config]\nmax_width = \"128\"\nmax_height = \"128\"\noutput_exchange = {thumbs:?}\n"
    );
    let warren = start(config(&pipeline("thumbnail", &q, "thumbnail", &extra))?).await?;
    let client = Client::connect().await?;
    let out = unique("thumbs-out");
    client.bound_queue(&out, &thumbs, "").await?;

    client
        .send(&q, &image_bytes(640, 400, ImageFormat::Png)?)
        .await?;
    let d = client.take_one(&out, WAIT).await?;
    let thumb = image::load_from_memory_with_format(&d.data, ImageFormat::Png)?;
    assert_eq!((thumb.width(), thumb.height()), (128, 80));
    assert_eq!(
        d.properties.content_type().as_ref().map(|s| s.as_str()),
        Some("image/png")
    );
    assert_eq!(header(&d, "x-original-width").as_deref(), Some("640"));
    assert_eq!(header(&d, "x-thumbnail-height").as_deref(), Some("80"));

    client
        .send(&q, &image_bytes(300, 600, ImageFormat::Jpeg)?)
        .await?;
    let d = client.take_one(&out, WAIT).await?;
    let thumb = image::load_from_memory(&d.data)?;
    assert_eq!((thumb.width(), thumb.height()), (64, 128));

    client.send(&q, b"definitely not an image").await?;
    let d = client.take_one(&format!("{q}.dlq"), WAIT).await?;
    assert!(header(&d, "x-warren-reason").is_some_and(|r| r.contains("cannot decode image")));
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn notifications_fan_out_per_channel() -> anyhow::Result<()> {
    let q = unique("events");
    let notes = unique("notes");
    let extra = format!(
        "[[pipeline.output]]\nexchange = {notes:?}\ntype = \"topic\"\n[pipeline.retry]\nmax_attempts = 2\ninitial_delay_ms = 50\nmax_delay_ms = 50\n[pipeline.config]\nexchange = {notes:?}\n\"template.welcome\" = \"Hello {{name}}, welcome!\"\n\"template.welcome.sms\" = \"Hi {{name}}\"\n"
    );
    let warren = start(config(&pipeline("notify", &q, "notify", &extra))?).await?;
    let client = Client::connect().await?;
    let out = unique("notes-out");
    client.bound_queue(&out, &notes, "notify.#").await?;

    let event =
        r#"{"user":"ada","template":"welcome","channels":["email","sms"],"vars":{"name":"Ada"}}"#;
    client.send(&q, event.as_bytes()).await?;
    let mut got: Vec<(String, serde_json::Value)> = client
        .take(&out, 2, WAIT)
        .await?
        .iter()
        .map(|d| {
            (
                d.routing_key.to_string(),
                serde_json::from_slice(&d.data).unwrap_or_default(),
            )
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got[0].0, "notify.email");
    assert_eq!(got[0].1["text"], "Hello Ada, welcome!");
    assert_eq!(got[0].1["user"], "ada");
    assert_eq!(got[1].0, "notify.sms");
    assert_eq!(got[1].1["text"], "Hi Ada");
    client
        .expect_empty(&out, Duration::from_millis(300))
        .await?;

    let dlq = format!("{q}.dlq");
    client.send(&q, br#"{"template":"welcome"}"#).await?;
    let d = client.take_one(&dlq, WAIT).await?;
    assert!(
        header(&d, "x-warren-reason").is_some_and(|r| r.contains("user")),
        "{:?}",
        header(&d, "x-warren-reason")
    );

    let transient =
        r#"{"user":"bob","template":"welcome","vars":{"name":"Bob"},"transient_failure":true}"#;
    client.send(&q, transient.as_bytes()).await?;
    let d = client.take_one(&dlq, WAIT).await?;
    assert_eq!(text(&d), transient);
    assert!(
        header(&d, "x-warren-reason").is_some_and(|r| r.starts_with("gave up after 2 attempts"))
    );
    assert_eq!(
        client.depth(&out).await?,
        0,
        "a failed event publishes nothing"
    );
    warren.shutdown().await;
    Ok(())
}
