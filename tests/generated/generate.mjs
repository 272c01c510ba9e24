// Generates the TypeScript types of the document a gateway serves (XPAND_URL/openapi.json) into
// the file named by the first argument, with openapi-typescript's Node API and the transform its
// documentation gives for files: `format: binary` as `Blob` (the CLI writes `string`, and a
// string body would be sent as JSON).
//
//   XPAND_URL=http://127.0.0.1:8080 node generate.mjs out/openapi.d.ts
import { writeFile } from "node:fs/promises";
import openapiTS, { astToString } from "openapi-typescript";
import ts from "typescript";

const BLOB = ts.factory.createTypeReferenceNode(ts.factory.createIdentifier("Blob"));
const NULL = ts.factory.createLiteralTypeNode(ts.factory.createNull());

const ast = await openapiTS(new URL("/openapi.json", process.env.XPAND_URL), {
  transform(schema) {
    if (schema.format === "binary") {
      const nullable = Array.isArray(schema.type) && schema.type.includes("null");
      return nullable ? ts.factory.createUnionTypeNode([BLOB, NULL]) : BLOB;
    }
    return undefined;
  },
});
await writeFile(process.argv[2], astToString(ast));
