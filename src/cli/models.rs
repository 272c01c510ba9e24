//! `xpand models push|list|show|rm`: a data scientist's ONNX file into the registry and out of
//! it. `push` sends the file with its manifest as the API takes them (multipart), and checks the
//! sha256 the gateway answers against the bytes sent; the gateway's refusals (an external-data
//! file, a manifest that differs from the graph) are printed field by field and exit 5.

use std::path::PathBuf;

use reqwest::multipart::{Form, Part};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{cell, exit, print_table, short_time, CliResult, Client, Common, Failure};

#[derive(clap::Args, Debug)]
#[command(after_help = super::EXIT_CODES_HELP)]
pub struct ModelsArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: ModelsCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum ModelsCommand {
    /// Register an ONNX file as a new version of the model its manifest names.
    Push {
        /// The ONNX file.
        model: PathBuf,
        /// The manifest (JSON): name, description, inputs, outputs, price_per_row.
        #[arg(long, short = 'm')]
        manifest: PathBuf,
        /// Also publish the model: any account may then run it.
        #[arg(long)]
        publish: bool,
    },
    /// Your models and the published ones.
    List,
    /// One model with its versions.
    Show { name: String },
    /// Delete a version (`latest`, a sha256 or a prefix of 8+ hex digits).
    Rm { name: String, version: String },
}

pub async fn run(args: ModelsArgs) -> CliResult<()> {
    let client = Client::new(&args.common)?;
    match args.command {
        ModelsCommand::Push {
            model,
            manifest,
            publish,
        } => push(&client, model, manifest, publish).await,
        ModelsCommand::List => {
            let list = client.get("/v1/models").await?;
            if client.json {
                client.print_json(&list);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list["models"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    let latest = &m["versions"][0];
                    vec![
                        cell(m, "name"),
                        cell(latest, "sha256").chars().take(12).collect(),
                        m["versions"].as_array().map_or(0, Vec::len).to_string(),
                        if m["published"] == json!(true) {
                            "yes"
                        } else {
                            "no"
                        }
                        .into(),
                        if m["owned"] == json!(true) {
                            "you"
                        } else {
                            "published"
                        }
                        .into(),
                    ]
                })
                .collect();
            print_table(&["NAME", "LATEST", "VERSIONS", "PUBLISHED", "OWNER"], &rows);
            Ok(())
        }
        ModelsCommand::Show { name } => {
            let model = client.get(&format!("/v1/models/{name}")).await?;
            if client.json {
                client.print_json(&model);
                return Ok(());
            }
            outln!("model      {}", cell(&model, "name"));
            outln!("published  {}", cell(&model, "published"));
            for version in model["versions"].as_array().into_iter().flatten() {
                let manifest = &version["manifest"];
                outln!(
                    "version    {}  {} bytes  {}  {} micro-credits a row",
                    cell(version, "sha256"),
                    cell(version, "size"),
                    short_time(version, "created_at"),
                    cell(manifest, "price_per_row"),
                );
            }
            Ok(())
        }
        ModelsCommand::Rm { name, version } => {
            client
                .send(client.request(
                    Method::DELETE,
                    &format!("/v1/models/{name}/versions/{version}"),
                ))
                .await?;
            if !client.json {
                outln!("deleted model {name} version {version}");
            }
            Ok(())
        }
    }
}

async fn push(client: &Client, model: PathBuf, manifest: PathBuf, publish: bool) -> CliResult<()> {
    let read = |path: &PathBuf| {
        std::fs::read(path)
            .map_err(|e| Failure::new(exit::USAGE, format!("reading {}: {e}", path.display())))
    };
    let (bytes, manifest_text) = (read(&model)?, read(&manifest)?);
    let manifest_json: Value = serde_json::from_slice(&manifest_text).map_err(|e| {
        Failure::new(
            exit::USAGE,
            format!("{} is not JSON: {e}", manifest.display()),
        )
    })?;
    let sent = hex::encode(Sha256::digest(&bytes));
    let form = Form::new()
        .part(
            "manifest",
            Part::bytes(manifest_text)
                .mime_str("application/json")
                .expect("a valid media type"),
        )
        .part("model", Part::bytes(bytes).file_name("model.onnx"));
    let version = client
        .json(client.request(Method::POST, "/v1/models").multipart(form))
        .await?;
    if cell(&version, "sha256") != sent {
        return Err(Failure::new(
            exit::ERROR,
            format!(
                "the gateway registered sha256 {}, but {sent} was sent",
                cell(&version, "sha256")
            ),
        ));
    }
    if publish {
        let name = cell(&manifest_json, "name");
        client
            .json(
                client
                    .request(Method::PATCH, &format!("/v1/models/{name}"))
                    .json(&json!({ "published": true })),
            )
            .await?;
    }
    if client.json {
        client.print_json(&version);
    } else {
        outln!(
            "model {} version {} ({} bytes){}",
            cell(&version, "name"),
            cell(&version, "sha256"),
            cell(&version, "size"),
            if publish { ", published" } else { "" }
        );
    }
    Ok(())
}
