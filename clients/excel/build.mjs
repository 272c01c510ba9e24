// Why this file exists: the add-in's two scripts are bundled by esbuild (one pinned dependency,
// no configuration beyond this file) into plain scripts Excel's runtimes load with <script>:
// dist/functions.js (the custom functions and the JavaScript client they import from
// clients/js) and dist/taskpane.js (the settings pane). `npm run build`, or
// scripts/setup-excel-addin.sh, which `make test` and `make clients` run.
import { build } from 'esbuild';

const here = new URL('.', import.meta.url).pathname;

await build({
  absWorkingDir: here,
  entryPoints: { functions: 'src/functions.js', taskpane: 'src/taskpane.js' },
  outdir: 'dist',
  bundle: true,
  format: 'iife',
  // Excel on the web runs in the browser; desktop Excel in WebView2 (Windows) or Safari's
  // engine (Mac): the JavaScript of 2020 runs everywhere it is supported.
  target: ['es2020'],
  legalComments: 'none',
  logLevel: 'warning',
});
