"""Node identities: a long-term Ed25519 key pair and the node id derived from it.

A node id is the first 20 bytes of SHA-256 over the raw public key, written in
lowercase base32 without padding (32 characters).  It is what users copy and
pin, like an SSH host key fingerprint: knowing a node id is enough to verify
that a peer holds the matching private key.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import NameOID

from .errors import ConfigurationError, KeyFileError

__all__ = ["Identity", "node_id_of", "check_node_id", "verify_signature"]

NODE_ID_LENGTH = 32
_ALPHABET = set("abcdefghijklmnopqrstuvwxyz234567")


def node_id_of(public_key: bytes) -> str:
    """Node id of a raw 32-byte Ed25519 public key."""
    digest = hashlib.sha256(public_key).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def check_node_id(value: str) -> str:
    """Return ``value`` normalised, or raise ConfigurationError if it is no node id."""
    if not isinstance(value, str):
        raise ConfigurationError(f"a node id is a string, not {type(value).__name__}")
    norm = value.strip().lower()
    if len(norm) != NODE_ID_LENGTH or not set(norm) <= _ALPHABET:
        raise ConfigurationError(
            f"not a node id: {value!r} (expected {NODE_ID_LENGTH} base32 characters)"
        )
    return norm



def node_id_set(ids: Iterable[str] | None) -> set[str] | None:
    """A set of checked node ids from one id or several (None stays None: anyone)."""
    if ids is None:
        return None
    if isinstance(ids, str):
        ids = [ids]
    return {check_node_id(i) for i in ids}

def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True, eq=False)
class Identity:
    """A node's key pair.  Create with :meth:`generate` or :meth:`load`."""

    private_key: Ed25519PrivateKey
    public_key: bytes = field(init=False)
    node_id: str = field(init=False)

    def __post_init__(self) -> None:
        raw = self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        object.__setattr__(self, "public_key", raw)
        object.__setattr__(self, "node_id", node_id_of(raw))

    def __repr__(self) -> str:
        return f"<Identity {self.node_id}>"

    @classmethod
    def generate(cls) -> Identity:
        """A new random identity (keep it with :meth:`save` to reuse it)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Load a key file written by :meth:`save` (or ``netchan keygen``).

        Refuses a file that other users could read, like OpenSSH does.
        """
        path = Path(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise KeyFileError(f"key file not found: {path}") from None
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"key file {path} is accessible by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        try:
            data = path.read_bytes()
            key = serialization.load_pem_private_key(data, password=None)
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path} is not a netchan key file: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the private key as PEM to ``path`` with mode 0600."""
        path = Path(path)
        data = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise KeyFileError(f"{path} exists; refusing to overwrite a key file") from None
        except OSError as exc:
            raise KeyFileError(f"cannot write key file {path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)  # O_CREAT honours umask; an existing file keeps its mode
            os.write(fd, data)
        finally:
            os.close(fd)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def certificate(self) -> x509.Certificate:
        """A self-signed certificate for the TLS handshake of QUIC sessions.

        Nothing trusts it as a certificate: peers check that its public key
        matches the node id they expect, and the TLS handshake proves that we
        hold the private key.
        """
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.node_id)])
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(self.private_key, None)
        )


def public_key_of_certificate(cert_der: bytes) -> bytes:
    """Raw Ed25519 public key of a DER certificate; ValueError if it has none."""
    cert = x509.load_der_x509_certificate(cert_der)
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"peer certificate key is {type(key).__name__}, not Ed25519")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

