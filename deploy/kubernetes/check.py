#!/usr/bin/python3
"""Checks deploy/kubernetes against the daemon it deploys, without a cluster.

Every manifest must parse; the DaemonSet's arguments, after Kubernetes' $(VAR) expansion
from the ConfigMap, must be flags `mu2 serve --help` lists, with routes to guests `mu2 guests`
lists; the probes must ask /healthz on the dispatcher's port, Prometheus' annotations /metrics
on it, and the Service must target it; the paths the daemon writes must be mounted (the root
file system is read-only); the grace period must outlast the drain period and the longest
request. Then the daemon runs with those very arguments (addresses and paths moved into a
scratch directory) and must answer the probe path with 200, the metrics path with mu2's
metrics, and every route.

usage: deploy/kubernetes/check.py [MU2_BINARY]   (default target/release/mu2; needs PyYAML,
Debian's python3-yaml, and /dev/kvm)
"""

import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
MU2 = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "../../target/release/mu2"))
CHECKS = []


def check(what, ok, detail=""):
    CHECKS.append((what, bool(ok)))
    print(("ok    " if ok else "FAIL  ") + what + ("" if ok or not detail else f": {detail}"))


def seconds(duration):
    """A mu2 duration (500ms, 10s, 2m) in seconds."""
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)?", duration)
    if not m:
        raise ValueError(f"not a duration: {duration}")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, data=None):
    try:
        with urllib.request.urlopen(url, data=data, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return None, str(e).encode()


# --- the manifests -----------------------------------------------------------------------
docs = {}
for path in sorted(glob.glob(os.path.join(HERE, "*.yaml"))):
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if doc is not None:
                docs.setdefault(doc["kind"], []).append(doc)
check("the manifests parse: Namespace, ConfigMap, DaemonSet, Service",
      all(len(docs.get(k, [])) == 1 for k in ("Namespace", "ConfigMap", "DaemonSet", "Service")), sorted(docs))
namespace = docs["Namespace"][0]["metadata"]["name"]
config = docs["ConfigMap"][0]
daemonset = docs["DaemonSet"][0]
service = docs["Service"][0]
check("every object lives in the namespace",
      all(d["metadata"].get("namespace") == namespace for d in (config, daemonset, service)))

pod = daemonset["spec"]["template"]
spec = pod["spec"]
(container,) = spec["containers"]
env = {}
for source in container.get("envFrom", []):
    ref = source.get("configMapRef", {}).get("name")
    check(f"envFrom names the ConfigMap ({ref})", ref == config["metadata"]["name"])
    env.update(config["data"])
for e in container.get("env", []):
    env[e["name"]] = e.get("value", "")


def expand(arg):
    def one(m):
        if m.group(1) not in env:
            raise KeyError(f"$({m.group(1)}) in {arg!r} is not in the ConfigMap or env")
        return env[m.group(1)]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, arg)


try:
    args = [expand(a) for a in container["args"]]
    check("every $(VAR) in the arguments is a ConfigMap key or env value", True)
except KeyError as e:
    args = container["args"]
    check("every $(VAR) in the arguments is a ConfigMap key or env value", False, str(e))
unused = [k for k in config["data"] if not any(f"$({k})" in a for a in container["args"])]
check("every ConfigMap key is used by an argument", not unused, unused)
check("the container runs mu2 serve",
      container["command"][0].endswith("/mu2") and args[0] == "serve", container["command"] + args[:1])

flags = {}
for a in args[1:]:
    m = re.fullmatch(r"(--[a-z-]+)=(.*)", a)
    check(f"argument {a!r} is --flag=value", m)
    if m:
        flags.setdefault(m.group(1), []).append(m.group(2))

help_text = subprocess.run([MU2, "serve", "--help"], capture_output=True, text=True, check=True).stdout
known = set(re.findall(r"^\s+(--[a-z-]+)", help_text, re.M))
check("every flag is one mu2 serve has", set(flags) <= known, sorted(set(flags) - known))
guests = {l.split()[0] for l in subprocess.run([MU2, "guests"], capture_output=True, text=True, check=True).stdout.splitlines() if l.strip()}
routes = [r.split("=", 1) for r in flags.get("--route", [])]
check("every route is /PATH=IMAGE to a built-in guest",
      routes and all(len(r) == 2 and r[0].startswith("/") and r[1] in guests for r in routes), routes)
check("no route under the daemon's own /healthz or /metrics",
      not any(r[0].rstrip("/") in ("/healthz", "/metrics") or r[0].startswith(("/healthz/", "/metrics/")) for r in routes))

# Ports and paths.
(http,) = flags["--http"]
http_port = int(http.rsplit(":", 1)[1])
ports = {p["name"]: p["containerPort"] for p in container["ports"]}
check("--http's port is the container port named http", ports.get("http") == http_port, (http, ports))
for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    get_ = container.get(probe, {}).get("httpGet", {})
    check(f"{probe} asks GET /healthz on the dispatcher's port",
          get_.get("path") == "/healthz" and get_.get("port") in ("http", http_port), get_)
notes = pod["metadata"].get("annotations", {})
check("Prometheus' annotations point at /metrics on the dispatcher's port",
      notes.get("prometheus.io/scrape") == "true" and notes.get("prometheus.io/path") == "/metrics"
      and notes.get("prometheus.io/port") == str(http_port), notes)
(service_port,) = service["spec"]["ports"]
check("the Service targets the dispatcher's port", service_port["targetPort"] in ("http", http_port), service_port)
check("the Service selects the DaemonSet's pods",
      service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
      and daemonset["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items())

# What the daemon writes must be mounted: the root file system is read-only.
mounts = [m["mountPath"] for m in container["volumeMounts"]]
for flag in ("--api-sock", "--images-dir"):
    (path,) = flags[flag]
    check(f"{flag} {path} is on a mounted volume", any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), mounts)
security = container["securityContext"]
check("least privilege: not privileged, no capabilities, no escalation, read-only root, non-root",
      not security.get("privileged", False) and security["capabilities"]["drop"] == ["ALL"]
      and not security.get("capabilities", {}).get("add") and security["allowPrivilegeEscalation"] is False
      and security["readOnlyRootFilesystem"] is True and spec["securityContext"]["runAsNonRoot"] is True)
resources = container["resources"]
check("/dev/kvm comes from the device plugin's resource, and requests and limits are set",
      resources["limits"].get("devices.kubevirt.io/kvm") == "1" and "memory" in resources["limits"]
      and {"cpu", "memory"} <= set(resources["requests"]), resources)
drain = seconds(flags["--drain-period"][0])
timeout = seconds(flags["--timeout"][0])
grace = spec["terminationGracePeriodSeconds"]
check(f"terminationGracePeriodSeconds ({grace}) > drain period ({drain:g}) + --timeout ({timeout:g}) + 5 s",
      grace > drain + timeout + 5)
readiness = container["readinessProbe"]
check("readiness fails within the drain period",
      readiness["periodSeconds"] * readiness["failureThreshold"] < drain)

# --- the daemon, run with those arguments --------------------------------------------------
scratch = tempfile.mkdtemp(prefix="mu2-k8s-")
port = free_port()
moved = []
for a in args:
    a = a.replace(f"--http={http}", f"--http=127.0.0.1:{port}")
    for flag in ("--api-sock", "--images-dir"):
        if a.startswith(flag + "="):
            a = f"{flag}={scratch}/{os.path.basename(a.split('=', 1)[1])}"
    moved.append(a)
daemon = subprocess.Popen([MU2] + moved, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
try:
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    status = None
    while time.time() < deadline and daemon.poll() is None:
        status, _ = get(base + container["readinessProbe"]["httpGet"]["path"])
        if status == 200:
            break
        time.sleep(0.2)
    check("the daemon, run with the manifest's arguments, answers the probe path with 200", status == 200,
          daemon.stderr.read() if daemon.poll() is not None else status)
    status, body = get(base + notes["prometheus.io/path"])
    check("it answers the metrics path with its Prometheus metrics", status == 200 and b"\nmu2_ready 1\n" in body, status)
    for prefix, image in routes:
        status, body = get(base + prefix, data=b"abc")
        check(f"route {prefix} answers", status == 200 and body, (status, body[:80]))
finally:
    daemon.terminate()
    try:
        daemon.wait(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
    shutil.rmtree(scratch, ignore_errors=True)

failed = sum(1 for _, ok in CHECKS if not ok)
print(f"deploy/kubernetes/check.py: {len(CHECKS) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
