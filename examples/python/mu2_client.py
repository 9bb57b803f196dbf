#!/usr/bin/env python3
"""A stdlib-only client of the mu2 control API (HTTP/1.1 + JSON over a Unix socket).

    from mu2_client import Mu2
    mu2 = Mu2("/tmp/mu2.sock")
    mu2.put_image("echo2", {"function": "echo"})
    body, headers = mu2.invoke("echo2", b"hello")

Run as a script for a demo: python3 mu2_client.py /tmp/mu2.sock
"""
import http.client
import json
import socket
import sys


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=60):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Mu2Error(Exception):
    def __init__(self, status, message):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class Mu2:
    def __init__(self, socket_path, timeout=60):
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method, path, body=b""):
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, path, body=body, headers={"content-length": str(len(body))})
            resp = conn.getresponse()
            data = resp.read()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            if not 200 <= resp.status < 300:
                try:
                    message = json.loads(data)["error"]
                except (ValueError, KeyError, TypeError):
                    message = data.decode(errors="replace")
                raise Mu2Error(resp.status, message)
            return resp.status, headers, data
        finally:
            conn.close()

    def put_image(self, name, spec):
        return json.loads(self.request("PUT", f"/images/{name}", json.dumps(spec).encode())[2])

    def list_images(self):
        return json.loads(self.request("GET", "/images")[2])

    def get_image(self, name):
        return json.loads(self.request("GET", f"/images/{name}")[2])

    def delete_image(self, name):
        return json.loads(self.request("DELETE", f"/images/{name}")[2])

    def invoke(self, name, data):
        """Returns (response bytes, headers): x-mu2-vm-id, x-mu2-fork-us, x-mu2-run-us, x-mu2-total-us."""
        _, headers, body = self.request("POST", f"/images/{name}/invoke", data)
        return body, headers

    def metrics(self):
        return self.request("GET", "/metrics")[2].decode()

    def health(self):
        return json.loads(self.request("GET", "/health")[2])


if __name__ == "__main__":
    mu2 = Mu2(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mu2.sock")
    print("health:", mu2.health())
    body, headers = mu2.invoke("echo", b"hello from python")
    print("echo:", body, "vm", headers.get("x-mu2-vm-id"), "total us", headers.get("x-mu2-total-us"))
    try:
        mu2.invoke("no-such-image", b"")
    except Mu2Error as e:
        print("expected error:", e)
