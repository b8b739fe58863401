//! The minijinja environment transformers' jinja2 environment is rebuilt on: settings, filters,
//! tests and globals (`raise_exception`, `strftime_now`).

use minijinja::value::ValueKind;
use minijinja::{Environment, Error as JinjaError, ErrorKind, State, UndefinedBehavior, Value};

use super::pyrepr::{py_str, tojson};
use super::pystr::{is_py_space, string_method};
use super::strftime::strftime_now;

/// The jinja2 environment transformers compiles chat templates in, rebuilt on minijinja.
pub(super) fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_unknown_method_callback(unknown_method);
    env.set_formatter(|out, state, value| {
        match value.kind() {
            ValueKind::Undefined | ValueKind::String => {
                return minijinja::escape_formatter(out, state, value)
            }
            _ => {}
        }
        if value.is_safe() {
            return minijinja::escape_formatter(out, state, value);
        }
        out.write_str(&py_str(value))
            .map_err(|_| JinjaError::new(ErrorKind::WriteFailure, "formatting failed"))
    });
    env.add_filter("tojson", tojson);
    env.add_filter("string", |v: &Value| -> Value {
        if v.is_safe() || v.kind() == ValueKind::String {
            v.clone()
        } else {
            Value::from(py_str(v))
        }
    });
    env.add_filter("trim", |s: &str, chars: Option<&str>| -> String {
        match chars {
            Some(cs) => s
                .trim_matches(&cs.chars().collect::<Vec<_>>()[..])
                .to_string(),
            None => s.trim_matches(is_py_space).to_string(),
        }
    });
    env.add_filter("wordcount", |s: &str| -> usize {
        // jinja2: len(re.findall(r"\w+", s))
        s.split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .count()
    });
    env.add_filter("center", |s: &str, width: Option<usize>| -> String {
        // Python's str.center: the extra space goes left when the padding is odd and width is odd.
        let width = width.unwrap_or(80);
        let n = s.chars().count();
        if n >= width {
            return s.to_string();
        }
        let pad = width - n;
        let left = pad / 2 + (pad & width & 1);
        format!("{}{s}{}", " ".repeat(left), " ".repeat(pad - left))
    });
    // jinja2's `sequence` test is true for anything with a length and indexing (str, list, dict).
    env.add_test("sequence", |v: &Value| {
        matches!(
            v.kind(),
            ValueKind::String | ValueKind::Seq | ValueKind::Map
        )
    });
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

/// The error `raise_exception` returns; found again in the error chain after rendering.
#[derive(Debug)]
pub(super) struct Raised {
    pub(super) message: String,
    pub(super) message_index: Option<usize>,
}

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Raised {}

fn raise_exception(state: &State, message: Option<Value>) -> Result<Value, JinjaError> {
    let message = message.map(|m| py_str(&m)).unwrap_or_default();
    let message_index = current_message_index(state);
    Err(
        JinjaError::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised {
            message,
            message_index,
        }),
    )
}

/// Which of `messages` the template is on: the loop variable `message` found in `messages` —
/// the same object when there is one (a loop over a slice such as Gemma 3's `messages[1:]`
/// shares the conversation's message objects, and `loop.index0` is then off by the slice's
/// start), else an equal one (at `loop.index0` when that matches, else its first occurrence).
fn current_message_index(state: &State) -> Option<usize> {
    let messages = state.lookup("messages")?;
    let message = state.lookup("message").filter(|m| !m.is_undefined())?;
    let len = messages.len()?;
    let item = |i: usize| messages.get_item(&Value::from(i)).ok();
    // Only objects have an identity (`is sameas` compares anything else by value).
    if message.as_object().is_some() {
        if let Some(i) =
            (0..len).find(|&i| item(i).is_some_and(|m| minijinja::tests::is_sameas(&m, &message)))
        {
            return Some(i);
        }
    }
    if let Some(i) = state
        .lookup("loop")
        .and_then(|l| l.get_attr("index0").ok())
        .and_then(|i| i.as_usize())
    {
        if i < len && item(i).as_ref() == Some(&message) {
            return Some(i);
        }
    }
    (0..len).find(|&i| item(i).as_ref() == Some(&message))
}

fn unknown_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, JinjaError> {
    if let Some(s) = value.as_str() {
        if let Some(rv) = string_method(s, method, args)? {
            return Ok(rv);
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}
