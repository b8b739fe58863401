//! Python `str` methods chat templates call that minijinja (and pycompat) lack or do differently.

use minijinja::{Error as JinjaError, ErrorKind, Value};

/// Python's `str.isspace` set (what `str.split()` / `str.strip()` use).
pub(super) fn is_py_space(c: char) -> bool {
    matches!(c, '\t'..='\r' | '\x1c'..=' ' | '\u{85}' | '\u{a0}' | '\u{1680}')
        || matches!(
            c,
            '\u{2000}'..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}'
        )
        || matches!(c, '\u{205f}' | '\u{3000}')
}

pub(super) fn method_error(msg: impl Into<String>) -> JinjaError {
    JinjaError::new(ErrorKind::InvalidOperation, msg.into())
}

/// The string methods handled here (before falling back to pycompat); `None` if not one of them.
pub(super) fn string_method(
    s: &str,
    method: &str,
    args: &[Value],
) -> Result<Option<Value>, JinjaError> {
    use minijinja::value::from_args;
    let chars_arg = |args: &[Value]| -> Result<Option<Vec<char>>, JinjaError> {
        let (chars,): (Option<Value>,) = from_args(args)?;
        match chars {
            None => Ok(None),
            Some(v) if v.is_none() => Ok(None),
            Some(v) => match v.as_str() {
                Some(c) => Ok(Some(c.chars().collect())),
                None => Err(method_error("strip arg must be None or str")),
            },
        }
    };
    let rv = match method {
        "strip" => Value::from(match chars_arg(args)? {
            Some(cs) => s.trim_matches(&cs[..]),
            None => s.trim_matches(is_py_space),
        }),
        "lstrip" => Value::from(match chars_arg(args)? {
            Some(cs) => s.trim_start_matches(&cs[..]),
            None => s.trim_start_matches(is_py_space),
        }),
        "rstrip" => Value::from(match chars_arg(args)? {
            Some(cs) => s.trim_end_matches(&cs[..]),
            None => s.trim_end_matches(is_py_space),
        }),
        "isspace" => {
            let () = from_args(args)?;
            Value::from(!s.is_empty() && s.chars().all(is_py_space))
        }
        "split" | "rsplit" => {
            let (sep, maxsplit): (Option<Value>, Option<i64>) = from_args(args)?;
            let sep = sep.filter(|v| !v.is_none());
            let sep = match &sep {
                Some(v) => Some(
                    v.as_str()
                        .ok_or_else(|| method_error("must be str or None"))?
                        .to_string(),
                ),
                None => None,
            };
            let maxsplit = maxsplit.filter(|&m| m >= 0).map(|m| m as usize);
            let parts = py_split(s, sep.as_deref(), maxsplit, method == "rsplit")?;
            Value::from(parts)
        }
        "removeprefix" => {
            let (p,): (&str,) = from_args(args)?;
            Value::from(s.strip_prefix(p).unwrap_or(s))
        }
        "removesuffix" => {
            let (p,): (&str,) = from_args(args)?;
            Value::from(s.strip_suffix(p).unwrap_or(s))
        }
        "find" | "rfind" | "index" | "rindex" => {
            let (what,): (&str,) = from_args(args)?;
            let pos = if method.starts_with('r') {
                s.rfind(what)
            } else {
                s.find(what)
            };
            match pos {
                Some(b) => Value::from(s[..b].chars().count() as i64),
                None if method.ends_with("index") => {
                    return Err(method_error("substring not found"))
                }
                None => Value::from(-1i64),
            }
        }
        "zfill" => {
            let (width,): (usize,) = from_args(args)?;
            let n = s.chars().count();
            if n >= width {
                Value::from(s)
            } else {
                let (sign, rest) = match s.chars().next() {
                    Some(c @ ('+' | '-')) => (c.to_string(), &s[1..]),
                    _ => (String::new(), s),
                };
                Value::from(format!("{sign}{}{rest}", "0".repeat(width - n)))
            }
        }
        "casefold" => {
            let () = from_args(args)?;
            Value::from(s.to_lowercase())
        }
        "swapcase" => {
            let () = from_args(args)?;
            let mut out = String::with_capacity(s.len());
            for c in s.chars() {
                if c.is_uppercase() {
                    out.extend(c.to_lowercase());
                } else {
                    out.extend(c.to_uppercase());
                }
            }
            Value::from(out)
        }
        _ => return Ok(None),
    };
    Ok(Some(rv))
}

/// Python's `str.split` / `str.rsplit`.
fn py_split(
    s: &str,
    sep: Option<&str>,
    maxsplit: Option<usize>,
    from_right: bool,
) -> Result<Vec<String>, JinjaError> {
    let max = maxsplit.unwrap_or(usize::MAX);
    match sep {
        Some("") => Err(method_error("empty separator")),
        Some(sep) => {
            if from_right {
                let mut parts: Vec<String> = s
                    .rsplitn(max.saturating_add(1), sep)
                    .map(String::from)
                    .collect();
                parts.reverse();
                Ok(parts)
            } else {
                Ok(s.splitn(max.saturating_add(1), sep)
                    .map(String::from)
                    .collect())
            }
        }
        None => {
            // Runs of whitespace separate; no empty strings; the remainder keeps its inner spacing.
            let chars: Vec<(usize, char)> = s.char_indices().collect();
            let mut parts = Vec::new();
            if !from_right {
                let mut i = 0;
                while i < chars.len() {
                    while i < chars.len() && is_py_space(chars[i].1) {
                        i += 1;
                    }
                    if i >= chars.len() {
                        break;
                    }
                    if parts.len() == max {
                        parts.push(s[chars[i].0..].trim_end_matches(is_py_space).to_string());
                        break;
                    }
                    let start = chars[i].0;
                    while i < chars.len() && !is_py_space(chars[i].1) {
                        i += 1;
                    }
                    let end = chars.get(i).map_or(s.len(), |c| c.0);
                    parts.push(s[start..end].to_string());
                }
            } else {
                let mut i = chars.len();
                while i > 0 {
                    while i > 0 && is_py_space(chars[i - 1].1) {
                        i -= 1;
                    }
                    if i == 0 {
                        break;
                    }
                    let end = chars.get(i).map_or(s.len(), |c| c.0);
                    if parts.len() == max {
                        parts.push(s[..end].trim_start_matches(is_py_space).to_string());
                        break;
                    }
                    while i > 0 && !is_py_space(chars[i - 1].1) {
                        i -= 1;
                    }
                    parts.push(s[chars[i].0..end].to_string());
                }
                parts.reverse();
            }
            Ok(parts)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_split() {
        let f = |s: &str, sep: Option<&str>, max: Option<usize>, r: bool| {
            py_split(s, sep, max, r).unwrap()
        };
        assert_eq!(f("  a  b c ", None, None, false), ["a", "b", "c"]);
        assert_eq!(f("  a  b c ", None, Some(1), false), ["a", "b c"]);
        assert_eq!(f("  a  b c ", None, Some(1), true), ["a  b", "c"]);
        assert_eq!(f("a,b,,c", Some(","), None, false), ["a", "b", "", "c"]);
        assert_eq!(f("a,b,,c", Some(","), Some(1), true), ["a,b,", "c"]);
        assert_eq!(f("", None, None, false), Vec::<String>::new());
        assert_eq!(f("", Some(","), None, false), [""]);
    }
}
