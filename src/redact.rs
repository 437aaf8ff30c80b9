//! Presigned URLs out of text bound for logs, `status` and `results.csv`.
//!
//! The query of a signed URL is a credential for as long as it is valid:
//! the daemon's own presigned media URLs (which an API may echo in an error
//! message), a result URL in a download error, a signed audio URL of a
//! manifest in a probe error. The path stays: it says which file.

use std::borrow::Cow;

/// Query parameters that make a URL a credential: S3 (SigV4, SigV2), GCS,
/// Azure SAS, CloudFront.
const SIGNED: &[&str] = &[
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "awsaccesskeyid",
    "signature",
    "x-goog-signature",
    "x-goog-credential",
    "sig",
    "key-pair-id",
];

/// What replaces the query of a signed URL.
pub(crate) const REDACTED: &str = "REDACTED";

/// `text` with the query of every signed URL in it replaced by
/// [`REDACTED`]; borrowed when there is none.
pub(crate) fn presigned(text: &str) -> Cow<'_, str> {
    let lower = text.to_ascii_lowercase();
    if !SIGNED.iter().any(|p| lower.contains(p)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = 0;
    let mut from = 0;
    while let Some(start) = find_url(&lower, from) {
        let end = lower[start..]
            .find(|c: char| {
                c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | ')' | ']' | '}')
            })
            .map_or(text.len(), |n| start + n);
        let url = &text[start..end];
        if let Some(q) = url.find('?') {
            let query_end = url[q..].find('#').map_or(url.len(), |n| q + n);
            if signed(&url[q + 1..query_end]) {
                out.push_str(&text[rest..start + q + 1]);
                out.push_str(REDACTED);
                rest = start + query_end;
            }
        }
        from = end;
    }
    if rest == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[rest..]);
    Cow::Owned(out)
}

/// Where the next `http://` or `https://` starts in `lower` at or after
/// `from`, slashes JSON-escaped (`https:\/\/`, as PHP writes them) or not.
fn find_url(lower: &str, from: usize) -> Option<usize> {
    let tail = lower.get(from..)?;
    let at = ["http://", "https://", "http:\\/\\/", "https:\\/\\/"]
        .iter()
        .filter_map(|scheme| tail.find(scheme))
        .min()?;
    Some(from + at)
}

/// Request paths whose tail is a secret: the callback's, a media file's
/// token, a staged console drop's token.
const SECRET_PATHS: &[&str] = &["/callback/", "/media/", "/console/drop/"];

/// A request path fit for a log line: the secret tail of the routes that
/// carry one is cut.
pub(crate) fn request_path(path: &str) -> Cow<'_, str> {
    match SECRET_PATHS.iter().find(|p| path.starts_with(*p)) {
        Some(prefix) if path.len() > prefix.len() => Cow::Owned(format!("{prefix}{REDACTED}")),
        _ => Cow::Borrowed(path),
    }
}

fn signed(query: &str) -> bool {
    // JSON written by some encoders escapes `&` as `\u0026`.
    let query = query.replace("\\u0026", "&");
    query.split(['&', ';']).any(|pair| {
        let name = pair.split('=').next().unwrap_or("");
        let name = name.to_ascii_lowercase();
        SIGNED.contains(&name.as_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_query_goes_and_the_path_stays() {
        let text = "image_url https://b.s3.example/media/ab12.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20261201&X-Amz-Signature=deadbeef is not reachable";
        let out = presigned(text);
        assert_eq!(
            out,
            "image_url https://b.s3.example/media/ab12.png?REDACTED is not reachable"
        );
    }

    #[test]
    fn every_signed_url_in_a_text_and_nothing_else() {
        let text = "a (https://x.example/v.mp4?sig=1&se=2), b http://y.example/a?page=2 c HTTPS://z.example/k?Signature=9&Expires=1#frag";
        assert_eq!(
            presigned(text),
            "a (https://x.example/v.mp4?REDACTED), b http://y.example/a?page=2 c HTTPS://z.example/k?REDACTED#frag"
        );
    }

    #[test]
    fn json_escaped_separators_are_seen() {
        let text = r#"{"error":"cannot fetch https://b.example/a.png?X-Amz-Algorithm=AWS4\u0026X-Amz-Signature=abc"}"#;
        assert_eq!(
            presigned(text),
            r#"{"error":"cannot fetch https://b.example/a.png?REDACTED"}"#
        );
    }

    #[test]
    fn json_escaped_slashes_are_seen() {
        let text = r#"{"msg":"no https:\/\/b.example\/a.png?X-Amz-Signature=abc here"}"#;
        assert_eq!(
            presigned(text),
            r#"{"msg":"no https:\/\/b.example\/a.png?REDACTED here"}"#
        );
    }

    #[test]
    fn secret_tails_of_request_paths_are_cut() {
        assert_eq!(request_path("/callback/s3cr3t"), "/callback/REDACTED");
        assert_eq!(request_path("/media/abc.wav"), "/media/REDACTED");
        assert_eq!(
            request_path("/console/drop/tok/accept"),
            "/console/drop/REDACTED"
        );
        assert_eq!(request_path("/console/drop"), "/console/drop");
        assert_eq!(request_path("/batches/b1/retry"), "/batches/b1/retry");
    }

    #[test]
    fn text_without_a_signed_url_is_borrowed() {
        for text in [
            "",
            "plain words",
            "https://a.example/x?page=1",
            "the signature is wrong",
            "https://a.example/signature/path",
        ] {
            assert!(
                matches!(presigned(text), Cow::Borrowed(t) if t == text),
                "{text}"
            );
        }
    }

    #[test]
    fn odd_text_does_not_panic() {
        for text in [
            "https://",
            "https://?",
            "http://a?sig",
            "ü https://ä.example/ö?X-Amz-Signature=ß ü",
            "https://a?x-amz-signature=1https://b?sig=2",
        ] {
            let out = presigned(text);
            assert!(!out.contains("=1") && !out.contains("=ß"), "{text}: {out}");
        }
    }
}
