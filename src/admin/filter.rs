//! The `$filter` language of `GET /devices` (OData-like, as IoT Central writes it, seed 001):
//! `field op literal` with `eq ne lt le gt ge`, `and`, `or`, `not`, parentheses,
//! `contains(field, 'text')` and `startswith(field, 'text')`. Literals are `'strings'` (a quote
//! doubled inside), `true`, `false` and `null`. Keywords are case-insensitive; `contains` and
//! `startswith` ignore case, comparisons do not.
//!
//! The parser is a hand-written recursive descent over a token list, with its depth capped
//! ([`MAX_DEPTH`]) and the input length capped ([`MAX_FILTER_BYTES`]) so a hostile expression
//! cannot exhaust the stack or the CPU. Every error names the offending token and its
//! (0-based, in characters) position, and says what was expected there.

use std::borrow::Cow;
use std::cmp::Ordering;

/// Longest filter accepted, in bytes.
pub const MAX_FILTER_BYTES: usize = 4096;
/// Deepest nesting of parentheses and `not`.
pub const MAX_DEPTH: usize = 32;

/// A field a filter or `$orderby` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// `id`
    Id,
    /// `displayName`
    DisplayName,
    /// `state` (stored state names)
    State,
    /// `status` (device-facing status)
    Status,
    /// `enabled`
    Enabled,
    /// `approved`
    Approved,
    /// `provisioned`
    Provisioned,
    /// `thingName`
    ThingName,
    /// `lastError.errorCode`
    LastErrorCode,
    /// `createdAt`
    CreatedAt,
    /// `updatedAt`
    UpdatedAt,
}

impl Field {
    /// Every field, with its name in the API.
    pub const ALL: [(&'static str, Field); 11] = [
        ("id", Field::Id),
        ("displayName", Field::DisplayName),
        ("state", Field::State),
        ("status", Field::Status),
        ("enabled", Field::Enabled),
        ("approved", Field::Approved),
        ("provisioned", Field::Provisioned),
        ("thingName", Field::ThingName),
        ("lastError.errorCode", Field::LastErrorCode),
        ("createdAt", Field::CreatedAt),
        ("updatedAt", Field::UpdatedAt),
    ];

    /// The field named `name` (exact spelling).
    pub fn parse(name: &str) -> Option<Field> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
    }

    /// Its name in the API.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    fn is_bool(self) -> bool {
        matches!(self, Field::Enabled | Field::Approved | Field::Provisioned)
    }

    fn names() -> String {
        Self::ALL
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A field's value on one device.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Value<'a> {
    /// Absent (`null`); sorts first.
    Null,
    /// `true`/`false`.
    Bool(bool),
    /// Text.
    Str(Cow<'a, str>),
}

/// Something a filter can be evaluated on.
pub trait Fields {
    /// The value of `field`.
    fn field(&self, field: Field) -> Value<'_>;
}

/// Comparison operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// `eq`
    Eq,
    /// `ne`
    Ne,
    /// `lt`
    Lt,
    /// `le`
    Le,
    /// `gt`
    Gt,
    /// `ge`
    Ge,
}

/// A parsed filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `a and b`
    And(Box<Filter>, Box<Filter>),
    /// `a or b`
    Or(Box<Filter>, Box<Filter>),
    /// `not a`
    Not(Box<Filter>),
    /// `field op literal`
    Cmp(Field, CmpOp, Value<'static>),
    /// `contains(field, 'text')` (case-insensitive; text lower-cased)
    Contains(Field, String),
    /// `startswith(field, 'text')` (case-insensitive; text lower-cased)
    StartsWith(Field, String),
}

impl Filter {
    /// Whether `item` passes.
    pub fn matches(&self, item: &impl Fields) -> bool {
        match self {
            Filter::And(a, b) => a.matches(item) && b.matches(item),
            Filter::Or(a, b) => a.matches(item) || b.matches(item),
            Filter::Not(a) => !a.matches(item),
            Filter::Cmp(field, op, lit) => {
                let v = item.field(*field);
                match op {
                    CmpOp::Eq => v == *lit,
                    CmpOp::Ne => v != *lit,
                    _ => {
                        // Ordering against null, or of a missing value, is false (as in SQL).
                        if v == Value::Null || *lit == Value::Null {
                            return false;
                        }
                        let o = v.cmp(lit);
                        match op {
                            CmpOp::Lt => o == Ordering::Less,
                            CmpOp::Le => o != Ordering::Greater,
                            CmpOp::Gt => o == Ordering::Greater,
                            _ => o != Ordering::Less,
                        }
                    }
                }
            }
            Filter::Contains(field, text) => match item.field(*field) {
                Value::Str(s) => s.to_lowercase().contains(text.as_str()),
                _ => false,
            },
            Filter::StartsWith(field, text) => match item.field(*field) {
                Value::Str(s) => s.to_lowercase().starts_with(text.as_str()),
                _ => false,
            },
        }
    }
}

/// A malformed filter: what is wrong, the token and its position.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("$filter: {message} at position {position} (near {token:?})")]
pub struct FilterError {
    /// What was wrong and what was expected.
    pub message: String,
    /// The offending token (empty at the end of the input).
    pub token: String,
    /// Its position, in characters from 0.
    pub position: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Word(String),
    Str(String),
    LParen,
    RParen,
    Comma,
    End,
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    text: String,
    pos: usize,
}

fn lex(input: &str) -> Result<Vec<Token>, FilterError> {
    let chars: Vec<char> = input.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        match c {
            c if c.is_whitespace() => i += 1,
            '(' | ')' | ',' => {
                let tok = match c {
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    _ => Tok::Comma,
                };
                out.push(Token {
                    tok,
                    text: c.to_string(),
                    pos: start,
                });
                i += 1;
            }
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => {
                            return Err(FilterError {
                                message: "unterminated string literal (close it with ')".into(),
                                token: chars[start..].iter().take(20).collect(),
                                position: start,
                            })
                        }
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            s.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(&ch) => {
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                out.push(Token {
                    tok: Tok::Str(s),
                    text: chars[start..i].iter().collect(),
                    pos: start,
                });
            }
            c if c.is_alphanumeric()
                || c == '_'
                || c == '.'
                || c == '$'
                || c == '-'
                || c == ':' =>
            {
                while i < chars.len()
                    && (chars[i].is_alphanumeric()
                        || matches!(chars[i], '_' | '.' | '$' | '-' | ':'))
                {
                    i += 1;
                }
                let w: String = chars[start..i].iter().collect();
                out.push(Token {
                    tok: Tok::Word(w.clone()),
                    text: w,
                    pos: start,
                });
            }
            other => {
                return Err(FilterError {
                    message: format!("unexpected character {other:?}"),
                    token: other.to_string(),
                    position: start,
                })
            }
        }
    }
    out.push(Token {
        tok: Tok::End,
        text: String::new(),
        pos: chars.len(),
    });
    Ok(out)
}

struct Parser {
    toks: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> &Token {
        &self.toks[self.at.min(self.toks.len() - 1)]
    }

    fn next(&mut self) -> Token {
        let t = self.peek().clone();
        if self.at < self.toks.len() - 1 {
            self.at += 1;
        }
        t
    }

    fn error(t: &Token, message: impl Into<String>) -> FilterError {
        FilterError {
            message: message.into(),
            token: t.text.chars().take(40).collect(),
            position: t.pos,
        }
    }

    fn keyword(&self, kw: &str) -> bool {
        matches!(&self.peek().tok, Tok::Word(w) if w.eq_ignore_ascii_case(kw))
    }

    fn or(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let mut left = self.and(depth)?;
        while self.keyword("or") {
            self.next();
            let right = self.and(depth)?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let mut left = self.unary(depth)?;
        while self.keyword("and") {
            self.next();
            let right = self.unary(depth)?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<Filter, FilterError> {
        if depth >= MAX_DEPTH {
            return Err(Self::error(
                self.peek(),
                format!("nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        if self.keyword("not") {
            self.next();
            return Ok(Filter::Not(Box::new(self.unary(depth + 1)?)));
        }
        self.primary(depth)
    }

    fn primary(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let t = self.next();
        match &t.tok {
            Tok::LParen => {
                let inner = self.or(depth + 1)?;
                let close = self.next();
                if close.tok != Tok::RParen {
                    return Err(Self::error(&close, "expected ')'"));
                }
                Ok(inner)
            }
            Tok::Word(w)
                if (w.eq_ignore_ascii_case("contains") || w.eq_ignore_ascii_case("startswith"))
                    && self.peek().tok == Tok::LParen =>
            {
                let contains = w.eq_ignore_ascii_case("contains");
                self.next();
                let field = self.field()?;
                let comma = self.next();
                if comma.tok != Tok::Comma {
                    return Err(Self::error(&comma, "expected ',' after the field name"));
                }
                let lit = self.next();
                let Tok::Str(text) = &lit.tok else {
                    return Err(Self::error(&lit, "expected a 'string' literal"));
                };
                if field.is_bool() {
                    return Err(Self::error(
                        &t,
                        format!("{} is true or false, not text", field.name()),
                    ));
                }
                let close = self.next();
                if close.tok != Tok::RParen {
                    return Err(Self::error(&close, "expected ')'"));
                }
                let text = text.to_lowercase();
                Ok(if contains {
                    Filter::Contains(field, text)
                } else {
                    Filter::StartsWith(field, text)
                })
            }
            Tok::Word(_) => {
                self.at -= 1;
                let field = self.field()?;
                let op_tok = self.next();
                let op = match &op_tok.tok {
                    Tok::Word(w) => match w.to_ascii_lowercase().as_str() {
                        "eq" => Some(CmpOp::Eq),
                        "ne" => Some(CmpOp::Ne),
                        "lt" => Some(CmpOp::Lt),
                        "le" => Some(CmpOp::Le),
                        "gt" => Some(CmpOp::Gt),
                        "ge" => Some(CmpOp::Ge),
                        _ => None,
                    },
                    _ => None,
                }
                .ok_or_else(|| {
                    Self::error(
                        &op_tok,
                        "expected a comparison operator (eq ne lt le gt ge)",
                    )
                })?;
                let lit_tok = self.next();
                let lit = match &lit_tok.tok {
                    Tok::Str(s) => Value::Str(Cow::Owned(s.clone())),
                    Tok::Word(w) if w.eq_ignore_ascii_case("true") => Value::Bool(true),
                    Tok::Word(w) if w.eq_ignore_ascii_case("false") => Value::Bool(false),
                    Tok::Word(w) if w.eq_ignore_ascii_case("null") => Value::Null,
                    _ => {
                        return Err(Self::error(
                            &lit_tok,
                            "expected a literal: 'text', true, false or null",
                        ))
                    }
                };
                let fits = match &lit {
                    Value::Null => true,
                    Value::Bool(_) => field.is_bool() && matches!(op, CmpOp::Eq | CmpOp::Ne),
                    Value::Str(_) => !field.is_bool(),
                };
                if !fits {
                    let what = if field.is_bool() {
                        "compares with eq/ne and true or false"
                    } else {
                        "is text: compare it with a 'string'"
                    };
                    return Err(Self::error(&lit_tok, format!("{} {what}", field.name())));
                }
                Ok(Filter::Cmp(field, op, lit))
            }
            Tok::End => Err(Self::error(&t, "unexpected end of the filter: expected a condition")),
            _ => Err(Self::error(
                &t,
                "expected a condition (field op literal, contains(...), startswith(...), not, or '(')",
            )),
        }
    }

    fn field(&mut self) -> Result<Field, FilterError> {
        let t = self.next();
        match &t.tok {
            Tok::Word(w) => Field::parse(w).ok_or_else(|| {
                Self::error(&t, format!("unknown field; fields: {}", Field::names()))
            }),
            _ => Err(Self::error(&t, "expected a field name")),
        }
    }
}

/// Parses a `$filter` expression.
pub fn parse(input: &str) -> Result<Filter, FilterError> {
    if input.len() > MAX_FILTER_BYTES {
        return Err(FilterError {
            message: format!("longer than {MAX_FILTER_BYTES} bytes"),
            token: String::new(),
            position: MAX_FILTER_BYTES,
        });
    }
    let toks = lex(input)?;
    let mut p = Parser { toks, at: 0 };
    let f = p.or(0)?;
    let rest = p.next();
    if rest.tok != Tok::End {
        return Err(Parser::error(
            &rest,
            "expected 'and', 'or' or the end of the filter",
        ));
    }
    Ok(f)
}

/// A parsed `$orderby`: one field and a direction (`id` breaks ties, ascending).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrderBy {
    /// The sort field.
    pub field: Field,
    /// Descending.
    pub desc: bool,
}

impl Default for OrderBy {
    fn default() -> Self {
        OrderBy {
            field: Field::Id,
            desc: false,
        }
    }
}

/// Parses `$orderby` (`field`, `field asc`, `field desc`).
pub fn parse_orderby(input: &str) -> Result<OrderBy, FilterError> {
    let mut words = input.split_whitespace();
    let bad = |token: &str, message: String| FilterError {
        message,
        token: token.chars().take(40).collect(),
        position: input.find(token).unwrap_or(0),
    };
    let Some(name) = words.next() else {
        return Err(bad("", "$orderby: expected a field name".into()));
    };
    let field = Field::parse(name).ok_or_else(|| {
        bad(
            name,
            format!("$orderby: unknown field; fields: {}", Field::names()),
        )
    })?;
    let desc = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("asc") => false,
        Some(w) if w.eq_ignore_ascii_case("desc") => true,
        Some(w) => return Err(bad(w, "$orderby: expected asc or desc".into())),
    };
    if let Some(w) = words.next() {
        return Err(bad(w, "$orderby: one field and asc|desc only".into()));
    }
    Ok(OrderBy { field, desc })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dev {
        id: &'static str,
        name: Option<&'static str>,
        enabled: bool,
        status: &'static str,
    }

    impl Fields for Dev {
        fn field(&self, field: Field) -> Value<'_> {
            match field {
                Field::Id => Value::Str(self.id.into()),
                Field::DisplayName => self.name.map_or(Value::Null, |n| Value::Str(n.into())),
                Field::Enabled => Value::Bool(self.enabled),
                Field::Status => Value::Str(self.status.into()),
                _ => Value::Null,
            }
        }
    }

    fn dev(
        id: &'static str,
        name: Option<&'static str>,
        enabled: bool,
        status: &'static str,
    ) -> Dev {
        Dev {
            id,
            name,
            enabled,
            status,
        }
    }

    #[test]
    fn evaluates_operators_logic_and_functions() {
        let a = dev("sensor-1", Some("Boiler Thermostat"), true, "provisioned");
        let b = dev("sensor-2", None, false, "failed");
        let cases = [
            ("id eq 'sensor-1'", true, false),
            ("id ne 'sensor-1'", false, true),
            ("id lt 'sensor-2'", true, false),
            ("id le 'sensor-2'", true, true),
            ("id gt 'sensor-1'", false, true),
            ("id ge 'sensor-1'", true, true),
            ("enabled eq true and status eq 'provisioned'", true, false),
            ("status eq 'failed' or enabled eq true", true, true),
            ("not (enabled eq true)", false, true),
            ("contains(displayName, 'thermo')", true, false),
            ("startswith(id, 'SENSOR-')", true, true),
            ("displayName eq null", false, true),
            ("displayName gt 'A'", true, false),
            (
                "(id eq 'x' or id eq 'sensor-2') and not enabled eq true",
                false,
                true,
            ),
            ("ID EQ 'sensor-1'", false, false),
        ];
        for (text, want_a, want_b) in cases {
            let f = match parse(text) {
                Ok(f) => f,
                Err(e) if text.starts_with("ID") => {
                    assert!(e.message.contains("unknown field"), "{e}");
                    continue;
                }
                Err(e) => panic!("{text}: {e}"),
            };
            assert_eq!(f.matches(&a), want_a, "{text} on a");
            assert_eq!(f.matches(&b), want_b, "{text} on b");
        }
    }

    #[test]
    fn errors_name_the_token_and_position() {
        let cases = [
            ("id eqq 'x'", "eqq", 3),
            ("id eq 'x' and", "", 13),
            ("nosuch eq 'x'", "nosuch", 0),
            ("id eq 'x", "'x", 6),
            ("enabled eq 'yes'", "'yes'", 11),
            ("(id eq 'x'", "", 10),
            ("id eq 'x' id", "id", 10),
            ("id eq #", "#", 6),
            ("contains(id 'x')", "'x'", 12),
        ];
        for (text, token, position) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(
                (e.token.as_str(), e.position),
                (token, position),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn deep_nesting_and_long_input_are_refused_not_overflowing() {
        let deep = format!("{}id eq 'x'{}", "(".repeat(2000), ")".repeat(2000));
        assert!(parse(&deep).unwrap_err().message.contains("nested"));
        let deep = format!("{}id eq 'x'{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(parse(&deep).unwrap_err().message.contains("longer than"));
        let nots = format!("{}id eq 'x'", "not ".repeat(1000));
        assert!(parse(&nots).is_err());
        let long = "id eq 'x' or ".repeat(400);
        assert!(parse(&long).unwrap_err().message.contains("longer than"));
    }

    #[test]
    fn random_input_never_panics() {
        use rand::{Rng, SeedableRng};
        let alphabet: Vec<&str> = vec![
            "id",
            "displayName",
            "enabled",
            "eq",
            "ne",
            "lt",
            "and",
            "or",
            "not",
            "(",
            ")",
            ",",
            "'a'",
            "'",
            "''",
            "true",
            "null",
            "contains",
            "startswith",
            " ",
            "é",
            "\u{0}",
            "$",
            "lastError.errorCode",
            "1",
            "-",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let d = dev("a", None, true, "provisioned");
        for _ in 0..20_000 {
            let n = rng.random_range(0..24);
            let s: String = (0..n)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            if let Ok(f) = parse(&s) {
                let _ = f.matches(&d);
            }
            // Arbitrary bytes as text too.
            let bytes: Vec<u8> = (0..rng.random_range(0..32)).map(|_| rng.random()).collect();
            let _ = parse(&String::from_utf8_lossy(&bytes));
            let _ = parse_orderby(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn orderby_parses_direction() {
        assert_eq!(
            parse_orderby("displayName desc").unwrap(),
            OrderBy {
                field: Field::DisplayName,
                desc: true
            }
        );
        assert_eq!(parse_orderby("createdAt").unwrap().field, Field::CreatedAt);
        assert_eq!(parse_orderby("id sideways").unwrap_err().token, "sideways");
        assert_eq!(parse_orderby("nope").unwrap_err().token, "nope");
    }
}
