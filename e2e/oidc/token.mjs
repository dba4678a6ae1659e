// Fetch a client-credentials access token from an OpenID Provider.
//
// Usage: node token.mjs ISSUER CLIENT_ID CLIENT_SECRET RESOURCE
//
// Reads ISSUER/.well-known/openid-configuration, POSTs
// grant_type=client_credentials&resource=RESOURCE to its token_endpoint
// (client_secret_basic) and prints only the access token to stdout.
// On failure exits non-zero with the error body on stderr.

const [issuer, clientId, clientSecret, resource] = process.argv.slice(2);
if (!issuer || !clientId || !clientSecret || !resource) {
  process.stderr.write('usage: node token.mjs ISSUER CLIENT_ID CLIENT_SECRET RESOURCE\n');
  process.exit(2);
}

function fail(msg) {
  process.stderr.write(`${msg}\n`);
  process.exit(1);
}

try {
  const discoveryUrl = `${issuer.replace(/\/+$/, '')}/.well-known/openid-configuration`;
  const discoveryRes = await fetch(discoveryUrl);
  const discoveryText = await discoveryRes.text();
  if (!discoveryRes.ok) {
    fail(`discovery ${discoveryUrl} failed: HTTP ${discoveryRes.status}\n${discoveryText}`);
  }
  const { token_endpoint: tokenEndpoint } = JSON.parse(discoveryText);
  if (!tokenEndpoint) fail(`discovery document has no token_endpoint:\n${discoveryText}`);

  // RFC 6749 section 2.3.1: form-urlencode id and secret before Basic encoding.
  const basic = Buffer.from(
    `${encodeURIComponent(clientId)}:${encodeURIComponent(clientSecret)}`,
  ).toString('base64');
  const tokenRes = await fetch(tokenEndpoint, {
    method: 'POST',
    headers: {
      authorization: `Basic ${basic}`,
      'content-type': 'application/x-www-form-urlencoded',
      accept: 'application/json',
    },
    body: new URLSearchParams({ grant_type: 'client_credentials', resource }).toString(),
  });
  const tokenText = await tokenRes.text();
  if (!tokenRes.ok) fail(`token request failed: HTTP ${tokenRes.status}\n${tokenText}`);
  const { access_token: accessToken } = JSON.parse(tokenText);
  if (!accessToken) fail(`token response has no access_token:\n${tokenText}`);
  process.stdout.write(`${accessToken}\n`);
} catch (err) {
  fail(`error: ${err?.stack ?? err}`);
}
