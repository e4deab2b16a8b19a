"""Certificates for the TLS tests, made with the ``openssl`` command at test time.

EC P-256 keys (fast to make). Leaf certificates are issued with ``openssl ca``, which takes
explicit validity dates (``-startdate``/``-enddate``; OpenSSL 3.0's ``x509 -req`` has
only ``-days``), so that expired and not yet valid certificates can be made too.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CA_CONF = """\
[ca]
default_ca = ca_default
[ca_default]
database = {d}/index.txt
serial = {d}/serial
new_certs_dir = {d}
default_md = sha256
default_days = 2
default_crl_days = 2
policy = policy_any
unique_subject = no
copy_extensions = none
[policy_any]
commonName = supplied
[leaf]
basicConstraints = critical,CA:FALSE
subjectAltName = {san}
extendedKeyUsage = {eku}
"""


def openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("the TLS tests need the openssl command (apt-get install openssl)")
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, check=False)
    if done.returncode:
        raise RuntimeError(f"openssl {' '.join(args)}: {done.stderr.decode(errors='replace')}")


@dataclass(frozen=True)
class Ca:
    """A certificate authority: its directory, certificate and key."""

    name: str
    dir: Path

    @property
    def cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def key(self) -> Path:
        return self.dir / "ca.key"


def make_ca(base: Path, name: str) -> Ca:
    """A self-signed CA named ``name`` under ``base/name``."""
    d = base / name.replace(" ", "-")
    d.mkdir(parents=True, exist_ok=True)
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "30",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    return Ca(name, d)


def issue(
    ca: Ca,
    out: Path,
    cn: str,
    san: str = "DNS:broker.city.test",
    *,
    client: bool = False,
    start: str | None = None,
    end: str | None = None,
) -> tuple[Path, Path]:
    """A leaf certificate and key (``out``.pem / ``out``.key) for ``cn`` signed by ``ca``;
    ``start``/``end`` as ``YYYYMMDDHHMMSSZ`` (default: valid from now for 2 days).
    Returns (certificate, key)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    key, csr, crt = out.with_suffix(".key"), out.with_suffix(".csr"), out.with_suffix(".pem")
    conf = ca.dir / f"{out.name}.cnf"
    conf.write_text(CA_CONF.format(d=ca.dir, san=san, eku="clientAuth" if client else "serverAuth"))
    openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        f"/CN={cn}",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        cwd=ca.dir,
    )
    dates = []
    if start is not None:
        dates += ["-startdate", start]
    if end is not None:
        dates += ["-enddate", end]
    openssl(
        "ca",
        "-config",
        str(conf),
        "-batch",
        "-notext",
        "-cert",
        str(ca.cert),
        "-keyfile",
        str(ca.key),
        "-in",
        str(csr),
        "-out",
        str(crt),
        "-extensions",
        "leaf",
        *dates,
        cwd=ca.dir,
    )
    key.chmod(0o600)
    return crt, key
