//! The OData the client uses: `$filter` (`eq`, `ge`, `gt`, `and`, lookup paths, `In()`),
//! `$select`, `$expand` of a connection's role, `$orderby`, `$top`, annotations, paging with
//! `$skiptoken`, and change tracking (delta links, `$deletedEntity` rows, expiring tokens).

use super::server::entity_definition;
use super::*;

/// A parsed `$filter`: a conjunction of comparisons.
#[derive(Debug)]
pub(super) enum Condition {
    Compare {
        path: Vec<String>,
        op: Op,
        value: Value,
    },
    In {
        attribute: String,
        /// `_{attribute}_value`: where a lookup's id is, computed once.
        lookup: String,
        values: std::collections::HashSet<String>,
    },
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Op {
    Eq,
    /// Filter rows page: `ne`. Whether a null matches `ne 'x'` is not stated; the simulator
    /// matches only non-null values (SQL's reading), so a client must say `ne null` to be sure.
    Ne,
    Ge,
    Gt,
}

pub(super) fn parse_filter(text: &str) -> Result<Vec<Condition>, String> {
    let mut conditions = Vec::new();
    for clause in split_and(text) {
        let clause = clause.trim();
        if let Some(args) = clause
            .strip_prefix("Microsoft.Dynamics.CRM.In(")
            .and_then(|c| c.strip_suffix(')'))
        {
            let name = args
                .split_once("PropertyName=")
                .and_then(|(_, r)| r.split('\'').nth(1))
                .ok_or("In() needs PropertyName='…'")?;
            let list = args
                .split_once("PropertyValues=[")
                .and_then(|(_, r)| r.rsplit_once(']'))
                .map(|(l, _)| l)
                .ok_or("In() needs PropertyValues=[…]")?;
            let values = list
                .split(',')
                .map(|v| v.trim().trim_matches('\'').to_ascii_lowercase())
                .filter(|v| !v.is_empty())
                .collect();
            conditions.push(Condition::In {
                attribute: name.to_owned(),
                lookup: format!("_{name}_value"),
                values,
            });
            continue;
        }
        let parts: Vec<&str> = clause.splitn(3, ' ').collect();
        let [path, op, literal] = parts.as_slice() else {
            return Err(format!("cannot parse `{clause}`"));
        };
        let op = match *op {
            "eq" => Op::Eq,
            "ne" => Op::Ne,
            "ge" => Op::Ge,
            "gt" => Op::Gt,
            other => return Err(format!("operator `{other}` is not supported here")),
        };
        let value = if *literal == "null" {
            Value::Null
        } else if let Some(s) = literal.strip_prefix('\'').and_then(|l| l.strip_suffix('\'')) {
            json!(s.replace("''", "'"))
        } else if let Ok(n) = literal.parse::<i64>() {
            json!(n)
        } else if literal.len() == 36 && literal.matches('-').count() == 4 {
            // Unquoted GUIDs compare lowercase.
            json!(literal.to_ascii_lowercase())
        } else if literal.ends_with('Z') {
            // DateTimeOffset literals compare as written (ISO 8601 sorts as text).
            json!(literal)
        } else {
            return Err(format!("cannot parse the literal `{literal}`"));
        };
        conditions.push(Condition::Compare {
            path: path.split('/').map(str::to_owned).collect(),
            op,
            value,
        });
    }
    // A conjunction: the cheap set lookups first, so most rows are dropped before a lookup path
    // is followed.
    conditions.sort_by_key(|c| !matches!(c, Condition::In { .. }));
    Ok(conditions)
}

/// Splits on ` and ` outside brackets and quotes.
pub(super) fn split_and(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut quoted, mut start) = (Vec::new(), 0i32, false, 0);
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' => quoted = !quoted,
            b'(' | b'[' if !quoted => depth += 1,
            b')' | b']' if !quoted => depth -= 1,
            b' ' if !quoted && depth == 0 && text[i..].starts_with(" and ") => {
                parts.push(&text[start..i]);
                start = i + 5;
                i += 4;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&text[start..]);
    parts
}

/// The value at a path: an attribute, or a lookup followed to its row (`record2roleid/category`).
pub(super) fn value_at(g: &Inner, row: &Row, path: &[String]) -> Value {
    match path {
        [attr] => row
            .attributes
            .get(attr)
            .or_else(|| row.attributes.get(&format!("_{attr}_value")))
            .cloned()
            .unwrap_or(Value::Null),
        [nav, rest @ ..] => {
            let lookup = format!("_{nav}_value");
            let target = row.lookups.get(&lookup).copied();
            let id = row.attributes.get(&lookup).and_then(Value::as_str);
            match (target.and_then(table_of_logical), id) {
                (Some(t), Some(id)) => g
                    .tables
                    .get(&t)
                    .and_then(|rows| rows.get(id))
                    .map_or(Value::Null, |r| value_at(g, r, rest)),
                _ => Value::Null,
            }
        }
        [] => Value::Null,
    }
}

pub(super) fn table_of_logical(name: &str) -> Option<Table> {
    [
        Table::Opportunities,
        Table::Accounts,
        Table::Contacts,
        Table::Connections,
        Table::ConnectionRoles,
        Table::SystemUsers,
    ]
    .into_iter()
    .find(|t| t.logical() == name)
}

pub(super) fn matches(g: &Inner, row: &Row, conditions: &[Condition]) -> bool {
    conditions.iter().all(|c| match c {
        Condition::In {
            attribute,
            lookup,
            values,
        } => {
            match row.attributes.get(attribute).or_else(|| row.attributes.get(lookup)) {
                // GUIDs are stored lowercase: the first test nearly always decides.
                Some(Value::String(s)) => values.contains(s) || values.contains(&s.to_ascii_lowercase()),
                _ => false,
            }
        }
        Condition::Compare { path, op, value } => {
            let actual = value_at(g, row, path);
            match op {
                Op::Eq => match (&actual, value) {
                    (Value::String(a), Value::String(b)) => a.eq_ignore_ascii_case(b),
                    (a, b) => a == b,
                },
                Op::Ne => match (&actual, value) {
                    (Value::Null, Value::Null) => false,
                    (a, Value::Null) => !a.is_null(),
                    (Value::Null, _) => false,
                    (Value::String(a), Value::String(b)) => !a.eq_ignore_ascii_case(b),
                    (a, b) => a != b,
                },
                Op::Ge | Op::Gt => {
                    let ordering = match (&actual, value) {
                        (Value::Number(a), Value::Number(b)) => a.as_f64().partial_cmp(&b.as_f64()),
                        (Value::String(a), Value::String(b)) => Some(a.as_str().cmp(b.as_str())),
                        _ => None,
                    };
                    matches!(
                        (op, ordering),
                        (Op::Ge, Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal))
                            | (Op::Gt, Some(std::cmp::Ordering::Greater))
                    )
                }
            }
        }
    })
}

/// Renders a row: selected attributes with the annotations asked for, and expanded roles.
pub(super) fn render(
    g: &Inner,
    table: Table,
    row: &Row,
    select: &Option<Vec<String>>,
    expand: &[String],
    annotate: bool,
) -> Value {
    let mut out = Map::new();
    let wanted = |name: &str| {
        select
            .as_ref()
            .is_none_or(|s| s.iter().any(|x| x == name || format!("_{x}_value") == name))
    };
    for (name, value) in &row.attributes {
        if name != table.key() && !wanted(name) {
            continue;
        }
        out.insert(name.clone(), value.clone());
        if annotate {
            if let Some(target) = row.lookups.get(name) {
                out.insert(format!("{name}{LOOKUP}"), json!(target));
                if let Some(label) = lookup_name(g, target, value) {
                    out.insert(format!("{name}{FORMATTED}"), json!(label));
                }
            } else if name == "statecode" && table == Table::Opportunities {
                let label = match value.as_i64() {
                    Some(0) => "Open",
                    Some(1) => "Won",
                    Some(2) => "Lost",
                    _ => "",
                };
                out.insert(format!("{name}{FORMATTED}"), json!(label));
            }
        }
    }
    for nav in expand {
        let lookup = format!("_{nav}_value");
        let id = row.attributes.get(&lookup).and_then(Value::as_str);
        let expanded = id
            .and_then(|id| g.tables.get(&Table::ConnectionRoles)?.get(id))
            .map(|r| Value::Object(r.attributes.clone()))
            .unwrap_or(Value::Null);
        out.insert(nav.clone(), expanded);
    }
    out.insert("@odata.etag".into(), json!(format!("W/\"{}\"", row.version)));
    Value::Object(out)
}

pub(super) fn lookup_name(g: &Inner, target: &str, id: &Value) -> Option<String> {
    let row = g.tables.get(&table_of_logical(target)?)?.get(id.as_str()?)?;
    let a = &row.attributes;
    a.get("name")
        .or_else(|| a.get("fullname"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

pub(super) fn serve(g: &mut Inner, rest: &str, query: &[(String, String)], prefer: &str) -> Response {
    let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if let Some((logical, tail)) = rest
        .strip_prefix("EntityDefinitions(LogicalName='")
        .and_then(|r| r.split_once("')"))
    {
        return match tail {
            "" => entity_definition(g, logical),
            "/Attributes" => super::metadata::attributes(logical, None, param("$select"), param("$expand")),
            _ => match tail.strip_prefix("/Attributes/") {
                Some(cast) => super::metadata::attributes(logical, Some(cast), param("$select"), param("$expand")),
                None => odata_error(
                    StatusCode::NOT_FOUND,
                    "0x80060888",
                    &format!("Resource not found for the segment '{tail}'."),
                ),
            },
        };
    }
    let (set, single) = match rest.split_once('(') {
        Some((set, id)) => (set, Some(id.trim_end_matches(')').to_ascii_lowercase())),
        None => (rest, None),
    };
    let Some(table) = Table::from_set(set) else {
        return odata_error(
            StatusCode::NOT_FOUND,
            "0x80060888",
            &format!("Resource not found for the segment '{set}'."),
        );
    };
    *g.counters.by_table.entry(table).or_default() += 1;
    if g.config.forbidden.contains(&table) {
        return odata_error(
            StatusCode::FORBIDDEN,
            "0x80040220",
            &format!(
                "Principal user (Id=00000000-0000-4000-8000-00000000c11e, type=8) is missing prvRead{} privilege",
                table.logical()
            ),
        );
    }
    let annotate = prefer.contains("odata.include-annotations");
    let select = param("$select").map(|s| s.split(',').map(str::to_owned).collect::<Vec<_>>());
    let expand: Vec<String> = param("$expand")
        .map(|e| {
            e.split(',')
                .map(|x| x.split('(').next().unwrap_or("").trim().to_owned())
                .collect()
        })
        .unwrap_or_default();
    if let Some(id) = single {
        return match g.tables.get(&table).and_then(|t| t.get(&id)) {
            Some(row) => axum::Json(render(g, table, row, &select, &expand, annotate)).into_response(),
            None => odata_error(
                StatusCode::NOT_FOUND,
                "0x80040217",
                &format!("{} With Id = {id} Does Not Exist", table.logical()),
            ),
        };
    }
    let track = prefer.contains("odata.track-changes") || param("$deltatoken").is_some();
    if track && g.config.untracked.contains(&table) {
        // The exact code Dataverse sends here is not documented (dataverse.md): a 400 naming the
        // table is what the client must handle, whatever the code.
        return odata_error(
            StatusCode::BAD_REQUEST,
            "0x80048d19",
            &format!("Change tracking is not enabled for the entity '{}'.", table.logical()),
        );
    }
    if track
        && (param("$filter").is_some()
            || param("$orderby").is_some()
            || param("$expand").is_some()
            || param("$top").is_some())
    {
        return odata_error(
            StatusCode::BAD_REQUEST,
            "0x80060888",
            "$filter, $orderby, $expand and $top are not supported with change tracking",
        );
    }
    let page_size = prefer
        .split(',')
        .find_map(|p| p.trim().strip_prefix("odata.maxpagesize="))
        .and_then(|n| n.trim_matches('"').parse::<usize>().ok())
        .unwrap_or(g.config.max_page_size)
        .clamp(1, g.config.max_page_size);
    let conditions = match param("$filter").map(|f| parse_filter(&f)).transpose() {
        Ok(c) => c.unwrap_or_default(),
        Err(message) => return odata_error(StatusCode::BAD_REQUEST, "0x80060888", &message),
    };
    // Delta reads: changes after the token's version, up to the version the read started at.
    // `delta`: a read from a delta token (its pages carry deletions); a full read's pages do
    // not ("Deleted objects are not returned", change-tracking page).
    let (after, upto, delta) = match (param("$deltatoken"), param("$skiptoken")) {
        (_, Some(skip)) => {
            let mut parts = skip.split(':').map(|p| p.parse::<i64>().unwrap_or(0));
            (
                parts.next().unwrap_or(0),
                parts.next().unwrap_or(g.version),
                parts.next() == Some(1),
            )
        }
        (Some(token), None) => {
            let issued = g.issued.get(&token).copied();
            match issued {
                Some(at) if at.elapsed() <= g.config.change_retention => (
                    token.split('!').next().and_then(|v| v.parse().ok()).unwrap_or(0),
                    g.version,
                    true,
                ),
                _ => {
                    return odata_error(
                        StatusCode::from_u16(g.config.expired_stamp_status).unwrap_or(StatusCode::BAD_REQUEST),
                        EXPIRED_VERSION_STAMP,
                        "Version stamp associated with the client has expired. Please perform a full sync.",
                    );
                }
            }
        }
        (None, None) => (i64::MIN, g.version, false),
    };
    let start_offset: usize = if track {
        0
    } else {
        param("$skiptoken").and_then(|s| s.parse().ok()).unwrap_or(0)
    };
    let empty = BTreeMap::new();
    let view: &Inner = g;
    let rows = view.tables.get(&table).unwrap_or(&empty);
    // An In() on the primary key reads those rows by id, as Dataverse's index would; anything
    // else scans.
    let by_key = conditions.iter().find_map(|c| match c {
        Condition::In { attribute, values, .. } if attribute == table.key() => Some(values),
        _ => None,
    });
    let candidates: Box<dyn Iterator<Item = &Row>> = match by_key {
        Some(ids) => {
            let mut ids: Vec<&String> = ids.iter().collect();
            ids.sort();
            Box::new(ids.into_iter().filter_map(|id| rows.get(id)))
        }
        None => Box::new(rows.values()),
    };
    let mut hits: Vec<&Row> = candidates
        .filter(|r| !track || (r.version > after && r.version <= upto))
        .filter(|r| matches(view, r, &conditions))
        .collect();
    match param("$orderby") {
        Some(order) => {
            let attr = order.split_whitespace().next().unwrap_or("").to_owned();
            let desc = order.ends_with(" desc");
            hits.sort_by(|a, b| {
                let (x, y) = (a.attributes.get(&attr), b.attributes.get(&attr));
                let o = match (x.and_then(Value::as_f64), y.and_then(Value::as_f64)) {
                    (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal),
                    _ => x.map(Value::to_string).cmp(&y.map(Value::to_string)),
                };
                if desc { o.reverse() } else { o }
            });
        }
        None if track => hits.sort_by_key(|r| r.version),
        None => {}
    }
    if let Some(top) = param("$top").and_then(|t| t.parse::<usize>().ok()) {
        hits.truncate(top);
    }
    let mut value: Vec<Value> = Vec::new();
    let mut tombstones: Vec<(String, i64)> = if track && delta {
        view.tombstones
            .get(&table)
            .map(|t| t.iter().filter(|(_, v)| *v > after && *v <= upto).cloned().collect())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    tombstones.sort_by_key(|(_, v)| *v);
    // In a delta read, rows and tombstones are served in version order.
    let mut merged: Vec<(i64, Result<&Row, String>)> = hits
        .into_iter()
        .skip(start_offset)
        .map(|r| (r.version, Ok(r)))
        .chain(tombstones.into_iter().map(|(id, v)| (v, Err(id))))
        .collect();
    if track {
        merged.sort_by_key(|(v, _)| *v);
    }
    let more = merged.len() > page_size;
    merged.truncate(page_size);
    let last_version = merged.last().map(|(v, _)| *v);
    let host = view.config.link_host.clone().unwrap_or_else(|| view.addr.clone());
    let base = format!("http://{host}{API}{}", table.set());
    for (_, item) in &merged {
        value.push(match item {
            Ok(row) => render(view, table, row, &select, &expand, annotate),
            // Change-tracking page: {"@odata.context":"[Organization URI]/api/data/v9.0/$metadata#accounts/$deletedEntity","id":…,"reason":"deleted"}
            Err(id) => json!({"@odata.context": format!("http://{host}{API}$metadata#{}/$deletedEntity", table.set()), "id": id, "reason": "deleted"}),
        });
    }
    let delta_read = track && delta;
    if delta_read && value.is_empty() && !more && view.config.empty_delta_body {
        return (
            StatusCode::OK,
            [("content-type", "application/json; odata.metadata=minimal")],
            "{}",
        )
            .into_response();
    }
    let mut page = Map::new();
    // A delta page's context ends in `/$delta` (change-tracking page).
    let context = if delta_read {
        format!("http://{host}{API}$metadata#{}/$delta", table.set())
    } else {
        format!("http://{host}{API}$metadata#{}", table.set())
    };
    page.insert("@odata.context".into(), json!(context));
    page.insert("value".into(), Value::Array(value));
    let carried: String = query
        .iter()
        .filter(|(k, _)| k != "$skiptoken" && k != "$deltatoken")
        .map(|(k, v)| format!("{}={}&", encode(k), encode(v)))
        .collect();
    if more {
        let skip = if track {
            format!("{}:{upto}:{}", last_version.unwrap_or(after), u8::from(delta))
        } else {
            (start_offset + page_size).to_string()
        };
        page.insert(
            "@odata.nextLink".into(),
            json!(format!("{base}?{carried}$skiptoken={}", encode(&skip))),
        );
    } else if track && !g.config.never_delta_link && !(annotate && g.config.annotations_drop_delta_link) {
        let token = format!("{upto}!{}", g.issued.len());
        g.issued.insert(token.clone(), Instant::now());
        page.insert(
            "@odata.deltaLink".into(),
            json!(format!("{base}?{carried}$deltatoken={}", encode(&token))),
        );
    }
    let body = Value::Object(page).to_string();
    (
        StatusCode::OK,
        [("content-type", "application/json; odata.metadata=minimal")],
        body,
    )
        .into_response()
}
