#!/usr/bin/python3
"""Creates a small active Glance image named NAME, as an openstack builder
would at the end of a build: the demo's and the end-to-end test's stand-in
for a real cloud build (the null builder makes no image). Python's standard
library only; credentials from the OS_* variables of the sourced RC file.

usage: glance-create-image.py NAME
Prints "Image: <uuid>" (the line Packer's openstack builder prints).
"""
import json
import os
import sys
import urllib.request


def call(method, url, body=None, headers=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if body is not None and "Content-Type" not in req.headers:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as resp:
        text = resp.read()
        return resp.headers, (json.loads(text) if text else None)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: glance-create-image.py NAME")
    name = sys.argv[1]
    env = os.environ
    project = {"name": env["OS_PROJECT_NAME"], "domain": {"name": env.get("OS_PROJECT_DOMAIN_NAME", "Default")}}
    auth = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": env["OS_USERNAME"],
                        "domain": {"name": env.get("OS_USER_DOMAIN_NAME", "Default")},
                        "password": env["OS_PASSWORD"],
                    }
                },
            },
            "scope": {"project": project},
        }
    }
    headers, token_body = call("POST", env["OS_AUTH_URL"].rstrip("/") + "/auth/tokens", auth)
    token = headers["X-Subject-Token"]
    endpoint = None
    for service in token_body["token"]["catalog"]:
        if service["type"] == "image":
            for ep in service["endpoints"]:
                if ep["interface"] == env.get("OS_INTERFACE", "public"):
                    endpoint = ep["url"].rstrip("/")
    if endpoint is None:
        sys.exit("no image endpoint in the catalog")
    auth_h = {"X-Auth-Token": token}
    _, image = call(
        "POST",
        endpoint + "/v2/images",
        {"name": name, "disk_format": "raw", "container_format": "bare", "visibility": "shared"},
        auth_h,
    )
    call(
        "PUT",
        endpoint + "/v2/images/%s/file" % image["id"],
        headers=dict(auth_h, **{"Content-Type": "application/octet-stream"}),
        raw=b"packuilon demo image\n",
    )
    print("Image: %s" % image["id"])


if __name__ == "__main__":
    main()
