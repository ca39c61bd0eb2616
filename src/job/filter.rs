//! Metric filters: SQL boolean expressions over event fields, parsed with
//! `sqlparser` and evaluated with SQL's three-valued logic (a comparison
//! with a missing field is unknown, and unknown rows are filtered out).
//!
//! Supported: `=`, `<>`/`!=`, `<`, `<=`, `>`, `>=` between a field and a
//! literal, `[NOT] IN (...)`, `IS [NOT] NULL`, `AND`, `OR`, `NOT`,
//! parentheses, `TRUE`/`FALSE`. Equality compares by text form, like device
//! ids: `app_ver = '7'` matches the integer `7`. Ordering compares numbers
//! numerically and strings byte-wise.

use std::cmp::Ordering;

use sqlparser::ast::{BinaryOperator, Expr, UnaryOperator, Value};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

/// A field's value in one event, as the parsers produce it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FieldValue<'a> {
    Null,
    Int(i64),
    Float(f64),
    /// String contents (JSON escapes already resolved).
    Str(&'a [u8]),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    Str(String),
    Int(i64),
    Float(f64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A filter expression whose leaves refer to fields by `F` (a name while
/// parsed, a slot index once compiled for a router).
#[derive(Clone, Debug, PartialEq)]
pub enum Node<F> {
    Cmp { field: F, op: CmpOp, lit: Literal },
    In { field: F, list: Vec<Literal>, negated: bool },
    IsNull { field: F, negated: bool },
    And(Box<Node<F>>, Box<Node<F>>),
    Or(Box<Node<F>>, Box<Node<F>>),
    Not(Box<Node<F>>),
    Const(bool),
}

/// A parsed filter with its source text.
#[derive(Clone, Debug)]
pub struct Filter {
    pub text: String,
    pub root: Node<String>,
}

impl Filter {
    /// Parses SQL text; the error says what is unsupported or malformed.
    pub fn parse(text: &str) -> Result<Filter, String> {
        let expr = Parser::new(&GenericDialect)
            .try_with_sql(text)
            .and_then(|mut p| p.parse_expr())
            .map_err(|e| format!("filter {text:?} is not a SQL expression: {e}"))?;
        let root = convert(&expr).map_err(|r| format!("filter {text:?}: {r}"))?;
        Ok(Filter { text: text.to_string(), root })
    }

    /// The distinct field names the filter reads, in first-use order.
    pub fn fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.root.visit_fields(&mut |f: &String| {
            if !out.contains(f) {
                out.push(f.clone());
            }
        });
        out
    }

    /// Each (field, text) the filter compares a field with a string literal
    /// (`=`, `<>`, ordering, `IN`), in first-use order.
    pub fn text_comparisons(&self) -> Vec<(&str, &str)> {
        let mut out = Vec::new();
        self.root.visit(&mut |n: &Node<String>| match n {
            Node::Cmp { field, lit: Literal::Str(text), .. } => out.push((field.as_str(), text.as_str())),
            Node::In { field, list, .. } => out.extend(list.iter().filter_map(|lit| match lit {
                Literal::Str(text) => Some((field.as_str(), text.as_str())),
                _ => None,
            })),
            _ => {}
        });
        out
    }

    /// Rewrites field names into slot indexes for fast evaluation.
    pub fn compile(&self, slot_of: &impl Fn(&str) -> usize) -> Node<usize> {
        self.root.map_fields(&|f: &String| slot_of(f))
    }
}

impl<F> Node<F> {
    /// Calls `f` on every node, parents first.
    fn visit<'a>(&'a self, f: &mut impl FnMut(&'a Node<F>)) {
        f(self);
        match self {
            Node::And(a, b) | Node::Or(a, b) => {
                a.visit(f);
                b.visit(f);
            }
            Node::Not(a) => a.visit(f),
            _ => {}
        }
    }

    fn visit_fields(&self, f: &mut impl FnMut(&F)) {
        self.visit(&mut |n: &Node<F>| {
            if let Node::Cmp { field, .. } | Node::In { field, .. } | Node::IsNull { field, .. } = n {
                f(field)
            }
        });
    }

    fn map_fields<G>(&self, f: &impl Fn(&F) -> G) -> Node<G> {
        match self {
            Node::Cmp { field, op, lit } => Node::Cmp { field: f(field), op: *op, lit: lit.clone() },
            Node::In { field, list, negated } => Node::In { field: f(field), list: list.clone(), negated: *negated },
            Node::IsNull { field, negated } => Node::IsNull { field: f(field), negated: *negated },
            Node::And(a, b) => Node::And(Box::new(a.map_fields(f)), Box::new(b.map_fields(f))),
            Node::Or(a, b) => Node::Or(Box::new(a.map_fields(f)), Box::new(b.map_fields(f))),
            Node::Not(a) => Node::Not(Box::new(a.map_fields(f))),
            Node::Const(c) => Node::Const(*c),
        }
    }

    /// Evaluates with SQL three-valued logic; `None` is unknown.
    pub fn eval<'a>(&self, get: &impl Fn(&F) -> FieldValue<'a>) -> Option<bool> {
        match self {
            Node::Cmp { field, op, lit } => compare(get(field), *op, lit),
            Node::In { field, list, negated } => {
                let v = get(field);
                if v == FieldValue::Null {
                    return None;
                }
                let hit = list.iter().any(|l| compare(v, CmpOp::Eq, l) == Some(true));
                Some(hit != *negated)
            }
            Node::IsNull { field, negated } => Some((get(field) == FieldValue::Null) != *negated),
            Node::And(a, b) => match (a.eval(get), b.eval(get)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Node::Or(a, b) => match (a.eval(get), b.eval(get)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Node::Not(a) => a.eval(get).map(|x| !x),
            Node::Const(c) => Some(*c),
        }
    }

    /// True when the event passes (unknown counts as not passing).
    pub fn passes<'a>(&self, get: &impl Fn(&F) -> FieldValue<'a>) -> bool {
        self.eval(get) == Some(true)
    }
}

/// Integer values whose outcome a one-field [`SlotFilter`] remembers.
const MEMO_VALUES: i64 = 4096;

/// A filter over slots, as routers run it. One that reads a single field
/// remembers its outcome per integer value: the outcome is then a function
/// of that value, and the fields filters test (a binary record's dimension
/// codes, small numeric JSON fields) repeat a few values millions of times.
#[derive(Clone, Debug)]
pub struct SlotFilter {
    node: Node<usize>,
    /// The one slot it reads, if it reads one.
    single: Option<usize>,
    /// Per value in `0..MEMO_VALUES`: 0 not known yet, 1 passes, 2 fails
    /// (empty unless `single`).
    known: Vec<u8>,
}

impl SlotFilter {
    pub fn new(node: Node<usize>) -> SlotFilter {
        let mut slots = Vec::new();
        node.visit_fields(&mut |&s| {
            if !slots.contains(&s) {
                slots.push(s);
            }
        });
        let single = if slots.len() == 1 { Some(slots[0]) } else { None };
        let known = if single.is_some() { vec![0; MEMO_VALUES as usize] } else { Vec::new() };
        SlotFilter { node, single, known }
    }

    /// True when the event passes (unknown counts as not passing).
    #[inline]
    pub fn passes<'a>(&mut self, get: &impl Fn(&usize) -> FieldValue<'a>) -> bool {
        let Some(slot) = self.single else {
            return self.node.passes(get);
        };
        let v = get(&slot);
        match v {
            FieldValue::Int(i) if (0..MEMO_VALUES).contains(&i) => {
                let k = &mut self.known[i as usize];
                if *k == 0 {
                    *k = if self.node.passes(&|_| v) { 1 } else { 2 };
                }
                *k == 1
            }
            _ => self.node.passes(&|_| v),
        }
    }
}

#[inline]
fn compare(v: FieldValue, op: CmpOp, lit: &Literal) -> Option<bool> {
    let ord = match op {
        CmpOp::Eq | CmpOp::Ne => {
            let eq = equal_by_text(v, lit)?;
            return Some(eq == (op == CmpOp::Eq));
        }
        _ => order(v, lit)?,
    };
    Some(match op {
        CmpOp::Lt => ord == Ordering::Less,
        CmpOp::Le => ord != Ordering::Greater,
        CmpOp::Gt => ord == Ordering::Greater,
        CmpOp::Ge => ord != Ordering::Less,
        CmpOp::Eq | CmpOp::Ne => unreachable!("handled above"),
    })
}

#[inline]
fn equal_by_text(v: FieldValue, lit: &Literal) -> Option<bool> {
    Some(match (v, lit) {
        (FieldValue::Null, _) => return None,
        (FieldValue::Str(s), Literal::Str(l)) => s == l.as_bytes(),
        (FieldValue::Int(i), Literal::Int(l)) => i == *l,
        (FieldValue::Int(i), Literal::Float(l)) => (i as f64) == *l,
        (FieldValue::Float(f), Literal::Int(l)) => f == *l as f64,
        (FieldValue::Float(f), Literal::Float(l)) => f == *l,
        (FieldValue::Int(i), Literal::Str(l)) => itoa::Buffer::new().format(i).as_bytes() == l.as_bytes(),
        (FieldValue::Str(s), Literal::Int(l)) => s == itoa::Buffer::new().format(*l).as_bytes(),
        (FieldValue::Str(s), Literal::Float(l)) => parse_f64(s) == Some(*l),
        (FieldValue::Float(f), Literal::Str(l)) => l.parse::<f64>().ok() == Some(f),
    })
}

fn order(v: FieldValue, lit: &Literal) -> Option<Ordering> {
    let num = |v: FieldValue| match v {
        FieldValue::Int(i) => Some(i as f64),
        FieldValue::Float(f) => Some(f),
        FieldValue::Str(s) => parse_f64(s),
        FieldValue::Null => None,
    };
    match (v, lit) {
        (FieldValue::Null, _) => None,
        (FieldValue::Int(i), Literal::Int(l)) => Some(i.cmp(l)),
        (FieldValue::Str(s), Literal::Str(l)) => Some(s.cmp(l.as_bytes())),
        (v, Literal::Int(l)) => num(v)?.partial_cmp(&(*l as f64)),
        (v, Literal::Float(l)) => num(v)?.partial_cmp(l),
        (v, Literal::Str(l)) => num(v)?.partial_cmp(&l.parse::<f64>().ok()?),
    }
}

fn parse_f64(s: &[u8]) -> Option<f64> {
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn convert(e: &Expr) -> Result<Node<String>, String> {
    match e {
        Expr::Nested(inner) => convert(inner),
        Expr::Value(v) => match &v.value {
            Value::Boolean(b) => Ok(Node::Const(*b)),
            other => Err(format!("a bare value ({other}) is not a condition")),
        },
        Expr::UnaryOp { op: UnaryOperator::Not, expr } => Ok(Node::Not(Box::new(convert(expr)?))),
        Expr::IsNull(inner) => Ok(Node::IsNull { field: field_name(inner)?, negated: false }),
        Expr::IsNotNull(inner) => Ok(Node::IsNull { field: field_name(inner)?, negated: true }),
        Expr::InList { expr, list, negated } => Ok(Node::In {
            field: field_name(expr)?,
            list: list.iter().map(literal).collect::<Result<_, _>>()?,
            negated: *negated,
        }),
        Expr::BinaryOp { left, op, right } => binary(left, op, right),
        other => Err(format!("unsupported expression `{other}`")),
    }
}

fn binary(left: &Expr, op: &BinaryOperator, right: &Expr) -> Result<Node<String>, String> {
    let cmp = match op {
        BinaryOperator::And => return Ok(Node::And(Box::new(convert(left)?), Box::new(convert(right)?))),
        BinaryOperator::Or => return Ok(Node::Or(Box::new(convert(left)?), Box::new(convert(right)?))),
        BinaryOperator::Eq => CmpOp::Eq,
        BinaryOperator::NotEq => CmpOp::Ne,
        BinaryOperator::Lt => CmpOp::Lt,
        BinaryOperator::LtEq => CmpOp::Le,
        BinaryOperator::Gt => CmpOp::Gt,
        BinaryOperator::GtEq => CmpOp::Ge,
        other => return Err(format!("unsupported operator `{other}`")),
    };
    // `'view' = event` is as valid as `event = 'view'`; flip the operator.
    if let (Ok(field), Ok(lit)) = (field_name(left), literal(right)) {
        return Ok(Node::Cmp { field, op: cmp, lit });
    }
    if let (Ok(field), Ok(lit)) = (field_name(right), literal(left)) {
        let flipped = match cmp {
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            same => same,
        };
        return Ok(Node::Cmp { field, op: flipped, lit });
    }
    Err(format!("`{left} {op} {right}` must compare a field with a literal"))
}

fn field_name(e: &Expr) -> Result<String, String> {
    match e {
        Expr::Identifier(id) => Ok(id.value.clone()),
        Expr::CompoundIdentifier(parts) => Ok(parts.iter().map(|p| p.value.as_str()).collect::<Vec<_>>().join(".")),
        Expr::Nested(inner) => field_name(inner),
        other => Err(format!("`{other}` is not a field name")),
    }
}

fn literal(e: &Expr) -> Result<Literal, String> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => Ok(Literal::Str(s.clone())),
            Value::Number(n, _) => n
                .parse::<i64>()
                .map(Literal::Int)
                .or_else(|_| n.parse::<f64>().map(Literal::Float))
                .map_err(|_| format!("bad number {n}")),
            other => Err(format!("unsupported literal {other}")),
        },
        Expr::UnaryOp { op: UnaryOperator::Minus, expr } => match literal(expr)? {
            Literal::Int(i) => Ok(Literal::Int(-i)),
            Literal::Float(f) => Ok(Literal::Float(-f)),
            Literal::Str(_) => Err("cannot negate a string".into()),
        },
        other => Err(format!("`{other}` is not a literal")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(text: &str, fields: &[(&str, FieldValue)]) -> bool {
        let f = Filter::parse(text).unwrap();
        f.root.passes(&|name: &String| fields.iter().find(|(n, _)| n == name).map_or(FieldValue::Null, |(_, v)| *v))
    }

    #[test]
    fn equality_and_logic() {
        let view = [("event", FieldValue::Str(b"view")), ("app_ver", FieldValue::Int(7))];
        assert!(eval("event = 'view'", &view));
        assert!(!eval("event <> 'view'", &view));
        assert!(eval("event = 'view' AND app_ver >= 7", &view));
        assert!(eval("event = 'click' OR app_ver < 8", &view));
        assert!(eval("NOT (event = 'click')", &view));
        assert!(eval("event IN ('click', 'view')", &view));
        assert!(!eval("event NOT IN ('click', 'view')", &view));
        assert!(eval("'view' = event", &view));
        assert!(eval("7 <= app_ver", &view));
    }

    #[test]
    fn text_form_equality() {
        let v = [("app_ver", FieldValue::Int(7)), ("page", FieldValue::Str(b"12"))];
        assert!(eval("app_ver = '7'", &v));
        assert!(eval("page = 12", &v));
        assert!(eval("page > 3", &v), "numeric string compares numerically with a number");
    }

    #[test]
    fn nulls_are_unknown() {
        let none: [(&str, FieldValue); 0] = [];
        assert!(!eval("event = 'view'", &none));
        assert!(!eval("NOT (event = 'view')", &none), "NOT unknown is unknown");
        assert!(!eval("event <> 'view'", &none));
        assert!(eval("event IS NULL", &none));
        assert!(!eval("event IS NOT NULL", &none));
        assert!(eval("event = 'view' OR TRUE", &none));
    }

    #[test]
    fn remembered_outcomes_match_the_filter() {
        let values = [
            FieldValue::Int(0),
            FieldValue::Int(7),
            FieldValue::Int(0),
            FieldValue::Int(4095),
            FieldValue::Int(4096),
            FieldValue::Int(-1),
            FieldValue::Int(7),
            FieldValue::Str(b"7"),
            FieldValue::Str(b"x"),
            FieldValue::Float(7.0),
            FieldValue::Null,
            FieldValue::Int(3),
            FieldValue::Int(3),
        ];
        for text in [
            "event = 7",
            "event <> 7",
            "event IN (0, 3, 4096)",
            "NOT (event = 0)",
            "event > 5",
            "event IS NULL",
            "event = '7'",
            "event = 7 OR event = 3",
            "event = 7 AND page = 1",
            "TRUE",
        ] {
            let f = Filter::parse(text).unwrap();
            let slot_of = |name: &str| usize::from(name != "event");
            let node = f.compile(&slot_of);
            let mut memo = SlotFilter::new(node.clone());
            for _ in 0..2 {
                for (i, &v) in values.iter().enumerate() {
                    let page = FieldValue::Int(i as i64 % 2);
                    let get = |s: &usize| if *s == 0 { v } else { page };
                    assert_eq!(memo.passes(&get), node.passes(&get), "{text} with event {v:?}");
                }
            }
        }
    }

    #[test]
    fn unsupported_forms_are_rejected() {
        for bad in ["event = page", "event LIKE 'v%'", "1 + 2", "upper(event) = 'X'", "'a'"] {
            assert!(Filter::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn fields_and_compile() {
        let f = Filter::parse("event = 'view' AND (page IS NOT NULL OR event = 'x')").unwrap();
        assert_eq!(f.fields(), vec!["event".to_string(), "page".to_string()]);
        let compiled = f.compile(&|n| if n == "event" { 0 } else { 1 });
        let vals = [FieldValue::Str(b"view"), FieldValue::Str(b"home")];
        assert!(compiled.passes(&|slot: &usize| vals[*slot]));
    }
}
