// The one way the browser checks start Chromium: the system's (CHROMIUM, default
// /usr/bin/chromium; playwright-core downloads none), headless, with everything that would
// reach off this machine switched off (background networking, component updates, sync, QUIC).
import { chromium } from 'playwright-core';

export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
}
