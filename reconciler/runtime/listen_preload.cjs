// CST's preload (node --require): SillyTavern listens on the socket CST opened for it.
//
// CST binds the instance's address itself (a Unix socket behind the edge, or the instance's own
// port) and hands the listening socket down as a file descriptor named by CST_LISTEN_FD, so no
// other process can take that address while node loads, runs or is parked. The first server that
// asks to listen gets that descriptor instead of the host and port it named; SillyTavern's files
// stay as they are.
'use strict';
const net = require('node:net');

const fd = Number(process.env.CST_LISTEN_FD);
delete process.env.CST_LISTEN_FD;   // not passed on to anything SillyTavern starts
if (Number.isInteger(fd) && fd > 2) {
    const listen = net.Server.prototype.listen;
    let handed = false;
    net.Server.prototype.listen = function listenOnCstSocket(...args) {
        if (handed) {
            return listen.apply(this, args);
        }
        handed = true;
        const done = args.find((arg) => typeof arg === 'function');
        return listen.call(this, { fd }, done);
    };
}
