"""The example fleet's HTTP API: counts hits in redis.

GET  /health  200 "ok" when every redis instance it was given answers PING,
              503 otherwise (the fleet tool's health check)
GET  /        the API's version, host and redis instances, as JSON
GET  /hits    the counter; POST /hits adds one

The redis instances come from service discovery: FLEET_REDIS_ADDRS, a
comma-separated list of host:port. Their password is the credential
`redis-password` (systemd's $CREDENTIALS_DIRECTORY/redis-password), read at
each connection so that a restart after a rotation needs nothing else; without
it, no AUTH is sent. Only the standard library is used.
"""

import argparse
import json
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COUNTER = "fleet-example-api:hits"


class RedisError(Exception):
    pass


def redis_addresses():
    raw = os.environ.get("FLEET_REDIS_ADDRS", "")
    return [a.strip() for a in raw.split(",") if a.strip()]


def split_address(address):
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def redis_password():
    """The password from the unit's credentials, or None."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = os.path.join(directory, "redis-password")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def encode(*args):
    parts = [f"*{len(args)}\r\n"]
    for arg in args:
        parts.append(f"${len(arg.encode())}\r\n{arg}\r\n")
    return "".join(parts).encode()


def reply(stream):
    line = stream.readline().decode().rstrip("\r\n")
    kind, rest = line[:1], line[1:]
    if kind == "-" or not line:
        raise RedisError(rest or "connection closed")
    if kind == "$":
        if rest == "-1":
            return None
        return stream.read(int(rest) + 2)[:-2].decode()
    return rest


def redis(address, *args, timeout=1.0):
    """Send one command to redis, after AUTH if there is a password."""
    password = redis_password()
    with socket.create_connection(split_address(address), timeout) as conn:
        stream = conn.makefile("rb")
        if password is not None:
            conn.sendall(encode("AUTH", password))
            reply(stream)
        conn.sendall(encode(*args))
        return reply(stream)


def unreachable():
    """The redis instances that do not answer PING."""
    failing = []
    for address in redis_addresses():
        try:
            if redis(address, "PING") != "PONG":
                failing.append(address)
        except (OSError, ValueError, RedisError):
            failing.append(address)
    return failing


class Handler(BaseHTTPRequestHandler):
    server_version = "fleet-example-api"

    def reply(self, status, body, content_type="text/plain"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def reply_json(self, status, value):
        self.reply(status, json.dumps(value) + "\n", "application/json")

    def hits(self, *command):
        addresses = redis_addresses()
        if not addresses:
            self.reply_json(503, {"error": "no redis instance configured"})
            return
        try:
            value = redis(addresses[0], *command)
        except (OSError, ValueError, RedisError) as error:
            self.reply_json(503, {"error": f"redis: {error}"})
            return
        self.reply_json(200, {"hits": int(value or 0)})

    def do_GET(self):
        if self.path == "/health":
            failing = unreachable()
            if failing:
                failing = ",".join(failing)
                self.reply(503, f"redis unreachable: {failing}\n")
            else:
                self.reply(200, "ok\n")
        elif self.path == "/":
            self.reply_json(200, {
                "service": "api",
                "version": os.environ.get("API_VERSION", "unknown"),
                "host": os.environ.get("FLEET_HOST", socket.gethostname()),
                "redis": redis_addresses(),
            })
        elif self.path == "/hits":
            self.hits("GET", COUNTER)
        else:
            self.reply(404, "not found\n")

    def do_POST(self):
        if self.path == "/hits":
            self.hits("INCR", COUNTER)
        else:
            self.reply(404, "not found\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.bind, args.port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
