//! A small JSON reader for the CLI's `--json` documents (the library writes JSON by hand, and
//! the tests read it with their own code, not the writer's). Also included on its own by
//! `host/tests/common`.

use std::collections::BTreeMap;

/// A JSON value, parsed by [`parse`] (the test's own reader: the library writes JSON by hand).
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Number(f64),
    Text(String),
    List(Vec<Json>),
    Object(BTreeMap<String, Json>),
}

impl Json {
    pub fn get(&self, key: &str) -> &Json {
        match self {
            Json::Object(map) => map.get(key).unwrap_or_else(|| panic!("no field {key}")),
            other => panic!("not an object: {other:?}"),
        }
    }
    pub fn num(&self) -> f64 {
        match self {
            Json::Number(n) => *n,
            other => panic!("not a number: {other:?}"),
        }
    }
    pub fn text(&self) -> &str {
        match self {
            Json::Text(text) => text,
            other => panic!("not text: {other:?}"),
        }
    }
    pub fn list(&self) -> &[Json] {
        match self {
            Json::List(list) => list,
            other => panic!("not a list: {other:?}"),
        }
    }
}

/// Parses a whole JSON document; panics on anything that is not JSON.
pub fn parse(text: &str) -> Json {
    let mut chars = text.trim().chars().peekable();
    let value = value(&mut chars);
    assert!(chars.next().is_none(), "trailing text");
    value
}

fn value(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Json {
    let skip = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
    };
    skip(chars);
    let json = match chars.next().expect("a value") {
        '{' => {
            let mut map = BTreeMap::new();
            skip(chars);
            if chars.peek() == Some(&'}') {
                chars.next();
                return Json::Object(map);
            }
            loop {
                let Json::Text(key) = value(chars) else {
                    panic!("a key that is not text")
                };
                skip(chars);
                assert_eq!(chars.next(), Some(':'));
                let item = value(chars);
                assert!(map.insert(key, item).is_none(), "a duplicate key");
                skip(chars);
                match chars.next() {
                    Some(',') => {}
                    Some('}') => break Json::Object(map),
                    other => panic!("expected , or }} but got {other:?}"),
                }
            }
        }
        '[' => {
            let mut list = Vec::new();
            skip(chars);
            if chars.peek() == Some(&']') {
                chars.next();
                return Json::List(list);
            }
            loop {
                list.push(value(chars));
                skip(chars);
                match chars.next() {
                    Some(',') => {}
                    Some(']') => break Json::List(list),
                    other => panic!("expected , or ] but got {other:?}"),
                }
            }
        }
        '"' => {
            let mut text = String::new();
            loop {
                match chars.next().expect("an unterminated string") {
                    '"' => break Json::Text(text),
                    '\\' => match chars.next().unwrap() {
                        'n' => text.push('\n'),
                        't' => text.push('\t'),
                        'r' => text.push('\r'),
                        'u' => {
                            let hex: String = (0..4).map(|_| chars.next().unwrap()).collect();
                            text.push(
                                char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap(),
                            );
                        }
                        c => text.push(c),
                    },
                    c => {
                        assert!(u32::from(c) >= 0x20, "a raw control character");
                        text.push(c);
                    }
                }
            }
        }
        c if c == '-' || c.is_ascii_digit() => {
            let mut number = String::from(c);
            while chars
                .peek()
                .is_some_and(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
            {
                number.push(chars.next().unwrap());
            }
            Json::Number(number.parse().unwrap())
        }
        c @ ('t' | 'f' | 'n') => {
            let mut word = String::from(c);
            while chars.peek().is_some_and(|c| c.is_ascii_alphabetic()) {
                word.push(chars.next().unwrap());
            }
            match word.as_str() {
                "true" => Json::Bool(true),
                "false" => Json::Bool(false),
                "null" => Json::Null,
                other => panic!("unexpected word {other}"),
            }
        }
        other => panic!("unexpected {other:?}"),
    };
    json
}

impl Json {
    /// Whether the value is `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }
}
