"""
The inbound listener's TLS context for STARTTLS.

The certificate and key come from ``[smtp] tls_certificate`` / ``tls_key``.
Without them a node uses a self-signed pair kept in a ``tls`` directory beside
the spool, generated on first start and logged as such: opportunistic TLS
between MTAs does not verify certificates, so a self-signed one still protects
against passive eavesdropping (and never against an active attacker).

This module reads and writes files: call it while building the service,
before the reactor runs, never from the reactor thread while it does.
"""

from __future__ import annotations

import datetime
import fcntl
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger

from mailhub.config import ConfigError, HubConfig

__all__ = ["generate_self_signed", "server_tls_options", "tls_files"]

_log = Logger(namespace="mailhub.smtp.tls")


def tls_files(config: HubConfig) -> tuple[str, str, bool]:
    """
    Where the listener's certificate and key are.

    :returns: ``(certificate path, key path, configured)``; when not
        configured the paths are ``tls/cert.pem`` and ``tls/key.pem`` in the
        directory of the spool (the store's ``path``, else the config file's).
    """
    if config.smtp.tls_certificate:
        return config.smtp.tls_certificate, config.smtp.tls_key, True
    store_path = config.store.get("path")
    if isinstance(store_path, str) and store_path:
        base = os.path.dirname(os.path.join(config.config_dir, store_path))
    else:
        base = config.config_dir
    tls_dir = os.path.join(base, "tls")
    return os.path.join(tls_dir, "cert.pem"), os.path.join(tls_dir, "key.pem"), False


def generate_self_signed(hostname: str, cert_path: str, key_path: str, now: float) -> None:
    """
    Write a new self-signed certificate for ``hostname`` and its RSA key as
    PEM files; the key file is created mode 0600.  Existing files are replaced.

    :param now: POSIX time the certificate becomes valid (it is valid 10 years).
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    start = datetime.datetime.fromtimestamp(now, datetime.UTC) - datetime.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.dirname(key_path) or ".", mode=0o700, exist_ok=True)
    os.makedirs(os.path.dirname(cert_path) or ".", exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    tmp = key_path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    os.replace(tmp, key_path)
    with open(cert_path + ".tmp", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(cert_path + ".tmp", cert_path)


def server_tls_options(config: HubConfig, now: float) -> CertificateOptions:
    """
    The STARTTLS context of the SMTP listener, generating the self-signed
    pair first when no certificate is configured and none was generated yet.

    :param now: POSIX time, for a generated certificate's validity.
    :raises ConfigError: naming ``smtp.tls_certificate`` when the configured
        files cannot be read or do not hold a matching certificate and key.
    """
    cert_path, key_path, configured = tls_files(config)
    if not configured and not (os.path.exists(cert_path) and os.path.exists(key_path)):
        # Two nodes of one configuration started at once (one twistd per
        # node) would each write a pair over the other's: one generates, the
        # other waits for it and uses its pair.
        os.makedirs(os.path.dirname(key_path) or ".", mode=0o700, exist_ok=True)
        with open(os.path.join(os.path.dirname(key_path) or ".", ".generate.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            generated = not (os.path.exists(cert_path) and os.path.exists(key_path))
            if generated:
                generate_self_signed(config.hostname, cert_path, key_path, now)
    else:
        generated = False
    if generated:
        _log.warn(
            "no [smtp] tls_certificate configured: generated a self-signed certificate for "
            "{hostname} in {path} (STARTTLS works; clients that verify will not trust it)",
            hostname=config.hostname,
            path=cert_path,
        )
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
        # The certificate file may carry the intermediates after the leaf.
        chain = x509.load_pem_x509_certificates(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        options = CertificateOptions(
            privateKey=key,  # type: ignore[arg-type]  # pyOpenSSL takes cryptography objects
            certificate=chain[0],  # type: ignore[arg-type]
            extraCertChain=chain[1:],  # type: ignore[arg-type]
        )
        options.getContext()  # checks that the key matches the certificate
    except OSError as e:
        raise ConfigError(config.path, [("smtp.tls_certificate", f"cannot read {e.filename}: {e.strerror}")])
    except Exception as e:  # noqa: BLE001 - pyOpenSSL raises several kinds for bad PEM
        raise ConfigError(
            config.path,
            [("smtp.tls_certificate", f"{cert_path} / {key_path}: not a PEM certificate and matching key ({e})")],
        )
    return options
