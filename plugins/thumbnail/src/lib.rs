//! `thumbnail`: turns a PNG or JPEG image into a PNG thumbnail and publishes it.
//!
//! The image is scaled down to fit `max_width` x `max_height`, keeping its aspect
//! ratio (never scaled up), and published as one `image/png` message with headers
//! `x-source-routing-key`, `x-source-message-id` (if the source had one),
//! `x-original-width`, `x-original-height`, `x-thumbnail-width` and
//! `x-thumbnail-height`. A body that does not decode is dead-lettered with the
//! decoder's error.
//!
//! Instead of the image itself the body may be `{"url": "https://..."}`: the
//! image is then fetched with a GET (the pipeline's `[pipeline.http]` must allow
//! the URL's origin). 429 and 5xx answers, timeouts and failed connections ask
//! for a retry (honouring `Retry-After`); a denied URL, another status or a
//! response over `max_response_bytes` dead-letters the message.
//!
//! Config keys:
//! * `max_width`, `max_height`: bounding box in pixels (default 128 each);
//! * `output_exchange`: where to publish (default `thumbnails`);
//! * `output_routing_key`: routing key (default: the incoming message's).

use std::io::Cursor;

use image::imageops::FilterType;
use image::{GenericImageView, ImageFormat};
use std::time::Duration;

use warren_plugin_sdk::{
    Handler, Message, Outcome, Outgoing, config, config_or, config_parse_or, http,
};

const DEFAULT_MAX: u32 = 128;

struct Thumbnail;

impl Handler for Thumbnail {
    fn handle(msg: Message) -> Outcome {
        let (max_width, max_height) = match (bound("max_width"), bound("max_height")) {
            (Ok(w), Ok(h)) => (w, h),
            (Err(e), _) | (_, Err(e)) => return Outcome::dead_letter(e),
        };
        let fetched;
        let image = match image_url(msg.body()) {
            None => msg.body(),
            Some(url) => match fetch(&url) {
                Ok(bytes) => {
                    fetched = bytes;
                    &fetched
                }
                Err(outcome) => return outcome,
            },
        };
        let thumb = match make_thumbnail(image, max_width, max_height) {
            Ok(thumb) => thumb,
            Err(e) => return Outcome::dead_letter(e),
        };
        let routing_key = config("output_routing_key").unwrap_or_else(|| msg.routing_key.clone());
        let mut out = Outgoing::new(
            config_or("output_exchange", "thumbnails"),
            routing_key,
            thumb.png,
        )
        .content_type("image/png")
        .header("x-source-routing-key", msg.routing_key);
        if let Some(id) = msg.message_id {
            out = out.header("x-source-message-id", id);
        }
        let out = out
            .header("x-original-width", thumb.original.0.to_string())
            .header("x-original-height", thumb.original.1.to_string())
            .header("x-thumbnail-width", thumb.size.0.to_string())
            .header("x-thumbnail-height", thumb.size.1.to_string());
        Outcome::publish([out])
    }
}

warren_plugin_sdk::export!(Thumbnail);

/// The `url` of a `{"url": "..."}` body; `None` for anything else (image
/// bytes never start with `{`).
fn image_url(body: &[u8]) -> Option<String> {
    if body.first() != Some(&b'{') {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("url")?.as_str().map(str::to_string)
}

/// GET the image, or say what to do with the message.
fn fetch(url: &str) -> Result<Vec<u8>, Outcome> {
    let res = match http::get(url).send() {
        Ok(res) => res,
        Err(e) if e.is_transient() => {
            return Err(Outcome::retry(format!("fetching {url}: {e}")));
        }
        Err(e) => return Err(Outcome::dead_letter(format!("fetching {url}: {e}"))),
    };
    let status = res.status;
    if res.is_success() {
        return Ok(res.body);
    }
    let reason = format!("fetching {url}: status {status}");
    if status == 429 || status >= 500 {
        return Err(match res.retry_after() {
            Some(d) => Outcome::retry_after(reason, d.min(Duration::from_secs(86_400))),
            None => Outcome::retry(reason),
        });
    }
    Err(Outcome::dead_letter(reason))
}

fn bound(key: &str) -> Result<u32, String> {
    match config_parse_or(key, DEFAULT_MAX) {
        Ok(0) => Err(format!("config {key}: must be at least 1")),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

struct Thumb {
    png: Vec<u8>,
    original: (u32, u32),
    size: (u32, u32),
}

fn make_thumbnail(data: &[u8], max_width: u32, max_height: u32) -> Result<Thumb, String> {
    let img = image::load_from_memory(data).map_err(|e| format!("cannot decode image: {e}"))?;
    let original = img.dimensions();
    let img = if original.0 > max_width || original.1 > max_height {
        // Triangle (bilinear) is the cheapest filter that still averages pixels;
        // the better ones cost several times more in wasm.
        img.resize(max_width, max_height, FilterType::Triangle)
    } else {
        img
    };
    let mut png = Vec::new();
    img.write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        .map_err(|e| format!("cannot encode PNG: {e}"))?;
    Ok(Thumb {
        png,
        original,
        size: img.dimensions(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, RgbImage};

    fn encoded(width: u32, height: u32, format: ImageFormat) -> Vec<u8> {
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([x as u8, y as u8, 128])
        }));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), format).unwrap();
        out
    }

    #[test]
    fn fits_the_box_keeping_aspect_ratio() {
        let t = make_thumbnail(&encoded(400, 200, ImageFormat::Jpeg), 128, 128).unwrap();
        assert_eq!((t.original, t.size), ((400, 200), (128, 64)));
        let decoded = image::load_from_memory_with_format(&t.png, ImageFormat::Png).unwrap();
        assert_eq!(decoded.dimensions(), (128, 64));
        let t = make_thumbnail(&encoded(100, 300, ImageFormat::Png), 128, 60).unwrap();
        assert_eq!(t.size, (20, 60));
    }

    #[test]
    fn never_upscales() {
        let t = make_thumbnail(&encoded(30, 20, ImageFormat::Png), 128, 128).unwrap();
        assert_eq!(t.size, (30, 20));
    }

    #[test]
    fn garbage_is_rejected() {
        let e = make_thumbnail(b"not an image", 128, 128).err().unwrap();
        assert!(e.starts_with("cannot decode image: "), "{e}");
    }
}
