#!/usr/bin/env bash
# Prints N distinct free TCP ports on 127.0.0.1 (default 1) on one line.
# All are bound at once before any is released, so no two are the same
# (ports taken one after another can repeat: the kernel hands a released
# port out again).
#   read -r a b < <(scripts/free-ports.sh 2)   # one line, so read succeeds under set -e
set -euo pipefail
exec /usr/bin/python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
' "${1:-1}"
