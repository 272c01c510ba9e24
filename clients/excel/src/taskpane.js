// The settings pane (taskpane.html): the gateway URL, the API key and the most a formula may
// cost, kept in OfficeRuntime.storage, where the custom functions of the same shared runtime
// read them. Saving checks them at once by reading the account's balance.

const form = /** @type {HTMLFormElement | null} */ (document.getElementById('settings'));
const status = document.getElementById('status');

/** @param {string} text */
function say(text) {
  if (status) status.textContent = text;
}

async function fill() {
  if (!form) return;
  const saved = await globalThis.XpandExcel.readSettings();
  form.gatewayUrl.value = saved.gatewayUrl ?? '';
  form.apiKey.value = saved.apiKey ?? '';
  form.maxFee.value = saved.maxFee ?? '';
}

form?.addEventListener('submit', async (event) => {
  event.preventDefault();
  say('Checking…');
  try {
    const account = await globalThis.XpandExcel.saveSettings({
      gatewayUrl: form.gatewayUrl.value,
      apiKey: form.apiKey.value,
      maxFee: form.maxFee.value ? Number(form.maxFee.value) : undefined,
    });
    say(`Saved. Available: ${account.available.toLocaleString()} micro-credits.`);
  } catch (e) {
    say(`Saved, but the gateway did not answer as expected: ${e instanceof Error ? e.message : e}`);
  }
});

const ready = globalThis.Office?.onReady ? globalThis.Office.onReady() : Promise.resolve();
ready.then(fill).catch((e) => say(String(e)));
