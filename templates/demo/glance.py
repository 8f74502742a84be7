#!/usr/bin/python3
"""Glance, the way the demo and the tests need it, with the OS_* credentials
of a sourced RC file (Keystone v3 password auth). Python's standard library
only, so it runs wherever Keystone's packages are installed.

  glance.py create NAME   creates a small active image named NAME, as an
                          openstack builder would at the end of a build, and
                          prints "Image: <uuid>" (the builder's own line)
  glance.py show ID       prints the image's name
  glance.py share ID      adds a new project as a member of image ID, sets it
                          accepted, prints the project's ID
  glance.py list          prints every image with its members
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
    with urllib.request.urlopen(req, timeout=60) as resp:
        raw = resp.read()
        return resp.headers, (json.loads(raw) if raw else None)


def session():
    """(token, keystone URL, glance URL) for the credentials in the environment."""
    env = os.environ
    keystone = env["OS_AUTH_URL"].rstrip("/")
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
            "scope": {
                "project": {
                    "name": env["OS_PROJECT_NAME"],
                    "domain": {"name": env.get("OS_PROJECT_DOMAIN_NAME", "Default")},
                }
            },
        }
    }
    headers, body = call("POST", keystone + "/auth/tokens", auth)
    interface = env.get("OS_INTERFACE", "public")
    for service in body["token"]["catalog"]:
        if service["type"] == "image":
            for ep in service["endpoints"]:
                if ep["interface"] == interface:
                    return headers["X-Subject-Token"], keystone, ep["url"].rstrip("/")
    sys.exit("no image endpoint in the catalog")


def create(name):
    token, _, glance = session()
    _, image = call(
        "POST",
        glance + "/v2/images",
        {"name": name, "disk_format": "raw", "container_format": "bare", "visibility": "shared"},
        token,
    )
    call("PUT", "%s/v2/images/%s/file" % (glance, image["id"]), b"packuilon demo image\n", token,
         "application/octet-stream")
    print("Image: %s" % image["id"])


def show(image_id):
    token, _, glance = session()
    _, image = call("GET", "%s/v2/images/%s" % (glance, image_id), token=token)
    print(image["name"])


def share(image_id):
    token, keystone, glance = session()
    _, project = call("POST", keystone + "/projects",
                      {"project": {"name": "demo-consumers-%d" % os.getpid(), "domain_id": "default"}}, token)
    member = project["project"]["id"]
    call("POST", "%s/v2/images/%s/members" % (glance, image_id), {"member": member}, token)
    call("PUT", "%s/v2/images/%s/members/%s" % (glance, image_id, member), {"status": "accepted"}, token)
    print(member)


def list_images():
    token, _, glance = session()
    _, images = call("GET", glance + "/v2/images?limit=100&sort=created_at:asc", token=token)
    for image in images["images"]:
        members = []
        if image["visibility"] == "shared":
            _, m = call("GET", "%s/v2/images/%s/members" % (glance, image["id"]), token=token)
            members = ["%s (%s)" % (x["member_id"], x["status"]) for x in m["members"]]
        print("%-42s %s  members: %s" % (image["name"], image["id"], ", ".join(members) or "none"))


def main():
    commands = {"create": create, "show": show, "share": share, "list": list_images}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])


if __name__ == "__main__":
    main()
