// A fast stand-in for SillyTavern's server.js, for bulk runtime tests.
// It honours the flags and environment CST passes to the real server: --port, --dataRoot,
// --listen/--listenAddressIPv4 and basic auth from SILLYTAVERN_BASICAUTHUSER_{USERNAME,PASSWORD},
// and it answers CST's health route as the overlay's server plugin does (see answerHealth).
// Knobs for failure tests come from <dataRoot>/standin.json, never from CST's own code:
//   {"startDelayMs": 500, "exitCode": 3, "ignoreSigterm": true}
// GET /standin/say?line=TEXT (with basic auth) writes TEXT to its log (stdout), for log tests;
// GET /standin/stream?seconds=N answers slowly, a line every 200 ms for N seconds;
// GET /standin/cookie?domain=D sets a cookie for domain D.
'use strict';
const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');

function flag(name, fallback) {
    const i = process.argv.indexOf(`--${name}`);
    return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const port = Number(flag('port', '8000'));
const dataRoot = path.resolve(flag('dataRoot', './data'));
const host = flag('listen', 'false') === 'true' ? flag('listenAddressIPv4', '0.0.0.0') : '127.0.0.1';
const user = process.env.SILLYTAVERN_BASICAUTHUSER_USERNAME || 'user';
const password = process.env.SILLYTAVERN_BASICAUTHUSER_PASSWORD || 'password';
const expected = 'Basic ' + Buffer.from(`${user}:${password}`).toString('base64');

fs.mkdirSync(path.join(dataRoot, 'default-user'), { recursive: true });
function readKnobs() {
    try { return JSON.parse(fs.readFileSync(path.join(dataRoot, 'standin.json'), 'utf8')); } catch { return {}; }
}
const knobs = readKnobs();
if (knobs.exitCode !== undefined) {
    console.error(`stand-in: exiting with ${knobs.exitCode} as asked`);
    process.exit(knobs.exitCode);
}
// a file that survives restarts, so tests can tell the same data dir came back: a line per start,
// an id of its own (not the pid: in a sandbox every instance is pid 2)
const startId = require('node:crypto').randomUUID();
const starts = path.join(dataRoot, 'default-user', 'starts.txt');
fs.appendFileSync(starts, `${startId}\n`);

// GET /api/plugins/cst/health with basic auth, before the other routes (without auth it is a 401 as
// any route). The knob {"sickStart": "<a line of starts.txt>"}, read on each request, makes the
// process of that start answer 503.
function answerHealth(handler) {
    return (req, res) => {
        if (req.url !== '/api/plugins/cst/health' || req.headers.authorization !== expected) {
            return handler(req, res);
        }
        const sick = readKnobs().sickStart === startId;
        const memory = process.memoryUsage();
        res.writeHead(sick ? 503 : 200, { 'Content-Type': 'application/json' });
        return res.end(JSON.stringify({
            status: sick ? 'sick' : 'ok', version: 'stand-in', instance: process.env.CST_INSTANCE_ID ?? null, start: startId,
            uptime: process.uptime(), memory: { rss: memory.rss, heapTotal: memory.heapTotal,
                heapUsed: memory.heapUsed, external: memory.external }, dataRoot,
        }));
    };
}

const server = http.createServer(answerHealth((req, res) => {
    if (req.headers.authorization !== expected) {
        res.writeHead(401, { 'WWW-Authenticate': 'Basic realm="SillyTavern"', 'Content-Type': 'text/plain' });
        return res.end('Unauthorized');
    }
    const url = new URL(req.url, 'http://standin');
    if (url.pathname === '/standin/stream') {   // a slow answer: a line every 200 ms for ?seconds=N
        const until = Date.now() + 1000 * Number(url.searchParams.get('seconds') || 1);
        res.writeHead(200, { 'Content-Type': 'text/plain' });
        const tick = setInterval(() => {
            res.write('tick\n');
            if (Date.now() >= until) {
                clearInterval(tick);
                res.end();
            }
        }, 200);
        return req.on('close', () => clearInterval(tick));
    }
    if (url.pathname === '/standin/cookie') {   // a cookie for the parent domain (?domain=st.test)
        res.writeHead(204, { 'Set-Cookie': `tossed=1; Domain=${url.searchParams.get('domain')}; Path=/` });
        return res.end();
    }
    if (url.pathname === '/standin/say') {
        console.log(url.searchParams.get('line') || '');
        res.writeHead(204);
        return res.end();
    }
    res.writeHead(200, { 'Content-Type': 'text/html' });
    res.end(`<html><body>stand-in SillyTavern on ${port}, data in ${dataRoot}</body></html>`);
}));

setTimeout(() => {
    server.listen(port, host, () => console.log(`stand-in SillyTavern is listening on ${host}:${port}`));
}, knobs.startDelayMs || 0);
server.on('error', (err) => { console.error(`stand-in: ${err.message}`); process.exit(1); });
if (knobs.ignoreSigterm) {
    process.on('SIGTERM', () => console.log('stand-in: ignoring SIGTERM as asked'));
} else {
    process.on('SIGTERM', () => server.close(() => process.exit(0)));
}
