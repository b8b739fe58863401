//! jinja2 → minijinja source rewriting: the places where the two lexers read a template
//! differently.

/// Rewrites a jinja2 template so minijinja reads it the way jinja2 does:
///
/// * newlines (`\r\n`, `\r`) are normalized to `\n`, as jinja2's lexer does;
/// * string literals inside tags are decoded with Python's `unicode-escape` rules (jinja2's), which
///   differ from minijinja's for `\<newline>` (a line continuation), `\a`, `\v`, `\/`,
///   `\UXXXXXXXX`, `\N{...}` and unknown escapes, then re-quoted for minijinja;
/// * transformers' `{% generation %}...{% endgeneration %}` (its `AssistantTracker` extension,
///   which only records offsets for assistant masks and otherwise renders the body as-is) becomes
///   `{% if true %}...{% endif %}`, keeping the whitespace-control markers.
///
/// Text outside tags, comments and `{% raw %}` blocks are copied unchanged.
pub(super) fn preprocess(source: &str) -> String {
    let source = source.replace("\r\n", "\n").replace('\r', "\n");
    let src = source.as_str();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < src.len() {
        let rest = &src[i..];
        let Some(open) = ["{{", "{%", "{#"].iter().filter_map(|d| rest.find(d)).min() else {
            out.push_str(rest);
            break;
        };
        out.push_str(&rest[..open]);
        i += open;
        let rest = &src[i..];
        if rest.starts_with("{#") {
            let len = rest.find("#}").map_or(rest.len(), |e| e + 2);
            out.push_str(&rest[..len]);
            i += len;
            continue;
        }
        let is_block = rest.starts_with("{%");
        if is_block {
            if let Some(len) = raw_block_len(rest) {
                out.push_str(&rest[..len]);
                i += len;
                continue;
            }
        }
        let len = rewrite_tag(rest, is_block, &mut out);
        i += len;
    }
    out
}

/// If `tag` starts a `{% raw %}` block, its length through `{% endraw %}` (or to the end).
fn raw_block_len(tag: &str) -> Option<usize> {
    let (name, end) = block_tag_name(tag)?;
    if name != "raw" {
        return None;
    }
    let mut pos = end;
    while let Some(off) = tag[pos..].find("{%") {
        let at = pos + off;
        if let Some(("endraw", e)) = block_tag_name(&tag[at..]) {
            return Some(at + e);
        }
        pos = at + 2;
    }
    Some(tag.len())
}

/// For a block tag made of one word (`{%- raw %}`), that word and the tag's length.
fn block_tag_name(tag: &str) -> Option<(&str, usize)> {
    let end = tag.find("%}")?;
    let inner = tag[2..end].trim_start_matches(['-', '+']);
    let inner = inner.trim_end_matches(['-', '+']).trim();
    if inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Some((inner, end + 2))
    } else {
        None
    }
}

/// Copies the tag at the start of `tag` (`{{ ... }}` or `{% ... %}`) into `out` with its string
/// literals re-quoted (and a `generation` tag renamed); returns the length consumed.
fn rewrite_tag(tag: &str, is_block: bool, out: &mut String) -> usize {
    if is_block {
        if let Some((name, len)) = block_tag_name(tag) {
            let replacement = match name {
                "generation" => Some("if true"),
                "endgeneration" => Some("endif"),
                _ => None,
            };
            if let Some(r) = replacement {
                let inner = &tag[2..len - 2];
                let open_mod = inner.chars().next().filter(|c| matches!(c, '-' | '+'));
                let close_mod = inner.chars().last().filter(|c| matches!(c, '-' | '+'));
                out.push_str("{%");
                out.extend(open_mod);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.extend(close_mod);
                out.push_str("%}");
                return len;
            }
        }
    }
    let close = if is_block { '%' } else { '}' };
    let bytes = tag.as_bytes();
    out.push_str(&tag[..2]);
    let mut i = 2;
    let mut depth = 0usize;
    while i < tag.len() {
        let c = bytes[i];
        match c {
            b'\'' | b'"' => {
                // A jinja2 string literal: up to the next unescaped matching quote.
                let mut j = i + 1;
                while j < tag.len() && bytes[j] != c {
                    j += if bytes[j] == b'\\' { 2 } else { 1 };
                }
                if j >= tag.len() {
                    // Unterminated: leave it for minijinja to report.
                    out.push_str(&tag[i..]);
                    return tag.len();
                }
                let body = &tag[i + 1..j];
                if body.contains('\\') {
                    requote(&py_unescape(body), out);
                } else {
                    out.push_str(&tag[i..=j]);
                }
                i = j + 1;
                continue;
            }
            b'{' | b'[' | b'(' => depth += 1,
            b'}' | b']' | b')' if depth > 0 => depth -= 1,
            _ => {}
        }
        if depth == 0 && c == close as u8 && bytes.get(i + 1) == Some(&b'}') {
            out.push_str(&tag[i..i + 2]);
            return i + 2;
        }
        // Copy one character (possibly multi-byte).
        let ch_len = tag[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&tag[i..i + ch_len]);
        i += ch_len;
    }
    tag.len()
}

/// A double-quoted minijinja string literal whose value is exactly `value`.
fn requote(value: &str, out: &mut String) {
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `unicode-escape` decoding of a string literal's body (what jinja2 applies).
fn py_unescape(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('\\');
            break;
        };
        let hex = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>, n: usize| {
            let mut s = String::new();
            for _ in 0..n {
                match chars.peek() {
                    Some(h) if h.is_ascii_hexdigit() => {
                        s.push(*h);
                        chars.next();
                    }
                    _ => return (s, None),
                }
            }
            let v = u32::from_str_radix(&s, 16).ok();
            (s, v)
        };
        match d {
            '\n' => {}
            '\\' => out.push('\\'),
            '\'' => out.push('\''),
            '"' => out.push('"'),
            'a' => out.push('\x07'),
            'b' => out.push('\x08'),
            'f' => out.push('\x0c'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'v' => out.push('\x0b'),
            '0'..='7' => {
                let mut v = d.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    match chars.peek().and_then(|o| o.to_digit(8)) {
                        Some(o) => {
                            v = v * 8 + o;
                            chars.next();
                        }
                        None => break,
                    }
                }
                out.push(char::from_u32(v).unwrap_or('\u{fffd}'));
            }
            'x' | 'u' | 'U' => {
                let n = match d {
                    'x' => 2,
                    'u' => 4,
                    _ => 8,
                };
                let (digits, v) = hex(&mut chars, n);
                match v.and_then(char::from_u32) {
                    Some(ch) => out.push(ch),
                    // Python raises here; keep the text so minijinja still has something.
                    None => {
                        out.push('\\');
                        out.push(d);
                        out.push_str(&digits);
                    }
                }
            }
            'N' if chars.peek() == Some(&'{') => {
                // Named characters are not supported; keep the escape verbatim.
                out.push_str("\\N");
            }
            other => {
                out.push('\\');
                out.push(other);
            }
        }
    }
    out
}
