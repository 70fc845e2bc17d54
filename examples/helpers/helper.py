#!/usr/bin/env python3
"""Example Muster / Choria provisioning helper in Python 3 (stdlib only).

Reads the request JSON on stdin and writes the reply JSON on stdout:
  - defers the node when its fact "defer" is "true";
  - picks plugin.choria.middleware_hosts by the "country" fact
    (mt -> choria1.mt.example.net:4223, otherwise $MUSTER_BROKER,
    default localhost:4222);
  - signs the node's CSR with the CA in $MUSTER_CA_DIR and returns the
    certificate, the CA and the ssldir. It signs with "muster-helper sign"
    ($MUSTER_HELPER_BIN, else muster-helper on the PATH), which starts in a
    few milliseconds, else with "${MUSTER_BIN:-muster} ca sign".
Diagnostics go to stderr (Muster keeps a bounded copy); exit 1 on error.

With --persistent it is a persistent helper (docs/helpers.md): one request
per stdin line, one reply line per request tagged with its request_id, and
{"request_id": ..., "error": ...} for a request it cannot answer.
"""

import json
import os
import shutil
import subprocess
import sys


class HelperError(Exception):
    pass


def fail(msg):
    raise HelperError(msg)


def answer(request):
    identity = request.get("identity") or fail("request has no identity")
    # The inventory is a JSON *string* holding an object.
    inventory = json.loads(request.get("inventory") or "{}")
    facts = inventory.get("facts") or {}

    if facts.get("defer") == "true":
        return {"defer": True, "msg": "node %s asked to be deferred" % identity}

    if facts.get("country") == "mt":
        brokers = "choria1.mt.example.net:4223"
    else:
        brokers = os.environ.get("MUSTER_BROKER") or "localhost:4222"

    csr = request.get("csr")
    ssldir = (csr or {}).get("ssldir") or "/etc/muster/ssl"
    reply = {
        "defer": False,
        "msg": "configured " + identity,
        "configuration": {
            "identity": identity,
            "plugin.choria.middleware_hosts": brokers,
            "plugin.security.provider": "file",
            "plugin.security.file.certificate": ssldir + "/certificate.pem",
            "plugin.security.file.key": ssldir + "/private.pem",
            "plugin.security.file.ca": ssldir + "/ca.pem",
            "plugin.choria.server.provision": "false",
        },
    }

    if csr:
        ca_dir = os.environ.get("MUSTER_CA_DIR") or fail("MUSTER_CA_DIR must name the CA directory")
        signed = subprocess.run(
            signer(ca_dir), input=csr["csr"], capture_output=True, text=True, timeout=30,
        )
        if signed.returncode != 0:
            fail("signing the CSR of %s failed: %s" % (identity, signed.stderr.strip()))
        with open(os.path.join(ca_dir, "ca.pem")) as f:
            reply["ca"] = f.read()
        reply["certificate"] = signed.stdout
        reply["ssldir"] = ssldir

    return reply


def signer(ca_dir):
    """The command that signs a CSR on stdin with the CA in ca_dir."""
    fast = os.environ.get("MUSTER_HELPER_BIN") or shutil.which("muster-helper")
    if fast:
        return [fast, "sign", "--ca-dir", ca_dir]
    return [os.environ.get("MUSTER_BIN") or "muster", "ca", "sign", "--dir", ca_dir, "--csr", "-"]


def main():
    if "--persistent" in sys.argv[1:]:
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            try:
                reply = answer(request)
            except Exception as e:  # one failed request must not end the helper
                reply = {"error": str(e)}
            reply["request_id"] = request.get("request_id")
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
        return
    try:
        json.dump(answer(json.load(sys.stdin)), sys.stdout)
    except HelperError as e:
        print("helper.py: " + str(e), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
