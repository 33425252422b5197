//! Query strings and form bodies, decoded the same way by both simulators.

/// `a=1&b=x%20y` → pairs, percent- and plus-decoded.
pub(crate) fn decode_pairs(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 3 <= bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn decodes_percent_and_plus_and_keeps_bad_escapes() {
        let pairs = super::decode_pairs("a=x%20y&b=1+2&c=%zz&d");
        assert_eq!(
            pairs,
            [
                ("a".into(), "x y".into()),
                ("b".into(), "1 2".into()),
                ("c".into(), "%zz".into()),
                ("d".into(), String::new())
            ]
        );
    }
}
