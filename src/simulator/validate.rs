//! Field-by-field validation of a submit body.
//!
//! The simulator is the oracle of the daemon's tests, so it is stricter than
//! the real service is known to be: every problem answers 400 with a message
//! that starts with the offending field's path (`input.seed: ...`), and unknown
//! fields are rejected rather than ignored, so that a typo in the daemon's wire
//! types cannot pass unnoticed.

use serde_json::{Map, Value};

/// A submit body that passed validation.
#[derive(Debug, Clone)]
pub(crate) struct SubmitRequest {
    pub request_type: RequestType,
    /// Present only for [`RequestType::Callback`].
    pub callback_url: Option<String>,
    pub image_urls: Vec<String>,
    pub audio_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestType {
    Async,
    Callback,
}

const TOP_FIELDS: &[&str] = &["request_type", "callback_url", "provider", "input"];
const INPUT_FIELDS: &[&str] = &[
    "mode",
    "image_urls",
    "audio_urls",
    "prompt",
    "resolution",
    "seed",
];
const SEED_MAX: i64 = 2_147_483_647;

/// Validates a raw body; `Err` holds the 400 message naming the field.
pub(crate) fn validate_submit(body: &[u8]) -> Result<SubmitRequest, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("body: not valid JSON ({e})"))?;
    let Value::Object(top) = value else {
        return Err("body: must be a JSON object".into());
    };
    reject_unknown(&top, TOP_FIELDS, "")?;

    let request_type = match top.get("request_type") {
        None | Some(Value::Null) => return Err("request_type: required".into()),
        Some(Value::String(s)) if s == "async" => RequestType::Async,
        Some(Value::String(s)) if s == "callback" => RequestType::Callback,
        Some(_) => return Err("request_type: must be \"async\" or \"callback\"".into()),
    };

    // In async mode the callback URL is ignored, as a URL nobody will call.
    let callback_url = match request_type {
        RequestType::Async => None,
        RequestType::Callback => match top.get("callback_url") {
            None | Some(Value::Null) => {
                return Err("callback_url: required when request_type is \"callback\"".into());
            }
            Some(Value::String(s)) => {
                check_url(s).map_err(|e| format!("callback_url: {e}"))?;
                Some(s.clone())
            }
            Some(_) => return Err("callback_url: must be a string".into()),
        },
    };

    match top.get("provider") {
        None => {}
        Some(Value::String(s)) if matches!(s.as_str(), "auto" | "value" | "official") => {}
        Some(_) => return Err("provider: must be \"auto\", \"value\" or \"official\"".into()),
    }

    let input = match top.get("input") {
        None | Some(Value::Null) => return Err("input: required".into()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err("input: must be an object".into()),
    };
    reject_unknown(input, INPUT_FIELDS, "input.")?;

    match input.get("mode") {
        None | Some(Value::Null) => return Err("input.mode: required".into()),
        Some(Value::String(s)) if s == "image-to-video" => {}
        Some(_) => return Err("input.mode: must be \"image-to-video\"".into()),
    }

    let image_urls = url_list(input.get("image_urls"), "input.image_urls", 1, 2)?;
    let mut audio_urls = url_list(input.get("audio_urls"), "input.audio_urls", 1, 1)?;
    let audio_url = audio_urls.remove(0);

    match input.get("prompt") {
        None | Some(Value::String(_)) => {}
        Some(_) => return Err("input.prompt: must be a string".into()),
    }
    match input.get("resolution") {
        None => {}
        Some(Value::String(s)) if matches!(s.as_str(), "480p" | "720p") => {}
        Some(_) => return Err("input.resolution: must be \"480p\" or \"720p\"".into()),
    }
    match input.get("seed") {
        None => {}
        Some(Value::Number(n))
            if n.as_i64()
                .is_some_and(|s| s == -1 || (0..=SEED_MAX).contains(&s)) => {}
        Some(_) => return Err("input.seed: must be -1 or 0..=2147483647".into()),
    }

    Ok(SubmitRequest {
        request_type,
        callback_url,
        image_urls,
        audio_url,
    })
}

fn reject_unknown(map: &Map<String, Value>, known: &[&str], prefix: &str) -> Result<(), String> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!("{prefix}{k}: unknown field")),
        None => Ok(()),
    }
}

fn url_list(v: Option<&Value>, name: &str, min: usize, max: usize) -> Result<Vec<String>, String> {
    let arr = match v {
        None | Some(Value::Null) => return Err(format!("{name}: required")),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(format!("{name}: must be an array of URLs")),
    };
    if arr.len() < min || arr.len() > max {
        let want = if min == max {
            format!("exactly {min}")
        } else {
            format!("{min} to {max}")
        };
        return Err(format!(
            "{name}: must hold {want} URL(s), got {}",
            arr.len()
        ));
    }
    arr.iter()
        .enumerate()
        .map(|(i, u)| match u {
            Value::String(s) => check_url(s)
                .map(|()| s.clone())
                .map_err(|e| format!("{name}[{i}]: {e}")),
            _ => Err(format!("{name}[{i}]: must be a string")),
        })
        .collect()
}

fn check_url(s: &str) -> Result<(), String> {
    let u = url::Url::parse(s).map_err(|e| format!("not a valid URL ({e})"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err("must be an http or https URL".into());
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err("URL has no host".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn good() -> Value {
        json!({"request_type":"async","provider":"auto","input":{"mode":"image-to-video",
            "image_urls":["https://x.test/a.png"],"audio_urls":["https://x.test/a.mp3"],
            "prompt":"","resolution":"480p","seed":-1}})
    }

    fn check(v: &Value) -> Result<SubmitRequest, String> {
        validate_submit(&serde_json::to_vec(v).expect("json"))
    }

    #[test]
    fn accepts_the_documented_body() {
        let r = check(&good()).expect("valid");
        assert_eq!(r.request_type, RequestType::Async);
        assert_eq!(r.audio_url, "https://x.test/a.mp3");
    }

    #[test]
    fn names_the_field() {
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "request_type",
                Box::new(|v| v["request_type"] = json!("sync")),
            ),
            (
                "callback_url",
                Box::new(|v| v["request_type"] = json!("callback")),
            ),
            ("provider", Box::new(|v| v["provider"] = json!("cheap"))),
            (
                "input.mode",
                Box::new(|v| v["input"]["mode"] = json!("text")),
            ),
            (
                "input.image_urls",
                Box::new(|v| v["input"]["image_urls"] = json!([])),
            ),
            (
                "input.image_urls[0]",
                Box::new(|v| v["input"]["image_urls"] = json!(["ftp://a/b"])),
            ),
            (
                "input.audio_urls",
                Box::new(|v| v["input"]["audio_urls"] = json!(["http://a/1", "http://a/2"])),
            ),
            (
                "input.resolution",
                Box::new(|v| v["input"]["resolution"] = json!("1080p")),
            ),
            (
                "input.seed",
                Box::new(|v| v["input"]["seed"] = json!(2_147_483_648_i64)),
            ),
            ("input.seed", Box::new(|v| v["input"]["seed"] = json!(1.5))),
            (
                "input.prompt",
                Box::new(|v| v["input"]["prompt"] = json!(3)),
            ),
            ("colour", Box::new(|v| v["colour"] = json!(1))),
            ("input.fps", Box::new(|v| v["input"]["fps"] = json!(1))),
        ];
        for (field, f) in cases {
            let mut v = good();
            f(&mut v);
            let e = check(&v).expect_err(field);
            assert!(e.starts_with(&format!("{field}:")), "{field}: {e}");
        }
        assert!(
            validate_submit(b"{nope")
                .expect_err("json")
                .starts_with("body:")
        );
    }
}
