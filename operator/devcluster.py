"""A real Kubernetes API on 127.0.0.1 for development and tests: etcd + kube-apiserver, no PKI.

The apiserver serves with a self-signed certificate and authenticates a static bearer token
(``system:masters``); RBAC is on. There is no scheduler, controller manager or kubelet: the operator
and workers run as local processes pointed at this API. See INFRA.md for why the binary is built
from Debian's source package.

The binary is found via ``KUBEBUILDER_ASSETS``, then ``PATH``, then ``~/.cache/embedjob/bin``
(``EMBEDJOB_CACHE``), and built once with ``scripts/build-apiserver.sh`` when missing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from embedjob.services import free_ports, stop_process, wait_for_port

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-apiserver.sh"


def cache_dir() -> Path:
    return Path(os.environ.get("EMBEDJOB_CACHE", Path.home() / ".cache" / "embedjob"))


def find_apiserver(build: bool = True) -> str:
    """Path of a kube-apiserver binary; builds and caches one (8-10 minutes) when none exists."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and os.access(os.path.join(assets, "kube-apiserver"), os.X_OK):
        return os.path.join(assets, "kube-apiserver")
    on_path = shutil.which("kube-apiserver")
    if on_path:
        return on_path
    cached = cache_dir() / "bin" / "kube-apiserver"
    if os.access(cached, os.X_OK):
        return str(cached)
    if not build:
        raise FileNotFoundError("kube-apiserver not found (KUBEBUILDER_ASSETS, PATH, ~/.cache/embedjob/bin)")
    if not BUILD_SCRIPT.exists():
        raise FileNotFoundError(f"kube-apiserver not found and {BUILD_SCRIPT} is missing to build it")
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1]


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
    process can act as a ServiceAccount under RBAC (INFRA.md).
    """

    def __init__(self, workdir: Path, extra_tokens: dict[str, str] | None = None) -> None:
        self.dir = Path(workdir)
        self.extra_tokens = extra_tokens or {}
        self.etcd_port, self.peer_port, self.secure_port = free_ports(3)
        self.token = secrets.token_hex(16)
        self.etcd: subprocess.Popen | None = None
        self.apiserver: subprocess.Popen | None = None
        self._logs: list = []

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
        etcd_dir = self.dir / "etcd"
        etcd_log = open(self.dir / "etcd.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(etcd_log)
        self.etcd = subprocess.Popen(
            [find_etcd(), f"--data-dir={etcd_dir}", f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
             f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
             f"--listen-peer-urls=http://127.0.0.1:{self.peer_port}",
             f"--initial-advertise-peer-urls=http://127.0.0.1:{self.peer_port}",
             f"--initial-cluster=default=http://127.0.0.1:{self.peer_port}", "--name=default",
             "--quota-backend-bytes=2147483648"],
            stdout=etcd_log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.etcd_port, 30, self.etcd, "etcd")

        tokens = self.dir / "tokens.csv"
        lines = [f'{self.token},admin,1,"system:masters"']
        lines += [f"{tok},{rest}" for tok, rest in self.extra_tokens.items()]
        tokens.write_text("\n".join(lines) + "\n")
        sa_key = self.dir / "sa.key"
        if not sa_key.exists():
            subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        api_log = open(self.dir / "apiserver.log", "ab")  # noqa: SIM115
        self._logs.append(api_log)
        self.apiserver = subprocess.Popen(
            [apiserver, f"--etcd-servers=http://127.0.0.1:{self.etcd_port}", f"--cert-dir={self.dir / 'certs'}",
             f"--secure-port={self.secure_port}", "--bind-address=127.0.0.1",
             "--service-cluster-ip-range=10.0.0.0/24", f"--token-auth-file={tokens}",
             "--authorization-mode=RBAC", f"--service-account-issuer=https://127.0.0.1:{self.secure_port}",
             f"--service-account-key-file={sa_key}", f"--service-account-signing-key-file={sa_key}",
             "--insecure-port=0", "--enable-priority-and-fairness=false", "--v=0"],
            stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True)
        self._write_kubeconfig()
        self._wait_ready(timeout)
        return self

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

    def _get(self, path: str) -> tuple[int, str]:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.apiserver is not None and self.apiserver.poll() is not None:
                raise RuntimeError(f"kube-apiserver exited ({self.apiserver.returncode}); see {self.dir}/apiserver.log")
            try:
                code, body = self._get("/readyz")
                if code == 200:
                    # The default namespace appears shortly after readiness.
                    if self._get("/api/v1/namespaces/default")[0] == 200:
                        return
                last = f"{code} {body[:200]}"
            except OSError as e:
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"kube-apiserver not ready within {timeout}s: {last}")

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
        """Run kubectl against this cluster."""
        return subprocess.run(["kubectl", f"--kubeconfig={self.kubeconfig}", *args], input=input, text=True,
                              capture_output=True, check=check, timeout=timeout)

    def apply_crds(self, path: Path | None = None, timeout: float = 60) -> None:
        """Apply the CRD and wait until it is Established."""
        path = path or REPO_ROOT / "crds"
        self.kubectl("apply", "-f", str(path))
        self.kubectl("wait", "--for=condition=Established", "crd/embeddingjobs.embedjob.io",
                     f"--timeout={int(timeout)}s", timeout=timeout + 10)

    def stop(self) -> None:
        stop_process(self.apiserver, grace=10)
        stop_process(self.etcd, grace=10)
        for f in self._logs:
            f.close()
        self._logs = []
