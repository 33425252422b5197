//! The repository keeps its promises to a new user: the README's commands are the ones CI runs.

use oppsync_tests::{readme_command, repo_root};

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn ci_runs_exactly_the_readmes_test_command() {
    let readme = read("README.md");
    let command = readme_command(&readme, "### Run the tests").expect("README has a test command block");
    assert!(!command.is_empty());
    let ci = read(".ci/run");
    assert!(
        ci.lines()
            .map(str::trim)
            .any(|l| l == command || l == format!("exec {command}")),
        ".ci/run does not run the README's test command `{command}`:\n{ci}"
    );
}

#[test]
fn the_test_command_exists_and_is_a_bash_script_that_stops_on_failure() {
    let readme = read("README.md");
    let command = readme_command(&readme, "### Run the tests").unwrap();
    let script = command.split_whitespace().last().unwrap();
    let text = read(script);
    assert!(text.starts_with("#!/usr/bin/env bash"), "{script} has no bash shebang");
    assert!(
        text.contains("set -euo pipefail"),
        "{script} must stop at the first failure"
    );
    assert!(
        text.contains("cargo test --workspace"),
        "{script} must run the whole workspace's tests"
    );
}

#[test]
fn the_readme_names_the_demo_command() {
    let readme = read("README.md");
    let command = readme_command(&readme, "### Run the demo").expect("README has a demo command block");
    assert!(command.contains("oppsync") && command.contains("demo"), "{command}");
}

#[test]
fn every_workspace_crate_takes_its_dependencies_from_the_workspace() {
    // One dependency set keeps a 2-core build compiling each crate once.
    let root: toml::Table = read("Cargo.toml").parse().unwrap();
    let members = root["workspace"]["members"].as_array().unwrap();
    assert!(
        members.iter().any(|m| m.as_str() == Some("shared/mapping")),
        "{members:?}"
    );
    for member in members {
        let member = member.as_str().unwrap();
        let manifest: toml::Table = read(&format!("{member}/Cargo.toml")).parse().unwrap();
        for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
            let Some(deps) = manifest.get(section).and_then(|d| d.as_table()) else {
                continue;
            };
            for (name, spec) in deps {
                let from_workspace = spec.get("workspace").and_then(|w| w.as_bool()) == Some(true);
                assert!(
                    from_workspace,
                    "{member}: {section}.{name} does not use the workspace's version"
                );
            }
        }
    }
}

#[test]
fn the_readmes_configuration_example_is_valid_and_means_what_it_says() {
    let readme = read("README.md");
    let start = readme
        .find("```toml\n[mapping]")
        .expect("README has the full [mapping] example")
        + "```toml\n".len();
    let example = &readme[start..start + readme[start..].find("```").unwrap()];
    let mapping = oppsync_mapping::MappingConfig::from_toml(example)
        .and_then(|c| c.validate())
        .unwrap_or_else(|e| panic!("the README's example is invalid:\n{e}"));
    let fields: Vec<&str> = mapping.fields.iter().map(|f| &*f.marketo).collect();
    assert!(fields.contains(&"region") && fields.contains(&"ownerName") && fields.contains(&"salesStage"));
    assert!(!fields.contains(&"description"), "excluded in the example");
    assert_eq!(mapping.sync_filter.as_deref(), Some("new_synctomkto"));
}

#[test]
fn the_readmes_marketo_example_is_valid_and_shows_the_defaults() {
    let readme = read("README.md");
    let start = readme
        .find("```toml\n[marketo]")
        .expect("README has the [marketo] example")
        + "```toml\n".len();
    let example = &readme[start..start + readme[start..].find("```").unwrap()];
    let limits = oppsync_marketo::LimitsConfig::from_toml(example).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        limits,
        oppsync_marketo::LimitsConfig::default(),
        "the README says these are the defaults"
    );
}

#[test]
fn the_readmes_dataverse_example_is_valid_and_shows_the_defaults() {
    let readme = read("README.md");
    let start = readme
        .find("```toml\n[dataverse]")
        .expect("README has the [dataverse] example")
        + "```toml\n".len();
    let example = &readme[start..start + readme[start..].find("```").unwrap()];
    let options = oppsync_dynamics::DataverseOptions::from_toml(example).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(options, oppsync_dynamics::DataverseOptions::default());
}

#[test]
fn the_readmes_sync_example_is_valid_and_shows_the_defaults() {
    let readme = read("README.md");
    let start = readme.find("```toml\n[sync]").expect("README has the [sync] example") + "```toml\n".len();
    let example = &readme[start..start + readme[start..].find("```").unwrap()];
    let config = oppsync_pipeline::Config::from_toml(example, "README.md").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.sync, oppsync_pipeline::SyncOptions::default());
}

#[test]
fn the_readmes_deploy_section_names_what_the_template_and_functions_need() {
    let readme = read("README.md");
    let deploy = &readme[readme
        .find("## Deploy to AWS")
        .expect("README has a Deploy to AWS section")..];
    for needed in [
        "sam build",
        "sam deploy --guided",
        "\"tenantId\"",
        "\"clientSecret\"",
        "API Only",
        "LaunchPoint",
        "security role",
        "\"opportunityIds\"",
    ] {
        assert!(deploy.contains(needed), "the Deploy to AWS section lacks {needed}");
    }
    // Every template parameter is explained.
    let template = oppsync_tests::template::load();
    for parameter in template["Parameters"].as_object().unwrap().keys() {
        assert!(
            deploy.contains(&format!("`{parameter}`")),
            "README does not explain {parameter}"
        );
    }
    // The secrets' shapes are the ones the functions parse.
    for shape in [
        oppsync_lambda::coldstart::DYNAMICS_SHAPE,
        oppsync_lambda::coldstart::MARKETO_SHAPE,
    ] {
        for key in ["url", "clientId", "clientSecret"] {
            assert!(shape.contains(&format!("\"{key}\"")), "{shape}");
        }
    }
    for example in deploy.split("--secret-string '").skip(1) {
        let json = &example[..example.find("'").unwrap()];
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        if value.get("tenantId").is_some() {
            oppsync_lambda::coldstart::DynamicsSecret::parse(json).unwrap();
        } else {
            oppsync_lambda::coldstart::MarketoSecret::parse(json).unwrap();
        }
    }
}

#[test]
fn no_lambda_build_enables_the_crash_points() {
    // The crash points abort the process on an environment variable: the `oppsync` command's
    // tests turn them on; nothing a Lambda function is built from may.
    for manifest in [
        "functions/poller/Cargo.toml",
        "functions/transformer/Cargo.toml",
        "functions/writer/Cargo.toml",
        "functions/resync/Cargo.toml",
        "shared/lambda/Cargo.toml",
        "shared/pipeline/Cargo.toml",
    ] {
        let text: toml::Table = read(manifest).parse().unwrap();
        let deps = text.get("dependencies").map(ToString::to_string).unwrap_or_default();
        assert!(
            !deps.contains("crash-points"),
            "{manifest} enables crash points in a Lambda build"
        );
        let default = text
            .get("features")
            .and_then(|f| f.get("default"))
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(
            !default.contains("crash-points"),
            "{manifest} enables crash points by default"
        );
    }
    let cli: toml::Table = read("cli/Cargo.toml").parse().unwrap();
    assert!(
        cli["dev-dependencies"].to_string().contains("crash-points"),
        "the crash tests need them"
    );
    assert!(!cli["dependencies"].to_string().contains("crash-points"));
}
