//! Related reads for a batch: everything the mapping needs in `In()` requests sized to the
//! URL limit (stakeholder connections with their roles, contacts, accounts, opportunities by id).

use super::*;

impl DataverseClient {
    /// Reads rows whose `property` (a logical name, like `contactid` or `record1id`) is one of
    /// `ids`, in `In()` chunks, following pages; `filter` and `expand` are added to each request.
    pub async fn read_in(
        &self,
        set: EntitySet,
        property: &str,
        ids: &[String],
        select: &[&str],
        filter: Option<&str>,
        expand: Option<&str>,
    ) -> Result<Vec<Value>, DataverseError> {
        let mut rows = Vec::new();
        let page_pref = self.page_pref();
        let prefer = [page_pref.as_str(), ANNOTATIONS];
        for url in self.in_urls(set, property, ids, select, filter, expand)? {
            rows.extend(self.all_pages(url, &prefer).await?);
        }
        Ok(rows)
    }

    /// The `In()` requests for `ids`: as few as fit, each URL measured as sent against
    /// Dataverse's 32 KB limit with room left for the `$skiptoken` a next link adds.
    pub fn in_urls(
        &self,
        set: EntitySet,
        property: &str,
        ids: &[String],
        select: &[&str],
        filter: Option<&str>,
        expand: Option<&str>,
    ) -> Result<Vec<Url>, DataverseError> {
        let url_for = |chunk: &[String]| {
            let values: Vec<String> = chunk.iter().map(|id| format!("'{id}'")).collect();
            let mut f = format!(
                "Microsoft.Dynamics.CRM.In(PropertyName='{property}',PropertyValues=[{}])",
                values.join(",")
            );
            if let Some(extra) = filter {
                f.push_str(" and ");
                f.push_str(extra);
            }
            let mut params = vec![("$select", select.join(",")), ("$filter", f)];
            if let Some(e) = expand {
                params.push(("$expand", e.to_owned()));
            }
            self.entity_url(set, &params)
        };
        let fixed = url_for(&[])?.as_str().len();
        let mut urls = Vec::new();
        let mut start = 0;
        while start < ids.len() {
            // Each id adds `'id',` percent-encoded; count it exactly, then check the real URL.
            let mut end = start;
            let mut len = fixed;
            while end < ids.len() {
                let cost = form_encoded_len(&ids[end]) + 9; // two %27 and one %2C
                if end > start && len + cost > MAX_GET_URL {
                    break;
                }
                len += cost;
                end += 1;
            }
            let mut url = url_for(&ids[start..end])?;
            while url.as_str().len() > MAX_GET_URL && end - start > 1 {
                end = start + (end - start) / 2;
                url = url_for(&ids[start..end])?;
            }
            if url.as_str().len() > MAX_GET_URL {
                return Err(DataverseError::Settings(format!(
                    "a query of {} is {} bytes even for one record, over Dataverse's 32 KB URL limit; map fewer fields",
                    set.name(),
                    url.as_str().len()
                )));
            }
            urls.push(url);
            start = end;
        }
        Ok(urls)
    }

    /// Everything the mapping needs for a batch of opportunities, in a handful of requests:
    /// active opportunity→contact connections with their roles expanded, the contacts (customers
    /// and stakeholders), the accounts (customers and the contacts' parents), and the owners
    /// that are users (when `_ownerid_value` was selected: sales persons are synced).
    pub async fn related(&self, opportunities: &[Opportunity]) -> Result<(Related, Vec<RecordError>), DataverseError> {
        let opportunity_ids: Vec<String> = opportunities.iter().map(|o| o.id.to_string()).collect();
        let connections = self
            .read_in(
                EntitySet::Connections,
                "record1id",
                &opportunity_ids,
                &[
                    "connectionid",
                    "_record1id_value",
                    "_record2id_value",
                    "record1objecttypecode",
                    "record2objecttypecode",
                    "_record2roleid_value",
                    "statecode",
                ],
                Some("record1objecttypecode eq 3 and record2objecttypecode eq 2 and statecode eq 0"),
                Some("record2roleid($select=connectionroleid,name,category)"),
            )
            .await?;
        let mut contact_ids: BTreeSet<String> = BTreeSet::new();
        let mut account_ids: BTreeSet<String> = BTreeSet::new();
        for o in opportunities {
            if let Some(c) = o.customer.customerid {
                match c.table {
                    Some(Table::Account) => {
                        account_ids.insert(c.id.to_string());
                    }
                    Some(Table::Contact) => {
                        contact_ids.insert(c.id.to_string());
                    }
                    // Unknown table: read it as both; the mapping resolves it by what exists.
                    _ => {
                        account_ids.insert(c.id.to_string());
                        contact_ids.insert(c.id.to_string());
                    }
                }
            }
            account_ids.extend(o.customer.parent_account.map(|a| a.to_string()));
            contact_ids.extend(o.customer.parent_contact.map(|c| c.to_string()));
        }
        for c in &connections {
            if let Some(id) = c["_record2id_value"].as_str() {
                contact_ids.insert(id.to_ascii_lowercase());
            }
        }
        // Owners: users, or lookups without their table (read as users; a team is not one).
        let user_ids: BTreeSet<String> = opportunities
            .iter()
            .filter_map(|o| o.owner)
            .filter(|owner| !matches!(owner.table, Some(Table::Team) | Some(Table::Other)))
            .map(|owner| owner.id.to_string())
            .collect();
        let user_ids: Vec<String> = user_ids.into_iter().collect();
        let contact_ids: Vec<String> = contact_ids.into_iter().collect();
        // The owners are read beside the contacts: one round trip for both.
        let users = self.read_in(
            EntitySet::SystemUsers,
            "systemuserid",
            &user_ids,
            &["systemuserid", "internalemailaddress", "firstname", "lastname"],
            None,
            None,
        );
        let contacts = self.read_in(
            EntitySet::Contacts,
            "contactid",
            &contact_ids,
            &[
                "contactid",
                "emailaddress1",
                "firstname",
                "lastname",
                "_parentcustomerid_value",
            ],
            None,
            None,
        );
        let (contacts, users) = tokio::join!(contacts, users);
        let contacts = contacts?;
        // Without Read on User the owners go unread, not the batch: each opportunity still
        // names its sales person, without email or name (the mapping warns).
        let users = match users {
            Err(DataverseError::Forbidden { code, .. }) => {
                tracing::warn!(
                    code = %code,
                    "Dynamics refused reading the owners (systemusers); sales persons are written without email or name. Fix: give the application user's role Read on User, or set [mapping] sales_persons = false"
                );
                Vec::new()
            }
            other => other?,
        };
        for c in &contacts {
            if let Ok(contact) = oppsync_mapping::Contact::from_json(c.clone()) {
                match contact.parent {
                    Some(ParentCustomer::Account(a)) => {
                        account_ids.insert(a.to_string());
                    }
                    Some(ParentCustomer::Unknown(g)) => {
                        account_ids.insert(g.to_string());
                    }
                    _ => {}
                }
            }
        }
        let account_ids: Vec<String> = account_ids.into_iter().collect();
        let accounts = self
            .read_in(
                EntitySet::Accounts,
                "accountid",
                &account_ids,
                &["accountid", "name"],
                None,
                None,
            )
            .await?;
        let (mut related, mut rejected) = Related::from_json(accounts, contacts, Vec::new(), connections);
        rejected.extend(related.add_users(users));
        Ok((related, rejected))
    }

    /// Reads opportunities by id (a resync of named records).
    pub async fn opportunities(&self, ids: &[OpportunityId], select: &[&str]) -> Result<Vec<Value>, DataverseError> {
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        self.read_in(EntitySet::Opportunities, "opportunityid", &ids, select, None, None)
            .await
    }
}

/// The length of `text` as `application/x-www-form-urlencoded` (how `Url` writes query pairs).
pub(crate) fn form_encoded_len(text: &str) -> usize {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"*-._ ".contains(&b) {
                1
            } else {
                3
            }
        })
        .sum()
}
