//! Configuration: defaults, overrides, and errors that name the key and the fix.

use oppsync_mapping::{ConfigErrors, LeadMatch, Mapping, MappingConfig};

fn errors(toml: &str) -> ConfigErrors {
    match MappingConfig::from_toml(toml).and_then(|c| c.validate()) {
        Ok(m) => panic!("expected errors, got {m:?}"),
        Err(e) => e,
    }
}

#[test]
fn default_configuration_is_valid() {
    let m = MappingConfig::from_toml("").unwrap().validate().unwrap();
    let names: Vec<&str> = m.fields.iter().map(|f| &*f.marketo).collect();
    assert_eq!(
        names,
        [
            "amount",
            "closeDate",
            "description",
            "externalOpportunityId",
            "isClosed",
            "isWon",
            "name",
            "probability",
            "stage"
        ]
    );
    assert_eq!(m.customer_role, "Potential Customer");
    assert_eq!(m.stakeholder_categories, vec![1000]);
    assert_eq!(m.lead_match, LeadMatch::Email);
    assert!(m.create_missing_leads && m.delete_opportunities && m.delete_roles);
    // Other sections of the file belong to other crates and are left alone.
    assert!(MappingConfig::from_toml("[marketo]\nurl = \"x\"\n").is_ok());
}

#[test]
fn an_unknown_conversion_names_the_key_and_lists_the_choices() {
    let e = errors("[[mapping.fields]]\nmarketo = \"region\"\ndataverse = \"new_region\"\ntype = \"text\"\n");
    assert!(e.mentions("mapping.fields[0].type"), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("unknown conversion `text`") && text.contains("string, integer"),
        "{text}"
    );
}

#[test]
fn an_empty_mapping_is_an_error() {
    let e = errors("[mapping]\ndefaults = false\n");
    assert!(e.mentions("mapping.fields"), "{e}");
    assert!(e.to_string().contains("empty"), "{e}");
}

#[test]
fn a_duplicate_marketo_field_is_an_error() {
    let e = errors(
        "[[mapping.fields]]\nmarketo = \"region\"\ndataverse = \"new_region\"\ntype = \"string\"\n\
         [[mapping.fields]]\nmarketo = \"Region\"\ndataverse = \"new_area\"\ntype = \"string\"\n",
    );
    assert!(e.mentions("mapping.fields[1].marketo"), "{e}");
    assert!(e.to_string().contains("more than once"), "{e}");
}

#[test]
fn a_missing_external_opportunity_id_source_is_an_error_with_the_entry_to_add() {
    let e = errors(
        "[mapping]\ndefaults = false\n[[mapping.fields]]\nmarketo = \"name\"\ndataverse = \"name\"\ntype = \"string\"\n",
    );
    assert!(e.mentions("mapping.fields"), "{e}");
    assert!(e.to_string().contains("dataverse = \\\"opportunityid\\\"") || e.to_string().contains("opportunityid"));
}

#[test]
fn external_opportunity_id_must_come_from_opportunityid() {
    let e =
        errors("[[mapping.fields]]\nmarketo = \"externalOpportunityId\"\ndataverse = \"new_key\"\ntype = \"string\"\n");
    assert!(e.mentions("mapping.fields[0]"), "{e}");
    assert!(e.to_string().contains("deleted opportunity"), "{e}");
}

#[test]
fn external_company_id_is_reserved_for_the_customer_rules() {
    let e = errors("[[mapping.fields]]\nmarketo = \"externalCompanyId\"\ndataverse = \"new_x\"\ntype = \"string\"\n");
    assert!(e.mentions("mapping.fields[0].marketo"), "{e}");
}

#[test]
fn a_misspelt_key_is_an_error_naming_it() {
    let e = errors("[mapping]\nsyncfilter = \"new_synctomkto\"\n");
    assert!(e.to_string().contains("syncfilter"), "{e}");
    let e = errors("[[mapping.fields]]\nmarketo = \"a\"\ndataverse = \"b\"\ntype = \"string\"\nmaxlength = 5\n");
    assert!(e.to_string().contains("maxlength"), "{e}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let e = errors(
        "[mapping]\nexclude = [\"nosuch\"]\nsync_filter = \"New Sync\"\n\
         [mapping.roles]\ncustomer_role = \"\"\n[mapping.leads]\nmatch = \"phone\"\n[mapping.deletes]\nroles = \"purge\"\n",
    );
    for key in [
        "mapping.exclude[0]",
        "mapping.sync_filter",
        "mapping.roles.customer_role",
        "mapping.leads.match",
        "mapping.deletes.roles",
    ] {
        assert!(e.mentions(key), "{key} missing from {e}");
    }
    assert!(
        e.to_string().starts_with("the mapping configuration has 5 problems"),
        "{e}"
    );
}

#[test]
fn options_that_do_not_apply_to_the_type_are_errors() {
    let e = errors("[[mapping.fields]]\nmarketo = \"n\"\ndataverse = \"x\"\ntype = \"integer\"\nmax_length = 5\n");
    assert!(e.mentions("mapping.fields[0].max_length"), "{e}");
    let e = errors(
        "[[mapping.fields]]\nmarketo = \"n\"\ndataverse = \"x\"\ntype = \"option\"\nlabels = { open = \"Open\" }\n",
    );
    assert!(e.mentions("mapping.fields[0].labels"), "{e}");
    let e = errors("[[mapping.fields]]\nmarketo = \"n\"\ndataverse = \"x\"\ntype = \"option_in\"\n");
    assert!(e.mentions("mapping.fields[0].values"), "{e}");
    let e = errors("[[mapping.fields]]\nmarketo = \"n\"\ndataverse = \"x\"\ntype = \"string\"\nmax_length = 0\n");
    assert!(e.mentions("mapping.fields[0].max_length"), "{e}");
    let e = errors("[[mapping.fields]]\nmarketo = \"n\"\ntype = \"string\"\n");
    assert!(e.mentions("mapping.fields[0].dataverse"), "{e}");
    let e = errors("[[mapping.fields]]\nmarketo = \"n\"\ndataverse = \"x\"\ntype = \"string\"\nnull = \"ignore\"\n");
    assert!(e.mentions("mapping.fields[0].null"), "{e}");
}

#[test]
fn a_user_entry_replaces_the_default_for_that_field() {
    let m = MappingConfig::from_toml(
        "[[mapping.fields]]\nmarketo = \"stage\"\ndataverse = \"salesstage\"\ntype = \"option\"\nlabel = false\n",
    )
    .unwrap()
    .validate()
    .unwrap();
    let stage: Vec<_> = m.fields.iter().filter(|f| &*f.marketo == "stage").collect();
    assert_eq!(stage.len(), 1);
    assert_eq!(stage[0].conversion, oppsync_mapping::convert::Conversion::OptionValue);
}

#[test]
fn lead_matching_on_a_field_needs_the_field() {
    let e = errors("[mapping.leads]\nmatch = \"field\"\n");
    assert!(e.mentions("mapping.leads.field"), "{e}");
    let m = MappingConfig::from_toml(
        "[mapping.leads]\nmatch = \"field\"\nfield = \"dynamicsContactId\"\nmissing = \"skip\"\n",
    )
    .unwrap()
    .validate()
    .unwrap();
    assert_eq!(m.lead_match, LeadMatch::Field("dynamicsContactId".into()));
    assert!(!m.create_missing_leads);
}

#[test]
fn malformed_toml_is_an_error_that_says_where() {
    let e = errors("[mapping\ndefaults = true\n");
    assert!(e.to_string().contains("at line 1"), "{e}");
}

#[test]
fn the_attributes_to_select_cover_the_mapping_the_rules_and_the_filter() {
    let m = MappingConfig::from_toml(
        "[mapping]\nsync_filter = \"new_synctomkto\"\n\
         [[mapping.fields]]\nmarketo = \"owner\"\ndataverse = \"ownerid\"\ntype = \"lookup\"\n",
    )
    .unwrap()
    .validate()
    .unwrap();
    let attrs = m.opportunity_attributes();
    for needed in [
        "opportunityid",
        "_customerid_value",
        "_ownerid_value",
        "actualclosedate",
        "estimatedclosedate",
        "estimatedvalue",
        "new_synctomkto",
        "statecode",
        "versionnumber",
    ] {
        assert!(attrs.iter().any(|a| a == needed), "{needed} not in {attrs:?}");
    }
    // The owner is selected by default (sales persons), the filter only when set.
    assert_eq!(Mapping::default().opportunity_attributes().len(), attrs.len() - 1);
    let without = MappingConfig::from_toml("[mapping]\nsales_persons = false\n")
        .unwrap()
        .validate()
        .unwrap();
    assert!(!without.opportunity_attributes().iter().any(|a| a == "_ownerid_value"));
}
