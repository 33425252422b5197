//! The `[mapping]` section of oppsync's TOML configuration, and its validation into a [`Mapping`].
//!
//! Validation collects every problem at once; each error names the key and says how to fix it.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use crate::convert::{Conversion, FieldRule, NullPolicy, Source};
use crate::plan::MARKETO_ROLE_MAX;
mod fields;

use fields::{Errors, choice, field_rule};
pub(crate) use fields::{is_logical_name, is_marketo_name};

/// The section as written in the file. Every table rejects unknown keys, so a typo is an error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// Start from the default field selection (architecture.md); `fields` add to or replace it.
    #[serde(default = "yes")]
    pub defaults: bool,
    /// Default Marketo fields to leave out.
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub fields: Vec<FieldConfig>,
    /// A boolean opportunity attribute (like the native `new_synctomkto`); only an explicit
    /// false excludes a record.
    #[serde(default)]
    pub sync_filter: Option<String>,
    #[serde(default)]
    pub roles: RolesConfig,
    #[serde(default)]
    pub leads: LeadsConfig,
    #[serde(default)]
    pub deletes: DeletesConfig,
    /// Each opportunity's owner (a Dynamics user) becomes a Marketo sales person, and the
    /// opportunity carries its `externalSalesPersonId`, as the native sync does.
    #[serde(default = "yes")]
    pub sales_persons: bool,
}

fn yes() -> bool {
    true
}

impl Default for MappingConfig {
    fn default() -> Self {
        MappingConfig {
            defaults: true,
            exclude: Vec::new(),
            fields: Vec::new(),
            sync_filter: None,
            roles: RolesConfig::default(),
            leads: LeadsConfig::default(),
            deletes: DeletesConfig::default(),
            sales_persons: true,
        }
    }
}

/// One `[[mapping.fields]]` entry: a Marketo opportunity field and where its value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldConfig {
    /// The Marketo opportunity field's REST API name.
    pub marketo: String,
    /// The Dataverse attribute's logical name (`ownerid` or `_ownerid_value` for lookups).
    #[serde(default)]
    pub dataverse: Option<String>,
    /// The conversion: guid, string, integer, decimal (or money), boolean, date, datetime,
    /// option, option_in, lookup, close_date.
    #[serde(rename = "type")]
    pub kind: String,
    /// `write` (default) sends null when Dataverse has none; `skip` leaves Marketo's value.
    #[serde(default)]
    pub null: Option<String>,
    /// string: the Marketo field's length; longer values are truncated with a warning.
    #[serde(default)]
    pub max_length: Option<i64>,
    /// option: send the label (default) or the raw number.
    #[serde(default)]
    pub label: Option<bool>,
    /// option: labels by value, used instead of the (localized) FormattedValue annotation.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// option_in: the option values that make the Marketo boolean true.
    #[serde(default)]
    pub values: Option<Vec<i64>>,
    /// lookup: `guid` (default) or `name` (the FormattedValue).
    #[serde(default)]
    pub lookup: Option<String>,
}

/// `[mapping.roles]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolesConfig {
    /// The role given to a Potential Customer contact.
    #[serde(default = "default_customer_role")]
    pub customer_role: String,
    /// Connection role categories that make a stakeholder role (1000 Stakeholder; add 1001 for
    /// Sales Team).
    #[serde(default = "default_categories")]
    pub stakeholder_categories: Vec<i64>,
}

fn default_customer_role() -> String {
    "Potential Customer".to_owned()
}
fn default_categories() -> Vec<i64> {
    vec![STAKEHOLDER_CATEGORY]
}

/// connectionrole.category 1000, Stakeholder.
pub const STAKEHOLDER_CATEGORY: i64 = 1000;

impl Default for RolesConfig {
    fn default() -> Self {
        RolesConfig {
            customer_role: default_customer_role(),
            stakeholder_categories: default_categories(),
        }
    }
}

/// `[mapping.leads]`: how a contact finds its Marketo lead.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LeadsConfig {
    /// `email` (default) or `field`.
    #[serde(default, rename = "match")]
    pub match_on: Option<String>,
    /// With `match = "field"`: the Marketo lead field holding the Dataverse contact id.
    #[serde(default)]
    pub field: Option<String>,
    /// `create` (default) a missing lead, or `skip` the role.
    #[serde(default)]
    pub missing: Option<String>,
}

/// `[mapping.deletes]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DeletesConfig {
    /// `delete` (default): an opportunity deleted in Dynamics is deleted in Marketo; `keep`.
    #[serde(default)]
    pub opportunities: Option<String>,
    /// `delete` (default): a removed or deactivated stakeholder's role is deleted; `keep`.
    #[serde(default)]
    pub roles: Option<String>,
}

/// One configuration problem: the key, what is wrong, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}. Fix: {}", self.key, self.problem, self.fix)
    }
}

/// Every problem found in one configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "the mapping configuration has {n} problem{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    /// Whether any error is about `key` (tests and `oppsync validate` use this).
    pub fn mentions(&self, key: &str) -> bool {
        self.0.iter().any(|e| e.key == key)
    }
}

/// How contacts are matched to Marketo leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeadMatch {
    /// By `email` (Marketo's default lookup field). A contact without a valid email gets no role.
    Email,
    /// By a custom Marketo lead field that holds the Dataverse contact id.
    Field(String),
}

/// A validated mapping: what the planner runs on.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub fields: Vec<FieldRule>,
    pub sync_filter: Option<String>,
    pub customer_role: String,
    pub stakeholder_categories: Vec<i64>,
    pub lead_match: LeadMatch,
    pub create_missing_leads: bool,
    pub delete_opportunities: bool,
    pub delete_roles: bool,
    /// Owners become sales persons (`[mapping] sales_persons`).
    pub sales_persons: bool,
}

impl Default for Mapping {
    fn default() -> Self {
        // The defaults are checked by the test `default_configuration_is_valid`.
        MappingConfig::default()
            .validate()
            .unwrap_or_else(|e| unreachable!("the built-in mapping is invalid: {e}"))
    }
}

/// The Marketo field every plan needs; fixed to `opportunityid` because a deleted opportunity
/// is known by its id alone.
pub const EXTERNAL_OPPORTUNITY_ID: &str = "externalOpportunityId";
/// Set by the Potential Customer rules, not by field selection.
pub const EXTERNAL_COMPANY_ID: &str = "externalCompanyId";
/// Set by the owner rule when sales persons are synced.
pub const EXTERNAL_SALES_PERSON_ID: &str = "externalSalesPersonId";

/// Marketo's standard opportunity fields (opportunities page; ../shared/docs/marketo.md).
pub const STANDARD_MARKETO_FIELDS: [&str; 21] = [
    "externalOpportunityId",
    "name",
    "description",
    "stage",
    "type",
    "amount",
    "expectedRevenue",
    "closeDate",
    "fiscalQuarter",
    "fiscalYear",
    "forecastCategory",
    "forecastCategoryName",
    "isClosed",
    "isWon",
    "quantity",
    "probability",
    "lastActivityDate",
    "leadSource",
    "nextStep",
    "externalCompanyId",
    "externalSalesPersonId",
];

/// Whether `name` is one of Marketo's standard opportunity fields (else a custom one).
pub fn is_standard_marketo_field(name: &str) -> bool {
    STANDARD_MARKETO_FIELDS.contains(&name)
}

/// The most `[[mapping.fields]]` entries a configuration may have.
pub const MAX_FIELDS: usize = 200;

/// Marketo's documented lengths for standard opportunity string fields; 255 for everything else.
fn marketo_string_length(field: &str) -> usize {
    match field {
        "description" => 2000,
        EXTERNAL_OPPORTUNITY_ID => 50,
        _ => 255,
    }
}

impl FieldConfig {
    /// An entry with only its Marketo field, source and conversion set.
    pub fn new(marketo: &str, dataverse: Option<&str>, kind: &str) -> FieldConfig {
        FieldConfig {
            marketo: marketo.to_owned(),
            dataverse: dataverse.map(str::to_owned),
            kind: kind.to_owned(),
            null: None,
            max_length: None,
            label: None,
            labels: None,
            values: None,
            lookup: None,
        }
    }
}

/// The default field selection (architecture.md), as configuration entries.
pub fn default_fields() -> Vec<FieldConfig> {
    let f = FieldConfig::new;
    let statecode_labels: BTreeMap<String, String> = [("0", "Open"), ("1", "Won"), ("2", "Lost")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    vec![
        f(EXTERNAL_OPPORTUNITY_ID, Some("opportunityid"), "guid"),
        f("name", Some("name"), "string"),
        f("description", Some("description"), "string"),
        f("amount", Some("estimatedvalue"), "decimal"),
        f("probability", Some("closeprobability"), "integer"),
        // Fixed labels rather than the FormattedValue: those are localized to the app user.
        FieldConfig {
            labels: Some(statecode_labels),
            ..f("stage", Some("statecode"), "option")
        },
        FieldConfig {
            values: Some(vec![1, 2]),
            ..f("isClosed", Some("statecode"), "option_in")
        },
        FieldConfig {
            values: Some(vec![1]),
            ..f("isWon", Some("statecode"), "option_in")
        },
        f("closeDate", None, "close_date"),
    ]
}

impl MappingConfig {
    /// Parses the `[mapping]` table of a configuration file (other tables are left to their
    /// owners). A missing `[mapping]` table means the defaults.
    pub fn from_toml(document: &str) -> Result<MappingConfig, ConfigErrors> {
        #[derive(Deserialize)]
        struct Doc {
            #[serde(default)]
            mapping: Option<MappingConfig>,
        }
        let doc: Doc = toml::from_str(document).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                key: "mapping".to_owned(),
                // The Display form quotes the offending line, which names the key.
                problem: e.to_string().split_whitespace().collect::<Vec<_>>().join(" "),
                fix: "correct the TOML; see README.md, section Configuration, for every key".to_owned(),
            }])
        })?;
        Ok(doc.mapping.unwrap_or_default())
    }

    /// Checks the section and builds the [`Mapping`], reporting every problem found.
    pub fn validate(&self) -> Result<Mapping, ConfigErrors> {
        let mut errors = Errors(Vec::new());
        let defaults = if self.defaults { default_fields() } else { Vec::new() };

        for (i, name) in self.exclude.iter().enumerate() {
            if name == EXTERNAL_OPPORTUNITY_ID {
                errors.push(
                    format!("mapping.exclude[{i}]"),
                    "externalOpportunityId cannot be excluded: it is the opportunity's key in Marketo",
                    "remove it from mapping.exclude",
                );
            } else if !defaults.iter().any(|d| &d.marketo == name) {
                errors.push(
                    format!("mapping.exclude[{i}]"),
                    format!("`{name}` is not a default field"),
                    format!(
                        "use one of: {}",
                        default_fields()
                            .iter()
                            .map(|d| d.marketo.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }

        // A bound well above any Marketo opportunity schema: past it, the Dataverse query that
        // selects the fields outgrows a URL.
        if self.fields.len() > MAX_FIELDS {
            errors.push(
                "mapping.fields",
                format!("{} fields are mapped; at most {MAX_FIELDS} can be", self.fields.len()),
                "map only the Marketo opportunity fields you use (`oppsync validate` lists what Marketo has)",
            );
            return Err(ConfigErrors(errors.0));
        }
        // The user's fields first: their duplicates are errors, their overrides replace defaults.
        let mut rules: Vec<FieldRule> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        for (i, field) in self.fields.iter().enumerate() {
            let key = format!("mapping.fields[{i}]");
            let folded = field.marketo.to_ascii_lowercase();
            if !seen.insert(folded) {
                errors.push(
                    format!("{key}.marketo"),
                    format!("Marketo field `{}` is mapped more than once", field.marketo),
                    "keep one entry per Marketo field (names compare case-insensitively)",
                );
                continue;
            }
            if let Some(rule) = field_rule(field, &key, &mut errors) {
                rules.push(rule);
            }
        }
        for (i, field) in defaults.iter().enumerate() {
            if seen.contains(&field.marketo.to_ascii_lowercase()) || self.exclude.contains(&field.marketo) {
                continue;
            }
            if let Some(rule) = field_rule(field, &format!("default field {i}"), &mut errors) {
                rules.insert(i.min(rules.len()), rule);
            }
        }

        if rules.is_empty() {
            errors.push(
                "mapping.fields",
                "the mapping is empty: nothing would be written to Marketo",
                "set mapping.defaults = true or add [[mapping.fields]] entries",
            );
        } else if !rules.iter().any(|r| &*r.marketo == EXTERNAL_OPPORTUNITY_ID) {
            errors.push(
                "mapping.fields",
                "no entry maps externalOpportunityId, the opportunity's key in Marketo",
                "add { marketo = \"externalOpportunityId\", dataverse = \"opportunityid\", type = \"guid\" } \
                 or set mapping.defaults = true",
            );
        }
        rules.sort_by(|a, b| a.marketo.cmp(&b.marketo));
        for (i, field) in self.fields.iter().enumerate() {
            if self.sales_persons && field.marketo.eq_ignore_ascii_case(EXTERNAL_SALES_PERSON_ID) {
                errors.push(
                    format!("mapping.fields[{i}].marketo"),
                    "externalSalesPersonId is set from the opportunity's owner while mapping.sales_persons is on",
                    "remove this entry, or set mapping.sales_persons = false to map the field yourself",
                );
            }
        }

        if let Some(attr) = &self.sync_filter
            && !is_logical_name(attr)
        {
            errors.push(
                "mapping.sync_filter",
                format!("`{attr}` is not a Dataverse logical name"),
                "use the attribute's logical name in lowercase, like new_synctomkto",
            );
        }

        let customer_role = self.roles.customer_role.trim().to_owned();
        if customer_role.is_empty() || customer_role.chars().count() > MARKETO_ROLE_MAX {
            errors.push(
                "mapping.roles.customer_role",
                format!("must be 1 to {MARKETO_ROLE_MAX} characters (Marketo's role field length)"),
                "choose a shorter name, like \"Potential Customer\"",
            );
        }

        let lead_match = match (self.leads.match_on.as_deref(), &self.leads.field) {
            (None | Some("email"), None) => LeadMatch::Email,
            (None | Some("email"), Some(_)) => {
                errors.push(
                    "mapping.leads.field",
                    "`field` is only used with match = \"field\"",
                    "set mapping.leads.match = \"field\" or remove mapping.leads.field",
                );
                LeadMatch::Email
            }
            (Some("field"), Some(f)) if is_marketo_name(f) => LeadMatch::Field(f.clone()),
            (Some("field"), _) => {
                errors.push(
                    "mapping.leads.field",
                    "match = \"field\" needs the Marketo lead field that holds the Dataverse contact id",
                    "set mapping.leads.field to that field's REST API name, like dynamicsContactId",
                );
                LeadMatch::Email
            }
            (Some(other), _) => {
                errors.push(
                    "mapping.leads.match",
                    format!("unknown lead matching `{other}`"),
                    "use \"email\" or \"field\"",
                );
                LeadMatch::Email
            }
        };
        let create_missing_leads = choice(
            &self.leads.missing,
            "mapping.leads.missing",
            "create",
            "skip",
            &mut errors,
        );
        let delete_opportunities = choice(
            &self.deletes.opportunities,
            "mapping.deletes.opportunities",
            "delete",
            "keep",
            &mut errors,
        );
        let delete_roles = choice(
            &self.deletes.roles,
            "mapping.deletes.roles",
            "delete",
            "keep",
            &mut errors,
        );

        if errors.0.is_empty() {
            Ok(Mapping {
                fields: rules,
                sync_filter: self.sync_filter.clone(),
                customer_role,
                stakeholder_categories: self.roles.stakeholder_categories.clone(),
                lead_match,
                create_missing_leads,
                delete_opportunities,
                delete_roles,
                sales_persons: self.sales_persons,
            })
        } else {
            Err(ConfigErrors(errors.0))
        }
    }
}

impl Mapping {
    /// The opportunity attributes a Dataverse query must `$select` for this mapping and the rules.
    pub fn opportunity_attributes(&self) -> Vec<String> {
        let mut attrs: Vec<String> = [
            "opportunityid",
            "_customerid_value",
            "_parentaccountid_value",
            "_parentcontactid_value",
            "statecode",
            "versionnumber",
            "modifiedon",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        for rule in &self.fields {
            match &rule.source {
                Source::Attribute(a) => attrs.push(a.to_string()),
                Source::Derived => attrs.extend(["actualclosedate".to_owned(), "estimatedclosedate".to_owned()]),
            }
        }
        attrs.extend(self.sync_filter.clone());
        if self.sales_persons {
            attrs.push("_ownerid_value".to_owned());
        }
        attrs.sort();
        attrs.dedup();
        attrs
    }
}
