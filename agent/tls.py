"""TLS towards the MQTT broker: contexts, failure causes, certificate expiry, secrets.

What the agent guarantees (``docs/mqtt.md``, "Session"):

* TLS is used towards every broker host that is not a loopback address (127.0.0.0/8,
  ``::1``, ``localhost``) unless the config says ``tls: false``; at least TLS 1.2.
* The broker's certificate is always verified, against ``tls.ca_file`` or the system's CA
  store, and must name the host connected to, or ``tls.server_name`` (checked against the
  certificate's subjectAltName, RFC 6125 section 6, and sent as SNI, RFC 6066 section 3).
  Only ``tls.insecure: true`` turns that off, loudly.
* Certificate, key and CA files are read again at every connection attempt
  (:class:`ReloadingContext`), so renewed files are used without a restart. paho-mqtt 2.x
  takes one context per client for the client's life (``tls_set_context``) and the client
  is kept across reconnects (its queue of in-flight QoS 1 messages is resent after the
  next CONNACK), so the context handed to paho builds a fresh one for each socket.
* A failed handshake is a failed connection attempt: retried with the link's backoff. Its
  cause is said once in plain words with the fix (:func:`explain`).
* Secrets (the MQTT password, the client key) can come from files or systemd credentials
  (systemd.exec(5), "Credentials": ``LoadCredential=NAME:PATH`` puts the file at
  ``$CREDENTIALS_DIRECTORY/NAME``); their values never appear in a message.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import socket
import ssl
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.readings import iso_ms

if TYPE_CHECKING:
    from agent.config.model import MqttConfig, TlsConfig

log = logging.getLogger(__name__)

MIN_VERSION = ssl.TLSVersion.TLSv1_2
"""Least TLS version offered (TLS 1.0 and 1.1 are deprecated by RFC 8996)."""
EXPIRY_WARN_DAYS = 30
"""A certificate this close to its notAfter gets a ``cert_expiring`` notice."""
NOTICE_EVERY_S = 86400.0
"""At most one ``cert_expiring`` notice per certificate per this many seconds."""
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
"""Set by systemd for a unit with ``LoadCredential=`` (systemd.exec(5))."""
MAX_SECRET_BYTES = 4096
"""A password file larger than this is refused (it is not a password)."""
MAX_PEM_BYTES = 1_000_000
"""A certificate file larger than this is not read for its expiry, and not used."""
MAX_KEY_BYTES = 65536
"""A client key file larger than this is refused (an RSA 16384-bit key in PEM takes 12 kB)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address written as such: ``localhost``, an IPv4
    address in 127.0.0.0/8 (RFC 1122 section 3.2.1.3), ``::1`` (RFC 4291 section 2.5.3) or
    an IPv4-mapped form of 127.0.0.0/8. Other names are not resolved: a name is never
    taken for loopback (TLS stays on)."""
    name = host.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


# ---------------------------------------------------------------------------------------
# secrets


class SecretError(OSError):
    """A secret cannot be read. The message says where it was looked for and how to fix
    it; it never holds the secret."""


def credential_path(name: str) -> Path:
    """``$CREDENTIALS_DIRECTORY/name``, the file systemd made for ``LoadCredential=name:…``.

    Raises:
        SecretError: the variable is not set (not run by systemd with a credential) or
            the file is not there.
    """
    base = os.environ.get(CREDENTIALS_ENV)
    if not base:
        raise SecretError(
            f"credential {name!r}: ${CREDENTIALS_ENV} is not set; run the agent as a systemd "
            f"service whose unit has LoadCredential={name}:/path/to/file (systemd.exec(5))"
        )
    path = Path(base) / name
    if not path.exists() and not path.is_symlink():
        raise SecretError(
            f"credential {name!r}: no file {path}; the unit needs "
            f"LoadCredential={name}:/path/to/file (systemd.exec(5))"
        )
    return path


def _os_reason(exc: OSError) -> str:
    """An OS error in a few words; a loop of symbolic links (ELOOP) said as such."""
    import errno

    if exc.errno == errno.ELOOP:
        return "it is a loop of symbolic links"
    return exc.strerror or type(exc).__name__


def read_regular_file(path: str | Path, limit: int, what: str) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes.

    The file is opened with ``O_NONBLOCK`` and looked at (``fstat``) before anything is
    read: a FIFO (whose read would wait for ever), a device, a socket or a directory is
    refused, and so is a bigger file (``what`` names the file's role in messages).

    Raises:
        SecretError: cannot be opened (missing, no permission, a loop of symbolic links),
            not a regular file, larger than ``limit``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise SecretError(f"cannot read {path}: {_os_reason(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "a directory"
                if stat.S_ISDIR(st.st_mode)
                else "a FIFO"
                if stat.S_ISFIFO(st.st_mode)
                else "a device"
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "not a regular file"
            )
            raise SecretError(f"{path} is {kind}: {what} must be a regular file")
        if st.st_size > limit:
            raise SecretError(f"{path} is larger than {limit} bytes: not {what}")
        chunks = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        if isinstance(exc, SecretError):
            raise
        raise SecretError(f"cannot read {path}: {_os_reason(exc)}") from None
    finally:
        os.close(fd)
    if total > limit:
        raise SecretError(f"{path} is larger than {limit} bytes: not {what}")
    return b"".join(chunks)


def read_secret_file(path: Path) -> str:
    """The text of a secret file, without trailing line ends (``echo pw > file`` works).

    Raises:
        SecretError: unreadable, not a regular file, larger than :data:`MAX_SECRET_BYTES`
            (:func:`read_regular_file`), not UTF-8, empty, or holding U+0000 (not allowed
            in an MQTT string, MQTT 3.1.1 section 1.5.3).
    """
    data = read_regular_file(path, MAX_SECRET_BYTES, "a password file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{path} is not UTF-8 text") from None
    text = text.rstrip("\r\n")
    if not text:
        raise SecretError(f"{path} is empty")
    problem = mqtt_string_problem(text)
    if problem is not None:
        raise SecretError(f"the password in {path} {problem}")
    return text


def mqtt_string_problem(text: str) -> str | None:
    """Why ``text`` cannot be an MQTT UTF-8 string, in words that never show it, or None:
    it holds U+0000 or a surrogate (U+D800..U+DFFF), which MQTT 3.1.1 section 1.5.3 (and
    MQTT 5.0 section 1.5.4) forbid, or is longer than 65,535 bytes in UTF-8."""
    rule = "MQTT strings cannot hold it (MQTT 3.1.1 section 1.5.3)"
    if "\x00" in text:
        return f"holds the character U+0000 (NUL): {rule}"
    for c in text:
        if "\ud800" <= c <= "\udfff":
            return f"holds a lone surrogate (U+{ord(c):04X}), which is no Unicode text: {rule}"
    if len(text.encode("utf-8")) > 65535:
        return (
            "is longer than 65,535 bytes, the most an MQTT string holds (MQTT 3.1.1 section 1.5.3)"
        )
    return None


def password_of(cfg: MqttConfig) -> str | None:
    """The MQTT password as it is now (files are read on every call), or None.

    Raises:
        SecretError: see :func:`read_secret_file`, :func:`credential_path`.
    """
    if cfg.password is not None:
        return cfg.password.get_secret_value()
    if cfg.password_file is not None:
        return read_secret_file(Path(cfg.password_file))
    if cfg.password_credential is not None:
        return read_secret_file(credential_path(cfg.password_credential))
    return None


def username_of(cfg: MqttConfig) -> str | None:
    """The MQTT user name: ``username``, or the ThingsBoard access token as it is now
    (``mqtt.thingsboard.access_token_file`` or ``access_token_credential``, read on every
    call; ThingsBoard's MQTT Device API takes the token as the user name), or None.

    Raises:
        SecretError: see :func:`read_secret_file`, :func:`credential_path`.
    """
    tb = cfg.thingsboard
    if tb is not None and tb.access_token_file is not None:
        return read_secret_file(Path(tb.access_token_file))
    if tb is not None and tb.access_token_credential is not None:
        return read_secret_file(credential_path(tb.access_token_credential))
    return cfg.username


def key_file_of(tls: TlsConfig) -> str | None:
    """Path of the client key: ``key_file`` or the ``key_credential`` file.

    Raises:
        SecretError: the credential is missing (:func:`credential_path`).
    """
    if tls.key_credential is not None:
        return str(credential_path(tls.key_credential))
    return tls.key_file


def readable_by_others(path: str | Path) -> int | None:
    """The permission bits of ``path`` when every user of the machine may read it (mode
    ``o+r``), else None (also when it cannot be looked at)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    return mode if mode & stat.S_IROTH else None


def security_warnings(
    cfg: MqttConfig, config_file: Path | None = None
) -> list[tuple[tuple[str | int, ...], str]]:
    """What ``validate`` warns about and the agent logs at start, as (config key path,
    message): TLS off towards a host that is not a loopback address, an unverified broker
    certificate, a password written in the config, secret files readable by every user,
    credentials sent in clear by permission. The TLS warnings are given for every broker
    of ``mqtt.brokers`` (:attr:`MqttConfig.endpoints`), once per TLS settings."""
    out: list[tuple[tuple[str | int, ...], str]] = []
    key_files: dict[tuple[str | int, ...], str | None] = {}
    for i, view in enumerate(cfg.endpoints):
        own = cfg.brokers is not None and cfg.brokers[i].tls is not None
        at: tuple[str | int, ...] = ("mqtt",) if cfg.brokers is None else ("mqtt", "brokers", i)
        tls_at = (*at, "tls") if own else ("mqtt", "tls")
        out += _endpoint_warnings(view, at, tls_at)
        tls = view.tls_settings
        if tls is not None and tls_at not in key_files:
            key_files[tls_at] = tls.key_file
            if tls.insecure:
                out.append(
                    (
                        (*tls_at, "insecure"),
                        "the broker's certificate is NOT verified (tls.insecure): any machine "
                        "on the path can pose as the broker; for tests only. Give the broker's "
                        "CA as tls.ca_file (and tls.server_name when connecting by IP address)",
                    )
                )
    if cfg.password is not None:
        where = (
            f"; and {config_file} is readable by every user"
            if config_file is not None and readable_by_others(config_file) is not None
            else ""
        )
        out.append(
            (
                ("mqtt", "password"),
                "the password is written in the config file: put it in a file only the agent "
                "can read (mqtt.password_file) or in a systemd credential "
                f"(mqtt.password_credential){where}",
            )
        )
    files: list[tuple[tuple[str | int, ...], str | None]] = [
        (("mqtt", "password_file"), cfg.password_file)
    ]
    files += [((*at, "key_file"), name) for at, name in key_files.items()]
    for path, name in files:
        mode = readable_by_others(name) if name is not None else None
        if mode is not None:
            out.append(
                (
                    path,
                    f"{name} holds a secret and is readable by every user (mode {mode:04o}): "
                    f"chmod o-rwx {name} (and let only the agent's user or group read it)",
                )
            )
    return out


def _endpoint_warnings(
    view: MqttConfig, at: tuple[str | int, ...], tls_at: tuple[str | int, ...]
) -> list[tuple[tuple[str | int, ...], str]]:
    """The warnings of :func:`security_warnings` about one broker: plain MQTT off
    loopback, TLS on port 1883 (``at``: where its host and port are, ``tls_at``: its TLS
    settings)."""
    out: list[tuple[tuple[str | int, ...], str]] = []
    tls = view.tls_settings
    if tls is None and not is_loopback(view.host):
        out.append(
            (
                tls_at,
                f"TLS is off towards {view.host}, which is not a loopback address: readings "
                "and alarms cross the network in clear and anyone on the path can forge "
                "them; remove 'tls: false' (TLS is the default)",
            )
        )
        if view.username is not None and view.allow_plaintext_credentials:
            out.append(
                (
                    ("mqtt", "allow_plaintext_credentials"),
                    f"the MQTT username and password go to {view.host} in clear",
                )
            )
    if tls is not None and view.port == 1883:
        out.append(
            (
                (*at, "port"),
                "TLS is on but port 1883 is MQTT's plain port (IANA): a broker there will "
                "not answer the TLS handshake. Use the broker's TLS port (8883, the default "
                "with TLS: remove 'port'), or say 'tls: false' for plain MQTT on the "
                "gateway's own network",
            )
        )
    return out


# ---------------------------------------------------------------------------------------
# certificates: validity from DER


def _der_item(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start, end) of the DER element at ``pos`` (ITU-T X.690 section 8.1: one tag
    octet, definite length in short or long form)."""
    if pos + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 4 or pos + n > len(der):
            raise ValueError("bad DER length")
        length = int.from_bytes(der[pos : pos + n], "big")
        pos += n
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _der_time(tag: int, raw: bytes) -> datetime:
    text = raw.decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ; YY >= 50 is 19YY (RFC 5280 4.1.2.5.1)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ (RFC 5280 4.1.2.5.2)
        raise ValueError("not a Time")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


def der_validity(der: bytes) -> tuple[datetime, datetime]:
    """(notBefore, notAfter) of a DER X.509 certificate.

    Python's ssl module decodes only the peer's certificate of a verified connection
    (``getpeercert()``); it has no public way to read a certificate file. So the fields
    are taken from the DER structure (RFC 5280 section 4.1): Certificate ::= SEQUENCE {
    tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer,
    validity SEQUENCE { notBefore Time, notAfter Time }, ... } ... } (section 4.1.2.5).

    Raises:
        ValueError: not a certificate in DER form.
    """
    tag, start, _ = _der_item(der, 0)
    if tag != 0x30:
        raise ValueError("not a DER SEQUENCE")
    tag, pos, _ = _der_item(der, start)
    if tag != 0x30:
        raise ValueError("no tbsCertificate")
    tag, _, end = _der_item(der, pos)
    if tag == 0xA0:  # [0] EXPLICIT version
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, pos = _der_item(der, pos)
    tag, vstart, _ = _der_item(der, pos)
    if tag != 0x30:
        raise ValueError("no validity")
    t1, a, b = _der_item(der, vstart)
    t2, c, d = _der_item(der, b)
    return _der_time(t1, der[a:b]), _der_time(t2, der[c:d])


def cert_file_not_after(path: str | Path) -> datetime | None:
    """notAfter of the first certificate in a PEM file, or None when it cannot be read."""
    try:
        text = read_regular_file(path, MAX_PEM_BYTES, "a certificate file").decode(
            "ascii", errors="replace"
        )
        begin = text.index("-----BEGIN CERTIFICATE-----")
        end = text.index("-----END CERTIFICATE-----", begin) + len("-----END CERTIFICATE-----")
        return der_validity(ssl.PEM_cert_to_DER_cert(text[begin:end]))[1]
    except (OSError, ValueError):
        return None


def peer_not_after(sock: ssl.SSLSocket) -> datetime | None:
    """notAfter of the broker's certificate on a connected socket: from the verified
    certificate (``getpeercert()``), or from its DER form when it was not verified."""
    try:
        cert = sock.getpeercert()
        if cert and "notAfter" in cert:
            return datetime.fromtimestamp(ssl.cert_time_to_seconds(str(cert["notAfter"])), UTC)
        der = sock.getpeercert(binary_form=True)
        return der_validity(der)[1] if der else None
    except (OSError, ValueError):
        return None


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso_ms(t: datetime) -> str:
    """The contract's form of a time (``agent.readings.iso_ms``: UTC, ms, ``Z``)."""
    return iso_ms(int(t.timestamp()) * 1000)


# ---------------------------------------------------------------------------------------
# contexts


class TlsSetupError(OSError):
    """The TLS files could not be loaded for a connection attempt (not a ValueError: paho
    would then retry the socket without a server name)."""


class RecordingSocket(ssl.SSLSocket):
    """An SSL socket that notes whether its handshake completed and the last error seen
    while reading or writing after it.

    With TLS 1.3 the broker judges the client certificate after the client's side of the
    handshake is done: its refusal arrives as an alert on the first read, or (when the
    broker closes at once, while the CONNECT it did not read is still in its buffer) as a
    reset that discards the alert. paho reports either as "connection lost"; what is noted
    here tells the link why (:func:`explain_close`).
    """

    tls_error: OSError | None = None
    handshake_done: bool = False

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        self.handshake_done = True

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except _NOT_ERRORS:
            raise
        except OSError as exc:
            self.tls_error = exc
            raise

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except _NOT_ERRORS:
            raise
        except OSError as exc:
            self.tls_error = exc
            raise


_NOT_ERRORS = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError)


def build_context(tls: TlsConfig) -> ssl.SSLContext:
    """A client context from the files as they are now: CA file or system CAs, certificate
    and hostname verification (unless ``insecure``), TLS >= 1.2, the client certificate.

    Raises:
        ssl.SSLError, OSError: a file is missing or unusable (:class:`SecretError` for a
            missing key credential).
    """
    if tls.ca_file is not None:
        read_regular_file(tls.ca_file, MAX_PEM_BYTES, "a CA file")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    ctx.minimum_version = MIN_VERSION
    if tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    load_client_cert(ctx, tls)
    return ctx


def load_client_cert(ctx: ssl.SSLContext, tls: TlsConfig) -> None:
    """Load the client certificate and key into ``ctx`` (nothing without ``cert_file``).

    A key protected by a passphrase is refused rather than prompted for (OpenSSL would ask
    on the terminal): keep the key readable by the agent alone, or encrypted at rest as a
    systemd credential (``LoadCredentialEncrypted=``, systemd-creds(1)).

    Raises:
        ssl.SSLError, OSError: unusable files; :class:`SecretError`: missing credential,
            encrypted key.
    """
    if tls.cert_file is None:
        return
    key = key_file_of(tls)
    read_regular_file(tls.cert_file, MAX_PEM_BYTES, "a certificate file")
    if key is not None:
        read_regular_file(key, MAX_KEY_BYTES, "a key file")

    def no_passphrase() -> str:
        raise SecretError(
            f"the client key {key} is protected by a passphrase, which the agent cannot "
            "type: store it without one, readable by the agent alone (chmod 600), or as an "
            "encrypted systemd credential (LoadCredentialEncrypted=, systemd-creds(1))"
        )

    ctx.load_cert_chain(tls.cert_file, key, password=no_passphrase)


class ReloadingContext(ssl.SSLContext):
    """The context given to paho (``Client.tls_set_context``): every :meth:`wrap_socket`
    wraps with a context freshly built from the files (:func:`build_context`), with
    ``server_name`` in place of the host when configured.

    paho calls ``wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)``
    and then ``do_handshake()`` itself (paho-mqtt 2.x ``Client._ssl_wrap_socket``); with
    ``check_hostname`` set here it leaves the hostname check to the context.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> ReloadingContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def __init__(self, tls: TlsConfig) -> None:
        self.tls = tls
        if tls.insecure:
            self.check_hostname = False
            self.verify_mode = ssl.CERT_NONE
        self.last_socket: RecordingSocket | None = None
        self.client_not_after: datetime | None = None
        """notAfter of the client certificate loaded for the last attempt."""

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        try:
            fresh = build_context(self.tls)
        except (OSError, ValueError) as exc:
            sock.close()
            raise TlsSetupError(_setup_problem(self.tls, exc)) from None
        if self.tls.cert_file is not None:
            self.client_not_after = cert_file_not_after(self.tls.cert_file)
        fresh.sslsocket_class = RecordingSocket
        name = self.tls.server_name or server_hostname
        wrapped = fresh.wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=name,
            session=session,
        )
        assert isinstance(wrapped, RecordingSocket)
        self.last_socket = wrapped
        return wrapped


def _setup_problem(tls: TlsConfig, exc: BaseException) -> str:
    if isinstance(exc, SecretError):
        return str(exc)
    reason = getattr(exc, "reason", None)
    if reason == "KEY_VALUES_MISMATCH":
        return (
            f"the client key does not belong to the certificate {tls.cert_file}: replace "
            "both files together (write new ones beside them, then rename)"
        )
    if isinstance(exc, FileNotFoundError):
        return f"TLS file missing: {exc.filename}"
    what = f"{reason}" if reason else (getattr(exc, "strerror", None) or type(exc).__name__)
    files = ", ".join(
        f for f in (tls.ca_file, tls.cert_file, tls.key_file, tls.key_credential) if f
    )
    return f"cannot load the TLS files ({files or 'system CA store'}): {what}"


# ---------------------------------------------------------------------------------------
# causes


@dataclass(frozen=True)
class Cause:
    """Why a connection attempt failed: ``key`` names the cause (a cause is logged once
    until it changes), ``text`` says it with the fix."""

    key: str
    text: str


_UNKNOWN_CA = {2, 18, 19, 20, 21}
"""OpenSSL verify codes of a chain that ends at no trusted CA (``openssl-verify(1)``):
unable to get issuer certificate, self-signed leaf, self-signed in chain, unable to get
local issuer certificate, unable to verify the first certificate."""
_CLIENT_CERT_ALERTS = {
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate revoked",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate expired",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsupported certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "unknown CA",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
}
"""TLS alerts a server sends about the client's certificate (RFC 8446 section 6.2)."""
_VERSION_REASONS = {
    "TLSV1_ALERT_PROTOCOL_VERSION",
    "UNSUPPORTED_PROTOCOL",
    "NO_PROTOCOLS_AVAILABLE",
    "TLSV1_ALERT_INSUFFICIENT_SECURITY",
}
_NOT_TLS_REASONS = {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}


@dataclass(frozen=True)
class Where:
    """What :func:`explain` needs to know about the attempt."""

    host: str
    port: int
    tls: TlsConfig
    clock_synced: bool
    client_not_after: datetime | None = None


def explain(exc: BaseException, at: Where) -> Cause | None:
    """The cause of a failed TLS connection attempt in plain words with its fix, or None
    when ``exc`` is not a TLS problem. Verify codes are OpenSSL's (``openssl-verify(1)``).
    """
    tls = at.tls
    if isinstance(exc, TlsSetupError):
        return Cause("setup:" + str(exc), f"{exc}; retrying")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _verify_cause(exc, at)
    if not isinstance(exc, ssl.SSLError):
        return None
    reason = str(exc.reason or "")
    mutual = tls.has_client_cert
    required = reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    if not mutual and (required or reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"):
        return _client_cert_cause(at, "TLS alert: certificate required")
    if reason in _CLIENT_CERT_ALERTS or required:
        alert = _CLIENT_CERT_ALERTS.get(reason, "certificate required")
        return _client_cert_cause(at, f"TLS alert: {alert}")
    if reason in _VERSION_REASONS:
        return Cause(
            "tls_version",
            f"the broker {at.host}:{at.port} and this gateway share no TLS version (this "
            "gateway offers TLS 1.2 and 1.3 only; older versions are broken, RFC 8996): "
            "enable TLS 1.2 or 1.3 on the broker",
        )
    if reason in _NOT_TLS_REASONS:
        return Cause(
            "not_tls",
            f"{at.host}:{at.port} does not answer in TLS ({reason.lower().replace('_', ' ')})"
            ": is it a plain MQTT port (1883)? Use the broker's TLS port (8883), or, on a "
            "trusted local link only, set 'tls: false'",
        )
    if reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":
        return Cause(
            "handshake_failure",
            f"the broker {at.host}:{at.port} broke off the TLS handshake (handshake failure "
            "alert): it may refuse this gateway's client certificate or share no cipher "
            "with it; the broker's log says which",
        )
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return Cause(
            "tls_closed",
            f"{at.host}:{at.port} closed the connection during the TLS handshake: does it "
            "speak TLS on this port, and does it accept this gateway (client certificate)?",
        )
    return Cause(f"tls:{reason or type(exc).__name__}", f"TLS error with the broker: {exc}")


def _client_cert_cause(at: Where, evidence: str, sure: bool = True) -> Cause:
    """The broker requires a client certificate (none configured) or refused this one."""
    maybe = "" if sure else "probably "
    if not at.tls.has_client_cert:
        return Cause(
            "client_cert_required",
            f"the broker {at.host}:{at.port} {maybe}requires a client certificate "
            f"({evidence}): give mqtt.tls.cert_file and mqtt.tls.key_file (or key_credential) "
            "issued by a CA the broker trusts",
        )
    expired = ""
    if at.client_not_after is not None and at.client_not_after < datetime.now(UTC):
        expired = f"; it expired on {_iso(at.client_not_after)}"
    return Cause(
        "client_cert_rejected",
        f"the broker {at.host}:{at.port} {maybe}refused this gateway's client certificate "
        f"{at.tls.cert_file} ({evidence}){expired}: it needs a certificate issued by a CA the "
        "broker trusts, valid and not revoked; renewed files are used at the next attempt, "
        "no restart needed",
    )


def explain_close(
    sock: RecordingSocket | None, at: Where, exc: BaseException | None = None
) -> Cause | None:
    """The cause of a failed TLS connection attempt: ``exc`` raised by the attempt, or the
    close before CONNACK seen on ``sock`` (the attempt's socket, None if it got no TLS
    socket); None when nothing points at TLS. An alert says it exactly; a close or reset
    right after a completed handshake is what a broker does that refuses (or misses) the
    client certificate (TLS 1.3 judges it after the client's side of the handshake is
    done), while a broker refusing anything else answers CONNECT with a reason code."""
    error = exc if exc is not None else (sock.tls_error if sock is not None else None)
    if sock is None or (exc is not None and not isinstance(exc, OSError)):
        return explain(error, at) if error is not None else None
    if isinstance(error, TimeoutError) and not sock.handshake_done:
        return Cause(
            "handshake_timeout",
            f"{at.host}:{at.port} accepted the connection but did not complete the TLS "
            "handshake in time: is a TLS broker listening there (not a firewall, a plain "
            "MQTT port or another service)?",
        )
    closed = error is None or isinstance(
        error, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionError
    )
    if sock.handshake_done and closed:
        what = "closed" if error is None or isinstance(error, ssl.SSLError) else "reset"
        return _client_cert_cause(
            at, f"it {what} the connection right after the TLS handshake", sure=False
        )
    if closed and error is not None:  # hung up on the ClientHello, no alert
        return Cause(
            "handshake_closed",
            f"{at.host}:{at.port} closed the connection during the TLS handshake ({error}): "
            "is this the broker's TLS port? A plain MQTT port (1883) hangs up on a TLS "
            "handshake; MQTT over TLS is usually on 8883 (remove mqtt.port, or set "
            "'tls: false' for a plain broker on the gateway's own network)",
        )
    return explain(error, at) if error is not None else None


def _verify_cause(exc: ssl.SSLCertVerificationError, at: Where) -> Cause:
    tls = at.tls
    code = exc.verify_code
    detail = f"OpenSSL verify code {code}: {str(exc.verify_message).rstrip('.')}"
    name = tls.server_name or at.host
    if code in _UNKNOWN_CA:
        trusted = f"in {tls.ca_file}" if tls.ca_file else "in the system's CA store"
        return Cause(
            "unknown_ca",
            f"the broker {at.host}:{at.port} shows a certificate not issued by a CA "
            f"{trusted} ({detail}): give the CA that issued the broker's certificate as "
            "mqtt.tls.ca_file",
        )
    if code == 62:
        return Cause(
            "hostname_mismatch",
            f"the broker's certificate at {at.host}:{at.port} is not issued for {name!r} "
            f"({detail}): connect by the name the certificate names (mqtt.host), or set "
            "mqtt.tls.server_name to it",
        )
    if code == 64:
        return Cause(
            "ip_mismatch",
            f"the broker's certificate at {at.host}:{at.port} does not name the address "
            f"{name} ({detail}): set mqtt.tls.server_name to the DNS name the certificate is "
            f"issued for, or have it issued with IP:{name} in its subjectAltName",
        )
    if code in (9, 10):
        what = "is not valid yet" if code == 9 else "has expired"
        now = _iso(datetime.now(UTC))
        if at.clock_synced:
            hint = (
                f"by this gateway's clock, which is synchronised (it shows {now}): the broker "
                "needs a valid certificate"
            )
        else:
            hint = (
                f"by this gateway's clock, which is NOT synchronised (it shows {now}): the "
                "certificate is probably fine and the clock wrong; check the time source "
                "(timedatectl status, NTP reachable?). Verification is not relaxed: the "
                "agent keeps retrying and connects once the clock is right"
            )
        key = ("not_yet_valid" if code == 9 else "expired") + (
            ":synced" if at.clock_synced else ":unsynced"
        )
        return Cause(key, f"the broker's certificate {what} ({detail}) {hint}")
    return Cause(
        f"verify:{code}",
        f"the broker's certificate at {at.host}:{at.port} failed verification ({detail})",
    )


# ---------------------------------------------------------------------------------------
# expiry


class CertExpiry:
    """notAfter of the client and the broker certificate; health fields and
    ``cert_expiring`` notices (at most one per certificate per :data:`NOTICE_EVERY_S`)."""

    def __init__(self) -> None:
        self.not_after: dict[str, datetime | None] = {"client": None, "server": None}
        self._noticed: dict[str, tuple[datetime, float]] = {}

    def notices(
        self, now: datetime | None = None, mono: float | None = None
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """``(kind, message, fields)`` for each certificate within
        :data:`EXPIRY_WARN_DAYS` of its notAfter (or past it) not noticed in the last
        :data:`NOTICE_EVERY_S`; fields ``certificate`` (``client``/``server``),
        ``expires`` (ISO 8601 UTC), ``days_left`` (whole days, negative once expired)."""
        now = now or datetime.now(UTC)
        mono = time.monotonic() if mono is None else mono
        out: list[tuple[str, str, dict[str, Any]]] = []
        for which, exp in self.not_after.items():
            if exp is None:
                continue
            left = (exp - now).total_seconds()
            if left > EXPIRY_WARN_DAYS * 86400:
                continue
            last = self._noticed.get(which)
            if last is not None and last[0] == exp and mono - last[1] < NOTICE_EVERY_S:
                continue
            self._noticed[which] = (exp, mono)
            days = math.floor(left / 86400)
            whose = "this gateway's client" if which == "client" else "the broker's"
            when = (
                f"expired on {_iso(exp)}"
                if left <= 0
                else f"expires on {_iso(exp)}, in {days} day(s)"
            )
            out.append(
                (
                    "cert_expiring",
                    f"{whose} certificate {when}: renew it",
                    {"certificate": which, "expires": _iso_ms(exp), "days_left": days},
                )
            )
        return out

    def health(self) -> dict[str, str | None]:
        return {
            f"{which}_cert_expires": None if exp is None else _iso_ms(exp)
            for which, exp in (
                ("server", self.not_after["server"]),
                ("client", self.not_after["client"]),
            )
        }
