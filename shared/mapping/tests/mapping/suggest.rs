//! The suggested mapping of `oppsync fields`: which Marketo field each Dynamics column feeds,
//! and the configuration written from it, which oppsync must accept.

use std::collections::BTreeMap;

use oppsync_mapping::MappingConfig;
use oppsync_mapping::suggest::{Column, Field, Suggestion, Why, suggest};

fn column(name: &str, kind: &str, display: &str, custom: bool) -> Column {
    Column {
        name: name.into(),
        kind: kind.into(),
        display: Some(display.into()),
        custom,
        options: BTreeMap::new(),
    }
}

fn field(name: &str, kind: &str, length: Option<i64>) -> Field {
    Field {
        name: name.into(),
        kind: kind.into(),
        display: Some(name.into()),
        length,
        updateable: true,
    }
}

fn dynamics() -> Vec<Column> {
    let mut stage = column("salesstage", "Picklist", "Sales Stage", false);
    stage.options = BTreeMap::from([(0, "Qualify".into()), (1, "Develop".into()), (3, "Close".into())]);
    let mut state = column("statecode", "State", "Status", false);
    state.options = BTreeMap::from([(0, "Open".into()), (1, "Won".into()), (2, "Lost".into())]);
    vec![
        column("opportunityid", "Uniqueidentifier", "Opportunity", false),
        column("name", "String", "Topic", false),
        column("description", "Memo", "Description", false),
        column("estimatedvalue", "Money", "Est. Revenue", false),
        column("closeprobability", "Integer", "Probability", false),
        column("stepname", "String", "Pipeline Phase", false),
        stage,
        state,
        column("ownerid", "Owner", "Owner", false),
        column("new_region", "String", "Region", true),
        column("new_dealscore", "Decimal", "Deal Score", true),
        column("cr7f_won_reason", "Memo", "Why We Won", true),
        column("new_istopdeal", "Integer", "Top Deal", true),
        column("new_synctomkto", "Boolean", "Sync to Marketo", true),
        column("new_unused", "String", "Unused", true),
    ]
}

fn marketo() -> Vec<Field> {
    let mut fields = vec![Field {
        updateable: false,
        ..field("marketoGUID", "string", Some(36))
    }];
    for (name, kind, length) in [
        ("externalOpportunityId", "string", Some(50)),
        ("name", "string", Some(255)),
        ("amount", "currency", None),
        ("probability", "integer", None),
        ("stage", "string", Some(255)),
        ("isClosed", "boolean", None),
        ("isWon", "boolean", None),
        ("closeDate", "date", None),
        ("externalCompanyId", "string", Some(255)),
        ("externalSalesPersonId", "string", Some(255)),
        ("nextStep", "string", Some(255)),
        ("fiscalYear", "integer", None),
        ("region", "string", Some(100)),
        ("dealScore", "float", None),
        ("salesStage", "string", Some(255)),
        ("isTopDeal", "boolean", None),
    ] {
        fields.push(field(name, kind, length));
    }
    // A display name that matches a column's: "Why We Won".
    fields.push(Field {
        display: Some("Why We Won".into()),
        ..field("winReason", "text", None)
    });
    fields
}

fn pair<'s>(s: &'s Suggestion, marketo: &str) -> &'s oppsync_mapping::suggest::Pair {
    s.pairs
        .iter()
        .find(|p| p.marketo == marketo)
        .unwrap_or_else(|| panic!("no pair for {marketo}: {:#?}", s.pairs))
}

#[test]
fn the_suggestion_pairs_defaults_rules_standard_fields_and_matching_names() {
    let s = suggest(&dynamics(), &marketo(), true);
    for name in ["externalOpportunityId", "name", "amount", "stage", "isWon", "closeDate"] {
        assert_eq!(pair(&s, name).why, Why::Default, "{name}");
    }
    assert_eq!(s.excluded_defaults, ["description"], "this Marketo has no description");
    assert_eq!(pair(&s, "externalSalesPersonId").why, Why::Rule);
    assert_eq!(pair(&s, "externalCompanyId").conversion, "rule");
    let next = pair(&s, "nextStep");
    assert_eq!((next.why, next.dataverse.as_deref()), (Why::Standard, Some("stepname")));
    // Names match with a custom column's publisher prefix left out, or by display name.
    let region = pair(&s, "region");
    assert_eq!(
        (region.dataverse.as_deref(), region.conversion.as_str(), region.custom),
        (Some("new_region"), "string", true)
    );
    assert_eq!(pair(&s, "dealScore").conversion, "decimal");
    assert_eq!(pair(&s, "salesStage").conversion, "option");
    assert_eq!(pair(&s, "winReason").dataverse.as_deref(), Some("cr7f_won_reason"));
    // An Integer column cannot become a Marketo boolean: named, not suggested.
    assert!(
        s.mismatches
            .iter()
            .any(|m| m.marketo == "isTopDeal" && m.dataverse == "new_istopdeal")
    );
    assert!(!s.pairs.iter().any(|p| p.marketo == "isTopDeal"));
    assert!(s.unmatched_marketo.contains(&"fiscalYear".to_owned()));
    assert!(
        !s.unmatched_marketo.contains(&"marketoGUID".to_owned()),
        "not updateable"
    );
    assert_eq!(s.unmatched_dataverse, ["new_istopdeal", "new_unused"]);
    assert_eq!(s.sync_filter.as_deref(), Some("new_synctomkto"));
}

#[test]
fn the_written_configuration_is_accepted_and_maps_what_was_suggested() {
    let columns = dynamics();
    let s = suggest(&columns, &marketo(), true);
    let text = s.to_toml(true, &columns);
    Suggestion::check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let mapping = MappingConfig::from_toml(&text).unwrap().validate().unwrap();
    let mapped: BTreeMap<&str, String> = mapping
        .fields
        .iter()
        .map(|r| (&*r.marketo, format!("{:?}", r.source)))
        .collect();
    for field in ["region", "dealScore", "salesStage", "winReason", "nextStep", "amount"] {
        assert!(mapped.contains_key(field), "{field} not mapped: {mapped:?}");
    }
    assert!(!mapped.contains_key("description"), "excluded: Marketo lacks it");
    assert!(text.contains("max_length = 100"), "region's Marketo length:\n{text}");
    assert!(
        text.contains("labels = { \"0\" = \"Qualify\", \"1\" = \"Develop\", \"3\" = \"Close\" }"),
        "{text}"
    );
    assert!(text.contains("# sync_filter = \"new_synctomkto\""), "{text}");
    // Sales persons off: the owner rule's field is not claimed, and the file says so.
    let off = suggest(&columns, &marketo(), false);
    assert!(!off.pairs.iter().any(|p| p.marketo == "externalSalesPersonId"));
    let text = off.to_toml(false, &columns);
    assert!(text.contains("sales_persons = false"));
    Suggestion::check(&text).unwrap();
}

#[test]
fn hostile_names_and_labels_stay_inside_their_toml_strings() {
    let mut odd = column("new_note", "Picklist", "Note\n[mapping]\ndefaults = false", true);
    odd.options = BTreeMap::from([(1, "A \"quoted\" \\ label\nwith a newline".into())]);
    let columns = vec![column("opportunityid", "Uniqueidentifier", "Opportunity", false), odd];
    let fields = vec![
        field("externalOpportunityId", "string", Some(50)),
        field("note", "string", Some(80)),
        // A name no configuration can hold is never suggested.
        field("new note\"]", "string", None),
        field("fiscal\n[mapping]\ndefaults = false\n#", "string", None),
    ];
    let s = suggest(&columns, &fields, true);
    let text = s.to_toml(true, &columns);
    Suggestion::check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let config = MappingConfig::from_toml(&text).unwrap();
    assert!(config.defaults, "a display name cannot inject a key:\n{text}");
    assert_eq!(
        config.fields[0].labels.as_ref().unwrap()["1"],
        "A \"quoted\" \\ label\nwith a newline"
    );
}
