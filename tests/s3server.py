"""A real S3-compatible server for tests: moto's server mode, started as its own process on 127.0.0.1.

`S3Server` starts ``moto_server`` (the program users of moto start) on a
free port and waits until it answers.  `auth=True` starts it with request
authentication on from the first request (moto's
``INITIAL_NO_AUTH_ACTION_COUNT=0``), so keys it does not know are refused:
how a test sees credentials refused by a real server.  `latency` (seconds)
delays every request by that much, in the server (`bench/remote.py` uses it
to stand in for object-store round trips).

Tests use the `s3` fixture of ``conftest.py``: one server per session, a
fresh bucket per test, credentials in the environment as a user would set
them, and `S3.options` as ``--storage-options`` JSON or a dict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

from ports import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "m2m-test-key", "AWS_SECRET_ACCESS_KEY": "m2m-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}

_LAUNCH = """
import sys, time, logging
from werkzeug.serving import run_simple
from moto.server import DomainDispatcherApplication, create_backend_app
logging.getLogger("werkzeug").setLevel(logging.ERROR)
host, port, latency = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
app = DomainDispatcherApplication(create_backend_app)
def delayed(environ, start_response):
    if latency:
        time.sleep(latency)
    return app(environ, start_response)
run_simple(host, port, delayed, threaded=True, use_reloader=False)
"""



@dataclass
class S3Server:
    """A moto server process on 127.0.0.1 (see the module docstring); stop it with `stop`."""

    auth: bool = False
    latency: float = 0.0
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        env = dict(os.environ, **CREDENTIALS)
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, "127.0.0.1", str(self.port), str(self.latency)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urlopen(f"{self.endpoint}/", timeout=2).close()
                break
            except HTTPError:  # it answered, with an error (e.g. 403 with authentication on): it is up
                break
            except URLError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on port {self.port}: {exc}") from None
                time.sleep(0.1)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def options(self) -> dict:
        """Storage options for s3fs pointing at this server."""
        return {"endpoint_url": self.endpoint}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class S3:
    """A fresh bucket on a running server, for one test."""

    server: S3Server
    bucket: str = field(default_factory=lambda: "m2m-" + uuid.uuid4().hex[:12])

    @property
    def options(self) -> dict:
        return self.server.options

    @property
    def options_json(self) -> str:
        return json.dumps(self.options)

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options, skip_instance_cache=True)


def make_bucket(server: S3Server, name: str | None = None) -> S3:
    s3 = S3(server) if name is None else S3(server, name)
    s3.fs().mkdir(s3.bucket)
    return s3


ROOT = Path(__file__).resolve().parents[1]
