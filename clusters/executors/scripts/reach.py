"""Which of the server's services answer this user without a password (run as the run user).

Sent to `python3 -I -S -` after one line, LABSITE_PARAMS = "<base64 of the JSON request>"
({"targets": [{"name", "kind", "host", "port", "path", "user", "database"}]}), like poll.py.
Answers one JSON line: {"open": [names of the targets that answered without a password]}. A
target that refuses, asks for a password, or does not answer within a second is closed.
Standard library only; it runs on the server's own machine (the local host's run user).

- redis: PING with no AUTH; +PONG means anyone on this machine may send the server's Celery
  tasks, or FLUSHDB.
- postgres: a startup message as the server's database role, with no password; an
  AuthenticationOk answer (trust) means anyone on this machine is that role.
"""

import base64
import json
import socket
import struct
import sys
from typing import Any


def connect(target: dict[str, Any]) -> socket.socket:
    if target.get("path"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(1.0)
        sock.connect(target["path"])
        return sock
    return socket.create_connection((target["host"], int(target["port"])), timeout=1.0)


def redis_open(sock: socket.socket) -> bool:
    sock.sendall(b"*1\r\n$4\r\nPING\r\n")
    return sock.recv(64).startswith(b"+PONG")


def postgres_open(sock: socket.socket, user: str, database: str) -> bool:
    body = struct.pack("!i", 196608)  # protocol 3.0
    for key, value in (("user", user), ("database", database)):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    sock.sendall(struct.pack("!i", len(body) + 4) + body)
    head = sock.recv(9)
    # 'R', length 8, code 0: AuthenticationOk, given without asking for anything.
    return len(head) == 9 and head[:1] == b"R" and struct.unpack("!ii", head[1:9]) == (8, 0)


def is_open(target: dict[str, Any]) -> bool:
    try:
        sock = connect(target)
    except OSError:
        return False
    try:
        if target["kind"] == "redis":
            return redis_open(sock)
        if target["kind"] == "postgres":
            return postgres_open(sock, target["user"], target["database"])
        return False
    except OSError:
        return False
    finally:
        sock.close()


if __name__ == "__main__":
    request = json.loads(base64.b64decode(globals()["LABSITE_PARAMS"]))
    found = [t["name"] for t in request["targets"] if is_open(t)]
    sys.stdout.write(json.dumps({"open": found}))
