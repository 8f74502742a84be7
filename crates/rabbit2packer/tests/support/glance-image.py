#!/usr/bin/python3
"""Test helper: make or read a Glance image with the OS_* credentials in the
environment (Keystone v3 password auth), as a site's build step would.

  glance-image.py create NAME   -> prints the new (active) image's ID
  glance-image.py show ID       -> prints the image's name
"""
import json
import os
import sys
import urllib.request


def call(method, url, body=None, token=None, ctype="application/json"):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", ctype)
    if token:
        req.add_header("X-Auth-Token", token)
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
        return r.headers, (json.loads(raw) if raw else None)


def session():
    auth = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": os.environ["OS_USERNAME"],
                        "password": os.environ["OS_PASSWORD"],
                        "domain": {"name": os.environ.get("OS_USER_DOMAIN_NAME", "Default")},
                    }
                },
            },
            "scope": {
                "project": {
                    "name": os.environ["OS_PROJECT_NAME"],
                    "domain": {"name": os.environ.get("OS_PROJECT_DOMAIN_NAME", "Default")},
                }
            },
        }
    }
    headers, body = call("POST", os.environ["OS_AUTH_URL"].rstrip("/") + "/auth/tokens", auth)
    token = headers["X-Subject-Token"]
    for svc in body["token"]["catalog"]:
        if svc["type"] == "image":
            for ep in svc["endpoints"]:
                if ep["interface"] == "public":
                    return token, ep["url"].rstrip("/")
    sys.exit("no public image endpoint in the catalog")


def main():
    token, glance = session()
    if sys.argv[1] == "create":
        _, img = call(
            "POST",
            glance + "/v2/images",
            {"name": sys.argv[2], "disk_format": "raw", "container_format": "bare", "visibility": "shared"},
            token,
        )
        call("PUT", glance + "/v2/images/%s/file" % img["id"], b"packuilon test image\n", token,
             "application/octet-stream")
        print(img["id"])
    elif sys.argv[1] == "show":
        _, img = call("GET", glance + "/v2/images/" + sys.argv[2], None, token)
        print(img["name"])


main()
