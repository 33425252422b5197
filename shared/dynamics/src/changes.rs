//! Change detection: change tracking (delta links, `$deletedEntity` rows, an expired token
//! restarting a full read) or a watermark, and the full id scan that finds deletions a
//! watermark cannot see.

use super::*;

/// One page of changes and the cursor that follows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangePage {
    /// Rows created or updated (current state, as `$select`ed, annotated).
    pub rows: Vec<Value>,
    /// Ids of deleted rows.
    pub deleted: Vec<String>,
    /// The cursor to store once this page is recorded.
    pub cursor: String,
    /// True when `cursor` is a delta link: the read is caught up.
    pub caught_up: bool,
    /// True when the stored delta token had expired and this is a full read starting over.
    pub full_resync: bool,
}

/// A watermark for tables read without change tracking.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Watermark {
    /// `versionnumber gt N`: a rowversion, so no ties.
    Version(i64),
    /// `modifiedon ge T`, skipping the rows already seen at exactly T (one-second precision
    /// makes ties; `gt` would drop them).
    ModifiedOn { at: String, seen: Vec<(String, i64)> },
}

/// One page of a watermark read.
#[derive(Debug, Clone, PartialEq)]
pub struct WatermarkPage {
    /// Rows changed after the read's watermark (current state, as `$select`ed, annotated).
    pub rows: Vec<Value>,
    /// The read's watermark moved past this page's rows.
    pub reached: Watermark,
    /// The link to the next page; `None` when this page is the last.
    pub next: Option<String>,
}

impl Watermark {
    /// The further of two watermarks of one strategy (a read from an earlier point must not move
    /// the watermark back); rows seen at an equal `modifiedon` are merged.
    pub fn later(self, other: Watermark) -> Watermark {
        match (self, other) {
            (Watermark::Version(a), Watermark::Version(b)) => Watermark::Version(a.max(b)),
            (Watermark::ModifiedOn { at: a, seen: sa }, Watermark::ModifiedOn { at: b, seen: sb }) => match a.cmp(&b) {
                std::cmp::Ordering::Greater => Watermark::ModifiedOn { at: a, seen: sa },
                std::cmp::Ordering::Less => Watermark::ModifiedOn { at: b, seen: sb },
                std::cmp::Ordering::Equal => {
                    let mut seen = sa;
                    seen.extend(sb);
                    seen.sort();
                    seen.dedup();
                    Watermark::ModifiedOn { at: a, seen }
                }
            },
            // Another strategy's watermark: the new one wins.
            (a, _) => a,
        }
    }
}

impl DataverseClient {
    /// The stored cursor as a URL of this environment; `None` (with a warning) when it is not
    /// a URL at all, an error when it points at another host: the state was synced from
    /// another Dynamics environment, and reading on would mix two organisations' records.
    fn stored_cursor(&self, set: EntitySet, link: &str) -> Result<Option<Url>, DataverseError> {
        let Ok(url) = Url::parse(link) else {
            tracing::warn!(
                table = set.name(),
                "the stored change-tracking cursor cannot be read (not a link); reading the whole table again"
            );
            return Ok(None);
        };
        if !self.is_ours(&url) {
            return Err(DataverseError::ForeignCursor {
                stored: link_host(&url),
                configured: self.host().to_owned(),
            });
        }
        Ok(Some(url))
    }

    /// Reads one page of changes. `cursor` is what the previous page returned (a next link or
    /// a delta link); `None` starts a full read. An expired delta token starts a full read too,
    /// flagged `full_resync`.
    pub async fn changes(
        &self,
        set: EntitySet,
        select: &[&str],
        cursor: Option<&str>,
    ) -> Result<ChangePage, DataverseError> {
        let page_pref = self.page_pref();
        // No annotations on change-tracking reads: with them, Dataverse has been seen to drop
        // `@odata.deltaLink` from the last page (powerapps-docs issue 439). The poll needs ids and
        // versions only; the transform reads the rows again, annotated.
        let prefer = ["odata.track-changes", page_pref.as_str()];
        let full_read = self.entity_url(set, &[("$select", select.join(","))])?;
        let stored = match cursor {
            Some(link) => self.stored_cursor(set, link)?,
            None => None,
        };
        let delta_read = stored.as_ref().is_some_and(|url| is_delta_link(url.as_str()));
        let (body, full_resync) = match (cursor, stored) {
            // A stored cursor that cannot be read is a lost bookmark, not Dataverse's fault:
            // the table is read afresh, as after an expired token (deletions found by a scan).
            (Some(_), None) => (self.get(full_read.clone(), &prefer).await?, true),
            (_, Some(url)) => match self.get(url, &prefer).await {
                Ok(body) => (body, false),
                Err(DataverseError::ChangeTokenExpired) => {
                    tracing::warn!(
                        table = set.name(),
                        "change-tracking token expired; reading the whole table again"
                    );
                    (self.get(full_read.clone(), &prefer).await?, true)
                }
                Err(e) => return Err(e),
            },
            (None, None) => (self.get(full_read.clone(), &prefer).await?, false),
        };
        let mut rows = Vec::new();
        let mut deleted = Vec::new();
        let no_links = body.get("@odata.nextLink").is_none() && body.get("@odata.deltaLink").is_none();
        let values = match body.get("value") {
            Some(Value::Array(values)) => values.clone(),
            // The documented empty answer to a delta read with no changes.
            None if delta_read && no_links => Vec::new(),
            _ => {
                return Err(DataverseError::Decode(format!(
                    "a change-tracking page of {} without its `value` array",
                    set.name()
                )));
            }
        };
        for item in values {
            let is_deletion = item
                .get("@odata.context")
                .and_then(Value::as_str)
                .is_some_and(|c| c.ends_with("$deletedEntity"));
            if is_deletion {
                if let Some(id) = item.get("id").and_then(Value::as_str) {
                    deleted.push(id.to_ascii_lowercase());
                }
            } else {
                rows.push(item);
            }
        }
        let (cursor, caught_up) = match (body["@odata.nextLink"].as_str(), body["@odata.deltaLink"].as_str()) {
            (Some(next), _) => (next.to_owned(), false),
            (None, Some(delta)) => (delta.to_owned(), true),
            // "An empty JSON response is returned if no table changes have occurred" (change
            // tracking page): a delta read with no link keeps the delta link it was read with.
            (None, None) if delta_read && !full_resync => {
                if !rows.is_empty() || !deleted.is_empty() {
                    tracing::warn!(
                        table = set.name(),
                        "a change-tracking page with changes but no @odata.deltaLink; the same delta link is read again next poll (repeats are harmless)"
                    );
                }
                (cursor.unwrap_or_default().to_owned(), true)
            }
            // A full read whose last page has no delta link cannot be continued: the next poll
            // reads the table again rather than stalling on a cursor that leads nowhere.
            (None, None) => {
                tracing::warn!(
                    table = set.name(),
                    "Dataverse ended a change-tracking read without @odata.deltaLink; the next poll reads the whole table again"
                );
                (full_read.to_string(), true)
            }
        };
        // A link to another host is refused when Dataverse gives it, before it is stored: a
        // stored cursor of another host then means only a state of another environment.
        if let Ok(url) = Url::parse(&cursor)
            && !self.is_ours(&url)
        {
            return Err(DataverseError::ForeignLink(link_host(&url)));
        }
        Ok(ChangePage {
            rows,
            deleted,
            cursor,
            caught_up,
            full_resync,
        })
    }

    /// Reads rows changed after a watermark, following every page; returns them and the next
    /// watermark. (The poll reads page by page with [`DataverseClient::watermark_page`].)
    pub async fn watermark_changes(
        &self,
        set: EntitySet,
        select: &[&str],
        watermark: &Watermark,
    ) -> Result<(Vec<Value>, Watermark), DataverseError> {
        let mut rows = Vec::new();
        let mut reached = watermark.clone();
        let mut link = None;
        loop {
            let page = self.watermark_page(set, select, watermark, link.as_deref()).await?;
            rows.extend(page.rows);
            reached = page.reached.later(reached);
            match page.next {
                Some(next) => link = Some(next),
                None => return Ok((rows, reached)),
            }
        }
    }

    /// One page of the rows changed after `from`: the first page when `link` is `None`, else
    /// the page `link` (a previous page's `next`) names. Rows `from` already saw are dropped.
    pub async fn watermark_page(
        &self,
        set: EntitySet,
        select: &[&str],
        from: &Watermark,
        link: Option<&str>,
    ) -> Result<WatermarkPage, DataverseError> {
        let page_pref = self.page_pref();
        let prefer = [page_pref.as_str(), ANNOTATIONS];
        let url = match link {
            Some(link) => {
                Url::parse(link).map_err(|_| DataverseError::Decode("a next link that is not a URL".into()))?
            }
            None => {
                let (filter, order) = match from {
                    Watermark::Version(v) => (format!("versionnumber gt {v}"), "versionnumber asc"),
                    Watermark::ModifiedOn { at, .. } => (format!("modifiedon ge {at}"), "modifiedon asc"),
                };
                let mut select: Vec<&str> = select.to_vec();
                select.extend(["versionnumber", "modifiedon"]);
                select.sort_unstable();
                select.dedup();
                self.entity_url(
                    set,
                    &[
                        ("$select", select.join(",")),
                        ("$filter", filter),
                        ("$orderby", order.into()),
                    ],
                )?
            }
        };
        let (mut rows, next) = self.one_page(url, &prefer).await?;
        let version = |r: &Value| r["versionnumber"].as_i64().unwrap_or(0);
        let id = |r: &Value| r[set.key()].as_str().unwrap_or("").to_owned();
        let reached = match from {
            Watermark::Version(v) => Watermark::Version(rows.iter().map(version).max().unwrap_or(*v).max(*v)),
            Watermark::ModifiedOn { at, seen } => {
                rows.retain(|r| !seen.contains(&(id(r), version(r))));
                let newest = rows
                    .iter()
                    .filter_map(|r| r["modifiedon"].as_str())
                    .max()
                    .map(str::to_owned)
                    .unwrap_or_else(|| at.clone());
                let at_newest: Vec<(String, i64)> = rows
                    .iter()
                    .filter(|r| r["modifiedon"].as_str() == Some(newest.as_str()))
                    .map(|r| (id(r), version(r)))
                    .collect();
                // Equal stamps merge their seen rows, so `from`'s are kept when nothing is newer.
                Watermark::ModifiedOn {
                    at: newest,
                    seen: at_newest,
                }
                .later(from.clone())
            }
        };
        Ok(WatermarkPage {
            rows,
            reached,
            next: next.map(String::from),
        })
    }

    /// Every id in a table (the scan for deletions, `resync --all`).
    pub async fn all_ids(&self, set: EntitySet) -> Result<BTreeSet<Guid>, DataverseError> {
        let page_pref = self.page_pref();
        let url = self.entity_url(set, &[("$select", set.key().to_owned())])?;
        // Page by page, kept as 16-byte ids: a million rows as JSON would be gigabytes, their
        // ids as text about 90 MB, as GUIDs about 30 MB.
        let mut ids = BTreeSet::new();
        self.each_page(url, &[page_pref.as_str()], |page| {
            ids.extend(
                page.iter()
                    .filter_map(|row| row[set.key()].as_str())
                    .filter_map(|t| Guid::parse(t).ok()),
            );
        })
        .await?;
        Ok(ids)
    }
}

/// Whether a stored cursor is a delta link (a caught-up read), not a next link or a full read.
pub(crate) fn is_delta_link(link: &str) -> bool {
    Url::parse(link).is_ok_and(|u| u.query_pairs().any(|(k, _)| k == "$deltatoken"))
}

/// The opportunities a page of connection rows touches: either side may be the opportunity.
pub fn opportunities_touched(connection_rows: &[Value]) -> BTreeSet<OpportunityId> {
    let mut out = BTreeSet::new();
    for row in connection_rows {
        for side in ["1", "2"] {
            let code = row[format!("record{side}objecttypecode")].as_i64();
            let logical = row[format!("_record{side}id_value@Microsoft.Dynamics.CRM.lookuplogicalname")].as_str();
            if (code == Some(3) || logical == Some("opportunity"))
                && let Some(id) = row[format!("_record{side}id_value")]
                    .as_str()
                    .and_then(|t| OpportunityId::parse(t).ok())
            {
                out.insert(id);
            }
        }
    }
    out
}

/// Contacts a page of connection rows names (for tests and diagnostics).
pub fn contacts_touched(connection_rows: &[Value]) -> BTreeSet<ContactId> {
    let mut out = BTreeSet::new();
    for row in connection_rows {
        for side in ["1", "2"] {
            if row[format!("record{side}objecttypecode")].as_i64() == Some(2)
                && let Some(id) = row[format!("_record{side}id_value")]
                    .as_str()
                    .and_then(|t| ContactId::parse(t).ok())
            {
                out.insert(id);
            }
        }
    }
    out
}

/// A link's host as messages show it (the path and query may carry anything).
pub(crate) fn link_host(url: &Url) -> String {
    oppsync_support::input::shown(url.host_str().unwrap_or("a link without a host"))
}
