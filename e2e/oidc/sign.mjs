// Sign a JWT locally, for tests that need tokens no provider would issue
// (expired, wrong issuer, Kubernetes-shaped claims).
//
// Usage: node sign.mjs KEY.pem KID CLAIMS_JSON
// Prints the RS256 (RSA key) or ES256 (P-256 key) compact JWT to stdout.
// Claims whose value is the string "$now+N" / "$now-N" become now±N seconds.

import { createPrivateKey, sign } from 'node:crypto';
import { readFileSync } from 'node:fs';

const [keyPath, kid, claimsJson] = process.argv.slice(2);
if (!keyPath || !kid || !claimsJson) {
  process.stderr.write('usage: node sign.mjs KEY.pem KID CLAIMS_JSON\n');
  process.exit(2);
}
const key = createPrivateKey(readFileSync(keyPath));
const ec = key.asymmetricKeyType === 'ec';
const now = Math.floor(Date.now() / 1000);
const claims = JSON.parse(claimsJson, (_k, v) => {
  const m = typeof v === 'string' && /^\$now([+-]\d+)?$/.exec(v);
  return m ? now + Number(m[1] ?? 0) : v;
});
const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
const input = `${b64({ alg: ec ? 'ES256' : 'RS256', typ: 'JWT', kid })}.${b64(claims)}`;
// ES256 in a JWS is the raw r||s pair, not DER.
const sig = sign('sha256', Buffer.from(input), ec ? { key, dsaEncoding: 'ieee-p1363' } : key);
process.stdout.write(`${input}.${sig.toString('base64url')}\n`);
