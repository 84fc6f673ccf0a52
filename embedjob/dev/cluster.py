"""A real Kubernetes API on 127.0.0.1 for development and tests: etcd + kube-apiserver, no PKI.

The apiserver serves with a self-signed certificate and authenticates a static bearer token
(``system:masters``); RBAC is on. There is no scheduler, controller manager or kubelet: the operator
and workers run as local processes pointed at this API. docs/operations.md says why the binary is
built from Debian's source package.

The binary is found via ``KUBEBUILDER_ASSETS``, then ``PATH``, then ``~/.cache/embedjob/bin``
(``EMBEDJOB_CACHE``). Nothing here builds it: ``scripts/build-apiserver.sh`` (run by
``scripts/setup.sh`` and ``scripts/test.sh``) does, once, and :func:`find_apiserver` says so when it
is missing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from embedjob.bundled import crd_manifest
from embedjob.dev.services import free_ports, spawn, stop_process, wait_for_port


def cache_dir() -> Path:
    return Path(os.environ.get("EMBEDJOB_CACHE", Path.home() / ".cache" / "embedjob"))


def find_apiserver() -> str:
    """Path of a kube-apiserver binary: ``KUBEBUILDER_ASSETS``, ``PATH``, then the cache."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and os.access(os.path.join(assets, "kube-apiserver"), os.X_OK):
        return os.path.join(assets, "kube-apiserver")
    on_path = shutil.which("kube-apiserver")
    if on_path:
        return on_path
    cached = cache_dir() / "bin" / "kube-apiserver"
    if os.access(cached, os.X_OK):
        return str(cached)
    raise FileNotFoundError(
        f"kube-apiserver not found (looked in $KUBEBUILDER_ASSETS, on PATH and in {cached.parent}).\n"
        "  Build it once (8-10 minutes, Debian 12): scripts/build-apiserver.sh in an embedjob source checkout\n"
        "  (scripts/setup.sh runs it), or point KUBEBUILDER_ASSETS at a folder holding kube-apiserver and etcd\n"
        "  (envtest binaries work).")


def find_etcd() -> str:
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and os.access(os.path.join(assets, "etcd"), os.X_OK):
        return os.path.join(assets, "etcd")
    found = shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)
    if not found:
        raise FileNotFoundError("etcd not found: apt-get install -y etcd-server")
    return found


class DevCluster:
    """etcd + kube-apiserver on free 127.0.0.1 ports with a token file and a kubeconfig.

    ``extra_tokens`` maps a token to a user line suffix (``"user,uid,\\"group1,group2\\""``) so a
    process can act as a ServiceAccount under RBAC (docs/operations.md, "A real apiserver").
    """

    def __init__(self, workdir: Path, extra_tokens: dict[str, str] | None = None) -> None:
        self.dir = Path(workdir)
        self.extra_tokens = extra_tokens or {}
        self.etcd_port, self.peer_port, self.secure_port = free_ports(3)
        self.token = secrets.token_hex(16)
        self.etcd: subprocess.Popen | None = None
        self.apiserver: subprocess.Popen | None = None

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.secure_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig)}

    def start(self, timeout: float = 120) -> DevCluster:
        self.dir.mkdir(parents=True, exist_ok=True)
        apiserver = find_apiserver()
        self.etcd = spawn(self.etcd_command(), self.etcd_log, self.dir)
        wait_for_port(self.etcd_port, 30, self.etcd, "etcd")

        lines = [f'{self.token},admin,1,"system:masters"']
        lines += [f"{tok},{rest}" for tok, rest in self.extra_tokens.items()]
        (self.dir / "tokens.csv").write_text("\n".join(lines) + "\n")
        sa_key = self.dir / "sa.key"
        if not sa_key.exists():
            subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.apiserver = spawn(self.apiserver_command(apiserver), self.apiserver_log, self.dir)
        self._write_kubeconfig()
        self.wait_ready(timeout)
        return self

    @property
    def etcd_log(self) -> Path:
        return self.dir / "etcd.log"

    @property
    def apiserver_log(self) -> Path:
        return self.dir / "apiserver.log"

    def etcd_command(self) -> list[str]:
        return [find_etcd(), f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{self.peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{self.peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{self.peer_port}", "--name=default",
                "--quota-backend-bytes=2147483648"]

    def apiserver_command(self, binary: str) -> list[str]:
        sa_key = self.dir / "sa.key"
        return [binary, f"--etcd-servers=http://127.0.0.1:{self.etcd_port}", f"--cert-dir={self.dir / 'certs'}",
                f"--secure-port={self.secure_port}", "--bind-address=127.0.0.1",
                "--service-cluster-ip-range=10.0.0.0/24", f"--token-auth-file={self.dir / 'tokens.csv'}",
                "--authorization-mode=RBAC", f"--service-account-issuer=https://127.0.0.1:{self.secure_port}",
                f"--service-account-key-file={sa_key}", f"--service-account-signing-key-file={sa_key}",
                "--insecure-port=0", "--enable-priority-and-fairness=false", "--v=0"]

    def _write_kubeconfig(self) -> None:
        # JSON is valid YAML; kubectl, the Python client and kopf all read it.
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "embedjob-dev",
                          "cluster": {"server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "embedjob-dev",
                          "context": {"cluster": "embedjob-dev", "user": "admin", "namespace": "default"}}],
            "current-context": "embedjob-dev",
        }
        self.kubeconfig.write_text(json.dumps(cfg, indent=1))
        self.kubeconfig.chmod(0o600)

    def wait_ready(self, timeout: float) -> None:
        wait_apiserver_ready(self.server, self.token, timeout, self.apiserver, self.apiserver_log)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
        """Run kubectl against this cluster."""
        return subprocess.run(["kubectl", f"--kubeconfig={self.kubeconfig}", *args], input=input, text=True,
                              capture_output=True, check=check, timeout=timeout)

    def apply_crds(self, path: Path | None = None, timeout: float = 60) -> None:
        """Apply the CRD (by default the packaged copy) and wait until it is Established."""
        self.kubectl("apply", "-f", str(path or crd_manifest()))
        self.kubectl("wait", "--for=condition=Established", "crd/embeddingjobs.embedjob.io",
                     f"--timeout={int(timeout)}s", timeout=timeout + 10)

    def stop(self) -> None:
        stop_process(self.apiserver, grace=10)
        stop_process(self.etcd, grace=10)


def _get(server: str, token: str, path: str) -> tuple[int, str]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(server + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def wait_apiserver_ready(server: str, token: str, timeout: float, proc: subprocess.Popen | None = None,
                         log: Path | None = None) -> None:
    """Until ``/readyz`` answers 200 and the default namespace exists (it appears shortly after)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"kube-apiserver exited ({proc.returncode}); see {log}")
        try:
            code, body = _get(server, token, "/readyz")
            if code == 200 and _get(server, token, "/api/v1/namespaces/default")[0] == 200:
                return
            last = f"{code} {body[:200]}"
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"kube-apiserver not ready within {timeout}s: {last}")
