//! The OpenAPI document, generated from the handlers' annotations. `openapi/openapi.json` is
//! this document, committed; a test fails when the two differ (`xpand openapi > openapi/openapi.json`).

use serde_json::{json, Map, Value};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::http::{
    account, files, inference, jobs, keys, ledger, models, nodes, ops, transfers, webhooks, ws,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "xpand",
        description = "Gateway of a decentralized AI compute network: submit jobs (spreadsheet forecasts, video face anonymization), escrowed in micro-credits, run by worker nodes. Errors are RFC 9457 problem documents.",
        version = env!("CARGO_PKG_VERSION"),
        license(name = "Apache-2.0")
    ),
    paths(
        jobs::submit, jobs::get, jobs::list, jobs::cancel, jobs::events, ws::upgrade,
        files::upload, files::download, files::delete, transfers::input, transfers::model, transfers::output,
        models::register, models::list, models::get, models::publish, models::version,
        models::delete,
        inference::server, inference::live, inference::ready, inference::model_ready,
        inference::model_version_ready, inference::model, inference::model_version,
        inference::infer, inference::infer_version,
        account::token, account::account, account::ledger_entries,
        keys::list, keys::create, keys::revoke,
        webhooks::register, webhooks::list, webhooks::delete, webhooks::deliveries,
        nodes::list, nodes::get,
        ledger::public_key, ledger::list_blocks, ledger::get_block, ledger::block_leaves,
        ledger::block_entries, ledger::block_records, ledger::audit, ledger::node_records,
        ledger::entry_proof, ledger::settlement_proof, ledger::epoch,
        ops::healthz, ops::readyz, ops::metrics, ops::openapi,
    ),
    components(schemas(ws::ClientOp, ws::Reply, crate::jobs::JobEvent)),
    modifiers(&BearerAuth, &StandardResponses, &BinaryBodies),
    tags(
        (name = "jobs", description = "Submit and follow jobs (REST, SSE, WebSocket)"),
        (name = "files", description = "Uploads (inputs such as videos) and downloads"),
        (name = "auth", description = "Short-lived tokens for browsers and add-ins"),
        (name = "account", description = "Balances, ledger entries and API keys"),
        (name = "models", description = "The model registry: your ONNX models, their versions and publishing"),
        (name = "inference", description = "The Open Inference Protocol (KServe v2) over the model registry: existing clients need a URL and a token"),
        (name = "webhooks", description = "Standard Webhooks: endpoints, their events and each delivery attempt"),
        (name = "nodes", description = "Worker nodes of the network"),
        (name = "ledger", description = "The sealed, signed, hash-chained ledger and inclusion proofs"),
        (name = "ops", description = "Health, readiness, metrics, this document"),
        (name = "workers", description = "Shard transfers for worker nodes (node-signed requests to URLs from assignments)"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "node_signature",
            SecurityScheme::ApiKey(utoipa::openapi::security::ApiKey::Header(
                utoipa::openapi::security::ApiKeyValue::with_description(
                    "Authorization",
                    "XpandNode <base64 envelope signed by the node over the method, path and query>",
                ),
            )),
        );
    }
}

/// Every operation of the document, whatever its method.
fn operations(
    openapi: &mut utoipa::openapi::OpenApi,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    openapi.paths.paths.values_mut().flat_map(|item| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
    })
}

/// The answers every operation of a kind can give, added where an operation's own annotation
/// does not name them, so that a client generated from the document knows every status it may
/// meet (each a problem document): 401, 403 and 429 for a credential, 422 for a malformed path
/// or query parameter, 413 and 415 for a body, and 400 and 422 for a JSON one.
struct StandardResponses;

impl Modify for StandardResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::ParameterIn;
        for operation in operations(openapi) {
            let secured = operation.security.as_ref().is_some_and(|s| !s.is_empty());
            let bearer = secured
                && serde_json::to_value(&operation.security)
                    .is_ok_and(|v| v.to_string().contains("\"bearer\""));
            let parameters = operation.parameters.iter().flatten();
            let has_parameters = parameters
                .clone()
                .any(|p| matches!(p.parameter_in, ParameterIn::Path | ParameterIn::Query));
            let body = operation.request_body.as_ref();
            let json_body = body.is_some_and(|b| b.content.contains_key("application/json"));
            let mut add = |status: &str, description: &str| {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| problem(description).into());
            };
            if secured {
                add(
                    "401",
                    "No credential, or one that is invalid, expired or revoked",
                );
            }
            if bearer {
                add("403", "The credential lacks the scope this operation needs");
                add(
                    "429",
                    "Over the credential's rate limit: retry after `Retry-After` seconds",
                );
            }
            if has_parameters || json_body {
                add(
                    "422",
                    "A malformed parameter or body field, named in `errors`",
                );
            }
            if json_body {
                add("400", "The body is not JSON");
            }
            if body.is_some() {
                add("413", "The body is larger than the gateway takes");
                add(
                    "415",
                    "The body's content type is not one this operation takes",
                );
            }
        }
    }
}

/// Bodies that are bytes (uploads, downloads, video segments) as `type: string, format:
/// binary`, which generated clients send and read as raw bytes; a Rust `Vec<u8>` would say an
/// array of integers, and a client would send the JSON of one.
struct BinaryBodies;

impl Modify for BinaryBodies {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        use utoipa::openapi::RefOr;
        let binary = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
                .build()
        };
        // What utoipa makes of a `Vec<u8>` body: an array (of integers).
        let bytes = |content: &mut utoipa::openapi::Content, media: &str| {
            let array = matches!(
                content.schema,
                Some(RefOr::T(utoipa::openapi::schema::Schema::Array(_)))
            );
            if array && !media.contains("json") {
                content.schema = Some(binary().into());
            }
        };
        for operation in operations(openapi) {
            if let Some(body) = operation.request_body.as_mut() {
                for (media, content) in body.content.iter_mut() {
                    bytes(content, media);
                }
                // An upload of nothing is refused (`the file is empty`).
                for content in body.content.values_mut() {
                    if let Some(RefOr::T(utoipa::openapi::schema::Schema::Object(object))) =
                        content.schema.as_mut()
                    {
                        if object.format.is_some() {
                            object.min_length = Some(1);
                        }
                    }
                }
            }
            for response in operation.responses.responses.values_mut() {
                if let RefOr::T(response) = response {
                    for (media, content) in response.content.iter_mut() {
                        bytes(content, media);
                    }
                }
            }
        }
    }
}

fn problem(description: &str) -> utoipa::openapi::Response {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

/// The document: the handlers' annotations, with each job kind's own shapes put in
/// ([`with_kinds`]).
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
    with_kinds(&mut doc);
    with_named_variants(&mut doc);
    with_links(&mut doc);
    doc
}

/// The document as committed: pretty JSON with a trailing newline.
pub fn render() -> String {
    let mut s = serde_json::to_string_pretty(&document()).expect("JSON values serialize");
    s.push('\n');
    s
}

/// Puts in what each kind takes and gives (`crate::kinds::schemas`), so that generated clients
/// get real types: `SubmitJob` becomes one submission per kind, told apart by `kind`, each with
/// its kind's `input` and `params`; a job's `output` is one of the kinds' outputs. (Written as
/// JSON: the kinds' schemas use what the annotations cannot, such as `const` and `anyOf`.)
fn with_kinds(doc: &mut Value) {
    let schemas = &mut doc["components"]["schemas"];
    let submit = schemas["SubmitJob"].clone();
    let reference = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let (mut submissions, mut mapping, mut outputs) = (Vec::new(), Map::new(), Vec::new());
    for (kind, [(input, input_schema), (params, params_schema), (output, output_schema)]) in
        crate::kinds::schemas()
    {
        let name = format!("{}Job", input.trim_end_matches("Input"));
        let mut submission = submit.clone();
        submission["description"] = json!(format!("A `{kind}` job submission."));
        submission["additionalProperties"] = json!(false);
        let properties = &mut submission["properties"];
        properties["kind"] = json!({ "type": "string", "const": kind });
        properties["input"] = reference(input);
        properties["params"] = reference(params);
        properties["max_fee"]["minimum"] = json!(0);
        schemas[input] = input_schema;
        schemas[params] = params_schema;
        schemas[output] = output_schema;
        schemas[&name] = submission;
        submissions.push(reference(&name));
        mapping.insert(kind.to_string(), reference(&name)["$ref"].clone());
        outputs.push(reference(output));
    }
    schemas["SubmitJob"] = json!({
        "description": "A job submission: one shape per kind, told apart by `kind`.",
        "oneOf": submissions,
        "discriminator": { "propertyName": "kind", "mapping": mapping },
    });
    outputs.push(json!({ "type": "null" }));
    let output = &mut schemas["Job"]["properties"]["output"];
    let description = output["description"].clone();
    *output = json!({ "description": description, "anyOf": outputs });
}

/// Gives each variant of a tagged union (`JobEvent`, `Reply`, `ClientOp`: inline objects told
/// apart by one property holding a single string) a schema of its own, named after the union
/// and its tag (`JobEventPartial`), and the union a discriminator over that property. Generated
/// clients then get `JobEventPartial` rather than `JobEventType1`, and pick the variant by its
/// tag instead of trying each in turn.
fn with_named_variants(doc: &mut Value) {
    let schemas = doc["components"]["schemas"]
        .as_object_mut()
        .expect("the document has schemas");
    let tag_of = |variant: &Value| -> Option<(String, String)> {
        let properties = variant.get("properties")?.as_object()?;
        properties
            .iter()
            .find_map(|(name, schema)| match schema["enum"].as_array() {
                Some(values)
                    if values.len() == 1 && schema.get("type") == Some(&json!("string")) =>
                {
                    Some((name.clone(), values[0].as_str()?.to_string()))
                }
                _ => None,
            })
    };
    let unions: Vec<String> = schemas
        .iter()
        .filter(|(_, schema)| {
            schema["oneOf"].as_array().is_some_and(|variants| {
                let tags: Vec<_> = variants.iter().map(tag_of).collect();
                tags.iter().all(Option::is_some)
                    && tags
                        .windows(2)
                        .all(|w| w[0].as_ref().map(|t| &t.0) == w[1].as_ref().map(|t| &t.0))
            })
        })
        .map(|(name, _)| name.clone())
        .collect();
    for union in unions {
        let variants = schemas[&union]["oneOf"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let (mut references, mut mapping, mut property) = (Vec::new(), Map::new(), String::new());
        for variant in variants {
            let (tag, value) = tag_of(&variant).expect("checked above");
            let pascal: String = value
                .split('_')
                .map(|word| {
                    let mut chars = word.chars();
                    chars
                        .next()
                        .map(|c| c.to_uppercase().chain(chars).collect::<String>())
                        .unwrap_or_default()
                })
                .collect();
            let name = format!("{union}{pascal}");
            let reference = format!("#/components/schemas/{name}");
            schemas.insert(name, variant);
            references.push(json!({ "$ref": reference }));
            mapping.insert(value, json!(reference));
            property = tag;
        }
        let schema = &mut schemas[&union];
        schema["oneOf"] = json!(references);
        schema["discriminator"] = json!({ "propertyName": property, "mapping": mapping });
    }
}

/// What a created resource's `id` can be passed to, as OpenAPI links on the create's 2xx
/// responses: (create path, the operations that take the id as `{id}`).
const LINKS: [(&str, &[&str]); 4] = [
    (
        "/v1/jobs",
        &[
            "get_job",
            "cancel",
            "list_deliveries",
            "settlement_proof",
            "events",
        ],
    ),
    ("/v1/files", &["download", "delete_file"]),
    ("/v1/webhooks", &["delete_webhook"]),
    ("/v1/account/keys", &["revoke_key"]),
];

/// Adds [`LINKS`]: a reader (and a stateful fuzzer) learns that the `id` a create answers is
/// what the operations on that resource take.
fn with_links(doc: &mut Value) {
    for (path, targets) in LINKS {
        let links: Map<String, Value> = targets
            .iter()
            .map(|target| {
                let link = json!({
                    "operationId": target,
                    "parameters": { "id": "$response.body#/id" },
                });
                (target.to_string(), link)
            })
            .collect();
        let responses = doc["paths"][path]["post"]["responses"]
            .as_object_mut()
            .unwrap_or_else(|| panic!("POST {path} has responses"));
        for (status, response) in responses.iter_mut() {
            if status.starts_with('2') {
                response["links"] = Value::Object(links.clone());
            }
        }
    }
}
