// Loopback OpenID Provider fixture for pgwarden end-to-end tests.
//
// Usage: node provider.mjs [--port N] [--ttl SECONDS]
//
// Listens on 127.0.0.1 over plain http. When ready, prints exactly one JSON
// line to stdout:
//   {"issuer":"http://127.0.0.1:PORT","port":PORT,"kid":"<current RS256 kid>"}
// and keeps running until killed. Everything else goes to stderr.
//
// Admin endpoints (not part of OIDC):
//   POST /__admin/rotate         new RS256 key becomes the signing key; the
//                                JWKS lists it first and keeps the old keys.
//   POST /__admin/rotate?drop=1  same, but old keys are dropped from the JWKS.
// Both answer {"kid":"<new kid>"}.

// stdout must carry only the ready line. oidc-provider prints NOTICEs with
// console.info (stdout); route every console method to stderr *before* the
// library is loaded (hence the dynamic import below).
{
  const toStderr = (...args) => {
    process.stderr.write(`${args.map((a) => (typeof a === 'string' ? a : JSON.stringify(a))).join(' ')}\n`);
  };
  console.log = toStderr;
  console.info = toStderr;
  console.debug = toStderr;
}

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

const { default: Provider, errors } = await import('oidc-provider');

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    ttl: { type: 'string', default: '300' },
  },
  strict: true,
});
const requestedPort = Number.parseInt(args.port, 10);
const ttl = Number.parseInt(args.ttl, 10);
if (!Number.isInteger(requestedPort) || requestedPort < 0 || requestedPort > 65535) {
  process.stderr.write(`invalid --port ${args.port}\n`);
  process.exit(2);
}
if (!Number.isInteger(ttl) || ttl <= 0) {
  process.stderr.write(`invalid --ttl ${args.ttl}\n`);
  process.exit(2);
}

const RESOURCES = new Set(['urn:pgwarden', 'urn:other']);

const CLIENTS = [
  {
    client_id: 'ci-acme',
    client_secret: 'acme-secret',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  },
  {
    client_id: 'ci-evil',
    client_secret: 'evil-secret',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  },
];
// oidc-provider enforces the registered token_endpoint_auth_method, so both
// clients authenticate with HTTP Basic (client_secret_basic) only.
const EXTRA_CLAIMS = {
  'ci-acme': { repository: 'acme/shop', repository_owner: 'acme', workflow: 'nightly' },
  'ci-evil': { repository: 'evil/shop', repository_owner: 'evil' },
};

let keySeq = 0;
const runId = crypto.randomBytes(3).toString('hex');

function newRsaKey() {
  keySeq += 1;
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: `rsa-${runId}-${keySeq}`, alg: 'RS256', use: 'sig' };
}

function newEcKey() {
  const { privateKey } = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  return { ...privateKey.export({ format: 'jwk' }), kid: `ec-${runId}`, alg: 'ES256', use: 'sig' };
}

// RSA keys, newest first. rsaKeys[0] is the signing key.
let rsaKeys = [newRsaKey()];
const ecKey = newEcKey();

let issuer; // set once the port is known

function buildProvider() {
  const signingKid = rsaKeys[0].kid;
  const provider = new Provider(issuer, {
    clients: CLIENTS,
    jwks: { keys: [...rsaKeys, ecKey] },
    cookies: { keys: ['pgwarden-e2e-cookie-key'] },
    clientAuthMethods: ['client_secret_basic'],
    enabledJWA: {
      idTokenSigningAlgValues: ['RS256', 'ES256'],
    },
    clientDefaults: {
      grant_types: ['client_credentials'],
      response_types: [],
      id_token_signed_response_alg: 'RS256',
      token_endpoint_auth_method: 'client_secret_basic',
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: false },
      revocation: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => undefined,
        useGrantedResource: async () => false,
        getResourceServerInfo: async (_ctx, resourceIndicator) => {
          if (!RESOURCES.has(resourceIndicator)) {
            throw new errors.InvalidTarget();
          }
          return {
            scope: '',
            audience: resourceIndicator,
            accessTokenTTL: ttl,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256', kid: signingKid } },
          };
        },
      },
    },
    extraTokenClaims: async (_ctx, token) => {
      const claims = EXTRA_CLAIMS[token.clientId];
      return claims ? { ...claims } : undefined;
    },
    ttl: {
      AccessToken: ttl,
      ClientCredentials: ttl,
    },
    findAccount: async () => undefined,
    renderError: async (ctx, out) => {
      ctx.type = 'application/json; charset=utf-8';
      ctx.body = out;
    },
  });

  // JWKS responses are cacheable for a minute.
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.path === '/jwks' && ctx.status === 200) {
      ctx.set('Cache-Control', 'max-age=60');
    }
  });

  provider.on('server_error', (_ctx, err) => {
    process.stderr.write(`oidc-provider server_error: ${err?.stack ?? err}\n`);
  });

  return provider;
}

let current; // the Provider instance requests are dispatched to
let currentHandler;

function install() {
  current = buildProvider();
  currentHandler = current.callback();
}

function sendJson(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json; charset=utf-8',
    'content-length': Buffer.byteLength(data),
    'cache-control': 'no-store',
  });
  res.end(data);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (url.pathname === '/__admin/rotate') {
    if (req.method !== 'POST') {
      sendJson(res, 405, { error: 'method_not_allowed' });
      return;
    }
    req.resume();
    const drop = ['1', 'true', 'yes'].includes(url.searchParams.get('drop') ?? '');
    const key = newRsaKey();
    rsaKeys = drop ? [key] : [key, ...rsaKeys];
    install();
    process.stderr.write(`rotated: signing kid=${key.kid} drop=${drop} rsa kids=${rsaKeys.map((k) => k.kid).join(',')}\n`);
    sendJson(res, 200, { kid: key.kid });
    return;
  }
  currentHandler(req, res);
});

server.on('error', (err) => {
  process.stderr.write(`server error: ${err.stack ?? err}\n`);
  process.exit(1);
});

server.listen(requestedPort, '127.0.0.1', () => {
  const { port } = server.address();
  issuer = `http://127.0.0.1:${port}`;
  install();
  process.stdout.write(`${JSON.stringify({ issuer, port, kid: rsaKeys[0].kid })}\n`);
});

function shutdown(signal) {
  process.stderr.write(`received ${signal}, exiting\n`);
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
